"""Where each stacked expert parameter comes from in the checkpoint's files.

A model's ``sanitize`` brings experts into stacked ``[E, ...]`` parameters through the shared helpers in
``models/switch.py`` and ``models/moe.py``. While ``recording()`` is active those helpers note, for every
stacked parameter they build, the source tensors (by the names ``Checkpoint.load_weights`` gives them):

- ``PerExpert``: one tensor per expert (Hub checkpoints: ``mlp.experts.{e}.gate_proj.weight``);
- ``FusedHalf``: expert ``e`` is half ``part`` (along its first axis) of row ``e`` of a fused tensor
  (transformers 5's in-memory ``experts.gate_up_proj [E, 2I, D]``, gate rows first);
- ``Renamed``: row ``e`` of a stacked tensor stored under another name (its ``experts.down_proj``).

A parameter nobody recorded was stacked in the file already (MLX/mlx-lm ``switch_mlp`` tensors, GGUF
``ffn_*_exps``): expert ``e`` is row ``e`` of the stored tensor of the same name. Nothing here knows an
architecture: the helpers every architecture uses report what they do.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(frozen=True)
class PerExpert:
    names: tuple[str, ...]  # expert e's tensor is names[e]


@dataclass(frozen=True)
class FusedHalf:
    name: str  # a stacked [E, parts * rows, ...] tensor
    part: int
    parts: int = 2


@dataclass(frozen=True)
class Renamed:
    name: str  # a stacked [E, ...] tensor under another name


Source = PerExpert | FusedHalf | Renamed

_record: ContextVar[dict[str, Source] | None] = ContextVar("expert_provenance", default=None)


@contextmanager
def recording() -> Iterator[dict[str, Source]]:
    """Collects, by stacked parameter name, what the stacking helpers build it from."""
    found: dict[str, Source] = {}
    token = _record.set(found)
    try:
        yield found
    finally:
        _record.reset(token)


def record(parameter: str, source: Source) -> None:
    """Called by the stacking helpers; a no-op unless ``recording()`` is active."""
    found = _record.get()
    if found is not None:
        found[parameter] = source
