"""Which tensors get which bits: the one quantization policy, shared by ``quantize`` and ``estimate``.

Decisions are made per module, by its path in the module tree and its kind, never by file name, so
every architecture (and any that lands later) follows the same rules:

- only modules that can be quantized (``to_quantized``: linear layers, embeddings, stacked experts) are;
  norms, biases and other vectors stay in float;
- MoE routers (``...mlp.gate``, ``block_sparse_moe.gate``, ``shared_expert_gate``) stay at 8 bits at
  most (a 4-bit router picks wrong experts and causes repetition loops), as mlx-lm's MoE models do;
  parameters a model keeps in float32 (its ``keep_float32``, e.g. DeepSeek's router) are never quantized;
- a module whose input size is not a multiple of the group size stays in float (MLX needs whole groups);
- embeddings and the output head follow the default bits (as mlx-lm does), unless a recipe says otherwise.

Recipes (``--recipe``): ``uniform`` (the default), mlx-lm's ``mixed_2_6``/``mixed_3_4``/``mixed_3_6``/
``mixed_4_6`` (v_proj/down_proj of the first and last eighth of the layers and every third in between,
and lm_head, at the high bits: llama.cpp's Q4_K_M choice, after mlx-lm ``convert.py``), or explicit rules
``"PATTERN=BITS,..."`` where PATTERN is a glob over module paths and BITS is 2..8 or ``float``.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

from .affine import SUPPORTED_BITS

MIXED = {"mixed_2_6": (2, 6), "mixed_3_4": (3, 4), "mixed_3_6": (3, 6), "mixed_4_6": (4, 6)}
ROUTER_SUFFIXES = (".mlp.gate", ".block_sparse_moe.gate", ".shared_expert_gate")
ROUTER_MAX_BITS = 8
FLOAT_BITS = (16, 32)
LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group_size: int
    mode: str = "affine"


@dataclass(frozen=True)
class Recipe:
    """Default ``bits`` (16/32: no quantization) and ``group_size``, plus ordered rules (first match wins)."""

    bits: int = 4
    group_size: int = 64
    name: str = "uniform"
    rules: tuple[tuple[str, int | None], ...] = field(default=())
    mixed: tuple[int, int] | None = None  # (low, high) bits of a mixed_L_H recipe

    @property
    def quantizes(self) -> bool:
        return self.bits not in FLOAT_BITS

    def spec_for(self, path: str, in_dims: int, num_layers: int, keep_float: bool = False) -> QuantSpec | None:
        """The quantization of the quantizable module at ``path`` (input size ``in_dims``), None = float."""
        if not self.quantizes or keep_float:
            return None
        bits: int | None = self.bits
        if self.mixed is not None:
            bits = _mixed_bits(path, num_layers, *self.mixed)
        for pattern, rule_bits in self.rules:
            if fnmatch.fnmatchcase(path, pattern):
                bits = rule_bits
                break
        if bits is None:
            return None
        if path.endswith(ROUTER_SUFFIXES):
            bits = max(bits, ROUTER_MAX_BITS)
        if in_dims % self.group_size:
            return None
        return QuantSpec(bits, self.group_size)

    def describe(self) -> str:
        if not self.quantizes:
            return f"float{self.bits}"
        return f"{self.name}, {self.bits}-bit, group {self.group_size}"


def _mixed_bits(path: str, num_layers: int, low: int, high: int) -> int:
    if path.endswith("lm_head"):
        return high
    m = LAYER_INDEX.search(path)
    index = int(m.group(1)) if m else 0
    more = index < num_layers // 8 or index >= 7 * num_layers // 8 or (index - num_layers // 8) % 3 == 2
    if more and (path.endswith("v_proj") or "down_proj" in path):
        return high
    return low


def _parse_bits(text: str, where: str) -> int | None:
    if text.strip().lower() in ("float", "none", "16", "fp16", "bf16"):
        return None
    try:
        bits = int(text)
    except ValueError:
        bits = -1
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"--recipe {where!r}: bits must be one of {', '.join(map(str, SUPPORTED_BITS))} or float")
    return bits


def make_recipe(bits: int, group_size: int = 64, recipe: str | None = None) -> Recipe:
    """Builds the recipe for ``--bits``/``--group-size``/``--recipe``; ValueError names a bad value."""
    if bits not in SUPPORTED_BITS + FLOAT_BITS:
        raise ValueError(f"--bits must be one of 4, 8 (also 2, 3, 5, 6) or 16, got {bits}")
    if group_size not in (32, 64, 128):
        raise ValueError(f"--group-size must be 32, 64 or 128, got {group_size}")
    if not recipe or recipe == "uniform":
        return Recipe(bits, group_size)
    if bits in FLOAT_BITS:
        raise ValueError("--recipe needs --bits 2..8: a float conversion has nothing to mix")
    if recipe in MIXED:
        low, high = MIXED[recipe]
        return Recipe(low, group_size, name=recipe, mixed=(low, high))
    return Recipe(bits, group_size, name="custom", rules=parse_rules(recipe))


def parse_rules(recipe: str) -> tuple[tuple[str, int | None], ...]:
    """``"PATTERN=BITS,..."`` as (glob, bits or None for float) pairs; ValueError when it holds no rule."""
    usage = f"--recipe {recipe!r}: expected {', '.join(MIXED)}, uniform, or rules like 'lm_head=8,*.v_proj=6'"
    rules = []
    for part in filter(None, (p.strip() for p in recipe.split(","))):
        pattern, sep, value = part.rpartition("=")
        if not sep or not pattern.strip():
            raise ValueError(usage)
        rules.append((pattern.strip(), _parse_bits(value, part)))
    if not rules:
        raise ValueError(usage)
    return tuple(rules)


def check_rules_match(recipe: str | None, paths: list[str]) -> None:
    """Refuses a ``--recipe`` rule whose pattern matches none of the quantizable module ``paths``: a typo would
    otherwise leave the recipe silently unused."""
    if not recipe or recipe == "uniform" or recipe in MIXED:
        return
    for pattern, bits in parse_rules(recipe):
        if not any(fnmatch.fnmatchcase(path, pattern) for path in paths):
            example = next((p for p in paths if "layers." in p), paths[0] if paths else "lm_head")
            rule = f"{pattern}={'float' if bits is None else bits}"
            raise ValueError(f"--recipe rule {rule!r} matches no quantizable module of this model; patterns are "
                             f"globs over module paths such as {example!r}")


def layer_of(name: str) -> int | None:
    """The decoder layer a tensor or module path belongs to (None for embeddings, final norm, head)."""
    m = LAYER_INDEX.search(name)
    return int(m.group(1)) if m else None
