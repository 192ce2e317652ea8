"""Stacked experts: every expert's weights in one ``[E, out, in]`` tensor, run with gather matmuls.

A token routed to k experts multiplies against exactly those k slices (``mx.gather_mm``, or
``mx.gather_qmm`` once quantized), with no Python loop over experts. For prefill the (token, expert)
pairs are sorted by expert so each expert's rows are contiguous, which the kernels exploit.
Module names (``switch_mlp.gate_proj`` ...) follow mlx-lm's, so MLX-community MoE files load as is.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from .. import kernels
from ..experts.provenance import PerExpert, record
from .layers import activation

SORT_THRESHOLD = 64  # (token, expert) pairs from which sorting by expert pays off


def sort_by_expert(x: mx.array, indices: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """Rows of ``x [..., 1, 1, D]`` repeated per chosen expert and ordered by expert id.

    Returns (x_sorted [N*k, 1, D], experts_sorted [N*k], inverse order to undo the sort).
    """
    k = indices.shape[-1]
    flat = indices.flatten()
    order = mx.argsort(flat)
    x = x.reshape(-1, 1, x.shape[-1])  # [N, 1, D]
    return x[order // k], flat[order], mx.argsort(order)


class SwitchLinear(nn.Module):
    def __init__(self, input_dims: int, output_dims: int, num_experts: int, bias: bool = False):
        super().__init__()
        scale = math.sqrt(1 / input_dims)
        self.weight = mx.random.uniform(-scale, scale, (num_experts, output_dims, input_dims))
        if bias:
            self.bias = mx.zeros((num_experts, output_dims))

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    # True when float32 weights hold upcast half-precision ones (a streamed expert bank on the CPU): the rows are
    # then multiplied in float32 and the result cast back, exactly as the half-precision path computes them (the
    # same float32 products, so the same bits), without its per-call copy of the chosen experts
    upcast_half = False

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        out = self._cpu_kernel(x, indices)
        if out is None:
            out = self._mlx(x, indices, sorted_indices)
        if "bias" in self:
            out = out + mx.expand_dims(self.bias[indices], -2)
        return out

    def _mlx(self, x: mx.array, indices: mx.array, sorted_indices: bool) -> mx.array:
        if self.weight.dtype != mx.float32 and mx.default_device() == mx.cpu:
            return self._cpu_half_precision(x, indices, sorted_indices)
        if self.upcast_half:
            return self._gather_mm(x.astype(mx.float32), indices, sorted_indices).astype(x.dtype)
        return self._gather_mm(x, indices, sorted_indices)

    def _cpu_kernel(self, x: mx.array, indices: mx.array) -> mx.array | None:
        """The CPU kernels: float32 rows times the experts as stored, no float32 copy. A bank's float32 copies of
        half-precision experts give the same products bit for bit, as the kernels sum each row in one order
        whatever the layout, sorting or number of rows around it (so streamed == resident holds)."""
        if x.dtype != mx.float32 and not self.upcast_half and self.weight.dtype == x.dtype:
            return None  # half-precision compute (a GPU-style policy): MLX's own
        out = kernels.gather_float_matmul(x, self.weight, indices)
        return None if out is None else out.astype(x.dtype)

    def _gather_mm(self, x: mx.array, indices: mx.array, sorted_indices: bool) -> mx.array:
        return mx.gather_mm(x, self.weight.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)

    def _cpu_half_precision(self, x: mx.array, indices: mx.array, sorted_indices: bool) -> mx.array:
        # MLX's CPU GatherMM takes only float32 ("[GatherMM::eval] Currently only supports float32"), so
        # bf16/fp16 experts are multiplied in float32. A few rows (decode) gather just their experts'
        # slices; a sorted prefill converts all experts once, which its many tokens amortize. Both run
        # GatherMM, as a float32 bank of upcast experts does: the same kernel, so the same bits (a plain
        # matmul takes another BLAS path and differs in the last bits once OpenBLAS serves MLX).
        if sorted_indices:
            w = self.weight.astype(mx.float32).swapaxes(-1, -2)
            out = mx.gather_mm(x.astype(mx.float32), w, rhs_indices=indices, sorted_indices=True)
        else:
            chosen = self.weight[indices.flatten()].astype(mx.float32).swapaxes(-1, -2)  # [N*k, in, out]
            order = mx.arange(indices.size, dtype=mx.uint32).reshape(indices.shape)
            out = mx.gather_mm(x.astype(mx.float32), chosen, rhs_indices=order)
        return out.astype(x.dtype)

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine", **_) -> QuantizedSwitchLinear:
        return QuantizedSwitchLinear.from_switch_linear(self, group_size, bits, mode)


class QuantizedSwitchLinear(nn.Module):
    def __init__(self, input_dims: int, output_dims: int, num_experts: int, bias: bool = False,
                 group_size: int = 64, bits: int = 4, mode: str = "affine"):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        w = mx.zeros((num_experts, output_dims, input_dims))
        self.weight, self.scales, *biases = mx.quantize(w, group_size=group_size, bits=bits, mode=mode)
        if biases:
            self.biases = biases[0]
        if bias:
            self.bias = mx.zeros((num_experts, output_dims))
        self.freeze()

    @classmethod
    def from_switch_linear(cls, layer: SwitchLinear, group_size: int, bits: int, mode: str) -> QuantizedSwitchLinear:
        E, out_dims, in_dims = layer.weight.shape
        q = cls(in_dims, out_dims, E, "bias" in layer, group_size, bits, mode)
        q.weight, q.scales, *biases = mx.quantize(layer.weight, group_size=group_size, bits=bits, mode=mode)
        if biases:
            q.biases = biases[0]
        if "bias" in layer:
            q.bias = layer.bias
        return q

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        out = kernels.gather_quantized_matmul(x, self["weight"], self["scales"], self.get("biases"), indices,
                                              self.group_size, self.bits, self.mode, sorted_indices)
        if "bias" in self:
            out = out + mx.expand_dims(self.bias[indices], -2)
        return out


class SwitchGLU(nn.Module):
    """SwiGLU experts: ``x [..., D]`` and ``indices [..., k]`` -> ``[..., k, D]``."""

    def __init__(self, input_dims: int, hidden_dims: int, num_experts: int, act: str = "silu", bias: bool = False):
        super().__init__()
        self.gate_proj = SwitchLinear(input_dims, hidden_dims, num_experts, bias)
        self.up_proj = SwitchLinear(input_dims, hidden_dims, num_experts, bias)
        self.down_proj = SwitchLinear(hidden_dims, input_dims, num_experts, bias)
        self.act = activation(act)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        lead_shape = indices.shape
        x = mx.expand_dims(x, (-2, -3))  # [..., 1, 1, D]
        do_sort = indices.size >= SORT_THRESHOLD
        idx = indices
        if do_sort:
            x, idx, inverse = sort_by_expert(x, indices)
        y = self.experts(x, idx, do_sort)  # [..., k, 1, D] or [N*k, 1, D] when sorted
        if do_sort:
            y = y[inverse].reshape(*lead_shape, 1, -1)
        return y.squeeze(-2)

    def experts(self, x: mx.array, indices: mx.array, sorted_indices: bool) -> mx.array:
        """The experts' SwiGLU on rows ``x`` for expert ``indices`` (sorted: rows grouped by expert)."""
        h = self.act(self.gate_proj(x, indices, sorted_indices)) * self.up_proj(x, indices, sorted_indices)
        return self.down_proj(h, indices, sorted_indices)


def stack_experts(weights: dict[str, mx.array], prefix: str, num_experts: int,
                  names: dict[str, str], suffixes: tuple[str, ...] = ("weight", "scales", "biases", "bias")) -> None:
    """Replaces per-expert tensors ``{prefix}.{e}.{src}.{suffix}`` with stacked ``{prefix-target}``.

    ``names`` maps each per-expert projection name to its stacked destination path, e.g.
    ``{"w1": "model.layers.0.block_sparse_moe.switch_mlp.gate_proj"}``. Works in place; a no-op when
    the checkpoint is already stacked (MLX-format files).
    """
    for src, dst in names.items():
        for suffix in suffixes:
            first = f"{prefix}.0.{src}.{suffix}"
            if first not in weights:
                continue
            sources = tuple(f"{prefix}.{e}.{src}.{suffix}" for e in range(num_experts))
            record(f"{dst}.{suffix}", PerExpert(sources))  # expert streaming reads them one by one
            weights[f"{dst}.{suffix}"] = mx.stack([weights.pop(name) for name in sources])
