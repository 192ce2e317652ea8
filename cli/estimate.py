"""``edge-llm estimate MODEL``: weights + KV cache + runtime for fp32/fp16/8-bit/4-bit, against this machine."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edge_llm.hub.resolve import read_model_headers
from edge_llm.machine.memory import human_bytes
from quant.estimate import Estimate, Row, estimate
from quant.fit import place_here
from quant.placement import Placement
from quant.sharding import Host, ShardingEstimate, estimate_sharding, read_hostfile
from quant.where import device_placements

from .common import (
    DEFAULT_NAME,
    MODEL_HELP,
    human_count,
    max_memory_option,
    model_argument,
    model_or_default,
    stdout_is_terminal,
    user_errors,
)
from .placement_view import devices_table, streaming_line


def placement_dict(est: Estimate, p: Placement) -> dict:
    """This machine's verdict with the footprint behind it (resident part, one expert, experts, MoE layers)."""
    f = est.requested.footprint
    return {**p.as_dict(), "resident_bytes": f.fixed_bytes, "stream_work_bytes": f.stream_work_bytes,
            "expert_bytes": f.expert_bytes,
            "experts": f.experts, "experts_per_token": f.experts_per_token, "moe_layers": f.moe_layers}


KINDS = {"ram": "RAM", "unified": "GPU working set (unified memory)", "vram": "VRAM"}


def _table(est: Estimate) -> Table:
    table = Table(show_edge=False, header_style="bold")
    for name in ("precision", "file", "weights", "KV cache", "runtime", "total", "fits", "tok/s ≤"):
        table.add_column(name, justify="left" if name == "precision" else "right", no_wrap=True)
    for r in est.rows:
        tps = f"{r.decode_tps_ceiling:.1f}" if r.decode_tps_ceiling else "?"
        marker = "▶ " if r.requested else "  "
        table.add_row(marker + r.label, human_bytes(r.file_bytes), human_bytes(r.weights_bytes),
                      human_bytes(r.kv_cache_bytes), human_bytes(r.overhead_bytes), human_bytes(r.total_bytes),
                      "yes" if r.fits else "no", tps, style="bold reverse" if r.requested else None)
    return table


def _verdict(est: Estimate) -> str:
    r, m = est.requested, est.machine
    kind = KINDS.get(m.memory_kind, m.memory_kind)
    if r.fits:
        return (f"[green]fits:[/] {r.label} needs {human_bytes(r.total_bytes)} of this machine's "
                f"{human_bytes(m.memory_bytes)} {kind} ({r.total_bytes / m.memory_bytes:.0%})")
    line = (f"[red]does not fit:[/] {r.label} needs {human_bytes(r.total_bytes)}, this machine has "
            f"{human_bytes(m.memory_bytes)} {kind} ({human_bytes(r.total_bytes - m.memory_bytes)} short)")
    best = _best_fitting(est)
    return line + (f"; {best.label} fits ({human_bytes(best.total_bytes)})" if best else "; no precision fits")


def _best_fitting(est: Estimate) -> Row | None:
    fitting = [row for row in est.rows if row.fits]
    return max(fitting, key=lambda row: row.bits) if fitting else None


def _speed(est: Estimate) -> str:
    r, m = est.requested, est.machine
    if not m.bandwidth:
        return "decode speed ceiling: unknown until `edge-llm doctor` has measured this machine's memory bandwidth"
    return (f"decode speed ceiling: {r.decode_tps_ceiling:.1f} tokens/s ({human_bytes(m.bandwidth)}/s memory "
            f"bandwidth / {human_bytes(r.bytes_per_token)} read per token)")


@user_errors
def estimate_cmd(
    model: str | None = model_argument(f"{MODEL_HELP}, read as config and headers only (nothing is downloaded); "
                                       f"default: the embedded {DEFAULT_NAME}."),
    bits: int | None = typer.Option(None, "--bits", "-b", metavar="BITS",
                                    help="4, 8, 16 or 32 (default: the model as stored)."),
    group_size: int = typer.Option(64, "--group-size", "-g", metavar="N",
                                   help="Quantization group size: 32, 64 or 128."),
    context: int | None = typer.Option(None, "--context", "-c", min=1, metavar="TOKENS",
                                       help="Tokens of context (prompt + answer); default: what `run` keeps, the "
                                            "model's limit up to 4096."),
    batch: int = typer.Option(1, "--batch", min=1, metavar="N", help="Sequences at once."),
    kv_bits: int | None = typer.Option(None, "--kv-bits", metavar="BITS",
                                       help="16, 8 or 4 (default: the compute dtype)."),
    params: str | None = typer.Option(None, "--params", metavar="COUNT",
                                      help="Rough mode, instead of MODEL: a parameter count, e.g. 7B."),
    arch: str | None = typer.Option(None, "--arch", metavar="ARCH",
                                    help="Rough mode: the architecture (llama, mixtral, ...)."),
    revision: str | None = typer.Option(None, "--revision", metavar="REV",
                                        help="Hub revision (branch, tag or commit)."),
    max_memory: int | None = max_memory_option(),
    devices: bool = typer.Option(False, "--devices", help="Which common machines run it (resident, experts streamed "
                                                          "from disk, or not) and how fast at best."),
    only: str | None = typer.Option(None, "--only", metavar="NAMES",
                                    help="With --devices: families (apple, nvidia, pc) or parts of names (m4, 4090)."),
    hosts: int | None = typer.Option(None, "--hosts", min=2, metavar="N",
                                     help="Sharded over N machines like this one (mlx.launch): what each rank holds, "
                                          "whether it fits, bytes exchanged per token."),
    hostfile: str | None = typer.Option(None, "--hostfile", metavar="FILE",
                                         help="As --hosts, for the machines of an mlx.launch host file (an entry may "
                                              "add \"memory\": \"96GB\"; else it counts as this machine)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """How much memory MODEL needs (weights + KV cache + runtime) at each precision, and whether it fits here."""
    if model is not None and params is not None:
        raise ValueError("give either MODEL or --params, not both")
    name = model
    if params is None:
        model, name = model_or_default(model)
    est = estimate(model, bits=bits, group_size=group_size, context=context, batch=batch, kv_bits=kv_bits,
                   params=params, arch=arch, revision=revision, max_memory=max_memory)
    here = place_here(est, est.folder)
    placements = []
    if devices:
        if est.requested.footprint is None:
            raise ValueError("--devices needs a model's real shapes: give MODEL, not --params")
        placements = device_placements(read_model_headers(model, revision).named, est, only, est.folder)
    shards = _sharding(est, model, revision, hosts, hostfile)
    if as_json:
        print(json.dumps({**est.as_dict(), "budget_source": est.machine.budget_source,
                          **({"placement": placement_dict(est, here)} if here else {}),
                          **({"devices": [p.as_dict() for p in placements]} if devices else {}),
                          **({"sharding": [s.as_dict() for s in shards]} if shards else {})}))
        return
    out = Console(highlight=False, width=None if stdout_is_terminal() else 120)
    experts = f", {human_count(est.params_active)} active per token" if est.params_active != est.params_total else ""
    out.print(f"[bold]{escape(name or est.model)}[/] ({est.model_type}): {human_count(est.params_total)} parameters"
              f"{experts}; "
              f"context {est.context} tokens, batch {est.batch}; {est.machine.backend} backend", soft_wrap=True)
    for note in est.notes:
        out.print(f"[dim]{note}[/]", soft_wrap=True)
    out.print(_table(est))
    out.print(_verdict(est), soft_wrap=True)
    if here is not None and not est.requested.fits and est.requested.footprint.experts:
        out.print(streaming_line(est, here), soft_wrap=True)
    out.print(_speed(est), soft_wrap=True)
    if devices:
        out.print(devices_table(placements))
    for shard in shards:
        out.print(_sharding_table(shard))
        out.print(_sharding_line(shard), soft_wrap=True)


def _sharding(est: Estimate, model: str | None, revision: str | None, hosts: int | None,
              hostfile: str | None) -> list[ShardingEstimate]:
    if hosts is None and hostfile is None:
        return []
    if est.requested.footprint is None:
        raise ValueError("--hosts/--hostfile need a model's real shapes: give MODEL, not --params")
    if hostfile is not None:
        machines = read_hostfile(Path(hostfile), est.machine.memory_bytes)
    else:
        machines = [Host(f"host {i}", est.machine.memory_bytes) for i in range(hosts)]
    return estimate_sharding(est, read_model_headers(model, revision).named, machines)


def _sharding_table(shard: ShardingEstimate) -> Table:
    table = Table(title=f"{shard.mode} over {len(shard.ranks)} ranks", show_edge=False, header_style="bold")
    for name in ("rank", "host", "layers", "experts", "weights", "KV cache", "runtime", "total", "memory", "fits"):
        table.add_column(name, justify="left" if name in ("host", "layers", "experts") else "right", no_wrap=True)
    for r in shard.ranks:
        experts = f"{r.experts[0]}-{r.experts[1] - 1}" if r.experts else "-"
        table.add_row(str(r.rank), escape(r.host), f"{r.layers[0]}-{r.layers[1] - 1}", experts,
                      human_bytes(r.weights_bytes), human_bytes(r.kv_cache_bytes), human_bytes(r.runtime_bytes),
                      human_bytes(r.total_bytes), human_bytes(r.memory_bytes), "yes" if r.fits else "no")
    return table


def _sharding_line(shard: ShardingEstimate) -> str:
    verdict = "[green]every rank fits[/]" if shard.fits else "[red]a rank does not fit[/]"
    return (f"{shard.mode}: {verdict}; the ranks exchange {human_bytes(shard.bytes_per_token)} per decoded token "
            f"(mlx.launch --hostfile FILE --backend ring -- edge-llm run MODEL --shard {shard.mode})")
