"""Sampling settings per model, each with where it came from.

The first source that names a setting wins:
1. the user (command-line flags, ``/set`` in the chat, a request to the server),
2. the model itself: its ``generation_config.json``, or the ``general.sampling.*`` keys of a GGUF file,
3. for the embedded default model: what we measured on its file, then its model card's recommendation
   (``default_model.TUNED_SAMPLING``, ``CARD_SAMPLING``),
4. edge-llm's own defaults (``EDGE_LLM_DEFAULTS``), chosen to suit small models too.

``run``, the chat and the server all start from ``model_settings(checkpoint)``; ``info`` shows it.
Values a model file gets wrong (a negative temperature, a string) are skipped with a warning in the log,
so the next source applies rather than the model failing to start.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..default_model import CARD_SAMPLING, CARD_SOURCE, TUNED_SAMPLING, TUNED_SOURCE, default_model_path
from .sampling import SamplingParams

log = logging.getLogger(__name__)

FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
USER = "command line"

# Measured on the embedded SmolLM2-135M (benchmarks/RESULTS.md, "Sampling defaults"): min-p cuts the
# long tail that makes a small model wander into another language; a low temperature keeps answers
# on topic. Larger models that want more variety name their own settings in generation_config.json.
EDGE_LLM_DEFAULTS: Mapping[str, float | int] = {
    "temperature": 0.6, "top_p": 0.9, "top_k": 40, "min_p": 0.1, "repetition_penalty": 1.0,
}
EDGE_LLM_SOURCE = "edge-llm default"


@dataclass(frozen=True)
class Setting:
    value: float | int
    source: str  # "command line", "generation_config.json", "GGUF metadata", "... model card", "edge-llm default"...


@dataclass(frozen=True)
class SamplingSettings:
    """The sampling settings in force, by field name, with their sources."""

    settings: Mapping[str, Setting]

    def override(self, source: str = USER, **values: float | int | None) -> SamplingSettings:
        """These values (None: keep the current one) from ``source``; raises ValueError for a bad one."""
        given = {k: v for k, v in values.items() if v is not None}
        unknown = set(given) - set(FIELDS)
        if unknown:
            raise ValueError(f"unknown sampling setting(s): {', '.join(sorted(unknown))}")
        for name, value in given.items():
            _check(name, value)
        return replace(self, settings={**self.settings, **{k: Setting(v, source) for k, v in given.items()}})

    def params(self, seed: int | None = None) -> SamplingParams:
        return SamplingParams(seed=seed, **{k: s.value for k, s in self.settings.items()})

    def __getitem__(self, name: str) -> Setting:
        return self.settings[name]

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {k: {"value": s.value, "source": s.source} for k, s in self.settings.items()}


def _check(name: str, value: Any) -> float | int:
    """``value`` as the type the field takes, validated by SamplingParams itself; ValueError if bad."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, not {value!r}")
    if name == "top_k":
        if value != int(value):
            raise ValueError(f"top_k must be a whole number, not {value!r}")
        value = int(value)
    else:
        value = float(value)
    SamplingParams(**{name: value})  # raises ValueError with the range when out of it
    return value


def _valid(values: Mapping[str, Any], source: str, where: Path | str) -> dict[str, float | int]:
    """The fields of ``values`` that are valid; each invalid one is logged and skipped."""
    kept = {}
    for name in FIELDS:
        if name not in values or values[name] is None:
            continue
        try:
            kept[name] = _check(name, values[name])
        except ValueError as e:
            log.warning("%s: ignoring %s from %s (%s)", where, name, source, e)
    return kept


def _is_default_model(path: Path) -> bool:
    default = default_model_path()
    try:
        return default is not None and path.resolve() == default.resolve()
    except OSError:
        return False


def model_settings(checkpoint) -> SamplingSettings:
    """The sampling settings for ``checkpoint`` before the user says anything (see the module docstring)."""
    own_name, own = checkpoint.sampling_config()
    layers: list[tuple[str, Mapping[str, Any]]] = [(own_name, own)]
    if _is_default_model(checkpoint.path):
        layers += [(TUNED_SOURCE, TUNED_SAMPLING), (CARD_SOURCE, CARD_SAMPLING)]
    layers.append((EDGE_LLM_SOURCE, EDGE_LLM_DEFAULTS))
    settings: dict[str, Setting] = {}
    for source, values in layers:
        for name, value in _valid(values, source, checkpoint.path).items():
            settings.setdefault(name, Setting(value, source))
    return SamplingSettings(settings)


def sampling_from_generation_config(generation: Mapping[str, Any]) -> dict[str, Any]:
    """The sampling fields of a transformers ``generation_config.json``.

    ``do_sample: false`` is the author saying "greedy" (transformers then ignores temperature); a file
    that does not mention ``do_sample`` says nothing about it (most hold only token ids).
    """
    values = {k: generation[k] for k in FIELDS if k in generation}
    if generation.get("do_sample") is False:
        values["temperature"] = 0.0
    return values


# GGUF's recommended-sampler keys (llama.cpp's gguf-py ``Keys.General.SAMPLING_*``) by our field names.
GGUF_SAMPLING_KEYS = {
    "temperature": "general.sampling.temp",
    "top_p": "general.sampling.top_p",
    "top_k": "general.sampling.top_k",
    "min_p": "general.sampling.min_p",
    "repetition_penalty": "general.sampling.penalty_repeat",
}


def sampling_from_gguf(metadata: Mapping[str, Any]) -> dict[str, Any]:
    return {name: metadata[key] for name, key in GGUF_SAMPLING_KEYS.items() if key in metadata}
