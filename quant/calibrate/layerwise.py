"""A calibrated conversion, one decoder layer at a time, as GPTQ runs: memory holds one layer plus activations.

The calibration tokens enter through the float embedding. For each decoder layer in turn: its float weights
go into the module tree (in float32), the layer runs on the current activations while recorders
(``capture``) collect what each linear layer reads, every planned matrix is rounded by GPTQ against those
inputs, the tensors are written to their shards, and the layer runs again with its quantized (dequantized)
weights to make the next layer's input: each layer is calibrated on what the quantized model will feed it.
At the end the output head (the embedding table when tied) is calibrated on the final norm's output.

Routed experts are calibrated one by one on the tokens the router sent them; an expert with fewer than
``MIN_EXPERT_TOKENS`` rows falls back to the default ``affine.quantize`` (too few rows would fit the error
to a handful of tokens), and ``Calibration.experts_fallback`` counts them. Everything GPTQ does not touch
(norms, biases, the untied embedding, a quantized source's tensors copied as they are) takes the default path,
``convert.convert_tensor``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from edge_llm.errors import CheckpointError

from .. import affine
from ..convert import convert_tensor
from ..destination import QuantizeError
from ..plan import MX_NAMES, PlannedTensor
from ..recipes import layer_of
from ..writer import ShardWriter
from .capture import ExpertInputs, Record, capture, shared_inputs
from .gptq import DAMP, gptq
from .text import CalibrationText, calibration_tokens

METHOD = "gptq"
MIN_EXPERT_TOKENS = 32
# A tied embedding table is also the input lookup, whose error GPTQ does not see: a hundred times the damping
# keeps its rows closer to the weights (SmolLM2 4-bit g64: at the default 0.01 KL 0.143 but the capital of France
# goes wrong; at 1.0 KL 0.147 and the everyday answers of the float model; benchmarks/RESULTS.md)
TIED_DAMP = 1.0


@dataclass
class Calibration:
    """What a calibrated conversion did, for the summary and config.json."""

    text: str  # "built-in" or the user's path
    tokens: int
    method: str = METHOD
    matrices: int = 0  # weight matrices (each routed expert's counted once) rounded by GPTQ
    experts_calibrated: int = 0  # (layer, expert) pairs calibrated on their routed tokens
    experts_fallback: int = 0  # (layer, expert) pairs that saw too few tokens: default quantization
    fallback_layers: list[int] = field(default_factory=list)

    def as_config(self) -> dict:
        config = {"method": self.method, "text": self.text, "tokens": self.tokens}
        if self.experts_calibrated or self.experts_fallback:
            config.update(experts_calibrated=self.experts_calibrated, experts_fallback=self.experts_fallback,
                          min_expert_tokens=MIN_EXPERT_TOKENS)
        return config


def _float32(a: mx.array) -> mx.array:
    return a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a


def _scales_dtype(tensors: list[PlannedTensor]) -> mx.Dtype:
    return getattr(mx, MX_NAMES[tensors[1].dtype])


class _Job:
    """One calibrated conversion: the conversion's plan, the writer, the progress and the running summary."""

    def __init__(self, conversion, writer: ShardWriter, progress, calibration: Calibration):
        self.c, self.writer, self.progress, self.calibration = conversion, writer, progress, calibration

    def calibrated(self, name: str) -> bool:
        """Whether GPTQ makes parameter ``name``: a planned quantized weight with no packed original to copy."""
        tensors = self.c.outputs[name]
        return tensors[0].kind == "packed" and self.c.packed.get(name.rsplit(".", 1)[0]) is None

    def write_default(self, name: str, w: mx.array) -> None:
        written = convert_tensor(self.c.source.path, name, w, self.c.outputs[name], self.writer,
                                 self.c.packed.get(name.rsplit(".", 1)[0]))
        self.progress.advance(name, written)

    def write_quantized(self, name: str, parts: tuple[mx.array, mx.array, mx.array]) -> None:
        tensors = self.c.outputs[name]
        for part, what in zip(parts[1:], ("scales", "offsets"), strict=True):
            if not bool(mx.isfinite(part).all().item()):
                raise CheckpointError(f"{self.c.source.path}: tensor {name!r} has quantization {what} that overflow "
                                      f"{MX_NAMES[tensors[1].dtype]} (try --dtype bfloat16)")
        written = sum(self.writer.write(t.name, a) for t, a in zip(tensors, parts, strict=True))
        self.progress.advance(name, written)

    def spec(self, name: str) -> tuple[int, int, mx.Dtype]:
        tensors = self.c.outputs[name]
        return tensors[0].spec.group_size, tensors[0].spec.bits, _scales_dtype(tensors)

    def check_finite(self, name: str, w: mx.array) -> None:
        if not bool(mx.isfinite(w).all().item()):
            raise CheckpointError(f"{self.c.source.path}: tensor {name!r} holds NaN or infinite values; the "
                                  "checkpoint is corrupt")

    # --- GPTQ over one group of matrices that read the same input -----------------------------------------

    def dense(self, names: list[str], weights: dict[str, mx.array], h: np.ndarray, count: bool = True,
              damp: float = DAMP) -> dict[str, tuple]:
        """Matrices reading the same input: rows stacked and rounded in one GPTQ sweep per quantization spec."""
        out = {}
        for spec in dict.fromkeys(self.spec(n) for n in names):
            same = [n for n in names if self.spec(n) == spec]
            stacked = mx.concatenate([weights[n] for n in same]) if len(same) > 1 else weights[same[0]]
            packed, scales, biases = gptq(stacked, h, *spec, damp=damp)
            start = 0
            for n in same:
                rows = weights[n].shape[0]
                out[n] = (packed[start : start + rows], scales[start : start + rows], biases[start : start + rows])
                start += rows
            self.calibration.matrices += len(same) if count else 0
        return out

    def experts(self, names: list[str], weights: dict[str, mx.array], record: Record
                ) -> tuple[dict[str, tuple], np.ndarray]:
        """Stacked experts ``[E, out, in]``: each expert's slices by GPTQ on its own tokens, or the default path;
        and the tokens each expert saw."""
        num_experts = weights[names[0]].shape[0]
        counts = record.tokens_per_expert(num_experts)
        per_expert: dict[str, list[tuple]] = {n: [] for n in names}
        for e in range(num_experts):
            if counts[e] >= MIN_EXPERT_TOKENS:
                h = record.expert_hessian(e)
                parts = self.dense(names, {n: weights[n][e] for n in names}, h, count=False)
            else:
                parts = {n: affine.quantize(weights[n][e], *self.spec(n)) for n in names}
            for n in names:
                per_expert[n].append(parts[n])
        self.calibration.matrices += len(names)
        return {n: tuple(mx.stack([p[i] for p in per_expert[n]]) for i in range(3)) for n in names}, counts


def _expert_counts_summary(job: _Job, layer: int, counts: np.ndarray, seen: set[int]) -> None:
    if layer in seen:
        return
    seen.add(layer)
    low = int((counts < MIN_EXPERT_TOKENS).sum())
    job.calibration.experts_calibrated += len(counts) - low
    job.calibration.experts_fallback += low
    if low:
        job.calibration.fallback_layers.append(layer)


def _calibrate_layer(job: _Job, index: int, arrays: dict[str, mx.array], stream: list[mx.array],
                     expert_layers: set[int]) -> list[mx.array]:
    """Calibrates and writes decoder layer ``index`` from its float ``arrays``; returns its quantized output."""
    layer = job.c.model.layers[index]
    prefix = f"model.layers.{index}."
    saved = tree_flatten(layer.parameters())
    layer.load_weights([(k.removeprefix(prefix), _float32(v)) for k, v in arrays.items()], strict=False)
    targets = [k for k in arrays if job.calibrated(k)]
    weights = {}
    for name in targets:
        job.check_finite(name, arrays[name])
        weights[name] = arrays[name].astype(mx.float32)
    paths = [k.removeprefix(prefix).removesuffix(".weight") for k in targets]
    with capture(layer, paths) as recorders:
        for x in stream:
            mx.eval(layer(x, None))
        groups = shared_inputs(recorders)
    made: dict[str, tuple] = {}
    for group in groups:
        names = [f"{prefix}{p}.weight" for p in group]
        record = recorders[group[0]].record
        if not record.inputs:  # never called on these tokens (a module the forward pass skips): default path
            continue
        if isinstance(recorders[group[0]], ExpertInputs):
            parts, counts = job.experts(names, weights, record)
            _expert_counts_summary(job, index, counts, expert_layers)
        else:
            parts = job.dense(names, weights, record.h)
        made.update(parts)
        for name in names:
            job.write_quantized(name, parts[name])
    for name in arrays:
        if name not in made:
            job.write_default(name, arrays[name])
    for name, (packed, scales, biases) in made.items():
        spec = job.spec(name)
        w = mx.dequantize(packed, scales, biases, group_size=spec[0], bits=spec[1]).astype(mx.float32)
        layer.load_weights([(name.removeprefix(prefix), w)], strict=False)
    out = [layer(x, None) for x in stream]
    mx.eval(out)
    layer.update(tree_unflatten(saved))  # the float32 copies go; the module tree holds nothing read again
    return out


def _embed(model, table: mx.array, sequences: list[mx.array]) -> list[mx.array]:
    """The calibration sequences through the float embedding: the first layer's input."""
    embed = model.model.embed_tokens
    saved = tree_flatten(embed.parameters())
    embed.load_weights([("weight", _float32(table))], strict=False)
    stream = [embed(s) for s in sequences]
    mx.eval(stream)
    embed.update(tree_unflatten(saved))
    return stream


def _finish(job: _Job, held: dict[str, mx.array], stream: list[mx.array]) -> None:
    """The final norm, the output head calibrated on the norm's output, and any other top-level tensor."""
    model = job.c.model
    head = "model.embed_tokens.weight" if model.tied_embeddings else "lm_head.weight"
    norm = model.model.norm
    norm.load_weights([("weight", _float32(held["model.norm.weight"]))], strict=False)
    gram = 0.0
    for x in stream:
        flat = np.array(norm(x).reshape(-1, x.shape[-1]).astype(mx.float32))
        gram = gram + (flat.T @ flat).astype(np.float64)
    for name, w in held.items():
        if name == head and job.calibrated(name):
            job.check_finite(name, w)
            damp = TIED_DAMP if model.tied_embeddings else DAMP
            job.write_quantized(name, job.dense([name], {name: w.astype(mx.float32)}, gram, damp=damp)[name])
        else:
            job.write_default(name, w)


@dataclass(frozen=True)
class CalibrationInput:
    text: CalibrationText
    sequences: list[mx.array]  # token ids, [1, L] each


def calibration_input(conversion, text: CalibrationText) -> CalibrationInput:
    """The tokens a planned conversion calibrates on, checked before anything is written: QuantizeError for a
    float conversion or a text too short."""
    if not conversion.plan.quantization:
        raise QuantizeError("--calibrate needs a quantized output (--bits 2..8), not a float conversion")
    return CalibrationInput(text, calibration_tokens(text, conversion.source.tokenizer()))


def convert_calibrated(conversion, folder: Path, progress, calibrating: CalibrationInput
                       ) -> tuple[ShardWriter, Calibration]:
    """``quantize.convert`` with GPTQ calibration: every planned tensor into its shard in ``folder``."""
    c, text, sequences = conversion, calibrating.text, calibrating.sequences
    calibration = Calibration(text=text.name, tokens=sum(s.size for s in sequences))
    writer = ShardWriter(folder, c.shards)
    job = _Job(c, writer, progress, calibration)
    try:
        progress.start(len(c.outputs), c.plan.nbytes)  # one advance per parameter, as quantize.convert
        held: dict[str, mx.array] = {}  # embedding, final norm, head: the stream's two ends
        pending: dict[int, dict[str, mx.array]] = {}
        stream: list[mx.array] | None = None
        expert_layers: set[int] = set()
        next_layer = 0
        for names, params in c.groups:
            arrays = c.model.sanitize({k: c.weights.pop(k) for k in names})
            for name in params:
                index = layer_of(name)
                (held if index is None else pending.setdefault(index, {}))[name] = arrays.pop(name)
            del arrays
            while next_layer in pending:
                if stream is None:
                    stream = _embed(c.model, held["model.embed_tokens.weight"], sequences)
                stream = _calibrate_layer(job, next_layer, pending.pop(next_layer), stream, expert_layers)
                next_layer += 1
        if pending:
            raise CheckpointError(f"{c.source.path}: decoder layer {next_layer} is missing; re-download the model")
        _finish(job, held, stream if stream is not None else [])
        writer.close()
    except BaseException:
        writer.close(complete=False)
        raise
    return writer, calibration
