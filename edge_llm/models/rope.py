"""Rotary position embeddings with the scaling variants Hugging Face configs name.

Reference: transformers ``modeling_rope_utils`` (default, linear, dynamic, llama3, yarn). Every
variant reduces to ``mx.fast.rope`` with either a base or a vector of per-pair frequencies, plus a
value scale (yarn's attention factor, which transformers applies to cos and sin: the same as scaling
the rotated part of q and k, because rotation is linear).
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from .. import kernels
from .watched import Watched

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _inv_freq_default(dims: int, base: float) -> mx.array:
    return 1.0 / (base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims))


def _inv_freq_llama3(dims: int, base: float, scaling: dict) -> mx.array:
    inv_freq = _inv_freq_default(dims, base)
    factor = scaling["factor"]
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    old_context_len = scaling.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = mx.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return mx.where(is_medium, smoothed, scaled)


def _yarn(dims: int, base: float, scaling: dict, max_position_embeddings: int) -> tuple[mx.array, float]:
    original_max = scaling.get("original_max_position_embeddings") or max_position_embeddings
    factor = scaling.get("factor") or max_position_embeddings / original_max
    attention_factor = scaling.get("attention_factor")
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_get_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1
    truncate = scaling.get("truncate", True)

    def correction_dim(rotations: float) -> float:
        return (dims * math.log(original_max / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dims - 1)
    if low == high:
        high += 0.001
    ramp = mx.clip((mx.arange(dims // 2, dtype=mx.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    pos_freqs = base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


class RoPE(Watched):
    """Applies rotary embeddings to the first ``dims`` features of ``x [B, H, L, D]``."""

    def __init__(
        self,
        dims: int,
        base: float,
        scaling: dict | None = None,
        max_position_embeddings: int = 2048,
        traditional: bool = False,
    ):
        super().__init__()
        scaling = dict(scaling or {})
        self.rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope_scaling.rope_type={self.rope_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        self.dims, self.base, self.traditional = dims, base, traditional
        self.max_position_embeddings = max_position_embeddings
        self.factor = float(scaling.get("factor", 1.0))
        self.value_scale = 1.0
        self._freqs = None
        self._inv_freq: tuple | None = None  # ((base, id(freqs)), angles per pair) for the CPU kernels
        if self.rope_type == "llama3":
            self._freqs = 1.0 / _inv_freq_llama3(dims, base, scaling)
        elif self.rope_type == "yarn":
            inv_freq, self.value_scale = _yarn(dims, base, scaling, max_position_embeddings)
            self._freqs = 1.0 / inv_freq
        if self._freqs is not None:
            mx.eval(self._freqs)  # not a parameter, so loading never evaluates it; lazy, it would belong to this
            # thread's stream, and a server thread evaluating it would fail

    def _dynamic_base(self, seq_len: int) -> float:
        # Dynamic NTK grows the base once the sequence passes the trained length (transformers'
        # dynamic_rope_update): a function of the total length, so it is recomputed per call.
        seq_len = max(seq_len, self.max_position_embeddings)
        ratio = self.factor * seq_len / self.max_position_embeddings - (self.factor - 1)
        return self.base * ratio ** (self.dims / (self.dims - 2))

    def _variant(self, offset: int, length: int) -> tuple[float | None, float, mx.array | None]:
        """(base, position scale, per-pair frequencies) of this variant for ``length`` positions from ``offset``."""
        if self._freqs is not None:
            return None, 1.0, self._freqs
        if self.rope_type == "linear":
            return self.base, 1.0 / self.factor, None
        if self.rope_type == "dynamic":
            return self._dynamic_base(offset + length), 1.0, None
        return self.base, 1.0, None

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        if self.value_scale != 1.0:
            rot = x[..., : self.dims] * self.value_scale
            x = rot if self.dims == x.shape[-1] else mx.concatenate([rot, x[..., self.dims :]], axis=-1)
        base, scale, freqs = self._variant(offset, x.shape[-2])
        out = kernels.rope(x, self.dims, self.traditional, self._angles(base, freqs), scale, offset)
        if out is not None:
            return out
        return mx.fast.rope(x, self.dims, traditional=self.traditional, base=base, scale=scale, offset=offset,
                            freqs=freqs)

    def kernel_args(self, offset: int, length: int) -> tuple[int, bool, mx.array, float] | None:
        """(dims, traditional, per-pair angles, position scale) for the CPU kernels' fused attention step
        (``kernels.attention_step``), or None for yarn's value scale, which only the unfused path applies."""
        if self.value_scale != 1.0:
            return None
        base, scale, freqs = self._variant(offset, length)
        return self.dims, self.traditional, self._angles(base, freqs), scale

    def fixed_kernel_args(self) -> tuple[int, bool, mx.array, float] | None:
        """``kernel_args`` when they are the same at every position (every variant but the dynamic one), else None."""
        return None if self.rope_type == "dynamic" else self.kernel_args(0, 1)

    def _angles(self, base: float | None, freqs: mx.array | None) -> mx.array:
        """The angle per pair and position unit the CPU kernels take: 1 / freqs, or base^(-2i/dims) as MLX
        computes them; float32, remembered for the last (base, freqs)."""
        key = (base, id(freqs))
        if self._inv_freq is None or self._inv_freq[0] != key:
            # computed here, not left lazy: a lazy array belongs to the stream of the thread that made it, and
            # a server thread that evaluated it later would fail ("There is no Stream(cpu, N) in current thread")
            half = self.dims // 2
            inv = (1.0 / np.asarray(freqs, dtype=np.float64) if freqs is not None
                   else np.exp(np.arange(half, dtype=np.float64) * (-math.log(base) / half)))
            self._inv_freq = (key, mx.array(inv.astype(np.float32)))
        return self._inv_freq[1]
