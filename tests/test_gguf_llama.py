"""GGUF Llama files against transformers: every tensor type we load, rope variants, tensor headers.

Each test writes a tiny random transformers Llama as llama.cpp's converter would (gguf-py, q/k rows
permuted; tests/gguf_files.py) and compares our float32 logits with transformers' on the exact values
the file stores. transformers' own GGUF reader checks the writer itself.
"""

from __future__ import annotations

import logging
import math

import mlx.core as mx
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from transformers import AutoConfig, AutoModelForCausalLM

from edge_llm.formats.gguf.checkpoint import GGUFCheckpoint
from edge_llm.formats.open import open_checkpoint
from edge_llm.loader import load_checkpoint
from edge_llm.modelinfo import describe
from tests.gguf_files import write_llama_gguf

TOKENS = np.array([[1, 17, 250, 3, 99, 4, 380, 42, 7, 7, 150, 0]])
BASE = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)  # fmt: skip


def tiny_llama(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model("llama", **{**BASE, **overrides})
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # no inert parameters: norms away from 1
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def hf_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.numpy()


def our_logits(path) -> np.ndarray:
    model = load_checkpoint(open_checkpoint(path), dtype="float32")
    return np.array(model(mx.array(TOKENS)))


BITS = {Q.Q8_0: 8, Q.Q4_0: 4, Q.Q4_1: 4, Q.Q5_0: 5, Q.Q5_1: 5}


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, *BITS])
def test_logits_equal_transformers(tmp_path, qtype):
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    reference = write_llama_gguf(path, tiny_llama(), qtype)
    checkpoint = open_checkpoint(path)
    assert isinstance(checkpoint, GGUFCheckpoint)
    assert checkpoint.quantization == ({"group_size": 32, "bits": BITS[qtype]} if qtype in BITS else None)
    np.testing.assert_allclose(our_logits(path), hf_logits(reference), atol=1e-4, rtol=0)


def test_writer_matches_transformers_gguf_reader(tmp_path):
    """transformers reading our written file gives the source model back: the writer is llama.cpp's layout."""
    source = tiny_llama(seed=3)
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(path, source, Q.F32)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    np.testing.assert_allclose(hf_logits(theirs), hf_logits(source), atol=1e-5, rtol=0)
    np.testing.assert_allclose(our_logits(path), hf_logits(source), atol=1e-4, rtol=0)


def test_k_quants(tmp_path, caplog):
    """Q4_K/Q5_K stay quantized (4/5-bit, group 32, exact); Q2_K/Q3_K/Q6_K are dequantized, with a warning."""
    # K-quant blocks hold 256 values: rows of 256 and 512
    model = tiny_llama(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=1)
    kinds = [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]
    names = [n for n, p in model.state_dict().items() if p.ndim == 2]
    by_name = {n: kinds[i % len(kinds)] for i, n in enumerate(names)}
    path = tmp_path / "kquants.gguf"
    reference = write_llama_gguf(path, model, lambda name, shape: by_name[name])
    checkpoint = open_checkpoint(path)
    kept = {n[: -len(".weight")]: {Q.Q4_K: 4, Q.Q5_K: 5}[k] for n, k in by_name.items() if k in (Q.Q4_K, Q.Q5_K)}
    quantization = checkpoint.quantization
    assert quantization["group_size"] == 32
    assert {m: quantization.get(m, {"bits": quantization["bits"]})["bits"] for m in kept} == kept
    dequantized = {n for n, k in by_name.items() if k in (Q.Q2_K, Q.Q3_K, Q.Q6_K)}
    assert {checkpoint.tensors[n].dtype for n in dequantized} == {"F16"}
    with caplog.at_level(logging.WARNING, logger="edge_llm.formats.gguf.checkpoint"):
        ours = our_logits(path)
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "Q2_K/Q3_K/Q6_K tensors are dequantized to float16" in warning and "GB in memory" in warning
    np.testing.assert_allclose(ours, hf_logits(reference), atol=1e-4, rtol=0)


def test_mixed_bits_and_tied_embeddings(tmp_path):
    """A Q8_0 embedding in a Q4_1 file (SmolLM2's layout): per-module bits in the quantization block."""
    model = tiny_llama(tie_word_embeddings=True)
    path = tmp_path / "mixed.gguf"
    reference = write_llama_gguf(path, model, lambda name, shape: Q.Q8_0 if "embed" in name else Q.Q4_1)
    checkpoint = open_checkpoint(path)
    assert checkpoint.config["tie_word_embeddings"] is True
    assert checkpoint.quantization == {"group_size": 32, "bits": 4,
                                       "model.embed_tokens": {"group_size": 32, "bits": 8}}  # fmt: skip
    np.testing.assert_allclose(our_logits(path), hf_logits(reference), atol=1e-4, rtol=0)


def test_tensor_headers_are_what_load_weights_returns(tmp_path):
    model = tiny_llama()
    path = tmp_path / "q.gguf"
    write_llama_gguf(path, model, lambda name, shape: Q.Q8_0 if "down" in name else Q.Q4_0)
    checkpoint = open_checkpoint(path)
    weights = checkpoint.load_weights()
    assert set(weights) == set(checkpoint.tensors)
    for name, info in checkpoint.tensors.items():
        assert tuple(weights[name].shape) == info.shape, name
        assert info.nbytes == weights[name].nbytes, name
    assert describe(checkpoint).params_total == sum(p.numel() for p in model.parameters())


def test_numpy_path_equals_mx_load(tmp_path, monkeypatch):
    """Files with only MLX-native types go through mx.load; our numpy repacking gives identical arrays."""
    path = tmp_path / "q.gguf"
    write_llama_gguf(path, tiny_llama(), lambda name, shape: {0: Q.Q4_0, 1: Q.Q4_1, 2: Q.Q8_0}[len(name) % 3])
    native = open_checkpoint(path).load_weights()
    monkeypatch.setattr(GGUFCheckpoint, "_all_native", lambda self: False)
    ours = open_checkpoint(path).load_weights()
    assert set(native) == set(ours)
    for name in native:
        assert native[name].dtype == ours[name].dtype, name
        assert mx.array_equal(native[name], ours[name]).item(), name


def test_linear_rope_scaling(tmp_path):
    model = tiny_llama(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})
    path = tmp_path / "linear.gguf"
    reference = write_llama_gguf(path, model, Q.F32)
    assert open_checkpoint(path).config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    np.testing.assert_allclose(our_logits(path), hf_logits(reference), atol=1e-4, rtol=0)


def llama_cpp_rope_freqs(head_dim: int, theta: float, factor: float) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.generate_extra_tensors (Llama 3.1 rope factors)."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    low, high, old = 1.0, 4.0, 8192
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def test_llama3_rope_from_rope_freqs(tmp_path):
    """Llama 3.1 files carry rope scaling as a rope_freqs tensor: rebuilt into the llama3 rope."""
    params = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192, "rope_theta": 500000.0}  # fmt: skip
    model = tiny_llama(rope_parameters=params, max_position_embeddings=131072, hidden_size=128,
                       intermediate_size=128, num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    path = tmp_path / "llama31.gguf"
    reference = write_llama_gguf(path, model, Q.F32, rope_freqs=llama_cpp_rope_freqs(64, 500000.0, 8.0))
    scaling = open_checkpoint(path).config["rope_scaling"]
    assert scaling["rope_type"] == "llama3" and scaling["factor"] == 8.0
    # long positions, where the scaled low frequencies matter
    tokens = np.arange(0, 384).reshape(1, -1) % 384
    ours = np.array(load_checkpoint(open_checkpoint(path), dtype="float32")(mx.array(tokens)))
    with torch.no_grad():
        theirs = reference(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_dequantized_view_for_converters(tmp_path):
    """``dequantized()``: float16 headers and weights (what a re-quantizer starts from), the same model."""
    path = tmp_path / "mixed.gguf"
    write_llama_gguf(path, tiny_llama(), lambda name, shape: Q.Q8_0 if "embed" in name else Q.Q5_1)
    quantized = open_checkpoint(path)
    floats = quantized.dequantized()
    assert floats.quantization is None and "quantization" in quantized.config
    weights = floats.load_weights()
    assert set(weights) == set(floats.tensors) and not any(n.endswith((".scales", ".biases")) for n in weights)
    for name, info in floats.tensors.items():
        assert tuple(weights[name].shape) == info.shape, name
    assert {floats.tensors[n].dtype for n in floats.tensors if n.endswith("proj.weight")} == {"F16"}
    a = np.array(load_checkpoint(quantized, dtype="float32")(mx.array(TOKENS)))
    b = np.array(load_checkpoint(floats, dtype="float32")(mx.array(TOKENS)))
    np.testing.assert_allclose(a, b, atol=1e-3, rtol=0)  # float16 rounding of the dequantized values
