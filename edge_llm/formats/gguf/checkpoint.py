"""A GGUF file (llama.cpp, Ollama, LM Studio) read as a ``Checkpoint``: HF-style config, HF tensor names.

References: llama.cpp ``convert_hf_to_gguf.py`` (what it renames and permutes, which metadata keys it
writes) and ``src/llama-arch.cpp`` (tensor names); transformers ``modeling_gguf_pytorch_utils.py``,
which reads the same files back into transformers models (our oracle in the tests).

What a reader of the checkpoint sees is what a converted Hugging Face folder would give:

- ``config``: the transformers config keys the architectures read (``hidden_size``, ``rope_theta``,
  ``rope_scaling``, ``tie_word_embeddings`` when there is no ``output.weight``, ...), and a
  ``quantization`` block in the MLX format when tensors stay quantized (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/
  Q5_K as 4, 5 or 8 bits, group 32; the commonest bits the default, per-module entries for the others,
  e.g. a Q8_0 embedding in a Q4_1 file).
- ``tensors``: header facts per HF name as they will be in memory (packed uint32 + scales and biases
  for quantized ones, float16 for dequantized Q2_K/Q3_K/Q6_K).
- ``load_weights()``: HF-named MLX arrays, with llama.cpp's rope permutation of q/k rows undone (its
  ``permute`` interleaves the two rotary halves for GGML's "normal" rope; we use rotate-half, as HF).
- ``stored_tensors()``: the file's own tensors (ggml type, offset, length) under those HF names.

Architectures (config keys, tensor names, which ones llama.cpp permuted) live in ``arch``.
Files whose tensors are all F32/F16/Q4_0/Q4_1/Q8_0 go through ``mx.load`` (fast C++); any other type
(BF16, which ``mx.load`` rounds to float16; Q5_*, K-quants) sends the whole file through our numpy path
(``quants``), which gives bit-identical arrays for the types both read.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from ...errors import CheckpointError
from ...generation.sampling_defaults import sampling_from_gguf
from ...models import supported_model_types
from ...models.mla import join_kv_b
from ...tokenizer import Tokenizer
from ..checkpoint import Checkpoint, PackedTensor, commonest_bits, lazy_zeros
from ..tensors import StoredTensor, TensorInfo
from ..validate import check_checkpoint
from . import quants
from .arch import ARCHITECTURES, Arch, Names
from .reader import GGUFFile, ValueType, read_gguf
from .tokenizer import write_tokenizer_files

log = logging.getLogger(__name__)

SUPPORTED_TYPES = (*quants.FLOATS, *quants.MLX_QUANTIZED, *quants.DEQUANTIZED)
_NATIVE = {"F32", "F16", *quants.MX_LOAD_NATIVE}  # what mx.load reads exactly

# Tensors llama.cpp writes that hold no weights of the HF model.
_DROPPED = ("rope_freqs.weight",)


@dataclass
class GGUFCheckpoint(Checkpoint):
    """A ``.gguf`` file as a checkpoint; ``path`` is the file."""

    format_name = "GGUF"

    gguf: GGUFFile | None = field(default=None, repr=False)
    names: dict[str, str] = field(default_factory=dict, repr=False)  # GGUF tensor -> HF module path

    @property
    def config_path(self) -> Path:
        return self.path

    @property
    def gguf_types(self) -> list[str]:
        """The ggml types of the file's tensors, most parameters first (``["Q4_1", "Q8_0", "F32"]``)."""
        counts = Counter()
        for t in self.gguf.tensors.values():
            counts[t.type_name] += t.size
        return [name for name, _ in counts.most_common()]

    def describe_quantization(self) -> str:
        """How it runs, then what the file holds as llama.cpp names it (``4-bit affine, group 32 (GGUF Q4_1, F32)``)."""
        mlx_form = super().describe_quantization()
        types = self.gguf_types
        if mlx_form is None:
            mlx_form = "dequantized to float16" if set(types) & set(quants.DEQUANTIZED) else "none"
        return f"{mlx_form} (GGUF {', '.join(types)})"

    def sampling_config(self) -> tuple[str, dict[str, Any]]:
        return "GGUF metadata", sampling_from_gguf(self.gguf.metadata)

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_gguf(self.gguf)

    @property
    def quantized(self) -> bool:
        return any(t not in quants.FLOATS for t in self.gguf_types)

    @property
    def quantized_group_size(self) -> int | None:
        """llama.cpp's blocks of 32, K-quants included (those MLX cannot run quantized are dequantized)."""
        return quants.GROUP_SIZE if self.quantized else None

    def module_bits(self) -> dict[str, int | None]:
        """The bits each matrix holds in the file, by HF module path: 4/5/8 for types kept quantized, the
        nominal bits of dequantized K-quants (Q2_K 2, Q3_K 3, Q6_K 6), None for float matrices. DeepSeek's
        kv_b_proj, joined from llama.cpp's k_b/v_b halves in float (``_join_kv_b``), is a float matrix."""
        spec = ARCHITECTURES[self.gguf.get("general.architecture")]
        bits: dict[str, int | None] = {f"{m.rsplit('.', 1)[0]}.kv_b_proj": None
                                       for m in self.names.values() if m.endswith(spec.split_modules)}
        for module, kind in _matrices(self.gguf, self.names, spec):
            bits[module] = quants.MLX_QUANTIZED.get(kind) or quants.DEQUANTIZED_BITS.get(kind)
        return bits

    def side_files(self) -> GGUFSideFiles:
        return GGUFSideFiles(self.gguf)

    def hf_config(self) -> dict[str, Any]:
        """config.json for a converted folder: the config without the GGUF quantization block."""
        return {k: v for k, v in self.config.items() if k != "quantization"}

    def stored_tensors(self) -> dict[str, StoredTensor]:
        """The file's tensors by the Hugging Face name ``load_weights`` gives them (DeepSeek's k_b/v_b halves
        under their own names: ``load_weights`` joins them into kv_b_proj), their bytes as llama.cpp wrote
        them: ggml blocks undecoded, q/k rows in llama.cpp's rope order, shapes as the file declares them."""
        spec = ARCHITECTURES[self.gguf.get("general.architecture")]
        stored = {}
        for name, t in self.gguf.tensors.items():
            base, suffix = name.rsplit(".", 1)
            if name in _DROPPED or base not in self.names:
                continue
            stored[spec.rename(f"{self.names[base]}.{suffix}")] = StoredTensor(
                name, self.path, t.offset, t.nbytes, t.type_name, t.shape)
        return stored

    def dequantized(self) -> GGUFCheckpoint:
        """The same file seen as a float16 checkpoint (what a converter re-quantizing it needs): no
        quantization block, float16 headers, and ``load_weights`` dequantizing lazily, tensor by tensor."""
        if not self.quantized:
            return self
        float_infos: dict[str, TensorInfo] = {}
        for name, info in self.tensors.items():
            module, suffix = name.rsplit(".", 1)
            if suffix in ("scales", "biases"):
                continue
            if f"{module}.scales" in self.tensors:  # one scale per 32 values
                columns = self.tensors[f"{module}.scales"].shape[-1] * quants.GROUP_SIZE
                info = TensorInfo(name, info.file, "F16", (*info.shape[:-1], columns))
            float_infos[name] = info
        return _DequantizedGGUF(self.path, self.hf_config(), float_infos, gguf=self.gguf, names=self.names)

    def load_weights(self, skip: Callable[[str], bool] | None = None) -> dict[str, mx.array]:
        """HF-named arrays, q/k rows un-permuted; quantized tensors as ``weight``/``scales``/``biases``.
        Tensors ``skip`` accepts are never read (lazy zeros): the file then goes through the numpy path,
        tensor by tensor, since ``mx.load`` reads a GGUF file whole."""
        skipped = {name for name, hf in self._hf_names().items() if skip is not None and skip(hf)}
        raw = self._load_native() if self._all_native() and not skipped else self._load_numpy(skipped)
        spec = ARCHITECTURES[self.gguf.get("general.architecture")]
        weights: dict[str, mx.array] = {}
        for name, array in raw.items():
            base, suffix = name.rsplit(".", 1)
            if name in _DROPPED or base not in self.names:
                continue
            module = self.names[base]
            array = array.reshape(_hf_shape(module, tuple(array.shape))) if suffix in ("weight", "bias") else array
            weights[spec.rename(f"{module}.{suffix}")] = self._unpermute(module, array)
        for name in skipped:
            for hf in self._decoded_names(name):
                weights[hf] = lazy_zeros(self.tensors[hf])
        if spec.split_modules:
            _join_kv_b(weights, self.config)
        return weights

    def _hf_names(self) -> dict[str, str]:
        """GGUF tensor name -> the HF name ``load_weights`` gives it (dropped tensors left out)."""
        spec = ARCHITECTURES[self.gguf.get("general.architecture")]
        out = {}
        for name in self.gguf.tensors:
            base, suffix = name.rsplit(".", 1)
            if name not in _DROPPED and base in self.names:
                out[name] = spec.rename(f"{self.names[base]}.{suffix}")
        return out

    def _decoded_names(self, gguf_name: str) -> list[str]:
        """The HF names of the arrays one GGUF tensor becomes (a quantized one: weight, scales, biases)."""
        hf = self._hf_names()[gguf_name]
        if self.gguf.tensors[gguf_name].type_name in quants.MLX_QUANTIZED:
            base = hf.rsplit(".", 1)[0]
            return [hf, f"{base}.scales", f"{base}.biases"]
        return [hf]

    def decode_stored(self, name: str, stored: StoredTensor, data: np.ndarray,
                      shape: tuple[int, ...]) -> dict[str, mx.array]:
        # q/k rows stay in llama.cpp's order here: only experts are read this way, and they are not permuted
        module = name.rsplit(".", 1)[0]
        decoded = _decode_tensor(name, data, stored.dtype, shape)
        return {k: v.reshape(_hf_shape(module, tuple(v.shape))) if k == name else v for k, v in decoded.items()}

    def _all_native(self) -> bool:
        # MLX's GGUF reader (0.32) crashes the process on float64 metadata values (type 12) and refuses
        # arrays of arrays (type 9 in 9): such files take the numpy path, which reads both.
        if ValueType.FLOAT64 in self.gguf.value_types or self._nested_arrays():
            return False
        return all(t.type_name in _NATIVE for t in self.gguf.tensors.values())

    def _nested_arrays(self) -> bool:
        return any(isinstance(v, list) and any(isinstance(item, list) for item in v[:1])
                   for v in self.gguf.metadata.values())  # fmt: skip

    def _load_native(self) -> dict[str, mx.array]:
        try:
            return mx.load(str(self.path))
        except (RuntimeError, ValueError) as e:
            raise CheckpointError(f"{self.path}: cannot read weights ({e}); re-download it") from None

    def _load_numpy(self, skipped: set[str] = frozenset()) -> dict[str, mx.array]:
        out: dict[str, mx.array] = {}
        data = np.memmap(self.path, dtype=np.uint8, mode="r")
        # A corrupt block's scale can overflow float16: numpy's warning would be noise on stderr; the value
        # becomes inf, which the loader's finite check then names with its tensor.
        with np.errstate(over="ignore", invalid="ignore"):
            for name, t in self.gguf.tensors.items():
                if name not in skipped:
                    out.update(_decode_tensor(name, data[t.offset : t.offset + t.nbytes], t.type_name, t.shape))
        del data
        kinds = sorted({t.type_name for t in self.gguf.tensors.values() if t.type_name in quants.DEQUANTIZED})
        if kinds:
            dequantized = sum(t.size for t in self.gguf.tensors.values() if t.type_name in quants.DEQUANTIZED)
            on_disk = sum(t.nbytes for t in self.gguf.tensors.values() if t.type_name in quants.DEQUANTIZED)
            log.warning(
                "%s: %s tensors are dequantized to float16 (MLX cannot run them quantized): %.2f GB in memory "
                "(%.2f GB where the CPU computes in float32) instead of %.2f GB on disk; a Q4_0/Q8_0 file, "
                "or `edge-llm quantize` of this one, stays small",
                self.path.name, "/".join(kinds), dequantized * 2 / 1e9, dequantized * 4 / 1e9, on_disk / 1e9,
            )  # fmt: skip
        return out

    def _unpermute(self, module: str, array: mx.array) -> mx.array:
        """Undo llama.cpp's ``permute`` of q/k rows: per head, [D/2 pairs, 2] back to [2 halves, D/2]."""
        heads = self._permuted_heads(module)
        if heads is None:
            return array
        shape = array.shape
        rows = array.reshape(heads, shape[0] // heads // 2, 2, *shape[1:])  # [H, D/2, 2, ...]
        return rows.swapaxes(1, 2).reshape(shape)

    def _permuted_heads(self, module: str) -> int | None:
        if not ARCHITECTURES[self.gguf.get("general.architecture")].permuted_qk:
            return None
        if module.endswith("self_attn.q_proj"):
            return self.config["num_attention_heads"]
        if module.endswith("self_attn.k_proj"):
            return self.config["num_key_value_heads"]
        return None


@dataclass
class _DequantizedGGUF(GGUFCheckpoint):
    """``GGUFCheckpoint.dequantized()``: quantized tensors come back as float16 weights."""

    def dequantized(self) -> GGUFCheckpoint:
        return self

    def load_weights(self, skip: Callable[[str], bool] | None = None) -> dict[str, mx.array]:
        if skip is not None:
            raise NotImplementedError("a dequantized GGUF view is read whole (it is a converter's input)")
        return self.load_float_weights()[0]

    def load_float_weights(self) -> tuple[dict[str, mx.array], dict[str, PackedTensor]]:
        """Float16 weights, dequantized lazily, and each quantized module's original ``weight``/``scales``/
        ``biases`` (MLX affine, group 32), so a converter can copy them exactly instead of re-quantizing."""
        weights = super().load_weights()
        packed = {}
        for key in [k for k in weights if k.endswith(".scales")]:
            module = key[: -len(".scales")]
            packed[module] = (weights[f"{module}.weight"], weights[key], weights[f"{module}.biases"])
            weights[f"{module}.weight"] = _dense(weights, module).astype(mx.float16)
        return weights, packed


@dataclass(frozen=True)
class GGUFSideFiles:
    """What a Hugging Face folder holds besides weights and config.json, rebuilt from the GGUF metadata:
    the tokenizer files and generation_config.json (``tokenizer.write_tokenizer_files``)."""

    gguf: GGUFFile
    nbytes: int = 0  # small, and only known once written
    skipped: tuple[tuple[str, str], ...] = ()

    def write(self, dest: Path) -> None:
        write_tokenizer_files(self.gguf, dest)


def _hf_name(gguf_base: str, table: Names) -> str | None:
    for pattern, repl in table:
        if re.fullmatch(pattern, gguf_base):
            return re.sub(pattern, repl, gguf_base)
    return None


def _decode_tensor(name: str, raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> dict[str, mx.array]:
    """One GGUF tensor's bytes as MLX arrays (numpy path): a type MLX keeps quantized as ``name`` (packed) plus
    its ``.scales``/``.biases``; a K-quant MLX cannot hold as float16; floats as they are."""
    if type_name in quants.MLX_QUANTIZED:
        base = name.rsplit(".", 1)[0]
        w, s, b = quants.to_mlx_quantized(raw, type_name, shape)
        return {name: mx.array(w), f"{base}.scales": mx.array(s), f"{base}.biases": mx.array(b)}
    if type_name in quants.DEQUANTIZED:
        return {name: mx.array(quants.dequantize(raw, type_name, shape))}
    if type_name == "BF16":
        return {name: mx.array(quants.floats(raw, "BF16", shape)).view(mx.bfloat16)}
    return {name: mx.array(quants.floats(raw, type_name, shape))}


def _hf_shape(module: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    # llama.cpp declares Qwen2-MoE's shared-expert gate [hidden] where HF has a Linear [1, hidden]
    return (1, *shape) if module.endswith("shared_expert_gate") and len(shape) == 1 else shape


def _dense(weights: dict[str, mx.array], module: str) -> mx.array:
    """A module's weight as floats, dequantized (in float32, exact) when it arrived quantized."""
    w = weights.pop(f"{module}.weight")
    scales, biases = weights.pop(f"{module}.scales", None), weights.pop(f"{module}.biases", None)
    if scales is None:
        return w
    bits = w.shape[-1] // scales.shape[-1]  # packed columns per group of 32 values
    return mx.dequantize(w, scales.astype(mx.float32), biases.astype(mx.float32),
                         group_size=quants.GROUP_SIZE, bits=bits)  # fmt: skip


def _join_kv_b(weights: dict[str, mx.array], config: dict[str, Any]) -> None:
    """llama.cpp's k_b [H, r, nope] (transposed) and v_b [H, v, r] back into kv_b_proj [H * (nope + v), r]."""
    heads, rank = config["num_attention_heads"], config["kv_lora_rank"]
    for key in [k for k in weights if k.endswith(".self_attn.k_b_proj.weight")]:
        prefix = key[: -len("k_b_proj.weight")]
        k_b = _dense(weights, f"{prefix}k_b_proj").reshape(heads, rank, -1)  # [H, r, nope]
        v_b = _dense(weights, f"{prefix}v_b_proj").reshape(heads, -1, rank)  # [H, v, r]
        weights[f"{prefix}kv_b_proj.weight"] = join_kv_b(k_b, v_b)


def _tensor_infos(g: GGUFFile, names: dict[str, str], spec: Arch, config: dict[str, Any]) -> dict[str, TensorInfo]:
    """What each HF tensor will be in memory: packed + scales/biases, float16 for K-quants."""
    infos: dict[str, TensorInfo] = {}

    def add(name: str, dtype: str, shape: tuple[int, ...]) -> None:
        name = spec.rename(name)
        infos[name] = TensorInfo(name, g.path, dtype, shape)

    joined: dict[str, str] = {}  # kv_b_proj prefix -> dtype
    for name, t in g.tensors.items():
        base, suffix = name.rsplit(".", 1)
        if name in _DROPPED or base not in names:
            continue
        module = names[base]
        if module.endswith(spec.split_modules):
            prefix = module.rsplit(".", 1)[0]
            quantized = t.type_name in quants.MLX_QUANTIZED or joined.get(prefix) == "F32"
            joined[prefix] = "F32" if quantized else "F16" if t.type_name in quants.DEQUANTIZED else t.type_name
        elif t.type_name in quants.MLX_QUANTIZED:
            bits = quants.MLX_QUANTIZED[t.type_name]
            *outer, cols = t.shape
            groups = cols // quants.GROUP_SIZE
            add(f"{module}.weight", "U32", (*outer, cols * bits // 32))
            for part in ("scales", "biases"):
                add(f"{module}.{part}", "F32" if t.type_name in quants.FLOAT32_SCALES else "F16", (*outer, groups))
        else:
            dtype = "F16" if t.type_name in quants.DEQUANTIZED else t.type_name
            add(f"{module}.{suffix}", dtype, _hf_shape(module, t.shape))
    for prefix, dtype in joined.items():
        rows = config["num_attention_heads"] * (config["qk_nope_head_dim"] + config["v_head_dim"])
        add(f"{prefix}.kv_b_proj.weight", dtype, (rows, config["kv_lora_rank"]))
    return infos


def _matrices(g: GGUFFile, names: dict[str, str], spec: Arch) -> list[tuple[str, str]]:
    """(HF module path, ggml type) of each weight matrix the model uses as stored (not the k_b/v_b halves
    DeepSeek's loader joins)."""
    found = []
    for t in g.tensors.values():
        module = names.get(t.name.rsplit(".", 1)[0])
        if len(t.shape) >= 2 and module is not None and not module.endswith(spec.split_modules):
            found.append((module, t.type_name))
    return found


def _quantization(g: GGUFFile, names: dict[str, str], spec: Arch) -> dict[str, Any] | None:
    """The MLX quantization block: the commonest bits as default, other bits as per-module entries."""
    bits_of = {module: quants.MLX_QUANTIZED[kind] for module, kind in _matrices(g, names, spec)
               if kind in quants.MLX_QUANTIZED}
    default = commonest_bits(bits_of)
    if default is None:
        return None
    block: dict[str, Any] = {"group_size": quants.GROUP_SIZE, "bits": default}
    for module, bits in bits_of.items():
        if bits != default:
            block[module] = {"group_size": quants.GROUP_SIZE, "bits": bits}
    return block


def _check_types(g: GGUFFile) -> None:
    bad = [t for t in g.tensors.values() if t.type_name not in SUPPORTED_TYPES]
    if bad:
        kinds = sorted({t.type_name for t in bad})
        raise CheckpointError(
            f"{g.path}: tensor {bad[0].name!r} is {bad[0].type_name}"
            f"{' (also ' + ', '.join(kinds[1:]) + ')' if len(kinds) > 1 else ''}, a GGUF type edge-llm cannot load; "
            f"use one in F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 or a K-quant (Q2_K to Q6_K)"
        )


def read_gguf_checkpoint(path: str | Path) -> GGUFCheckpoint:
    """A GGUF file as a checkpoint; raises CheckpointError with one line for what it cannot read."""
    g = read_gguf(Path(path).expanduser())
    parts, part = g.get("split.count", 1), g.get("split.no", 0)
    if isinstance(parts, int) and parts > 1:
        which = f"part {part + 1}" if isinstance(part, int) else "a part"
        raise CheckpointError(
            f"{g.path}: {which} of a GGUF split into {parts} files; merge them first "
            f"(llama-gguf-split --merge {g.path.name} merged.gguf) and run the merged file"
        )
    arch = g.get("general.architecture")
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise CheckpointError(
            f"{g.path}: GGUF architecture {arch!r:.40} is not supported (supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    spec = ARCHITECTURES[arch]
    config = spec.config(g)
    table = spec.names(g)
    if config["model_type"] not in supported_model_types():
        raise CheckpointError(f"{g.path}: model type {config['model_type']!r} (from GGUF {arch!r}) is not supported")
    names: dict[str, str] = {}
    unknown = []
    for name in g.tensors:
        base = name.rsplit(".", 1)[0]
        hf = _hf_name(base, table)
        if hf is not None:
            names[base] = hf
        elif name not in _DROPPED:
            unknown.append(name)
    if unknown:
        log.warning("%s: ignoring %d GGUF tensors with no known role (e.g. %s)", g.path.name, len(unknown), unknown[0])
    _check_types(g)
    quantization = _quantization(g, names, spec)
    if quantization:
        config["quantization"] = quantization
    checkpoint = GGUFCheckpoint(g.path, config, _tensor_infos(g, names, spec, config), gguf=g, names=names)
    check_checkpoint(checkpoint)
    return checkpoint


def is_gguf(path: str | Path) -> bool:
    """A file named ``*.gguf`` or starting with the GGUF magic."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix.lower() == ".gguf":
        return True
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"


__all__ = ["GGUFCheckpoint", "SUPPORTED_TYPES", "is_gguf", "read_gguf_checkpoint"]
