"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): routed experts plus a sigmoid-gated shared expert.

Reference: transformers ``models/qwen2_moe/modeling_qwen2_moe.py``; module layout from mlx-lm
``models/qwen2_moe.py`` (``mlp.gate``, ``mlp.switch_mlp.*``, ``mlp.shared_expert.*``,
``mlp.shared_expert_gate``). Differences from Mixtral: q/k/v carry a bias (``qkv_bias``, o_proj none);
top-k weights are renormalized only with ``norm_topk_prob``; a layer is sparse when it is not in
``mlp_only_layers`` and ``(i + 1) % decoder_sparse_step == 0``, else a dense MLP of
``intermediate_size``; sliding windows apply per layer (``layer_types``, derived as transformers does
when absent).
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
    moe_intermediate_size: int = 1408
    shared_expert_intermediate_size: int = 5632
    num_experts: int | None = None
    num_local_experts: int | None = None  # the other spelling of num_experts
    num_experts_per_tok: int = 4
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] | None = None
    qkv_bias: bool = True
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    use_sliding_window: bool = False
    sliding_window: int | None = 4096
    max_window_layers: int = 28
    layer_types: list[str] | None = None

    def __post_init__(self) -> None:
        self.num_experts = self.num_experts if self.num_experts is not None else self.num_local_experts
        if self.num_experts is None:
            self.num_experts = 60
        self.num_local_experts = self.num_experts
        self.mlp_only_layers = list(self.mlp_only_layers or [])
        check_heads(self)
        check_experts(self, self.num_experts)
        check_window(self, used=self.use_sliding_window)
        require(self.decoder_sparse_step >= 1, "decoder_sparse_step", f"{self.decoder_sparse_step} must be >= 1")
        if self.layer_types is None:
            # transformers' rule: layers 0, 2, 4, ... below max_window_layers slide.
            self.layer_types = [
                "sliding_attention" if self.use_sliding_window and (i + 1) % 2 and i < self.max_window_layers
                else "full_attention"
                for i in range(self.num_hidden_layers)
            ]
        require(len(self.layer_types) == self.num_hidden_layers, "layer_types",
                f"{len(self.layer_types)} entries for {self.num_hidden_layers} layers")

    def is_sparse(self, layer: int) -> bool:
        return (
            layer not in self.mlp_only_layers and self.num_experts > 0
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    def window(self, layer: int) -> int | None:
        sliding = self.use_sliding_window and self.layer_types[layer] == "sliding_attention"
        return self.sliding_window if sliding and self.sliding_window else None


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.n_heads, self.n_kv_heads = args.num_attention_heads, args.num_key_value_heads
        self.head_dim = args.hidden_size // args.num_attention_heads
        self.scale = self.head_dim**-0.5
        self.sliding_window = args.window(layer)
        self.q_proj = nn.Linear(args.hidden_size, self.n_heads * self.head_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias=args.qkv_bias)
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


class Qwen2MoeSparseMoeBlock(SparseMoeBlock):
    """Routed experts plus one always-on shared expert scaled by ``sigmoid(shared_expert_gate(x))``."""

    def __init__(self, args: ModelArgs):
        super().__init__(args.hidden_size, args.moe_intermediate_size, args.num_experts, args.num_experts_per_tok,
                         args.norm_topk_prob, act=args.hidden_act)
        self.shared_expert = MLP(args.hidden_size, args.shared_expert_intermediate_size, act=args.hidden_act)
        self.shared_expert_gate = nn.Linear(args.hidden_size, 1, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        shared = mx.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return super().__call__(x) + shared


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.self_attn = Attention(args, layer)
        if args.is_sparse(layer):
            self.mlp = Qwen2MoeSparseMoeBlock(args)
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
