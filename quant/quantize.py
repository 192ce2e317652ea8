"""Checkpoint -> quantized (or FP16/BF16) checkpoint, streamed one tensor group at a time, atomically.

Reading goes through the runtime's own reader (``edge_llm.formats.checkpoint`` + the architecture's ``sanitize``,
FP8 dequantization included), so anything ``edge-llm run`` loads can be converted, and the output uses
the post-sanitize names the loader and mlx-lm (``mlx_lm.load``) expect. Source tensors are grouped by
decoder layer; each group is sanitized and evaluated on its own, and every output tensor goes straight
to its place in a pre-planned shard (``writer.ShardWriter``), so peak memory follows the largest layer
(or tensor), not the model. config.json gains the ``"quantization"`` block in the MLX community format
(and its ``"quantization_config"`` copy, as mlx-lm writes), with old-style rope keys mlx-lm reads.

Three steps: ``plan_conversion`` resolves the source, checks the options and the destination and plans
every output tensor and its shard (nothing is read or written yet); ``convert`` streams the tensors into
the shards (``convert.convert_tensor``); ``finalize`` adds the index, the side files and config.json and
reads back what a loader will see. All of it lands in a temporary folder renamed onto OUT at the end.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import mlx.core as mx

from edge_llm.errors import CheckpointError, TokenizerError
from edge_llm.formats.checkpoint import Checkpoint, PackedTensor, SideFiles, commonest_bits
from edge_llm.formats.folder import normalize_config
from edge_llm.formats.fp8 import dequantize_fp8
from edge_llm.formats.open import open_checkpoint
from edge_llm.formats.safetensors_header import read_safetensors_header
from edge_llm.hub.resolve import resolve_model
from edge_llm.loader import build_model
from edge_llm.machine.backend import DTYPE_NAMES
from edge_llm.models.base import CausalLM

from .calibrate import Calibration, calibration_input, convert_calibrated, read_text
from .convert import convert_tensor
from .destination import QuantizeError, check_destination, check_space, disk_error
from .plan import MX_NAMES, ST_DTYPES, Plan, PlannedTensor, plan_quantized, quantizable_paths, source_dtype_of
from .recipes import Recipe, check_rules_match, make_recipe
from .schedule import schedule
from .writer import MAX_SHARD_BYTES, AtomicFolder, ShardWriter, assign_shards

__all__ = ["Progress", "QuantizeError", "QuantizeJob", "QuantizeResult", "output_config", "quantize"]

log = logging.getLogger(__name__)
HEADROOM = 64 << 10  # what a converted folder takes besides its tensors: shard headers, index, config.json


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
    calibration: Calibration | None = None  # what ``--calibrate`` did

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
    compounds the error: say so instead, naming the format. (A format with a float view of its quantized
    tensors, a GGUF's, is converted: its tensors are copied exactly where the recipe keeps their form, see
    ``_recipe``.)"""
    source = checkpoint.dequantized()
    if source is None:
        q = checkpoint.quantization or {}
        raise CheckpointError(f"{checkpoint.path}: already quantized ({q.get('bits')}-bit, group "
                              f"{q.get('group_size')}); quantize the original float checkpoint instead")
    return source


def _recipe(checkpoint: Checkpoint, bits: int | None, group_size: int | None, recipe: str | None) -> Recipe:
    """Defaults: 4-bit, group 64. A quantized source is re-quantized at its own group size (its grid: a
    4-bit GGUF, group 32, re-quantized at group 64 loses accuracy that group 32 keeps) and, without
    ``--bits``, keeps its own quantization module by module (the commonest bits as default, rules for the
    rest, float matrices float), so its tensors are copied exactly; a user's recipe rules come first."""
    if not checkpoint.quantized:
        return make_recipe(4 if bits is None else bits, 64 if group_size is None else group_size, recipe)
    own_group = checkpoint.quantized_group_size
    group = own_group if group_size is None else group_size
    if bits is not None:
        return make_recipe(bits, group, recipe)
    bits_of = checkpoint.module_bits()
    default = commonest_bits(bits_of) or 16
    rules = [f"{module}={bits or 'float'}" for module, bits in bits_of.items() if bits != default]
    if recipe and recipe != "uniform":
        rules.insert(0, recipe)
    rec = make_recipe(default, group, ",".join(rules) or None)
    as_stored = not recipe and rec.group_size == own_group
    return dataclasses.replace(rec, name=f"as in the {checkpoint.format_name}") if as_stored else rec


def _float_weights(checkpoint: Checkpoint, float_dtype: str) -> tuple[dict[str, mx.array], dict[str, PackedTensor]]:
    """The source's weights in float, lazily, and the packed originals of a quantized source by module.

    FP8 weights dequantize to float32: going straight to the output's half dtype halves the memory of a
    layer group (stacked experts) and rounds once, as a direct conversion would."""
    weights, packed = checkpoint.load_float_weights()
    weights = dequantize_fp8(weights, checkpoint)
    fp8 = {name for name, t in checkpoint.tensors.items() if t.dtype.startswith("F8")}
    if fp8:
        half = DTYPE_NAMES[float_dtype]
        weights = {k: v.astype(half) if k in fp8 and v.dtype == mx.float32 else v for k, v in weights.items()}
    return weights, packed


def output_config(raw: dict[str, Any], plan: Plan, calibration: dict[str, Any] | None = None) -> dict[str, Any]:
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
    if calibration:  # beside the block, not in it: readers take every object there for a module's settings
        config["quantization_calibration"] = calibration
    return config


@dataclass
class Conversion:
    """A planned conversion: the source, what every output tensor will be and where, in write order."""

    folder: Path  # the source as found (a folder or a GGUF file)
    out: Path
    source: Checkpoint  # its float view, which the tensors are read from
    source_bytes: int  # the source's weight files
    recipe: str
    float_dtype: str
    model: CausalLM  # the module tree, never evaluated: its sanitize and shapes
    plan: Plan
    weights: dict[str, mx.array]  # lazily read; each group leaves it as it is converted
    packed: dict[str, PackedTensor]  # a quantized source's tensors by module, copied where the plan keeps them
    groups: list[tuple[list[str], list[str]]]  # source tensors -> the parameters they make (``schedule``)
    outputs: dict[str, list[PlannedTensor]]  # by parameter
    shards: list[list[PlannedTensor]]
    side: SideFiles
    calibration: dict[str, Any] | None = None  # recorded in config.json (``output_config``)

    @property
    def tensors(self) -> int:
        return sum(len(shard) for shard in self.shards)

    def job(self) -> QuantizeJob:
        return QuantizeJob(source=self.folder, out=self.out, recipe=self.recipe, float_dtype=self.float_dtype,
                           tensors=self.tensors, source_bytes=self.source_bytes, output_bytes=self.plan.nbytes)


def plan_conversion(source: str | Path, out: str | Path, bits: int | None = None, group_size: int | None = None,
                    dtype: str | None = None, recipe: str | None = None, force: bool = False,
                    max_shard_bytes: int | None = None) -> Conversion:
    """Step 1: finds and checks the source, the options and the destination and plans every output tensor;
    reads headers only (and pulls a Hub model that is not cached)."""
    check_destination(None, out, force)  # before a pull
    out = Path(out).expanduser()
    folder = resolve_model(source)
    checkpoint = open_checkpoint(folder)
    float_source = _float_source(checkpoint)  # a quantized GGUF: float16 values, the packed originals kept
    check_destination(folder, out, force)
    rec = _recipe(checkpoint, bits, group_size, recipe)
    float_dtype = default_float_dtype(float_source, rec.bits, dtype)
    model = build_model(float_source)
    check_rules_match(recipe, quantizable_paths(model))
    plan = plan_quantized(model, rec, ST_DTYPES[float_dtype], source_dtype_of(float_source))
    weights, packed = _float_weights(float_source, float_dtype)
    groups = schedule(model, float_source, weights, plan)
    outputs: dict[str, list[PlannedTensor]] = {}
    for t in plan.tensors:
        outputs.setdefault(t.param, []).append(t)
    ordered = [t for _, params in groups for p in params for t in outputs[p]]
    side = float_source.side_files()
    check_space(out, plan.nbytes + side.nbytes + HEADROOM)
    return Conversion(
        folder=folder, out=out, source=float_source,
        source_bytes=sum(t.nbytes for t in checkpoint.tensors.values()), recipe=rec.describe(),
        float_dtype=float_dtype, model=model, plan=plan, weights=weights, packed=packed, groups=groups,
        outputs=outputs, shards=assign_shards(ordered, max_shard_bytes or MAX_SHARD_BYTES), side=side,
    )


def convert(conversion: Conversion, folder: Path, progress: Progress) -> ShardWriter:
    """Step 2: every planned tensor into its shard in ``folder``, one source group at a time."""
    c = conversion
    writer = ShardWriter(folder, c.shards)
    try:
        progress.start(len(c.outputs), c.plan.nbytes)  # one advance per parameter (its codes, scales, offsets)
        for names, params in c.groups:
            # The group's source arrays leave ``weights``: once a tensor is converted nothing refers to it (or
            # to the per-expert sources of a stacked one) and its memory is freed.
            arrays = c.model.sanitize({k: c.weights.pop(k) for k in names})
            for name in params:
                w = arrays.pop(name)
                written = convert_tensor(c.source.path, name, w, c.outputs[name], writer,
                                         c.packed.get(name.rsplit(".", 1)[0]))
                del w
                progress.advance(name, written)
            del arrays
        writer.close()
    except BaseException:
        writer.close(complete=False)
        raise
    return writer


def finalize(conversion: Conversion, folder: Path, writer: ShardWriter) -> None:
    """Step 3: the shard index, the side files (tokenizer, ...) and config.json; then every shard's header
    read back as a loader will."""
    writer.write_index(conversion.plan.params_total)
    try:
        conversion.side.write(folder)  # a GGUF's are rebuilt from its metadata
    except TokenizerError as e:  # a weights-only GGUF: the output has no tokenizer either
        log.warning("%s", e)
    config = output_config(conversion.source.hf_config(), conversion.plan, conversion.calibration)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in writer.names:
        read_safetensors_header(folder / name)


def quantize(source: str | Path, out: str | Path, bits: int | None = None, group_size: int | None = None,
             dtype: str | None = None, recipe: str | None = None, force: bool = False,
             progress: Progress | None = None, max_shard_bytes: int | None = None,
             announce: Callable[[QuantizeJob], None] | None = None,
             calibrate: bool | str | Path | None = None) -> QuantizeResult:
    """Converts the checkpoint ``source`` into ``out``: ``bits`` 2..8 (MLX affine) or 16 (float16/bfloat16);
    by default 4-bit at group 64, or for a quantized GGUF its own quantization (``_recipe``).

    ``out`` appears complete or not at all. Raises CheckpointError for unreadable or already quantized
    input, QuantizeError for an existing ``out`` (unless ``force``) or a full destination. ``announce`` hears
    what will be done once it is planned and checked, before anything is written. ``calibrate`` (True: the
    built-in text, or a text file's path) rounds with GPTQ on the model's activations (``quant.calibrate``).
    """
    started = time.perf_counter()
    text = None if calibrate is None or calibrate is False else read_text(None if calibrate is True else calibrate)
    conversion = plan_conversion(source, out, bits, group_size, dtype, recipe, force, max_shard_bytes)
    calibrating = None if text is None else calibration_input(conversion, text)  # checked before any write
    calibration = None
    if announce is not None:
        announce(conversion.job())
    mx.reset_peak_memory()
    try:
        with AtomicFolder(conversion.out, force) as tmp:
            if calibrating is None:
                writer = convert(conversion, tmp, progress or _NoProgress())
            else:
                writer, calibration = convert_calibrated(conversion, tmp, progress or _NoProgress(), calibrating)
                conversion.calibration = calibration.as_config()
            finalize(conversion, tmp, writer)
    except OSError as e:
        raise disk_error(conversion.out, e) from None
    return QuantizeResult(
        source=conversion.folder, out=conversion.out, recipe=conversion.recipe,
        source_bytes=conversion.source_bytes, output_bytes=conversion.plan.nbytes,
        params=conversion.plan.params_total, tensors=conversion.tensors, shards=len(conversion.shards),
        seconds=time.perf_counter() - started, peak_memory_bytes=int(mx.get_peak_memory()),
        skipped_files=tuple(name for name, _ in conversion.side.skipped), calibration=calibration,
    )
