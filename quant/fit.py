"""The check ``edge-llm run`` makes before loading: refuse a model that cannot fit in this machine's memory.

It runs on config + headers (a Hub repo not yet downloaded is checked from its headers, so nothing is
pulled that could not run), and names what would fit instead.
"""

from __future__ import annotations

import shlex

from edge_llm.errors import MemoryBudgetError
from edge_llm.generation.context import context_window, model_context_limit
from edge_llm.hub.resolve import read_model_headers
from edge_llm.models.cache import check_kv_bits
from edge_llm.units import human_bytes

from .estimate import Estimate, Machine, estimate_checkpoint


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


def check_fits(ref: str, context: int | None = None, kv_bits: int | None = None,
               machine: Machine | None = None) -> Estimate:
    """Raises MemoryBudgetError when ``ref`` (as stored) won't fit with the KV cache ``edge-llm run`` keeps:
    ``context`` tokens as ``edge_llm.generation.context.context_window`` resolves it (ContextError past the model's
    limit), at ``kv_bits``; returns the estimate.

    A reference that cannot be read (unreachable Hub, gated or missing repo) raises here, once, with the
    line the loader would print: pulling after a failed header read would only ask the Hub again."""
    check_kv_bits(kv_bits)
    found = read_model_headers(ref)
    context = context_window(model_context_limit(found.checkpoint.config), context)
    est = estimate_checkpoint(found.named, context=context, kv_bits=kv_bits, machine=machine, name=ref,
                              folder=found.folder)
    if not est.requested.fits:
        raise MemoryBudgetError(refusal(est, ref))
    return est
