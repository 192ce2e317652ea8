"""Will it fit? Peak memory of ``edge-llm run`` for a model, a precision and a context, before loading.

total = weights + KV cache + runtime overhead, each computed, not guessed:

- weights: from the real tensor shapes (the module tree built from config.json, checked against the
  safetensors headers), through the same recipe ``quantize`` uses (``plan.py``), so 4-bit is packed
  uint32 + scales and biases per group + the float norms and routers; in memory, in the dtypes the
  loader gives them on this backend (``memory.MemoryPolicy``).
- KV cache per architecture and runtime overhead (measured, calibrated against peak RSS): ``memory.py``.

The table has fp32, 16-bit, 8-bit and 4-bit rows plus the checkpoint as stored; MoE models report total
and active parameters and the bytes one decoded token reads, which with a measured memory bandwidth
bounds decode speed. The KV cache per token is ``2 · layers · kv_heads · head_dim · bytes`` for GQA (config
``head_dim``, not hidden / heads) and ``layers · (kv_lora_rank + qk_rope_head_dim) · bytes`` for MLA; real 4-bit
is not 4 bits (group 64: 4.5 bits per weight, group 32: 5.0, plus float norms and routers). References:
docs/ARCHITECTURE.md, llama.cpp's and ollama's memory reports (the same three parts), mlx-lm's
``compute_bits_per_weight``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from edge_llm.errors import CheckpointError
from edge_llm.formats.checkpoint import Checkpoint
from edge_llm.formats.folder import FolderCheckpoint, normalize_config
from edge_llm.generation.context import DEFAULT_CONTEXT, context_window, model_context_limit
from edge_llm.hub.resolve import read_model_headers
from edge_llm.loader import build_model
from edge_llm.machine.backend import detect

from . import reference
from .memory import RuntimeTerms, kv_cache_bytes, overhead_bytes, policy_for, runtime_terms, tokenizer_bytes
from .placement import Footprint, footprint_from_plan
from .plan import ST_DTYPES, Plan, plan_quantized, plan_stored, source_dtype_of
from .recipes import make_recipe


@dataclass(frozen=True)
class Machine:
    backend: str  # "cpu", "metal" or "cuda"
    memory_bytes: int  # what a model may take: the memory budget (available RAM, a cgroup limit, the Metal working
    # set, VRAM, or --max-memory: edge_llm.machine.memory)
    memory_kind: str
    bandwidth: float | None  # bytes/s, measured by `edge-llm doctor`, None if never measured
    budget_source: str = "RAM"  # what set memory_bytes

    @classmethod
    def this(cls, max_memory: int | None = None) -> Machine:
        from edge_llm.machine.bandwidth import remembered_bandwidth
        from edge_llm.machine.memory import process_budget

        info = detect()
        budget = process_budget(max_memory)
        return cls(info.name, budget.budget_bytes, info.memory_kind, remembered_bandwidth(), budget.source)


@dataclass(frozen=True)
class Row:
    label: str  # "fp32", "fp16", "bf16", "8-bit", "4-bit", or the stored format
    bits: int
    group_size: int | None
    file_bytes: int  # on disk
    weights_bytes: int  # resident at run time
    kv_cache_bytes: int
    overhead_bytes: int
    bytes_per_token: int  # weights (+ KV) read per decoded token
    fits: bool
    decode_tps_ceiling: float | None
    stored: bool = False  # the checkpoint as it is
    requested: bool = False
    runtime: RuntimeTerms | None = None  # what overhead_bytes was computed from
    footprint: Footprint | None = None  # the same figures split for placement (resident part, experts); exact rows

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.overhead_bytes


@dataclass
class Estimate:
    model: str
    model_type: str
    params_total: int
    params_active: int
    context: int
    batch: int
    kv_bits: int | None
    machine: Machine
    rows: list[Row]
    exact: bool = True  # False for --params rough answers
    shape_of: str | None = None  # rough mode: the reference config used
    assumed_shape: dict[str, Any] | None = None  # rough mode: its numbers (reference.describe_shape)
    notes: list[str] = field(default_factory=list)
    folder: Path | None = None  # the local folder or file of the weights (None: read from the Hub, or rough)

    @property
    def requested(self) -> Row:
        return next(r for r in self.rows if r.requested)

    def as_dict(self) -> dict[str, Any]:
        r = self.requested
        return {
            "model": self.model, "model_type": self.model_type, "exact": self.exact, "shape_of": self.shape_of,
            "assumed_shape": self.assumed_shape,
            "params_total": self.params_total, "params_active": self.params_active,
            "bits": r.bits, "group_size": r.group_size, "precision": r.label,
            "context": self.context, "batch": self.batch, "kv_bits": self.kv_bits,
            "file_bytes": r.file_bytes, "weights_bytes": r.weights_bytes, "kv_cache_bytes": r.kv_cache_bytes,
            "overhead_bytes": r.overhead_bytes, "total_bytes": r.total_bytes, "fits": r.fits,
            "bytes_per_token": r.bytes_per_token, "decode_tokens_per_s_ceiling": r.decode_tps_ceiling,
            "backend": self.machine.backend, "memory_bytes": self.machine.memory_bytes,
            "memory_kind": self.machine.memory_kind, "bandwidth_bytes_per_s": self.machine.bandwidth,
            "rows": [dict({k: v for k, v in asdict(row).items() if k not in ("runtime", "footprint")},
                          total_bytes=row.total_bytes) for row in self.rows],
            "notes": self.notes,
        }


def stored_dtype(checkpoint: Checkpoint) -> str:
    """The checkpoint's main dtype; for one known by its config alone, the dtype the config declares."""
    if checkpoint.tensors:
        return checkpoint.dtype
    return ST_DTYPES.get(checkpoint.config.get("torch_dtype") or checkpoint.config.get("dtype"), "BF16")


def _label(bits: int, float_dtype: str) -> str:
    if bits >= 16:
        return {"F32": "fp32", "F16": "fp16", "BF16": "bf16"}.get(float_dtype, float_dtype.lower())
    return f"{bits}-bit"


@dataclass(frozen=True)
class _Context:
    model: Any  # the float module tree, built once: plan_quantized and the cache shapes only read it
    context: int
    batch: int
    kv_bits: int | None
    machine: Machine
    tokenizer: int
    scale: float  # rough mode: weights scaled from a reference shape

    def row(self, plan: Plan, label: str, bits: int, group_size: int | None, file_bytes: int,
            stored: bool = False) -> Row:
        policy = policy_for(self.machine.backend, plan)
        weights = round(plan.memory_bytes(policy.itemsize) * self.scale)
        kv = kv_cache_bytes(self.model, self.context, self.batch, policy.compute, self.kv_bits)
        terms = runtime_terms(self.model, plan, policy, self.context, self.batch, kv, self.tokenizer,
                              self.machine.backend == "cpu")
        over = overhead_bytes(terms)
        # a decode step reads the active weights and the KV cache of the tokens so far
        kv_read = kv_cache_bytes(self.model, self.context, self.batch, policy.compute, self.kv_bits, round_up=False)
        per_token = round(plan.bytes_per_token(policy.itemsize) * self.scale) + kv_read
        total = weights + kv + over
        tps = self.machine.bandwidth / per_token if self.machine.bandwidth and per_token else None
        footprint = (footprint_from_plan(plan, policy.itemsize, kv, over, per_token, policy.compute)
                     if self.scale == 1 else None)
        return Row(label, bits, group_size, round(file_bytes * self.scale), weights, kv, over, per_token,
                   total <= self.machine.memory_bytes, tps, stored=stored, runtime=terms, footprint=footprint)


def estimate_checkpoint(checkpoint: Checkpoint, bits: int | None = None, group_size: int = 64, context: int = 4096,
                        batch: int = 1, kv_bits: int | None = None, machine: Machine | None = None,
                        name: str | None = None, scale: float = 1.0, folder: Path | None = None) -> Estimate:
    """Rows for fp32, 16-bit, 8-bit and 4-bit (and ``bits`` if another), plus the checkpoint as stored.

    The requested row is ``bits`` (the stored format when it matches, or when ``bits`` is None).
    Reads config and headers only.
    """
    if context < 1 or batch < 1:
        raise ValueError("--context and --batch must be at least 1")
    if kv_bits not in (None, 4, 8, 16):
        raise ValueError(f"--kv-bits must be 16, 8 or 4, got {kv_bits}")
    model = build_model(checkpoint)
    ctx = _Context(model, context, batch, kv_bits, machine or Machine.this(), tokenizer_bytes(folder), scale)
    source_dtype = source_dtype_of(checkpoint)
    half = "BF16" if stored_dtype(checkpoint) in ("BF16", "F8_E4M3") else "F16"
    variants = [32, 16, 8, 4] + ([bits] if bits is not None and bits not in (32, 16, 8, 4) else [])
    rows: list[Row] = []
    for b in variants:
        float_dtype = "F32" if b == 32 else half
        plan = plan_quantized(model, make_recipe(b, group_size), float_dtype, source_dtype)
        rows.append(ctx.row(plan, _label(b, float_dtype), b, group_size if b < 16 else None, plan.nbytes))
    q = checkpoint.quantization
    stored_plan = plan_stored(build_model(checkpoint), checkpoint)  # quantizes its own tree as stored
    if checkpoint.tensors:  # a real checkpoint: add it as stored, replacing the variant it equals
        stored_bits = int(q["bits"]) if q else (32 if checkpoint.dtype == "F32" else 16)
        stored_gs = int(q["group_size"]) if q else None
        stored = ctx.row(stored_plan, f"{_label(stored_bits, checkpoint.dtype)} (stored)", stored_bits, stored_gs,
                         checkpoint.nbytes, stored=True)
        rows = [r for r in rows if (r.bits, r.group_size) != (stored_bits, stored_gs)] + [stored]
    if bits is None:
        chosen = next((r for r in rows if r.stored), next(r for r in rows if r.bits == 16))
    else:
        matching = [r for r in rows if r.bits == bits]
        chosen = next((r for r in matching if r.group_size in (None, group_size)), matching[0])
    rows = sorted((replace(r, requested=r is chosen) for r in rows), key=lambda r: -r.bits)
    notes = []
    if kv_bits is not None:
        keeps = (f"the KV cache `edge-llm run --kv-bits {kv_bits}` keeps" if kv_bits < 16 else
                 "what such a KV cache would take; edge-llm run keeps it in the compute dtype or quantized (8|4)")
        notes.append(f"--kv-bits {kv_bits}: {keeps}")
    if ctx.machine.backend != "cpu":
        notes.append(f"runtime overhead calibrated on the CPU backend; on {ctx.machine.backend} it is an estimate")
    return Estimate(
        model=name or str(checkpoint.path), model_type=checkpoint.model_type,
        params_total=round(stored_plan.params_total * scale), params_active=round(stored_plan.params_active * scale),
        context=context, batch=batch, kv_bits=kv_bits, machine=ctx.machine, rows=rows, notes=notes, folder=folder,
    )


def estimate(model: str | None = None, bits: int | None = None, group_size: int = 64, context: int | None = None,
             batch: int = 1, kv_bits: int | None = None, params: str | None = None, arch: str | None = None,
             machine: Machine | None = None, revision: str | None = None, max_memory: int | None = None) -> Estimate:
    """Estimates a local folder, a Hub repo id (config + safetensors headers only), or ``params`` + ``arch``,
    against ``machine`` (default: this one, within ``max_memory`` when given)."""
    machine = machine or Machine.this(max_memory)
    if params is not None:
        return estimate_rough(reference.parse_params(params), arch or "llama", bits, group_size,
                              context or DEFAULT_CONTEXT, batch,
                              kv_bits, machine)
    if model is None:
        raise ValueError("give a MODEL (folder or Hub repo id), or --params with --arch for a rough estimate")
    found = read_model_headers(model, revision)
    if context is None:  # what `edge-llm run` keeps by default: the model's limit, at most DEFAULT_CONTEXT
        context = context_window(model_context_limit(found.checkpoint.config))
    return estimate_checkpoint(found.named, bits, group_size, context, batch, kv_bits, machine, name=model,
                               folder=found.folder)


def estimate_rough(params: int, arch: str, bits: int | None, group_size: int, context: int, batch: int,
                   kv_bits: int | None, machine: Machine | None) -> Estimate:
    """``--params 7B --arch llama``: the nearest public shape of that family, scaled to ``params``."""
    family = reference.family_of(arch)
    shapes = reference.candidates(family)
    sizes = {}
    for name, config in shapes.items():
        checkpoint = config_only(config, name)
        plan = plan_quantized(build_model(checkpoint), make_recipe(32), "F32",
                              source_dtype_of(checkpoint))
        sizes[name] = plan.params_total
    ref = reference.nearest(sizes, params)
    result = estimate_checkpoint(config_only(shapes[ref], ref), bits if bits is not None else 16, group_size,
                                 context, batch, kv_bits, machine, name=f"{params / 1e9:.3g}B {family}",
                                 scale=params / sizes[ref])
    shape = reference.describe_shape(shapes[ref])
    result.exact, result.shape_of = False, ref
    result.assumed_shape = dict(name=ref, family=family, params=sizes[ref], **shape)
    result.notes.append(f"rough: assumed the shape of {ref} ({reference.shape_words(shape)}; "
                        f"{sizes[ref] / 1e9:.3g}B parameters), weights scaled to {params / 1e9:.3g}B; KV cache and "
                        "runtime as for that shape")
    if family in reference.STAND_INS:
        result.notes.append(reference.STAND_INS[family])
    return result


def config_only(config: dict[str, Any], name: str) -> Checkpoint:
    """A checkpoint known by its config alone (no tensor headers)."""
    config = normalize_config(config)
    if config.get("model_type") is None:
        raise CheckpointError(f"{name}: config has no model_type")
    return FolderCheckpoint(Path(name), config, {})
