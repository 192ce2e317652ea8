"""The distributed group: joining the other ranks of a launch (``launch.launch_info``).

``mx.distributed.init`` blocks, holding the GIL, until every peer is there, so a peer that never comes would
hang it silently: the ranks first meet on the watchdog's side channel (``watchdog.start_watchdog``), with a
deadline and a line naming who is missing, and only then initialise MLX's ring.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import mlx.core as mx

from .launch import JOIN_TIMEOUT_ENV, PEER_TIMEOUT_ENV, DistributedError, Launch, launch_info, seconds
from .watchdog import start_watchdog


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
    """Ranks that compute at the same time on one host (expert parallelism) split its cores: each kernel pool and
    BLAS takes its share, not all of them (two pools that each want every core slow both several times). Pipeline
    ranks take turns, sleeping while they wait, so each keeps every core. An explicit EDGE_LLM_CPU_THREADS is
    kept."""
    here = launch.hosts.count(launch.hosts[launch.rank])
    if here < 2 or os.environ.get("EDGE_LLM_CPU_THREADS"):
        return
    from ..kernels import extension

    share = max(1, extension.usable_cores() // here)
    os.environ["EDGE_LLM_CPU_THREADS"] = str(share)
    module = extension.load(build_if_missing=False)
    if module is not None:  # already loaded (rank 0 builds the kernels before loading): set its threads again
        extension.configure(module)
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
    start_watchdog(launch, seconds(JOIN_TIMEOUT_ENV, 60.0), seconds(PEER_TIMEOUT_ENV, 30.0))
    _joined = Group(launch, mx.distributed.init(strict=True, backend="ring"))
    if _joined.mlx.size() != launch.size or _joined.mlx.rank() != launch.rank:
        raise DistributedError(f"MLX's ring has rank {_joined.mlx.rank()} of {_joined.mlx.size()}, MLX_HOSTFILE "
                               f"says rank {launch.rank} of {launch.size}")
    return _joined


def current() -> Group | None:
    """The group joined so far (None: single process)."""
    return _joined
