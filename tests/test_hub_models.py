"""A pre-quantized MLX repo (the mlx-community ``*-4bit`` kind) pulls, runs, is listed and removed.

The repo is made by mlx-lm's own converter (``mlx_lm.convert`` with 4-bit quantization) from a tiny
transformers llama and served by the loopback Hub. ``run REPO_ID`` pulls it implicitly (saying so on
stderr); mlx-lm then reads the very snapshot we pulled and produces the same greedy tokens as ours.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from tests.hf_oracle import build_tiny_checkpoint
from tests.hub_server import HubServer, ServedRepo, cli_env, run_cli
from tests.tiny_configs import TINY_CONFIGS

REPO = "mlx-community/tiny-llama-4bit"
PROMPT = "The capital of France"


@pytest.fixture(scope="module")
def mlx_folder(tmp_path_factory) -> Path:
    from mlx_lm import convert

    root = tmp_path_factory.mktemp("mlx")
    source = build_tiny_checkpoint(root / "source", **TINY_CONFIGS["llama"], with_tokenizer=True)
    convert(str(source), str(root / "q4"), quantize=True, q_bits=4, q_group_size=64)
    return root / "q4"


def mlx_lm_greedy(folder: Path, prompt: str, n: int) -> list[int]:
    """Greedy tokens from mlx-lm itself, with its own tokenizer and chat template handling."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = load(str(folder))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    steps = generate_step(mx.array(ids), model, max_tokens=n, sampler=make_sampler(temp=0.0))
    return [int(token) for token, _ in steps]


def test_mlx_repo_pulls_runs_lists_and_is_removed(mlx_folder, tmp_path):
    assert json.loads((mlx_folder / "config.json").read_text())["quantization"]["bits"] == 4
    hf_home = tmp_path / "hf"
    with HubServer() as hub:
        repo = hub.add(ServedRepo.from_folder(REPO, mlx_folder))
        env = cli_env(hub.url, hf_home)
        args = ["--prompt", PROMPT, "--max-tokens", "8", "--temp", "0", "--json"]
        answer = run_cli("run", REPO, *args, env=env)
        assert answer.returncode == 0, answer.stderr
        assert f"{REPO} is not in the Hub cache: pulling it from {hub.url}" in answer.stderr
        assert hub.files_fetched(REPO) == {
            "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "model.safetensors.index.json", "model.safetensors",
        }
    snapshot = hf_home / "hub" / "models--mlx-community--tiny-llama-4bit" / "snapshots" / repo.commit
    tokens = json.loads(answer.stdout)["tokens"]
    local = CliRunner().invoke(app, ["run", str(mlx_folder), *args])
    assert local.exit_code == 0, local.output
    assert len(tokens) == 8 and tokens == json.loads(local.stdout)["tokens"]
    assert mlx_lm_greedy(snapshot, PROMPT, 8) == tokens

    # The Hub is gone from here on: list and rm work on the cache alone.
    listed = run_cli("list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    (entry,) = [m for m in json.loads(listed.stdout) if not m["default"]]  # the embedded default is listed too
    source = json.loads(CliRunner().invoke(app, ["info", str(mlx_folder), "--json"]).stdout)
    blobs = snapshot.parent.parent / "blobs"
    assert entry["name"] == REPO and entry["revision"] == "main" and entry["path"] == str(snapshot)
    assert entry["architecture"] == "LlamaForCausalLM" and entry["quantization"] == "4-bit affine, group 64"
    assert entry["params_total"] == source["params_total"] > 100_000
    assert entry["size_on_disk_bytes"] == sum(p.stat().st_size for p in blobs.iterdir())
    table = run_cli("list", env=env).stdout.splitlines()
    assert table[0].split() == ["NAME", "ARCHITECTURE", "PARAMETERS", "QUANTIZATION", "SIZE", "MODIFIED"]
    assert table[1].startswith(REPO) and "4-bit affine, group 64" in table[1]

    declined = run_cli("rm", REPO, env=env, stdin="n\n")
    assert declined.returncode == 0 and "kept; nothing removed" in declined.stderr  # the user's choice
    assert snapshot.is_dir()
    removed = run_cli("rm", REPO, "--yes", env=env)
    assert removed.returncode == 0 and f"removed {REPO}" in removed.stderr, removed.stderr
    assert not snapshot.parent.parent.exists()
    assert [m["name"] for m in json.loads(run_cli("list", "--json", env=env).stdout) if not m["default"]] == []
