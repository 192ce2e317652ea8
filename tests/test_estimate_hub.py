"""``edge-llm estimate owner/name`` reads config.json and the safetensors headers from the Hub, never weights.

huggingface_hub's real client talks to the loopback Hub (tests/hub_server.py) in a fresh process. The
served repo is a sharded checkpoint several MB large, so a header-only read is distinguishable from a
download by the bytes the server sent. ``edge-llm run`` of a remote model too big for this machine is
refused from its headers, before anything is pulled.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cli.main import app
from edge_llm.machine.backend import detect
from quant.quantize import quantize
from tests.hf_oracle import build_tiny_checkpoint
from tests.hub_server import HubServer, ServedRepo, cli_env, run_cli
from tests.test_estimate_run import safetensors_header, too_big_config
from tests.tiny_configs import TINY_CONFIGS


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hubrepos")
    config = dict(TINY_CONFIGS["mixtral"], hidden_size=256, intermediate_size=512, vocab_size=4096)
    src = build_tiny_checkpoint(root / "src", with_tokenizer=True, **config)
    sharded = root / "moe"
    quantize(src, sharded, bits=16, max_shard_bytes=3_000_000)  # ~9 MB of float16 in 4 shards
    huge_config, shapes = too_big_config(detect().memory_bytes)
    header, size = safetensors_header(shapes)
    huge = {"config.json": json.dumps(huge_config).encode(), "model.safetensors": header}
    with HubServer() as server:
        server.add(ServedRepo.from_folder("org/moe", sharded))
        server.add(ServedRepo.from_folder("org/gated", sharded, gated=True))
        # only the header is served; the size announced is the real one
        empty = root / "empty"
        empty.mkdir()
        server.add(ServedRepo.from_folder("org/huge", empty, extra=huge, sizes={"model.safetensors": size}))
        yield server, sharded


def weight_bytes_sent(server: HubServer, repo: str) -> int:
    return sum(n for path, n in server.sent.items() if path.endswith(".safetensors")
               and any(r.file == path for r in server.requests_for(repo)))


def test_remote_estimate_equals_local_and_reads_headers_only(hub, tmp_path):
    server, folder = hub
    proc = run_cli("estimate", "org/moe", "--bits", "4", "--json", env=cli_env(server.url, tmp_path / "hf"))
    assert proc.returncode == 0, proc.stderr
    remote = json.loads(proc.stdout)
    local = json.loads(CliRunner().invoke(app, ["estimate", str(folder), "--bits", "4", "--json"]).stdout)
    for key in ("params_total", "params_active", "file_bytes", "weights_bytes", "kv_cache_bytes", "bits"):
        assert remote[key] == local[key], key
    assert [r["file_bytes"] for r in remote["rows"]] == [r["file_bytes"] for r in local["rows"]]
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) >= 3
    total = sum((folder / s).stat().st_size for s in shards)
    assert weight_bytes_sent(server, "org/moe") <= len(shards) * 100_001 < total / 2  # the first 100 KB each
    for r in server.requests_for("org/moe", "GET"):
        if r.file and r.file.endswith(".safetensors"):
            assert r.range is not None, r  # never a whole shard
    # nothing landed in the Hub cache: a later `run` must not mistake a partial snapshot for a model
    assert not list((tmp_path / "hf").rglob("*.safetensors"))


def test_remote_errors_are_one_line(hub, tmp_path):
    server, _ = hub
    env = cli_env(server.url, tmp_path / "hf")
    for repo, message in (("org/gated", "gated"), ("org/missing", "no such model repo")):
        proc = run_cli("estimate", repo, env=env)
        assert proc.returncode == 1 and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0


def test_run_refuses_a_remote_model_before_pulling_it(hub, tmp_path):
    server, _ = hub
    proc = run_cli("run", "org/huge", "--prompt", "hi", env=cli_env(server.url, tmp_path / "hf"))
    assert proc.returncode == 1, proc.stderr
    assert "short" in proc.stderr and "edge-llm quantize org/huge" in proc.stderr
    assert weight_bytes_sent(server, "org/huge") <= 100_001  # its header, nothing more
    assert not list((tmp_path / "hf").rglob("*.safetensors"))
