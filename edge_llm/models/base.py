"""What every architecture shares: config parsing, the attention call and the model interface."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..cache import Cache, KVCache


@dataclasses.dataclass
class BaseModelArgs:
    """Hugging Face config fields; ``from_dict`` ignores keys the dataclass does not name."""

    @classmethod
    def from_dict(cls, config: dict[str, Any]):
        fields = inspect.signature(cls).parameters
        return cls(**{k: v for k, v in config.items() if k in fields})


def require(condition: bool, field: str, message: str) -> None:
    """Raises the ValueError a bad config combination deserves, naming the field."""
    if not condition:
        raise ValueError(f"config field {field!r}: {message}")


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: str | mx.array | None) -> mx.array:
    """Scaled dot-product attention; q [B, H, L, D], k/v [B, H_kv, T, D] (GQA handled by MLX)."""
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


class CausalLM(nn.Module):
    """Interface every architecture implements.

    ``model(tokens [B, L], cache) -> logits [B, L, V]``; ``make_cache()`` gives one cache per layer;
    ``sanitize`` maps checkpoint tensors to module parameters (pure, unit-tested).
    """

    args: BaseModelArgs

    def make_cache(self) -> list[Cache]:
        return [KVCache() for _ in self.layers]

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        return weights
