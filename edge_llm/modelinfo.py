"""What a checkpoint is, from its config and tensor headers alone (no weights read): the parameters the files
hold, and the model's shape as the model interface (``models.base.CausalLM``) gives it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError
from .formats.checkpoint import Checkpoint
from .models import build


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    model_type: str
    architecture: str
    params_total: int
    params_active: int  # per token: differs from the total for Mixture-of-Experts models
    dtype: str
    quantization: str | None  # e.g. "4-bit affine, group 64"
    context_length: int | None
    size_bytes: int
    num_layers: int | None
    experts: tuple[int, int] | None  # (routed experts per token, experts per layer)


def tensor_parameters(checkpoint: Checkpoint, name: str) -> int:
    """Logical parameter count of one tensor; packed quantized weights count their unpacked size."""
    info = checkpoint.tensors[name]
    if name.endswith((".scales", ".biases")) and checkpoint.quantization:
        module = name.rsplit(".", 1)[0]
        if f"{module}.weight" in checkpoint.tensors and checkpoint.quantized_bits(module):
            return 0  # quantization metadata, not parameters
    if name.endswith(".weight"):
        bits = checkpoint.quantized_bits(name[: -len(".weight")])
        if bits:
            return info.size * 32 // bits
    return info.size


def is_expert_tensor(name: str) -> bool:
    return ".experts." in name or ".switch_mlp." in name or "block_sparse_moe.experts" in name


def describe(checkpoint: Checkpoint) -> ModelInfo:
    cfg = checkpoint.config
    try:
        model = build(checkpoint.model_type, cfg)  # its shape only: the weights are never evaluated
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{checkpoint.config_path}: {e}") from None
    counts = model.experts
    total = active = experts = 0
    for name in checkpoint.tensors:
        n = tensor_parameters(checkpoint, name)
        total += n
        if counts and is_expert_tensor(name) and "shared_expert" not in name:
            experts += n
        else:
            active += n
    # Routed experts: only ``active`` of ``routed`` run for each token. Scaled once over the sum, not per
    # tensor: a per-expert tensor's share (e.g. 4/60 of it) is rarely a whole number.
    active += experts * counts.active // counts.routed if experts else 0
    quant = checkpoint.describe_quantization()  # a GGUF file also says what it holds, in llama.cpp's names
    architectures = cfg.get("architectures") or [checkpoint.model_type]
    return ModelInfo(
        path=checkpoint.path,
        model_type=checkpoint.model_type,
        architecture=architectures[0],
        params_total=total,
        params_active=active,
        dtype=checkpoint.dtype,
        quantization=quant,
        context_length=model.context_length,
        size_bytes=checkpoint.nbytes,
        num_layers=len(model.layers),
        experts=(counts.active, counts.routed) if counts else None,
    )
