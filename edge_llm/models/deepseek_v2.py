"""DeepSeek-V2 (V2, V2-Lite, V2.5, Coder-V2): MLA attention and a softmax-routed MoE with shared experts.

Reference: transformers ``models/deepseek_v2/modeling_deepseek_v2.py`` (transformers 5). Differences:
- the experts are stacked (``mlp.switch_mlp.{gate,up,down}_proj``, mlx-lm's layout) and run with gather
  matmuls; ``sanitize`` stacks the per-expert checkpoint tensors (``DecoderLM.sanitize``, as every MoE here);
- the cache holds only MLA's latent, and decoding attends over it directly (see ``mla.py``);
- ``moe_layer_freq`` and V2's ``norm_topk_prob`` follow DeepSeek's own modeling code (and mlx-lm):
  transformers 5 ignores both. Every published V2 config has moe_layer_freq 1 and norm_topk_prob false,
  where all three agree.
DeepSeek-V3 (``deepseek_v3.py``) reuses this module tree with its own router and defaults.
"""

from __future__ import annotations

import dataclasses
import re

import mlx.core as mx
import mlx.nn as nn

from .base import BaseModelArgs, DecoderLayer, DecoderLM, ExpertCounts, PrefillWidths, check_widths, require
from .cache import LatentCache
from .deepseek_gate import SOFTMAX_METHODS, DeepseekMoE, MoEGate
from .layers import MLP
from .mla import MLAttention


@dataclasses.dataclass
class ModelArgs(BaseModelArgs):
    # beyond the fields of base.BaseModelArgs
    moe_intermediate_size: int = 1407
    n_routed_experts: int | None = 64
    n_shared_experts: int | None = 2
    num_experts_per_tok: int | None = None
    topk_method: str = "greedy"
    n_group: int | None = None
    topk_group: int | None = None
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    attention_bias: bool = False
    mlp_bias: bool = False
    quantization: dict | None = None  # the MLX quantization block, when the checkpoint has one

    def __post_init__(self) -> None:
        check_widths(n_shared_experts=(self.n_shared_experts or 0) * self.moe_intermediate_size,
                     num_attention_heads=self.num_attention_heads * (self.qk_nope_head_dim + self.qk_rope_head_dim
                                                                     + self.v_head_dim),
                     kv_lora_rank=self.kv_lora_rank + self.qk_rope_head_dim)  # fmt: skip
        if self.n_routed_experts:
            require(bool(self.num_experts_per_tok), "num_experts_per_tok", "must be set when n_routed_experts is")
            require(self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok",
                    f"{self.num_experts_per_tok} exceeds n_routed_experts {self.n_routed_experts}")
            require(self.moe_layer_freq >= 1, "moe_layer_freq", f"must be >= 1, got {self.moe_layer_freq}")
            self._check_groups()

    def _check_groups(self) -> None:
        require(self.topk_method in SOFTMAX_METHODS, "topk_method",
                f"{self.topk_method!r} is not supported for DeepSeek-V2 (supported: {', '.join(SOFTMAX_METHODS)})")
        if self.topk_method == "group_limited_greedy":
            self._check_group_sizes()

    def _check_group_sizes(self) -> None:
        n_group, topk_group = self.n_group or 1, self.topk_group or 1
        require(self.n_routed_experts % n_group == 0, "n_group",
                f"{n_group} does not divide n_routed_experts {self.n_routed_experts}")
        require(1 <= topk_group <= n_group, "topk_group", f"{topk_group} must be between 1 and n_group {n_group}")
        require(topk_group * self.n_routed_experts // n_group >= self.num_experts_per_tok, "topk_group",
                f"{topk_group} groups hold fewer experts than num_experts_per_tok {self.num_experts_per_tok}")

    def is_moe_layer(self, index: int) -> bool:
        return bool(self.n_routed_experts) and index >= self.first_k_dense_replace \
            and index % self.moe_layer_freq == 0

    def expert_counts(self) -> ExpertCounts | None:
        return ExpertCounts.of(self.n_routed_experts, self.num_experts_per_tok, self.n_shared_experts or 0,
                               self.moe_intermediate_size, filter(self.is_moe_layer, range(self.num_hidden_layers)))

    def cache_rows(self) -> tuple[int, int]:
        """MLA caches one latent per token and layer, shared by all heads (``mla.py``)."""
        return self.num_hidden_layers, self.kv_lora_rank + self.qk_rope_head_dim

    def attention_parameters(self) -> int:
        h, heads, qk = self.hidden_size, self.num_attention_heads, self.qk_nope_head_dim + self.qk_rope_head_dim
        q = h * heads * qk if self.q_lora_rank is None else self.q_lora_rank * (h + heads * qk)
        kv = h * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank * heads * (
            self.qk_nope_head_dim + self.v_head_dim)
        return q + kv + heads * self.v_head_dim * h

    def prefill_widths(self) -> PrefillWidths:
        # a prefill that expands the latent holds every head's keys and values for each key
        expanded = self.num_attention_heads * (self.qk_nope_head_dim + self.qk_rope_head_dim + self.v_head_dim)
        return dataclasses.replace(super().prefill_widths(), expanded_kv=expanded)


def make_gate(args: ModelArgs) -> MoEGate:
    return MoEGate(args.hidden_size, args.n_routed_experts, args.num_experts_per_tok, args.topk_method,
                   args.n_group, args.topk_group, args.norm_topk_prob, args.routed_scaling_factor)


def decoder_layers(args: ModelArgs, make_gate=make_gate, traditional_rope: bool = True) -> list[DecoderLayer]:
    def feed_forward(layer: int) -> nn.Module:
        if args.is_moe_layer(layer):
            return DeepseekMoE(args.hidden_size, args.moe_intermediate_size, args.n_routed_experts,
                               args.n_shared_experts, make_gate(args), act=args.hidden_act, shared_bias=args.mlp_bias)
        return MLP(args.hidden_size, args.intermediate_size, bias=args.mlp_bias, act=args.hidden_act)

    return [DecoderLayer(args, MLAttention(args, traditional_rope), feed_forward(i))
            for i in range(args.num_hidden_layers)]


class Model(DecoderLM):
    # The router stays float32 whatever the compute dtype (transformers keeps it so; the selection
    # bias of V3 is too fine for bfloat16). The loader skips casting parameters whose path has these.
    keep_float32 = (".mlp.gate.",)

    def __init__(self, args: ModelArgs):
        super().__init__(args, self._layers(args))

    def _layers(self, args: ModelArgs) -> list[DecoderLayer]:
        return decoder_layers(args, make_gate, traditional_rope=True)

    def make_cache(self, kv_bits: int | None = None) -> list[LatentCache]:
        return [LatentCache(kv_bits) for _ in self.layers]

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Drops multi-token-prediction layers (and what every decoder drops); stacks experts into ``switch_mlp``."""
        n_layers = self.args.num_hidden_layers
        layer_index = re.compile(r"^model\.layers\.(\d+)\.")

        def keep(name: str) -> bool:
            m = layer_index.match(name)
            return not (m and int(m.group(1)) >= n_layers)

        return super().sanitize({k: v for k, v in weights.items() if keep(k)})
