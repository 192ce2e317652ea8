"""`edge-llm pull` and Hub repo ids in `run`/`info`, through huggingface_hub's real client and a loopback Hub.

Each command runs in its own process (huggingface_hub reads HF_ENDPOINT / HF_HOME / HF_HUB_OFFLINE at
import) against ``tests.hub_server``, whose request log shows what the client asked for.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import time
from pathlib import Path

import pexpect
import pytest
from rich.filesize import decimal
from typer.testing import CliRunner

from cli.main import app
from edge_llm.models import supported_model_types
from tests.hf_oracle import build_tiny_checkpoint
from tests.hub_server import HubServer, ServedRepo, cli_command, cli_env, closed_port_url, run_cli
from tests.tiny_configs import TINY_CONFIGS

REPO = "tiny-org/tiny-llama"
WIDE = "tiny-org/wide-llama"
MB = 1024 * 1024
NEEDED = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"}
NEVER = {"pytorch_model.bin": b"\x80\x04pickle" * 64, "original/consolidated.pth": b"\x80\x04" * 64,
         "README.md": b"# tiny llama\n", "onnx/model.onnx": b"onnx" * 64}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llama", **TINY_CONFIGS["llama"],
                                 with_tokenizer=True)


@pytest.fixture(scope="module")
def wide_folder(tmp_path_factory) -> Path:
    """A ~21 MB checkpoint: huggingface_hub reports progress per 10 MB, so a transfer shows progress mid-way."""
    config = {**TINY_CONFIGS["llama"], "hidden_size": 512, "intermediate_size": 1024}
    return build_tiny_checkpoint(tmp_path_factory.mktemp("wide") / "llama", **config, with_tokenizer=True)


@pytest.fixture(scope="module")
def hub(tiny_folder, wide_folder, tmp_path_factory):
    whisper = tmp_path_factory.mktemp("whisper")
    for p in tiny_folder.iterdir():
        (whisper / p.name).write_bytes(p.read_bytes())
    config = json.loads((tiny_folder / "config.json").read_text())
    (whisper / "config.json").write_text(json.dumps({**config, "model_type": "whisper"}))
    pickles = tmp_path_factory.mktemp("pickles")
    (pickles / "config.json").write_bytes((tiny_folder / "config.json").read_bytes())
    with HubServer() as server:
        server.add(ServedRepo.from_folder(REPO, tiny_folder, extra=NEVER))
        server.add(ServedRepo.from_folder(WIDE, wide_folder))
        server.add(ServedRepo.from_folder("tiny-org/whisper-tiny", whisper))
        server.add(ServedRepo.from_folder("tiny-org/gated-llama", tiny_folder, gated=True,
                                          allowed_tokens={"hf_granted"}))
        # Announces an exabyte-sized weight file: the free-space check must stop the pull first.
        server.add(ServedRepo.from_folder("tiny-org/huge-llama", tiny_folder, sizes={"model.safetensors": 10**18}))
        server.add(ServedRepo.from_folder("tiny-org/pickles-only", pickles,
                                          extra={"pytorch_model.bin": NEVER["pytorch_model.bin"]}))
        yield server


def snapshot_of(hf_home: Path, repo_id: str, commit: str) -> Path:
    return hf_home / "hub" / f"models--{repo_id.replace('/', '--')}" / "snapshots" / commit


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_pull_then_offline_run(hub, tiny_folder, tmp_path):
    hf_home = tmp_path / "hf"
    pulled = run_cli("pull", REPO, env=cli_env(hub.url, hf_home))
    assert pulled.returncode == 0, pulled.stderr
    commit = hub.repos[REPO].commit
    snapshot = snapshot_of(hf_home, REPO, commit)
    assert pulled.stdout.strip() == str(snapshot)
    # The standard cache layout (HF_HOME/hub), holding exactly what we need, byte for byte.
    assert {p.name for p in snapshot.iterdir()} == NEEDED
    for name in NEEDED:
        assert (snapshot / name).read_bytes() == (tiny_folder / name).read_bytes()
    assert (snapshot.parent.parent / "refs" / "main").read_text() == commit
    assert hub.files_fetched(REPO) == NEEDED  # never a pickle, README or sub-folder file
    for name in NEEDED:
        assert re.search(rf"^  {re.escape(name)}  .+/s$", pulled.stderr, re.M), pulled.stderr

    # Offline, with the Hub gone: run and info resolve the repo id from the cache alone.
    before = len(hub.log)
    offline = cli_env(closed_port_url(), hf_home, HF_HUB_OFFLINE="1")
    args = ["--prompt", "The capital of France", "--max-tokens", "8", "--temp", "0", "--json"]
    answer = run_cli("run", REPO, *args, env=offline)
    assert answer.returncode == 0, answer.stderr
    local = CliRunner().invoke(app, ["run", str(tiny_folder), *args])
    assert local.exit_code == 0, local.output
    ours, reference = json.loads(answer.stdout), json.loads(local.stdout)
    assert ours["generation_tokens"] == 8 and ours["tokens"] == reference["tokens"]
    info = run_cli("info", REPO, "--json", env=offline)
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["model"] == str(snapshot) and json.loads(info.stdout)["model_type"] == "llama"
    cached = run_cli("pull", REPO, env=offline)
    assert cached.returncode == 0 and cached.stdout.strip() == str(snapshot), cached.stderr
    assert "already in the cache (offline" in cached.stderr
    assert len(hub.log) == before


def test_unsupported_architecture_is_refused_before_any_weight(hub, tmp_path):
    assert "whisper" not in supported_model_types()
    line = one_error_line(run_cli("pull", "tiny-org/whisper-tiny", env=cli_env(hub.url, tmp_path / "hf")))
    assert "model_type 'whisper' is not supported" in line
    assert hub.files_fetched("tiny-org/whisper-tiny") == {"config.json"}
    assert not [r for r in hub.requests_for("tiny-org/whisper-tiny") if r.file and r.file != "config.json"]


@pytest.mark.parametrize("case", ["gated", "gated-denied", "missing-repo", "missing-revision", "unreachable",
                                  "disk-full", "pickles-only", "offline-not-cached", "not-a-repo-id"])
def test_failures_are_one_line(hub, tmp_path, case):
    env = cli_env(hub.url, tmp_path / "hf")
    args, expected = {
        "gated": (["pull", "tiny-org/gated-llama"],
                  f"gated-llama is gated: request access at {hub.url}/tiny-org/gated-llama, then set HF_TOKEN"),
        "gated-denied": (["pull", "tiny-org/gated-llama"], "your token's account has no access yet"),
        "missing-repo": (["pull", "tiny-org/no-such-model"], "tiny-org/no-such-model: no such model repo on"),
        "missing-revision": (["pull", REPO, "--revision", "v9"], "revision 'v9' not found"),
        "unreachable": (["pull", REPO], "cannot reach the Hub at http://127.0.0.1:"),
        "disk-full": (["pull", "tiny-org/huge-llama"], "not enough disk space for tiny-org/huge-llama: it needs 1000"),
        "pickles-only": (["pull", "tiny-org/pickles-only"], "no *.safetensors weights (only pytorch_model.bin"),
        "offline-not-cached": (["run", REPO, "--prompt", "hi"], "HF_HUB_OFFLINE=1 forbids downloading"),
        "not-a-repo-id": (["info", "no-such-folder"], "no-such-folder: no such model folder"),
    }[case]
    if case == "gated-denied":
        env["HF_TOKEN"] = "hf_someone_else"
    if case == "unreachable":
        env["HF_ENDPOINT"] = closed_port_url()
    if case == "offline-not-cached":
        env["HF_HUB_OFFLINE"] = "1"
    line = one_error_line(run_cli(*args, env=env))
    assert expected in line
    if case == "disk-full":
        assert hub.files_fetched("tiny-org/huge-llama") == {"config.json"}


def test_token_from_env_or_login(hub, tmp_path):
    """HF_TOKEN, or the token a prior `hf auth login` saved in HF_HOME, opens a gated repo."""
    with_env = run_cli("pull", "tiny-org/gated-llama", env=cli_env(hub.url, tmp_path / "a", HF_TOKEN="hf_granted"))
    assert with_env.returncode == 0, with_env.stderr
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "token").write_text("hf_granted")
    with_login = run_cli("pull", "tiny-org/gated-llama", env=cli_env(hub.url, tmp_path / "b"))
    assert with_login.returncode == 0, with_login.stderr
    resolves = [r for r in hub.requests_for("tiny-org/gated-llama", "GET") if "/resolve/" in r.path]
    assert resolves and all(r.authorization == "Bearer hf_granted" for r in resolves)
    # The signed CDN URL gets no token: it must not leave the Hub.
    cdn = [r for r in hub.requests_for("tiny-org/gated-llama", "GET") if r.path.startswith("/cdn/")]
    assert cdn and all(r.authorization is None for r in cdn)


@pytest.mark.slow  # ~20 s: two throttled transfers interrupted, then three pulls of a 20 MB checkpoint
def test_interrupted_pull_then_repeat_ends_verified(hub, wide_folder, tmp_path):
    hf_home = tmp_path / "hf"
    env = cli_env(hub.url, hf_home)
    weights = hub.repos[WIDE].files["model.safetensors"]
    assert weights.size > 15 * MB
    repo_dir = hf_home / "hub" / "models--tiny-org--wide-llama"
    blobs, snapshot = repo_dir / "blobs", snapshot_of(hf_home, WIDE, hub.repos[WIDE].commit)
    hub.throttle["model.safetensors"] = 4 * MB
    try:
        # 1. SIGKILL mid-transfer: only a partial file named .incomplete remains; no blob, no snapshot entry.
        hub.sent.pop("model.safetensors", None)
        proc = subprocess.Popen(cli_command("pull", WIDE), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        wait_for(lambda: hub.sent.get("model.safetensors", 0) >= 12 * MB, proc)
        proc.kill()
        proc.wait(timeout=30)
        partials = list(blobs.glob("*.incomplete"))
        assert len(partials) == 1 and partials[0].name.startswith(weights.sha256)
        assert partials[0].stat().st_size < weights.size
        assert not (blobs / weights.sha256).exists() and not (snapshot / "model.safetensors").exists()
        assert not (repo_dir / "refs" / "main").exists()  # the ref is written once the snapshot is whole

        # 2. Ctrl-C in a terminal, with the progress display up: exit 130, and nothing partial is left.
        hub.sent.pop("model.safetensors", None)
        command = cli_command("pull", WIDE)
        child = pexpect.spawn(command[0], command[1:], env={**env, "TERM": "xterm"}, encoding="utf-8", timeout=30,
                              dimensions=(30, 160))
        size = decimal(weights.size).split()[0]  # rich's own figure for the file, e.g. "21.5"
        shown = re.compile(rf"model\.safetensors +[━╸ ]*\d+\.\d/{re.escape(size)} MB +[\d.]+ MB/s +\d+:\d\d")
        screen = ""
        deadline = time.monotonic() + 30
        while not shown.search(screen):  # the file's bytes, speed and time left
            assert time.monotonic() < deadline and child.isalive(), screen[-2000:]
            child.expect([pexpect.TIMEOUT, pexpect.EOF], timeout=0.2)
            screen += child.before
        assert re.search(r"total +[━╸ ]*[\d.]+/[\d.]+ MB +[\d.]+ MB/s +\d+:\d\d", screen), screen[-2000:]
        child.sendintr()
        child.expect(pexpect.EOF)
        screen += child.before
        child.close()
        assert child.exitstatus == 130 and "interrupted" in screen
        assert not list(blobs.glob("*.incomplete"))  # this run's partial deleted, the killed run's stale one too
        assert not (blobs / weights.sha256).exists()
    finally:
        hub.throttle.clear()

    # 3. Pull again with --verify: complete, every file re-hashed against the Hub's sha256 / git ids.
    again = run_cli("pull", WIDE, "--verify", env=env)
    assert again.returncode == 0, again.stderr
    assert f"{len(NEEDED)} files" in again.stderr and f"{len(NEEDED)} verified" in again.stderr
    assert hashlib.sha256((blobs / weights.sha256).read_bytes()).hexdigest() == weights.sha256
    assert (snapshot / "model.safetensors").read_bytes() == (wide_folder / "model.safetensors").read_bytes()

    # 4. A cached file damaged later (same size, flipped bytes) is caught by --verify and fetched again.
    damaged = bytearray((blobs / weights.sha256).read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    (blobs / weights.sha256).write_bytes(bytes(damaged))
    repaired = run_cli("pull", WIDE, "--verify", env=env)
    assert repaired.returncode == 0, repaired.stderr
    assert "model.safetensors: checksum differs" in repaired.stderr and "1 re-downloaded" in repaired.stderr
    assert hashlib.sha256((blobs / weights.sha256).read_bytes()).hexdigest() == weights.sha256


def wait_for(condition, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, "the pull ended before it could be interrupted"
        assert time.monotonic() < deadline, "the transfer never started"
        time.sleep(0.05)
