"""FP8 (e4m3, 128x128 block ``weight_scale_inv``) checkpoints, DeepSeek-V3's published format, against torch's
float8_e4m3fn and transformers' logits on the same dequantized weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cli.main import app
from edge_llm import CheckpointError, load_model
from edge_llm.formats.fp8 import dequantize_block_fp8
from tests.hf_oracle import TOLERANCE, build_tiny_checkpoint, random_tokens, reference_logits
from tests.tiny_tokenizer import write_tiny_tokenizer

BLOCK = 128
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [BLOCK, BLOCK]}
# sizes that are not multiples of 128, so edge blocks are partial
V3 = dict(
    model_type="deepseek_v3", vocab_size=128, hidden_size=160, intermediate_size=192, moe_intermediate_size=144,
    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=136, kv_lora_rank=144,
    qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=4, num_experts_per_tok=2,
    n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=1, max_position_embeddings=256,
)


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's recipe: per 128x128 block, scale = amax / 448, store w / scale in e4m3 and the scale."""
    *lead, M, N = w.shape
    gm, gn = math.ceil(M / BLOCK), math.ceil(N / BLOCK)
    padded = torch.nn.functional.pad(w, (0, gn * BLOCK - N, 0, gm * BLOCK - M))
    blocks = padded.reshape(*lead, gm, BLOCK, gn, BLOCK)
    scale = blocks.abs().amax(dim=(-3, -1)).clamp(min=1e-12) / 448.0  # [..., gm, gn]
    q = (blocks / scale[..., :, None, :, None]).reshape(*lead, gm * BLOCK, gn * BLOCK)[..., :M, :N]
    return q.to(torch.float8_e4m3fn), scale.float()


def dequantize_torch(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    full = scale.repeat_interleave(BLOCK, -2).repeat_interleave(BLOCK, -1)
    return q.float() * full[..., : q.shape[-2], : q.shape[-1]]


def test_every_e4m3_code_decodes_like_torch():
    codes = torch.arange(256, dtype=torch.uint8)
    theirs = codes.view(torch.float8_e4m3fn).float().numpy().reshape(16, 16)
    ours = np.array(dequantize_block_fp8(mx.array(codes.numpy().reshape(16, 16)), mx.ones((1, 1))))
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
    np.testing.assert_array_equal(ours[~np.isnan(ours)], theirs[~np.isnan(theirs)])


@pytest.mark.parametrize("shape", [(300, 200), (128, 128), (2, 130, 260)])
def test_block_dequantization_matches_torch(shape):
    w = torch.randn(shape) * torch.logspace(-3, 1, shape[-1])  # column blocks of very different ranges
    q, scale = quantize_fp8(w)
    ours = dequantize_block_fp8(mx.array(q.view(torch.uint8).numpy()), mx.array(scale.numpy()))
    np.testing.assert_array_equal(np.array(ours), dequantize_torch(q, scale).numpy())
    assert np.abs(np.array(ours) - w.numpy()).max() <= 0.07 * np.abs(w.numpy()).max()  # e4m3: 3 mantissa bits


def is_fp8_weight(name: str, t: torch.Tensor) -> bool:
    # DeepSeek-V3's release: every linear layer in the decoder is FP8; embeddings, lm_head, norms, router stay.
    return name.startswith("model.layers.") and name.endswith("proj.weight") and t.ndim == 2


def write_fp8_pair(src: Path, fp8_dir: Path, ref_dir: Path) -> None:
    """From a float checkpoint: an FP8 copy (with a multi-token-prediction layer, as published) and a float
    copy holding exactly the dequantized values, which transformers reads as the reference."""
    tensors = load_file(src / "model.safetensors")
    fp8, ref = {}, {}
    for name, t in tensors.items():
        if is_fp8_weight(name, t):
            q, scale = quantize_fp8(t)
            fp8[name], fp8[name + "_scale_inv"] = q, scale
            ref[name] = dequantize_torch(q, scale)
        else:
            fp8[name] = ref[name] = t
    mtp = "model.layers.2"  # index num_hidden_layers: DeepSeek-V3's MTP module, skipped at load
    q, scale = quantize_fp8(torch.randn(160, 320))
    fp8.update({f"{mtp}.eh_proj.weight": q, f"{mtp}.eh_proj.weight_scale_inv": scale,
                f"{mtp}.enorm.weight": torch.ones(160), f"{mtp}.self_attn.kv_a_layernorm.weight": torch.ones(144)})
    config = json.loads((src / "config.json").read_text())
    for folder, weights in ((fp8_dir, fp8), (ref_dir, ref)):
        folder.mkdir()
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(config))
    (fp8_dir / "config.json").write_text(json.dumps({**config, "quantization_config": FP8_CONFIG,
                                                    "num_nextn_predict_layers": 1}))


@pytest.fixture(scope="module")
def fp8_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    src = build_tiny_checkpoint(root / "src", **V3)
    write_fp8_pair(src, root / "fp8", root / "ref")
    return root / "fp8", root / "ref"


def test_fp8_checkpoint_logits_match_transformers_on_dequantized_weights(fp8_pair):
    fp8_dir, ref_dir = fp8_pair
    header = load_file(fp8_dir / "model.safetensors")
    assert header["model.layers.0.self_attn.q_a_proj.weight"].dtype == torch.float8_e4m3fn
    model = load_model(fp8_dir)
    # weights are the exact dequantized values, not an approximation of them
    ref = load_file(ref_dir / "model.safetensors")
    for name in ("model.layers.0.self_attn.kv_b_proj.weight", "model.layers.1.mlp.shared_experts.down_proj.weight"):
        module = model
        for part in name.split(".")[:-1]:
            module = module[int(part)] if part.isdigit() else getattr(module, part)
        np.testing.assert_array_equal(np.array(module.weight), ref[name].numpy())
    tokens = random_tokens(128, 20, batch=2)
    np.testing.assert_allclose(np.array(model(mx.array(tokens))), reference_logits(ref_dir, tokens),
                               atol=TOLERANCE, rtol=0)
    assert len(model.layers) == 2  # the MTP layer is not part of the model


def test_fp8_without_scales_is_one_clear_error(fp8_pair, tmp_path):
    fp8_dir, _ = fp8_pair
    broken = tmp_path / "broken"
    broken.mkdir()
    tensors = load_file(fp8_dir / "model.safetensors")
    tensors.pop("model.layers.0.self_attn.o_proj.weight_scale_inv")
    save_file(tensors, broken / "model.safetensors")
    (broken / "config.json").write_text((fp8_dir / "config.json").read_text())
    write_tiny_tokenizer(broken)
    result = CliRunner().invoke(app, ["run", str(broken), "--prompt", "hi"])
    assert result.exit_code == 1, result.output
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1
    assert "model.layers.0.self_attn.o_proj.weight" in message and "weight_scale_inv" in message

    tensors = load_file(fp8_dir / "model.safetensors")
    tensors["model.layers.0.self_attn.o_proj.weight_scale_inv"] = torch.ones(2, 2)
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"expected \(2, 1\)"):
        load_model(broken)
