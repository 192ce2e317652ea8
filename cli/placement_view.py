"""How ``estimate`` shows where a model runs: the streaming line for this machine, the ``--devices`` table."""

from __future__ import annotations

from rich.table import Table

from edge_llm.machine.memory import human_bytes
from quant.estimate import Estimate
from quant.placement import Placement


def _tps(p: Placement) -> str:
    if p.tps is not None:
        return f"{p.tps:.1f}"
    return "-" if p.mode == "no" else "?"


def streaming_line(est: Estimate, p: Placement) -> str:
    """This machine's verdict for a MoE that does not fit resident: streamed (and how) or not at all."""
    f = est.requested.footprint
    if p.mode == "no":
        return (f"[red]cannot stream either:[/] needs at least {human_bytes(p.needed_bytes)} (resident part "
                f"{human_bytes(f.streamed_fixed_bytes)} + {f.experts_per_token} experts per MoE layer)")
    disk = (f"{human_bytes(p.disk_bytes_per_token)} read from disk per token at that hit rate"
            if p.disk_bytes_per_token else "nothing read from disk")
    speed = (f"decode ≤ {p.tps:.1f} tokens/s (memory bound {p.memory_tps or 0:.1f}, disk bound {p.disk_tps:.1f})"
             if p.tps else "decode speed unknown until `edge-llm doctor` measures this disk and memory")
    return (f"[yellow]streams its experts:[/] {human_bytes(f.streamed_fixed_bytes)} resident (weights but routed "
            f"experts, KV cache, runtime, expert reads in flight) + a bank of {p.bank_slots} of {f.experts} experts "
            f"per MoE layer ({human_bytes(p.bank_bytes)}), hit rate ≥ {p.hit_rate:.0%}; {disk}; {speed}")


def devices_table(placements: list[Placement]) -> Table:
    table = Table(show_edge=False, header_style="bold")
    for name in ("device", "memory", "usable", "runs", "needs", "bank", "hits ≥", "disk/token", "tok/s ≤"):
        table.add_column(name, justify="left" if name in ("device", "runs") else "right", no_wrap=True)
    for p in placements:
        bank = f"{p.bank_slots}" if p.mode == "streamed" else "all" if p.mode == "resident" else "-"
        style = {"resident": "green", "streamed": "yellow", "no": "dim"}[p.mode]
        table.add_row(p.device.name, human_bytes(p.device.memory_bytes), human_bytes(p.device.usable_bytes),
                      p.mode, human_bytes(p.needed_bytes), bank,
                      f"{p.hit_rate:.0%}" if p.mode == "streamed" else "",
                      human_bytes(p.disk_bytes_per_token) if p.mode == "streamed" else "", _tps(p), style=style)
    return table
