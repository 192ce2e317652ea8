"""Loading a MoE model with its routed experts left in the files: the resident part loads as usual, each
switch module becomes a ``StreamedSwitchGLU`` over a bank of ``slots`` experts.

The loader runs its normal pipeline (lazy weights, FP8 dequantization, the model's ``sanitize``) with the
expert tensors as unread placeholders, so every rename and stack is the architecture's own; the stacking
helpers record where each expert came from (``provenance``); the stacked placeholders are then dropped
before anything is read, and the banks read experts on demand through ``source`` and ``reads``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..formats.checkpoint import Checkpoint
from ..machine.backend import Caster
from ..models.switch import SwitchGLU
from .bank import BankStats, ExpertBank, StreamedSwitchGLU
from .policy import DEFAULT_POLICY
from .provenance import Source
from .reads import ExpertFiles, ReadStats
from .source import ExpertSource, param_source

# routed experts as files name them: per expert (`mlp.experts.3.gate_proj`), fused (`mlp.experts.gate_up_proj`),
# stacked (`mlp.switch_mlp.gate_proj`, a GGUF's `ffn_*_exps` under that name); never shared experts
_ROUTED = re.compile(r"(^|\.)(experts|switch_mlp)\.")


def is_routed_expert(name: str) -> bool:
    return bool(_ROUTED.search(name))


@dataclass
class ExpertStreamer:
    """Every bank of a model, the files they read from, and what it all cost."""

    banks: dict[str, ExpertBank]  # switch module path -> its bank
    files: ExpertFiles
    bank_stats: BankStats = field(default_factory=BankStats)

    @property
    def parameters(self) -> frozenset[str]:
        """The model parameters the banks hold (streamed, not loaded)."""
        return frozenset(f"{path}.inner.{name}" for path, bank in self.banks.items() for name in bank.source.params)

    @property
    def read_stats(self) -> ReadStats:
        return self.files.stats

    @property
    def bank_bytes(self) -> int:
        return sum(bank.nbytes for bank in self.banks.values())

    @property
    def slots(self) -> int:
        return next(iter(self.banks.values())).slots

    def stats(self) -> dict[str, float | int]:
        """What streaming did so far, for `run --json`, the chat's /stats and bench."""
        b, r = self.bank_stats, self.read_stats
        return {"slots": self.slots, "bank_bytes": self.bank_bytes, "hits": b.hits, "misses": b.misses,
                "hit_rate": round(b.hit_rate, 4), "waves": b.waves, "bytes_read": r.bytes,
                "read_bytes_per_s": round(r.bytes_per_second), "read_wait_s": round(r.wait_seconds, 4)}


def expert_stats(model: nn.Module) -> dict[str, float | int] | None:
    """The streaming statistics of a model loaded with streamed experts; None for a resident one."""
    streamer = getattr(model, "expert_streamer", None)
    return streamer.stats() if streamer is not None else None


def switch_modules(model: nn.Module) -> dict[str, SwitchGLU]:
    return {path: m for path, m in model.named_modules() if isinstance(m, SwitchGLU)}


def stream_experts(checkpoint: Checkpoint, model: nn.Module, weights: dict[str, mx.array],
                   provenance: dict[str, Source], cast: Caster, slots: int,
                   policy: str = DEFAULT_POLICY) -> ExpertStreamer:
    """Takes every switch module's stacked parameters out of ``weights`` (unread placeholders) and gives each
    module a bank of ``slots`` experts read from the files. ``cast`` is the loader's dtype policy."""
    stored = checkpoint.stored_tensors()
    streamer = ExpertStreamer({}, ExpertFiles())
    for path, module in switch_modules(model).items():
        experts = module.gate_proj["weight"].shape[0]
        shapes = dict(tree_flatten(module.parameters()))  # the resident [E, ...] parameters, not yet created
        params, ndim = {}, {}
        for name, value in shapes.items():
            full = f"{path}.{name}"
            weights.pop(full, None)
            params[name] = param_source(checkpoint, stored, full, provenance.get(full), experts)
            ndim[full] = value.ndim

        def row_cast(full: str, row: mx.array, _ndim: dict[str, int] = ndim) -> mx.array:
            return cast(full, row, _ndim[full])

        source = ExpertSource(checkpoint, params, row_cast, streamer.files, cast.policy.compute)
        bank = ExpertBank(module, source, min(slots, experts), streamer.bank_stats, policy)
        streamer.banks[path] = bank
        model.update_modules(tree_unflatten([(path, StreamedSwitchGLU(module, bank))]))
    model.expert_streamer = streamer  # stats for `run --json`, /stats and bench
    return streamer
