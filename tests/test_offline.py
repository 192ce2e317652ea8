"""With no network, `run`, `info`, `estimate` and `pull` of a Hub repo id stop after one attempt, with one line.

huggingface_hub's ``hf_hub_download`` retries a Hub it cannot reach five times with back-off (1+2+4+8+8 s,
each announced twice on stderr); edge-llm's first request is a single ``model_info`` bounded by
HF_HUB_ETAG_TIMEOUT, so the first refusal is the answer. Each command runs in its own process against an
endpoint nobody listens on, one that never answers, and a host name that cannot resolve. The messages say
what happened (unreachable, missing repo, gated, missing config), never one case dressed as another.
"""

from __future__ import annotations

import socket
import time

import pytest

from tests.hf_oracle import build_tiny_checkpoint
from tests.hub_server import HubServer, ServedRepo, cli_env, closed_port_url, run_cli
from tests.tiny_configs import TINY_CONFIGS

REPO = "org/tiny"
COMMANDS = {
    "run": ["run", REPO, "--prompt", "hi"],
    "info": ["info", REPO],
    "estimate": ["estimate", REPO],
    "pull": ["pull", REPO],
}


def one_line(proc) -> str:
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def timed(*args: str, env: dict[str, str]):
    started = time.monotonic()
    proc = run_cli(*args, env=env, timeout=60)
    return proc, time.monotonic() - started


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_unreachable_hub_fails_at_once(command, tmp_path):
    """Connection refused: one line, exit 1, in about the time Python takes to start (it took 24 s)."""
    endpoint = closed_port_url()
    proc, seconds = timed(*COMMANDS[command], env=cli_env(endpoint, tmp_path / "hf"))
    line = one_line(proc)
    assert f"cannot reach the Hub at {endpoint}" in line and "HF_HUB_OFFLINE=1" in line
    assert "config.json" not in line  # not "the repo has no config.json"
    assert seconds < 5, f"{command} took {seconds:.1f} s: retried?"
    assert not (tmp_path / "hf" / "hub").exists() or not list((tmp_path / "hf" / "hub").rglob("*.safetensors"))


def test_unresolvable_host_fails_at_once(tmp_path):
    """DNS failure (``.invalid`` never resolves, RFC 6761)."""
    proc, seconds = timed("estimate", REPO, env=cli_env("http://hub.invalid", tmp_path / "hf"))
    assert "cannot reach the Hub at http://hub.invalid" in one_line(proc)
    assert seconds < 5


def test_silent_hub_is_bounded_by_the_etag_timeout(tmp_path):
    """A Hub that accepts connections and never answers: one wait of HF_HUB_ETAG_TIMEOUT, not six."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        env = cli_env(endpoint, tmp_path / "hf", HF_HUB_ETAG_TIMEOUT="1")
        proc, seconds = timed("info", REPO, env=env)
    assert "cannot reach the Hub" in one_line(proc) and "timed out" in proc.stderr
    assert seconds < 6


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("offline-hub")
    folder = build_tiny_checkpoint(root / "tiny", **TINY_CONFIGS["llama"])
    no_config = root / "no-config"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with HubServer() as server:
        server.add(ServedRepo.from_folder(REPO, folder))
        server.add(ServedRepo.from_folder("org/gated", folder, gated=True))
        server.add(ServedRepo.from_folder("org/weights-only", no_config))
        yield server


@pytest.mark.parametrize("repo, expected", [
    ("org/missing", "org/missing: no such model repo on"),
    ("org/gated", "org/gated is gated: request access at"),
    ("org/weights-only", "org/weights-only: no config.json, so not a transformers/MLX checkpoint"),
])
@pytest.mark.parametrize("command", ["estimate", "info"])
def test_each_failure_says_what_happened(hub, tmp_path, command, repo, expected):
    """The same words as `pull` (one mapping of huggingface_hub's errors), and nothing cached."""
    proc = run_cli(command, repo, env=cli_env(hub.url, tmp_path / "hf"))
    assert expected in one_line(proc)
    assert not list((tmp_path / "hf").rglob("models--*"))


def test_offline_and_not_cached_asks_nobody(hub, tmp_path):
    before = len(hub.log)
    env = cli_env(hub.url, tmp_path / "hf", HF_HUB_OFFLINE="1")
    for command in ("estimate", "info"):
        assert "HF_HUB_OFFLINE=1 forbids" in one_line(run_cli(command, REPO, env=env))
    assert len(hub.log) == before
