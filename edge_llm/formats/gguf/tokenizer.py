"""A GGUF file's tokenizer, rebuilt from its metadata with the `tokenizers` library.

References: transformers ``integrations/gguf/gguf_tokenizer_mapping.py`` (how ``AutoTokenizer(...,
gguf_file=...)`` rebuilds these tokenizers: our oracle, tests/test_gguf_tokenizer.py) and llama.cpp
``src/llama-vocab.cpp`` (token types, special ids, pre-tokenizer names).

- ``tokenizer.ggml.model = "gpt2"``: byte-level BPE from ``tokens`` + ``merges``; text is split by the
  regex that ``tokenizer.ggml.pre`` names (GPT-2's when it names none we know, with a warning unless
  it is one of the names whose split GPT-2's regex gives exactly).
- ``"llama"``: SentencePiece BPE with byte fallback, merges from the file or, as llama.cpp writes none,
  derived from the token scores (highest score merges first); "▁" for spaces, one prepended to the text.
- Tokens typed CONTROL (3) become special tokens, USER_DEFINED (4) plain added tokens, so both stay
  whole; BOS/EOS follow ``add_bos_token``/``add_eos_token`` (SentencePiece default: BOS added, as
  llama.cpp and transformers do); EOS ids also include llama.cpp's end-of-turn/end-of-message ids.
- Chat templates: ``tokenizer.chat_template`` is the default, ``tokenizer.chat_template.NAME`` others.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as RustTokenizer

from ...errors import EdgeLLMError, TokenizerError
from .reader import GGUFFile

log = logging.getLogger(__name__)

CONTROL, USER_DEFINED = 3, 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> split regex (the names llama.cpp's converter writes; same table as transformers)
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}  # fmt: skip
# Names whose llama.cpp split GPT-2's regex reproduces. ("smollm" splits digits one by one first; its
# vocabulary has no token with a digit next to another character, so the ids are the same.)
GPT2_SPLIT_NAMES = {"default", "gpt2", "gpt-2", "starcoder", "smollm", "refact"}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (openai/gpt-2 encoder.py)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece BPE merges implied by the vocabulary: every split of a token into two tokens,
    best token score first (transformers' ``generate_merges``, so ties break the same way)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for merge, score in dict(zip(tokens, scores, strict=True)).items():
        local = [(merge[:i], merge[i:], score) for i in range(1, len(merge))
                 if merge[:i] in vocab and merge[i:] in vocab]  # fmt: skip
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _merges(g: GGUFFile) -> list[tuple[str, str]] | None:
    """``tokenizer.ggml.merges``: "left right" pairs, each piece a token (the BPE model checks that)."""
    merges = g.typed_list("tokenizer.ggml.merges", str, "strings")
    if merges is None:
        return None
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    bad = next((i for i, p in enumerate(pairs) if len(p) != 2 or not all(p)), None)
    if bad is not None:
        raise TokenizerError(f"{g.path}: GGUF metadata tokenizer.ggml.merges[{bad}] is {merges[bad][:40]!r}, "
                             "expected two tokens separated by a space; re-convert the file")  # fmt: skip
    return pairs


@contextmanager
def tokenizers_errors(source: object, what: str) -> Iterator[None]:
    """What the `tokenizers` library refuses (a merge of unknown tokens, a special token missing from the
    vocabulary) becomes one TokenizerError line; it raises plain Exceptions, and Rust panics as pyo3's
    PanicException, which is a BaseException."""
    try:
        yield
    except EdgeLLMError:
        raise
    except BaseException as e:
        if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
            raise  # KeyboardInterrupt, SystemExit
        message = " ".join(str(e).split())[:200]
        raise TokenizerError(f"{source}: {what}: {message}; re-download or re-convert it") from None


def _bpe(g: GGUFFile, **kwargs: Any) -> RustTokenizer:
    with tokenizers_errors(g.path, "GGUF metadata tokenizer.ggml.tokens/merges"):
        return RustTokenizer(models.BPE(**kwargs))


def _byte_level(g: GGUFFile, tokens: list[str]) -> RustTokenizer:
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # A token written with characters outside the byte alphabet is respelled from its UTF-8 bytes.
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i for i, t in enumerate(tokens)
    }
    tok = _bpe(g, vocab=vocab, merges=_merges(g) or [], dropout=None, continuing_subword_prefix="",
               end_of_word_suffix="", fuse_unk=False)  # fmt: skip
    pre = g.typed("tokenizer.ggml.pre", str, "a string")
    split = PRE_TOKENIZER_SPLITS.get(pre)
    if split is not None:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])  # fmt: skip
    else:
        if pre not in GPT2_SPLIT_NAMES and pre is not None:
            log.warning("%s: pre-tokenizer %r is unknown; splitting text as GPT-2 does", g.path.name, pre[:40])
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece(g: GGUFFile, tokens: list[str]) -> RustTokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _merges(g)
    if not merges:
        scores = g.typed_list("tokenizer.ggml.scores", (int, float), "numbers")
        if scores is None or len(scores) != len(tokens):
            raise TokenizerError(f"{g.path}: a sentencepiece vocabulary needs tokenizer.ggml.scores; re-convert it")
        merges = _merges_from_scores(tokens, scores)
    tok = _bpe(g, vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None)
    # llama.cpp prepends "▁" to the text unless add_space_prefix is false; only to the first piece
    # between special tokens (transformers' non-legacy LlamaTokenizer does the same).
    prefix = g.typed("tokenizer.ggml.add_space_prefix", bool, "true or false", True)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if prefix else "never",
                                                 split=False)  # fmt: skip
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence([*steps, decoders.Strip(content=" ", left=1)] if prefix else steps)
    return tok


def _add_typed_tokens(tok: RustTokenizer, tokens: list[str], types: list[int], byte_level: bool) -> None:
    """CONTROL tokens as special added tokens, USER_DEFINED ones as plain added tokens (kept whole)."""
    alphabet = set(_bytes_to_unicode().values()) if byte_level else None
    # A byte-level "control" token spelled outside the byte alphabet is a llama.cpp mislabel; adding
    # it would grow the vocabulary past the model's, so it is skipped (as transformers does).
    control = [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types, strict=False)
               if ty == CONTROL and (alphabet is None or set(t) <= alphabet)]  # fmt: skip
    if control:
        tok.add_special_tokens(control)
    vocab = tok.get_vocab()
    user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types, strict=False)
            if ty == USER_DEFINED and t in vocab]  # fmt: skip
    if user:
        tok.add_tokens(user)


def _post_processor(tok: RustTokenizer, bos: str | None, eos: str | None, add_bos: bool, add_eos: bool) -> None:
    """BOS/EOS around every encoded text, as the file's flags say (transformers' ``update_post_processor``)."""
    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
    head, tail = ([f"{bos}:0"] if add_bos else []), ([f"{eos}:0"] if add_eos else [])
    single = [*head, "$A:0", *tail]
    pair = [*single, *(f"{t[:-2]}:1" for t in head), "$B:1", *(f"{t[:-2]}:1" for t in tail)]
    specials = [(t, tok.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    tok.post_processor = processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair),
                                                       special_tokens=specials)  # fmt: skip


def build_gguf_tokenizer(g: GGUFFile) -> tuple[RustTokenizer, dict[str, Any]]:
    """The `tokenizers` object and the facts the ``Tokenizer`` class needs (special tokens, eos ids,
    chat templates) from a GGUF file's metadata; TokenizerError when the file describes none we build."""
    kind = g.typed("tokenizer.ggml.model", str, "a string")
    tokens = g.typed_list("tokenizer.ggml.tokens", str, "strings")
    if kind is None or not tokens:
        raise TokenizerError(f"{g.path}: the GGUF file holds no tokenizer (tokenizer.ggml.tokens)")
    g.typed_list("tokenizer.ggml.scores", (int, float), "numbers")  # read by llama.cpp for every model
    if kind == "gpt2":
        tok = _byte_level(g, tokens)
    elif kind == "llama":
        tok = _sentencepiece(g, tokens)
    else:
        raise TokenizerError(f"{g.path}: GGUF tokenizer model {kind[:40]!r} is not supported (gpt2 and llama are)")
    types = g.typed_list("tokenizer.ggml.token_type", int, "integers") or []
    with tokenizers_errors(g.path, "GGUF metadata tokenizer.ggml.token_type"):
        _add_typed_tokens(tok, tokens, types, byte_level=kind == "gpt2")

    ids = {key: g.typed(f"tokenizer.ggml.{key}", int, "a token id")
           for key in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id", "eot_token_id",
                       "eom_token_id")}  # fmt: skip

    def token(key: str) -> str | None:  # llama.cpp ignores ids outside the vocabulary, so do we
        i = ids[key]
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    named = {attr: token(key) for attr, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
             ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id"))}  # fmt: skip
    named = {k: v for k, v in named.items() if v is not None}
    add_bos = g.typed("tokenizer.ggml.add_bos_token", bool, "true or false", kind == "llama")
    add_eos = g.typed("tokenizer.ggml.add_eos_token", bool, "true or false", False)
    with tokenizers_errors(g.path, "GGUF metadata tokenizer.ggml.bos_token_id/eos_token_id"):
        _post_processor(tok, named.get("bos_token"), named.get("eos_token"), add_bos, add_eos)

    eos_ids = [ids[key] for key in ("eos_token_id", "eot_token_id", "eom_token_id")]
    prefix = "tokenizer.chat_template"
    templates = {k[len(prefix) + 1 :] or "default": g.typed(k, str, "a string (a Jinja template)")
                 for k in g.metadata if k == prefix or k.startswith(prefix + ".")}  # fmt: skip
    facts = {
        "special_tokens": named,
        "eos_token_ids": list(dict.fromkeys(i for i in eos_ids if i is not None)),
        "bos_token_id": ids["bos_token_id"] if "bos_token" in named else None,
        "pad_token_id": ids["padding_token_id"],
        "chat_templates": {k: v for k, v in templates.items() if v},
        "kind": kind,
    }
    return tok, facts


def write_tokenizer_files(g: GGUFFile, folder: Path) -> list[str]:
    """The GGUF's tokenizer as Hugging Face files in ``folder`` (what a converted checkpoint needs):
    tokenizer.json (BOS/EOS in its post-processor), tokenizer_config.json (special tokens),
    chat_template.jinja (+ additional_chat_templates/NAME.jinja), generation_config.json (eos ids).
    ``Tokenizer.from_folder`` and transformers read them back into the same tokenizer."""
    tok, facts = build_gguf_tokenizer(g)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config: dict[str, Any] = {**facts["special_tokens"], "clean_up_tokenization_spaces": False,
                              "tokenizer_class": "PreTrainedTokenizerFast"}  # fmt: skip
    context = g.arch_key("context_length")
    if isinstance(context, int):
        config["model_max_length"] = context
    written = ["tokenizer.json", "tokenizer_config.json"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    templates = dict(facts["chat_templates"])
    if "default" in templates:
        (folder / "chat_template.jinja").write_text(templates.pop("default"), encoding="utf-8")
        written.append("chat_template.jinja")
    for name, template in templates.items():
        (folder / "additional_chat_templates").mkdir(exist_ok=True)
        (folder / "additional_chat_templates" / f"{name}.jinja").write_text(template, encoding="utf-8")
        written.append(f"additional_chat_templates/{name}.jinja")
    generation = {k: v for k, v in (("bos_token_id", facts["bos_token_id"]), ("eos_token_id", facts["eos_token_ids"]),
                                    ("pad_token_id", facts["pad_token_id"])) if v not in (None, [])}  # fmt: skip
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    written.append("generation_config.json")
    return written
