"""The exact tensors a (quantized) checkpoint holds, from its config alone: shared by quantize and estimate.

``plan_checkpoint`` builds the model's module tree (``edge_llm.loader.build_model``: random weights that
are never evaluated, so even DeepSeek-V3 costs nothing), asks the recipe about every quantizable module
and lists each output tensor with its name, shape and dtype, in the post-``sanitize`` names the loader
(and mlx-lm) expect. ``quantize`` writes exactly this list (it checks every tensor against it), and the
estimator sums it, so the estimated weight bytes are the bytes on disk.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mlx.utils import tree_flatten

from edge_llm.formats.checkpoint import Checkpoint
from edge_llm.formats.tensors import DTYPE_BYTES
from edge_llm.loader import build_model, quantize_modules
from edge_llm.models.base import CausalLM
from edge_llm.models.switch import QuantizedSwitchLinear, SwitchLinear

from .recipes import QuantSpec, Recipe, layer_of

# MLX dtype names <-> safetensors spellings
ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "uint32": "U32"}
MX_NAMES = {v: k for k, v in ST_DTYPES.items()}


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors spelling: U32 (packed codes), F16, BF16, F32
    kind: str  # "float", "packed", "scales" or "biases"
    param: str  # the float parameter it is made from (``X.weight`` for packed/scales/biases)
    spec: QuantSpec | None
    expert: bool  # stacked routed experts [E, ...]: a token reads only k of the E slices
    keep_float: bool  # the model keeps it in the file's float dtype (never cast, never quantized)
    params: int  # logical parameters it holds (0 for scales/biases)

    @property
    def group(self) -> int | None:
        return layer_of(self.name)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES[self.dtype]


@dataclass
class Plan:
    tensors: list[PlannedTensor]
    recipe: Recipe | None  # None: the checkpoint as stored (already quantized or not)
    float_dtype: str  # safetensors spelling of the float tensors
    quantization: dict[str, Any] | None  # the config block in MLX community format
    experts: tuple[int, int] | None = None  # (routed per token, experts per layer)
    tied_embeddings: bool = False
    by_name: dict[str, PlannedTensor] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.by_name = {t.name: t for t in self.tensors}

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


def _experts(config: dict[str, Any]) -> tuple[int, int] | None:
    k = config.get("num_experts_per_tok")
    e = config.get("n_routed_experts") or config.get("num_local_experts") or config.get("num_experts")
    return (int(k), int(e)) if k and e else None


def plan_quantized(model: CausalLM, config: dict[str, Any], recipe: Recipe, float_dtype: str,
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
            tensors.append(PlannedTensor(name, shape, dtype, "float", name, None, expert, keep, math.prod(shape)))
            continue
        packed, grouped = _quantized_shapes(shape, spec)
        tensors.append(PlannedTensor(name, packed, "U32", "packed", name, spec, expert, False, math.prod(shape)))
        for kind in ("scales", "biases"):
            tensors.append(PlannedTensor(f"{module}.{kind}", grouped, float_dtype, kind, name, spec, expert, False, 0))
    block = None
    if recipe.quantizes:
        block = {"group_size": recipe.group_size, "bits": recipe.bits, "mode": "affine"}
        for path, spec in sorted(specs.items()):
            if (spec.bits, spec.group_size) != (recipe.bits, recipe.group_size):
                block[path] = {"group_size": spec.group_size, "bits": spec.bits}
    tied = bool(getattr(model.args, "tie_word_embeddings", False))
    return Plan(tensors, recipe, float_dtype, block, _experts(config), tied)


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
        shape = tuple(param.shape)
        quantized = q is not None and f"{module}.scales" in stored and leaf in ("weight", "scales", "biases")
        info = stored.get(name)
        dtype = info.dtype if info is not None and info.dtype in MX_NAMES else checkpoint.dtype
        if quantized and leaf == "weight":
            owner = modules[module]
            params = math.prod(shape) * 32 // owner.bits
            tensors.append(PlannedTensor(name, shape, "U32", "packed", name, QuantSpec(owner.bits, owner.group_size),
                                         module in experts, False, params))
        elif quantized:
            tensors.append(PlannedTensor(name, shape, dtype, leaf, f"{module}.weight", None, module in experts,
                                         False, 0))
        else:
            keep = _keeps_float(model, name)
            tensors.append(PlannedTensor(name, shape, dtype if dtype in MX_NAMES else "BF16", "float", name, None,
                                         module in experts, keep, math.prod(shape)))
    tied = bool(getattr(model.args, "tie_word_embeddings", False))
    return Plan(tensors, None, checkpoint.dtype, q, _experts(checkpoint.config), tied)


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


def model_for(checkpoint: Checkpoint) -> CausalLM:
    """The module tree, never evaluated (its random weights cost nothing until evaluated)."""
    return build_model(checkpoint)
