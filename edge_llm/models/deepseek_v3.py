"""DeepSeek-V3 (V3, V3.1, R1, and models sharing its format such as Kimi-K2): DeepSeek-V2's MLA and MoE
tree with sigmoid routing, a selection-only bias and group choice by each group's two best experts.

Reference: transformers ``models/deepseek_v3/modeling_deepseek_v3.py`` (transformers 5), which always
routes with ``noaux_tc`` (whatever ``topk_method``/``scoring_func`` say) and rotates interleaved pairs
unless ``rope_interleave`` is false. Differences from it, beyond stacked experts and the latent cache:
- ``moe_layer_freq`` is honoured (DeepSeek's code and mlx-lm do; published configs all say 1);
- ``sanitize`` drops the multi-token-prediction layers (index >= ``num_hidden_layers``, used only for
  speculative decoding) and accepts mlx-lm's split ``embed_q``/``unembed_out`` form of ``kv_b_proj``;
- FP8 checkpoints (e4m3 with 128x128 ``weight_scale_inv`` blocks) are dequantized by the loader
  (``edge_llm/formats/fp8.py``) before ``sanitize`` sees them.
"""

from __future__ import annotations

import dataclasses

import mlx.core as mx

from . import deepseek_v2
from .deepseek_gate import MoEGate
from .mla import join_kv_b


@dataclasses.dataclass
class ModelArgs(deepseek_v2.ModelArgs):
    # transformers' DeepseekV3Config defaults, for keys a config leaves out
    moe_intermediate_size: int = 2048
    n_routed_experts: int | None = 256
    n_shared_experts: int | None = 1
    num_experts_per_tok: int | None = 8
    topk_method: str = "noaux_tc"
    n_group: int | None = 8
    topk_group: int | None = 4
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    first_k_dense_replace: int = 3
    max_position_embeddings: int = 4096
    rope_interleave: bool = True

    def _check_groups(self) -> None:
        self._check_group_sizes()
        require_two = (self.n_group or 1) == 1 or self.n_routed_experts // self.n_group >= 2
        deepseek_v2.require(require_two, "n_group", "each group needs at least two experts (groups rank by top-2)")


def make_gate(args: ModelArgs) -> MoEGate:
    return MoEGate(args.hidden_size, args.n_routed_experts, args.num_experts_per_tok, "noaux_tc",
                   args.n_group, args.topk_group, args.norm_topk_prob, args.routed_scaling_factor)


class Model(deepseek_v2.Model):
    def _layers(self, args: ModelArgs) -> list[deepseek_v2.DecoderLayer]:
        return deepseek_v2.decoder_layers(args, make_gate, traditional_rope=args.rope_interleave)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        weights = super().sanitize(weights)
        for i in range(self.args.num_hidden_layers):
            join_kv_b_proj(weights, f"model.layers.{i}.self_attn", self.args)
        return weights


def join_kv_b_proj(weights: dict[str, mx.array], prefix: str, args: ModelArgs) -> None:
    """mlx-lm (>= 0.30) saves V3's ``kv_b_proj`` split per head (``embed_q``, ``unembed_out``), possibly
    quantized: rebuild it in float (``mla.join_kv_b``), dequantizing once with the settings the quantization
    block gives those modules."""
    if f"{prefix}.embed_q.weight" not in weights:
        return
    parts = []
    for name in ("embed_q", "unembed_out"):
        w = weights.pop(f"{prefix}.{name}.weight")
        scales = weights.pop(f"{prefix}.{name}.scales", None)
        biases = weights.pop(f"{prefix}.{name}.biases", None)
        if scales is not None:
            q = args.quantization or {}
            settings = q.get(f"{prefix}.{name}")
            settings = settings if isinstance(settings, dict) else q
            w = mx.dequantize(w, scales, biases, group_size=settings.get("group_size", 64),
                              bits=settings.get("bits", 4), mode=settings.get("mode", "affine"))
        parts.append(w)
    weights[f"{prefix}.kv_b_proj.weight"] = join_kv_b(*parts)
