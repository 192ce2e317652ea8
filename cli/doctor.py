"""``edge-llm doctor``: what this machine offers edge-llm."""

from __future__ import annotations

import json
import platform
import sys

import typer

from edge_llm.kernels import status
from edge_llm.machine.backend import available_ram_bytes, blas_library, detect
from edge_llm.machine.bandwidth import machine_bandwidth
from edge_llm.machine.memory import human_bytes
from quant import affine_native

from .common import user_errors


@user_errors
def doctor(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    remeasure: bool = typer.Option(False, "--remeasure", help="Measure memory bandwidth again."),
) -> None:
    """Show the backend, device, memory, memory bandwidth, MLX version and BLAS in use."""
    b = detect()
    facts = {
        "backend": b.name,
        "device": b.device_name,
        "memory_bytes": b.memory_bytes,
        "memory_kind": b.memory_kind,
        "available_ram_bytes": available_ram_bytes(),
        "bandwidth_bytes_per_s": machine_bandwidth(refresh=remeasure),
        "mlx_version": b.mlx_version,
        "blas": blas_library(),
        "cpu_kernels": status(build_if_missing=False).detail,
        "quantize_search": affine_native.status(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
    if as_json:
        print(json.dumps(facts))
        return
    labels = {"memory_bytes": "memory", "available_ram_bytes": "available RAM", "bandwidth_bytes_per_s": "bandwidth"}
    for key, value in facts.items():
        shown = human_bytes(value) if key.endswith("_bytes") else value
        shown = f"{human_bytes(value)}/s (measured)" if key == "bandwidth_bytes_per_s" else shown
        print(f"{labels.get(key, key.replace('_', ' ')):>15}: {shown}")
