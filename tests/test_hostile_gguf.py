"""GGUF files from a stranger: their metadata and tensor directory are bounded by the file's size and
typed by what each key means, so every malformed file ends in one line naming the file, exit 1, no
traceback (issue 13: string length 2^40, arrays nested 50,000 deep, head_count = 0, block_count = true
or 1e9, tokens that are integers, bad merges, duplicate tensor names, a chat template that loops 10^10 times)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from edge_llm.errors import CheckpointError
from edge_llm.formats.gguf.reader import read_gguf
from tests.hostile_files import (
    ARRAY,
    BOOL,
    F32,
    F64,
    I32,
    READERS,
    STRING,
    U32,
    U64,
    Meta,
    Tensor,
    gguf_bytes,
    invoke,
    nested_arrays,
    one_line_error,
    replace_meta,
    tiny_gguf_parts,
)
from tests.hostile_files import refused as refused_by_all

COMMANDS = READERS


@pytest.fixture(scope="module")
def parts():
    return tiny_gguf_parts()


def written(path: Path, meta: list[Meta], tensors: list[Tensor], **kw) -> Path:
    path.write_bytes(gguf_bytes(meta, tensors, **kw))
    return path


def refused(path: Path, *words: str, commands=COMMANDS) -> str:
    return refused_by_all(path, path.name, *words, commands=commands)


def test_tiny_gguf_runs(parts, tmp_path):
    meta, tensors = parts
    path = written(tmp_path / "m.gguf", meta, tensors)
    assert invoke("run", path, "--prompt", "hi", "--max-tokens", "2").exit_code == 0


@pytest.mark.parametrize("key, kind, value, word", [
    ("llama.attention.head_count", U32, 0, "head_count"),
    ("llama.embedding_length", U32, 0, "embedding_length"),
    ("llama.block_count", BOOL, True, "block_count"),
    ("llama.block_count", U64, 10**9, "num_hidden_layers"),
    ("llama.block_count", STRING, "2", "block_count"),
    ("llama.attention.head_count", F32, 4.0, "head_count"),
    ("llama.rope.freq_base", STRING, "1e4", "freq_base"),
    ("llama.rope.freq_base", F32, 0.0, "rope_theta"),
    ("llama.context_length", BOOL, False, "context_length"),
    ("llama.rope.scaling.type", U32, 1, "rope.scaling.type"),
    ("llama.rope.scaling.type", STRING, "linear", "factor"),
    ("general.architecture", U32, 7, "architecture"),
])  # fmt: skip
def test_bad_model_metadata_is_named(parts, tmp_path, key, kind, value, word):
    meta, tensors = parts
    refused(written(tmp_path / "m.gguf", replace_meta(meta, key, kind, value), tensors), word)


def test_block_count_beyond_the_tensors_is_refused_fast(parts, tmp_path):
    meta, tensors = parts
    path = written(tmp_path / "m.gguf", replace_meta(meta, "llama.block_count", U32, 1000), tensors)
    start = time.monotonic()
    refused(path, "weights hold")
    assert time.monotonic() - start < 5


def test_string_length_2_to_the_40(parts, tmp_path):
    meta, tensors = parts
    path = written(tmp_path / "m.gguf", replace_meta(meta, "general.name", STRING, "tiny", declared=2**40), tensors)
    refused(path, "truncated")


def test_array_count_beyond_the_file(parts, tmp_path):
    meta, tensors = parts
    path = written(tmp_path / "m.gguf", replace_meta(meta, "general.tags", ARRAY, ["a"], STRING, declared=2**40),
                   tensors)  # fmt: skip
    refused(path, "corrupt")


def test_arrays_nested_50000_deep(parts, tmp_path):
    meta, tensors = parts
    refused(written(tmp_path / "m.gguf", [*meta, nested_arrays(50_000)], tensors), "nested")


def test_duplicate_tensor_names_without_a_numpy_dump(parts, tmp_path):
    meta, tensors = parts
    line = refused(written(tmp_path / "m.gguf", meta, [*tensors, tensors[0]]), "twice")
    assert "[" not in line.split("twice")[1] and len(line) < 300


def test_duplicate_metadata_keys(parts, tmp_path):
    meta, tensors = parts
    refused(written(tmp_path / "m.gguf", [*meta, meta[0]], tensors), "twice")


def test_overlapping_tensors(parts, tmp_path):
    meta, tensors = parts
    moved = [Tensor(t.name, t.dims, t.type_id, t.data, offset=0) for t in tensors]
    refused(written(tmp_path / "m.gguf", meta, moved), "share bytes")


def test_huge_tensor_and_key_counts(parts, tmp_path):
    meta, tensors = parts
    blob = bytearray(gguf_bytes(meta, tensors))
    for field in (8, 16):  # n_tensors, n_kv
        hostile = bytearray(blob)
        hostile[field : field + 8] = (2**62).to_bytes(8, "little")
        path = tmp_path / f"m{field}.gguf"
        path.write_bytes(bytes(hostile))
        with pytest.raises(CheckpointError, match="corrupt"):
            read_gguf(path)


def test_dimension_beyond_32_bits(parts, tmp_path):
    meta, tensors = parts
    t = tensors[0]
    path = written(tmp_path / "m.gguf", meta, [Tensor(t.name, [2**33, 0], t.type_id, b""), *tensors[1:]])
    refused(path, "dimensions")


@pytest.mark.parametrize("key, kind, value, item", [
    ("tokenizer.ggml.tokens", ARRAY, list(range(384)), I32),
    ("tokenizer.ggml.tokens", STRING, "abc", None),
    ("tokenizer.ggml.merges", ARRAY, ["Ġ t", "no_space", "x y"], STRING),
    ("tokenizer.ggml.merges", ARRAY, [1, 2], I32),
    ("tokenizer.ggml.token_type", ARRAY, ["a"] * 384, STRING),
    ("tokenizer.ggml.scores", ARRAY, ["a"], STRING),
    ("tokenizer.ggml.model", U32, 5, None),
    ("tokenizer.ggml.eos_token_id", STRING, "2", None),
    ("tokenizer.ggml.add_bos_token", STRING, "yes", None),
    ("tokenizer.chat_template", U32, 3, None),
])  # fmt: skip
def test_bad_tokenizer_metadata(parts, tmp_path, key, kind, value, item):
    meta, tensors = parts
    path = written(tmp_path / "m.gguf", replace_meta(meta, key, kind, value, item), tensors)
    refused(path, key, commands=(COMMANDS[0], COMMANDS[2]))


def test_bad_merges_pieces(parts, tmp_path):
    """Merges naming tokens the vocabulary lacks: tokenizers cannot build the model."""
    meta, tensors = parts
    path = written(tmp_path / "m.gguf", replace_meta(meta, "tokenizer.ggml.merges", ARRAY, ["qq zz"], STRING), tensors)
    refused(path, "merges", commands=(COMMANDS[0], COMMANDS[2]))


def test_chat_template_with_nested_loops_of_100000(parts, tmp_path):
    meta, tensors = parts
    loops = "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"
    path = written(tmp_path / "m.gguf", replace_meta(meta, "tokenizer.chat_template", STRING, loops), tensors)
    start = time.monotonic()
    line = one_line_error("run", path, "--prompt", "hi", "--max-tokens", "2", timeout=15)
    assert "chat template" in line and time.monotonic() - start < 10, line


def test_more_tokens_than_embedding_rows(parts, tmp_path):
    """Token ids past the embedding would be gathered out of bounds (MLX can crash): refused at load."""
    meta, tensors = parts
    tokens = next(m for m in meta if m.key == "tokenizer.ggml.tokens").value
    more = [*tokens, *(f"extra{i}" for i in range(100))]
    meta = replace_meta(meta, "tokenizer.ggml.tokens", ARRAY, more, STRING)
    meta = replace_meta(meta, "tokenizer.ggml.token_type", ARRAY, [1] * len(more), I32)
    line = one_line_error("run", written(tmp_path / "m.gguf", meta, tensors), "--prompt", "hi")
    assert "458" in line and "384 rows" in line, line


@pytest.mark.parametrize("value", [Meta("general.extra", F64, 1.5), Meta("general.extra", ARRAY, [0.0, 2.0], F64)])
def test_float64_metadata_does_not_crash_mlx(parts, tmp_path, value):
    """Found by the long fuzz run: MLX's own GGUF reader (mx.load) dies with SIGSEGV on a float64 metadata
    value, which the GGUF spec allows (type 12). Such a file is read by our numpy path instead."""
    meta, tensors = parts
    result = invoke("run", written(tmp_path / "m.gguf", [*meta, value], tensors), "--prompt", "hi", "--max-tokens", "2")
    assert result.exit_code == 0, result.output
