"""The softmax top-k Mixture-of-Experts block shared by Mixtral, Qwen2/3-MoE and OLMoE.

References: transformers ``MixtralTopKRouter`` / ``Qwen2MoeTopKRouter`` / ``OlmoeTopKRouter`` (router)
and mlx-lm ``models/mixtral.py`` (module layout). The router is an ``nn.Linear`` named ``gate`` as in
the checkpoints, so quantization recipes can keep it in float by path; experts are one ``SwitchGLU``
(``switch_mlp``) with stacked ``[E, out, in]`` weights, so a token only touches its k experts.

Mixtral's "softmax over the top-k logits" equals "softmax over all, keep top-k, renormalize" (the
shared denominator cancels), i.e. ``norm_topk_prob=True``; Qwen and OLMoE make it a config flag.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..experts.provenance import FusedHalf, Renamed, record
from .switch import SwitchGLU, stack_experts


def softmax_topk(logits: mx.array, k: int, norm_topk_prob: bool) -> tuple[mx.array, mx.array]:
    """Routes on router ``logits [..., E]``: returns (expert indices [..., k], weights [..., k]).

    Probabilities are computed in float32 (as transformers does) and cast back to the logits' dtype.
    The order of the k chosen experts is unspecified; only the set and the weights matter.
    """
    probs = mx.softmax(logits.astype(mx.float32), axis=-1)
    indices = mx.stop_gradient(mx.argpartition(-probs, kth=k - 1, axis=-1)[..., :k])
    weights = mx.take_along_axis(probs, indices, axis=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return indices, weights.astype(logits.dtype)


class SparseMoeBlock(nn.Module):
    """Router ``gate`` + stacked SwiGLU experts ``switch_mlp``: ``x [..., D] -> [..., D]``."""

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, top_k: int, norm_topk_prob: bool,
                 act: str = "silu"):
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"config field 'num_experts_per_tok': {top_k} must be in 1..{num_experts} (num_experts)")
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.switch_mlp = SwitchGLU(dim, hidden_dim, num_experts, act=act)

    def route(self, x: mx.array) -> tuple[mx.array, mx.array]:
        return softmax_topk(self.gate(x), self.top_k, self.norm_topk_prob)

    def __call__(self, x: mx.array) -> mx.array:
        indices, weights = self.route(x)
        y = self.switch_mlp(x, indices)  # [..., k, D]
        return (y * weights[..., None].astype(y.dtype)).sum(axis=-2)


def stack_moe_experts(weights: dict[str, mx.array], src: str, dst: str, num_experts: int,
                      names: dict[str, str]) -> None:
    """Brings one layer's experts at ``{src}.experts`` into ``{dst}.switch_mlp.{gate,up,down}_proj``.

    Accepts the two layouts real files use: per-expert tensors ``{src}.experts.{e}.{name}.weight``
    (Hub checkpoints; ``names`` maps each to ``gate_proj``/``up_proj``/``down_proj``; quantized
    ``scales``/``biases`` are stacked too), and transformers 5's fused in-memory layout
    ``{src}.experts.gate_up_proj [E, 2I, D]`` (gate rows first) + ``{src}.experts.down_proj [E, D, I]``.
    MLX-format files are already stacked: nothing to do. Works in place.
    """
    stack_experts(weights, f"{src}.experts", num_experts, {n: f"{dst}.switch_mlp.{m}" for n, m in names.items()})
    fused = weights.pop(f"{src}.experts.gate_up_proj", None)
    if fused is not None:
        gate, up = mx.split(fused, 2, axis=1)  # [E, I, D] each
        for part, (name, value) in enumerate((("gate_proj", gate), ("up_proj", up))):
            record(f"{dst}.switch_mlp.{name}.weight", FusedHalf(f"{src}.experts.gate_up_proj", part))
            weights[f"{dst}.switch_mlp.{name}.weight"] = value
    down = weights.pop(f"{src}.experts.down_proj", None)
    if down is not None:
        record(f"{dst}.switch_mlp.down_proj.weight", Renamed(f"{src}.experts.down_proj"))
        weights[f"{dst}.switch_mlp.down_proj.weight"] = down


GLU_NAMES = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}
