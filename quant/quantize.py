"""Checkpoint -> quantized (or FP16/BF16) checkpoint, streamed one tensor group at a time, atomically.

Reading goes through the runtime's own reader (``edge_llm.formats.checkpoint`` + the architecture's ``sanitize``,
FP8 dequantization included), so anything ``edge-llm run`` loads can be converted, and the output uses
the post-sanitize names the loader and mlx-lm (``mlx_lm.load``) expect. Source tensors are grouped by
decoder layer; each group is sanitized and evaluated on its own, and every output tensor goes straight
to its place in a pre-planned shard (``writer.ShardWriter``), so peak memory follows the largest layer
(or tensor), not the model. config.json gains the ``"quantization"`` block in the MLX community format
(and its ``"quantization_config"`` copy, as mlx-lm writes), with old-style rope keys mlx-lm reads.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import mlx.core as mx
from mlx.utils import tree_flatten

from edge_llm.errors import CheckpointError, EdgeLLMError, TokenizerError
from edge_llm.formats.checkpoint import Checkpoint
from edge_llm.formats.folder import normalize_config
from edge_llm.formats.fp8 import dequantize_fp8
from edge_llm.formats.gguf.checkpoint import commonest_bits
from edge_llm.formats.gguf.quants import GROUP_SIZE
from edge_llm.formats.open import open_checkpoint
from edge_llm.formats.safetensors_header import read_safetensors_header
from edge_llm.hub.resolve import resolve_model
from edge_llm.loader import build_model
from edge_llm.machine.backend import DTYPE_NAMES
from edge_llm.models.base import CausalLM

from . import affine
from .destination import refusal
from .plan import MX_NAMES, ST_DTYPES, Plan, PlannedTensor, plan_quantized, quantizable_paths, source_dtype_of
from .recipes import Recipe, check_rules_match, layer_of, make_recipe
from .writer import MAX_SHARD_BYTES, AtomicFolder, ShardWriter, assign_shards

log = logging.getLogger(__name__)


class QuantizeError(EdgeLLMError):
    """A conversion that cannot be done: bad options, an existing output, a full disk."""


class Progress(Protocol):
    def start(self, tensors: int, nbytes: int) -> None: ...

    def advance(self, name: str, nbytes: int) -> None: ...


class _NoProgress:
    def start(self, tensors: int, nbytes: int) -> None:
        pass

    def advance(self, name: str, nbytes: int) -> None:
        pass


@dataclass(frozen=True)
class QuantizeJob:
    """What a conversion is about to do, known before its first tensor is written."""

    source: Path
    out: Path
    recipe: str  # e.g. "uniform, 4-bit, group 64"
    float_dtype: str  # of the unquantized tensors and the scales
    tensors: int
    source_bytes: int
    output_bytes: int


@dataclass(frozen=True)
class QuantizeResult:
    source: Path
    out: Path
    recipe: str
    source_bytes: int  # the source checkpoint's weight files
    output_bytes: int  # the output's weight files
    params: int
    tensors: int
    shards: int
    seconds: float
    peak_memory_bytes: int  # MLX's peak allocation during the conversion
    skipped_files: tuple[str, ...] = ()  # side files not copied: links to outside the source folder

    @property
    def bits_per_weight(self) -> float:
        return self.output_bytes * 8 / self.params if self.params else 0.0


def default_float_dtype(checkpoint: Checkpoint, bits: int, requested: str | None) -> str:
    """float16 for ``--bits 16``; for 4/8-bit the source's half dtype (float16 for float32 sources)."""
    if requested:
        if requested not in ("float16", "bfloat16"):
            raise ValueError(f"--dtype must be float16 or bfloat16, got {requested!r}")
        return requested
    if bits < 16 and checkpoint.dtype == "BF16":
        return "bfloat16"
    return "float16"


def _float_source(checkpoint: Checkpoint) -> Checkpoint:
    """What the conversion reads: the checkpoint with its tensors in float. Quantizing a quantized model
    compounds the error: say so instead, naming the format. (A quantized GGUF has a float view and is
    converted: its Q4_0/Q4_1/Q8_0/... tensors are copied exactly, see ``_recipe``.)"""
    source = checkpoint.dequantized()
    if source is None:
        q = checkpoint.quantization or {}
        raise CheckpointError(f"{checkpoint.path}: already quantized ({q.get('bits')}-bit, group "
                              f"{q.get('group_size')}); quantize the original float checkpoint instead")
    return source


def _recipe(checkpoint: Checkpoint, bits: int | None, group_size: int | None, recipe: str | None) -> Recipe:
    """Defaults: 4-bit, group 64. A quantized GGUF is re-quantized at llama.cpp's group of 32 (its grid: a
    4-bit GGUF re-quantized at group 64 loses accuracy that group 32 keeps) and, without ``--bits``, keeps
    its own quantization module by module (the commonest bits as default, rules for the rest, float
    matrices float), so its tensors are copied exactly; a user's recipe rules come first."""
    if not checkpoint.quantized:
        return make_recipe(4 if bits is None else bits, 64 if group_size is None else group_size, recipe)
    if bits is not None:
        return make_recipe(bits, GROUP_SIZE if group_size is None else group_size, recipe)
    bits_of = checkpoint.module_bits()
    default = commonest_bits(bits_of) or 16
    rules = [f"{module}={bits or 'float'}" for module, bits in bits_of.items() if bits != default]
    if recipe and recipe != "uniform":
        rules.insert(0, recipe)
    rec = make_recipe(default, GROUP_SIZE if group_size is None else group_size, ",".join(rules) or None)
    as_stored = not recipe and rec.group_size == GROUP_SIZE
    return dataclasses.replace(rec, name="as in the GGUF") if as_stored else rec


def _check_destination(source: Path | None, out: str | Path, force: bool) -> None:
    if why := refusal(source, out, force):
        raise QuantizeError(why)


def _groups(names: Iterable[str]) -> dict[int | None, list[str]]:
    groups: dict[int | None, list[str]] = {}
    for name in names:
        groups.setdefault(layer_of(name), []).append(name)
    return dict(sorted(groups.items(), key=lambda kv: -1 if kv[0] is None else kv[0]))


def _sanitize(model: CausalLM, weights: dict[str, mx.array], names: list[str]) -> dict[str, mx.array]:
    return model.sanitize({k: weights[k] for k in names})


def _check_tensor(checkpoint: Checkpoint, name: str, array: mx.array, expected: tuple[int, ...]) -> None:
    if tuple(array.shape) != expected:
        raise CheckpointError(f"{checkpoint.path}: tensor {name!r} has shape {tuple(array.shape)}, "
                              f"config implies {expected}")
    if not mx.issubdtype(array.dtype, mx.floating):
        raise CheckpointError(f"{checkpoint.path}: tensor {name!r} is {array.dtype}, expected float weights")


def _schedule(model: CausalLM, checkpoint: Checkpoint, weights: dict[str, mx.array],
              plan: Plan) -> list[tuple[list[str], list[str]]]:
    """Source groups and the parameters each produces, checked lazily (no data read).

    Sanitizing layer by layer is what keeps memory flat; every architecture's ``sanitize`` works on
    one layer's tensors. Should one not (its outputs differ from the whole-model result), all tensors
    form a single group: slower on memory, still correct.
    """
    expected = {t.param for t in plan.tensors if t.kind in ("float", "packed")}
    shapes = {name: p.shape for name, p in _param_shapes(model).items()}
    schedule, produced = [], set()
    groups = _groups(weights)
    for names in groups.values():
        out = [k for k in _sanitize(model, weights, names) if k in expected]
        if produced.intersection(out):
            break
        produced.update(out)
        schedule.append((names, sorted(out)))
    if produced != expected:
        log.info("%s: sanitize needs the whole model at once; converting in one group", checkpoint.path)
        schedule = [(list(weights), sorted(set(_sanitize(model, weights, list(weights))) & expected))]
    missing = sorted(expected - {k for _, out in schedule for k in out})
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"{checkpoint.path}: checkpoint lacks tensor {missing[0]!r}{more}; re-download it")
    for names, out in schedule:
        arrays = _sanitize(model, weights, names)
        for k in out:
            _check_tensor(checkpoint, k, arrays[k], shapes[k])
    return schedule


def _param_shapes(model: CausalLM) -> dict[str, Any]:
    return dict(tree_flatten(model.parameters()))


def _finite(checkpoint: Checkpoint, name: str, array: mx.array, what: str) -> None:
    if not bool(mx.isfinite(array).all().item()):
        raise CheckpointError(f"{checkpoint.path}: tensor {name!r} {what}; the checkpoint is corrupt or "
                              "needs a wider dtype (try --dtype bfloat16)")


def _copy_packed(tensors: list[PlannedTensor], packed: tuple[mx.array, mx.array, mx.array] | None,
                 writer: ShardWriter) -> int | None:
    """Writes a source tensor already in the planned affine form (a GGUF's Q4_0/Q4_1/Q8_0/...) as it is,
    scales and offsets in the planned dtype; None when there is none or its bits or group differ."""
    if packed is None or tensors[0].kind != "packed":
        return None
    w, scales, biases = packed
    spec = tensors[0].spec
    if tuple(w.shape) != tensors[0].shape or tuple(scales.shape) != tensors[1].shape or spec.group_size != GROUP_SIZE:
        return None
    dtype = DTYPE_NAMES[MX_NAMES[tensors[1].dtype]]
    return sum(writer.write(t.name, a) for t, a in zip(tensors, (w, scales.astype(dtype), biases.astype(dtype)),
                                                       strict=True))


def _convert(checkpoint: Checkpoint, name: str, w: mx.array, tensors: list[PlannedTensor], writer: ShardWriter,
             original: tuple[mx.array, mx.array, mx.array] | None = None) -> int:
    copied = _copy_packed(tensors, original, writer)
    if copied is not None:
        return copied
    mx.eval(w)
    _finite(checkpoint, name, w, "holds NaN or infinite values")
    first = tensors[0]
    if first.kind == "float":
        out = w.astype(DTYPE_NAMES[MX_NAMES[first.dtype]])
        _finite(checkpoint, name, out, f"overflows {MX_NAMES[first.dtype]}")
        return writer.write(first.name, out)
    spec, scales_dtype = first.spec, DTYPE_NAMES[MX_NAMES[tensors[1].dtype]]
    packed, scales, biases = affine.quantize(w, spec.group_size, spec.bits, scales_dtype)
    _finite(checkpoint, name, scales, f"has quantization scales that overflow {scales_dtype}")
    _finite(checkpoint, name, biases, f"has quantization offsets that overflow {scales_dtype}")
    return sum(writer.write(t.name, a) for t, a in zip(tensors, (packed, scales, biases), strict=True))


def output_config(raw: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """The source config with the quantization block, the output dtype and old-style rope keys
    (mlx-lm 0.32 reads only ``rope_theta``/``rope_scaling``; transformers 5 wrote ``rope_parameters``)."""
    config = dict(raw)
    norm = normalize_config(raw)
    for key in ("rope_theta", "rope_scaling", "num_experts", "num_local_experts"):
        if key in norm:
            config[key] = norm[key]
    config.pop("quantization", None)
    config.pop("quantization_config", None)  # e.g. the FP8 source's: the output is dequantized
    dtype = MX_NAMES[plan.float_dtype]
    config["torch_dtype"] = dtype
    if "dtype" in config:
        config["dtype"] = dtype
    if plan.quantization:
        config["quantization"] = dict(plan.quantization)
        config["quantization_config"] = dict(plan.quantization)
    return config


def _check_space(out: Path, needed: int) -> None:
    """Refuses up front a destination that is read-only or lacks the space the plan needs."""
    probe = out.parent
    while not probe.exists():
        probe = probe.parent
    if probe.is_dir() and not os.access(probe, os.W_OK):
        raise QuantizeError(f"{out}: cannot write there ({probe} is not writable); choose another -o")
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise QuantizeError(f"{out}: needs {_size(needed)} but only {_size(free)} is free on that disk; "
                            "free some space or choose another -o")


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _disk_error(out: Path, e: OSError) -> EdgeLLMError | OSError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return QuantizeError(f"{out}: {e.strerror.lower()} while writing; nothing was written (free some space or "
                             "choose another -o)")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return QuantizeError(f"{out}: cannot write there ({e.strerror.lower()}); choose another -o")
    temporary = Path(e.filename or "").name.startswith((f".{out.name}.partial-", f".{out.name}.old-"))
    if e.errno == errno.ENAMETOOLONG and temporary:
        return QuantizeError(f"{out}: name too long for the temporary folder written beside it first "
                             f"(.{out.name}.partial-XXXXXXXX); choose a shorter -o")
    if temporary or f"/.{out.name}.partial-" in str(e.filename or ""):  # name the user's OUT, not our scratch copy
        return QuantizeError(f"{out}: {(e.strerror or str(e)).lower()} while writing; nothing was written")
    return e


def quantize(source: str | Path, out: str | Path, bits: int | None = None, group_size: int | None = None,
             dtype: str | None = None,
             recipe: str | None = None, force: bool = False, progress: Progress | None = None,
             max_shard_bytes: int | None = None, announce: Callable[[QuantizeJob], None] | None = None,
             ) -> QuantizeResult:
    """Converts the checkpoint ``source`` into ``out``: ``bits`` 2..8 (MLX affine) or 16 (float16/bfloat16);
    by default 4-bit at group 64, or for a quantized GGUF its own quantization (``_recipe``).

    ``out`` appears complete or not at all. Raises CheckpointError for unreadable or already quantized
    input, QuantizeError for an existing ``out`` (unless ``force``) or a full destination. ``announce`` hears
    what will be done once it is planned and checked, before anything is written.
    """
    started = time.perf_counter()
    progress = progress or _NoProgress()
    _check_destination(None, out, force)  # before a pull
    out = Path(out).expanduser()
    folder = resolve_model(source)
    checkpoint = open_checkpoint(folder)
    float_source = _float_source(checkpoint)  # a quantized GGUF: float16 values, the packed originals kept
    _check_destination(folder, out, force)
    source_total = sum(t.nbytes for t in checkpoint.tensors.values())
    rec = _recipe(checkpoint, bits, group_size, recipe)
    checkpoint = float_source
    float_dtype = default_float_dtype(checkpoint, rec.bits, dtype)
    model = build_model(checkpoint)
    check_rules_match(recipe, quantizable_paths(model))
    plan = plan_quantized(model, checkpoint.config, rec, ST_DTYPES[float_dtype], source_dtype_of(checkpoint))
    weights, packed = checkpoint.load_float_weights()  # packed: a quantized GGUF's original tensors, by module
    weights = dequantize_fp8(weights, checkpoint)
    if any(t.dtype.startswith("F8") for t in checkpoint.tensors.values()):
        # dequantized FP8 arrives as float32: going straight to the output's half dtype halves the memory of
        # a layer group (stacked experts) and rounds once, as a direct conversion would
        half = DTYPE_NAMES[float_dtype]
        weights = {k: v.astype(half) if v.dtype == mx.float32 and checkpoint.tensors[k].dtype.startswith("F8")
                   else v for k, v in weights.items()}
    schedule = _schedule(model, checkpoint, weights, plan)
    by_param: dict[str, list[PlannedTensor]] = {}
    for t in plan.tensors:
        by_param.setdefault(t.param, []).append(t)
    ordered = [t for _, params in schedule for p in params for t in by_param[p]]
    shards = assign_shards(ordered, max_shard_bytes or MAX_SHARD_BYTES)
    side = checkpoint.side_files()
    _check_space(out, plan.nbytes + side.nbytes + (64 << 10))  # + headers, index and config
    if announce is not None:
        announce(QuantizeJob(folder, out, rec.describe(), float_dtype, len(ordered), source_total, plan.nbytes))
    mx.reset_peak_memory()
    try:
        with AtomicFolder(out, force) as tmp:
            writer = ShardWriter(tmp, shards)
            try:
                progress.start(len(ordered), sum(t.nbytes for t in ordered))
                for names, params in schedule:
                    # The group's source arrays leave ``weights``: once a tensor is converted nothing refers
                    # to it (or to the per-expert sources of a stacked one) and its memory is freed.
                    arrays = model.sanitize({k: weights.pop(k) for k in names})
                    for name in params:
                        w = arrays.pop(name)
                        written = _convert(checkpoint, name, w, by_param[name], writer,
                                           packed.get(name.rsplit(".", 1)[0]))
                        del w
                        progress.advance(name, written)
                    del arrays
                writer.close()
            except BaseException:
                writer.close(complete=False)
                raise
            writer.write_index(plan.params_total)
            try:
                side.write(tmp)  # a GGUF's are rebuilt from its metadata
            except TokenizerError as e:  # a weights-only GGUF: the output has no tokenizer either
                log.warning("%s", e)
            (tmp / "config.json").write_text(json.dumps(output_config(checkpoint.hf_config(), plan), indent=2) + "\n")
            for name in writer.names:  # read back what a loader will see
                read_safetensors_header(tmp / name)
    except OSError as e:
        raise _disk_error(out, e) from None
    return QuantizeResult(
        source=folder, out=out, recipe=rec.describe(), source_bytes=source_total,
        output_bytes=plan.nbytes, params=plan.params_total, tensors=len(ordered), shards=len(shards),
        seconds=time.perf_counter() - started, peak_memory_bytes=int(mx.get_peak_memory()),
        skipped_files=tuple(name for name, _ in side.skipped),
    )
