"""What every architecture shares: config parsing and checks, the model interface, the decoder skeleton.

The model interface (``CausalLM``) answers what callers need to know about a model's shape: its experts,
tied embeddings, context length, KV cache bytes per token, the parameters a token uses. Each answer comes
from the architecture's ``ModelArgs`` (MoE architectures name their experts, the attention its cache rows),
so a config can be asked before any module exists (``formats.validate``).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterable
from fractions import Fraction
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .. import kernels
from ..limits import MAX_DIM
from .cache import Cache, KVCache, check_kv_bits, row_nbytes
from .fields import check_fields
from .fused_stack import fused_layers
from .layers import RMSNorm, output_projection
from .moe import GLU_NAMES, stack_moe_experts
from .watched import Watched

# Every architecture keeps its routed experts stacked under ``switch_mlp`` (moe.py, deepseek_gate.py).
ROUTED_EXPERTS = ".switch_mlp."


@dataclasses.dataclass(frozen=True)
class ExpertCounts:
    """A Mixture-of-Experts model's experts."""

    routed: int  # routed experts per MoE layer (the router picks among them)
    active: int  # routed experts each token runs through (num_experts_per_tok)
    shared: int  # always-on shared experts per MoE layer (0: none)
    layers: tuple[int, ...]  # the MoE layers (the others have a dense feed-forward)
    intermediate_size: int  # the hidden width of one routed expert

    @classmethod
    def of(cls, routed: int | None, active: int, shared: int, intermediate_size: int,
           layers: Iterable[int]) -> ExpertCounts | None:
        """The counts, or None where no layer routes (no routed experts, or no MoE layer)."""
        layers = tuple(layers) if routed else ()
        return cls(routed, active, shared, layers, intermediate_size) if layers else None


@dataclasses.dataclass(frozen=True)
class PrefillWidths:
    """Values per token a prefill holds besides the residual stream (the estimator's activation terms)."""

    scores: int  # attention scores per query and key: the query heads
    feed_forward: int  # the widest feed-forward intermediate (a token routed to k experts counts k times)
    expanded_kv: int = 0  # MLA: keys and values expanded from the latent per head, per key


@dataclasses.dataclass
class BaseModelArgs:
    """The Hugging Face config fields every architecture reads, with transformers' LlamaConfig defaults (an
    architecture redeclares a field whose default differs); ``from_dict`` ignores keys no field names.

    The methods answer the model interface from the config alone; each architecture's ``ModelArgs``
    implements the attention's (``attention.GQAArgs`` for grouped-query attention, DeepSeek's for MLA).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False

    @classmethod
    def from_dict(cls, config: dict[str, Any]):
        """Checks each field's type and range first (``fields.RULES``): ValueError naming the field."""
        params = inspect.signature(cls).parameters
        return cls(**check_fields(config, {k: p.default is not p.empty for k, p in params.items()}))

    def expert_counts(self) -> ExpertCounts | None:
        return None

    def cache_rows(self) -> tuple[int, int]:
        """(rows one token adds to the caches of all layers, values per row)."""
        raise NotImplementedError

    def attention_parameters(self) -> int:
        """The weights of one layer's attention projections."""
        raise NotImplementedError

    def prefill_widths(self) -> PrefillWidths:
        experts = self.expert_counts()
        routed = experts.active * experts.intermediate_size if experts else 0
        return PrefillWidths(self.num_attention_heads, max(self.intermediate_size, routed))


def require(condition: bool, field: str, message: str) -> None:
    """Raises the ValueError a bad config combination deserves, naming the field."""
    if not condition:
        raise ValueError(f"config field {field!r}: {message}")


def check_widths(**widths: int) -> None:
    """Layer widths that are products of config fields (heads x head size, shared experts x their size)
    must fit MLX's 32-bit shapes; each field alone is bounded by its rule."""
    for name, width in widths.items():
        require(width <= MAX_DIM, name, f"makes a layer {width:,} wide, more than MLX's 2^31-1 limit")


def check_window(args: BaseModelArgs, used: bool = True) -> None:
    """A sliding window of 0 keys would hide every earlier token; null means no window. (Some configs write
    0 where the window is switched off, e.g. Qwen2-MoE's without ``use_sliding_window``: harmless there.)"""
    require(not used or args.sliding_window != 0, "sliding_window",
            "is 0, which would hide every earlier token; write null for no window")


def check_experts(args: BaseModelArgs, experts: int | None) -> None:
    """Each token is routed to ``num_experts_per_tok`` of the ``experts`` of a sparse layer."""
    if experts:
        require(args.num_experts_per_tok <= experts, "num_experts_per_tok",
                f"{args.num_experts_per_tok} exceeds the {experts} experts per layer")


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: str | mx.array | None) -> mx.array:
    """Scaled dot-product attention; q [B, H, L, D], k/v [B, H_kv, T, D] (GQA handled by MLX)."""
    return kernels.attention(q, k, v, scale, mask)


class CausalLM(nn.Module):
    """Interface every architecture implements.

    ``model(tokens [B, L], cache) -> logits [B, L, V]``; ``make_cache()`` gives one cache per layer;
    ``sanitize`` maps checkpoint tensors to module parameters (pure, unit-tested). The properties and
    methods below describe the model's shape, so that no caller reads config fields.
    """

    args: BaseModelArgs
    # parameters whose path contains one of these stay float32 whatever the compute dtype (MoE routers)
    keep_float32: tuple[str, ...] = ()

    def make_cache(self, kv_bits: int | None = None) -> list[Cache]:
        """One cache per layer; ``kv_bits`` (8 or 4) stores keys and values quantized."""
        return [KVCache(kv_bits) for _ in self.layers]

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        return weights

    @property
    def experts(self) -> ExpertCounts | None:
        """Routed, active and shared experts (None for a dense model)."""
        return self.args.expert_counts()

    @property
    def tied_embeddings(self) -> bool:
        """Whether the output projection is the embedding table."""
        return self.args.tie_word_embeddings

    @property
    def context_length(self) -> int | None:
        """The longest context the model was made for (``max_position_embeddings``)."""
        return self.args.max_position_embeddings

    @property
    def prefill_widths(self) -> PrefillWidths:
        return self.args.prefill_widths()

    def kv_bytes_per_token(self, dtype_bytes: int, kv_bits: int | None = None) -> int:
        """Bytes ``make_cache(kv_bits)`` holds per token (batch 1) when its rows are ``dtype_bytes`` floats:
        quantized, the packed codes plus a scale and an offset per group (``cache.row_nbytes``)."""
        check_kv_bits(kv_bits)
        rows, width = self.args.cache_rows()
        return rows * row_nbytes(width, dtype_bytes, kv_bits)

    def token_share(self, name: str) -> Fraction:
        """The share of parameter ``name`` (its post-``sanitize`` path; scales and biases of a quantized
        weight too) that decoding one token reads: ``active`` of ``routed`` slices of a routed-expert stack,
        one row of an untied embedding table (tied, it is the output projection and read whole), all of
        anything else."""
        if name.startswith("model.embed_tokens.") and not self.tied_embeddings:
            return Fraction(1, self.args.vocab_size)
        experts = self.experts
        if experts and ROUTED_EXPERTS in name:
            return Fraction(experts.active, experts.routed)
        return Fraction(1)

    def active_parameters_per_token(self) -> int:
        """Parameters one token computes with: all but the routed experts, and ``active`` of ``routed`` of
        those (the "A3B" of Qwen3-30B-A3B); embeddings count whole. A quantized weight counts its unpacked
        values, its scales and biases none."""
        experts, modules = self.experts, dict(self.named_modules())
        total = Fraction(0)
        for name, value in tree_flatten(self.parameters()):
            path, _, leaf = name.rpartition(".")
            module = modules[path]
            quantized = "scales" in module and leaf in ("weight", "scales", "biases")
            count = (value.size * 32 // module.bits if leaf == "weight" else 0) if quantized else value.size
            routed = experts is not None and ROUTED_EXPERTS in name
            total += count * Fraction(experts.active, experts.routed) if routed else count
        return round(total)


class DecoderLayer(Watched):
    """The pre-norm residual block of every architecture here: ``h = x + attn(norm(x))``, then
    ``h + ffn(norm(h))``. The feed-forward sits under the checkpoint's name for it (``mlp``, or Mixtral's
    ``block_sparse_moe``): a dense MLP or an MoE block."""

    def __init__(self, args: BaseModelArgs, self_attn: nn.Module, ffn: nn.Module, ffn_name: str = "mlp"):
        super().__init__()
        self.self_attn = self_attn
        setattr(self, ffn_name, ffn)
        self.ffn_name = ffn_name
        self.input_layernorm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, cache: Cache | None) -> mx.array:
        # the halves that can take their norm and residual into their own ops (decoding on the CPU) do
        attn, ffn = self.self_attn, self[self.ffn_name]
        if hasattr(attn, "residual_block"):
            h = attn.residual_block(x, self.input_layernorm, cache)
        else:
            h = x + attn(self.input_layernorm(x), cache)
        if hasattr(ffn, "residual_block"):
            return ffn.residual_block(h, self.post_attention_layernorm)
        return h + ffn(self.post_attention_layernorm(h))

    def plan_args(self, x: mx.array) -> dict | None:
        """The layer as ``kernels.DecodePlan`` holds it (both halves one op each for ``x``), or None."""
        attn, ffn = self.self_attn, self[self.ffn_name]
        if not (hasattr(attn, "plan_args") and hasattr(ffn, "plan_args")):
            return None
        first = attn.plan_args(x, self.input_layernorm)
        second = ffn.plan_args(x, self.post_attention_layernorm) if first is not None else None
        return None if second is None else first | second


class DecoderStack(nn.Module):
    """The ``model.`` part of a Hugging Face decoder: token embedding, the layers, the final norm."""

    def __init__(self, args: BaseModelArgs, layers: list[nn.Module]):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = layers
        self.norm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, tokens: mx.array, cache: list[Cache] | None) -> mx.array:
        h = self.embed_tokens(tokens)
        fused = fused_layers(self, h, cache)
        if fused is not None:
            return self.norm(fused)
        for i, layer in enumerate(self.layers):
            h = layer(h, cache[i] if cache is not None else None)
        return self.norm(h)


class DecoderLM(CausalLM):
    """A decoder stack plus the output projection, tied to the embedding or its own ``lm_head``.

    Architectures differ in their layers; they pass them in and extend ``sanitize``.
    """

    ffn_name = "mlp"  # where a layer keeps its feed-forward
    expert_names = GLU_NAMES  # a checkpoint's per-expert projection names -> switch_mlp's

    def __init__(self, args: BaseModelArgs, layers: list[nn.Module]):
        super().__init__()
        self.args = args
        self.model = DecoderStack(args, layers)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, tokens: mx.array, cache: list[Cache] | None = None) -> mx.array:
        h = self.model(tokens, cache)
        return output_projection(self.model.embed_tokens if self.tied_embeddings else self.lm_head, h)

    @property
    def layers(self) -> list[nn.Module]:
        return self.model.layers

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Drops rotary buffers and, when tied, the duplicate output projection; stacks every MoE layer's
        experts into ``switch_mlp`` (``moe.stack_moe_experts``: per-expert or fused checkpoint layouts)."""
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.tied_embeddings:
            weights.pop("lm_head.weight", None)
        experts = self.experts
        for i in experts.layers if experts else ():
            ffn = f"model.layers.{i}.{self.ffn_name}"
            stack_moe_experts(weights, ffn, ffn, experts.routed, self.expert_names)
        return weights
