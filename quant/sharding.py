"""``estimate MODEL --hosts N`` / ``--hostfile FILE``: what each rank of an ``mlx.launch`` would hold, whether
it fits, and the bytes the ranks exchange per token, in each sharding mode.

The split is ``edge_llm.distributed.plan``'s, the one the ranks compute when they load, applied to the
requested precision's weights (each layer's share of the stored bytes, scaled to that precision). Each rank
also holds its KV cache (pipeline: its layers'; experts: all of it, attention is replicated) and a process's
runtime. Hosts are this machine's budget each (``--hosts``), or a host file in ``mlx.launch``'s format whose
entries may add ``"memory": "96GB"`` (mlx.launch ignores the key).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from edge_llm.distributed.plan import ModelBytes, model_bytes, plan_shards
from edge_llm.formats.checkpoint import Checkpoint
from edge_llm.loader import build_model
from edge_llm.machine.memory import parse_size

from .estimate import Estimate


@dataclass(frozen=True)
class Host:
    name: str
    memory_bytes: int


@dataclass(frozen=True)
class RankShare:
    rank: int
    host: str
    layers: tuple[int, int]  # [start, end)
    experts: tuple[int, int] | None  # [start, end) of each MoE layer's routed experts (None: dense)
    weights_bytes: int
    kv_cache_bytes: int
    runtime_bytes: int
    memory_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.runtime_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.memory_bytes


@dataclass(frozen=True)
class ShardingEstimate:
    mode: str
    ranks: list[RankShare]
    bytes_per_token: int  # sent between ranks per decoded token, all ranks together

    @property
    def fits(self) -> bool:
        return all(r.fits for r in self.ranks)

    def as_dict(self) -> dict:
        return {"mode": self.mode, "fits": self.fits, "bytes_per_token": self.bytes_per_token,
                "ranks": [dict(asdict(r), total_bytes=r.total_bytes, fits=r.fits) for r in self.ranks]}


def read_hostfile(path: Path, default_memory: int) -> list[Host]:
    """The hosts of an ``mlx.launch`` host file (a list, or ``{"hosts": [...]}``), each ``{"ssh": ..., "ips":
    [...]}`` with an optional ``"memory"`` (a size, e.g. "96GB"); without it a host counts as this machine."""
    try:
        data = json.loads(Path(path).read_text())
        entries = data["hosts"] if isinstance(data, dict) else data
        hosts = []
        for e in entries:
            name = e.get("ssh") or (e.get("ips") or ["?"])[0]
            memory = e.get("memory")
            hosts.append(Host(str(name), parse_size(str(memory)) if memory is not None else default_memory))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not an mlx.launch host file ({e}); expected [{{\"ssh\": \"host\", \"ips\": "
                         "[\"10.0.0.2\"], \"memory\": \"96GB\"}, ...]") from None
    if len(hosts) < 2:
        raise ValueError(f"{path}: a host file for sharding names two hosts or more")
    return hosts


def _scaled(sizes: ModelBytes, weights_bytes: int) -> ModelBytes:
    factor = weights_bytes / max(1, sizes.total)
    return ModelBytes(tuple(round(b * factor) for b in sizes.layers), tuple(round(b * factor) for b in sizes.routed),
                      round(sizes.outer * factor))


def estimate_sharding(est: Estimate, checkpoint: Checkpoint, hosts: list[Host]) -> list[ShardingEstimate]:
    """Each mode that applies (pipeline; experts for a MoE) for the requested precision over ``hosts``."""
    model = build_model(checkpoint)
    row, layers = est.requested, model.args.num_hidden_layers
    sizes = _scaled(model_bytes({n: t.nbytes for n, t in checkpoint.tensors.items()}, layers), row.weights_bytes)
    experts = model.experts
    act_bytes = 4 if est.machine.backend == "cpu" else 2
    budgets = [h.memory_bytes for h in hosts]
    out = []
    for mode in ("pipeline", "experts") if experts else ("pipeline",):
        plan = plan_shards(mode, sizes, budgets, experts.routed if experts else None)
        ranks = []
        for r, host in enumerate(hosts):
            start, end = plan.layer_ranges[r]
            kv = row.kv_cache_bytes * (end - start) // layers
            ranks.append(RankShare(r, host.name, (start, end), plan.expert_ranges[r] if experts else None,
                                   plan.rank_bytes[r], kv, row.overhead_bytes, host.memory_bytes))
        moe_layers = len(experts.layers) if experts else 0
        exchanged = plan.exchanged_per_token(model.args.hidden_size, moe_layers, experts.active if experts else 0,
                                             act_bytes)
        out.append(ShardingEstimate(mode, ranks, exchanged))
    return out
