"""safetensors headers from a stranger: each malformed header ends in one line naming the file, exit 1, no
traceback, and no header makes reading it cost more than the file itself (issue 13: the 86 MB header with
1.3M entries, integer dtypes, string offsets and shapes, headers nested 200,000 deep)."""

from __future__ import annotations

import json
import shutil
import time
import tracemalloc
from pathlib import Path

import pytest

from edge_llm.errors import CheckpointError
from edge_llm.formats.open import open_checkpoint
from tests.hostile_files import invoke, one_line_error, read_safetensors, safetensors_bytes, tiny_folder
from tests.hostile_files import refused as refused_by_all

FIRST = "lm_head.weight"  # the first tensor of the tiny checkpoint's header


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_folder(tmp_path_factory.mktemp("hostile-safetensors") / "tiny")


def rewritten(tiny: Path, dst: Path, edit) -> Path:
    """A copy of ``tiny`` whose model.safetensors has ``edit(header, data) -> bytes`` as its contents."""
    shutil.copytree(tiny, dst)
    header, data = read_safetensors(dst / "model.safetensors")
    (dst / "model.safetensors").write_bytes(edit(header, data))
    return dst


def entry(**changes):
    """An edit that changes fields of the first tensor's header entry."""
    def edit(header, data):
        header[FIRST].update(changes)
        return safetensors_bytes(header, data)
    return edit


def refused(folder: Path, *words: str) -> str:
    return refused_by_all(folder, "model.safetensors", *words)


@pytest.mark.parametrize("changes, word", [
    ({"dtype": 7}, "dtype"), ({"dtype": "C64"}, "C64"), ({"dtype": None}, "dtype"),
    ({"data_offsets": ["0", "4"]}, "data_offsets"), ({"data_offsets": [0]}, "data_offsets"),
    ({"data_offsets": [-4, 0]}, "data_offsets"), ({"data_offsets": [8, 4]}, "bytes of data"),
    ({"data_offsets": [0, 2**40]}, "truncated"), ({"data_offsets": [0, 2**70]}, "data_offsets"),
    ({"shape": "384,32"}, "shape"), ({"shape": [-1, 32]}, "shape"), ({"shape": [2**40, 0]}, "shape"),
    ({"shape": [384, 0]}, "bytes of data"), ({"shape": [10**12, 10**12]}, "shape"),
    ({"shape": [[384], 32]}, "shape"), ({"extra": 1}, "dtype, shape and data_offsets"),
])  # fmt: skip
def test_bad_entry(tiny, tmp_path, changes, word):
    refused(rewritten(tiny, tmp_path / "m", entry(**changes)), word)


def test_entry_not_an_object(tiny, tmp_path):
    refused(rewritten(tiny, tmp_path / "m", lambda h, d: safetensors_bytes(dict(h, **{FIRST: 5}), d)), "corrupt")


def test_nested_200000_deep(tiny, tmp_path):
    deep = '{"x": ' + "[" * 200_000 + "]" * 200_000 + "}"
    refused(rewritten(tiny, tmp_path / "m", lambda h, d: safetensors_bytes(deep, d)), "corrupt")


def test_header_not_an_object(tiny, tmp_path):
    refused(rewritten(tiny, tmp_path / "m", lambda h, d: safetensors_bytes("[1, 2]", d)), "corrupt")


def test_metadata_values_must_be_strings(tiny, tmp_path):
    edit = lambda h, d: safetensors_bytes(dict(h, __metadata__={"format": {"nested": [1]}}), d)  # noqa: E731
    refused(rewritten(tiny, tmp_path / "m", edit), "__metadata__")


def test_duplicate_tensor_names(tiny, tmp_path):
    def edit(header, data):
        duplicate = f'"{FIRST}": {json.dumps(header[FIRST])}, '
        return safetensors_bytes("{" + duplicate + json.dumps(header)[1:], data)
    refused(rewritten(tiny, tmp_path / "m", edit), "twice")


def test_overlapping_tensors(tiny, tmp_path):
    def edit(header, data):
        names = [n for n in header if n != "__metadata__"]
        a, b = header[names[0]], header[names[1]]
        if a["shape"] == b["shape"]:
            b["data_offsets"] = list(a["data_offsets"])
        else:  # the same bytes claimed twice, whatever the shapes
            b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + b["data_offsets"][1]
                                 - b["data_offsets"][0]]  # fmt: skip
        return safetensors_bytes(header, data)
    refused(rewritten(tiny, tmp_path / "m", edit), "share bytes")


@pytest.mark.parametrize("length", [0, 2**63, 2**64 - 1, 10**8 + 1])
def test_header_length_field(tiny, tmp_path, length):
    refused(rewritten(tiny, tmp_path / "m", lambda h, d: safetensors_bytes(h, d, length=length)), "corrupt")


def test_header_length_past_the_file(tiny, tmp_path):
    edit = lambda h, d: safetensors_bytes(h, d, length=len(json.dumps(h)) + len(d) + 1)  # noqa: E731
    refused(rewritten(tiny, tmp_path / "m", edit), "truncated")


def test_huge_header_with_a_million_entries_is_refused_cheaply(tiny, tmp_path):
    """Issue 13: an 86 MB header with 1.3M entries took `info` to 1.1 GB and `run` to 3.2 GB."""
    def edit(header, data):
        parts = [json.dumps(header)[:-1]]
        parts += [f', "t{i}": {{"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}' for i in range(1_300_000)]
        return safetensors_bytes("".join(parts) + "}", data)
    folder = rewritten(tiny, tmp_path / "m", edit)
    assert (folder / "model.safetensors").stat().st_size > 80e6
    tracemalloc.start()
    start = time.monotonic()
    with pytest.raises(CheckpointError, match="tensors"):
        open_checkpoint(folder)
    elapsed, (_, peak) = time.monotonic() - start, tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert elapsed < 2 and peak < 250e6, (elapsed, peak)
    refused(folder, "1,300,")


def test_sizes_add_up_to_the_file(tiny):
    """The header's sizes are what the loader allocates: never more than the data section holds."""
    checkpoint = open_checkpoint(tiny)
    data = (tiny / "model.safetensors").stat().st_size
    assert checkpoint.nbytes <= data
    assert invoke("run", tiny, "--prompt", "hi", "--max-tokens", "2").exit_code == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_weights_are_refused_at_load(tiny, tmp_path, bad):
    """Issue 13: NaN weights ran and printed garbage with exit 0. Now the load names the tensor."""
    import numpy as np

    def edit(header, data):
        begin, end = header["model.norm.weight"]["data_offsets"]
        values = np.frombuffer(data[begin:end], dtype=np.float32).copy()
        values[3] = bad
        return safetensors_bytes(header, data[:begin] + values.tobytes() + data[end:])

    folder = rewritten(tiny, tmp_path / "m", edit)
    assert invoke("info", folder).exit_code == 0  # headers alone are fine
    line = one_line_error("run", folder, "--prompt", "hi", "--max-tokens", "2")
    assert "model.safetensors" in line and "model.norm.weight" in line and "NaN" in line, line
