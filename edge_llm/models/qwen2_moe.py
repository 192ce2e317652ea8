"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): routed experts plus a sigmoid-gated shared expert.

Reference: transformers ``models/qwen2_moe/modeling_qwen2_moe.py``; module layout from mlx-lm
``models/qwen2_moe.py`` (``mlp.gate``, ``mlp.switch_mlp.*``, ``mlp.shared_expert.*``,
``mlp.shared_expert_gate``). Differences from Mixtral: q/k/v carry a bias (``qkv_bias``, o_proj none) and
the head size is always hidden / heads (the shared ``attention.py`` with those flags); top-k weights are
renormalized only with ``norm_topk_prob``; a layer is sparse when it is not in ``mlp_only_layers`` and
``(i + 1) % decoder_sparse_step == 0``, else a dense MLP of ``intermediate_size``; sliding windows apply
per layer (``layer_types``, derived as transformers does when absent).
"""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import mlx.nn as nn

from .attention import Attention, GQAArgs, check_heads
from .base import DecoderLayer, DecoderLM, ExpertCounts, check_experts, check_window, require
from .layers import MLP
from .moe import SparseMoeBlock


@dataclasses.dataclass
class ModelArgs(GQAArgs):
    # beyond the fields of base.BaseModelArgs and attention.GQAArgs
    moe_intermediate_size: int = 1408
    shared_expert_intermediate_size: int = 5632
    num_experts: int | None = 60  # edge_llm.formats.folder.normalize_config fills it from num_local_experts
    num_experts_per_tok: int = 4
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] | None = None
    qkv_bias: bool = True
    max_position_embeddings: int = 32768
    use_sliding_window: bool = False
    sliding_window: int | None = 4096
    max_window_layers: int = 28
    layer_types: list[str] | None = None
    head_dim: int = dataclasses.field(init=False)  # hidden / heads: transformers reads no head_dim here

    def __post_init__(self) -> None:
        if self.num_experts is None:
            self.num_experts = 60
        self.mlp_only_layers = list(self.mlp_only_layers or [])
        self.head_dim = check_heads(self, None)
        check_experts(self, self.num_experts)
        check_window(self, used=self.use_sliding_window)
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

    def expert_counts(self) -> ExpertCounts | None:
        return ExpertCounts.of(self.num_experts, self.num_experts_per_tok, 1, self.moe_intermediate_size,
                               filter(self.is_sparse, range(self.num_hidden_layers)))


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


def decoder_layer(args: ModelArgs, layer: int) -> DecoderLayer:
    attention = Attention(args, qkv_bias=args.qkv_bias, sliding_window=args.window(layer))
    if args.is_sparse(layer):
        return DecoderLayer(args, attention, Qwen2MoeSparseMoeBlock(args))
    return DecoderLayer(args, attention, MLP(args.hidden_size, args.intermediate_size, act=args.hidden_act))


class Model(DecoderLM):
    def __init__(self, args: ModelArgs):
        super().__init__(args, [decoder_layer(args, i) for i in range(args.num_hidden_layers)])
