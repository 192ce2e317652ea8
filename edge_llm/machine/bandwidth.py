"""Memory bandwidth of this machine, measured once and remembered.

Decoding reads every active weight once per token, so bandwidth / bytes-per-token is the ceiling on
decode speed. We measure a large read (a reduction over an array several times the size of the
caches, and a matrix-vector product over the same array) with MLX on the active device, keep the best
of a few runs, and store the figure per device
under ``$EDGE_LLM_HOME`` (default ``~/.cache/edge-llm``) so later commands can use it at no cost. A store
that is not what we write (not a JSON object, a figure that is not a positive number, garbage) counts as
no figure: it is measured again and the store rewritten.
"""

from __future__ import annotations

import json
import math
import os
import stat
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from .. import kernels
from .backend import detect
from .state import state_dir

MEASURE_BYTES = 512 * 1024 * 1024  # CPU: several times the caches
GPU_MEASURE_BYTES = 4 * 1024 * 1024 * 1024  # a GPU reads 512 MiB in ~0.1 ms: too short to time well
MAX_STORE_BYTES = 1 << 20  # a figure per device: a few hundred bytes


def _store() -> Path:
    return state_dir() / "bandwidth.json"


def _device_key() -> str:
    info = detect()
    return f"{info.name}:{info.device_name}"


def measure_bandwidth(nbytes: int | None = None, repeats: int = 5) -> float:
    """Bytes per second read from ``nbytes`` of float32, the best of ``repeats`` of three probes: a full
    reduction (MLX's own loop), a matrix-vector product (BLAS, multi-threaded), which is how decoding
    reads weights, and on the CPU the same product through edge-llm's kernels (all cores, the way decoding
    reads them now; MLX's CPU loops are compute-bound well below the memory's pace). On a shared machine
    each is sometimes slowed, so the best of them is the ceiling."""
    nbytes = nbytes or (MEASURE_BYTES if detect().name == "cpu" else GPU_MEASURE_BYTES)
    cols = 4096
    w = mx.ones((nbytes // 4 // cols, cols), dtype=mx.float32)  # [rows, cols]
    x = mx.ones((1, cols), dtype=mx.float32)
    mx.eval(w, x)
    probes = [lambda: mx.sum(w), lambda: x @ w.T]
    if kernels.float_matmul(x, w) is not None:
        probes.append(lambda: kernels.float_matmul(x, w))
    best = float("inf")
    for probe in probes:
        mx.eval(probe())  # warm up
        for _ in range(repeats):
            start = time.perf_counter()
            mx.eval(probe())
            best = min(best, time.perf_counter() - start)
    return nbytes / best


def _stored() -> dict[str, float]:
    """The store's figures by device; what is unreadable or not a positive finite number is left out."""
    try:
        fd = os.open(_store(), os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block us
    except OSError:
        return {}
    try:
        st = os.fstat(fd)
        raw = os.read(fd, MAX_STORE_BYTES) if stat.S_ISREG(st.st_mode) and st.st_size <= MAX_STORE_BYTES else b""
        data = json.loads(raw)
    except (OSError, ValueError, RecursionError):  # garbage, invalid UTF-8, nested too deep
        return {}
    finally:
        os.close(fd)
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in ((k, _figure(v)) for k, v in data.items()) if v is not None}


def _figure(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if math.isfinite(value) and value > 0 else None


def remembered_bandwidth() -> float | None:
    """The stored figure for this device, or None when it was never measured (or the store is damaged)."""
    return _stored().get(_device_key())


def stored_figures() -> dict[str, float]:
    """Every remembered figure by key: memory bandwidth per device, disk bandwidth per filesystem (disk.py)."""
    return _stored()


def remember_figures(figures: dict[str, float]) -> None:
    """Adds ``figures`` to the store, keeping the others; a read-only home only costs a re-measurement."""
    path = _store()
    data = _stored()
    data.update(figures)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".bandwidth-", dir=path.parent)  # a new file: no link followed
    except OSError:
        return
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=2))
        os.replace(tmp, path)
    except OSError:
        Path(tmp).unlink(missing_ok=True)


def machine_bandwidth(refresh: bool = False) -> float:
    """The remembered bandwidth, measuring (and storing) it first when needed."""
    if not refresh and (known := remembered_bandwidth()) is not None:
        return known
    value = measure_bandwidth()
    remember_figures({_device_key(): value})
    return value
