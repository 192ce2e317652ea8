"""``tokenizer.model`` through `sentencepiece`, behaving like transformers 5's ``LlamaTokenizer``.

The model's own normalizer is replaced by none (rewritten in its protobuf bytes, so protobuf is not
needed); spaces become "▁"; one "▁" is prepended to the text (``legacy: true``: to every piece between
special tokens; ``add_prefix_space: false``: never) unless it starts with one; BOS/EOS follow
``add_bos_token``/``add_eos_token``; decoding strips that one leading space and joins ``<0xNN>`` byte
tokens, a run that is not valid UTF-8 becoming one U+FFFD per byte (tokenizers' ByteFallback).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import sentencepiece

from edge_llm.errors import TokenizerError

BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_text(value: Any) -> str | None:
    """A special token as written in the configs: a string or ``{"content": ..., ...}``."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _without_normalizer(proto: bytes) -> bytes:
    """The ModelProto with normalizer_spec (field 3) replaced by identity, no dummy prefix, no
    whitespace squeezing, and without self_test_data (field 4, which would no longer pass)."""
    out, pos = bytearray(), 0
    while pos < len(proto):
        start = pos
        key, pos = _varint(proto, pos)
        wire = key & 7
        if wire == 0:
            _, pos = _varint(proto, pos)
        elif wire == 2:
            size, pos = _varint(proto, pos)
            pos += size
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
        if key >> 3 not in (3, 4):
            out += proto[start:pos]
    # name="identity", add_dummy_prefix=false, remove_extra_whitespaces=false, escape_whitespaces=true
    spec = b"\x0a\x08identity\x18\x00\x20\x00\x28\x01"
    return bytes(out + b"\x1a" + bytes([len(spec)]) + spec)


class SentencePieceBackend:
    """tokenizer.model through `sentencepiece`, behaving like transformers 5's LlamaTokenizer."""

    def __init__(
        self,
        sp: sentencepiece.SentencePieceProcessor,
        named: Mapping[str, str],
        extra: list[str],
        config: Mapping[str, Any],
    ) -> None:
        self._sp = sp
        size = sp.get_piece_size()
        self._by_id: dict[int, str] = {}  # added tokens, some renaming a piece, some past the vocab
        self._added: dict[str, int] = {}
        self.special_ids: set[int] = set()
        declared = config.get("added_tokens_decoder")
        for key, spec in (declared if isinstance(declared, Mapping) else {}).items():
            if str(key).isdigit() and (content := token_text(spec)) is not None:
                self._add(content, int(key), bool(isinstance(spec, Mapping) and spec.get("special")))
        for content in [*named.values(), *extra]:
            token_id = self.token_to_id(content)
            self._add(content, token_id if token_id is not None else max([size - 1, *self._by_id]) + 1, True)
        self.vocab_size = max([size - 1, *self._by_id]) + 1
        self.id_limit = self.vocab_size  # ids run from 0 to the largest piece or added token
        self._split = re.compile("|".join(re.escape(t) for t in sorted(self._added, key=len, reverse=True)))
        self.byte_fallback_ids = frozenset(i for i in range(size) if sp.is_byte(i) and i not in self._by_id)
        self.cleanup_spaces = False  # a BPE model: transformers never cleans up
        prefix_space = config.get("add_prefix_space") is not False
        self._prepend = "never" if not prefix_space else "always" if config.get("legacy") is True else "first"
        self._strip_space = prefix_space
        bos, eos = named.get("bos_token"), named.get("eos_token")
        self._bos = [self._added[bos]] if bos is not None and config.get("add_bos_token") is True else []
        self._eos = [self._added[eos]] if eos is not None and config.get("add_eos_token") is True else []

    def _add(self, content: str, token_id: int, special: bool) -> None:
        self._added[content] = token_id
        self._by_id[token_id] = content
        if special:
            self.special_ids.add(token_id)

    def token_to_id(self, token: str) -> int | None:
        if token in self._added:
            return self._added[token]
        token_id = self._sp.piece_to_id(token)
        return token_id if self._sp.id_to_piece(token_id) == token else None

    def id_to_token(self, token_id: int) -> str | None:
        if token_id in self._by_id:
            return self._by_id[token_id]
        return self._sp.id_to_piece(token_id) if 0 <= token_id < self._sp.get_piece_size() else None

    def _encode_text(self, text: str, at_start: bool) -> list[int]:
        if not text:
            return []
        if (self._prepend == "always" or (self._prepend == "first" and at_start)) and text[0] not in " ▁":
            text = " " + text
        return self._sp.encode(text)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids, pos = [], 0
        for match in self._split.finditer(text) if self._added else ():
            ids += self._encode_text(text[pos : match.start()], pos == 0)
            ids.append(self._added[match.group()])
            pos = match.end()
        ids += self._encode_text(text[pos:], pos == 0)
        return self._bos + ids + self._eos if add_special_tokens else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        parts: list[str] = []
        run = bytearray()
        for token_id in ids:
            if skip_special_tokens and token_id in self.special_ids:
                continue
            token = self.id_to_token(token_id)
            if token is None:
                continue
            if (byte := BYTE_TOKEN.fullmatch(token)) is not None:
                run.append(int(byte[1], 16))
                continue
            if run:
                parts.append(_byte_run_text(run))
                run.clear()
            parts.append(token.replace("▁", " "))
        if run:
            parts.append(_byte_run_text(run))
        text = "".join(parts)
        return text[1:] if self._strip_space and text.startswith(" ") else text


def _byte_run_text(run: bytearray) -> str:
    # tokenizers' ByteFallback: a run of byte tokens is valid UTF-8 or becomes one U+FFFD per byte.
    try:
        return run.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(run)


def load_sentencepiece(path: Path) -> sentencepiece.SentencePieceProcessor:
    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(_without_normalizer(path.read_bytes()))
    except (OSError, RuntimeError, ValueError, IndexError) as error:
        raise TokenizerError(f"{path}: not a sentencepiece model ({error}); re-download it") from error
    return sp


def sentencepiece_defaults(
    sp: sentencepiece.SentencePieceProcessor,
    named: Mapping[str, str],
) -> dict[str, str]:
    """bos/eos/unk from the sentencepiece model when the configs do not name them (as transformers)."""
    out = dict(named)
    proto_ids = {"bos_token": sp.bos_id(), "eos_token": sp.eos_id(), "unk_token": sp.unk_id()}
    for attr, token_id in proto_ids.items():
        if attr not in out and token_id >= 0:
            out[attr] = sp.id_to_piece(token_id)
    return out
