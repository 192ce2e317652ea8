"""Loading a model as ``run`` and ``serve`` both do: the memory check first (refusing, or streaming a MoE's
experts when it does not fit), then the model and its tokenizer behind a spinner."""

from __future__ import annotations

from contextlib import nullcontext

from edge_llm.kernels import extension as cpu_kernels
from edge_llm.loader import load
from quant.fit import check_fits

from .common import err


def expert_slots_that_fit(model: str, *, context: int | None, kv_bits: int | None, max_memory: int | None,
                          force: bool) -> int | None:
    """Refuses (MemoryBudgetError) before loading, or pulling, a model that cannot fit, naming what would;
    the experts' bank size when a MoE must stream them; None when it runs resident (or ``force``)."""
    if force:
        return None
    plan = check_fits(model, context=context, kv_bits=kv_bits, max_memory=max_memory)
    if plan.expert_slots or max_memory is not None:
        err.print(plan.describe(), style="dim", soft_wrap=True)
    return plan.expert_slots


def prepare_cpu_kernels() -> None:
    """Builds the CPU kernels first if this MLX has none yet (once, ~20 s), saying so rather than seeming to
    hang; a machine that cannot build them runs MLX's own kernels (``edge-llm doctor`` says why)."""
    if cpu_kernels.runs_on_cpu() and cpu_kernels.needs_build():
        with err.status("compiling CPU kernels for this machine (once)", spinner="dots") if err.is_terminal \
                else nullcontext():
            if not err.is_terminal:
                err.print("edge-llm: compiling CPU kernels for this machine (once, ~20 s)", style="dim")
            cpu_kernels.load()


def load_with_status(model: str, name: str, *, dtype: str | None, expert_slots: int | None, expert_policy: str):
    """(model, tokenizer), with a spinner on a terminal; the CPU kernels built first if needed."""
    prepare_cpu_kernels()
    with err.status(f"loading {name}", spinner="dots") if err.is_terminal else nullcontext():
        return load(model, dtype=dtype, expert_slots=expert_slots, expert_policy=expert_policy)
