"""Mixtral: Llama attention (GQA, optional sliding window) with a sparse MoE feed-forward in every layer.

Reference: transformers ``models/mixtral/modeling_mixtral.py``; module layout from mlx-lm
``models/mixtral.py`` (``block_sparse_moe.gate`` + ``block_sparse_moe.switch_mlp.*``), so MLX-community
Mixtral files load unchanged. Attention is the shared grouped-query module (``attention.py``) without
biases; routing: softmax, top-k, renormalized over the k (always; ``moe.py``). Hub files keep experts per
expert (``experts.{e}.w1/w2/w3``: gate/down/up, stacked by ``DecoderLM.sanitize``); transformers 5 in memory
renames ``block_sparse_moe`` to ``mlp`` and fuses ``gate_up_proj``: ``sanitize`` takes all of these.
"""

from __future__ import annotations

import dataclasses
import re

import mlx.core as mx

from .attention import Attention, GQAArgs, check_heads
from .base import DecoderLayer, DecoderLM, ExpertCounts, check_experts, check_window
from .moe import SparseMoeBlock

FFN = "block_sparse_moe"
LAYER_MLP = re.compile(r"^(model\.layers\.\d+)\.mlp\.")


@dataclasses.dataclass
class ModelArgs(GQAArgs):
    # beyond the fields of base.BaseModelArgs and attention.GQAArgs; intermediate_size is each expert's width
    num_local_experts: int | None = 8  # edge_llm.formats.folder.normalize_config fills it from num_experts
    num_experts_per_tok: int = 2
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096 * 32
    rope_theta: float = 1e6
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        if self.num_local_experts is None:
            self.num_local_experts = 8
        self.head_dim = check_heads(self, self.head_dim)
        check_window(self)
        check_experts(self, self.num_local_experts)

    def expert_counts(self) -> ExpertCounts | None:
        return ExpertCounts.of(self.num_local_experts, self.num_experts_per_tok, 0, self.intermediate_size,
                               range(self.num_hidden_layers))


def decoder_layer(args: ModelArgs) -> DecoderLayer:
    # Mixtral always renormalizes the top-k probabilities (softmax over the chosen logits).
    moe = SparseMoeBlock(args.hidden_size, args.intermediate_size, args.num_local_experts, args.num_experts_per_tok,
                         norm_topk_prob=True, act=args.hidden_act)
    return DecoderLayer(args, Attention(args, sliding_window=args.sliding_window), moe, FFN)


class Model(DecoderLM):
    ffn_name = FFN
    expert_names = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}

    def __init__(self, args: ModelArgs):
        super().__init__(args, [decoder_layer(args) for _ in range(args.num_hidden_layers)])

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        # transformers 5's in-memory names: ``mlp`` for ``block_sparse_moe`` (Mixtral has no dense MLP).
        return super().sanitize({LAYER_MLP.sub(rf"\1.{FFN}.", k): v for k, v in weights.items()})
