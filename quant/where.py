"""Which machines run a model, and how fast at best: ``edge-llm estimate MODEL --devices``.

One estimate per kind of backend gives the model's footprint (``placement.Footprint``): a GPU (Metal, CUDA)
holds every float in the checkpoint's dtype, the CPU computes and caches in float32 over stored weights.
Each device of ``devices.DEVICES`` (Apple M-series, NVIDIA GPUs, PCs) and this machine, as measured, then
gets a verdict from ``placement.place``: resident, streamed (a MoE's experts read from disk) or no.
"""

from __future__ import annotations

from pathlib import Path

from edge_llm.formats.checkpoint import Checkpoint

from .devices import select_devices
from .estimate import Estimate, Machine, estimate_checkpoint
from .fit import place_here
from .placement import Placement, place


def device_placements(checkpoint: Checkpoint, est: Estimate, names: str | None = None,
                      folder: Path | None = None) -> list[Placement]:
    """``est``'s requested precision and context on every device ``names`` selects (all when None), then on this
    machine (``est.machine``)."""
    row = est.requested
    footprints = {}
    for backend, kind in (("metal", "unified"), ("cpu", "ram")):
        other = estimate_checkpoint(checkpoint, row.bits, row.group_size or 64, est.context, est.batch, est.kv_bits,
                                    Machine(backend, 0, kind, None), name=est.model, folder=folder)
        footprints[kind] = next(r for r in other.rows if (r.bits, r.group_size) == (row.bits, row.group_size)).footprint
    out = []
    for device in select_devices(names):
        footprint = footprints["ram" if device.family == "pc" else "unified"]
        out.append(place(footprint, device))
    here = place_here(est, folder)
    return out + ([here] if here is not None else [])
