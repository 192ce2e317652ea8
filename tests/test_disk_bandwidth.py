"""Disk read bandwidth: the probe reads the disk, not the page cache (page residency checked with util-linux's
``fincore``), leaves no file behind, and its figures are remembered per filesystem in the store the memory
bandwidth uses, without either figure losing the other."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from edge_llm.machine import bandwidth
from edge_llm.machine.disk import (
    device_key,
    disk_bandwidth,
    evict,
    measure_disk_bandwidth,
    probe_file,
    remembered_disk_bandwidth,
)

MIB = 1 << 20
SMALL = 16 * MIB  # a probe quick enough for a test, large enough to time


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("EDGE_LLM_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def resident_bytes(path: Path) -> int:
    """Bytes of ``path`` in the page cache, as util-linux's fincore reports them."""
    if shutil.which("fincore") is None:
        pytest.skip("util-linux fincore is not installed")
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)], capture_output=True,
                         text=True, check=True)
    return int(out.stdout.strip())


def written(path: Path, nbytes: int) -> Path:
    path.write_bytes(os.urandom(nbytes))
    os.sync()  # clean pages: only those can be dropped without root
    return path


def test_evict_empties_the_page_cache_of_the_range(tmp_path):
    f = written(tmp_path / "shard.bin", SMALL)
    f.read_bytes()
    assert resident_bytes(f) == SMALL
    with open(f, "rb") as fh:
        assert evict(fh.fileno(), 0, SMALL)
    assert resident_bytes(f) == 0


def test_probe_of_a_model_file_starts_cold_and_reads_it_in_place(tmp_path):
    f = written(tmp_path / "model-00001-of-00002.safetensors", 2 * SMALL)
    written(tmp_path / "config.json", 100)
    f.read_bytes()  # as after a previous run: all cached
    before = sorted(os.listdir(tmp_path))
    with probe_file(tmp_path, SMALL) as (fd, length, cold):
        assert (length, cold) == (SMALL, True)
        assert os.path.samefile(f"/proc/self/fd/{fd}", f)  # the largest file, not a new one
        assert resident_bytes(f) == SMALL  # only the probed range was dropped ...
        os.pread(fd, 1, 0)
        assert resident_bytes(f) < SMALL * 2  # ... and the first read brings in a page, not the file
    assert sorted(os.listdir(tmp_path)) == before


def test_a_folder_too_small_gets_a_temporary_file_that_is_removed(tmp_path):
    written(tmp_path / "tiny.bin", 4096)
    with probe_file(tmp_path, SMALL) as (fd, length, cold):
        assert (os.fstat(fd).st_size, length, cold) == (SMALL, SMALL, True)
        assert len(os.listdir(tmp_path)) == 2
    assert os.listdir(tmp_path) == ["tiny.bin"]
    with pytest.raises(RuntimeError), probe_file(tmp_path, SMALL):
        raise RuntimeError("interrupted mid-measure")
    assert os.listdir(tmp_path) == ["tiny.bin"]


def test_measure_reads_the_disk_of_the_path(tmp_path):
    found = measure_disk_bandwidth(tmp_path, SMALL, block=MIB, threads=4)
    stat = subprocess.run(["stat", "-c", "%Hd:%Ld", str(tmp_path)], capture_output=True, text=True, check=True)
    assert found.device == f"disk:{stat.stdout.strip()}"
    assert found.cold and found.sequential > 0 and found.random > 0
    # a cold read at 50 GB/s would be the page cache, not a disk (the fastest NVMe read ~14 GB/s)
    assert found.sequential < 50e9 and found.random < 50e9


def test_figures_are_remembered_beside_the_memory_bandwidth(tmp_path, home):
    home.mkdir()
    (home / "bandwidth.json").write_text(json.dumps({"cpu:x86_64": 1.5e10}))
    assert remembered_disk_bandwidth(tmp_path) is None
    first = disk_bandwidth(tmp_path, nbytes=SMALL)
    stored = json.loads((home / "bandwidth.json").read_text())
    key = device_key(tmp_path)
    assert stored == {"cpu:x86_64": 1.5e10, f"{key}:sequential": first.sequential, f"{key}:random": first.random}
    stamp = (home / "bandwidth.json").stat().st_mtime_ns
    again = disk_bandwidth(tmp_path, nbytes=SMALL)
    assert (again.sequential, again.random) == (first.sequential, first.random)
    assert (home / "bandwidth.json").stat().st_mtime_ns == stamp  # remembered, not measured again
    # the memory bandwidth's own writer keeps the disk figures, and its reader ignores them
    bandwidth.remember_figures({"cpu:x86_64": 2.5e10})
    assert remembered_disk_bandwidth(tmp_path) == again
    assert bandwidth.stored_figures()["cpu:x86_64"] == 2.5e10


def test_a_damaged_store_means_not_measured(tmp_path, home):
    home.mkdir()
    key = device_key(tmp_path)
    (home / "bandwidth.json").write_text(json.dumps({f"{key}:sequential": "fast", f"{key}:random": -1}))
    assert remembered_disk_bandwidth(tmp_path) is None
    (home / "bandwidth.json").write_text(json.dumps({f"{key}:sequential": 2e9}))  # half a pair
    assert remembered_disk_bandwidth(tmp_path) is None


def test_nothing_to_probe_is_an_oserror(tmp_path):
    with pytest.raises(OSError):
        measure_disk_bandwidth(tmp_path / "missing", SMALL)
