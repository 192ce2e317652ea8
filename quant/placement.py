"""Where a model runs on a device, and how fast at best: resident, streamed, or not at all.

- resident: weights + KV cache + runtime fit the device's usable memory. Decoding reads the active weights
  and the KV cache once per token, so memory bandwidth / bytes read per token bounds its speed.
- streamed (a MoE): the resident part (everything but the routed experts) + KV cache + runtime + a bank of
  at least k expert slots per MoE layer fit; the bank takes all the memory left. A token's routed experts
  are looked up in the bank and the misses are read from disk, so the speed is bounded by memory bandwidth
  (the same bytes per token as resident: the bank is read like resident experts) and by disk bandwidth /
  missed expert bytes per token; the ceiling is the lower of the two (reads fully overlapped with compute).
- no: the least memory that would run it is named (resident part + k slots per layer for a MoE).

Hit rate, modelled simply: if each token's experts were drawn uniformly at random, an expert asked for is in
a bank of s of E slots with probability s/E whatever the cache policy (it cannot know the next draw). That
is a floor: real routers are skewed (some experts take far more tokens), and LRU or pinning the most used
experts hits more often; ``edge-llm bench`` measures the real rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from edge_llm.experts.reads import READ_THREADS

from .devices import Device
from .plan import Plan, PlannedTensor
from .recipes import layer_of

# share of the memory a streamed bank leaves free: the runtime's transients are estimated, and the kernel maps
# library pages more or less eagerly (the same run peaked 6% higher with freshly installed files) ...
STREAM_HEADROOM = 0.10
STREAM_HEADROOM_CAP = 256 << 20  # ... up to this much (the runtime's transients do not grow with the memory)


def headroom(usable_bytes: int) -> int:
    return min(round(usable_bytes * STREAM_HEADROOM), STREAM_HEADROOM_CAP)


@dataclass(frozen=True)
class Footprint:
    """A model at one precision and context, as placement needs it (bytes in the device's memory)."""

    resident_bytes: int  # weights kept in memory in either mode: all but the routed experts
    expert_bytes: int  # one routed expert of one MoE layer: all its projections, scales and biases
    moe_layers: int
    experts: int  # routed experts per MoE layer; 0 for a dense model
    experts_per_token: int
    kv_bytes: int  # the KV cache at the context
    overhead_bytes: int  # the runtime: process, activations, allocator caches
    bytes_per_token: int  # read from memory per decoded token: resident share, k experts per layer, KV cache
    routed_bytes: int | None = None  # every routed expert as a resident model holds them (None: experts x slots;
    # a streamed bank may hold them wider: edge_llm.experts.load.bank_dtype)

    @property
    def slot_bytes(self) -> int:
        """One bank slot in every MoE layer."""
        return self.expert_bytes * self.moe_layers

    @property
    def fixed_bytes(self) -> int:
        return self.resident_bytes + self.kv_bytes + self.overhead_bytes

    @property
    def whole_bytes(self) -> int:
        """Everything resident."""
        return self.fixed_bytes + (self.slot_bytes * self.experts if self.routed_bytes is None else self.routed_bytes)

    @property
    def stream_work_bytes(self) -> int:
        """Reading experts: the raw bytes of the reads in flight and the experts decoded from them (measured: the
        allocator keeps those buffers, about 10% of a small model's peak)."""
        if not self.experts or not self.moe_layers:
            return 0
        routed = self.slot_bytes * self.experts if self.routed_bytes is None else self.routed_bytes
        return READ_THREADS * (routed // (self.moe_layers * self.experts) + self.expert_bytes)

    @property
    def streamed_fixed_bytes(self) -> int:
        """What a streamed run holds besides its bank."""
        return self.fixed_bytes + self.stream_work_bytes

    @property
    def least_streamed_bytes(self) -> int:
        """The resident part and a bank of k slots per MoE layer: the least that streams."""
        return self.streamed_fixed_bytes + self.slot_bytes * self.experts_per_token


@dataclass(frozen=True)
class Placement:
    device: Device
    mode: str  # "resident", "streamed" or "no"
    needed_bytes: int  # resident: the whole model; streamed: resident part + bank; no: the least that runs it
    bank_slots: int  # routed experts per MoE layer held in memory (all of them when resident)
    bank_bytes: int
    hit_rate: float  # share of routed expert lookups found in memory (1 when resident; s/E when streamed)
    disk_bytes_per_token: float  # missed expert bytes read from disk per decoded token
    memory_tps: float | None  # memory bandwidth / bytes read per token; None: bandwidth unknown
    disk_tps: float | None  # disk bandwidth / missed bytes per token; None when nothing is read or unknown

    @property
    def tps(self) -> float | None:
        """The decode speed ceiling: the lower of the memory and disk bounds; None when it cannot run, or when
        a bound it depends on is unknown (a streamed speed without the disk's is no promise)."""
        if self.mode == "resident":
            return self.memory_tps
        if self.mode == "no" or self.disk_tps is None:
            return None
        return min(self.disk_tps, self.memory_tps) if self.memory_tps is not None else self.disk_tps

    def as_dict(self) -> dict[str, Any]:
        fields = {k: v for k, v in asdict(self).items() if k != "device"}
        return {"device": self.device.name, "family": self.device.family, "memory_kind": self.device.kind,
                "memory_bytes": self.device.memory_bytes, "usable_bytes": self.device.usable_bytes,
                "bandwidth_bytes_per_s": self.device.bandwidth,
                "disk_bandwidth_bytes_per_s": self.device.disk_bandwidth,
                **fields, "decode_tokens_per_s_ceiling": self.tps}


def place(model: Footprint, device: Device) -> Placement:
    """Resident when the whole model fits, streamed when the resident part and k slots per MoE layer fit
    (the bank then takes all that is left), otherwise no."""
    memory_tps = device.bandwidth / model.bytes_per_token if device.bandwidth and model.bytes_per_token else None
    if model.whole_bytes <= device.usable_bytes:
        routed = model.whole_bytes - model.fixed_bytes
        return Placement(device, "resident", model.whole_bytes, model.experts, routed, 1.0, 0.0, memory_tps, None)
    moe = model.experts > 0 and model.slot_bytes > 0
    if not moe or model.least_streamed_bytes > device.usable_bytes:
        needed = model.least_streamed_bytes if moe else model.whole_bytes
        return Placement(device, "no", needed, 0, 0, 0.0, 0.0, None, None)
    # < E: the whole did not fit; a little is left free, since the runtime's transients are estimated, not known
    room = device.usable_bytes - headroom(device.usable_bytes) - model.streamed_fixed_bytes
    slots = max(model.experts_per_token, min(model.experts - 1, room // model.slot_bytes))
    hit = slots / model.experts
    missed = model.experts_per_token * model.slot_bytes * (1 - hit)
    disk_tps = device.disk_bandwidth / missed if device.disk_bandwidth else None
    return Placement(device, "streamed", model.streamed_fixed_bytes + slots * model.slot_bytes, slots,
                     slots * model.slot_bytes, hit, missed, memory_tps, disk_tps)


def footprint_from_plan(plan: Plan, itemsize: Callable[[PlannedTensor], int], kv_bytes: int, overhead_bytes: int,
                        bytes_per_token: int, compute_itemsize: int | None = None) -> Footprint:
    """The footprint of a planned checkpoint (``quant.plan``), each tensor at ``itemsize(t)`` bytes per element
    (``quant.memory.MemoryPolicy.itemsize``): the stacked routed-expert tensors ``[E, ...]`` split per layer.
    A streamed bank holds float expert matrices in the compute dtype (``compute_itemsize``, when wider:
    ``edge_llm.experts.load.bank_dtype``), so one expert slot is counted that way."""
    per_layer: dict[int | None, int] = {}  # routed experts of a layer, as a bank holds them
    routed = 0  # all routed experts as a resident model holds them
    for t in plan.tensors:
        if t.expert:
            layer = layer_of(t.name)
            size = itemsize(t)
            routed += math.prod(t.shape) * size
            if compute_itemsize and t.kind == "float" and len(t.shape) >= 3:
                size = max(size, compute_itemsize)
            per_layer[layer] = per_layer.get(layer, 0) + math.prod(t.shape) * size
    k, e = plan.experts if plan.experts and per_layer else (0, 0)
    # every MoE layer of the supported architectures has the same experts; the largest stands for all
    expert = math.ceil(max(per_layer.values()) / e) if e else 0
    return Footprint(plan.memory_bytes(itemsize) - routed, expert, len(per_layer) if e else 0, e, k, kv_bytes,
                     overhead_bytes, bytes_per_token, routed)
