"""What ``edge-llm run`` holds in memory besides the weights' bytes: dtype policy, KV cache, runtime.

- In-memory dtypes follow the runtime's policy (``edge_llm.machine.backend.DtypePolicy``): on a GPU every float
  tensor in the checkpoint's dtype; on the CPU activations and the KV cache in float32 (MLX's
  half-precision CPU kernels are slow) over half-precision weights, see ``MemoryPolicy``.
- KV cache: what ``edge_llm.models.cache`` allocates for ``context`` tokens (buffers grow in steps of 256),
  as the model says per token (``CausalLM.kv_bytes_per_token``): ``2 · layers · kv_heads · head_dim`` values
  for GQA (the config's head_dim), ``layers · (kv_lora_rank + qk_rope_head_dim)`` for DeepSeek's MLA latent.
- runtime: the process itself (interpreter, libraries, tokenizer), the activations of the largest
  prefill chunk and the freed buffers MLX's cache and the C allocator keep (``RuntimeTerms``). Their
  weights are measured: ``benchmarks/estimate_calibration.py --fit`` fits ``Calibration`` to the peak
  RSS of real ``edge-llm run`` processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from edge_llm.formats.tensors import DTYPE_BYTES
from edge_llm.generation.generate import PREFILL_CHUNK
from edge_llm.machine.backend import MX_DTYPES, DtypePolicy
from edge_llm.models.base import CausalLM
from edge_llm.models.cache import STEP

from .plan import Plan, PlannedTensor

MB = 1 << 20
# The tokenizer's Rust and Python structures: resident bytes per byte of tokenizer.json / tokenizer.model.
TOKENIZER_FACTOR = 5.0


@dataclass(frozen=True)
class Calibration:
    """The runtime's memory besides weights and KV cache, as weights over ``RuntimeTerms``.

    Fitted by ``python -m benchmarks.estimate_calibration --fit`` to the peak RSS (wait4) of real
    ``edge-llm run`` processes: SmolLM2 4-bit and bf16 and two 0.4B MoE shapes at 20 to 3,000 tokens
    (RESULTS.md, "Memory estimate vs measured peak RSS").
    """

    base: float  # bytes MLX does not allocate: interpreter, MLX/BLAS/tokenizers libraries, typer/rich/jinja2
    scores: float  # per byte of attention scores of the largest prefill chunk
    intermediate: float  # per byte of a chunk's feed-forward intermediates
    mla: float  # per byte of MLA's keys and values expanded per head
    dequant: float  # bytes, when quantized linears prefill through float blocks (edge_llm.models.layers)
    retained_share: float  # freed buffers MLX's cache and the C heap keep: this share of what was freed ...
    retained_cap: float  # ... up to this many bytes


CALIBRATION = Calibration(base=4.91e7, scores=0.481, intermediate=4.6, mla=1.86, dequant=2.97e7, retained_share=0.7,
                          retained_cap=1.01e8)


@dataclass(frozen=True)
class MemoryPolicy:
    """Element sizes in memory, by the loader's own rule (``edge_llm.machine.backend.DtypePolicy``).

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
    """What ``edge_llm.machine.backend.dtype_policy`` picks on ``backend``: float32 compute over the stored weights
    on the CPU; the checkpoint's main float dtype for everything on a GPU."""
    if backend == "cpu":
        return MemoryPolicy(DtypePolicy(mx.float32, None), plan.tied_embeddings)
    floats = [t for t in plan.tensors if t.kind != "packed"]
    main = MX_DTYPES[max(floats, key=lambda t: math.prod(t.shape)).dtype] if floats else mx.bfloat16
    return MemoryPolicy(DtypePolicy(main, main), plan.tied_embeddings)


def kv_cache_bytes(model: CausalLM, context: int, batch: int, itemsize: int, kv_bits: int | None = None,
                   round_up: bool = True) -> int:
    """What the runtime's caches hold after ``context`` tokens (buffers grow in steps of ``STEP``), rows of
    ``itemsize`` floats, or quantized to ``kv_bits`` (8, 4; 16: a half-precision cache, what ``run`` would
    keep in that dtype)."""
    tokens = math.ceil(context / STEP) * STEP if round_up else context
    if kv_bits is not None and kv_bits >= 16:
        itemsize, kv_bits = kv_bits // 8, None
    return model.kv_bytes_per_token(itemsize, kv_bits) * tokens * batch


def _largest_chunk(context: int, chunk: int = PREFILL_CHUNK) -> tuple[int, int]:
    """(queries, keys) of the prefill chunk with the most attention scores for a ``context``-token prompt."""
    n = max(context - 1, 1)  # the last prompt token is decoded, not prefilled
    full = (n - 1) // chunk * chunk  # start of the last chunk
    last = (n - full, n)
    return max(last, (chunk, full), key=lambda qk: qk[0] * qk[1]) if full else last


@dataclass(frozen=True)
class RuntimeTerms:
    """What the runtime's memory besides weights and KV cache depends on, in bytes."""

    scores: int  # attention scores of the largest prefill chunk
    intermediate: int  # feed-forward intermediates of a prefill chunk (routed experts see each token k times)
    mla: int  # MLA prefill: the latent expanded into per-head keys and values
    dequant: bool  # quantized linears prefill by dequantizing blocks of rows (the CPU)
    cast: int  # source bytes of the tensors the loader converts to another dtype (freed as it loads)
    kv: int
    tokenizer: int


def runtime_terms(model: CausalLM, plan: Plan, policy: MemoryPolicy, context: int, batch: int, kv: int,
                  tokenizer: int, cpu: bool) -> RuntimeTerms:
    queries, keys = _largest_chunk(context)
    chunk = min(context, PREFILL_CHUNK)
    widths = model.prefill_widths
    values = policy.compute * batch
    return RuntimeTerms(
        scores=values * widths.scores * queries * keys,
        intermediate=values * chunk * widths.feed_forward,
        mla=values * widths.expanded_kv * keys,
        dequant=cpu and context > 1 and any(_prefill_dequantized(plan)),
        cast=sum(t.nbytes for t in plan.tensors if policy.itemsize(t) != DTYPE_BYTES[t.dtype]),
        kv=kv, tokenizer=tokenizer,
    )


def overhead_bytes(t: RuntimeTerms, c: Calibration = CALIBRATION) -> int:
    """Everything but weights and KV cache at the peak: the process, the live activations of the largest
    prefill chunk, and the freed buffers MLX's cache and the C heap keep (from casting at load, KV cache
    growth and activations). Loading is never the peak: the loader casts one tensor at a time and its
    source is not kept (measured: a fitted weight of 0 for the largest cast tensor)."""
    act = c.scores * t.scores + c.intermediate * t.intermediate + c.mla * t.mla + c.dequant * t.dequant
    retained = min(c.retained_cap, c.retained_share * (t.cast + act + t.kv))
    return int(c.base + t.tokenizer + act + retained)


def tokenizer_bytes(folder: Path | None) -> int:
    if folder is None:
        return 0
    files = [folder / "tokenizer.json", folder / "tokenizer.model"]
    return int(sum(f.stat().st_size for f in files if f.is_file()) * TOKENIZER_FACTOR)


def _prefill_dequantized(plan: Plan) -> list[PlannedTensor]:
    """On the CPU a quantized linear prefills by dequantizing its weight a block of rows at a time
    (``edge_llm.models.layers``): every one used in prefill (not routed experts, not the output head or the
    embedding)."""
    return [t for t in plan.tensors if t.kind == "packed" and not t.expert
            and not t.name.startswith(("lm_head.", "model.embed_tokens."))]
