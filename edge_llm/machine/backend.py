"""This machine as MLX sees it: backend, device, memory, and the compute dtype policy."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

import mlx.core as mx

from . import blas

# safetensors dtype spelling -> MLX dtype
MX_DTYPES = {"F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16}
DTYPE_NAMES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


@dataclass(frozen=True)
class BackendInfo:
    name: str  # "metal", "cuda" or "cpu"
    device_name: str
    memory_bytes: int  # what models may use: GPU working set, VRAM, or system RAM
    memory_kind: str  # "unified", "vram" or "ram"
    mlx_version: str


def backend_name() -> str:
    if mx.metal.is_available():
        return "metal"
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        return "cuda"
    return "cpu"


def system_ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def available_ram_bytes() -> int:
    """MemAvailable on Linux; total RAM elsewhere (macOS has no cheap equivalent)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return system_ram_bytes()


def detect() -> BackendInfo:
    name = backend_name()
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    device = str(info.get("device_name") or platform.processor() or platform.machine())
    if name == "metal":
        memory = int(info.get("max_recommended_working_set_size") or info.get("memory_size") or 0)
        kind = "unified"
    elif name == "cuda":
        memory, kind = int(info.get("total_memory") or info.get("memory_size") or 0), "vram"
    else:
        memory, kind = system_ram_bytes(), "ram"
    return BackendInfo(name, device, memory, kind, mx.__version__)


def compute_dtype(checkpoint_dtype: str, requested: str | None = None) -> mx.Dtype:
    """float32 on the CPU (MLX's CPU half precision is 8-30x slower); the checkpoint's dtype on a GPU."""
    if requested:
        return DTYPE_NAMES[requested]
    if backend_name() == "cpu":
        return mx.float32
    return MX_DTYPES.get(checkpoint_dtype, mx.bfloat16)


@dataclass(frozen=True)
class DtypePolicy:
    """Where a checkpoint's floating tensors live in memory, and the dtype the model computes in.

    ``compute`` is the activations' dtype (and so the KV cache's). ``weights`` is the dtype of the
    matrices and of quantization scales/offsets; None keeps each tensor as the checkpoint stores it.
    On the CPU that is the default: bf16/fp16 weights stay half precision (half the memory of float32)
    and every matmul upcasts them to float32 as it runs (MLX type promotion), which gives exactly the
    float32 result, the upcast being exact. Held in ``compute`` whatever ``weights`` says: vectors (norms,
    biases), the token embedding's quantization scales/offsets (its lookup output *is* the activations;
    half-precision scales would round it), and a tied embedding table, which is the output projection too,
    read in full every token, where upcasting it block by block costs 10-20% of decode speed (measured on
    SmolLM2-135M: benchmarks/RESULTS.md).
    """

    compute: mx.Dtype
    weights: mx.Dtype | None

    def stored_dtype(self, name: str, dtype: mx.Dtype, ndim: int, tied_embeddings: bool = False) -> mx.Dtype:
        """The in-memory dtype of the floating parameter ``name`` (module path) stored as ``dtype``."""
        if ndim <= 1 or name.endswith(("embed_tokens.scales", "embed_tokens.biases")):
            return self.compute
        if tied_embeddings and name.endswith("embed_tokens.weight"):
            return self.compute
        return self.weights or dtype


@dataclass(frozen=True)
class Caster:
    """Floats to the dtype ``policy`` stores them in, except parameters whose path contains one of ``keep``
    (a model's ``keep_float32``, e.g. MoE routers that must stay float32). Casts stay lazy, so each tensor
    is converted as it is loaded and its source copy is freed right after."""

    policy: DtypePolicy
    keep: tuple[str, ...] = ()
    tied: bool = False

    def __call__(self, name: str, value: mx.array, ndim: int | None = None) -> mx.array:
        """``value`` as parameter ``name`` is held; ``ndim`` is the parameter's own when ``value`` is a row of it
        (one streamed expert of a stacked parameter)."""
        if not mx.issubdtype(value.dtype, mx.floating) or any(s in name for s in self.keep):
            return value
        dtype = self.policy.stored_dtype(name, value.dtype, value.ndim if ndim is None else ndim, self.tied)
        return value if value.dtype == dtype else value.astype(dtype)

    def all(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        return {k: self(k, v) for k, v in weights.items()}


def dtype_policy(checkpoint_dtype: str, requested: str | None = None) -> DtypePolicy:
    """``--dtype`` puts everything in that dtype; otherwise float32 compute over the stored weights on
    the CPU, and the checkpoint's dtype for everything on a GPU."""
    if requested:
        d = DTYPE_NAMES[requested]
        return DtypePolicy(d, d)
    d = compute_dtype(checkpoint_dtype)
    return DtypePolicy(d, None if backend_name() == "cpu" else d)


def peak_memory_bytes() -> int:
    return int(mx.get_peak_memory())


def reset_peak_memory() -> None:
    mx.reset_peak_memory()


def blas_library() -> str:
    """The BLAS that MLX's CPU matmuls resolve to in this process."""
    if platform.system() == "Darwin":
        return "Accelerate"
    if blas.loaded:
        return f"OpenBLAS ({blas.loaded})"
    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1] for line in f if "blas" in line.lower()}
    except OSError:
        return "unknown"
    names = sorted(os.path.basename(p) for p in libs if p.startswith("/"))
    if os.environ.get(blas.ENV) == "0":
        hint = f" (OpenBLAS disabled by {blas.ENV}=0)"
    else:
        hint = " (reference BLAS: install libopenblas0-pthread for much faster CPU matmuls)"
    return (", ".join(names) if names else "BLAS bundled with mlx") + hint
