"""GGUF files for tests, written with llama.cpp's own Python package (gguf-py) the way its converter does.

References: llama.cpp ``convert_hf_to_gguf.py`` (``LlamaModel``: tensor names, the ``permute`` of q/k
rows, the metadata keys) and gguf-py (``GGUFWriter``, ``gguf.quants``). From a transformers model we
write a file and return the reference: the same transformers model holding exactly the values the
file stores (dequantized by gguf-py, un-permuted), so its logits are what a correct reader computes.

gguf-py quantizes F16, BF16, Q4_0, Q4_1, Q5_0, Q8_0 but no K-quant; K-quant tensors get random blocks
with small, finite scales, which is all a dequantizer test needs.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q


def _layer_names(modules: dict[str, str]) -> list[tuple[str, str]]:
    """(HF name pattern, GGUF name): ``model.layers.N.<HF module>.<leaf>`` -> ``blk.N.<GGUF name>.<leaf>``."""
    return [(rf"model\.layers\.(\d+)\.{re.escape(hf)}\.(\w+)", rf"blk.\1.{gg}.\2") for hf, gg in modules.items()]


# (HF name pattern, GGUF name) for llama.cpp's llama-family names
LLAMA_NAMES = [
    (r"model\.embed_tokens\.(\w+)", r"token_embd.\1"),
    (r"model\.norm\.(\w+)", r"output_norm.\1"),
    (r"lm_head\.(\w+)", r"output.\1"),
    *_layer_names({"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                   "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                   "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                   "mlp.down_proj": "ffn_down"}),
]

# Mixture-of-Experts tensors; transformers 5 fuses each layer's experts into gate_up_proj [E, 2I, D]
# (gate rows first) + down_proj [E, D, I], which we split into llama.cpp's stacked exps first.
MOE_NAMES = [
    (r"model\.layers\.(\d+)\.mlp\.experts\.(gate|up|down)_exps", r"blk.\1.ffn_\2_exps.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate\.weight", r"blk.\1.ffn_gate_inp.weight"),
    (r"model\.layers\.(\d+)\.mlp\.shared_expert\.(gate|up|down)_proj\.weight", r"blk.\1.ffn_\2_shexp.weight"),
    (r"model\.layers\.(\d+)\.mlp\.shared_expert_gate\.weight", r"blk.\1.ffn_gate_inp_shexp.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.(q|k)_norm\.weight", r"blk.\1.attn_\2_norm.weight"),
]
# Mixtral files from before llama.cpp stacked experts: one tensor per expert
PER_EXPERT_NAMES = [
    (r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)", r"blk.\1.ffn_\3.\2.weight"),
]
# DeepSeek-V2/V3 (llama.cpp's deepseek2): MLA projections, dense first layers, shared experts
DEEPSEEK_NAMES = [
    *_layer_names({"self_attn.q_proj": "attn_q", "self_attn.q_a_proj": "attn_q_a",
                   "self_attn.q_a_layernorm": "attn_q_a_norm", "self_attn.q_b_proj": "attn_q_b",
                   "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa", "self_attn.kv_a_layernorm": "attn_kv_a_norm",
                   "self_attn.kv_b_proj": "attn_kv_b", "self_attn.k_b_proj": "attn_k_b",
                   "self_attn.v_b_proj": "attn_v_b"}),
    (r"model\.layers\.(\d+)\.mlp\.gate\.e_score_correction_bias", r"blk.\1.exp_probs_b.bias"),
    (r"model\.layers\.(\d+)\.mlp\.shared_experts\.(gate|up|down)_proj\.weight", r"blk.\1.ffn_\2_shexp.weight"),
]
# model_type -> GGUF architecture name
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe",
             "olmoe": "olmoe", "deepseek_v2": "deepseek2", "deepseek_v3": "deepseek2"}  # fmt: skip

# byte offsets of the float16 scale fields in each K-quant block (ggml-common.h)
_K_SCALE_FIELDS = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute``: rotate-half q/k rows -> GGML's interleaved rope layout."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name: str, table=LLAMA_NAMES) -> str:
    for pattern, repl in table:
        if re.fullmatch(pattern, hf_name):
            return re.sub(pattern, repl, hf_name)
    raise KeyError(hf_name)


def encode(x: np.ndarray, qtype: Q, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(what the file stores, the float32 values a correct reader gets back)."""
    if qtype == Q.F32:
        return x.astype(np.float32), x.astype(np.float32)
    if qtype == Q.F16:
        return x.astype(np.float16), x.astype(np.float16).astype(np.float32)
    if qtype in _K_SCALE_FIELDS:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        n = x.size // block
        raw = rng.integers(0, 256, (n, size), dtype=np.uint8)
        for offset in _K_SCALE_FIELDS[qtype]:
            scales = rng.uniform(2e-5, 1e-4, n).astype(np.float16)
            raw[:, offset : offset + 2] = scales.view(np.uint8).reshape(n, 2)
        stored = raw.reshape(*x.shape[:-1], -1)
        values = gguf.quants.dequantize(stored, qtype)
        if qtype in (Q.Q4_K, Q.Q5_K):  # kept quantized by edge-llm, exactly
            return stored, values.astype(np.float32)
        # the others are dequantized to float16 (what mx.load does too): the reference rounds the same way
        return stored, values.astype(np.float16).astype(np.float32)
    if qtype in (Q.IQ4_NL, Q.IQ4_XS, Q.IQ2_XXS, Q.TQ2_0):  # types edge-llm refuses: any bytes will do
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        stored = rng.integers(0, 256, (x.size // block, size), dtype=np.uint8).reshape(*x.shape[:-1], -1)
        return stored, np.zeros_like(x)
    stored = gguf.quants.quantize(x.astype(np.float32), qtype)
    return stored, gguf.quants.dequantize(stored, qtype).astype(np.float32)


def _split_experts(state: dict[str, np.ndarray], per_expert: bool) -> dict[str, np.ndarray]:
    out = {}
    for name, x in state.items():
        if name.endswith("experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            gate, up = np.split(x, 2, axis=1)
            parts = {"gate": gate, "up": up}
        elif name.endswith("experts.down_proj"):
            prefix, parts = name[: -len("down_proj")], {"down": x}
        else:
            out[name] = x
            continue
        for kind, stacked in parts.items():
            if per_expert:
                out.update({f"{prefix}{e}.{kind}": stacked[e] for e in range(stacked.shape[0])})
            else:
                out[f"{prefix}{kind}_exps"] = stacked
    return out


def _join_experts(values: dict[str, np.ndarray], per_expert: bool) -> dict[str, np.ndarray]:
    out, parts = {}, {}
    for name, x in values.items():
        m = re.fullmatch(r"(.*\.experts\.)(?:(\d+)\.)?(gate|up|down)(?:_exps)?", name)
        if m is None:
            out[name] = x
        else:
            parts.setdefault((m[1], m[3]), {})[int(m[2] or 0)] = x
    for (prefix, kind), by_expert in parts.items():
        stacked = np.stack([by_expert[e] for e in sorted(by_expert)]) if per_expert else by_expert[0]
        parts[(prefix, kind)] = stacked
    for (prefix, kind), stacked in parts.items():
        if kind == "gate":
            out[f"{prefix}gate_up_proj"] = np.concatenate([stacked, parts[(prefix, "up")]], axis=1)
        elif kind == "down":
            out[f"{prefix}down_proj"] = stacked
    return out


def _deepseek_metadata(w: gguf.GGUFWriter, cfg, split_kv_b: bool) -> None:
    """convert_hf_to_gguf.py DeepseekV2Model.set_gguf_parameters (both the pre- and post-2025 layouts)."""
    rope, nope, v, rank = cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    w.add_leading_dense_block_count(cfg.first_k_dense_replace)
    if cfg.q_lora_rank is not None:
        w.add_q_lora_rank(cfg.q_lora_rank)
    w.add_kv_lora_rank(rank)
    if split_kv_b:  # MLA written as MQA over the latent
        w.add_key_length(rank + rope)
        w.add_value_length(rank)
        w.add_key_length_mla(nope + rope)
        w.add_value_length_mla(v)
    else:
        w.add_key_length(nope + rope)
        w.add_value_length(v)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_count(cfg.n_routed_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_shared_count(cfg.n_shared_experts)
    w.add_expert_weights_scale(cfg.routed_scaling_factor)
    w.add_expert_weights_norm(cfg.norm_topk_prob)
    sigmoid = cfg.model_type == "deepseek_v3"
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if sigmoid else gguf.ExpertGatingFuncType.SOFTMAX)
    if getattr(cfg, "n_group", None) and cfg.n_group > 1:
        w.add_expert_group_count(cfg.n_group)
        w.add_expert_group_used_count(cfg.topk_group)
    w.add_rope_dimension_count(rope)
    scaling = cfg.rope_parameters
    if scaling.get("rope_type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(scaling["factor"])
        w.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
        w.add_rope_scaling_yarn_log_mul(0.1 * scaling["mscale_all_dim"])


def _split_kv_b(state: dict[str, np.ndarray], cfg) -> dict[str, np.ndarray]:
    """DeepseekV2Model.modify_tensors: kv_b_proj -> k_b [H, r, nope] (transposed) and v_b [H, v, r]."""
    out = {}
    for name, x in state.items():
        if not name.endswith(".kv_b_proj.weight"):
            out[name] = x
            continue
        kv_b = x.reshape(cfg.num_key_value_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, x.shape[-1])
        k_b, v_b = np.split(kv_b, [cfg.qk_nope_head_dim], axis=1)
        out[name.replace("kv_b_proj", "k_b_proj")] = np.ascontiguousarray(k_b.transpose(0, 2, 1))
        out[name.replace("kv_b_proj", "v_b_proj")] = v_b
    return out


def _join_kv_b(values: dict[str, np.ndarray], cfg) -> dict[str, np.ndarray]:
    out = {}
    for name, x in values.items():
        if name.endswith(".k_b_proj.weight"):
            v_b = values[name.replace("k_b_proj", "v_b_proj")]
            out[name.replace("k_b_proj", "kv_b_proj")] = np.concatenate([x.transpose(0, 2, 1), v_b], axis=1).reshape(
                -1, x.shape[1])
        elif not name.endswith(".v_b_proj.weight"):
            out[name] = x
    return out


def write_gguf(
    path: Path,
    model,
    qtype: Q | Callable[[str, tuple[int, ...]], Q] = Q.F32,
    *,
    tokenizer: dict | None = None,
    rope_freqs: np.ndarray | None = None,
    per_expert: bool = False,
    split_kv_b: bool = True,
    seed: int = 0,
    extra_metadata: Callable[[gguf.GGUFWriter], None] | None = None,
):
    """Writes ``model`` (a transformers Llama, Mixtral, Qwen2/3-MoE or OLMoE) as llama.cpp would and
    returns the reference model: the same architecture holding exactly the values the file stores.

    ``per_expert`` writes Mixtral experts one tensor each (llama.cpp files from before 2024-04).
    """
    cfg = model.config
    arch = GGUF_ARCH[cfg.model_type]
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(1 if arch == "deepseek2" and split_kv_b else cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if arch == "deepseek2":
        _deepseek_metadata(w, cfg, split_kv_b)
    else:
        w.add_rope_dimension_count(head_dim)
    experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    if experts and arch != "deepseek2":
        w.add_expert_count(experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
    if getattr(cfg, "moe_intermediate_size", None) and arch != "deepseek2":
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if getattr(cfg, "shared_expert_intermediate_size", None):
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    if arch == "qwen3moe":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    scaling = cfg.rope_parameters
    if scaling.get("rope_type", "default") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(scaling["factor"])
    if tokenizer:
        add_tokenizer(w, **tokenizer)
    if extra_metadata is not None:
        extra_metadata(w)
    table = (DEEPSEEK_NAMES if arch == "deepseek2" else []) + LLAMA_NAMES + MOE_NAMES + PER_EXPERT_NAMES
    state = _split_experts({k: v.float().numpy() for k, v in model.state_dict().items()}, per_expert)
    if arch == "deepseek2" and split_kv_b:
        state = _split_kv_b(state, cfg)
    values = {}
    for name, x in state.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}
        n_head = next((h for k, h in heads.items() if f"self_attn.{k}." in name), None) if arch == "llama" else None
        if n_head is not None:
            x = permute(x, n_head)
        target = gguf_name(name, table)
        router = "ffn_gate_inp" in target  # llama.cpp keeps routers and norms in F32
        t = Q.F32 if x.ndim == 1 or router else (qtype(name, x.shape) if callable(qtype) else qtype)
        stored, value = encode(x, t, rng)
        w.add_tensor(target, stored, raw_dtype=None if t in (Q.F32, Q.F16) else t)
        values[name] = unpermute(value, n_head) if n_head is not None else value
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ref = type(model)(cfg).eval()
    reference = _join_experts(_join_kv_b(values, cfg) if arch == "deepseek2" else values, per_expert)
    ref.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in reference.items()}, strict=False)
    if cfg.tie_word_embeddings:
        ref.tie_weights()
    return ref


write_llama_gguf = write_gguf


def add_tokenizer(w: gguf.GGUFWriter, *, model: str, tokens: list[str], types: list[int] | None = None,
                  scores: list[float] | None = None, merges: list[str] | None = None, pre: str | None = None,
                  bos: int | None = None, eos: int | None = None, unk: int | None = None, pad: int | None = None,
                  add_bos: bool | None = None, chat_template: str | None = None) -> None:  # fmt: skip
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    if types is not None:
        w.add_token_types(types)
    if scores is not None:
        w.add_token_scores(scores)
    if merges is not None:
        w.add_token_merges(merges)
    for value, add in ((bos, w.add_bos_token_id), (eos, w.add_eos_token_id), (unk, w.add_unk_token_id),
                       (pad, w.add_pad_token_id)):  # fmt: skip
        if value is not None:
            add(value)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if chat_template is not None:
        w.add_chat_template(chat_template)


def copy_tokenizer_metadata(src: Path) -> dict:
    """The tokenizer keys of an existing GGUF (e.g. SmolLM2's) as ``add_tokenizer`` arguments."""
    reader = gguf.GGUFReader(str(src))

    def field(key):
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    return dict(model=field("tokenizer.ggml.model"), tokens=field("tokenizer.ggml.tokens"),
                types=field("tokenizer.ggml.token_type"), merges=field("tokenizer.ggml.merges"),
                pre=field("tokenizer.ggml.pre"), bos=field("tokenizer.ggml.bos_token_id"),
                eos=field("tokenizer.ggml.eos_token_id"), unk=field("tokenizer.ggml.unknown_token_id"),
                pad=field("tokenizer.ggml.padding_token_id"), add_bos=field("tokenizer.ggml.add_bos_token"),
                chat_template=field("tokenizer.chat_template"))  # fmt: skip
