"""Load the compiled CPU kernels once, prove them on a small product, or say why they are not used.

Nothing here raises: any failure (switched off, no compiler, a build error, an MLX whose binary interface
moved, a result that differs from MLX's) leaves the pure-MLX path in place and a one-line reason in
``status()``, which ``edge-llm doctor`` prints.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
from dataclasses import dataclass
from types import ModuleType

import mlx.core as mx

from .build import MODULE, BuildError, build, build_key, built_library, cache_root, library_name, toolchain

log = logging.getLogger(__name__)

ENV = "EDGE_LLM_CPU_KERNELS"  # "0": never use them; unset or "1": use them on the CPU
THREADS_ENV = "EDGE_LLM_CPU_THREADS"  # threads for the products (default and most: the cores this process may use)
ISA_ENV = "EDGE_LLM_CPU_ISA"  # "avx2" or "generic": a lesser instruction set than the CPU's best (read in C)
ISAS = ("avx512", "avx2", "generic", "neon")
TOLERANCE = 1e-4  # relative to the largest output: summation order only


@dataclass(frozen=True)
class KernelStatus:
    active: bool
    detail: str  # what runs, or why the pure-MLX path does


_lock = threading.Lock()
_module: ModuleType | None = None
_status: KernelStatus | None = None


def switched_off() -> bool:
    return os.environ.get(ENV, "1").strip().lower() in ("0", "off", "false", "no")


def _import(path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(MODULE, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def self_test(module: ModuleType) -> str | None:
    """None when the kernels match MLX on small products of each kind; else what differed."""
    key = mx.random.key(7)
    checks = []
    w, s, b = mx.quantize(mx.random.normal((40, 128), key=key), group_size=32, bits=4)
    x = mx.random.normal((3, 128), key=key)
    s, b = s.astype(mx.float16), b.astype(mx.float16)
    checks.append(("4-bit", module.matmul(x, w, s, b, bits=4, group_size=32),
                   mx.quantized_matmul(x, w, s, b, group_size=32, bits=4)))
    experts = mx.random.normal((3, 24, 128), key=key)
    w, s, b = mx.quantize(experts, group_size=64, bits=8)
    ids = mx.array([2, 0], dtype=mx.uint32)
    checks.append(("gathered 8-bit", module.matmul(x[:2], w, s, b, ids, bits=8, group_size=64),
                   mx.gather_qmm(x[:2, None], w, s, b, rhs_indices=ids, group_size=64, bits=8)[:, 0]))
    half = experts.astype(mx.bfloat16)
    checks.append(("bfloat16", module.matmul(x[:2], half, indices=ids),
                   mx.gather_mm(x[:2, None], half.astype(mx.float32).swapaxes(-1, -2), rhs_indices=ids)[:, 0]))
    for name, got, want in checks:
        scale = max(float(mx.abs(want).max()), 1e-6)
        error = float(mx.abs(got - want).max()) / scale
        if not error <= TOLERANCE:
            return f"{name} product differs from MLX's by {error:.2g} (relative)"
    return None


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def configure(module: ModuleType) -> list[str]:
    """Sets the kernels' threads from the environment, within the cores this process may use (more threads than
    cores only take turns spinning). Returns a note for each setting that was not taken as given."""
    notes, cores = [], usable_cores()
    wanted = os.environ.get(THREADS_ENV, "").strip()
    threads = cores
    if wanted:
        if not wanted.isdigit() or int(wanted) < 1:
            notes.append(f"{THREADS_ENV}={wanted!r} ignored (want a whole number from 1)")
        elif int(wanted) > cores:
            notes.append(f"{THREADS_ENV}={wanted} capped at the {cores} cores this process may use")
        else:
            threads = int(wanted)
    module.set_threads(threads)
    isa = os.environ.get(ISA_ENV, "").strip()
    if isa and isa not in ISAS:
        notes.append(f"{ISA_ENV}={isa!r} ignored (one of {', '.join(ISAS[1:3])})")
    return notes


def _load(build_if_missing: bool) -> tuple[ModuleType | None, KernelStatus]:
    if switched_off():
        return None, KernelStatus(False, f"switched off ({ENV}=0): MLX's own CPU kernels")
    try:
        path = build() if build_if_missing else built_library()
    except BuildError as e:
        return None, KernelStatus(False, f"not built: {e}; MLX's own CPU kernels run")
    except OSError as e:
        return None, KernelStatus(False, f"not built: {e}; MLX's own CPU kernels run")
    if path is None:
        return None, KernelStatus(False, "not built yet (python -m edge_llm.kernels); MLX's own CPU kernels run")
    try:
        module = _import(path)
        notes = configure(module)
        with mx.stream(mx.cpu):
            problem = self_test(module)
    except Exception as e:  # an extension built against another MLX fails in many ways; none may stop a run
        return None, KernelStatus(False, f"unusable ({type(e).__name__}: {e}); MLX's own CPU kernels run")
    if problem:
        return None, KernelStatus(False, f"disabled: {problem}; MLX's own CPU kernels run")
    threads = module.threads()
    detail = f"edge-llm CPU kernels ({module.isa()}, {threads} thread{'s' if threads > 1 else ''})"
    return module, KernelStatus(True, "; ".join([detail, *notes]))


def load(build_if_missing: bool = True) -> ModuleType | None:
    """The kernel module (built first if needed and allowed), or None; the outcome stays in ``status()``."""
    global _module, _status
    if _module is not None:  # loaded: asked hundreds of times per decode step, so without the lock
        return _module
    with _lock:
        if _status is None or (_module is None and build_if_missing and "not built yet" in _status.detail):
            _module, _status = _load(build_if_missing)
            log.info("CPU kernels: %s", _status.detail)
        return _module


def status(build_if_missing: bool = False) -> KernelStatus:
    load(build_if_missing)
    return _status


def runs_on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def needs_build() -> bool:
    """True when the kernels would be compiled by the next ``load()`` (for a one-line notice first)."""
    if _status is not None or switched_off():
        return False
    try:
        tools = toolchain()
    except BuildError:
        return False  # nothing to wait for: load() falls back at once
    return not (cache_root() / build_key(tools) / library_name()).exists()
