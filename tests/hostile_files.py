"""Tiny model files written byte by byte, so tests can break them on purpose.

No transformers or gguf-py here: the hostile tests and the fuzzer (tests/test_fuzz_files.py,
benchmarks/fuzz.py) need to write what no well-behaved writer would (a string length of 2^40, an
integer dtype, arrays nested 50,000 deep) and to do it thousands of times, fast.

- ``tiny_folder``: a Hugging Face style folder (config.json, model.safetensors, tokenizer files) of a
  tiny random llama, the weights taken from edge-llm's own module tree.
- ``safetensors_bytes`` / ``read_safetensors``: a safetensors file as (header object, data bytes).
- ``Meta`` + ``gguf_bytes``: a GGUF file from typed metadata and tensors, values written as given.
- ``tiny_gguf_parts``: the same tiny llama as a GGUF file (F32 tensors, byte-level BPE tokenizer metadata).
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tests.tiny_tokenizer import write_tiny_tokenizer

TINY_LLAMA = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 384, "hidden_size": 32,
    "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "hidden_act": "silu", "eos_token_id": 2, "torch_dtype": "float32",
}  # fmt: skip

_TOKENIZER_CACHE: dict[str, Path] = {}


def tiny_weights(config: dict[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights with the names and shapes edge-llm's module tree gives ``config``."""
    from mlx.utils import tree_flatten

    from edge_llm.formats.folder import FolderCheckpoint, normalize_config
    from edge_llm.loader import build_model

    model = build_model(FolderCheckpoint(Path("tiny"), normalize_config(config), {}))
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(v.shape) * 0.05).astype(np.float32) for k, v in tree_flatten(model.parameters())}


_ST_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int32): "I32"}


def safetensors_parts(weights: dict[str, np.ndarray]) -> tuple[dict[str, Any], bytes]:
    """The header object and data of a safetensors file holding ``weights`` (in name order)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    chunks, offset = [], 0
    for name in sorted(weights):
        raw = np.ascontiguousarray(weights[name]).tobytes()
        header[name] = {"dtype": _ST_DTYPES[weights[name].dtype], "shape": list(weights[name].shape),
                        "data_offsets": [offset, offset + len(raw)]}  # fmt: skip
        chunks.append(raw)
        offset += len(raw)
    return header, b"".join(chunks)


def safetensors_bytes(header: dict[str, Any] | bytes | str, data: bytes, length: int | None = None) -> bytes:
    """A safetensors file: 8-byte little-endian header length (``length`` overrides it), header, data."""
    raw = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def read_safetensors(path: Path) -> tuple[dict[str, Any], bytes]:
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def _tiny_tokenizer() -> Path:
    """The tiny trained BPE tokenizer's folder, trained once per process."""
    if "tiny" not in _TOKENIZER_CACHE:
        import tempfile

        _TOKENIZER_CACHE["tiny"] = write_tiny_tokenizer(Path(tempfile.mkdtemp(prefix="tiny-tokenizer-")))
    return _TOKENIZER_CACHE["tiny"]


def tokenizer_files(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for file in _tiny_tokenizer().iterdir():
        shutil.copy(file, folder / file.name)


def tiny_folder(folder: Path, config: dict[str, Any] | None = None, seed: int = 0) -> Path:
    """A runnable tiny checkpoint folder: config.json, model.safetensors and the tiny tokenizer."""
    config = dict(TINY_LLAMA if config is None else config)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    header, data = safetensors_parts(tiny_weights(config, seed))
    (folder / "model.safetensors").write_bytes(safetensors_bytes(header, data))
    tokenizer_files(folder)
    return folder


# -- GGUF -------------------------------------------------------------------------------------------

U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
_FORMATS = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f", BOOL: "?", U64: "Q", I64: "q",
            F64: "d"}  # fmt: skip


@dataclass
class Meta:
    """One metadata entry: ``value`` is written as ``kind`` says; for an ARRAY, ``item`` is the items'
    kind and ``value`` a list (items that are ``Meta`` are written as nested arrays). ``declared``
    replaces a string's or array's declared length (to lie about it)."""

    key: str
    kind: int
    value: Any
    item: int | None = None
    declared: int | None = None
    raw: bytes | None = None  # the value's bytes as they are (after the key and kind)


def nested_arrays(depth: int) -> Meta:
    """An array holding an array holding ... ``depth`` deep (written without recursion)."""
    body = struct.pack("<IQ", ARRAY, 1) * (depth - 1) + struct.pack("<IQ", U32, 0)
    return Meta("general.tags", ARRAY, None, raw=body)


def _string(s: str | bytes, declared: int | None = None) -> bytes:
    raw = s if isinstance(s, bytes) else s.encode("utf-8", errors="surrogatepass")
    return struct.pack("<Q", len(raw) if declared is None else declared) + raw


def _value(kind: int, value: Any, item: int | None = None, declared: int | None = None) -> bytes:
    if kind == STRING:
        return _string(value, declared)
    if kind == ARRAY:
        out = [struct.pack("<IQ", item, len(value) if declared is None else declared)]
        for v in value:
            out.append(_value(v.kind, v.value, v.item, v.declared) if isinstance(v, Meta) else _value(item, v))
        return b"".join(out)
    return struct.pack("<" + _FORMATS[kind], value)


@dataclass
class Tensor:
    name: str
    dims: list[int]  # GGUF order: innermost first
    type_id: int
    data: bytes
    offset: int | None = None  # relative to the data section; None: packed in order


def gguf_bytes(metadata: list[Meta], tensors: list[Tensor], version: int = 3, alignment: int = 32) -> bytes:
    """A GGUF file: header, metadata as written, tensor directory, aligned data."""
    out = [b"GGUF", struct.pack("<IQQ", version, len(tensors), len(metadata))]
    for m in metadata:
        body = m.raw if m.raw is not None else _value(m.kind, m.value, m.item, m.declared)
        out.append(_string(m.key) + struct.pack("<I", m.kind) + body)
    offsets, pos = [], 0
    for t in tensors:
        offsets.append(pos if t.offset is None else t.offset)
        pos += -(-len(t.data) // alignment) * alignment
    for t, offset in zip(tensors, offsets, strict=True):
        out.append(_string(t.name) + struct.pack("<I", len(t.dims)) + b"".join(struct.pack("<Q", d) for d in t.dims)
                   + struct.pack("<IQ", t.type_id, offset))  # fmt: skip
    head = b"".join(out)
    data = [b"\0" * (-len(head) % alignment)]
    for t in tensors:
        data.append(t.data + b"\0" * (-len(t.data) % alignment))
    return head + b"".join(data)


_GGUF_NAMES = [("model.embed_tokens", "token_embd"), ("model.norm", "output_norm"), ("lm_head", "output"),
               ("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm"),
               ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
               ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
               ("mlp.down_proj", "ffn_down")]  # fmt: skip


def _gguf_name(hf: str) -> str:
    name = hf.replace("model.layers.", "blk.")
    for a, b in _GGUF_NAMES:
        name = name.replace(a, b)
    return name


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (rotate-half -> interleaved), which the reader undoes."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_gguf_parts(config: dict[str, Any] | None = None, seed: int = 0) -> tuple[list[Meta], list[Tensor]]:
    """Metadata and F32 tensors of the tiny llama as llama.cpp writes it, with the tiny tokenizer."""
    config = dict(TINY_LLAMA if config is None else config)
    c = config
    meta = [
        Meta("general.architecture", STRING, "llama"), Meta("general.name", STRING, "tiny"),
        Meta("llama.context_length", U32, c["max_position_embeddings"]),
        Meta("llama.embedding_length", U32, c["hidden_size"]), Meta("llama.block_count", U32, c["num_hidden_layers"]),
        Meta("llama.feed_forward_length", U32, c["intermediate_size"]),
        Meta("llama.attention.head_count", U32, c["num_attention_heads"]),
        Meta("llama.attention.head_count_kv", U32, c["num_key_value_heads"]),
        Meta("llama.rope.freq_base", F32, c["rope_theta"]),
        Meta("llama.attention.layer_norm_rms_epsilon", F32, c["rms_norm_eps"]),
        *tiny_tokenizer_meta(),
    ]  # fmt: skip
    tensors = []
    for name, w in tiny_weights(config, seed).items():
        if ".q_proj." in name:
            w = _permute(w, c["num_attention_heads"])
        elif ".k_proj." in name:
            w = _permute(w, c["num_key_value_heads"])
        tensors.append(Tensor(_gguf_name(name), list(reversed(w.shape)), 0, w.tobytes()))
    return meta, tensors


def tiny_tokenizer_meta() -> list[Meta]:
    """The tiny BPE tokenizer as GGUF ``tokenizer.ggml.*`` metadata (llama.cpp's gpt2 model)."""
    from tests.tiny_tokenizer import CHATML, SPECIALS

    model = json.loads((_tiny_tokenizer() / "tokenizer.json").read_text())
    vocab = dict(model["model"]["vocab"])
    for added in model["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["model"]["merges"]]
    types = [3 if t in SPECIALS else 1 for t in tokens]
    return [
        Meta("tokenizer.ggml.model", STRING, "gpt2"), Meta("tokenizer.ggml.pre", STRING, "gpt2"),
        Meta("tokenizer.ggml.tokens", ARRAY, tokens, STRING), Meta("tokenizer.ggml.token_type", ARRAY, types, I32),
        Meta("tokenizer.ggml.merges", ARRAY, merges, STRING),
        Meta("tokenizer.ggml.eos_token_id", U32, tokens.index("<|im_end|>")),
        Meta("tokenizer.ggml.padding_token_id", U32, tokens.index("<|endoftext|>")),
        Meta("tokenizer.chat_template", STRING, CHATML),
    ]  # fmt: skip


def replace_meta(meta: list[Meta], key: str, kind: int, value: Any, item: int | None = None,
                 declared: int | None = None) -> list[Meta]:
    """``meta`` with ``key`` set to a new typed value (appended when absent)."""
    new = Meta(key, kind, value, item, declared)
    out = [new if m.key == key else m for m in meta]
    return out if any(m.key == key for m in meta) else [*out, new]


# -- the CLI contract -------------------------------------------------------------------------------


def invoke(*args: object, timeout: float = 20.0):
    """Runs ``edge-llm ARGS`` in-process (typer's CliRunner); fails the test past ``timeout`` seconds."""
    import time

    from typer.testing import CliRunner

    from cli.main import app

    start = time.monotonic()
    result = CliRunner().invoke(app, [str(a) for a in args])
    elapsed = time.monotonic() - start
    assert elapsed < timeout, f"edge-llm {args[0]} took {elapsed:.1f} s"
    return result


def one_line_error(*args: object, timeout: float = 20.0, code: int = 1) -> str:
    """``edge-llm ARGS`` must fail with exit ``code`` and exactly one stderr line, no traceback; returns it."""
    result = invoke(*args, timeout=timeout)
    unexpected = result.exception is not None and not isinstance(result.exception, SystemExit)
    assert not unexpected, f"{type(result.exception).__name__}: {result.exception}"
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


READERS = (("info",), ("estimate",), ("run", "--prompt", "hi", "--max-tokens", "2"))


def refused(model: Path, *words: str, commands=READERS, timeout: float = 10) -> str:
    """Every command in ``commands`` refuses ``model`` with one line containing each of ``words``."""
    for command in commands:
        line = one_line_error(command[0], model, *command[1:], timeout=timeout)
        for word in words:
            assert word in line, line
    return line
