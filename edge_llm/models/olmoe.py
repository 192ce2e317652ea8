"""OLMoE (allenai/OLMoE-1B-7B): sparse MoE in every layer, RMS-normed full-width queries and keys.

Reference: transformers ``models/olmoe/modeling_olmoe.py``; module layout from mlx-lm
``models/olmoe.py`` (``mlp.gate``, ``mlp.switch_mlp.*``). Differences from Qwen3-MoE: ``q_norm`` and
``k_norm`` normalize the whole projected q (``heads * head_dim`` wide) and k (``kv_heads * head_dim``),
not each head; then, with ``clip_qkv``, q, k and v are clamped to ``[-clip_qkv, clip_qkv]``. Experts
are ``intermediate_size`` wide; routing is softmax top-k with optional ``norm_topk_prob``; no sliding
window.
"""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import mlx.nn as nn

from .base import BaseModelArgs, DecoderLM, attention, check_experts, check_heads, require
from .cache import Cache
from .moe import GLU_NAMES, SparseMoeBlock, stack_moe_experts
from .rope import RoPE


@dataclasses.dataclass
class ModelArgs(BaseModelArgs):
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    num_experts: int | None = None
    num_local_experts: int | None = None  # the other spelling of num_experts
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = False
    attention_bias: bool = False
    clip_qkv: float | None = None
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        self.num_experts = self.num_experts if self.num_experts is not None else self.num_local_experts
        if self.num_experts is None:
            self.num_experts = 64
        self.num_local_experts = self.num_experts
        self.head_dim = check_heads(self)
        check_experts(self, self.num_experts)
        require(self.clip_qkv is None or self.clip_qkv > 0, "clip_qkv", f"{self.clip_qkv} must be positive")


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            args.num_attention_heads, args.num_key_value_heads, args.head_dim,
        )
        self.scale = self.head_dim**-0.5
        self.clip_qkv = args.clip_qkv
        bias = args.attention_bias
        self.q_proj = nn.Linear(args.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, args.hidden_size, bias=bias)
        self.q_norm = nn.RMSNorm(self.n_heads * self.head_dim, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(self.n_kv_heads * self.head_dim, eps=args.rms_norm_eps)
        self.rope = RoPE(self.head_dim, args.rope_theta, args.rope_scaling, args.max_position_embeddings)

    def __call__(self, x: mx.array, cache: Cache | None) -> mx.array:
        B, L, _ = x.shape
        q, k, v = self.q_norm(self.q_proj(x)), self.k_norm(self.k_proj(x)), self.v_proj(x)  # [B, L, H*D]
        if self.clip_qkv is not None:
            q, k, v = (mx.clip(t, -self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)  # [B, H, L, D]
        k = k.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = v.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset), self.rope(k, offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = attention(q, k, v, self.scale, "causal" if L > 1 else None)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = SparseMoeBlock(args.hidden_size, args.intermediate_size, args.num_experts,
                                  args.num_experts_per_tok, args.norm_topk_prob, act=args.hidden_act)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, cache: Cache | None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Model(DecoderLM):
    def __init__(self, args: ModelArgs):
        super().__init__(args, [DecoderLayer(args) for _ in range(args.num_hidden_layers)])

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        weights = super().sanitize(weights)
        for i in range(self.args.num_hidden_layers):
            prefix = f"model.layers.{i}.mlp"
            stack_moe_experts(weights, prefix, prefix, self.args.num_experts, GLU_NAMES)
        return weights
