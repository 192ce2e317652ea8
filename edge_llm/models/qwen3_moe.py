"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): routed experts, RMS-normed queries and keys per head.

Reference: transformers ``models/qwen3_moe/modeling_qwen3_moe.py``; module layout from mlx-lm
``models/qwen3_moe.py`` (``mlp.gate``, ``mlp.switch_mlp.*``). Differences from Qwen2-MoE: no shared
expert; ``q_norm``/``k_norm`` (width ``head_dim``) applied to each head before rope, ``head_dim`` may
differ from hidden/heads, optional attention bias on all four projections (the shared ``attention.py``
with those flags); a sliding window, when ``use_sliding_window``, applies to every layer.
"""

from __future__ import annotations

import dataclasses

from .attention import Attention, GQAArgs, check_heads
from .base import DecoderLayer, DecoderLM, ExpertCounts, check_experts, check_window
from .layers import MLP
from .moe import SparseMoeBlock


@dataclasses.dataclass
class ModelArgs(GQAArgs):
    # beyond the fields of base.BaseModelArgs and attention.GQAArgs
    moe_intermediate_size: int = 768
    num_experts: int | None = 128  # edge_llm.formats.folder.normalize_config fills it from num_local_experts
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] | None = None
    attention_bias: bool = False
    max_position_embeddings: int = 32768
    use_sliding_window: bool = False
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        if self.num_experts is None:
            self.num_experts = 128
        self.mlp_only_layers = list(self.mlp_only_layers or [])
        self.head_dim = check_heads(self, self.head_dim)
        check_experts(self, self.num_experts)
        check_window(self, used=self.use_sliding_window)
        if not self.use_sliding_window:
            self.sliding_window = None  # transformers ignores the window unless use_sliding_window

    def is_sparse(self, layer: int) -> bool:
        return (
            layer not in self.mlp_only_layers and self.num_experts > 0
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    def expert_counts(self) -> ExpertCounts | None:
        return ExpertCounts.of(self.num_experts, self.num_experts_per_tok, 0, self.moe_intermediate_size,
                               filter(self.is_sparse, range(self.num_hidden_layers)))


def decoder_layer(args: ModelArgs, layer: int) -> DecoderLayer:
    bias = args.attention_bias
    attention = Attention(args, qkv_bias=bias, o_bias=bias, qk_norm="head", sliding_window=args.sliding_window)
    if args.is_sparse(layer):
        ffn = SparseMoeBlock(args.hidden_size, args.moe_intermediate_size, args.num_experts, args.num_experts_per_tok,
                             args.norm_topk_prob, act=args.hidden_act)
    else:
        ffn = MLP(args.hidden_size, args.intermediate_size, act=args.hidden_act)
    return DecoderLayer(args, attention, ffn)


class Model(DecoderLM):
    def __init__(self, args: ModelArgs):
        super().__init__(args, [decoder_layer(args, i) for i in range(args.num_hidden_layers)])
