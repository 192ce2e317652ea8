"""The distributed group: whether this process was started by ``mlx.launch``, which rank and host it is, and
joining the others.

``mlx.launch --backend ring`` gives each process ``MLX_RANK`` and ``MLX_HOSTFILE`` (a JSON list, one entry per
rank, of ``"ip:port"`` strings). Without them nothing here initialises MLX's distributed engine: a plain
``edge-llm run`` stays a single process. ``mx.distributed.init`` blocks, holding the GIL, until every peer is
there, so a peer that never comes would hang it silently: the ranks first meet on the watchdog's side
channel (``watchdog.Watchdog``), with a deadline and a line naming who is missing, and only then initialise.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from ..errors import EdgeLLMError

JOIN_TIMEOUT_ENV = "EDGE_LLM_JOIN_TIMEOUT"  # seconds every rank waits for the others to join (default 60)
PEER_TIMEOUT_ENV = "EDGE_LLM_PEER_TIMEOUT"  # seconds of silence after which a peer counts as hung (default 30)
SIDE_PORT_ENV = "EDGE_LLM_DIST_PORT"  # the side channel's port on rank 0 (default: its ring port + 1000)
SIDE_PORT_OFFSET = 1000


class DistributedError(EdgeLLMError):
    """A rank that cannot join, died, or holds a share that does not fit."""


@dataclass(frozen=True)
class Launch:
    """What ``mlx.launch`` told this process."""

    rank: int
    hosts: tuple[str, ...]  # each rank's address (the first of its "ip:port" entries)
    ports: tuple[int, ...]

    @property
    def size(self) -> int:
        return len(self.hosts)

    def where(self, rank: int) -> str:
        return f"rank {rank} ({self.hosts[rank]})"

    @property
    def side_port(self) -> int:
        return int(os.environ.get(SIDE_PORT_ENV) or self.ports[0] + SIDE_PORT_OFFSET)


def launch_info() -> Launch | None:
    """This process's place in a ring launch of two or more ranks; None when not launched that way."""
    rank, hostfile = os.environ.get("MLX_RANK"), os.environ.get("MLX_HOSTFILE")
    if rank is None or not hostfile:
        return None
    try:
        entries = json.loads(Path(hostfile).read_text())
        addresses = [str(e[0] if isinstance(e, list) else e) for e in entries]
        hosts = tuple(a.rsplit(":", 1)[0] for a in addresses)
        ports = tuple(int(a.rsplit(":", 1)[1]) for a in addresses)
        launch = Launch(int(rank), hosts, ports)
    except (OSError, ValueError, IndexError, TypeError) as e:
        raise DistributedError(f"MLX_HOSTFILE={hostfile}: not the ring host list mlx.launch writes ({e}); "
                               "start edge-llm with mlx.launch --backend ring") from None
    if not 0 <= launch.rank < launch.size:
        raise DistributedError(f"MLX_RANK={rank} is outside the {launch.size} ranks of MLX_HOSTFILE={hostfile}")
    return launch if launch.size > 1 else None


def launched() -> bool:
    """Whether this process is one rank of several (cheap: reads the environment only)."""
    return os.environ.get("MLX_RANK") is not None and bool(os.environ.get("MLX_HOSTFILE"))


def seconds(env: str, default: float) -> float:
    value = os.environ.get(env)
    try:
        return float(value) if value else default
    except ValueError:
        raise DistributedError(f"{env}={value!r} is not a number of seconds") from None


@dataclass
class Group:
    """The joined ranks: MLX's group plus who is where."""

    launch: Launch
    mlx: mx.distributed.Group

    @property
    def rank(self) -> int:
        return self.launch.rank

    @property
    def size(self) -> int:
        return self.launch.size

    def where(self, rank: int) -> str:
        return self.launch.where(rank)


_joined: Group | None = None


def share_cores(launch: Launch) -> None:
    """Ranks on one host split its cores: each kernel pool and BLAS takes its share, not all of them (two pools
    that each poll every core slow both several times). An explicit EDGE_LLM_CPU_THREADS is kept."""
    here = launch.hosts.count(launch.hosts[launch.rank])
    if here < 2 or os.environ.get("EDGE_LLM_CPU_THREADS"):
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    share = max(1, cores // here)
    os.environ["EDGE_LLM_CPU_THREADS"] = str(share)
    try:
        import ctypes

        ctypes.CDLL(None).openblas_set_num_threads(share)  # a preloaded OpenBLAS (machine.blas)
    except (OSError, AttributeError):
        pass


def join() -> Group | None:
    """Joins the launch this process belongs to (once); None when it was not launched with two ranks or more."""
    global _joined
    if _joined is not None:
        return _joined
    launch = launch_info()
    if launch is None:
        return None
    from .watchdog import start_watchdog

    start_watchdog(launch, seconds(JOIN_TIMEOUT_ENV, 60.0), seconds(PEER_TIMEOUT_ENV, 30.0))
    share_cores(launch)
    _joined = Group(launch, mx.distributed.init(strict=True, backend="ring"))
    if _joined.mlx.size() != launch.size or _joined.mlx.rank() != launch.rank:
        raise DistributedError(f"MLX's ring has rank {_joined.mlx.rank()} of {_joined.mlx.size()}, MLX_HOSTFILE "
                               f"says rank {launch.rank} of {launch.size}")
    return _joined


def current() -> Group | None:
    """The group joined so far (None: single process)."""
    return _joined
