"""Llama family: Llama 2/3, Mistral, DeepSeek LLM 7B/67B, deepseek-coder, SmolLM2.

Reference: transformers ``models/llama/modeling_llama.py`` and ``models/mistral``. Grouped-query attention
(``attention.py``; ``attention_bias`` on all four projections, Mistral's ``sliding_window``), a SwiGLU MLP
(``mlp_bias``), pre-norm residual layers (``base.DecoderLayer``). Differences: the rotary embedding is
applied with ``mx.fast.rope`` (rotate-half, as HF); Mistral's sliding window becomes an explicit mask only
once the keys outgrow the window.
"""

from __future__ import annotations

import dataclasses

from .attention import Attention, GQAArgs, check_heads
from .base import DecoderLayer, DecoderLM, check_window
from .layers import MLP


@dataclasses.dataclass
class ModelArgs(GQAArgs):
    # beyond the fields of base.BaseModelArgs and attention.GQAArgs
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        self.head_dim = check_heads(self, self.head_dim)
        check_window(self)


def decoder_layer(args: ModelArgs) -> DecoderLayer:
    bias = args.attention_bias
    attention = Attention(args, qkv_bias=bias, o_bias=bias, sliding_window=args.sliding_window)
    return DecoderLayer(args, attention, MLP(args.hidden_size, args.intermediate_size, bias=args.mlp_bias,
                                             act=args.hidden_act))


class Model(DecoderLM):
    def __init__(self, args: ModelArgs):
        super().__init__(args, [decoder_layer(args) for _ in range(args.num_hidden_layers)])
