"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): routed experts, RMS-normed queries and keys per head.

Reference: transformers ``models/qwen3_moe/modeling_qwen3_moe.py``; module layout from mlx-lm
``models/qwen3_moe.py`` (``mlp.gate``, ``mlp.switch_mlp.*``). Differences from Qwen2-MoE: no shared
expert; ``q_norm``/``k_norm`` (width ``head_dim``) applied to each head before rope; ``head_dim`` may
differ from hidden/heads; optional attention bias on all four projections; a sliding window, when
``use_sliding_window``, applies to every layer.
"""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import mlx.nn as nn

from .base import BaseModelArgs, DecoderLM, attention, check_experts, check_heads, check_window, require
from .cache import Cache
from .layers import MLP, sliding_window_mask
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
    moe_intermediate_size: int = 768
    num_experts: int | None = None
    num_local_experts: int | None = None  # the other spelling of num_experts
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] | None = None
    attention_bias: bool = False
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    use_sliding_window: bool = False
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        self.num_experts = self.num_experts if self.num_experts is not None else self.num_local_experts
        if self.num_experts is None:
            self.num_experts = 128
        self.num_local_experts = self.num_experts
        self.mlp_only_layers = list(self.mlp_only_layers or [])
        self.head_dim = check_heads(self)
        check_experts(self, self.num_experts)
        require(self.decoder_sparse_step >= 1, "decoder_sparse_step", f"{self.decoder_sparse_step} must be >= 1")
        check_window(self, used=self.use_sliding_window)
        if not self.use_sliding_window:
            self.sliding_window = None  # transformers ignores the window unless use_sliding_window

    def is_sparse(self, layer: int) -> bool:
        return (
            layer not in self.mlp_only_layers and self.num_experts > 0
            and (layer + 1) % self.decoder_sparse_step == 0
        )


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            args.num_attention_heads, args.num_key_value_heads, args.head_dim,
        )
        self.scale = self.head_dim**-0.5
        self.sliding_window = args.sliding_window
        bias = args.attention_bias
        self.q_proj = nn.Linear(args.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, args.hidden_size, bias=bias)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
        self.rope = RoPE(self.head_dim, args.rope_theta, args.rope_scaling, args.max_position_embeddings)

    def __call__(self, x: mx.array, cache: Cache | None) -> mx.array:
        B, L, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(B, L, self.n_heads, -1)).transpose(0, 2, 1, 3)  # [B, H, L, D]
        k = self.k_norm(self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset), self.rope(k, offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        mask = sliding_window_mask(L, k.shape[2], self.sliding_window)
        out = attention(q, k, v, self.scale, mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.self_attn = Attention(args)
        if args.is_sparse(layer):
            self.mlp = SparseMoeBlock(args.hidden_size, args.moe_intermediate_size, args.num_experts,
                                      args.num_experts_per_tok, args.norm_topk_prob, act=args.hidden_act)
        else:
            self.mlp = MLP(args.hidden_size, args.intermediate_size, act=args.hidden_act)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, cache: Cache | None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Model(DecoderLM):
    def __init__(self, args: ModelArgs):
        super().__init__(args, [DecoderLayer(args, i) for i in range(args.num_hidden_layers)])

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        weights = super().sanitize(weights)
        for i in range(self.args.num_hidden_layers):
            if self.args.is_sparse(i):
                prefix = f"model.layers.{i}.mlp"
                stack_moe_experts(weights, prefix, prefix, self.args.num_experts, GLU_NAMES)
        return weights
