"""Hostile model files for property-based tests: hypothesis strategies of mutations, and the CLI's contract.

Each format edge-llm reads has a strategy of *cases*: a list of mutations applied to a tiny, valid model
(tests/hostile_files.py), the way a file format's own fuzzers start from a valid seed. A case is plain data
(tuples of strings and numbers), so a finding can be written down and replayed.

- ``config``: config.json of each architecture, fields set to hostile JSON values, scaled, deleted, or the
  whole file replaced (deep nesting, not an object, not UTF-8).
- ``safetensors``: header entries (dtype, shape, data_offsets) and metadata, the length field, hundreds of
  thousands of extra entries, flipped bytes, truncation.
- ``gguf``: typed metadata (any key, any value type, lying lengths, nested arrays), the tensor directory,
  header counts, flipped bytes, truncation.
- ``tokenizer``: tokenizer.json, tokenizer_config.json, special_tokens_map.json, generation_config.json and
  chat templates (loops, huge numbers, recursion, filters with hostile arguments).

``check_contract`` runs ``edge-llm info`` and ``edge-llm run --prompt hi --max-tokens 2`` in-process and
classifies the outcome: exit 0 with output, or exit 1/2 with exactly one stderr line, no traceback, no
"unexpected" error, within the time bound. tests/test_fuzz_files.py runs a few dozen cases per format in the
suite; ``python -m benchmarks.fuzz --count N`` runs N per format in worker processes that also bound memory.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import time
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from tests.hostile_files import (
    ARRAY,
    BOOL,
    F32,
    F64,
    I8,
    I16,
    I32,
    I64,
    STRING,
    U8,
    U16,
    U32,
    U64,
    Meta,
    Tensor,
    gguf_bytes,
    read_safetensors,
    safetensors_bytes,
    tiny_folder,
    tiny_gguf_parts,
)  # fmt: skip
from tests.tiny_configs import TINY_CONFIGS

FORMATS = ("config", "safetensors", "gguf", "tokenizer")
ARCHS = ("llama", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")
COMMANDS = (("info",), ("run", "--prompt", "hi", "--max-tokens", "2"))
SECONDS = 30.0  # a command taking longer than this on a tiny model is a hang


# -- JSON values ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Deep:
    """A JSON array nested ``depth`` deep, written as text (json.dumps would recurse)."""

    depth: int


EDGE_INTS = [0, -1, 1, 2, 3, 4, 5, 7, 8, 16, 31, 32, 64, 100, 384, 1000, 4096, 2**31 - 1, 2**31, 2**32, 2**53,
             2**63, 2**64, 10**9, 10**12, -576, 10**100]  # fmt: skip
EDGE_FLOATS = [0.0, -0.0, 0.5, 1.0, 1.5, 2.0, 1e-30, 1e-6, 1e9, 1e300, 10000.0, 1e6, float("nan"), float("inf"),
               -float("inf"), -1.0]  # fmt: skip
UNSIGNED = [v for v in EDGE_INTS if 0 <= v < 2**64]  # what a GGUF u64 field can hold
WORDS = ["", "2", "1e9", "yes", "llama", "linear", "yarn", "llama3", "dynamic", "default", "silu", "gelu", "F32",
         "BF16", "affine", "mxfp4", "full_attention", "sliding_attention", "noaux_tc", "greedy", "<|im_end|>",
         "<|endoftext|>", "\u0000", "\udcff"]  # fmt: skip
KEYS = ["rope_type", "type", "factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor",
        "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "group_size", "bits", "mode",
        "content", "id", "special", "rope_theta", "quant_method"]  # fmt: skip

scalars = st.one_of(
    st.sampled_from(EDGE_INTS), st.integers(-8, 5000), st.sampled_from(EDGE_FLOATS),
    st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(), st.sampled_from(WORDS),
    st.text(max_size=12),
)  # fmt: skip
json_values = st.one_of(
    st.recursive(scalars, lambda children: st.lists(children, max_size=4)
                 | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), children, max_size=4),
                 max_leaves=10),
    st.builds(Deep, st.sampled_from([50, 1000, 5000, 200_000])),
)  # fmt: skip


def dump_json(value: Any) -> str:
    """JSON text of ``value`` (NaN and Infinity as Python writes them), ``Deep`` nesting spelled out."""
    if isinstance(value, Deep):
        return "[" * value.depth + "]" * value.depth
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))}: {dump_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(dump_json(v) for v in value) + "]"
    return json.dumps(value)


# garbage that replaces a whole JSON file
WHOLE_FILES = st.one_of(
    st.sampled_from([b"", b"{", b"[]", b'"text"', b"null", b"42", b"\xff\xfe\x00", b"{}", b'{"a": 1}']),
    st.builds(lambda d: ("[" * d + "]" * d).encode(), st.sampled_from([1000, 200_000])),
    st.binary(max_size=64),
)  # fmt: skip


# -- the tiny seeds, built once per process ---------------------------------------------------------


_ROOT: list[Path] = []


def _root() -> Path:
    if not _ROOT:
        import tempfile

        _ROOT.append(Path(tempfile.mkdtemp(prefix="edge-llm-fuzz-seeds-")))
    return _ROOT[0]


@cache
def seed_folder(arch: str) -> Path:
    """A runnable tiny checkpoint folder of ``arch`` (config, safetensors, tokenizer)."""
    config = dict(TINY_CONFIGS[arch], hidden_size=32, intermediate_size=48, max_position_embeddings=256)
    if arch.startswith("deepseek"):
        config.update(moe_intermediate_size=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
        config.update(q_lora_rank=16 if arch == "deepseek_v3" else None)
    elif "moe_intermediate_size" in config:
        config.update(moe_intermediate_size=16, shared_expert_intermediate_size=32)
    return tiny_folder(_root() / arch, config)


@cache
def seed_gguf() -> tuple[list[Meta], list[Tensor]]:
    return tiny_gguf_parts()


# -- config.json ------------------------------------------------------------------------------------


def _config_keys() -> list[str]:
    from edge_llm.formats.validate import GENERAL_RULES
    from edge_llm.models.fields import RULES

    return sorted({*RULES, *GENERAL_RULES, "model_type", "quantization_config", "rope_parameters", "zzz_unknown"})


config_ops = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(_config_keys()), json_values),
    st.tuples(st.just("scale"), st.sampled_from(_config_keys()), st.sampled_from([0, -1, 2, 3, 1000, 10**9, 0.5])),
    st.tuples(st.just("del"), st.sampled_from(_config_keys())),
    st.tuples(st.just("set"), st.just("rope_scaling"), st.fixed_dictionaries(
        {"rope_type": st.sampled_from(["linear", "dynamic", "llama3", "yarn", "default", "su", 3])},
        optional={k: scalars for k in KEYS[2:11]})),
    st.tuples(st.just("set"), st.just("quantization"), st.fixed_dictionaries(
        {}, optional={"group_size": st.sampled_from([0, 16, 32, 64, 128, 256, "64"]),
                      "bits": st.sampled_from([0, 1, 2, 3, 4, 7, 8, 16, "4"]), "mode": st.sampled_from(WORDS[12:16]),
                      "lm_head": st.one_of(st.booleans(), json_values)})),
)  # fmt: skip
config_cases = st.fixed_dictionaries({
    "arch": st.sampled_from(ARCHS),
    "ops": st.lists(config_ops, min_size=1, max_size=4),
    "whole": st.one_of(st.none(), st.none(), st.none(), WHOLE_FILES),
})  # fmt: skip


def write_config_case(case: dict, dst: Path) -> Path:
    shutil.copytree(seed_folder(case["arch"]), dst)
    if case["whole"] is not None:
        (dst / "config.json").write_bytes(case["whole"])
        return dst
    config = json.loads((dst / "config.json").read_text())
    for op in case["ops"]:
        if op[0] == "set":
            config[op[1]] = op[2]
        elif op[0] == "del":
            config.pop(op[1], None)
        elif op[0] == "scale" and isinstance(config.get(op[1]), (int, float)) and not isinstance(config[op[1]], bool):
            scaled = config[op[1]] * op[2]
            config[op[1]] = int(scaled) if isinstance(config[op[1]], int) and float(scaled).is_integer() else scaled
    (dst / "config.json").write_text(dump_json(config))
    return dst


# -- safetensors headers ----------------------------------------------------------------------------

DTYPE_WORDS = ["F32", "F16", "BF16", "F64", "I32", "U32", "U8", "I8", "BOOL", "F8_E4M3", "C64", "F4", "f32", ""]
offsets = st.one_of(st.lists(st.sampled_from(EDGE_INTS) | st.integers(0, 200_000), min_size=0, max_size=3),
                    json_values)  # fmt: skip
shapes = st.one_of(st.lists(st.sampled_from(EDGE_INTS) | st.integers(0, 400), max_size=9), json_values)
safetensors_ops = st.one_of(
    st.tuples(st.just("entry"), st.integers(0, 100), st.just("dtype"), st.sampled_from(DTYPE_WORDS) | json_values),
    st.tuples(st.just("entry"), st.integers(0, 100), st.just("shape"), shapes),
    st.tuples(st.just("entry"), st.integers(0, 100), st.just("data_offsets"), offsets),
    st.tuples(st.just("entry"), st.integers(0, 100), st.sampled_from(["extra", "dtype", "shape"]), st.just(Deep(5000))),
    st.tuples(st.just("drop_field"), st.integers(0, 100), st.sampled_from(["dtype", "shape", "data_offsets"])),
    st.tuples(st.just("entry_value"), st.integers(0, 100), json_values),
    st.tuples(st.just("drop"), st.integers(0, 100)),
    st.tuples(st.just("dup"), st.integers(0, 100)),
    st.tuples(st.just("many"), st.sampled_from([2, 100, 10_000, 600_000])),
    st.tuples(st.just("meta"), json_values),
    st.tuples(st.just("length"), st.sampled_from([0, 1, 7, 2**31, 2**63, 2**64 - 1, 10**8 + 1]) | st.integers(-50, 50)),
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("append"), st.integers(1, 4096)),
    st.tuples(st.just("header"), WHOLE_FILES),
)  # fmt: skip
safetensors_cases = st.fixed_dictionaries({"ops": st.lists(safetensors_ops, min_size=1, max_size=4)})


def write_safetensors_case(case: dict, dst: Path) -> Path:
    shutil.copytree(seed_folder("llama"), dst)
    header, data = read_safetensors(dst / "model.safetensors")
    names = [n for n in header if n != "__metadata__"]
    length, raw_header, byte_ops = None, None, []
    for op in case["ops"]:
        kind, *args = op
        name = names[args[0] % len(names)] if names and kind in ("entry", "drop_field", "entry_value", "drop",
                                                                  "dup") else None  # fmt: skip
        if kind == "entry" and isinstance(header.get(name), dict):
            header[name][args[1]] = args[2]
        elif kind == "drop_field" and isinstance(header.get(name), dict):
            header[name].pop(args[1], None)
        elif kind == "entry_value" and name:
            header[name] = args[1]
        elif kind == "drop" and name:
            header.pop(name, None)
        elif kind == "dup" and name in header:
            raw_header = "{" + f"{json.dumps(name)}: {dump_json(header[name])}, " + dump_json(header)[1:]
        elif kind == "many":
            empty = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
            header.update({f"extra.{i}": dict(empty) for i in range(args[0])})
        elif kind == "meta":
            header["__metadata__"] = args[0]
        elif kind == "length":
            length = args[0]
        elif kind == "header":
            raw_header = args[0]
        else:
            byte_ops.append(op)
    text = raw_header if raw_header is not None else dump_json(header)
    blob = bytearray(safetensors_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"),
                                       data))  # fmt: skip
    if length is not None:
        value = length if length >= 8 else len(blob) - 8 - len(data) + length
        blob[:8] = struct.pack("<Q", max(0, value) % 2**64)
    (dst / "model.safetensors").write_bytes(_bytes_ops(blob, byte_ops, header_end=len(blob) - len(data)))
    return dst


def _bytes_ops(blob: bytearray, ops: list, header_end: int) -> bytes:
    for kind, *args in ops:
        if kind == "flip" and blob:
            blob[args[0] % max(1, min(header_end, len(blob)))] = args[1]
        elif kind == "truncate":
            del blob[int(len(blob) * args[0]) :]
        elif kind == "append":
            blob += bytes(range(256)) * (args[0] // 256) + bytes(args[0] % 256)
    return bytes(blob)


# -- GGUF -------------------------------------------------------------------------------------------

GGUF_KEYS = [
    "general.architecture", "general.alignment", "general.name", "split.count", "split.no",
    *(f"llama.{k}" for k in ("context_length", "embedding_length", "block_count", "feed_forward_length",
                             "attention.head_count", "attention.head_count_kv", "rope.freq_base", "vocab_size",
                             "attention.layer_norm_rms_epsilon", "attention.key_length", "rope.scaling.type",
                             "rope.scaling.factor", "rope.scaling.original_context_length", "expert_count",
                             "expert_used_count", "rope.dimension_count")),
    *(f"tokenizer.ggml.{k}" for k in ("model", "pre", "tokens", "token_type", "merges", "scores", "bos_token_id",
                                      "eos_token_id", "padding_token_id", "unknown_token_id", "add_bos_token",
                                      "add_eos_token", "add_space_prefix", "eot_token_id")),
    "tokenizer.chat_template", "tokenizer.chat_template.tool_use",
]  # fmt: skip
_INT_KINDS = {U8: (0, 255), I8: (-128, 127), U16: (0, 2**16 - 1), I16: (-(2**15), 2**15 - 1),
              U32: (0, 2**32 - 1), I32: (-(2**31), 2**31 - 1), U64: (0, 2**64 - 1), I64: (-(2**63), 2**63 - 1)}


def _ints(kind: int) -> st.SearchStrategy:
    low, high = _INT_KINDS[kind]
    edges = [v for v in EDGE_INTS if low <= v <= high]
    return st.sampled_from(edges) | st.integers(max(low, -8), min(high, 5000)) | st.integers(low, high)


def _typed_value(kind: int) -> st.SearchStrategy:
    if kind in _INT_KINDS:
        return _ints(kind)
    if kind == F32:
        return st.sampled_from(EDGE_FLOATS[:-5] + [float("nan"), float("inf"), -1.0]) | st.floats(width=32)
    if kind == F64:
        return st.sampled_from(EDGE_FLOATS) | st.floats()
    if kind == BOOL:
        return st.booleans()
    return st.sampled_from(WORDS[:-1]) | st.text(max_size=16) | st.sampled_from(TEMPLATES)


def _meta_value() -> st.SearchStrategy:
    scalar_kinds = [U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, U64, I64, F64]
    scalar = st.sampled_from(scalar_kinds).flatmap(lambda k: st.tuples(st.just(k), _typed_value(k), st.none()))
    array = st.sampled_from(scalar_kinds).flatmap(
        lambda k: st.tuples(st.just(ARRAY), st.lists(_typed_value(k), max_size=6), st.just(k)))
    return st.one_of(scalar, array)


TEMPLATES = [
    "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{{ 'x' * 1000000000 }}", "{{ 2 ** 100000000 }}", "{{ 'x' | center(1000000000) }}",
    "{{ '%1000000000s' % 'x' }}", "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "{{ raise_exception('no') }}", "{% for", "{{ messages[0].content.upper() }}", "{{ lipsum(10**6) }}",
    "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "{{ messages | tojson(indent=1000000000) }}", "{{ ''.__class__.__mro__ }}", "{{ cycler(1,2).next() }}",
    "{% for m in messages recursive %}{{ loop(messages) }}{% endfor %}",
]  # fmt: skip
gguf_ops = st.one_of(
    st.tuples(st.just("meta"), st.sampled_from(GGUF_KEYS) | st.text(max_size=8), _meta_value()),
    st.tuples(st.just("meta"), st.sampled_from(GGUF_KEYS),
              st.tuples(st.just(STRING), st.sampled_from(WORDS[:-1]), st.sampled_from([2**40, 2**63, 10**6, 0]))),
    st.tuples(st.just("meta"), st.sampled_from(GGUF_KEYS),
              st.tuples(st.just(ARRAY), st.just([]), st.sampled_from([STRING, U32, ARRAY, 99]))),
    st.tuples(st.just("kind"), st.sampled_from(GGUF_KEYS), st.integers(0, 40)),
    st.tuples(st.just("del"), st.sampled_from(GGUF_KEYS)),
    st.tuples(st.just("dup_key"), st.integers(0, 100)),
    st.tuples(st.just("nest"), st.sampled_from([2, 5, 1000, 50_000])),
    st.tuples(st.just("tensor"), st.integers(0, 100), st.just("dims"),
              st.lists(st.sampled_from(UNSIGNED) | st.integers(0, 400), max_size=6)),
    st.tuples(st.just("tensor"), st.integers(0, 100), st.just("type_id"), st.integers(0, 45)),
    st.tuples(st.just("tensor"), st.integers(0, 100), st.just("offset"), st.sampled_from(UNSIGNED)),
    st.tuples(st.just("tensor"), st.integers(0, 100), st.just("name"), st.sampled_from(["", "x", "token_embd.weight",
                                                                                        "blk.0.attn_q.weight"])),
    st.tuples(st.just("dup_tensor"), st.integers(0, 100)),
    st.tuples(st.just("drop_tensor"), st.integers(0, 100)),
    st.tuples(st.just("count"), st.sampled_from([8, 16]), st.sampled_from([0, 1, 2**31, 2**62, 2**64 - 1])),
    st.tuples(st.just("version"), st.sampled_from([0, 1, 2, 4, 3 << 24])),
    st.tuples(st.just("flip"), st.integers(0, 40_000), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("append"), st.integers(1, 4096)),
)  # fmt: skip
gguf_cases = st.fixed_dictionaries({"ops": st.lists(gguf_ops, min_size=1, max_size=4)})


def write_gguf_case(case: dict, dst: Path) -> Path:
    meta, tensors = seed_gguf()
    meta, tensors = list(meta), list(tensors)
    version, counts, byte_ops = 3, {}, []
    for op in case["ops"]:
        kind, *args = op
        if kind == "meta":
            key, (value_kind, value, extra) = args
            declared = extra if value_kind == STRING else None
            item = extra if value_kind == ARRAY else None
            new = Meta(key, value_kind, value, item if item != ARRAY else U32, declared)
            meta = [new if m.key == key else m for m in meta] + ([] if any(m.key == key for m in meta) else [new])
        elif kind == "kind":  # the same value under another type id: the reader must not trust either
            meta = [Meta(m.key, args[1], m.value, m.item, raw=_encoded(m)) if m.key == args[0] else m for m in meta]
        elif kind == "del":
            meta = [m for m in meta if m.key != args[0]]
        elif kind == "dup_key" and meta:
            meta.append(meta[args[0] % len(meta)])
        elif kind == "nest":
            body = struct.pack("<IQ", ARRAY, 1) * (args[0] - 1) + struct.pack("<IQ", U32, 0)
            meta.append(Meta("general.nested", ARRAY, None, raw=body))
        elif kind == "tensor" and tensors:
            i = args[0] % len(tensors)
            t = tensors[i]
            changes = {args[1]: args[2]}
            tensors[i] = Tensor(**{**t.__dict__, **changes})
        elif kind == "dup_tensor" and tensors:
            tensors.append(tensors[args[0] % len(tensors)])
        elif kind == "drop_tensor" and tensors:
            tensors.pop(args[0] % len(tensors))
        elif kind == "count":
            counts[args[0]] = args[1]
        elif kind == "version":
            version = args[0]
        else:
            byte_ops.append(op)
    blob = bytearray(gguf_bytes(meta, tensors, version=version))
    for offset, value in counts.items():
        blob[offset : offset + 8] = struct.pack("<Q", value)
    header_end = len(blob) - sum(-(-len(t.data) // 32) * 32 for t in tensors)
    dst.mkdir(parents=True, exist_ok=True)
    path = dst / "model.gguf"
    path.write_bytes(_bytes_ops(blob, byte_ops, header_end=header_end))
    return path


def _encoded(m: Meta) -> bytes:
    from tests.hostile_files import _value

    return m.raw if m.raw is not None else _value(m.kind, m.value, m.item, m.declared)


# -- tokenizer files --------------------------------------------------------------------------------

TOKENIZER_PATHS = ["model.type", "model.vocab", "model.merges", "model.unk_token", "model.byte_fallback",
                   "model.dropout", "model.vocab.Ġt", "model.vocab.<|im_end|>", "model.merges.0", "added_tokens",
                   "added_tokens.0", "added_tokens.0.id", "added_tokens.0.content", "added_tokens.2.special",
                   "pre_tokenizer", "normalizer", "decoder", "post_processor", "truncation", "padding",
                   "version"]  # fmt: skip
CONFIG_KEYS = ["bos_token", "eos_token", "pad_token", "unk_token", "chat_template", "added_tokens_decoder",
               "extra_special_tokens", "additional_special_tokens", "clean_up_tokenization_spaces", "add_bos_token",
               "add_eos_token", "model_max_length", "legacy", "add_prefix_space"]  # fmt: skip
GENERATION_KEYS = ["eos_token_id", "bos_token_id", "pad_token_id", "temperature", "top_p", "top_k", "min_p",
                   "repetition_penalty", "do_sample", "max_new_tokens"]  # fmt: skip
template_fragments = st.sampled_from([
    "{{ messages[0]['content'] }}", "{% for m in messages %}{{ m.role }}{% endfor %}", "{{ bos_token }}",
    "{% if add_generation_prompt %}A:{% endif %}", "{{ eos_token * 3 }}", "{{ range(N) | list | length }}",
    "{% for i in range(N) %}{% for j in range(N) %}.{% endfor %}{% endfor %}", "{{ 'x' * N }}", "{{ N ** N }}",
    "{{ messages | batch(N, 'x') | list }}", "{{ 'x' | indent(N) }}", "{{ '{:>N}'.format(1) }}",
    "{{ '%Ns' % 1 }}", "{{ messages | tojson }}", "{{ raise_exception('x') }}", "{{ strftime_now('%Y') }}",
    "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(N) }}", "{{ undefined_thing.attr }}", "{{ messages[N] }}",
    "{% set x = namespace(a=N) %}{{ x.a }}", "{{ 'a'.ljust(N) }}", "{{ (messages * N) | length }}",
    "{% for m in messages recursive %}{{ loop(m.get('children', [])) }}{% endfor %}", "{%", "}}",
])  # fmt: skip
templates = st.lists(st.tuples(template_fragments, st.sampled_from([0, 1, 3, 1000, 100000, 10**9, -1])),
                     min_size=1, max_size=5).map(lambda parts: "".join(f.replace("N", str(n)) for f, n in parts))
tokenizer_ops = st.one_of(
    st.tuples(st.just("tokenizer.json"), st.sampled_from(TOKENIZER_PATHS), json_values),
    st.tuples(st.just("tokenizer_config.json"), st.sampled_from(CONFIG_KEYS), json_values),
    st.tuples(st.just("tokenizer_config.json"), st.just("chat_template"), templates),
    st.tuples(st.just("chat_template.jinja"), templates),
    st.tuples(st.just("special_tokens_map.json"), st.sampled_from(CONFIG_KEYS[:4]), json_values),
    st.tuples(st.just("generation_config.json"), st.sampled_from(GENERATION_KEYS), json_values),
    st.tuples(st.just("whole"), st.sampled_from(["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                                 "generation_config.json", "chat_template.jinja"]), WHOLE_FILES),
    st.tuples(st.just("delete"), st.sampled_from(["tokenizer.json", "tokenizer_config.json"])),
)  # fmt: skip
tokenizer_cases = st.fixed_dictionaries({"ops": st.lists(tokenizer_ops, min_size=1, max_size=4)})


def _set_path(data: Any, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for part in parents:
        data = data[int(part)] if isinstance(data, list) and part.isdigit() and int(part) < len(data) else \
            data.setdefault(part, {}) if isinstance(data, dict) else None
        if data is None:
            return
    if isinstance(data, list) and last.isdigit() and int(last) < len(data):
        data[int(last)] = value
    elif isinstance(data, dict):
        data[last] = value


def write_tokenizer_case(case: dict, dst: Path) -> Path:
    shutil.copytree(seed_folder("llama"), dst)
    for kind, *args in case["ops"]:
        if kind == "chat_template.jinja":
            (dst / kind).write_text(args[0], encoding="utf-8", errors="surrogatepass")
        elif kind == "whole":
            (dst / args[0]).write_bytes(args[1])
        elif kind == "delete":
            (dst / args[0]).unlink(missing_ok=True)
        else:
            path = dst / kind
            try:
                data = json.loads(path.read_text()) if path.is_file() else {}
            except (ValueError, RecursionError):
                data = {}
            if isinstance(data, dict):
                _set_path(data, args[0], args[1])
                try:
                    text = dump_json(data)
                except RecursionError:  # an earlier op nested it past what this writer re-encodes: keep it
                    continue
                path.write_text(text, encoding="utf-8", errors="surrogatepass")
    return dst


STRATEGIES = {"config": config_cases, "safetensors": safetensors_cases, "gguf": gguf_cases,
              "tokenizer": tokenizer_cases}  # fmt: skip
WRITERS = {"config": write_config_case, "safetensors": write_safetensors_case, "gguf": write_gguf_case,
           "tokenizer": write_tokenizer_case}  # fmt: skip


# -- the contract -----------------------------------------------------------------------------------


@dataclass
class Outcome:
    command: str
    exit_code: int
    seconds: float
    stderr: str = ""
    problem: str | None = None  # None: the contract held

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "stderr" or self.problem}


@dataclass
class Verdict:
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        return [f"{o.command}: {o.problem}" for o in self.outcomes if o.problem]


def check_contract(model: Path, commands=COMMANDS, seconds: float = SECONDS) -> Verdict:
    """Runs each command on ``model`` in-process; an outcome's ``problem`` names any break of the contract:
    a traceback or an exception out of the CLI, an error that is not one line, an "unexpected" error (the
    CLI's name for a bug), an exit code other than 0, 1 or 2, exit 0 without output, or a hang."""
    from typer.testing import CliRunner

    from cli.main import app

    verdict = Verdict()
    for command in commands:
        start = time.monotonic()
        result = CliRunner().invoke(app, [command[0], str(model), *command[1:]])
        elapsed = time.monotonic() - start
        stderr = result.stderr or ""
        outcome = Outcome(command[0], result.exit_code, round(elapsed, 3), stderr[-2000:])
        lines = [line for line in stderr.splitlines() if line.strip()]
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            outcome.problem = f"exception {type(result.exception).__name__}: {str(result.exception)[:200]}"
        elif "Traceback" in stderr or "Traceback" in (result.stdout or ""):
            outcome.problem = "traceback"
        elif result.exit_code not in (0, 1, 2):
            outcome.problem = f"exit code {result.exit_code}"
        elif result.exit_code == 0 and command[0] == "info" and not (result.stdout or "").strip():
            outcome.problem = "exit 0 without output"  # (run may answer with nothing: end of text first)
        elif result.exit_code != 0 and len(lines) != 1:
            outcome.problem = f"{len(lines)} stderr lines"
        elif result.exit_code != 0 and "a bug in edge-llm" in lines[0]:  # cli's words for an uncaught exception
            outcome.problem = f"unexpected error: {lines[0][:200]}"
        elif elapsed > seconds:
            outcome.problem = f"hang: {elapsed:.1f} s"
        verdict.outcomes.append(outcome)
    return verdict


def case_summary(case: dict) -> str:
    """A finding's input, short enough to write down (long values elided)."""
    def short(value: Any) -> Any:
        if isinstance(value, (str, bytes)) and len(value) > 60:
            return value[:57] + (b"..." if isinstance(value, bytes) else "...")
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        if isinstance(value, (list, tuple)):
            return type(value)(short(v) for v in value[:8])
        if isinstance(value, dict):
            return {k: short(v) for k, v in list(value.items())[:8]}
        return value

    return repr(short(case))


def reset_peak_rss() -> bool:
    """Starts a new resident-memory high-water mark for this process (Linux: VmHWM); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss() -> int | None:
    """This process's resident-memory high-water mark since the last ``reset_peak_rss``, in bytes."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    line = next((line for line in status.splitlines() if line.startswith("VmHWM:")), None)
    return int(line.split()[1]) * 1024 if line else None
