"""What a checkpoint is, from its config and tensor headers alone (no weights read)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .formats.checkpoint import Checkpoint


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
    total = active = experts = 0
    routed = cfg.get("num_experts_per_tok")
    n_experts = cfg.get("n_routed_experts") or cfg.get("num_local_experts") or cfg.get("num_experts")
    for name in checkpoint.tensors:
        n = tensor_parameters(checkpoint, name)
        total += n
        if routed and n_experts and is_expert_tensor(name) and "shared_expert" not in name:
            experts += n
        else:
            active += n
    # Routed experts: only ``routed`` of ``n_experts`` run for each token. Scaled once over the sum, not per
    # tensor: a per-expert tensor's share (e.g. 4/60 of it) is rarely a whole number.
    active += experts * routed // n_experts if experts else 0
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
        context_length=cfg.get("max_position_embeddings"),
        size_bytes=checkpoint.nbytes,
        num_layers=cfg.get("num_hidden_layers"),
        experts=(routed, n_experts) if routed and n_experts else None,
    )
