"""What ``edge-llm run`` holds in memory besides the weights' bytes: dtype policy, KV cache, runtime.

- In-memory dtypes follow the runtime's policy (``edge_llm.backend.DtypePolicy``): on a GPU every float
  tensor in the checkpoint's dtype; on the CPU activations and the KV cache in float32 (MLX's
  half-precision CPU kernels are slow) over half-precision weights, see ``MemoryPolicy``.
- KV cache: what ``edge_llm.cache`` allocates for ``context`` tokens (buffers grow in steps of 256):
  ``2 · layers · kv_heads · head_dim`` values per token for GQA (the config's head_dim), and
  ``layers · (kv_lora_rank + qk_rope_head_dim)`` for DeepSeek's MLA latent.
- runtime: the process itself (interpreter, libraries, tokenizer), the activations of the largest
  prefill chunk, the transient copy of a tensor cast while loading, and freed buffers the C allocator
  keeps. The constants are measured: ``benchmarks/estimate_calibration.py`` fits them to the peak RSS
  of real ``edge-llm run`` processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from edge_llm.backend import MX_DTYPES, DtypePolicy
from edge_llm.cache import STEP, LatentCache
from edge_llm.checkpoint import DTYPE_BYTES
from edge_llm.generate import PREFILL_CHUNK

from .plan import Plan, PlannedTensor

MB = 1 << 20
# Calibrated on this project's CPU runs: benchmarks/estimate_calibration.py fits these against the peak RSS
# (wait4) and MLX's own peak allocation of `edge-llm run` for SmolLM2 4-bit/bf16 and two 0.4B MoE shapes
# (RESULTS.md, "Memory estimate vs measured peak RSS").
# Resident memory MLX does not allocate: interpreter, MLX/BLAS/tokenizers libraries, typer/rich/jinja2.
PROCESS_BASE_BYTES = 77 * 10**6
# The tokenizer's Rust and Python structures: resident bytes per byte of tokenizer.json / tokenizer.model.
TOKENIZER_FACTOR = 5.0
# Live activations of a prefill chunk, in values of the compute dtype: per attention score of the largest
# chunk x keys product, per (chunk token x intermediate width), per (key x expanded MLA head width).
ACT_SCORES, ACT_INTERMEDIATE, ACT_MLA = 0.78, 7.24, 2.93
# Dequantized weights alive at once when quantized linears prefill through BLAS on the CPU.
ACT_DEQUANT = 1.0
# Heap kept per byte of the float scale/offset copies prefill dequantization makes (see overhead_bytes).
DEQUANT_CHURN = 2.0
# Freed buffers the C allocator keeps (glibc trims its heap only past a threshold of up to 64 MB): a share
# of what was allocated and freed (KV cache growth, activations), capped.
RETAINED_SHARE, RETAINED_CAP = 0.5, 64 * MB


@dataclass(frozen=True)
class MemoryPolicy:
    """Element sizes in memory, by the loader's own rule (``edge_llm.backend.DtypePolicy``).

    ``compute`` is the activations' and the KV cache's element size. Packed codes and the parameters a
    model keeps in float (``keep_float32``) stay as stored; every other float tensor goes where the
    runtime's policy puts it (on the CPU: matrices and scales as stored, vectors and a tied embedding
    table in float32).
    """

    runtime: DtypePolicy
    tied_embeddings: bool

    @property
    def compute(self) -> int:
        return self.runtime.compute.size

    def itemsize(self, t: PlannedTensor) -> int:
        if t.kind == "packed" or t.keep_float:
            return DTYPE_BYTES[t.dtype]
        stored = MX_DTYPES[t.dtype]
        return self.runtime.stored_dtype(t.name, stored, len(t.shape), self.tied_embeddings).size


def policy_for(backend: str, plan: Plan) -> MemoryPolicy:
    """What ``edge_llm.backend.dtype_policy`` picks on ``backend``: float32 compute over the stored weights
    on the CPU; the checkpoint's main float dtype for everything on a GPU."""
    if backend == "cpu":
        return MemoryPolicy(DtypePolicy(mx.float32, None), plan.tied_embeddings)
    floats = [t for t in plan.tensors if t.kind != "packed"]
    main = MX_DTYPES[max(floats, key=lambda t: math.prod(t.shape)).dtype] if floats else mx.bfloat16
    return MemoryPolicy(DtypePolicy(main, main), plan.tied_embeddings)


def kv_cache_bytes(model: Any, context: int, batch: int, itemsize: int, kv_bits: int | None = None,
                   round_up: bool = True) -> int:
    """What the runtime's caches hold after ``context`` tokens (buffers grow in steps of ``STEP``)."""
    args = model.args
    tokens = math.ceil(context / STEP) * STEP if round_up else context
    layers = len(model.layers)
    if isinstance(model.make_cache()[0], LatentCache):
        per_token = args.kv_lora_rank + args.qk_rope_head_dim  # MLA: one latent per token, all heads
    else:
        heads = getattr(args, "num_key_value_heads", None) or args.num_attention_heads
        head_dim = getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads
        per_token = 2 * heads * head_dim
    elements = layers * per_token * tokens * batch
    if kv_bits is None or kv_bits >= 16:
        return elements * (itemsize if kv_bits is None else kv_bits // 8)
    # quantized cache (mlx-lm's QuantizedKVCache layout): packed codes + a scale and an offset per 64
    return elements * kv_bits // 8 + elements // 64 * 2 * itemsize


def _largest_chunk(context: int, chunk: int = PREFILL_CHUNK) -> tuple[int, int]:
    """(queries, keys) of the prefill chunk with the most attention scores for a ``context``-token prompt."""
    n = max(context - 1, 1)  # the last prompt token is decoded, not prefilled
    full = (n - 1) // chunk * chunk  # start of the last chunk
    last = (n - full, n)
    return max(last, (chunk, full), key=lambda qk: qk[0] * qk[1]) if full else last


def activation_bytes(model: Any, context: int, batch: int, itemsize: int) -> int:
    """Peak live activations while prefilling ``context`` tokens in chunks of ``PREFILL_CHUNK``."""
    args = model.args
    queries, keys = _largest_chunk(context)
    chunk = min(context, PREFILL_CHUNK)
    k = getattr(args, "num_experts_per_tok", None) or 0
    moe = (getattr(args, "moe_intermediate_size", None) or args.intermediate_size) if k else 0
    inter = max(args.intermediate_size, k * moe)  # routed experts see each token k times
    scores = args.num_attention_heads * queries * keys
    mla = 0
    if getattr(args, "kv_lora_rank", None):  # MLA prefill expands the latent into per-head keys and values
        mla = args.num_attention_heads * (args.qk_nope_head_dim + args.qk_rope_head_dim + args.v_head_dim) * keys
    values = ACT_SCORES * scores + ACT_INTERMEDIATE * chunk * inter + ACT_MLA * mla
    return int(itemsize * batch * values)


def cast_bytes(plan: Plan, policy: MemoryPolicy) -> list[int]:
    """Source bytes of each tensor the loader converts to another dtype as it loads."""
    return [t.nbytes for t in plan.tensors if policy.itemsize(t) != DTYPE_BYTES[t.dtype]]


def tokenizer_bytes(folder: Path | None) -> int:
    if folder is None:
        return 0
    files = [folder / "tokenizer.json", folder / "tokenizer.model"]
    return int(sum(f.stat().st_size for f in files if f.is_file()) * TOKENIZER_FACTOR)


def _prefill_dequantized(plan: Plan) -> list[PlannedTensor]:
    """On the CPU a quantized linear prefills by dequantizing its weight (``edge_llm.models.layers``):
    every one used in prefill (not routed experts, not the output head or the embedding)."""
    return [t for t in plan.tensors if t.kind == "packed" and not t.expert
            and not t.name.startswith(("lm_head.", "model.embed_tokens."))]


def dequantized_prefill_values(plan: Plan) -> int:
    """The largest weight dequantized for prefill: a float transient."""
    return max((t.params for t in _prefill_dequantized(plan)), default=0)


def dequantize_churn_values(plan: Plan) -> int:
    """Float copies of scales and offsets made for every prefill dequantization: small buffers allocated
    and freed once per layer, which fragment the C heap."""
    module_scales = {f"{t.name.rsplit('.', 1)[0]}.scales" for t in _prefill_dequantized(plan)}
    return sum(2 * math.prod(t.shape) for t in plan.tensors if t.name in module_scales)


def overhead_bytes(model: Any, plan: Plan, policy: MemoryPolicy, context: int, batch: int, kv: int,
                   tokenizer: int, cpu: bool) -> int:
    """Everything but weights and KV cache at the peak: the process, plus the larger of the running peak
    (activations) and the loading peak (the largest tensor held twice while cast), plus the freed buffers
    the allocator keeps (from casting at load, KV cache growth and activations)."""
    act = activation_bytes(model, context, batch, policy.compute)
    churn = 0
    if cpu and context > 1:
        act += int(ACT_DEQUANT * dequantized_prefill_values(plan) * policy.compute)
        churn = int(DEQUANT_CHURN * dequantize_churn_values(plan) * policy.compute)
    cast = cast_bytes(plan, policy)
    retained = min(RETAINED_CAP, int(RETAINED_SHARE * (sum(cast) + act + kv))) + churn
    loading = max(cast, default=0) - kv  # the loading peak has no KV cache yet
    return PROCESS_BASE_BYTES + tokenizer + max(act, loading) + retained
