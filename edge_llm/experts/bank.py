"""The expert bank: a fixed number of slots per MoE layer holding the experts it last used.

``StreamedSwitchGLU`` takes a switch module's place. Its inner ``SwitchGLU`` keeps the same kernels
(``gather_mm``/``gather_qmm``) but its stacked parameters hold ``slots`` experts instead of all ``E``, so
graph shapes never change. On each call the router's expert ids are read (the one sync streaming adds),
missing experts are loaded into free or least recently used slots, ids become slot ids, and the inner
module runs as a resident one would. When a prefill chunk needs more experts than the bank holds, its
(token, expert) pairs go in waves of at most ``slots`` experts; every expert still sees all its rows in
one product, exactly as in a resident run, so the outputs are the same bits.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..models.switch import SORT_THRESHOLD, SwitchGLU
from .policy import DEFAULT_POLICY, POLICIES
from .source import ExpertSource


@dataclass
class BankStats:
    hits: int = 0  # expert lookups served by the bank
    misses: int = 0  # lookups that loaded the expert first
    waves: int = 0  # extra passes of prefill chunks that needed more experts than the bank holds

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class ExpertBank:
    """Slots for one switch module's experts. Which expert leaves for a miss: ``lru`` the least recently used;
    ``lfu`` the least often used so far (ties: the least recently used), which keeps a router's favourites."""

    def __init__(self, module: SwitchGLU, source: ExpertSource, slots: int, stats: BankStats,
                 policy: str = DEFAULT_POLICY):
        if policy not in POLICIES:
            raise ValueError(f"expert cache policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.module, self.source, self.slots, self.stats, self.policy = module, source, slots, stats, policy
        self.slot_of: OrderedDict[int, int] = OrderedDict()  # expert -> slot, least recently used first
        self.uses: dict[int, int] = {}  # expert -> lookups so far
        first = source.load([0])[0]
        for name, row in first.items():  # bank arrays shaped and typed as the experts decode
            self._set_param(name, mx.zeros((slots, *row.shape), dtype=row.dtype))
            proj, _ = self._proj(name)
            if name in source.widened:
                proj.upcast_half = True
        self._write(0, first)
        self.slot_of[0] = 0
        mx.eval(self.arrays())

    def _proj(self, name: str) -> tuple[nn.Module, str]:
        proj, suffix = name.rsplit(".", 1)
        return getattr(self.module, proj), suffix

    def _set_param(self, name: str, value: mx.array) -> None:
        proj, suffix = self._proj(name)
        proj[suffix] = value

    def arrays(self) -> list[mx.array]:
        return [proj[suffix] for proj, suffix in map(self._proj, self.source.params)]

    def _write(self, slot: int, arrays: dict[str, mx.array]) -> None:
        for name, row in arrays.items():
            proj, suffix = self._proj(name)
            proj[suffix][slot] = row

    def _victims(self, keep: set[int], n: int) -> list[int]:
        held = [e for e in self.slot_of if e not in keep]  # least recently used first
        if self.policy == "lfu":
            held.sort(key=lambda e: self.uses.get(e, 0))  # stable: ties stay least recently used first
        return held[:n]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays())

    def ensure(self, experts: list[int]) -> np.ndarray:
        """Loads the experts the bank lacks (at most ``slots`` at once); returns expert id -> slot."""
        assert len(experts) <= self.slots, "a wave never needs more experts than the bank holds"
        wanted = set(experts)
        misses = [e for e in experts if e not in self.slot_of]
        self.stats.hits += len(experts) - len(misses)
        self.stats.misses += len(misses)
        for e in experts:
            self.uses[e] = self.uses.get(e, 0) + 1
            if e in self.slot_of:
                self.slot_of.move_to_end(e)
        if misses:
            free = sorted(set(range(self.slots)) - set(self.slot_of.values()))
            victims = self._victims(wanted, max(0, len(misses) - len(free)))
            slot_for = dict(zip(misses, free + [self.slot_of.pop(e) for e in victims], strict=False))
            # a few experts at a time (as many as reads in flight), each written and evaluated before the next is
            # decoded: loading needs memory for that many raw experts and one decoded one, not for all the misses
            step = self.source.files.threads
            for start in range(0, len(misses), step):
                for e, raw in self.source.read(misses[start : start + step]).items():
                    self._write(slot_for[e], self.source.decode(e, raw))
                    self.slot_of[e] = slot_for[e]
                    mx.eval(self.arrays())
                self.source.files.release()
        lut = np.zeros(max(self.slot_of) + 1, dtype=np.int32)
        for e, slot in self.slot_of.items():
            lut[e] = slot
        return lut


class StreamedSwitchGLU(nn.Module):
    """A switch module whose experts stream from disk through a bank: ``x [..., D]``, ``indices [..., k]``."""

    def __init__(self, inner: SwitchGLU, bank: ExpertBank):
        super().__init__()
        self.inner = inner
        self.bank = bank  # not a module: its arrays are inner's parameters

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        ids = np.asarray(indices)  # the router's choice: the one sync streaming adds
        needed = np.unique(ids).tolist()
        if len(needed) <= self.bank.slots:
            lut = self.bank.ensure(needed)
            return self.inner(x, mx.array(lut[ids]))
        return self._waves(x, indices, ids, needed)

    def _waves(self, x: mx.array, indices: mx.array, ids: np.ndarray, needed: list[int]) -> mx.array:
        """More experts than slots: each wave computes the (token, expert) pairs of ``slots`` experts."""
        lead, k = indices.shape, indices.shape[-1]
        flat = ids.reshape(-1)
        rows = x.reshape(-1, 1, x.shape[-1])  # [N, 1, D]: rows gathered from it are laid out as the resident
        # module gathers them (models.switch.sort_by_expert); a view of another layout takes BLAS down another path
        out = mx.zeros((flat.size, x.shape[-1]), dtype=x.dtype)
        sort = indices.size >= SORT_THRESHOLD  # as the resident module decides, so each product is the same
        slots = self.bank.slots
        self.bank.stats.waves += (len(needed) + slots - 1) // slots - 1
        for start in range(0, len(needed), slots):
            wave = needed[start : start + slots]
            lut = self.bank.ensure(wave)
            in_wave = np.isin(flat, wave)
            pairs = np.nonzero(in_wave)[0]
            if sort:
                pairs = pairs[np.argsort(lut[flat[pairs]], kind="stable")]  # grouped by slot, rows in token order
                xs = rows[mx.array(pairs // k)]  # [M, 1, D]
                y = self.inner.experts(xs, mx.array(lut[flat[pairs]]), sort)  # [M, 1, D]
                out[mx.array(pairs)] = y.squeeze(1)
            else:  # few pairs: all of them run as the resident module runs them (other layouts of the rows take
                # another BLAS path), those of other waves on any slot, and are dropped
                slot_ids = np.zeros_like(flat)
                slot_ids[pairs] = lut[flat[pairs]]
                y = self.inner(x, mx.array(slot_ids.reshape(ids.shape))).reshape(-1, x.shape[-1])
                out = mx.where(mx.array(in_wave)[:, None], y, out)
            mx.eval(out)  # the next wave may evict these experts
        return out.reshape(*lead, x.shape[-1])
