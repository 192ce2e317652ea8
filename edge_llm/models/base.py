"""What every architecture shares: config parsing, the attention call and the model interface."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..limits import MAX_DIM
from .cache import Cache, KVCache
from .fields import check_fields
from .layers import output_projection


@dataclasses.dataclass
class BaseModelArgs:
    """Hugging Face config fields; ``from_dict`` ignores keys the dataclass does not name."""

    @classmethod
    def from_dict(cls, config: dict[str, Any]):
        """Checks each field's type and range first (``fields.RULES``): ValueError naming the field."""
        params = inspect.signature(cls).parameters
        return cls(**check_fields(config, {k: p.default is not p.empty for k, p in params.items()}))


def require(condition: bool, field: str, message: str) -> None:
    """Raises the ValueError a bad config combination deserves, naming the field."""
    if not condition:
        raise ValueError(f"config field {field!r}: {message}")


def check_heads(args: BaseModelArgs) -> int:
    """Fills in grouped-query attention's defaults (key/value heads = heads) and checks the head counts:
    heads divide the hidden size when no ``head_dim`` is given, key/value heads divide heads, and the head
    size is even (rotary embeddings rotate pairs). Returns the head size."""
    if args.num_key_value_heads is None:
        args.num_key_value_heads = args.num_attention_heads
    head_dim = getattr(args, "head_dim", None)
    if head_dim is None:
        require(args.hidden_size % args.num_attention_heads == 0, "num_attention_heads",
                f"{args.num_attention_heads} does not divide hidden_size {args.hidden_size}")
        head_dim = args.hidden_size // args.num_attention_heads
    require(args.num_attention_heads % args.num_key_value_heads == 0, "num_key_value_heads",
            f"{args.num_key_value_heads} does not divide num_attention_heads {args.num_attention_heads}")
    require(head_dim % 2 == 0, "num_attention_heads", f"gives an odd head size {head_dim} (hidden_size "
            f"{args.hidden_size} / {args.num_attention_heads} heads); rotary embeddings rotate pairs")
    check_widths(num_attention_heads=args.num_attention_heads * head_dim)
    return head_dim


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
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


class CausalLM(nn.Module):
    """Interface every architecture implements.

    ``model(tokens [B, L], cache) -> logits [B, L, V]``; ``make_cache()`` gives one cache per layer;
    ``sanitize`` maps checkpoint tensors to module parameters (pure, unit-tested).
    """

    args: BaseModelArgs

    def make_cache(self, kv_bits: int | None = None) -> list[Cache]:
        """One cache per layer; ``kv_bits`` (8 or 4) stores keys and values quantized."""
        return [KVCache(kv_bits) for _ in self.layers]

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        return weights


class DecoderStack(nn.Module):
    """The ``model.`` part of a Hugging Face decoder: token embedding, the layers, the final norm."""

    def __init__(self, args: BaseModelArgs, layers: list[nn.Module]):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = layers
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, tokens: mx.array, cache: list[Cache] | None) -> mx.array:
        h = self.embed_tokens(tokens)
        for i, layer in enumerate(self.layers):
            h = layer(h, cache[i] if cache is not None else None)
        return self.norm(h)


class DecoderLM(CausalLM):
    """A decoder stack plus the output projection, tied to the embedding or its own ``lm_head``.

    Architectures differ in their layers; they pass them in and extend ``sanitize``.
    """

    def __init__(self, args: BaseModelArgs, layers: list[nn.Module]):
        super().__init__()
        self.args = args
        self.model = DecoderStack(args, layers)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, tokens: mx.array, cache: list[Cache] | None = None) -> mx.array:
        h = self.model(tokens, cache)
        return output_projection(self.model.embed_tokens if self.args.tie_word_embeddings else self.lm_head, h)

    @property
    def layers(self) -> list[nn.Module]:
        return self.model.layers

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Drops rotary buffers and, when tied, the duplicate output projection."""
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        return weights
