"""Grouped-query attention, one module for the Llama, Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE files.

Reference: transformers ``LlamaAttention`` and the variants of ``modeling_qwen2_moe``, ``modeling_qwen3_moe``
and ``modeling_olmoe``. What those architectures differ by is a flag here:
- biases: on q/k/v (``qkv_bias``: Qwen2-MoE) and on o_proj (``o_bias``; Llama's ``attention_bias`` sets both);
- RMS norms of queries and keys (``qk_norm``): per head, before rope (``"head"``: Qwen3's ``q_norm``/``k_norm``
  of width ``head_dim``), or over the whole projection (``"full"``: OLMoE's, ``heads * head_dim`` wide);
- ``clip_qkv`` (OLMoE): q, k and v clamped to ``[-clip_qkv, clip_qkv]`` after the norms;
- a sliding window (Mistral, Mixtral, Qwen's per-layer windows): an explicit mask only once the keys
  outgrow it.
MQA is GQA with one key/value head. The rotary embedding is ``mx.fast.rope`` in the rotate-half layout, as
transformers'. Module names are the checkpoints' (``q_proj`` ... ``o_proj``), so loading needs no table.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import mlx.core as mx
import mlx.nn as nn

from .. import kernels
from .base import BaseModelArgs, attention, check_widths, require
from .cache import BatchRows, KVCache, each_row
from .layers import RMSNorm, kernel_weights, normed_projections, projections, sliding_window_mask
from .rope import RoPE


@dataclasses.dataclass
class GQAArgs(BaseModelArgs):
    """The config fields grouped-query attention reads beyond every architecture's: key/value heads (default:
    as many as query heads) and the head size (default: hidden / heads), filled in by ``check_heads``."""

    num_key_value_heads: int | None = None
    head_dim: int | None = None

    def cache_rows(self) -> tuple[int, int]:
        """A key and a value per key/value head and layer."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads, self.head_dim

    def attention_parameters(self) -> int:
        """q, k, v and o."""
        return self.hidden_size * self.head_dim * 2 * (self.num_attention_heads + self.num_key_value_heads)


def check_heads(args: GQAArgs, head_dim: int | None) -> int:
    """Fills in grouped-query attention's defaults (key/value heads = heads) and checks the head counts:
    heads divide the hidden size when no ``head_dim`` is given, key/value heads divide heads, and the head
    size is even (rotary embeddings rotate pairs). Returns the head size."""
    if args.num_key_value_heads is None:
        args.num_key_value_heads = args.num_attention_heads
    if head_dim is None:
        require(args.hidden_size % args.num_attention_heads == 0, "num_attention_heads",
                f"{args.num_attention_heads} does not divide hidden_size {args.hidden_size}")
        head_dim = args.hidden_size // args.num_attention_heads
    require(args.num_attention_heads % args.num_key_value_heads == 0, "num_key_value_heads",
            f"{args.num_key_value_heads} does not divide num_attention_heads {args.num_attention_heads}")
    require(head_dim % 2 == 0, "num_attention_heads", f"gives an odd head size {head_dim} (hidden_size "
            f"{args.hidden_size} / {args.num_attention_heads} heads); rotary embeddings rotate pairs")
    check_widths(num_attention_heads=args.num_attention_heads * head_dim)
    return head_dim


class Attention(nn.Module):
    def __init__(self, args: GQAArgs, *, qkv_bias: bool = False, o_bias: bool = False,
                 qk_norm: Literal["head", "full"] | None = None, clip_qkv: float | None = None,
                 sliding_window: int | None = None):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            args.num_attention_heads, args.num_key_value_heads, args.head_dim,
        )
        self.scale = self.head_dim**-0.5
        self.qk_norm, self.clip_qkv, self.sliding_window = qk_norm, clip_qkv, sliding_window
        q_width, kv_width = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(args.hidden_size, q_width, bias=qkv_bias)
        self.k_proj = nn.Linear(args.hidden_size, kv_width, bias=qkv_bias)
        self.v_proj = nn.Linear(args.hidden_size, kv_width, bias=qkv_bias)
        self.o_proj = nn.Linear(q_width, args.hidden_size, bias=o_bias)
        if qk_norm is not None:
            per_head = qk_norm == "head"
            self.q_norm = RMSNorm(self.head_dim if per_head else q_width, eps=args.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim if per_head else kv_width, eps=args.rms_norm_eps)
        self.rope = RoPE(self.head_dim, args.rope_theta, args.rope_scaling, args.max_position_embeddings)

    def __call__(self, x: mx.array, cache: KVCache | BatchRows | None) -> mx.array:
        q, k, v = projections(x, self.q_proj, self.k_proj, self.v_proj)  # [B, L, H*D]
        return self._from_projections(q, k, v, cache)

    def residual_block(self, x: mx.array, norm: nn.Module, cache: KVCache | BatchRows | None) -> mx.array:
        """``x + self(norm(x), cache)``. Decoding on the CPU, in three ops and two cache writes: the norm inside the
        q/k/v product, the output projection and the residual inside the attention op (the same bits)."""
        qkv = (normed_projections(x, norm, self.q_proj, self.k_proj, self.v_proj)
               if self.qk_norm is None and self.clip_qkv is None else None)
        if qkv is None:
            return x + self(norm(x), cache)
        q, k, v = qkv
        out = self._fused_step(q, k, v, cache, residual=x)
        return out if out is not None else x + self._from_projections(q, k, v, cache)

    def _from_projections(self, q: mx.array, k: mx.array, v: mx.array, cache: KVCache | BatchRows | None) -> mx.array:
        """The attention output, projected, from q/k/v ``[B, L, H*D]``."""
        B, L, _ = q.shape
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (mx.clip(t, -self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        if self.qk_norm == "head":
            q, k = (norm(t.reshape(B, L, n, -1)) for norm, t, n in ((self.q_norm, q, self.n_heads),
                                                                     (self.k_norm, k, self.n_kv_heads)))
        out = self._fused_step(q, k, v, cache)  # [B, L, H*D]
        if out is not None:
            return self.o_proj(out)
        q, k, v = (t.reshape(B, L, n, -1).transpose(0, 2, 1, 3)  # [B, H, L, D]
                   for t, n in ((q, self.n_heads), (k, self.n_kv_heads), (v, self.n_kv_heads)))
        out = each_row(cache, self._attend, q, k, v)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def _fused_step(self, q: mx.array, k: mx.array, v: mx.array, cache: KVCache | BatchRows | None,
                    residual: mx.array | None = None) -> mx.array | None:
        """Decoding on the CPU: rope, the cache write and attention as one op (``kernels.attention_step``, the
        same bits as ``_attend``'s ops), for q/k/v ``[B, L, H * D]`` (or ``[B, L, H, D]``); with ``residual``, the
        output projection and the residual too (``residual + o_proj(out)``). None where it does not apply."""
        B, L = q.shape[:2]
        window = self.sliding_window
        if (not isinstance(cache, KVCache) or L > kernels.ATTENTION_MAX_QUERIES
                or q.dtype != mx.float32 or (window is not None and cache.offset + L > window)):
            return None
        out_proj = None
        if residual is not None:
            out_proj = kernel_weights(residual, (self.o_proj,))
            if out_proj is None:
                return None
        rope = self.rope.kernel_args(cache.offset, L)
        buffers = cache.buffers_for(B, self.n_kv_heads, L, self.head_dim, self.head_dim) if rope else None
        if buffers is None:
            return None
        fused = kernels.attention_step(q, k, v, *buffers, cache.offset, rope, self.scale, out_proj, residual)
        if fused is None:
            return None
        out, keys, values = fused
        cache.advance(keys, values, L)
        return out

    def _attend(self, q: mx.array, k: mx.array, v: mx.array, cache: KVCache | None) -> mx.array:
        """Rope at the cache's position, the cache extended, attention: for the sequences sharing ``cache``."""
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset), self.rope(k, offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        return attention(q, k, v, self.scale, sliding_window_mask(q.shape[2], k.shape[2], self.sliding_window))
