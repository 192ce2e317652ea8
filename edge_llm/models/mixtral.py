"""Mixtral: Llama attention (GQA, optional sliding window) with a sparse MoE feed-forward in every layer.

Reference: transformers ``models/mixtral/modeling_mixtral.py``; module layout from mlx-lm
``models/mixtral.py`` (``block_sparse_moe.gate`` + ``block_sparse_moe.switch_mlp.*``), so MLX-community
Mixtral files load unchanged. Routing: softmax, top-k, renormalized over the k (always). Hub files
keep experts per expert (``experts.{e}.w1/w2/w3``: gate/down/up); transformers 5 in memory renames
``block_sparse_moe`` to ``mlp`` and fuses ``gate_up_proj``: ``sanitize`` takes all of these.
"""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import mlx.nn as nn

from .base import BaseModelArgs, DecoderLM, attention, check_experts, check_heads, check_window
from .cache import Cache
from .layers import sliding_window_mask
from .moe import SparseMoeBlock, stack_moe_experts
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
    num_local_experts: int | None = None
    num_experts: int | None = None  # the other spelling of num_local_experts
    num_experts_per_tok: int = 2
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096 * 32
    rope_theta: float = 1e6
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        self.num_local_experts = self.num_local_experts or self.num_experts or 8
        self.num_experts = self.num_local_experts
        self.head_dim = check_heads(self)
        check_window(self)
        check_experts(self, self.num_local_experts)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            args.num_attention_heads, args.num_key_value_heads, args.head_dim,
        )
        self.scale = self.head_dim**-0.5
        self.sliding_window = args.sliding_window
        self.q_proj = nn.Linear(args.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, args.hidden_size, bias=False)
        self.rope = RoPE(self.head_dim, args.rope_theta, args.rope_scaling, args.max_position_embeddings)

    def __call__(self, x: mx.array, cache: Cache | None) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)  # [B, H, L, D]
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset), self.rope(k, offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        mask = sliding_window_mask(L, k.shape[2], self.sliding_window)
        out = attention(q, k, v, self.scale, mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        # Mixtral always renormalizes the top-k probabilities (softmax over the chosen logits).
        self.block_sparse_moe = SparseMoeBlock(
            args.hidden_size, args.intermediate_size, args.num_local_experts, args.num_experts_per_tok,
            norm_topk_prob=True, act=args.hidden_act,
        )
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, cache: Cache | None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), cache)
        return h + self.block_sparse_moe(self.post_attention_layernorm(h))


class Model(DecoderLM):
    def __init__(self, args: ModelArgs):
        super().__init__(args, [DecoderLayer(args) for _ in range(args.num_hidden_layers)])

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        weights = super().sanitize(weights)
        for i in range(self.args.num_hidden_layers):
            prefix = f"model.layers.{i}"
            # transformers 5's in-memory names: ``mlp`` for ``block_sparse_moe`` (Mixtral has no dense MLP).
            for key in [k for k in weights if k.startswith(f"{prefix}.mlp.")]:
                weights[key.replace(f"{prefix}.mlp.", f"{prefix}.block_sparse_moe.", 1)] = weights.pop(key)
            stack_moe_experts(
                weights, f"{prefix}.block_sparse_moe", f"{prefix}.block_sparse_moe", self.args.num_local_experts,
                {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"},
            )
        return weights
