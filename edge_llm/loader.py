"""Checkpoint -> ready model: pick the architecture, quantize modules the config says, load weights.

Loading reads the config, never the file name: a ``"quantization"`` block in the MLX community format
(``{"group_size": 64, "bits": 4, "<module path>": {...} | false}``) decides which modules become
``QuantizedLinear``/``QuantizedEmbedding``, exactly as mlx-lm reads it, so both read each other's files.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .errors import CheckpointError
from .experts.load import is_routed_expert, stream_experts
from .experts.policy import DEFAULT_POLICY
from .experts.provenance import recording
from .formats.checkpoint import Checkpoint
from .formats.fp8 import dequantize_fp8
from .formats.open import open_checkpoint
from .hub.resolve import resolve_model
from .machine.backend import Caster, dtype_policy
from .models import build
from .models.base import CausalLM
from .models.layers import FloatLinear, QuantizedEmbedding, QuantizedLinear
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)


def build_model(checkpoint: Checkpoint) -> CausalLM:
    """The module tree for a checkpoint's config, with random (unloaded) weights."""
    try:
        return build(checkpoint.model_type, checkpoint.config)
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{checkpoint.config_path}: {e}") from None


def quantize_modules(model: nn.Module, quantization: dict[str, Any], has_scales) -> None:
    """Turns the modules the quantization block names into quantized modules (weights not loaded).

    ``has_scales(path)`` says whether the checkpoint holds ``{path}.scales``; per-module entries in
    the block override the defaults (a dict of settings, or ``false`` to keep a module in float).
    """
    group_size, bits = quantization["group_size"], quantization["bits"]
    mode = quantization.get("mode", "affine")

    def predicate(path: str, module: nn.Module):
        if path in quantization:
            return quantization[path]
        return hasattr(module, "to_quantized") and has_scales(path)

    nn.quantize(model, group_size=group_size, bits=bits, mode=mode, class_predicate=predicate)
    # the same layers, with a faster CPU prefill (layers.QuantizedLinear) and lookup (layers.QuantizedEmbedding)
    swap = {name: QuantizedLinear.of(m) for name, m in model.named_modules() if type(m) is nn.QuantizedLinear}
    swap |= {name: QuantizedEmbedding.of(m) for name, m in model.named_modules() if type(m) is nn.QuantizedEmbedding}
    if swap:
        model.update_modules(tree_unflatten(list(swap.items())))


def use_float_linears(model: nn.Module) -> None:
    """Float linears become ``FloatLinear`` (same parameters): decoding multiplies them through the CPU kernels
    (a half-precision weight is no longer upcast to float32 for every product)."""
    swap = {name: FloatLinear.of(m) for name, m in model.named_modules() if type(m) is nn.Linear}
    if swap:
        model.update_modules(tree_unflatten(list(swap.items())))


def check_weights(checkpoint: Checkpoint, model: nn.Module, weights: dict[str, mx.array],
                  streamed: frozenset[str] = frozenset()) -> None:
    """Every parameter of ``model`` has a tensor of its shape (``streamed`` ones are the expert banks')."""
    expected = {k: v for k, v in tree_flatten(model.parameters()) if k not in streamed}
    missing = [k for k in expected if k not in weights]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(
            f"{checkpoint.path}: checkpoint lacks tensor {missing[0]!r}{more}; re-download or reconvert it"
        )
    for name, param in expected.items():
        if weights[name].shape != param.shape:
            raise CheckpointError(
                f"{checkpoint.path}: tensor {name!r} has shape {tuple(weights[name].shape)}, "
                f"config implies {tuple(param.shape)}"
            )
    extra = [k for k in weights if k not in expected]
    if extra:
        log.warning("%s: ignoring %d unused tensors (e.g. %s)", checkpoint.path, len(extra), extra[0])


def load_checkpoint(checkpoint: Checkpoint, dtype: str | None = None, expert_slots: int | None = None,
                    expert_policy: str = DEFAULT_POLICY, shard=None) -> CausalLM:
    """The model ready to run. ``expert_slots``: stream the routed experts of every MoE layer from the files
    through a bank of that many slots per layer (``edge_llm.experts``) instead of loading them; ``expert_policy``
    picks which expert leaves the bank for a miss (``experts.bank.POLICIES``). ``shard``
    (``distributed.load.ShardHooks``): only one rank's share of the model, the rest never read."""
    model = build_model(checkpoint)
    skip = is_routed_expert if expert_slots else None
    if shard is not None:
        shard.prune(model)
        skip = shard.skip
    try:
        with recording() as provenance:
            # FP8 checkpoints (DeepSeek-V3 format) are dequantized before the model sees them
            weights = model.sanitize(dequantize_fp8(checkpoint.load_weights(skip), checkpoint))
            if shard is not None:
                weights = shard.select(weights)
        if checkpoint.quantization:
            quantize_modules(model, checkpoint.quantization, lambda p: f"{p}.scales" in weights)
    except ValueError as e:  # tensors that do not fit the config's shapes, settings MLX cannot quantize with
        raise CheckpointError(f"{checkpoint.config_path}: {' '.join(str(e).split())[:300]}") from None
    policy = dtype_policy(checkpoint.dtype, dtype)
    caster = Caster(policy, model.keep_float32, model.tied_embeddings)
    streamed: frozenset[str] = frozenset()
    if expert_slots:
        streamed = stream_experts(checkpoint, model, weights, provenance, caster, expert_slots,
                                  expert_policy).parameters
    stored = {k: v.dtype for k, v in weights.items()}
    weights = caster.all(weights)
    check_weights(checkpoint, model, weights, streamed)
    # Converted tensors first, one at a time, largest first: each source copy is freed once its cast
    # exists, so loading peaks at the model plus one source tensor, not at both copies of everything.
    for v in sorted((v for k, v in weights.items() if v.dtype != stored[k]), key=lambda a: -a.nbytes):
        mx.eval(v)
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())
    use_float_linears(model)
    check_finite(checkpoint, model, skip=streamed)
    model.eval()
    return model


# float dtype -> (same-size unsigned type, magnitude mask, exponent of inf/NaN): a value is NaN or infinite
# exactly when its magnitude bits reach the all-ones exponent. Integer compares in numpy are ~10x faster
# than MLX's CPU isfinite on half floats.
_NONFINITE = {mx.float32: (mx.uint32, 0x7FFFFFFF, 0x7F800000), mx.float16: (mx.uint16, 0x7FFF, 0x7C00),
              mx.bfloat16: (mx.uint16, 0x7FFF, 0x7F80)}  # fmt: skip


def _all_finite(value: mx.array, block: int) -> bool:
    kind = _NONFINITE.get(value.dtype)
    if kind is None:
        return bool(mx.isfinite(value).all().item())
    bits, magnitude, exponent = kind
    raw = np.asarray(value.view(bits))
    raw = raw.reshape(1) if raw.ndim == 0 else raw
    rows = max(1, block // max(1, raw[0].size))
    return all(int((raw[i : i + rows] & magnitude).max()) < exponent for i in range(0, raw.shape[0], rows))


def check_finite(checkpoint: Checkpoint, model: nn.Module, block: int = 1 << 20,
                 skip: frozenset[str] = frozenset()) -> None:
    """Refuses weights holding NaN or infinity (a corrupt download or a broken conversion), which would
    only show as garbage text. One pass over the float parameters (quantized models: their scales and
    norms), ``block`` values at a time so the check's own transient stays small."""
    for name, value in tree_flatten(model.parameters()):
        if name in skip:  # a streamed expert bank: what it will hold is read later
            continue
        if mx.issubdtype(value.dtype, mx.floating) and value.size and not _all_finite(value, block):
            where = checkpoint.tensors[name].file if name in checkpoint.tensors else checkpoint.path
            raise CheckpointError(f"{where}: tensor {name!r} holds NaN or infinite values; the checkpoint is "
                                  "corrupt, re-download or re-convert it")  # fmt: skip


def load_model(path: str | Path, dtype: str | None = None) -> CausalLM:
    """Loads a local checkpoint folder; ``dtype`` ('float32', 'bfloat16', 'float16') overrides policy."""
    return load_checkpoint(open_checkpoint(path), dtype)


def load(ref: str | Path, dtype: str | None = None, expert_slots: int | None = None,
         expert_policy: str = DEFAULT_POLICY) -> tuple[CausalLM, Tokenizer]:
    """Resolves a model reference (folder, GGUF file or Hub repo id) and loads model and tokenizer;
    ``expert_slots`` streams a MoE's routed experts through banks of that many slots per layer."""
    folder = resolve_model(ref)
    checkpoint = open_checkpoint(folder)
    tokenizer = checkpoint.tokenizer()  # a folder's tokenizer files, or a GGUF file's metadata
    model = load_checkpoint(checkpoint, dtype, expert_slots, expert_policy)
    check_vocabulary(checkpoint, tokenizer)  # after the weights: their problems are the more basic ones
    return model, tokenizer


def check_vocabulary(checkpoint: Checkpoint, tokenizer: Tokenizer) -> None:
    """Every id the tokenizer can produce must have an embedding row: a token past the table would be
    gathered out of bounds (garbage at best; MLX does not check, and can crash)."""
    rows = checkpoint.config["vocab_size"]
    if tokenizer.id_limit > rows:
        raise CheckpointError(
            f"{checkpoint.config_path}: the tokenizer has token ids up to {tokenizer.id_limit - 1} but the model's "
            f"embedding has {rows} rows (vocab_size); the tokenizer files do not belong to these weights"
        )
