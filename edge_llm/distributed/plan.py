"""Which part of the model each rank holds: contiguous layer ranges (pipeline) or slices of every MoE layer's
routed experts (expert parallelism). Pure functions of tensor sizes and memory budgets, so every rank computes
the same plan from the same inputs, and the estimator (``quant.sharding``) shows it before anything runs.

Pipeline: rank 0 embeds the tokens and, at the end of the ring, applies the final norm and the output
projection (so the logits never travel), so it carries those tensors besides its layers. Each rank gets a
share of the bytes proportional to its memory budget, in whole layers, at least one layer each.
Experts: every rank holds everything but the routed experts, and ``E / ranks`` of those per MoE layer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .launch import DistributedError

MODES = ("auto", "pipeline", "experts")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.experts\.(\d+)\.|\.switch_mlp\.|\.experts\.(gate_up_proj|down_proj)")


@dataclass(frozen=True)
class ModelBytes:
    """Stored bytes of a checkpoint by part."""

    layers: tuple[int, ...]  # each decoder layer, routed experts included
    routed: tuple[int, ...]  # each decoder layer's routed experts
    outer: int  # embedding, final norm, output projection

    @property
    def total(self) -> int:
        return sum(self.layers) + self.outer


def model_bytes(tensors: dict[str, int], num_layers: int) -> ModelBytes:
    """``tensors``: stored name -> bytes (``Checkpoint.tensors``)."""
    layers, routed, outer = [0] * num_layers, [0] * num_layers, 0
    for name, nbytes in tensors.items():
        m = _LAYER.match(name)
        if m is None or int(m.group(1)) >= num_layers:
            outer += nbytes
            continue
        i = int(m.group(1))
        layers[i] += nbytes
        if _EXPERT.search(name):
            routed[i] += nbytes
    return ModelBytes(tuple(layers), tuple(routed), outer)


@dataclass(frozen=True)
class ShardPlan:
    mode: str  # "pipeline" or "experts"
    layer_ranges: tuple[tuple[int, int], ...]  # per rank, [start, end) of the layers it runs
    expert_ranges: tuple[tuple[int, int], ...]  # per rank, [start, end) of each MoE layer's routed experts
    rank_bytes: tuple[int, ...]  # stored bytes each rank reads and holds

    @property
    def size(self) -> int:
        return len(self.layer_ranges)

    def exchanged_per_token(self, hidden: int, moe_layers: int, active: int, dtype_bytes: int) -> int:
        """Bytes one decoded token sends between ranks (all ranks together): pipeline, the hidden state once
        around the ring; experts, one all-sum of the k chosen experts' outputs per MoE layer (a ring all-sum
        moves about 2 (n-1)/n of its buffer per rank)."""
        if self.size < 2:
            return 0
        if self.mode == "pipeline":
            return self.size * hidden * dtype_bytes
        return round(moe_layers * active * hidden * dtype_bytes * 2 * (self.size - 1))


def split_proportionally(sizes: list[int], first_extra: int, budgets: list[int]) -> list[tuple[int, int]]:
    """Contiguous ranges of ``sizes`` (layers), one per budget, each rank's bytes (rank 0 also carries
    ``first_extra``) proportional to its budget; every rank gets at least one layer."""
    ranks, n = len(budgets), len(sizes)
    if n < ranks:
        raise DistributedError(f"{n} layers cannot be split over {ranks} ranks in a pipeline; use fewer ranks")
    total = sum(sizes) + first_extra
    weight = sum(budgets)
    ranges, start, done = [], 0, first_extra
    target = 0.0
    for r in range(ranks - 1):
        target += total * budgets[r] / weight
        end = start + 1  # at least one layer
        done += sizes[start]
        # take the next layer while that brings this rank closer to its target, leaving one per later rank
        while end < n - (ranks - 1 - r) and abs(done + sizes[end] - target) <= abs(done - target):
            done += sizes[end]
            end += 1
        ranges.append((start, end))
        start = end
    ranges.append((start, n))
    return ranges


def expert_split(experts: int, ranks: int) -> list[tuple[int, int]]:
    """Routed experts split as evenly as they go (the first ranks take one more)."""
    if experts < ranks:
        raise DistributedError(f"{experts} experts per layer cannot be split over {ranks} ranks; use the pipeline")
    base, extra = divmod(experts, ranks)
    out, start = [], 0
    for r in range(ranks):
        end = start + base + (1 if r < extra else 0)
        out.append((start, end))
        start = end
    return out


def plan_shards(mode: str, sizes: ModelBytes, budgets: list[int], experts: int | None) -> ShardPlan:
    """The plan for ``mode`` ("pipeline" or "experts"; "auto" is resolved by the caller)."""
    ranks, n = len(budgets), len(sizes.layers)
    if mode == "experts":
        if not experts:
            raise DistributedError("--shard experts needs a Mixture-of-Experts model; this one is dense "
                                   "(use --shard pipeline)")
        split = expert_split(experts, ranks)
        shared = sizes.total - sum(sizes.routed)
        held = tuple(shared + sum(sizes.routed) * (e - s) // experts for s, e in split)
        plan = ShardPlan("experts", tuple((0, n) for _ in range(ranks)), tuple(split), held)
    else:
        layers = split_proportionally(list(sizes.layers), sizes.outer, budgets)
        held = tuple(sum(sizes.layers[s:e]) + (sizes.outer if r == 0 else 0) for r, (s, e) in enumerate(layers))
        all_experts = tuple((0, experts or 0) for _ in range(ranks))
        plan = ShardPlan("pipeline", tuple(layers), all_experts, held)
    return plan


def resolve_mode(mode: str, experts: int | None, layers: int, ranks: int) -> str:
    """``auto``: the pipeline, for a MoE too: measured faster than expert parallelism for prefill and decode
    (benchmarks/RESULTS.md, "Distributed"), with less memory per rank and ~30x fewer bytes per token; expert
    parallelism where a MoE has fewer layers than there are ranks."""
    if mode not in MODES:
        raise DistributedError(f"--shard {mode!r}: expected one of {', '.join(MODES)}")
    if mode == "auto":
        return "experts" if experts and layers < ranks else "pipeline"
    return mode


def check_fits(plan: ShardPlan, budgets: list[int], where) -> None:
    """Every rank's share within its budget, else one line naming the first that is not."""
    for r, (held, budget) in enumerate(zip(plan.rank_bytes, budgets, strict=True)):
        if held > budget:
            from ..machine.memory import human_bytes

            raise DistributedError(f"{where(r)} would hold {human_bytes(held)} of weights ({plan.mode} plan) but "
                                   f"has {human_bytes(budget)}; add ranks or use a smaller quantization")
