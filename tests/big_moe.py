"""A Qwen3-MoE-shaped model of about 1.9B parameters (random weights) for expert-streaming benchmarks.

Qwen3-30B-A3B's structure (128 experts, top-8 routing, GQA with 4 KV heads of 128, per-head q/k norms) with
fewer layers, a narrower hidden size and experts of width 384 (its are 768), so that it is several times
larger than a memory cap this machine can give a process, yet written in a few minutes:
12 layers x 128 experts x 3 x 1024 x 384 = 1.81B routed-expert parameters, 0.13B for the rest.

Written once in the Hub layout (one tensor per expert, ``mlp.experts.{e}.gate_proj.weight``, bf16, shards of
at most 1 GB with an index) with the tests' small tokenizer, so both edge-llm and mlx-lm read it.
Weights are drawn with numpy (fast) and rounded to bf16; the routers are scaled so routing is not uniform
noise (each token prefers a few experts strongly, as trained routers do).

    python -m tests.big_moe DIR          # writes DIR (skips it when complete)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

SHAPE = dict(
    model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], vocab_size=32000, hidden_size=1024,
    intermediate_size=3072, moe_intermediate_size=384, num_hidden_layers=12, num_attention_heads=16,
    num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
    decoder_sparse_step=1, mlp_only_layers=[], hidden_act="silu", rms_norm_eps=1e-6, max_position_embeddings=32768,
    rope_theta=1000000.0, rope_scaling=None, attention_bias=False, tie_word_embeddings=False,
    bos_token_id=0, eos_token_id=0, torch_dtype="bfloat16", use_sliding_window=False, sliding_window=None,
)
SHARD_BYTES = 1 << 30


def _bf16(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (round to nearest even), as uint16."""
    bits = values.astype(np.float32).view(np.uint32)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).astype(np.uint16)


def tensor_shapes(shape: dict) -> dict[str, tuple[int, ...]]:
    h, v, layers = shape["hidden_size"], shape["vocab_size"], shape["num_hidden_layers"]
    heads, kv, d = shape["num_attention_heads"], shape["num_key_value_heads"], shape["head_dim"]
    experts, width = shape["num_experts"], shape["moe_intermediate_size"]
    out = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(layers):
        p = f"model.layers.{i}"
        out.update({
            f"{p}.input_layernorm.weight": (h,), f"{p}.post_attention_layernorm.weight": (h,),
            f"{p}.self_attn.q_proj.weight": (heads * d, h), f"{p}.self_attn.k_proj.weight": (kv * d, h),
            f"{p}.self_attn.v_proj.weight": (kv * d, h), f"{p}.self_attn.o_proj.weight": (h, heads * d),
            f"{p}.self_attn.q_norm.weight": (d,), f"{p}.self_attn.k_norm.weight": (d,),
            f"{p}.mlp.gate.weight": (experts, h),
        })
        for e in range(experts):
            q = f"{p}.mlp.experts.{e}"
            out.update({f"{q}.gate_proj.weight": (width, h), f"{q}.up_proj.weight": (width, h),
                        f"{q}.down_proj.weight": (h, width)})
    return out


def _value(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if len(shape) == 1:
        return _bf16(np.ones(shape, dtype=np.float32))
    scale = 0.5 if name.endswith("mlp.gate.weight") else 0.02  # decisive routers
    return _bf16(rng.standard_normal(shape, dtype=np.float32) * scale)


def _write_shard(path: Path, tensors: dict[str, np.ndarray]) -> None:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, array in tensors.items():
        header[name] = {"dtype": "BF16", "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for array in tensors.values():
            f.write(array.tobytes())


def write_checkpoint(folder: Path, shape: dict = SHAPE, seed: int = 0) -> Path:
    """Writes the model beside ``folder`` and renames it into place; a complete folder is kept as it is.
    One shard is in memory at a time (the model is larger than the memory the benchmark gives a process)."""
    from tests.tiny_tokenizer import write_tiny_tokenizer

    if (folder / "config.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    weight_map: dict[str, str] = {}
    shard: dict[str, np.ndarray] = {}

    def flush() -> None:
        name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        _write_shard(tmp / name, shard)
        weight_map.update(dict.fromkeys(shard, name))
        shard.clear()

    for name, s in tensor_shapes(shape).items():
        if shard and sum(a.nbytes for a in shard.values()) + int(np.prod(s)) * 2 > SHARD_BYTES:
            flush()
        shard[name] = _value(name, s, rng)
    flush()
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp / "config.json").write_text(json.dumps(shape, indent=2))
    write_tiny_tokenizer(tmp)
    tmp.rename(folder)
    return folder


def parameters(shape: dict = SHAPE) -> tuple[int, int]:
    """(all parameters, routed-expert parameters)."""
    shapes = tensor_shapes(shape)
    total = sum(int(np.prod(s)) for s in shapes.values())
    routed = sum(int(np.prod(s)) for n, s in shapes.items() if ".experts." in n)
    return total, routed


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    total, routed = parameters()
    print(f"{total / 1e9:.2f}B parameters, {routed / 1e9:.2f}B in routed experts", file=sys.stderr)
    write_checkpoint(args.folder)
