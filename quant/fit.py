"""The check ``edge-llm run`` makes before loading: refuse a model that cannot fit in this machine's memory.

It runs on config + headers (a Hub repo not yet downloaded is checked from its headers, so nothing is
pulled that could not run), and names what would fit instead.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, replace
from pathlib import Path

from edge_llm.errors import MemoryBudgetError
from edge_llm.generation.context import context_window, model_context_limit
from edge_llm.hub.resolve import read_model_headers
from edge_llm.machine.memory import human_bytes
from edge_llm.models.cache import check_kv_bits

from .devices import Device
from .estimate import Estimate, Machine, estimate_checkpoint
from .placement import Placement, place


def refusal(est: Estimate, ref: str) -> str:
    """One line: what the model needs, how much is missing, what would fit."""
    r, m = est.requested, est.machine
    kind = {"ram": "RAM", "unified": "GPU working set", "vram": "VRAM"}.get(m.memory_kind, m.memory_kind)
    need = (f"{ref}: needs about {human_bytes(r.total_bytes)} ({human_bytes(r.weights_bytes)} weights + "
            f"{human_bytes(r.kv_cache_bytes)} KV cache at {est.context} tokens + "
            f"{human_bytes(r.overhead_bytes)} runtime) but this machine has {human_bytes(m.memory_bytes)} of {kind}, "
            f"{human_bytes(r.total_bytes - m.memory_bytes)} short")
    smaller = [row for row in est.rows if row.fits and not row.stored and row.bits < r.bits]
    if not smaller:
        return f"{need}; no smaller precision fits either (try a shorter context); pass --force to try anyway"
    best = max(smaller, key=lambda row: row.bits)
    out = f"{ref.rstrip('/').split('/')[-1]}-{best.bits}bit"
    cmd = f"edge-llm quantize {shlex.quote(ref)} -o {shlex.quote(out)} --bits {best.bits}"
    return (f"{need}; at {best.label} it needs {human_bytes(best.total_bytes)} and fits: `{cmd}`; "
            "or pass --force to try anyway")


@dataclass(frozen=True)
class RunPlan:
    """How ``edge-llm run`` will hold the model: all of it resident, or its routed experts streamed."""

    estimate: Estimate
    placement: Placement | None  # None: resident and fits (or a dense model); see quant.placement

    @property
    def expert_slots(self) -> int | None:
        """Bank slots per MoE layer when the experts stream, else None."""
        return self.placement.bank_slots if self.placement and self.placement.mode == "streamed" else None

    def describe(self) -> str:
        """One line for stderr before loading: the mode, the bank and the speed to expect."""
        est, p = self.estimate, self.placement
        budget = f"{human_bytes(est.machine.memory_bytes)} ({est.machine.budget_source})"
        if p is None or p.mode != "streamed":
            return f"resident: {human_bytes(est.requested.total_bytes)} of a {budget} budget"
        f = est.requested.footprint
        speed = (f"; expect at most {p.tps:.1f} tokens/s" if p.tps else
                 "; `edge-llm doctor` measures the disk and memory speeds that bound decoding")
        return (f"streaming experts: {human_bytes(f.streamed_fixed_bytes)} resident + a bank of {p.bank_slots} of "
                f"{f.experts} experts per MoE layer ({human_bytes(p.bank_bytes)}, hit rate >= {p.hit_rate:.0%}) "
                f"within a {budget} budget{speed}")


def streaming_refusal(est: Estimate, p: Placement, ref: str) -> str:
    f = est.requested.footprint
    return (f"{ref}: needs at least {human_bytes(p.needed_bytes)} to run with its experts streamed from disk "
            f"({human_bytes(f.streamed_fixed_bytes)} resident part, KV cache, runtime and reads at {est.context} "
            "tokens + "
            f"{f.experts_per_token} experts per MoE layer, {human_bytes(f.slot_bytes * f.experts_per_token)}) but "
            f"the budget is {human_bytes(est.machine.memory_bytes)} ({est.machine.budget_source}); pass "
            "--max-memory to set it, a shorter --context, or --force to try anyway")


def check_fits(ref: str, context: int | None = None, kv_bits: int | None = None,
               machine: Machine | None = None, max_memory: int | None = None) -> RunPlan:
    """How ``ref`` (as stored) will run within the memory budget (``max_memory``, else what this process may
    use) with the KV cache ``edge-llm run`` keeps: ``context`` tokens as
    ``edge_llm.generation.context.context_window`` resolves it (ContextError past the model's limit), at
    ``kv_bits``. Resident when it fits; a MoE whose resident part and a bank of k experts per layer fit streams
    its experts; otherwise MemoryBudgetError with what would fit.

    A reference that cannot be read (unreachable Hub, gated or missing repo) raises here, once, with the
    line the loader would print: pulling after a failed header read would only ask the Hub again."""
    check_kv_bits(kv_bits)
    found = read_model_headers(ref)
    context = context_window(model_context_limit(found.checkpoint.config), context)
    machine = machine or Machine.this(max_memory)
    est = estimate_checkpoint(found.named, context=context, kv_bits=kv_bits, machine=machine, name=ref,
                              folder=found.folder)
    row = est.requested
    if row.fits:
        return RunPlan(est, None)
    moe = row.footprint is not None and row.footprint.experts > 0
    if not moe:
        raise MemoryBudgetError(refusal(est, ref))
    placement = place_here(est, found.folder)
    if placement.mode != "streamed":
        raise MemoryBudgetError(streaming_refusal(est, placement, ref))
    return RunPlan(est, placement)


def place_here(est: Estimate, folder: Path | None) -> Placement | None:
    """Where the requested row runs on the estimate's machine (its memory budget, its memory and disk speeds):
    resident, streamed or no; None for a rough estimate (no exact footprint). When it would stream, the speeds
    that bound it are measured first if they never were (about a second each, remembered)."""
    row, machine = est.requested, est.machine
    if row.footprint is None:
        return None
    device = Device("this machine", "this", machine.memory_kind, machine.memory_bytes, machine.memory_bytes,
                    machine.bandwidth, None)
    placement = place(row.footprint, device)
    if placement.mode == "streamed" and folder is not None:
        from edge_llm.machine.bandwidth import machine_bandwidth
        from edge_llm.machine.disk import disk_bandwidth

        device = replace(device, bandwidth=machine.bandwidth or machine_bandwidth(),
                         disk_bandwidth=disk_bandwidth(folder).random)
        placement = place(row.footprint, device)
    return placement
