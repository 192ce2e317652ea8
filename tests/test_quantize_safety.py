"""Nothing half-written: an existing OUT, Ctrl-C / SIGTERM / SIGHUP, a killed run, a full or unwritable disk,
a bad input shard.

Each failure must leave the destination's parent exactly as it was (no OUT, no hidden partial folder)
and say what happened in one line. The disk is really full (a small tmpfs, when this process may mount
one) or the kernel really refuses the write (RLIMIT_FSIZE in a child process).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from cli.signals import Stopped, stop_signals_interrupt
from edge_llm.errors import CheckpointError
from quant.quantize import QuantizeError, quantize
from quant.writer import AtomicFolder, signals_deferred
from tests.hf_oracle import build_tiny_checkpoint
from tests.tiny_configs import TINY_CONFIGS

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("src") / "llama", with_tokenizer=True,
                                 **TINY_CONFIGS["llama"])


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_existing_out_is_refused_and_force_replaces_only_when_done(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    result = CliRunner().invoke(app, ["quantize", str(src), "-o", str(out)])
    assert result.exit_code == 1 and "already exists" in result.stderr and "--force" in result.stderr
    assert listing(out) == ["mine.txt"]

    class Boom(Exception):
        pass

    class FailHalfway:
        def start(self, tensors, nbytes):
            pass

        def advance(self, name, nbytes):
            raise Boom

    with pytest.raises(Boom):
        quantize(src, out, force=True, progress=FailHalfway())
    assert listing(out) == ["mine.txt"] and listing(tmp_path) == ["out"]  # the old OUT survives a failure
    quantize(src, out, force=True)
    assert "model.safetensors" in listing(out) and listing(tmp_path) == ["out"]


def test_out_must_not_be_the_source_or_inside_it(src, tmp_path):
    for out in (src, src / "q4"):
        with pytest.raises(QuantizeError, match="must not be the source"):
            quantize(src, out, force=True)
    assert not (src / "q4").exists()


def test_interrupt_in_process_leaves_nothing(src, tmp_path):
    class CtrlC:
        def start(self, tensors, nbytes):
            pass

        def advance(self, name, nbytes):
            if name.startswith("model.layers.1"):
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize(src, tmp_path / "deep" / "out", progress=CtrlC())
    assert listing(tmp_path) == []  # not even the parent folder it had created


def _start(folder: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cli.main", "quantize", str(folder), "-o", str(out)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _writing(proc: subprocess.Popen, out: Path) -> Path:
    """The hidden folder ``proc`` builds OUT in, once it holds some tensors."""
    deadline = time.time() + 120
    while True:
        partial = [p for p in out.parent.glob(f".{out.name}.partial-*") if (p / "model.safetensors").exists()]
        if partial:
            time.sleep(0.5)  # some tensors in
            return partial[0]
        assert proc.poll() is None and time.time() < deadline, "the conversion never started writing"
        time.sleep(0.05)


@pytest.mark.parametrize("signum, code, said", [(signal.SIGINT, 130, "interrupted"),
                                                (signal.SIGTERM, 143, "stopped by SIGTERM"),
                                                (signal.SIGHUP, 129, "stopped by SIGHUP")])
def test_a_stop_signal_during_a_real_run_leaves_nothing(smollm2_folder, tmp_path, signum, code, said):
    """Ctrl-C, kill (SIGTERM) and a closed terminal (SIGHUP) all clean up and exit 128 + the signal."""
    out = tmp_path / "q4"
    proc = _start(smollm2_folder, out)
    _writing(proc, out)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert f"{said}: nothing was written to {out}" in stderr and "Traceback" not in stderr
    assert listing(tmp_path) == []


def test_the_next_run_removes_what_a_killed_run_left(smollm2_folder, src, tmp_path):
    """SIGKILL cannot be caught: its partial folder stays until a later conversion into the same folder sees
    that its owner is dead. A live run's partial folder, and hidden folders that are not ours, are kept."""
    proc = _start(smollm2_folder, tmp_path / "q4")
    partial = _writing(proc, tmp_path / "q4")
    proc.kill()
    proc.wait(timeout=60)
    assert partial.is_dir()
    (tmp_path / ".notes.partial-mine").mkdir()  # a user's folder that happens to look like ours
    with AtomicFolder(tmp_path / "busy") as busy:  # another conversion, still running
        quantize(src, tmp_path / "q8", bits=8)
        assert busy.is_dir()
    assert listing(tmp_path) == [".notes.partial-mine", "busy", "q8"]


def test_a_stop_signal_waits_while_the_output_is_swapped_in():
    """The rename pair that swaps OUT in (and cleaning up) is never cut in half: the signal comes after it."""
    steps = []
    with stop_signals_interrupt(), pytest.raises(Stopped) as stopped:
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler would have run by now
            steps.append("swapped")
        steps.append("after")
    assert steps == ["swapped"] and stopped.value.signum == signal.SIGTERM


def _can_mount_tmpfs(path: Path) -> bool:
    path.mkdir(exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)], capture_output=True)
    if ok.returncode == 0:
        subprocess.run(["umount", str(path)], check=True)
    return ok.returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A real 512 KB filesystem (tmpfs), unmounted afterwards; skipped where mounting is not permitted."""
    disk = tmp_path / "disk"
    if shutil.which("mount") is None or not _can_mount_tmpfs(disk):
        pytest.skip("cannot mount a tmpfs here (needs root); RLIMIT_FSIZE test covers the write path")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(disk)], check=True)
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_disk_too_small_is_refused_up_front(src, small_disk):
    (small_disk / "filler").write_bytes(b"\0" * (400 * 1024))  # the 8-bit output (~150 KB) no longer fits
    result = CliRunner().invoke(app, ["quantize", str(src), "-o", str(small_disk / "q8"), "--bits", "8"])
    assert result.exit_code == 1 and "free on that disk" in result.stderr, result.output
    assert listing(small_disk) == ["filler"]


def test_disk_full_while_writing_leaves_nothing(src, small_disk):
    class FillTheDisk:  # another program takes the space after the free-space check
        def start(self, tensors, nbytes):
            free = shutil.disk_usage(small_disk).free
            (small_disk / "filler").write_bytes(b"\0" * (free - 16 * 1024))

        def advance(self, name, nbytes):
            pass

    with pytest.raises(QuantizeError, match="no space left on device"):
        quantize(src, small_disk / "q8", bits=8, progress=FillTheDisk())
    assert listing(small_disk) == ["filler"]


def test_file_size_limit_in_a_child_process_leaves_nothing(src, tmp_path):
    """The kernel refuses writes past RLIMIT_FSIZE (EFBIG): the same path as a full disk, in the real CLI."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))

    out = tmp_path / "q"
    proc = subprocess.run([sys.executable, "-m", "cli.main", "quantize", str(src), "-o", str(out), "--bits", "8"],
                          cwd=REPO, capture_output=True, text=True, preexec_fn=limit, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "file too large while writing; nothing was written" in proc.stderr
    assert proc.stderr.count("\n") <= 2 and "Traceback" not in proc.stderr
    assert listing(tmp_path) == []


def test_truncated_shard_is_refused_before_writing(src, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    result = CliRunner().invoke(app, ["quantize", str(bad), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and "truncated" in result.stderr and "re-download" in result.stderr
    assert listing(tmp_path) == ["bad"]


def test_corrupt_data_in_a_later_shard_stops_cleanly(src, tmp_path):
    """Valid headers, garbage data (NaN) in layer 1: found mid-run, after layer 0 was written."""
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    path = bad / "model.safetensors"
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    start, end = header["model.layers.1.mlp.up_proj.weight"]["data_offsets"]
    data[8 + n + start : 8 + n + start + 64] = b"\xff" * 64  # 0xffffffff is a float32 NaN
    path.write_bytes(bytes(data))
    seen = []

    class Watch:
        def start(self, tensors, nbytes):
            pass

        def advance(self, name, nbytes):
            seen.append(name)

    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.weight.*NaN"):
        quantize(bad, tmp_path / "out", progress=Watch())
    assert any(name.startswith("model.layers.0.") for name in seen)  # it failed mid-run, not up front
    assert listing(tmp_path) == ["bad"]


def test_read_only_destination(src, tmp_path):
    ro = tmp_path / "ro"
    if shutil.which("mount") is None or not _can_mount_tmpfs(ro):
        pytest.skip("cannot mount a read-only filesystem here (needs root)")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], check=True)
    try:
        result = CliRunner().invoke(app, ["quantize", str(src), "-o", str(ro / "out")])
        assert result.exit_code == 1, result.output
        assert "cannot write there" in result.stderr and "Traceback" not in result.output
        assert listing(ro) == []
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_destination_under_a_file(src, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = CliRunner().invoke(app, ["quantize", str(src), "-o", str(blocker / "out")])
    assert result.exit_code == 1 and str(blocker) in result.stderr and "Traceback" not in result.output
    assert listing(tmp_path) == ["file"]
