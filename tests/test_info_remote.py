"""`edge-llm info owner/name` for a repo not in the cache reads config.json and safetensors headers, no weights.

The loopback Hub (tests/hub_server.py) serves a tiny Llama whose weights are a few MB: the server's log shows
every safetensors request was a ranged header read, and the Hub cache is left without the repo. The facts
must equal `info` of the same folder on disk, and the sampling defaults come from the repo's own
generation_config.json.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cli.main import app
from tests.hf_oracle import build_tiny_checkpoint
from tests.hub_server import HubServer, ServedRepo, cli_env, run_cli
from tests.tiny_configs import TINY_CONFIGS

REPO = "org/tiny-llama"
SAME = ("architecture", "model_type", "params_total", "params_active", "layers", "dtype", "quantization",
        "context_length", "size_bytes", "tokenizer", "chat_template", "sampling")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    config = dict(TINY_CONFIGS["llama"], hidden_size=256, intermediate_size=512, vocab_size=4096)
    folder = build_tiny_checkpoint(tmp_path_factory.mktemp("info-remote") / "llama", **config, with_tokenizer=True)
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 0.3, "top_p": 0.8, "do_sample": True}))
    with HubServer() as server:
        server.add(ServedRepo.from_folder(REPO, folder))
        yield server, folder


def test_info_of_a_remote_repo_reads_headers_only(served, tmp_path):
    server, folder = served
    hf_home = tmp_path / "hf"
    proc = run_cli("info", REPO, "--json", env=cli_env(server.url, hf_home))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no pull announced, no progress
    remote = json.loads(proc.stdout)
    local = CliRunner().invoke(app, ["info", str(folder), "--json"])
    assert local.exit_code == 0, local.output
    local = json.loads(local.stdout)
    for key in SAME:
        assert remote[key] == local[key], key
    assert remote["model"] == REPO and remote["downloaded"] is False and local["downloaded"] is True
    assert remote["sampling"]["temperature"] == {"value": 0.3, "source": "generation_config.json"}

    weights = folder / "model.safetensors"
    assert weights.stat().st_size > 1_000_000
    gets = [r for r in server.requests_for(REPO, "GET") if r.file == "model.safetensors"]
    assert gets and all(r.range is not None for r in gets), gets  # never the whole file
    assert server.sent.get("model.safetensors", 0) <= 100_001 * len(gets)
    assert not list(hf_home.rglob("models--*"))  # nothing in the Hub cache: `run` will pull it whole


def test_info_text_says_it_was_not_downloaded(served, tmp_path):
    server, _ = served
    proc = run_cli("info", REPO, env=cli_env(server.url, tmp_path / "hf"))
    assert proc.returncode == 0, proc.stderr
    assert f"downloaded: no: config and safetensors headers read from {server.url}" in proc.stdout
    assert f"`edge-llm pull {REPO}` gets it" in proc.stdout
    assert "generation_config.json" in proc.stdout  # the sampling row names the repo's own file
