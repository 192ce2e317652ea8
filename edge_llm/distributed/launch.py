"""Whether this process was started by ``mlx.launch``, and which rank and host it is.

``mlx.launch --backend ring`` gives each process ``MLX_RANK`` and ``MLX_HOSTFILE`` (a JSON list, one entry per
rank, of ``"ip:port"`` strings). Without them nothing in ``edge_llm.distributed`` initialises MLX's
distributed engine: a plain ``edge-llm run`` stays a single process.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

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
