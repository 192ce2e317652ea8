"""Architectures, one module per Hugging Face ``model_type``; aliases name formats that share one."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .base import CausalLM

# model_type -> module under edge_llm.models that implements it
ARCHITECTURES: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",
    "deepseek_v2": "deepseek_v2",
    "deepseek_v3": "deepseek_v3",
    "mixtral": "mixtral",
    "qwen2_moe": "qwen2_moe",
    "qwen3_moe": "qwen3_moe",
    "olmoe": "olmoe",
}


def supported_model_types() -> list[str]:
    return sorted(ARCHITECTURES)


def get_architecture(model_type: str) -> ModuleType:
    """The module (with ``ModelArgs`` and ``Model``) for ``model_type``; KeyError when unknown."""
    return importlib.import_module(f"{__name__}.{ARCHITECTURES[model_type]}")


def build(model_type: str, config: dict[str, Any]) -> CausalLM:
    """The module tree for a (normalized) config, its weights random and never evaluated: building costs
    milliseconds even for DeepSeek-V3. ValueError/TypeError for a config the architecture refuses."""
    arch = get_architecture(model_type)
    return arch.Model(arch.ModelArgs.from_dict(config))
