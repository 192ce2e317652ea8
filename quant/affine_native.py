"""``affine.quantize``'s search compiled: ``affine_native.c``, built on first use with the system C compiler.

The C routine runs affine.py's steps a group per vector lane (no float32 copies of a tensor, no graph of
whole-chunk MLX ops), rows split between the CPU's cores (ctypes releases the GIL). It is plain C with no tie
to MLX, compiled once per instruction set at that set's vector width (x86-64: AVX-512, AVX2, SSE2; ARM: NEON)
into one library in ``$EDGE_LLM_HOME/quant/<key>/``, the key hashing the source, flags, compiler and machine;
written to a temporary folder and renamed, so a second process never sees half a library. The CPU's flags pick
the variant; every variant gives the same bits. Before use it is proven against ``mx.quantize``. Without a
compiler (or with ``EDGE_LLM_QUANT_NATIVE=0``) ``available()`` is False and ``affine.quantize`` runs its MLX
graph instead; ``why_unavailable()`` says why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from edge_llm.machine.native_build import BuildError, build_once, find_tool, run_compiler, tool_version
from edge_llm.machine.state import state_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("affine_native.c")
FLAGS = ["-O2", "-std=gnu11", "-fPIC", "-ffp-contract=off", "-fno-strict-aliasing", "-Wno-psabi"]
# The routine once per instruction set, at that set's vector width (floats), best first; the CPU's flags
# (/proc/cpuinfo) pick one at run time, EDGE_LLM_QUANT_ISA a lesser one (the tests check each).
ISA_VARIANTS = {
    "x86_64": {"avx512": (16, ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma", "-mf16c"],
                          {"avx512f", "avx512bw", "avx512vl", "avx2", "fma", "f16c"}),
               "avx2": (8, ["-mavx2", "-mfma", "-mf16c"], {"avx2", "fma", "f16c"}),
               "generic": (4, [], set())},
    "aarch64": {"generic": (4, [], set())},
}
ISA_ENV = "EDGE_LLM_QUANT_ISA"
GROUP_SIZES = (32, 64, 128)  # MLX's; the routine takes multiples of its 16-float vectors
ENV = "EDGE_LLM_QUANT_NATIVE"
BLOCK_WEIGHTS = 1 << 18  # weights per task: small enough to balance two cores, large enough to amortise a call
_IN = {mx.float32: 0, mx.bfloat16: 1}
_OUT = {mx.bfloat16: 1, mx.float16: 2}
BAD_INPUT, BAD_SCALE, BAD_BIAS = 1, 2, 4
_LOADED: dict[str, ctypes.CDLL] = {}  # the library stays loaded while its function is in use


class NonFinite(ValueError):
    """The weights hold NaN or infinity, or their scales/offsets overflow the stored dtype (``what``)."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


def _variants() -> dict[str, tuple[int, list[str], set[str]]]:
    return ISA_VARIANTS.get(platform.machine(), {"generic": (4, [], set())})


def _build(compiler: str) -> Path:
    """The library (every variant of this machine's architecture), compiled once into the state folder."""
    h = hashlib.sha256(SOURCE.read_bytes())
    variants = [(name, width, flags) for name, (width, flags, _) in _variants().items()]
    for part in (" ".join(FLAGS), repr(variants), tool_version(compiler), platform.machine(), platform.system()):
        h.update(part.encode())

    def make(work: Path) -> None:
        objects = []
        for isa, (width, flags, _) in _variants().items():
            objects.append(str(work / f"{isa}.o"))
            run_compiler([compiler, *FLAGS, *flags, f"-DEL_WIDTH={width}", f"-DEL_ISA={isa}", "-c", str(SOURCE),
                          "-o", objects[-1]])
        run_compiler([compiler, "-shared", *objects, "-o", str(work / "affine_native.so")])

    return build_once(state_dir() / "quant" / h.hexdigest()[:20], "affine_native.so", make)


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def isa() -> str:
    """The variant that runs here: the best the CPU has, or ``$EDGE_LLM_QUANT_ISA`` where it names one the CPU
    has."""
    flags, variants = _cpu_flags(), _variants()
    usable = [name for name, (_, _, needs) in variants.items() if needs <= flags]
    chosen = os.environ.get(ISA_ENV)
    return chosen if chosen in usable else usable[0]


@functools.cache
def _library() -> tuple[Any, str]:
    """The routine for this CPU (a ctypes function), or None and why not."""
    if os.environ.get(ENV, "1") == "0":
        return None, f"switched off ({ENV}=0)"
    try:
        lib = _LOADED["lib"] = ctypes.CDLL(str(_build(find_tool(("cc", "gcc", "clang"), "CC"))))
    except (BuildError, OSError) as e:
        log.warning("quantize: the compiled search is unavailable (%s); running it as MLX ops (slower)", e)
        return None, str(e)
    fn = getattr(lib, f"el_affine_quantize_{isa()}")
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                   ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_void_p]
    if not _proven(fn):
        log.warning("quantize: the compiled search differs from mx.quantize here; running it as MLX ops (slower)")
        return None, "its min-max quantization differs from mx.quantize's on this machine"
    return fn, ""


def _proven(fn) -> bool:
    """Its min-max quantization (an empty grid) equals ``mx.quantize``'s bit for bit on a small random matrix,
    as bfloat16 and float16: a miscompiled or misloaded routine is not used."""
    w = mx.random.normal((16, 256), key=mx.random.key(0)) * 0.02
    for dtype in (mx.bfloat16, mx.float16):
        x = w.astype(dtype)
        src = np.ascontiguousarray(_as_numpy(x)[0], dtype=np.float32 if dtype == mx.float16 else None)
        packed, scales, biases = np.empty((64, 8), np.uint32), np.empty(64, np.float32), np.empty(64, np.float32)
        if fn(src.ctypes.data, _IN.get(dtype, _IN[mx.float32]), 64, 64, 4, _OUT[dtype], None, 0, 0,
              0, packed.ctypes.data, scales.ctypes.data, biases.ctypes.data) != 0:
            return False
        ref = [np.asarray(a.astype(mx.float32) if a.dtype != mx.uint32 else a)
               for a in mx.quantize(x, group_size=64, bits=4)]
        if not all(np.array_equal(a.reshape(b.shape), b) for a, b in zip(ref, (packed, scales, biases), strict=True)):
            return False
    return True


def available() -> bool:
    return _library()[0] is not None


def why_unavailable() -> str:
    return _library()[1]


def status() -> str:
    """One line for ``edge-llm doctor``: how ``quantize`` searches here."""
    if available():
        return f"compiled ({isa()}, {threads()} threads)"
    return f"MLX ops, slower ({why_unavailable()})"


def threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=threads(), thread_name_prefix="quantize")


def supports(w: mx.array, group_size: int, bits: int, dtype: mx.Dtype) -> bool:
    return (group_size in GROUP_SIZES and (group_size * bits) % 32 == 0 and dtype in _OUT
            and w.shape[-1] % group_size == 0 and available())


def _as_numpy(w: mx.array) -> tuple[np.ndarray, int]:
    """Rows of ``w`` as a numpy view of MLX's memory where its dtype allows (float32, bfloat16 as bits), and
    the routine's input code; other dtypes are converted to float32 block by block (``_block``)."""
    if w.dtype == mx.bfloat16:
        return np.asarray(memoryview(w.view(mx.uint16))), _IN[mx.bfloat16]
    if w.dtype in (mx.float32, mx.float16):
        return np.asarray(memoryview(w)), _IN[mx.float32]
    return np.asarray(memoryview(w.astype(mx.float32))), _IN[mx.float32]


def quantize(w: mx.array, group_size: int, bits: int, dtype: mx.Dtype, grid: tuple[float, ...], starts: int,
             steps: int) -> tuple[mx.array, mx.array, mx.array]:
    """``affine.quantize`` of the rows of ``w [rows, cols]`` (see ``affine_native.c``); raises NonFinite."""
    fn = _library()[0]
    mx.eval(w)
    rows, cols = w.shape
    src, in_code = _as_numpy(w)
    src = np.ascontiguousarray(src).reshape(-1, group_size)  # one group per row
    groups = src.shape[0]
    packed = np.empty((groups, group_size * bits // 32), dtype=np.uint32)
    scales = np.empty(groups, dtype=np.float32)
    biases = np.empty(groups, dtype=np.float32)
    grid_arr = np.asarray(grid, dtype=np.float32)
    out_code = _OUT[dtype]

    def block(start: int, stop: int) -> int:
        part = src[start:stop]
        if part.dtype == np.float16:
            part = part.astype(np.float32)
        return fn(part.ctypes.data, in_code, stop - start, group_size, bits, out_code, grid_arr.ctypes.data,
                  len(grid_arr), starts, steps, packed[start:stop].ctypes.data, scales[start:stop].ctypes.data,
                  biases[start:stop].ctypes.data)

    step = max(16, BLOCK_WEIGHTS // group_size)
    spans = [(s, min(groups, s + step)) for s in range(0, groups, step)]
    if len(spans) == 1 or threads() == 1:
        flags = [block(*s) for s in spans]
    else:
        flags = list(_pool().map(lambda s: block(*s), spans))
    bad = 0
    for f in flags:
        if f < 0:
            raise ValueError(f"group size {group_size} with {bits} bits is not supported by the compiled search")
        bad |= f
    if bad & BAD_INPUT:
        raise NonFinite("holds NaN or infinite values")
    if bad & BAD_SCALE:
        raise NonFinite("scales")
    if bad & BAD_BIAS:
        raise NonFinite("offsets")
    return (mx.array(packed.reshape(rows, -1)), mx.array(scales.reshape(rows, -1)).astype(dtype),
            mx.array(biases.reshape(rows, -1)).astype(dtype))
