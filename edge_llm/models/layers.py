"""Layers shared by several architectures: the gated MLP, activations and masks."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

ACTIVATIONS = {"silu": nn.silu, "gelu": nn.gelu, "gelu_pytorch_tanh": nn.gelu_approx, "relu": nn.relu}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"config field 'hidden_act': {name!r} is not supported ({', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


class MLP(nn.Module):
    """SwiGLU feed-forward: down(act(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False, act: str = "silu"):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias)
        self.act = activation(act)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def sliding_window_mask(queries: int, keys: int, window: int | None) -> str | mx.array | None:
    """Causal mask for the last ``queries`` of ``keys`` positions, limited to ``window`` keys back.

    A key j is visible to query i when ``i - window < j <= i`` (transformers' sliding window). Returns
    the cheap string form whenever the window cannot bite.
    """
    if window is None or keys <= window:
        return "causal" if queries > 1 else None
    q_pos = mx.arange(keys - queries, keys)[:, None]
    k_pos = mx.arange(keys)[None]
    return (k_pos <= q_pos) & (k_pos > q_pos - window)
