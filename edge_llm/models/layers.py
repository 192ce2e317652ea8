"""Layers shared by several architectures: the gated MLP, activations and masks."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .. import kernels
from .watched import Watched

# Weights converted for a float matmul (a half-precision table upcast, a quantized matrix dequantized) are
# converted this many bytes of rows at a time (about one core's L2), each block after the previous block's
# product: the whole matrix at once would be a float32 transient as large as the matrix (113 MB for
# SmolLM2's tied embedding, 0.5 GB for a 7B's lm_head), slower too, as it leaves the cache.
BLOCK_BYTES = 2 << 20

ACTIVATIONS = {"silu": nn.silu, "gelu": nn.gelu, "gelu_pytorch_tanh": nn.gelu_approx, "relu": nn.relu}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"config field 'hidden_act': {name!r} is not supported ({', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


class RMSNorm(Watched, nn.RMSNorm):
    """``nn.RMSNorm`` (same parameter) that runs as one op on the CPU (``kernels.rms_norm``)."""

    def __call__(self, x: mx.array) -> mx.array:
        return kernels.rms_norm(x, self["weight"], self.eps)


class MLP(Watched):
    """SwiGLU feed-forward: down(act(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False, act: str = "silu"):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias)
        self.act = activation(act)

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = projections(x, self.gate_proj, self.up_proj)
        return self.down_proj(self.act(gate) * up)

    def residual_block(self, h: mx.array, norm: nn.Module) -> mx.array:
        """``h + self(norm(h))``: one op where the CPU kernels take it (decoding a SwiGLU MLP), the same bits."""
        fmt = self._block_weights(h, norm)
        out = None if fmt is None else kernels.mlp_block(h, norm["weight"], norm.eps, fmt)
        return out if out is not None else h + self(norm(h))

    def plan_args(self, h: mx.array, norm: nn.Module) -> dict | None:
        """This half as ``kernels.DecodePlan`` holds it (the norm, gate/up/down), or None where ``residual_block``
        would not be one op for ``h``."""
        fmt = self._block_weights(h, norm)
        if fmt is None or not kernels.mlp_block_applies(h, norm["weight"], fmt):
            return None
        return {"mlp_norm": norm["weight"], "mlp_eps": norm.eps, "mlp": fmt.arrays, "mlp_format": fmt.format}

    def _block_weights(self, h: mx.array, norm: nn.Module) -> kernels.Weights | None:
        if self.act is not nn.silu or type(norm) is not RMSNorm:
            return None
        return kernel_weights(h, (self.gate_proj, self.up_proj, self.down_proj))


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


def blocked_matmul(x: mx.array, tensors: list[mx.array], convert, row_values: int) -> mx.array:
    """``x @ W.T`` for a weight ``W = convert(*tensors)`` built a block of rows at a time.

    ``tensors`` share their first axis (W's rows); ``row_values`` is the number of values in one row of W.
    Each block's inputs depend on the previous block's product (``mx.depends``): MLX evaluates a graph
    breadth-first, so independent blocks would otherwise all be converted before the first product and
    the float transient would again be the whole matrix.
    """
    n = tensors[0].shape[0]
    rows = max(1, BLOCK_BYTES // (row_values * x.dtype.size))
    parts: list[mx.array] = []
    for i in range(0, n, rows):
        block = [t[i : i + rows] for t in tensors]
        if parts:
            block = mx.depends(block, parts[-1])
        parts.append(x @ convert(*block).T)
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)


def output_projection(head: nn.Module, h: mx.array) -> mx.array:
    """Logits ``h [..., D] -> [..., V]`` through ``head``: a tied embedding table or an ``lm_head`` linear."""
    table = isinstance(head, (nn.Embedding, nn.QuantizedEmbedding))
    if isinstance(head, nn.QuantizedEmbedding):  # nn.QuantizedEmbedding.as_linear, through the CPU kernels
        return kernels.quantized_matmul(h, head["weight"], head["scales"], head.get("biases"), head.group_size,
                                        head.bits, head.mode)
    w = head.get("weight")
    if isinstance(head, nn.QuantizedLinear) or w is None:
        return head(h)
    out = few_rows_float_matmul(h, w)
    if out is None:
        if w.dtype == h.dtype:
            return head.as_linear(h) if table else head(h)
        out = blocked_matmul(h, [w], lambda block: block.astype(h.dtype), w.shape[1])
    return out + head.bias if "bias" in head else out


def few_rows_float_matmul(x: mx.array, w: mx.array) -> mx.array | None:
    """``x @ w.T`` for a float ``w`` through the CPU kernels when ``x`` has few rows (decoding, short prompts),
    else None: many rows are BLAS's (a half-precision weight upcast a block at a time, ``blocked_matmul``)."""
    if x.size // x.shape[-1] >= DEQUANTIZE_MIN_ROWS:
        return None
    return kernels.float_matmul(x, w)


# From this many rows (prefill), a quantized linear dequantizes its weights and runs one float matmul:
# MLX's CPU quantized matmul is a plain loop (344 ms for 512 x 576 x 1536 here) while dequantize + BLAS
# takes 50 ms. With the CPU kernels, fewer rows go through them instead: they read the weights as stored
# and share each unpacked block among 4 rows, so SmolLM2 Q4_1 prefills 46 tokens at 181 tok/s that way
# against 93 by dequantize + BLAS, and 200 tokens at about the same speed both ways (162 vs 161).
DEQUANTIZE_MIN_ROWS = kernels.KERNEL_MAX_ROWS + 1
MLX_DEQUANTIZE_MIN_ROWS = 8  # without the kernels (a GPU, or switched off): MLX's own quantized matmul below


def dequantize_min_rows() -> int:
    return DEQUANTIZE_MIN_ROWS if kernels.active() else MLX_DEQUANTIZE_MIN_ROWS


class QuantizedLinear(Watched, nn.QuantizedLinear):
    """``nn.QuantizedLinear`` (same parameters and file format) that runs prefill through BLAS on the CPU."""

    @classmethod
    def of(cls, q: nn.QuantizedLinear) -> QuantizedLinear:
        out_dims, packed = q["weight"].shape
        new = cls(packed * 32 // q.bits, out_dims, "bias" in q, q.group_size, q.bits, mode=q.mode)
        new.update({k: v for k, v in q.items() if k in ("weight", "scales", "biases", "bias")})
        return new

    def __call__(self, x: mx.array) -> mx.array:
        if x.size // x.shape[-1] < dequantize_min_rows() or mx.default_device() != mx.cpu:
            out = kernels.quantized_matmul(x, self["weight"], self["scales"], self.get("biases"), self.group_size,
                                           self.bits, self.mode)
            return out + self["bias"] if "bias" in self else out
        tensors = [self["weight"], self["scales"]] + ([self["biases"]] if "biases" in self else [])

        def dequantize(weight: mx.array, scales: mx.array, biases: mx.array | None = None) -> mx.array:
            return mx.dequantize(weight, scales.astype(x.dtype), None if biases is None else biases.astype(x.dtype),
                                 group_size=self.group_size, bits=self.bits, mode=self.mode)

        out = blocked_matmul(x, tensors, dequantize, self["weight"].shape[1] * 32 // self.bits)
        return out + self["bias"] if "bias" in self else out


class QuantizedEmbedding(nn.QuantizedEmbedding):
    """``nn.QuantizedEmbedding`` (same parameters) whose lookup is one op on the CPU (``kernels.dequantized_rows``,
    the same bits) instead of MLX's ~25."""

    @classmethod
    def of(cls, q: nn.QuantizedEmbedding) -> QuantizedEmbedding:
        rows, packed = q["weight"].shape
        new = cls(rows, packed * 32 // q.bits, q.group_size, q.bits, mode=q.mode)
        new.update({k: v for k, v in q.items() if k in ("weight", "scales", "biases")})
        return new

    def __call__(self, x: mx.array) -> mx.array:
        out = kernels.dequantized_rows(x, self["weight"], self["scales"], self.get("biases"), self.group_size,
                                       self.bits, self.mode)
        return out if out is not None else super().__call__(x)


class FloatLinear(Watched, nn.Linear):
    """``nn.Linear`` (same parameters) whose few rows (decoding, short prompts) go through the CPU kernels: a
    half-precision weight is read as stored, with no float32 copy, and a float32 one takes the same kernel, so
    a model gives the same bits whichever float dtype holds its weights."""

    @classmethod
    def of(cls, linear: nn.Linear) -> FloatLinear:
        out_dims, in_dims = linear["weight"].shape
        new = cls(in_dims, out_dims, "bias" in linear)
        new.update({k: v for k, v in linear.items() if k in ("weight", "bias")})
        return new

    def __call__(self, x: mx.array) -> mx.array:
        out = few_rows_float_matmul(x, self["weight"])
        if out is None:
            return super().__call__(x)
        return out + self["bias"] if "bias" in self else out


def projections(x: mx.array, *linears: nn.Module) -> list[mx.array]:
    """``[linear(x) for linear in linears]``: a layer's q/k/v or gate/up projections of one input. Where the CPU
    kernels take them one by one (few rows), they take them as one product instead: one dispatch and one job for
    the threads, the same bits."""
    together = _one_product(x, linears)
    return together if together is not None else [linear(x) for linear in linears]


def _one_product(x: mx.array, linears: tuple[nn.Module, ...]) -> list[mx.array] | None:
    if len(linears) < 2:
        return None
    fmt = kernel_weights(x, linears, allow_bias=True)
    outs = None if fmt is None else kernels.matmuls(x, fmt)
    if outs is None:
        return None
    return [out + m["bias"] if "bias" in m else out for out, m in zip(outs, linears, strict=True)]


def kernel_weights(x: mx.array, linears: tuple[nn.Module, ...], allow_bias: bool = False) -> kernels.Weights | None:
    """The linears as one job for the CPU kernels' products of ``x``'s few rows (decoding, short prompts): all
    quantized alike or all float, and no bias unless ``allow_bias`` (the caller adds it); else None."""
    if mx.default_device() != mx.cpu:
        return None
    weights = _kernel_format(linears, allow_bias)
    if weights is None:
        return None
    return weights if x.size // x.shape[-1] < (dequantize_min_rows() if weights.bits else DEQUANTIZE_MIN_ROWS) else None


def _kernel_format(linears: tuple[nn.Module, ...], allow_bias: bool) -> kernels.Weights | None:
    """``kernel_weights`` without the rows: the same every step, so kept on the first linear (a decode step asks
    90 times) under the identities of the linears and their weights (a module swapped in, as calibration's
    capturing ones, or weights loaded or updated, make a new key)."""
    key = (allow_bias, *[(id(m), id(m.get("weight"))) for m in linears])
    kept = vars(linears[0]).get("_kernel_format")
    if kept is not None and kept[0] == key:
        return kept[1]
    first, weights = linears[0], None
    if not allow_bias and any("bias" in m for m in linears):
        pass
    elif all(type(m) is QuantizedLinear for m in linears):
        if all((m.bits, m.group_size, m.mode) == (first.bits, first.group_size, first.mode) for m in linears):
            weights = kernels.Weights.quantized([(m["weight"], m["scales"], m.get("biases")) for m in linears],
                                                first.group_size, first.bits, first.mode)
    elif all(type(m) is FloatLinear for m in linears):
        weights = kernels.Weights.floats([m["weight"] for m in linears])
    # a plain attribute, not a parameter or child, and not an entry of the module's dict: a Watched module counts
    # those as changes (models/watched.py), which would make the decode plan built from this result stale at once
    object.__setattr__(first, "_kernel_format", (key, weights))
    return weights


def normed_projections(x: mx.array, norm: nn.Module, *linears: nn.Module) -> list[mx.array] | None:
    """``[linear(norm(x)) for linear in linears]`` as one op, the RMS norm inside the product (decoding on the CPU:
    one dispatch fewer per layer, the same bits); None where the kernels do not take it."""
    fmt = kernel_weights(x, linears) if type(norm) is RMSNorm else None
    return None if fmt is None else kernels.matmuls(x, fmt, norm=(norm["weight"], norm.eps))
