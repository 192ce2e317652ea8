"""Multi-head Latent Attention (MLA), DeepSeek-V2/V3's attention, caching only the compressed latent.

Reference: transformers ``DeepseekV2Attention`` / ``DeepseekV3Attention`` (transformers 5). Keys and values
come from one latent per token: ``c = kv_a_layernorm(kv_a_proj_with_mqa(x)[:r])`` (r = ``kv_lora_rank``)
plus a single rotary key ``k_pe`` shared by all heads. The cache (``LatentCache``) holds ``[c, k_pe]``:
``r + qk_rope_head_dim`` values per token and layer, where mlx-lm's deepseek_v2 caches per-head K and V.

Two exact ways to attend (they differ only in float rounding):
- expanded: ``kv_b_proj`` turns every cached latent into per-head ``k_nope`` and ``v``, then ordinary
  attention. Cheapest for a fresh prefill.
- absorbed: ``q_nope . (W_uk c) = (W_uk^T q_nope) . c``, so the query is mapped into latent space and
  attention runs over the cached latents directly (one shared "KV head" of width r + rope); the output
  latent is mapped to values by ``W_uv`` afterwards. Decoding always uses it: per step it costs
  O(T·(r + rope)) per head instead of re-expanding all T latents through ``kv_b_proj``.
A multi-token call picks whichever form does fewer multiply-adds (``_use_absorbed``).

Quantized ``kv_b_proj``: the absorbed form needs ``W_uk`` and ``W_uv`` per head, i.e. a batched
quantized matmul over a 3-D packed weight, which MLX's CUDA backend does not implement (measured on an
H200: "[quantized_matmul] No implementation for problem shape"), in either orientation. So the absorbed
maps use ``kv_b_proj`` dequantized once and kept beside it (``H·(n+v)·r`` values per layer: 2M for
V2-Lite, 17M for V3; a few percent of a 4-bit model), while prefill's expanded form runs the quantized
layer itself. MLX's CPU backend has both orientations, so there the maps slice the packed weight, scales
and offsets per head and nothing is duplicated. mlx-community files whose ``kv_b_proj`` is quantized run
as is.

Rotary layout: DeepSeek pairs rotary features as (x0, x1), (x2, x3)... (``traditional`` in MLX terms);
V3's ``rope_interleave: false`` switches to the rotate-half layout. YaRN's ``mscale_all_dim`` multiplies
the softmax scale by ``mscale**2`` as transformers' ``yarn_apply_mscale`` does; its ``mscale`` ratio
scales the rotary part (the RoPE class's attention factor).
"""

from __future__ import annotations

from typing import Any, Protocol

import mlx.core as mx
import mlx.nn as nn

from .base import attention
from .cache import BatchRows, LatentCache, each_row
from .layers import RMSNorm
from .rope import RoPE, yarn_get_mscale


class LatentAttentionArgs(Protocol):
    """The config fields MLA reads (``deepseek_v2.ModelArgs`` has them; DeepSeek-V3 shares it)."""

    num_attention_heads: int
    hidden_size: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    attention_bias: bool
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int

# DeepSeek builds q_a_layernorm / kv_a_layernorm with the RMSNorm default, not config.rms_norm_eps.
LORA_NORM_EPS = 1e-6


def softmax_scale(qk_head_dim: int, rope_scaling: dict | None) -> float:
    scale = qk_head_dim**-0.5
    if rope_scaling and rope_scaling.get("mscale_all_dim"):
        mscale = yarn_get_mscale(float(rope_scaling["factor"]), float(rope_scaling["mscale_all_dim"]))
        scale *= mscale * mscale
    return scale


class MLAttention(nn.Module):
    def __init__(self, args: LatentAttentionArgs, traditional_rope: bool = True):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.q_lora_rank, self.kv_lora_rank = args.q_lora_rank, args.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        qk_dim = self.nope_dim + self.rope_dim
        dim, bias = args.hidden_size, args.attention_bias
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(dim, self.n_heads * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(dim, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, eps=LORA_NORM_EPS)
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.n_heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(dim, self.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, eps=LORA_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, dim, bias=bias)
        self.rope = RoPE(self.rope_dim, args.rope_theta, args.rope_scaling, args.max_position_embeddings,
                         traditional=traditional_rope)
        self.scale = softmax_scale(qk_dim, args.rope_scaling)
        # None: choose per call; True/False force one form (tests compare both against transformers).
        self.absorb: bool | None = None

    def __call__(self, x: mx.array, cache: LatentCache | BatchRows | None) -> mx.array:
        B, L, _ = x.shape
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)  # [B, H, L, nope + rope]
        q_nope, q_pe = mx.split(q, [self.nope_dim], axis=-1)
        out = each_row(cache, self._attend, q_nope, q_pe, self.kv_a_proj_with_mqa(x))
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))  # out: [B, H, L, v]

    def _attend(self, q_nope: mx.array, q_pe: mx.array, kv: mx.array, cache: LatentCache | None) -> mx.array:
        """Rope, the latent cached, attention (absorbed or expanded) for the sequences sharing ``cache``."""
        L = q_nope.shape[2]
        c, k_pe = mx.split(kv, [self.kv_lora_rank], axis=-1)  # [B, L, r], [B, L, rope]
        offset = cache.offset if cache is not None else 0
        q_pe = self.rope(q_pe, offset)
        k_pe = self.rope(k_pe[:, None], offset)  # [B, 1, L, rope]
        latent = mx.concatenate([self.kv_a_layernorm(c)[:, None], k_pe], axis=-1)  # [B, 1, L, r + rope]
        if cache is not None:
            latent = cache.update_and_fetch(latent)  # [B, 1, T, r + rope]
        mask = "causal" if L > 1 else None
        if self._use_absorbed(L, latent.shape[2]):
            return self._absorbed(q_nope, q_pe, latent, mask)
        return self._expanded(q_nope, q_pe, latent, mask)

    def _use_absorbed(self, queries: int, keys: int) -> bool:
        if self.absorb is not None:
            return self.absorb
        if queries == 1:
            return True
        # multiply-adds per head: absorbed maps queries and outputs through W_uk/W_uv and attends over
        # r + rope wide keys; expanded runs kv_b_proj over every key and attends over narrower heads.
        r, n, p, v = self.kv_lora_rank, self.nope_dim, self.rope_dim, self.v_dim
        absorbed = queries * (keys * (2 * r + p) + r * (n + v))
        expanded = keys * r * (n + v) + queries * keys * (n + p + v)
        return absorbed < expanded

    def _expanded(self, q_nope: mx.array, q_pe: mx.array, latent: mx.array, mask: str | None) -> mx.array:
        B, _, T, _ = latent.shape
        c, k_pe = mx.split(latent, [self.kv_lora_rank], axis=-1)
        kv = self.kv_b_proj(c[:, 0]).reshape(B, T, self.n_heads, -1).transpose(0, 2, 1, 3)  # [B, H, T, n + v]
        k_nope, v = mx.split(kv, [self.nope_dim], axis=-1)
        k = mx.concatenate([k_nope, mx.broadcast_to(k_pe, (*k_nope.shape[:-1], self.rope_dim))], axis=-1)
        q = mx.concatenate([q_nope, q_pe], axis=-1)
        return attention(q, k, v, self.scale, mask)

    def _absorbed(self, q_nope: mx.array, q_pe: mx.array, latent: mx.array, mask: str | None) -> mx.array:
        embed_q, unembed_out = self._absorbed_maps()
        q = mx.concatenate([embed_q(q_nope), q_pe], axis=-1)  # [B, H, L, r + rope]
        return unembed_out(self._latent_attention(q, latent, mask))  # [B, H, L, v]

    def _latent_attention(self, q: mx.array, latent: mx.array, mask: str | None) -> mx.array:
        """One latent "head" is the key (all of it) and the value (its first r features) of every query head,
        so all heads and queries are rows of one matmul against it. (MLX's CPU scaled_dot_product_attention
        broadcasts the shared head and copies a sliced value: 10-20x slower here at 4k context.)"""
        B, H, L, D = q.shape
        kv = latent[:, 0]  # [B, T, r + rope]
        T = kv.shape[1]
        scores = (q.reshape(B, H * L, D) * self.scale) @ kv.swapaxes(-1, -2)  # [B, H*L, T]
        if mask == "causal":
            visible = mx.arange(T)[None] <= mx.arange(T - L, T)[:, None]  # [L, T]: the last L positions
            scores = mx.where(visible, scores.reshape(B, H, L, T), -mx.inf).reshape(B, H * L, T)
        probs = mx.softmax(scores, axis=-1, precise=True).astype(kv.dtype)
        # multiplying by the whole latent and dropping the rope columns is cheaper than slicing it first
        return (probs @ kv)[..., : self.kv_lora_rank].reshape(B, H, L, -1)  # [B, H, L, r]

    def _absorbed_maps(self):
        """(q_nope [.., H, L, n] -> [.., H, L, r], latent out [.., H, L, r] -> [.., H, L, v]) from kv_b_proj."""
        H, n = self.n_heads, self.nope_dim
        proj = self.kv_b_proj

        def per_head(a: mx.array) -> tuple[mx.array, mx.array]:
            a = a.reshape(H, n + self.v_dim, -1)  # rows of head h: its n key rows, then its v value rows
            return a[:, :n], a[:, n:]

        weight = proj.weight
        if isinstance(proj, nn.QuantizedLinear) and mx.default_device() == mx.cpu:
            # the CPU has the batched quantized matmuls: no dense copy (MLX computes in the query's dtype)
            (wk, wv), (sk, sv) = per_head(proj["weight"]), per_head(proj["scales"])
            bk, bv = per_head(proj["biases"]) if "biases" in proj else (None, None)
            kwargs = dict(group_size=proj.group_size, bits=proj.bits, mode=proj.mode)
            return (lambda q: mx.quantized_matmul(q, wk, sk, bk, transpose=False, **kwargs),
                    lambda o: mx.quantized_matmul(o, wv, sv, bv, transpose=True, **kwargs))
        if isinstance(proj, nn.QuantizedLinear):
            if getattr(self, "_dense_of", None) is not proj["weight"]:
                self._dense = mx.dequantize(proj["weight"], proj["scales"], proj.get("biases"),
                                            group_size=proj.group_size, bits=proj.bits, mode=proj.mode)
                self._dense_of = proj["weight"]
            weight = self._dense
        wk, wv = per_head(weight)  # [H, n, r], [H, v, r]
        return (lambda q: q @ wk), (lambda o: o @ wv.swapaxes(-1, -2))


def join_kv_b(embed_q: mx.array, unembed_out: mx.array) -> mx.array:
    """``kv_b_proj`` ``[H * (nope + v), r]`` from its per-head halves, the split ``_absorbed_maps`` uses:
    ``embed_q [H, r, nope]`` (W_uk transposed) and ``unembed_out [H, v, r]`` (W_uv). mlx-lm (>= 0.30) saves
    DeepSeek-V3 so, and llama.cpp's GGUF files hold the same halves as ``attn_k_b``/``attn_v_b``."""
    kv_b = mx.concatenate([embed_q.swapaxes(-1, -2), unembed_out.astype(embed_q.dtype)], axis=1)  # [H, nope + v, r]
    return kv_b.reshape(-1, embed_q.shape[1])
