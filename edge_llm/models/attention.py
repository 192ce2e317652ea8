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
from .watched import Watched


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


class Attention(Watched):
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
        """``x + self(norm(x), cache)``. Decoding on the CPU, one op (``kernels.attention_block``); where the q/k/v
        need more than the kernels do (qk norms, clipping), three ops and two cache writes: the norm inside the
        q/k/v product, the output projection and the residual inside the attention op. The same bits either way."""
        out = self._block_step(x, norm, cache)
        if out is not None:
            return out
        plain = self.qk_norm is None and self.clip_qkv is None
        qkv = normed_projections(x, norm, self.q_proj, self.k_proj, self.v_proj) if plain else None
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

    def step_buffers(self, cache: KVCache | BatchRows | None, batch: int,
                     length: int) -> tuple[tuple[int, bool, mx.array, float], tuple[mx.array, mx.array]] | None:
        """(rope's kernel arguments, the cache buffers with room for ``length`` more rows) for the CPU kernels' fused
        steps, which write the cache themselves; None where they do not apply (a batch of rows, many queries, a
        window that bites, yarn's value scale, a quantized cache)."""
        window = self.sliding_window
        if (not isinstance(cache, KVCache) or length > kernels.ATTENTION_MAX_QUERIES
                or (window is not None and cache.offset + length > window)):
            return None
        rope = self.rope.kernel_args(cache.offset, length)
        buffers = cache.buffers_for(batch, self.n_kv_heads, length, self.head_dim, self.head_dim) if rope else None
        return None if buffers is None else (rope, buffers)

    def plan_args(self, x: mx.array, norm: nn.Module) -> dict | None:
        """This half as ``kernels.DecodePlan`` holds it (the norm, q/k/v and o, rope's layout, the score scale), or
        None where ``residual_block`` would not be one op for ``x``."""
        weights = self._block_weights(x, norm)
        rope = self.rope.kernel_args(0, 1)
        if weights is None or rope is None:
            return None
        (qkv, o), (dims, traditional, _, _) = weights, rope
        return {"attn_norm": norm["weight"], "attn_eps": norm.eps, "qkv": qkv.arrays, "out_proj": o.arrays,
                "qkv_format": qkv.format, "out_format": o.format, "dims": dims, "traditional": traditional,
                "scale": self.scale}

    def _block_weights(self, x: mx.array, norm: nn.Module) -> tuple[kernels.Weights, kernels.Weights] | None:
        """(q/k/v, o) as the one-op step takes them, or None where it does not apply to ``x``."""
        if self.qk_norm is not None or self.clip_qkv is not None or type(norm) is not RMSNorm:
            return None
        qkv = kernel_weights(x, (self.q_proj, self.k_proj, self.v_proj))
        o = kernel_weights(x, (self.o_proj,)) if qkv is not None else None
        return (qkv, o) if kernels.attention_block_applies(x, norm["weight"], qkv, o) else None

    def _block_step(self, x: mx.array, norm: nn.Module, cache: KVCache | BatchRows | None) -> mx.array | None:
        """``x + self(norm(x), cache)`` as one op (``kernels.attention_block``), or None where it does not apply."""
        weights = self._block_weights(x, norm)
        step = self.step_buffers(cache, *x.shape[:2]) if weights is not None else None
        if step is None:
            return None
        rope, buffers = step
        fused = kernels.attention_block(x, (norm["weight"], norm.eps), *weights, *buffers, cache.offset, rope,
                                        self.scale)
        return None if fused is None else self._advance(cache, fused, x.shape[1])

    def _fused_step(self, q: mx.array, k: mx.array, v: mx.array, cache: KVCache | BatchRows | None,
                    residual: mx.array | None = None) -> mx.array | None:
        """Decoding on the CPU: rope, the cache write and attention as one op (``kernels.attention_step``, the
        same bits as ``_attend``'s ops), for q/k/v ``[B, L, H * D]`` (or ``[B, L, H, D]``); with ``residual``, the
        output projection and the residual too (``residual + o_proj(out)``). None where it does not apply."""
        out_proj = None
        if residual is not None:
            out_proj = kernel_weights(residual, (self.o_proj,))
            if out_proj is None:
                return None
        step = self.step_buffers(cache, *q.shape[:2]) if q.dtype == mx.float32 else None
        if step is None:
            return None
        rope, buffers = step
        fused = kernels.attention_step(q, k, v, *buffers, cache.offset, rope, self.scale, out_proj, residual)
        return None if fused is None else self._advance(cache, fused, q.shape[1])

    @staticmethod
    def _advance(cache: KVCache, fused: tuple[mx.array, mx.array, mx.array], length: int) -> mx.array:
        """A fused op's output; the cache takes the buffers it wrote ``length`` rows into."""
        out, keys, values = fused
        cache.advance(keys, values, length)
        return out

    def _attend(self, q: mx.array, k: mx.array, v: mx.array, cache: KVCache | None) -> mx.array:
        """Rope at the cache's position, the cache extended, attention: for the sequences sharing ``cache``."""
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset), self.rope(k, offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        return attention(q, k, v, self.scale, sliding_window_mask(q.shape[2], k.shape[2], self.sliding_window))
