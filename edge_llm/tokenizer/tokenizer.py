"""Tokenizers: a model folder's tokenizer files -> encode / decode / chat templates / streaming text.

Reference: transformers 5 ``AutoTokenizer.from_pretrained(folder)``; ids, text and rendered chats
match it (tests/test_tokenizer.py proves it on SmolLM2 and a trained sentencepiece model).

- ``tokenizer.json`` is run by the `tokenizers` library. Its post-processor alone decides whether
  BOS/EOS are added: transformers 5 ignores ``add_bos_token``/``add_eos_token`` when tokenizer.json
  exists, so do we (no double BOS).
- ``tokenizer.model`` alone is run by `sentencepiece`, read the way transformers 5 reads a
  ``LlamaTokenizer``: the model's own normalizer is replaced by none; spaces become "▁"; one "▁" is
  prepended to the text (``legacy: true``: to every piece between special tokens; ``add_prefix_space:
  false``: never) unless it starts with one; BOS/EOS follow ``add_bos_token``/``add_eos_token``
  (default: not added, as in transformers 5); decoding strips that one leading space and joins
  ``<0xNN>`` byte tokens, a run that is not valid UTF-8 becoming one U+FFFD per byte.
- Special tokens come from tokenizer_config.json, then special_tokens_map.json; EOS ids are the union
  of tokenizer_config.json, generation_config.json and config.json, in that order.
- Chat templates: chat_template.jinja and additional_chat_templates/*.jinja win over
  tokenizer_config.json's ``chat_template`` (a string or a list of ``{name, template}``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tokenizers import AddedToken
from tokenizers import Tokenizer as _RustTokenizer

from edge_llm.errors import TokenizerError
from edge_llm.formats.gguf.reader import GGUFFile, read_gguf
from edge_llm.formats.gguf.tokenizer import build_gguf_tokenizer
from edge_llm.tokenizer.chat_template import DEFAULT_CHAT_TEMPLATE, read_chat_templates, render_chat_template
from edge_llm.tokenizer.detokenizer import StreamingDetokenizer
from edge_llm.tokenizer.sentencepiece_backend import (
    BYTE_TOKEN,
    SentencePieceBackend,
    load_sentencepiece,
    sentencepiece_defaults,
    token_text,
)

__all__ = [
    "DEFAULT_CHAT_TEMPLATE", "StreamingDetokenizer", "Tokenizer", "TokenizerInfo", "describe_tokenizer",
]  # fmt: skip

_SPECIAL_ATTRS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
            (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))  # fmt: skip


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TokenizerError(f"{path}: not readable JSON ({error}); re-download or fix it") from error
    except RecursionError:
        raise TokenizerError(f"{path}: not readable JSON (nested too deep); re-download or fix it") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, found {type(data).__name__}; repair the file")
    return data


def _int_list(value: Any) -> list[int]:
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


def _unique(values: Iterable[int]) -> list[int]:
    return list(dict.fromkeys(values))


class _Backend(Protocol):
    vocab_size: int
    id_limit: int  # one past the largest id encode() can return
    special_ids: set[int]
    byte_fallback_ids: frozenset[int]
    cleanup_spaces: bool

    def encode(self, text: str, add_special_tokens: bool) -> list[int]: ...
    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str: ...
    def token_to_id(self, token: str) -> int | None: ...
    def id_to_token(self, token_id: int) -> str | None: ...


class _TokenizersBackend:
    """tokenizer.json through the `tokenizers` library."""

    def __init__(self, path: Path | _RustTokenizer, specials: list[str], config: Mapping[str, Any]) -> None:
        if isinstance(path, _RustTokenizer):  # built in memory (a GGUF file's tokenizer)
            tok = path
        else:
            try:
                tok = _RustTokenizer.from_file(str(path))
            except Exception as error:  # tokenizers raises a plain Exception for every parse problem
                raise TokenizerError(
                    f"{path}: the tokenizers library cannot read it ({error}); re-download it"
                ) from error
        tok.no_truncation()
        tok.no_padding()
        # transformers registers every named special token as a special added token.
        present = {t.content: t for t in tok.get_added_tokens_decoder().values()}
        missing = [
            AddedToken(t, special=True, normalized=False)
            if t not in present
            else AddedToken(t, single_word=present[t].single_word, lstrip=present[t].lstrip,
                            rstrip=present[t].rstrip, normalized=present[t].normalized, special=True)
            for t in specials
            if t not in present or not present[t].special
        ]  # fmt: skip
        if missing:
            tok.add_special_tokens(missing)
        self._tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.id_limit = max(tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        self.special_ids = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        byte_fallback = tok.decoder is not None and "ByteFallback" in repr(tok.decoder)
        vocab = tok.get_vocab(with_added_tokens=False) if byte_fallback else {}
        self.byte_fallback_ids = frozenset(i for t, i in vocab.items() if BYTE_TOKEN.fullmatch(t))
        # transformers skips the cleanup for BPE models: it would eat real spaces before punctuation.
        is_bpe = type(tok.model).__name__ == "BPE"
        self.cleanup_spaces = bool(config.get("clean_up_tokenization_spaces")) and not is_bpe

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        text = self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        if self.cleanup_spaces:
            for old, new in _CLEANUP:
                text = text.replace(old, new)
        return text

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)


class Tokenizer:
    """A model's tokenizer: ``Tokenizer.from_folder(path)``, then encode/decode/chat/stream."""

    def __init__(
        self,
        backend: _Backend,
        *,
        source: str,
        special_tokens: Mapping[str, str],
        bos_token_id: int | None,
        eos_token_ids: Sequence[int],
        pad_token_id: int | None,
        chat_templates: Mapping[str, str],
    ) -> None:
        self._backend = backend
        self.source = source
        self.special_tokens = dict(special_tokens)  # bos_token, eos_token, ...: what templates see
        self.chat_templates = dict(chat_templates)  # name -> template; "default" is the model's
        self._bos_token_id = bos_token_id
        self._eos_token_ids = list(eos_token_ids)
        self._pad_token_id = pad_token_id

    @classmethod
    def from_folder(cls, path: str | Path) -> Tokenizer:
        """Load the tokenizer files of a model folder; raises TokenizerError if they are missing or bad."""
        folder = Path(path)
        if not folder.is_dir():
            raise TokenizerError(f"{folder}: not a folder; pass the model folder that holds tokenizer.json")
        config = _read_json(folder / "tokenizer_config.json")
        token_map = _read_json(folder / "special_tokens_map.json")
        named = {}
        for attr in _SPECIAL_ATTRS:
            text = token_text(config.get(attr))
            text = text if text is not None or attr in config else token_text(token_map.get(attr))
            if text is not None:
                named[attr] = text
        extra_values = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        if isinstance(extra_values, Mapping):
            extra_values = list(extra_values.values())
        if not isinstance(extra_values, list):  # transformers would fail on it; nothing special is named
            extra_values = []
        extra = [t for t in map(token_text, extra_values) if t is not None]

        if (folder / "tokenizer.json").is_file():
            backend: _Backend = _TokenizersBackend(
                folder / "tokenizer.json", list(dict.fromkeys([*named.values(), *extra])), config
            )
        elif (folder / "tokenizer.model").is_file():
            sp = load_sentencepiece(folder / "tokenizer.model")
            named = sentencepiece_defaults(sp, named)
            backend = SentencePieceBackend(sp, named, extra, config)
        else:
            raise TokenizerError(
                f"{folder}: no tokenizer.json or tokenizer.model; put the model's tokenizer files in it"
            )

        generation = _read_json(folder / "generation_config.json")
        model_config = _read_json(folder / "config.json")

        def token_id(attr: str) -> list[int]:
            found = backend.token_to_id(named[attr]) if attr in named else None
            return [] if found is None else [found]

        def first(*candidates: list[int]) -> int | None:
            return next((c[0] for c in candidates if c), None)

        eos_ids = _unique(
            [*token_id("eos_token"), *_int_list(generation.get("eos_token_id")),
             *_int_list(model_config.get("eos_token_id"))]
        )  # fmt: skip
        return cls(
            backend,
            source=str(folder),
            special_tokens=named,
            bos_token_id=first(token_id("bos_token"), _int_list(generation.get("bos_token_id")),
                               _int_list(model_config.get("bos_token_id"))),  # fmt: skip
            eos_token_ids=eos_ids,
            pad_token_id=first(token_id("pad_token"), _int_list(generation.get("pad_token_id"))),
            chat_templates=read_chat_templates(folder, config),
        )

    @classmethod
    def from_gguf(cls, path: str | Path | GGUFFile) -> Tokenizer:
        """The tokenizer a GGUF file describes in its metadata (edge_llm/formats/gguf/tokenizer.py)."""
        gguf = path if isinstance(path, GGUFFile) else read_gguf(path)
        rust, facts = build_gguf_tokenizer(gguf)
        named = facts["special_tokens"]
        return cls(
            _TokenizersBackend(rust, list(dict.fromkeys(named.values())), {}),
            source=str(gguf.path),
            special_tokens=named,
            bos_token_id=facts["bos_token_id"],
            eos_token_ids=facts["eos_token_ids"],
            pad_token_id=facts["pad_token_id"],
            chat_templates=facts["chat_templates"],
        )

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """A model folder's tokenizer files, or a GGUF file's embedded tokenizer."""
        return cls.from_gguf(path) if Path(path).is_file() else cls.from_folder(path)

    # -- facts ---------------------------------------------------------------------------------
    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends a reply: tokenizer_config, generation_config, config.json (that order)."""
        return list(self._eos_token_ids)

    @property
    def pad_token_id(self) -> int | None:
        return self._pad_token_id

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows, added tokens included (transformers' ``len(tokenizer)``)."""
        return self._backend.vocab_size

    @property
    def id_limit(self) -> int:
        """One past the largest id ``encode`` can return: the embedding needs at least this many rows."""
        return self._backend.id_limit

    @property
    def special_token_ids(self) -> set[int]:
        """Ids that ``decode(..., skip_special_tokens=True)`` drops."""
        return set(self._backend.special_ids)

    @property
    def chat_template(self) -> str | None:
        """The model's default chat template, or None when it ships none."""
        return self.chat_templates.get("default")

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    # -- text ----------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids for ``text``, equal to transformers' ``tokenizer(text)["input_ids"]``."""
        return self._backend.encode(text, add_special_tokens)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text for ``ids``, equal to transformers' ``tokenizer.decode(ids)``."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens)

    def detokenizer(self, skip_special_tokens: bool = False) -> StreamingDetokenizer:
        """A fresh streaming detokenizer; its pieces join to ``decode(ids, skip_special_tokens)``."""
        backend = self._backend
        return StreamingDetokenizer(
            lambda ids: backend.decode(ids, skip_special_tokens),
            byte_fallback_ids=backend.byte_fallback_ids,
            skipped_ids=frozenset(backend.special_ids) if skip_special_tokens else frozenset(),
            cleanup_spaces=backend.cleanup_spaces,
        )

    # -- chat ----------------------------------------------------------------------------------
    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """The conversation as the model's template renders it (transformers' ``tokenize=False``).

        With no template in the folder, ``DEFAULT_CHAT_TEMPLATE`` renders "System: ...\\nUser: ...\\n"
        and a final "Assistant:" when ``add_generation_prompt``. ``chat_template=`` picks a named
        template or passes a template string; other keyword arguments reach the template.
        """
        template = self._pick_template(kwargs.pop("chat_template", None), tools)
        variables = {**self.special_tokens, **kwargs}
        return render_chat_template(
            template, messages, add_generation_prompt=add_generation_prompt, tools=tools,
            source=self.source, **variables,
        )  # fmt: skip

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> list[int]:
        """Ids of the rendered chat; no special tokens are added (the template writes its own BOS)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs), False)

    def _pick_template(self, chosen: str | None, tools: object) -> str:
        if chosen is not None:
            return self.chat_templates.get(chosen, chosen)
        if tools is not None and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        if "default" in self.chat_templates:
            return self.chat_templates["default"]
        if self.chat_templates:
            raise TokenizerError(
                f"{self.source}: several chat templates and none is the default; "
                f"pass chat_template= one of {sorted(self.chat_templates)}"
            )
        return DEFAULT_CHAT_TEMPLATE

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, eos_token_ids={self.eos_token_ids})"


@dataclass(frozen=True)
class TokenizerInfo:
    """What ``edge-llm info`` shows about a folder's tokenizer."""

    kind: str | None  # "tokenizer.json", "tokenizer.model", or None when the folder has neither
    vocab_size: int | None
    chat_template: str | None  # template names, e.g. "default" or "default, tool_use"; None: fallback


def describe_tokenizer(path: str | Path) -> TokenizerInfo:
    """Facts about the tokenizer in a model folder; raises TokenizerError only for broken files."""
    folder = Path(path)
    if folder.is_file():  # a GGUF file carries its tokenizer in its metadata
        gguf = read_gguf(folder)
        if not gguf.get("tokenizer.ggml.tokens"):  # weights only: say so, as for a folder without one
            return TokenizerInfo(None, None, None)
        tok = Tokenizer.from_gguf(gguf)
        kind = gguf.get("tokenizer.ggml.model")
        kind = {"gpt2": "GGUF byte-level BPE", "llama": "GGUF sentencepiece"}.get(kind, f"GGUF {kind}")
        return TokenizerInfo(kind, tok.vocab_size, ", ".join(tok.chat_templates) or None)
    kind = next((name for name in ("tokenizer.json", "tokenizer.model") if (folder / name).is_file()), None)
    if kind is None:
        return TokenizerInfo(None, None, None)
    tok = Tokenizer.from_folder(folder)
    return TokenizerInfo(kind, tok.vocab_size, ", ".join(tok.chat_templates) or None)
