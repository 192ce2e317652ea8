"""Experts streamed from disk compute exactly what the resident model computes, for every MoE architecture and
every layout a checkpoint stores experts in: Hub per-expert bf16 tensors, MLX 4-bit stacked tensors, a GGUF
Q4_0 file's stacked blocks, DeepSeek-V3 FP8. Banks as small as the router's k, so most lookups miss and
prefill chunks go in waves."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.torch import load_file, save_file

from edge_llm.errors import CheckpointError
from edge_llm.formats.open import open_checkpoint
from edge_llm.loader import load_checkpoint
from edge_llm.machine.backend import dtype_policy
from quant.fit import check_fits
from quant.quantize import quantize
from tests.gguf_files import write_gguf
from tests.hf_oracle import build_tiny_checkpoint
from tests.test_fp8 import V3, write_fp8_pair
from tests.test_gguf_moe import tiny
from tests.tiny_configs import TINY_CONFIGS

MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")
TOKENS = np.random.default_rng(0).integers(0, 1 << 20, size=(1, 48))  # 48 tokens x k=2: the sorted prefill path


def hub_bf16(root: Path, model_type: str) -> Path:
    folder = build_tiny_checkpoint(root / "hub", **TINY_CONFIGS[model_type])
    weights = load_file(folder / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in weights.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    return folder


def mlx_4bit(root: Path, model_type: str) -> Path:
    src = build_tiny_checkpoint(root / "src", **TINY_CONFIGS[model_type])
    quantize(src, root / "mlx4", bits=4)
    return root / "mlx4"


def gguf_q4_0(root: Path, model_type: str) -> Path:
    path = root / "tiny.Q4_0.gguf"
    write_gguf(path, tiny(model_type), Q.Q4_0)
    return path


LAYOUTS = {"hub-bf16": hub_bf16, "mlx-4bit": mlx_4bit, "gguf-q4_0": gguf_q4_0}


def assert_streamed_equals_resident(path: Path, slots: int, policy: str = "lru") -> None:
    checkpoint = open_checkpoint(path)
    resident = load_checkpoint(checkpoint)
    streamed = load_checkpoint(open_checkpoint(path), expert_slots=slots, expert_policy=policy)
    tokens = mx.array(TOKENS % checkpoint.config["vocab_size"])
    assert mx.array_equal(resident(tokens), streamed(tokens)).item(), "prefill logits differ"
    caches = resident.make_cache(), streamed.make_cache()
    for i in range(16):  # decode, one token at a time
        step = tokens[:, i : i + 1]
        assert mx.array_equal(resident(step, cache=caches[0]), streamed(step, cache=caches[1])).item(), i
    short = tokens[:, :7]  # 7 tokens x k: fewer pairs than sorting pays for, several rows through the bank at once
    assert mx.array_equal(resident(short), streamed(short)).item(), "short prefill logits differ"
    stats = streamed.expert_streamer.bank_stats
    assert stats.misses > slots and stats.waves > 0  # experts were evicted and loaded again: it really streamed
    assert streamed.expert_streamer.read_stats.bytes > 0


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_streamed_logits_equal_resident(tmp_path, model_type, layout):
    path = LAYOUTS[layout](tmp_path, model_type)
    assert_streamed_equals_resident(path, slots=TINY_CONFIGS[model_type]["num_experts_per_tok"])


def test_the_lfu_policy_changes_what_is_read_not_the_logits(tmp_path):
    assert_streamed_equals_resident(mlx_4bit(tmp_path, "qwen2_moe"), slots=3, policy="lfu")


def test_fp8_experts_are_dequantized_on_read(tmp_path):
    src = build_tiny_checkpoint(tmp_path / "src", **V3)
    write_fp8_pair(src, tmp_path / "fp8", tmp_path / "ref")
    assert_streamed_equals_resident(tmp_path / "fp8", slots=V3["num_experts_per_tok"])


def test_the_bank_holds_only_its_slots(tmp_path):
    folder = hub_bf16(tmp_path, "qwen3_moe")
    model = load_checkpoint(open_checkpoint(folder), expert_slots=2)
    streamer = model.expert_streamer
    cfg = TINY_CONFIGS["qwen3_moe"]
    # per expert: gate and up [I, D], down [D, I], in the compute dtype (float32 on the CPU, where half weights
    # would be upcast at every step anyway; bf16 on a GPU)
    compute = dtype_policy("BF16").compute.size
    per_expert = 3 * cfg["moe_intermediate_size"] * cfg["hidden_size"] * compute
    assert streamer.bank_bytes == cfg["num_hidden_layers"] * 2 * per_expert
    assert streamer.bank_bytes == check_fits(str(folder), max_memory=10**15).estimate.requested.footprint.slot_bytes * 2
    assert streamer.slots == 2


def test_a_shard_truncated_while_streaming_is_one_clear_error(tmp_path):
    folder = hub_bf16(tmp_path, "olmoe")
    model = load_checkpoint(open_checkpoint(folder), expert_slots=2)
    shard = folder / "model.safetensors"
    os.truncate(shard, shard.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=str(shard)) as e:
        model(mx.array(TOKENS % 384))
    assert "\n" not in str(e.value)


def test_a_shard_replaced_while_streaming_is_one_clear_error(tmp_path):
    folder = hub_bf16(tmp_path, "mixtral")
    model = load_checkpoint(open_checkpoint(folder), expert_slots=2)
    shard = folder / "model.safetensors"
    shutil.copy(shard, tmp_path / "copy")
    os.replace(tmp_path / "copy", shard)  # same bytes, another file: the experts read must come from the one opened
    with pytest.raises(CheckpointError, match="changed on disk"):
        model(mx.array(TOKENS % 384))
