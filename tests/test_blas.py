"""OpenBLAS preloading: used when present, off with EDGE_LLM_OPENBLAS=0, harmless when missing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from edge_llm.machine.blas import find_openblas

PROBE = (
    "import edge_llm, numpy as np, mlx.core as mx\n"
    "from edge_llm.machine.backend import blas_library\n"
    "a = np.random.default_rng(0).standard_normal((300, 200)).astype(np.float32)\n"
    "b = np.random.default_rng(1).standard_normal((200, 100)).astype(np.float32)\n"
    "assert np.allclose(np.array(mx.array(a) @ mx.array(b)), a @ b, atol=1e-3)\n"
    "print(blas_library())\n"
)


def probe(**env: str) -> str:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120,
                            env={**os.environ, **env})
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.skipif(find_openblas() is None, reason="no system OpenBLAS (make test installs libopenblas0-pthread)")
def test_openblas_used_when_present():
    assert probe().startswith("OpenBLAS")


def test_disabled_by_environment():
    out = probe(EDGE_LLM_OPENBLAS="0")
    assert "OpenBLAS (" not in out and "disabled" in out


def test_missing_library_does_not_crash():
    assert "OpenBLAS (" not in probe(EDGE_LLM_OPENBLAS="/nonexistent/libopenblas.so.0")


# Records, when mlx.core is first imported, whether an OpenBLAS is already mapped into the process.
ORDER_PROBE = (
    "import sys\n"
    "seen = []\n"
    "class Watch:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name == 'mlx.core' and not seen:\n"
    "            seen.append('openblas' in open('/proc/self/maps').read().lower())\n"
    "sys.meta_path.insert(0, Watch())\n"
    "import {module}\n"
    "print(seen)\n"
)


@pytest.mark.skipif(find_openblas() is None or not os.path.exists("/proc/self/maps"),
                    reason="no system OpenBLAS, or no /proc to see the libraries a process has loaded")
@pytest.mark.parametrize("module", ["quant.affine", "benchmarks.variants", "edge_llm.models.llama"])
def test_openblas_precedes_mlx_whichever_module_comes_first(module):
    """``quant.affine`` and ``benchmarks.variants`` import mlx.core before anything of edge_llm: their
    package imports edge_llm (and so its preload) first."""
    result = subprocess.run([sys.executable, "-c", ORDER_PROBE.format(module=module)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[True]"
