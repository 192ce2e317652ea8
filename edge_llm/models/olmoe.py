"""OLMoE (allenai/OLMoE-1B-7B): sparse MoE in every layer, RMS-normed full-width queries and keys.

Reference: transformers ``models/olmoe/modeling_olmoe.py``; module layout from mlx-lm
``models/olmoe.py`` (``mlp.gate``, ``mlp.switch_mlp.*``). Differences from Qwen3-MoE: ``q_norm`` and
``k_norm`` normalize the whole projected q (``heads * head_dim`` wide) and k (``kv_heads * head_dim``),
not each head; then, with ``clip_qkv``, q, k and v are clamped to ``[-clip_qkv, clip_qkv]`` (both flags
of the shared ``attention.py``). Experts are ``intermediate_size`` wide; routing is softmax top-k with
optional ``norm_topk_prob``; no sliding window.
"""

from __future__ import annotations

import dataclasses

from .attention import Attention, GQAArgs, check_heads
from .base import DecoderLayer, DecoderLM, ExpertCounts, check_experts, require
from .moe import SparseMoeBlock


@dataclasses.dataclass
class ModelArgs(GQAArgs):
    # beyond the fields of base.BaseModelArgs and attention.GQAArgs; intermediate_size is each expert's width
    num_experts: int | None = 64  # edge_llm.formats.folder.normalize_config fills it from num_local_experts
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = False
    attention_bias: bool = False
    clip_qkv: float | None = None
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096

    def __post_init__(self) -> None:
        if self.num_experts is None:
            self.num_experts = 64
        self.head_dim = check_heads(self, self.head_dim)
        check_experts(self, self.num_experts)
        require(self.clip_qkv is None or self.clip_qkv > 0, "clip_qkv", f"{self.clip_qkv} must be positive")

    def expert_counts(self) -> ExpertCounts | None:
        return ExpertCounts.of(self.num_experts, self.num_experts_per_tok, 0, self.intermediate_size,
                               range(self.num_hidden_layers))


def decoder_layer(args: ModelArgs) -> DecoderLayer:
    bias = args.attention_bias
    attention = Attention(args, qkv_bias=bias, o_bias=bias, qk_norm="full", clip_qkv=args.clip_qkv)
    moe = SparseMoeBlock(args.hidden_size, args.intermediate_size, args.num_experts, args.num_experts_per_tok,
                         args.norm_topk_prob, act=args.hidden_act)
    return DecoderLayer(args, attention, moe)


class Model(DecoderLM):
    def __init__(self, args: ModelArgs):
        super().__init__(args, [decoder_layer(args) for _ in range(args.num_hidden_layers)])
