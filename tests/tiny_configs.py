"""One tiny transformers config per supported model_type, for tests that cover every architecture.

Each entry is the keyword arguments of ``tests.hf_oracle.build_tiny_checkpoint`` (model_type
included). vocab_size covers the tiny tokenizer so ``with_tokenizer=True`` works. Architecture tests
keep their own, richer variants; this table is the one representative per architecture that
cross-cutting tests (quantize, run, estimate) iterate over. Add your architecture here.
"""

from __future__ import annotations

TINY_BASE = dict(
    vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
)

TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(TINY_BASE, model_type="llama"),
    "mistral": dict(TINY_BASE, model_type="mistral"),
    "mixtral": dict(TINY_BASE, model_type="mixtral", num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(TINY_BASE, model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=64, shared_expert_intermediate_size=128),
    "qwen3_moe": dict(TINY_BASE, model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=64, norm_topk_prob=True),
    "olmoe": dict(TINY_BASE, model_type="olmoe", num_experts=4, num_experts_per_tok=2),
    # MLA needs as many kv heads as heads (transformers repeats keys by heads // kv_heads)
    "deepseek_v2": dict(TINY_BASE, model_type="deepseek_v2", num_key_value_heads=4, moe_intermediate_size=64,
                        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                        kv_lora_rank=64, q_lora_rank=None, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32),
    "deepseek_v3": dict(TINY_BASE, model_type="deepseek_v3", num_key_value_heads=4, moe_intermediate_size=64,
                        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                        n_group=2, topk_group=1, kv_lora_rank=64, q_lora_rank=64, qk_nope_head_dim=32,
                        qk_rope_head_dim=16, v_head_dim=32),
}
