"""Loading a share: every rank computes the same plan from the checkpoint's headers and all ranks' memory
budgets, then reads only its tensors (``ShardHooks``, the loader's narrow door). Rank 0 gets a ``ShardedLM``
and the tokenizer; every other rank follows rank 0 until it stops."""

from __future__ import annotations

import atexit
import re
import threading

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..formats.open import open_checkpoint
from ..formats.tensors import FLOAT_DTYPES
from ..hub.resolve import resolve_model
from ..loader import build_model, check_vocabulary, load_checkpoint
from ..machine.backend import dtype_policy
from ..machine.memory import process_budget
from .experts import localize_experts, slice_experts
from .follower import Follower
from .group import Group, join, share_cores
from .plan import ShardPlan, check_fits, model_bytes, plan_shards, resolve_mode
from .protocol import collective
from .sharded import Shard, ShardedLM, strip_outer
from .watchdog import current_watchdog

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_PER_EXPERT = re.compile(r"\.experts\.(\d+)\.")


class Elsewhere(nn.Module):
    """A decoder layer another rank holds (no parameters here)."""


class ShardHooks:
    """What the loader asks while loading one rank's share (``loader.load_checkpoint(shard=...)``)."""

    def __init__(self, plan: ShardPlan, group: Group):
        self.plan, self.group, self.rank = plan, group, group.rank
        self.start, self.end = plan.layer_ranges[self.rank]
        self.first, self.last = plan.expert_ranges[self.rank]
        self.switch_paths: list[str] = []

    def _own_layer(self, name: str) -> bool | None:
        m = _LAYER.match(name)
        return None if m is None else self.start <= int(m.group(1)) < self.end

    def skip(self, name: str) -> bool:
        """Stored tensors this rank never reads."""
        if self.plan.mode == "experts":
            m = _PER_EXPERT.search(name)
            return m is not None and not self.first <= int(m.group(1)) < self.last
        own = self._own_layer(name)
        return (not own) if own is not None else self.rank != 0

    def prune(self, model: nn.Module) -> None:
        """The module tree before loading: layers elsewhere left out, experts cut to this rank's slice."""
        if self.plan.mode == "experts":
            self.switch_paths = localize_experts(model, self.first, self.last - self.first, self.group.mlx)
            return
        layers = model.model.layers
        for i in range(len(layers)):
            if not self.start <= i < self.end:
                layers[i] = Elsewhere()
        if self.rank != 0:
            strip_outer(model)

    def select(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """The sanitized tensors this rank holds."""
        if self.plan.mode == "experts":
            slice_experts(weights, self.switch_paths, self.first, self.last)
            return weights
        keep = {}
        for name, value in weights.items():
            own = self._own_layer(name)
            if own or (own is None and self.rank == 0):
                keep[name] = value
        return keep


def _gather_budgets(group: Group) -> list[int]:
    """Every rank's memory budget (MiB), in rank order."""
    mine = np.zeros(group.size, np.int32)
    mine[group.rank] = min(process_budget().budget_bytes >> 20, 2**31 - 1)
    return [int(v) << 20 for v in np.array(collective(mx.distributed.all_sum, mx.array(mine), group=group.mlx))]


def held_bytes(checkpoint, dtype: str | None, tied: bool) -> dict[str, int]:
    """Each tensor's bytes as loaded (the dtype policy's: a tied embedding is held in the compute dtype)."""
    policy = dtype_policy(checkpoint.dtype, dtype)
    out = {}
    for name, t in checkpoint.tensors.items():
        if t.dtype in FLOAT_DTYPES:
            stored = {"F16": mx.float16, "BF16": mx.bfloat16}.get(t.dtype, mx.float32)
            out[name] = t.size * policy.stored_dtype(name, stored, len(t.shape), tied).size
        else:
            out[name] = t.nbytes
    return out


def plan_for(checkpoint, mode: str, group: Group, dtype: str | None = None) -> ShardPlan:
    probe = build_model(checkpoint)  # the config checked, nothing allocated (parameters stay lazy)
    experts = probe.experts
    routed = experts.routed if experts else None
    sizes = model_bytes(held_bytes(checkpoint, dtype, probe.tied_embeddings), probe.args.num_hidden_layers)
    budgets = _gather_budgets(group)
    layers = probe.args.num_hidden_layers
    plan = plan_shards(resolve_mode(mode, routed, layers, group.size), sizes, budgets, routed)
    check_fits(plan, budgets, group.where)
    return plan


def load_share(ref: str, mode: str, dtype: str | None):
    """Rank 0: (ShardedLM, tokenizer). Other ranks: follow rank 0, then None."""
    checkpoint = open_checkpoint(resolve_model(ref))
    sharded = load_checkpoint_share(checkpoint, mode, dtype)
    if sharded is None:
        return None
    tokenizer = checkpoint.tokenizer()
    check_vocabulary(checkpoint, tokenizer)
    return sharded, tokenizer


def load_checkpoint_share(checkpoint, mode: str, dtype: str | None) -> ShardedLM | None:
    """Rank 0: its ``ShardedLM``. Other ranks: load their share, follow rank 0 until it stops, then None."""
    group = join()
    assert group is not None
    plan = plan_for(checkpoint, mode, group, dtype)
    if plan.mode == "experts":
        share_cores(group.launch)
    model = load_checkpoint(checkpoint, dtype, shard=ShardHooks(plan, group))
    collective(mx.distributed.all_sum, mx.array([1]), group=group.mlx)  # every rank loaded its share
    shard = Shard(model, plan, group)
    if group.rank != 0:
        Follower(shard).run()
        current_watchdog().leave()
        return None
    sharded = ShardedLM(shard)
    atexit.register(_close, sharded)
    return sharded


def _close(sharded: ShardedLM) -> None:
    """Stops the followers; a pass left half done (an error inside it) cannot take the command, so this waits
    a few seconds at most (the followers then see rank 0 leave and end)."""
    thread = threading.Thread(target=sharded.close, daemon=True)
    thread.start()
    thread.join(timeout=5.0)
