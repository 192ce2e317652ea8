"""The exact tensors a (quantized) checkpoint holds, from its config alone: shared by quantize and estimate.

``plan_quantized`` walks the model's module tree (``edge_llm.loader.build_model``: random weights that
are never evaluated, so even DeepSeek-V3 costs nothing), asks the recipe about every quantizable module
and lists each output tensor with its name, shape and dtype, in the post-``sanitize`` names the loader
(and mlx-lm) expect. ``quantize`` writes exactly this list (it checks every tensor against it), and the
estimator sums it, so the estimated weight bytes are the bytes on disk; ``plan_stored`` lists what an
existing checkpoint loads into.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mlx.utils import tree_flatten

from edge_llm.formats.checkpoint import Checkpoint
from edge_llm.formats.tensors import DTYPE_BYTES
from edge_llm.loader import quantize_modules
from edge_llm.models.base import CausalLM
from edge_llm.models.switch import QuantizedSwitchLinear, SwitchLinear

from .recipes import QuantSpec, Recipe

# MLX dtype names <-> safetensors spellings
ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "uint32": "U32"}
MX_NAMES = {v: k for k, v in ST_DTYPES.items()}


@dataclass(frozen=True, kw_only=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors spelling: U32 (packed codes), F16, BF16, F32
    kind: str  # "float", "packed", "scales" or "biases"
    param: str  # the float parameter it is made from (``X.weight`` for packed/scales/biases)
    spec: QuantSpec | None = None
    expert: bool = False  # stacked routed experts [E, ...]: a token reads only k of the E slices
    keep_float: bool = False  # the model keeps it in the file's float dtype (never cast, never quantized)
    params: int = 0  # logical parameters it holds (0 for scales/biases)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES[self.dtype]


@dataclass(frozen=True, kw_only=True)
class Plan:
    tensors: list[PlannedTensor]
    float_dtype: str  # safetensors spelling of the float tensors
    quantization: dict[str, Any] | None  # the config block in MLX community format
    experts: tuple[int, int] | None = None  # (routed per token, experts per layer)
    tied_embeddings: bool = False
    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def params_total(self) -> int:
        return sum(t.params for t in self.tensors)

    def _active_fraction(self, t: PlannedTensor) -> float:
        return self.experts[0] / self.experts[1] if t.expert and self.experts else 1.0

    @property
    def params_active(self) -> int:
        return round(sum(t.params * self._active_fraction(t) for t in self.tensors))

    def memory_bytes(self, itemsize: Callable[[PlannedTensor], int]) -> int:
        """Bytes the loaded model holds, ``itemsize(t)`` giving each tensor's in-memory element size."""
        return sum(math.prod(t.shape) * itemsize(t) for t in self.tensors)

    def bytes_per_token(self, itemsize: Callable[[PlannedTensor], int]) -> int:
        """Weight bytes one decode step reads: k of E experts, one embedding row (unless tied)."""
        total = 0.0
        for t in self.tensors:
            size = math.prod(t.shape) * itemsize(t)
            if "embed_tokens" in t.name and not self.tied_embeddings:
                size /= t.shape[0]  # a lookup reads one row
            total += size * self._active_fraction(t)
        return round(total)


def _quantized_shapes(shape: tuple[int, ...], spec: QuantSpec) -> tuple[tuple[int, ...], tuple[int, ...]]:
    *lead, cols = shape
    return (*lead, cols * spec.bits // 32), (*lead, cols // spec.group_size)


def _keeps_float(model: CausalLM, name: str) -> bool:
    return any(s in name for s in getattr(model, "keep_float32", ()))


def _quantizable(module: Any) -> bool:
    return hasattr(module, "to_quantized") and "weight" in module


def quantizable_paths(model: CausalLM) -> list[str]:
    """The module paths a recipe can give bits to (linear layers, embeddings, stacked experts)."""
    return [path for path, module in model.named_modules() if _quantizable(module)]


def _experts(model: CausalLM) -> tuple[int, int] | None:
    experts = model.experts
    return (experts.active, experts.routed) if experts else None


def _float_tensor(name: str, shape: tuple[int, ...], dtype: str, expert: bool, keep_float: bool) -> PlannedTensor:
    return PlannedTensor(name=name, shape=shape, dtype=dtype, kind="float", param=name, expert=expert,
                         keep_float=keep_float, params=math.prod(shape))


def _quantized_tensors(weight: str, shape: tuple[int, ...], spec: QuantSpec, scales_dtype: str,
                       expert: bool) -> list[PlannedTensor]:
    """What ``spec`` makes of the float parameter ``weight``: packed codes, then scales and biases."""
    module = weight.rpartition(".")[0]
    packed, grouped = _quantized_shapes(shape, spec)
    return [PlannedTensor(name=weight, shape=packed, dtype="U32", kind="packed", param=weight, spec=spec,
                          expert=expert, params=math.prod(shape)),
            *(PlannedTensor(name=f"{module}.{kind}", shape=grouped, dtype=scales_dtype, kind=kind, param=weight,
                            spec=spec, expert=expert) for kind in ("scales", "biases"))]


def plan_quantized(model: CausalLM, recipe: Recipe, float_dtype: str,
                   source_dtype: Callable[[str], str]) -> Plan:
    """What ``recipe`` makes of the (unquantized) module tree ``model``; ``source_dtype(name)`` is the
    stored dtype of a parameter (parameters the model keeps in float keep it)."""
    num_layers = len(model.layers)
    specs: dict[str, QuantSpec] = {}
    experts: set[str] = set()
    for path, module in model.named_modules():
        if isinstance(module, SwitchLinear):
            experts.add(path)
        if _quantizable(module):
            spec = recipe.spec_for(path, module.weight.shape[-1], num_layers, _keeps_float(model, f"{path}.weight"))
            if spec is not None:
                specs[path] = spec
    tensors: list[PlannedTensor] = []
    for name, param in tree_flatten(model.parameters()):
        module, _, leaf = name.rpartition(".")
        shape = tuple(param.shape)
        keep = _keeps_float(model, name)
        # a parameter the model keeps in float keeps its stored precision (never less than the output's)
        dtype = max(source_dtype(name), float_dtype, key=DTYPE_BYTES.__getitem__) if keep else float_dtype
        expert = module in experts
        spec = specs.get(module) if leaf == "weight" else None
        if spec is None:
            tensors.append(_float_tensor(name, shape, dtype, expert, keep))
        else:
            tensors += _quantized_tensors(name, shape, spec, float_dtype, expert)
    block = None
    if recipe.quantizes:
        block = {"group_size": recipe.group_size, "bits": recipe.bits, "mode": "affine"}
        for path, spec in sorted(specs.items()):
            if (spec.bits, spec.group_size) != (recipe.bits, recipe.group_size):
                block[path] = {"group_size": spec.group_size, "bits": spec.bits}
    return Plan(tensors=tensors, float_dtype=float_dtype, quantization=block, experts=_experts(model),
                tied_embeddings=model.tied_embeddings)


def plan_stored(model: CausalLM, checkpoint: Checkpoint) -> Plan:
    """The tensors an already quantized (or plain float) checkpoint loads into, as stored."""
    q = checkpoint.quantization
    if q:
        quantize_modules(model, q, lambda p: f"{p}.scales" in checkpoint.tensors)
    stored = checkpoint.tensors
    modules = dict(model.named_modules())
    experts = {p for p, m in modules.items() if isinstance(m, (SwitchLinear, QuantizedSwitchLinear))}
    tensors = []
    for name, param in tree_flatten(model.parameters()):
        module, _, leaf = name.rpartition(".")
        shape, expert = tuple(param.shape), module in experts
        quantized = q is not None and f"{module}.scales" in stored
        info = stored.get(name)
        dtype = info.dtype if info is not None and info.dtype in MX_NAMES else checkpoint.dtype
        if quantized and leaf == "weight":
            owner = modules[module]
            tensors.append(PlannedTensor(name=name, shape=shape, dtype="U32", kind="packed", param=name,
                                         spec=QuantSpec(owner.bits, owner.group_size), expert=expert,
                                         params=math.prod(shape) * 32 // owner.bits))
        elif quantized and leaf in ("scales", "biases"):
            tensors.append(PlannedTensor(name=name, shape=shape, dtype=dtype, kind=leaf, param=f"{module}.weight",
                                         expert=expert))
        else:
            tensors.append(_float_tensor(name, shape, dtype if dtype in MX_NAMES else "BF16", expert,
                                         _keeps_float(model, name)))
    return Plan(tensors=tensors, float_dtype=checkpoint.dtype, quantization=q, experts=_experts(model),
                tied_embeddings=model.tied_embeddings)


def source_dtype_of(checkpoint: Checkpoint) -> Callable[[str], str]:
    """Stored dtype of a (post-sanitize) parameter; the checkpoint's main dtype when names differ."""
    main = checkpoint.dtype if checkpoint.dtype in MX_NAMES else "BF16"
    if not checkpoint.tensors:  # known by its config alone
        declared = checkpoint.config.get("torch_dtype") or checkpoint.config.get("dtype")
        main = ST_DTYPES.get(declared, "BF16")

    def lookup(name: str) -> str:
        info = checkpoint.tensors.get(name)
        return info.dtype if info is not None and info.dtype in ("F32", "F16", "BF16") else main

    return lookup

