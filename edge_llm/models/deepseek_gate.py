"""DeepSeek's mixture-of-experts block: its router (three selection rules), stacked experts, shared experts.

References: transformers ``models/deepseek_v2/modeling_deepseek_v2.py`` (``DeepseekV2TopkRouter``) and
``models/deepseek_v3/modeling_deepseek_v3.py`` (``DeepseekV3TopkRouter``), and DeepSeek's own
``modeling_deepseek.py`` for V2's ``norm_topk_prob`` (transformers 5 ignores that field for V2).

Selection rules, per token:
- ``greedy`` (V2): softmax over all experts, top-k.
- ``group_limited_greedy`` (V2): softmax; keep the ``topk_group`` groups whose best expert scores highest
  (the others' scores become 0), then top-k.
- ``noaux_tc`` (V3): sigmoid; the selection adds ``e_score_correction_bias`` and keeps the ``topk_group``
  groups with the highest sum of their two best biased scores (the others become -inf); the weights are
  the unbiased sigmoid scores of the chosen experts.
Weights then get V2's rule (normalise when ``norm_topk_prob`` and k > 1, else scale by
``routed_scaling_factor``) or V3's (normalise when ``norm_topk_prob``, then always scale).
The router runs in float32 whatever the compute dtype, as transformers does (its weights stay float32 too).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .layers import MLP
from .switch import SwitchGLU

SOFTMAX_METHODS = ("greedy", "group_limited_greedy")
TOPK_METHODS = (*SOFTMAX_METHODS, "noaux_tc")


def _drop_groups(scores: mx.array, group_scores: mx.array, keep: int, fill: float) -> mx.array:
    """Sets the experts of all but the ``keep`` best groups to ``fill``. scores [..., E], group_scores [..., G]."""
    n_group = group_scores.shape[-1]
    if keep >= n_group:
        return scores
    # indices of the n_group - keep lowest-scoring groups
    drop = mx.argpartition(group_scores, kth=n_group - keep - 1, axis=-1)[..., : n_group - keep]
    grouped = mx.unflatten(scores, -1, (n_group, -1))  # [..., G, E/G]
    grouped = mx.put_along_axis(grouped, drop[..., None], mx.array(fill, scores.dtype), axis=-2)
    return mx.flatten(grouped, -2, -1)


def _top_k(scores: mx.array, k: int) -> mx.array:
    return mx.argpartition(-scores, kth=k - 1, axis=-1)[..., :k]


class MoEGate(nn.Module):
    """Router: ``x [..., D]`` -> (expert indices [..., k], weights [..., k] float32)."""

    def __init__(self, dim: int, num_experts: int, top_k: int, topk_method: str, n_group: int | None = None,
                 topk_group: int | None = None, norm_topk_prob: bool = False, routed_scaling_factor: float = 1.0):
        super().__init__()
        self.top_k, self.topk_method = top_k, topk_method
        self.n_group, self.topk_group = n_group or 1, topk_group or 1
        self.norm_topk_prob, self.routed_scaling_factor = norm_topk_prob, routed_scaling_factor
        self.weight = mx.zeros((num_experts, dim))
        if topk_method == "noaux_tc":
            self.e_score_correction_bias = mx.zeros((num_experts,))

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array]:
        logits = x.astype(mx.float32) @ self.weight.astype(mx.float32).T  # [..., E]
        if self.topk_method == "noaux_tc":
            return self._noaux_tc(logits)
        scores = mx.softmax(logits, axis=-1, precise=True)
        if self.topk_method == "group_limited_greedy":
            group_scores = mx.unflatten(scores, -1, (self.n_group, -1)).max(axis=-1)  # [..., G]
            scores = _drop_groups(scores, group_scores, self.topk_group, 0.0)
        indices = _top_k(scores, self.top_k)
        weights = mx.take_along_axis(scores, indices, axis=-1)
        if self.top_k > 1 and self.norm_topk_prob:
            weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
        else:
            weights = weights * self.routed_scaling_factor
        return indices, weights

    def _noaux_tc(self, logits: mx.array) -> tuple[mx.array, mx.array]:
        scores = mx.sigmoid(logits)
        choice = scores + self.e_score_correction_bias.astype(mx.float32)
        if self.n_group > 1:
            top2 = mx.topk(mx.unflatten(choice, -1, (self.n_group, -1)), 2, axis=-1)  # [..., G, 2]
            choice = _drop_groups(choice, top2.sum(axis=-1), self.topk_group, float("-inf"))
        indices = _top_k(choice, self.top_k)
        weights = mx.take_along_axis(scores, indices, axis=-1)
        if self.norm_topk_prob:  # transformers normalises even for k = 1
            weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
        return indices, weights * self.routed_scaling_factor


class DeepseekMoE(nn.Module):
    """Routed experts (stacked, ``switch_mlp``) plus optional always-on ``shared_experts``."""

    def __init__(self, dim: int, moe_intermediate_size: int, num_experts: int, n_shared_experts: int | None,
                 gate: MoEGate, act: str = "silu", shared_bias: bool = False):
        super().__init__()
        self.gate = gate
        self.switch_mlp = SwitchGLU(dim, moe_intermediate_size, num_experts, act=act)
        if n_shared_experts:
            self.shared_experts = MLP(dim, moe_intermediate_size * n_shared_experts, bias=shared_bias, act=act)

    def __call__(self, x: mx.array) -> mx.array:
        indices, weights = self.gate(x)
        y = self.switch_mlp(x, indices)  # [..., k, D]
        y = (y * weights[..., None]).sum(axis=-2).astype(x.dtype)
        if "shared_experts" in self:
            y = y + self.shared_experts(x)
        return y
