"""Loading a model as ``run`` and ``serve`` both do: the memory check first (refusing, or streaming a MoE's
experts when it does not fit), then the model and its tokenizer behind a spinner."""

from __future__ import annotations

from contextlib import nullcontext

import typer

from edge_llm.distributed import launched
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


def _shard_mode(value: str) -> str:
    from edge_llm.distributed.plan import MODES

    if value not in MODES:
        raise typer.BadParameter(f"{value!r}: expected one of {', '.join(MODES)}", param_hint="--shard")
    return value


def shard_option():
    return typer.Option("auto", "--shard", metavar="MODE", parser=_shard_mode,
                        help="Under mlx.launch: how the ranks split the model: pipeline (layer ranges), experts "
                             "(each MoE layer's experts) or auto (the pipeline: measured faster, for MoE models too).")


def follow_if_follower(model: str, shard: str, dtype: str | None) -> bool:
    """Under ``mlx.launch``: joins the ranks; on every rank but 0 loads its share and runs what rank 0 commands
    until it stops, then True (the command ends, having printed nothing). False on rank 0 and alone."""
    if not launched():
        return False
    from edge_llm.distributed.group import join
    from edge_llm.distributed.load import load_share

    if join().rank == 0:
        return False
    load_share(model, shard, dtype)  # the CPU kernels build on first use if need be, silently
    return True


def load_with_status(model: str, name: str, *, dtype: str | None, expert_slots: int | None, expert_policy: str,
                     shard: str = "auto"):
    """(model, tokenizer), with a spinner on a terminal; the CPU kernels built first if needed. Under
    ``mlx.launch``, rank 0's share and the sharded model (``edge_llm.distributed``)."""
    prepare_cpu_kernels()
    if launched():
        from edge_llm.distributed.load import load_share

        with err.status(f"loading {name} ({shard} shards)", spinner="dots") if err.is_terminal else nullcontext():
            return load_share(model, shard, dtype)
    with err.status(f"loading {name}", spinner="dots") if err.is_terminal else nullcontext():
        return load(model, dtype=dtype, expert_slots=expert_slots, expert_policy=expert_policy)
