"""The CPU kernels' products on arm64 (the portable vector code, NEON there), on this x86 machine: the kernels' C
sources built with an arm64 cross compiler into a small harness (tests/native/matmul_harness.c), run under
qemu, and its results compared with MLX's, computed here. No ARM machine is needed; `make test` installs the
cross compiler and qemu where apt allows (Makefile target ``cross``)."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
CSRC = REPO_ROOT / "edge_llm" / "kernels" / "csrc"
CC, QEMU = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
DTYPES = {mx.float32: 0, mx.float16: 1, mx.bfloat16: 2}
RTOL = 1e-5  # relative to the largest |reference|: summation order only

pytestmark = pytest.mark.skipif(not (CC and QEMU), reason="needs aarch64-linux-gnu-gcc and qemu-aarch64 "
                                "(apt-get install gcc-aarch64-linux-gnu qemu-user; `make test` does)")


def as_bytes(a: mx.array) -> bytes:
    if a.dtype in (mx.float16, mx.bfloat16):
        a = a.view(mx.uint16)
    return np.array(a).tobytes()


def case(bits: int, group: int, dtype: mx.Dtype, n: int, k: int, rows: int, experts: list[int] | None,
         seed: int) -> tuple[bytes, mx.array]:
    """One case for the harness, and MLX's result for it."""
    key = mx.random.key(seed)
    e = 1 + max(experts or [0])
    w = mx.random.normal((e, n, k), key=key) if experts else mx.random.normal((n, k), key=key)
    x = mx.random.normal((rows, k), key=mx.random.key(seed + 1))
    if bits:
        q, s, b = mx.quantize(w, group_size=group, bits=bits)
        s, b = s.astype(dtype), b.astype(dtype)
        dense = mx.dequantize(q, s.astype(mx.float32), b.astype(mx.float32), group_size=group, bits=bits)
        body = as_bytes(q) + as_bytes(s) + as_bytes(b)
    else:
        w = w.astype(dtype)
        dense, body = w.astype(mx.float32), as_bytes(w)
    per = rows // len(experts) if experts else rows
    if experts:
        want = mx.concatenate([x[i * per : (i + 1) * per] @ dense[ex].T for i, ex in enumerate(experts)])
    else:
        want = x @ dense.T
    header = struct.pack("<10q", bits, group, DTYPES[dtype] if bits else 0, 0 if bits else DTYPES[dtype], n, k, e,
                         rows, len(experts or []), per)
    ids = np.array(experts or [], dtype=np.uint32).tobytes()
    return header + body + np.array(x).tobytes() + ids, want


def cases() -> list[tuple[str, bytes, mx.array]]:
    out, seed = [], 0
    for bits in (2, 3, 4, 5, 6, 8):
        for group in (32, 64, 128):
            for dtype in DTYPES:
                seed += 2
                rows = (1, 5)[seed % 2]
                out.append((f"{bits}-bit g{group} {dtype} {rows} rows", *case(bits, group, dtype, 13, 256, rows, None,
                                                                               seed)))
    for bits in (4, 8):
        out.append((f"gathered {bits}-bit", *case(bits, 64, mx.bfloat16, 11, 128, 6, [2, 2, 0], 100 + bits)))
    for dtype in DTYPES:
        out.append((f"float {dtype}", *case(0, 0, dtype, 7, 100, 5, None, 200)))
    out.append(("gathered float", *case(0, 0, mx.bfloat16, 9, 64, 4, [1, 0, 1, 1], 300)))
    return out


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Path:
    exe = tmp_path_factory.mktemp("arm64") / "matmul_harness"
    sources = [REPO_ROOT / "tests" / "native" / "matmul_harness.c", CSRC / "rows.c", CSRC / "matmul.c", CSRC / "pool.c"]
    subprocess.run([CC, "-O2", "-std=gnu11", "-ffp-contract=off", "-static", "-DEL_ISA=generic", f"-I{CSRC}",
                    *map(str, sources), "-lpthread", "-lm", "-o", str(exe)], check=True, capture_output=True)
    return exe


def test_arm64_products_equal_mlxs_and_do_not_depend_on_threads(harness, tmp_path):
    all_cases = cases()
    (tmp_path / "in.bin").write_bytes(b"".join(body for _, body, _ in all_cases))
    done = subprocess.run([QEMU, str(harness), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "neon"
    results = np.fromfile(tmp_path / "out.bin", dtype=np.float32)
    at = 0
    for name, _, want in all_cases:
        want = np.array(want)
        one, two = (results[at + i * want.size : at + (i + 1) * want.size].reshape(want.shape) for i in range(2))
        at += 2 * want.size
        assert np.array_equal(one, two), f"{name}: 1 thread vs 2"
        error = np.abs(one - want).max() / max(np.abs(want).max(), 1e-6)
        assert error <= RTOL, f"{name}: differs from MLX's by {error:.2g} (relative)"
    assert at == results.size
