"""Compile the CPU kernels (``csrc/``) into an MLX extension for the MLX installed here.

The extension is C++ against MLX's own headers and ``libmlx`` (an MLX custom primitive, so graphs stay
lazy), bound with nanobind in MLX's nanobind domain. That ties it to the exact MLX build, so it is built
here rather than shipped: into ``$EDGE_LLM_HOME/kernels/<key>/`` where the key hashes the sources, the
MLX and nanobind versions, the Python ABI, the machine and the compiler. An MLX upgrade therefore means
a rebuild (about 20 s on 2 cores), never a stale binary. ``make chat`` / ``make test`` build it right
after installing; otherwise the first command that needs it does. Written to a temporary folder, then
renamed, so a crash or a second process never leaves half a library.

Run ``python -m edge_llm.kernels`` to build now (``--force`` to rebuild, ``--strict`` to fail when it cannot).
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from ..machine.native_build import BuildError, build_once, find_tool, run_compiler, tool_version
from ..machine.state import state_dir

SOURCES = Path(__file__).parent / "csrc"
MODULE = "_edge_kernels"
# -ffp-contract=off: every fused multiply-add is written out (csrc/rows.c), so each row sums in one order
C_FLAGS = ["-O3", "-std=gnu11", "-fPIC", "-ffp-contract=off", "-Wno-psabi", "-fvisibility=hidden"]
CXX_FLAGS = ["-O2", "-std=gnu++20", "-fPIC", "-fvisibility=hidden", "-fno-strict-aliasing", "-DNB_DOMAIN=mlx",
             "-DNB_COMPACT_ASSERTIONS", "-Wno-psabi"]
# Row kernels once per instruction set; the best one the CPU has is picked at run time (csrc/matmul.c).
ISA_VARIANTS = {"x86_64": {"avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma", "-mf16c"],
                          "avx2": ["-mavx2", "-mfma", "-mf16c"], "generic": []},
                "aarch64": {"generic": []}}


@dataclass(frozen=True)
class Toolchain:
    cc: str
    cxx: str
    mlx_dir: Path
    nanobind_dir: Path
    python_include: Path


def toolchain() -> Toolchain:
    """The compilers, MLX's headers and library, nanobind and Python's headers, or BuildError saying what lacks."""
    if platform.system() != "Linux":
        raise BuildError(f"built on Linux only ({platform.system()} runs MLX on its GPU)")
    if platform.machine() not in ISA_VARIANTS:
        raise BuildError(f"no kernels for {platform.machine()} CPUs")
    import mlx.core as mx

    mlx_dir = Path(mx.__file__).parent
    if not (mlx_dir / "include" / "mlx" / "primitives.h").exists() or not (mlx_dir / "lib" / "libmlx.so").exists():
        raise BuildError(f"MLX's headers or libmlx.so are missing under {mlx_dir} (install mlx[cpu])")
    try:
        import nanobind
    except ImportError:
        raise BuildError("nanobind is not installed (pip install nanobind)") from None
    python_include = Path(sysconfig.get_paths()["include"])
    if not (python_include / "Python.h").exists():
        raise BuildError(f"Python's headers are missing ({python_include}/Python.h: install python3-dev)")
    return Toolchain(find_tool(("cc", "gcc", "clang"), "CC"), find_tool(("c++", "g++", "clang++"), "CXX"), mlx_dir,
                     Path(nanobind.__file__).parent, python_include)


@functools.lru_cache(maxsize=4)  # `run` asks whether a build is needed, then loads: one hashing, one compiler query
def build_key(tools: Toolchain) -> str:
    """Changes whenever the built library could differ: sources, MLX, nanobind, Python ABI, machine, compilers."""
    h = hashlib.sha256()
    for path in sorted(SOURCES.iterdir()):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    for part in (metadata.version("mlx"), metadata.version("nanobind"), sysconfig.get_config_var("SOABI") or "",
                 platform.machine(), tool_version(tools.cc), tool_version(tools.cxx)):
        h.update(part.encode())
    return h.hexdigest()[:20]


def library_name() -> str:
    return MODULE + (sysconfig.get_config_var("EXT_SUFFIX") or ".so")


def cache_root() -> Path:
    return state_dir() / "kernels"


def _compile_commands(tools: Toolchain, out: Path) -> tuple[list[list[str]], list[str]]:
    nb = tools.nanobind_dir
    includes = [f"-I{SOURCES}", f"-I{tools.python_include}", f"-I{nb / 'include'}",
                f"-isystem{nb / 'ext' / 'robin_map' / 'include'}", f"-isystem{tools.mlx_dir / 'include'}"]
    jobs, objects = [], []

    def job(compiler: str, flags: list[str], source: Path, name: str) -> None:
        obj = str(out / f"{name}.o")
        objects.append(obj)
        jobs.append([compiler, *flags, *includes, "-c", str(source), "-o", obj])

    # nanobind's own sources first: the longest compile, started while the others run beside it
    job(tools.cxx, CXX_FLAGS, nb / "src" / "nb_combined.cpp", "nb_combined")
    for isa, flags in ISA_VARIANTS[platform.machine()].items():
        job(tools.cc, [*C_FLAGS, *flags, f"-DEL_ISA={isa}"], SOURCES / "rows.c", f"rows_{isa}")
    for name in ("matmul", "pool", "fused", "silu"):
        job(tools.cc, C_FLAGS, SOURCES / f"{name}.c", name)
    for name in ("primitive", "fused_ops", "attention_step", "attention_block", "mlp_block", "halves", "decode_plan",
                 "embedding", "module"):
        job(tools.cxx, CXX_FLAGS, SOURCES / f"{name}.cpp", name)
    lib_dir = tools.mlx_dir / "lib"
    link = [tools.cxx, "-shared", *objects, f"-L{lib_dir}", "-lmlx", f"-Wl,-rpath,{lib_dir}", "-lpthread",
            "-o", str(out / library_name())]
    return jobs, link


def build(force: bool = False, jobs: int | None = None) -> Path:
    """Path of the compiled extension for this MLX, building it first if needed; BuildError if it cannot be."""
    tools = toolchain()

    def make(work: Path) -> None:
        compiles, link = _compile_commands(tools, work)
        with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
            list(pool.map(run_compiler, compiles))
        run_compiler(link)

    return build_once(cache_root() / build_key(tools), library_name(), make, force)


def built_library() -> Path | None:
    """The compiled extension for this MLX if it was built already (no compiling), else None; BuildError when
    it could not be built here at all."""
    library = cache_root() / build_key(toolchain()) / library_name()
    return library if library.exists() else None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        path = build(force="--force" in args)
    except BuildError as e:
        print(f"edge-llm: CPU kernels not built: {e}; the pure-MLX path will be used", file=sys.stderr)
        return 0 if "--strict" not in args else 1
    print(f"edge-llm: CPU kernels ready: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
