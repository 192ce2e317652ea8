"""The text calibration runs on: the built-in sample or the user's file, read once and checked, then tokenized.

The built-in text (``data/calibration.txt``, about 5 KB) is public-domain prose, none of it from the text
``quant.quality`` evaluates on: the openings of Melville's *Moby-Dick* (1851), Carroll's *Alice's Adventures
in Wonderland* (1865) and Doyle's *A Scandal in Bohemia* (1891), Lincoln's Gettysburg Address (1863), a
sentence of the Declaration of Independence (1776) and the first verses of Genesis (King James Version),
plus a few plain facts, questions with answers and lines of Python written for this project and given to
the public domain, so that everyday questions and code are among what the calibration sees. Lines
``Question: ...`` followed by ``Answer: ...`` (in any text) are also fed as chat turns through the model's chat
template: an instruct model answers after the template's tokens, whose activations prose alone never shows.

A user's file is read as UTF-8 text; a missing, unreadable, empty, binary or too short file is refused in
one line before anything is converted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from edge_llm.errors import TokenizerError
from edge_llm.tokenizer import Tokenizer

from ..destination import QuantizeError

BUILTIN = Path(__file__).parent / "data" / "calibration.txt"
BUILTIN_NAME = "built-in"
MAX_FILE_BYTES = 1 << 20  # read at most this much of a user's file: calibration uses MAX_TOKENS anyway
MAX_TOKENS = 4096
MIN_TOKENS = 64
SEQUENCE_LENGTH = 512  # tokens per sequence the model reads (causal attention within each)
QA_PAIR = re.compile(r"^Question: (.+)\nAnswer: (.+)$", re.M)


@dataclass(frozen=True)
class CalibrationText:
    name: str  # "built-in" or the user's path
    text: str


def read_text(path: str | Path | None) -> CalibrationText:
    """The built-in text for ``None``, else the user's file, checked; QuantizeError says what is wrong in one line."""
    if path is None:
        return CalibrationText(BUILTIN_NAME, BUILTIN.read_text(encoding="utf-8"))
    where = f"calibration text {path}"
    try:
        with open(Path(path).expanduser(), "rb") as f:
            raw = f.read(MAX_FILE_BYTES)
    except FileNotFoundError:
        raise QuantizeError(f"{where}: no such file; pass a UTF-8 text file, or --calibrate alone for "
                            "the built-in text") from None
    except IsADirectoryError:
        raise QuantizeError(f"{where}: is a folder; pass a UTF-8 text file") from None
    except OSError as e:
        raise QuantizeError(f"{where}: cannot be read ({e.strerror or e})") from None
    if b"\x00" in raw:
        raise QuantizeError(f"{where}: is binary, not text; pass a UTF-8 text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if len(raw) < MAX_FILE_BYTES or e.start < len(raw) - 4:  # not just a character cut by the read limit
            raise QuantizeError(f"{where}: is not UTF-8 text (byte {e.start}); pass a UTF-8 text file") from None
        text = raw[: e.start].decode("utf-8")
    if not text.strip():
        raise QuantizeError(f"{where}: is empty; pass a file with some prose or code (a few KB)")
    return CalibrationText(str(path), text)


def _chat_tokens(text: str, tokenizer: Tokenizer) -> list[int]:
    """The text's ``Question: ...`` / ``Answer: ...`` pairs as chat turns through the model's chat template (none
    without one): an instruct model answers after the template's own tokens, whose activations prose lacks."""
    if tokenizer.chat_template is None:
        return []
    tokens: list[int] = []
    for question, answer in QA_PAIR.findall(text):
        messages = [{"role": "user", "content": question.strip()}, {"role": "assistant", "content": answer.strip()}]
        try:
            tokens += tokenizer.encode_chat(messages, add_generation_prompt=False)
        except (TokenizerError, ValueError):  # a template that cannot render these turns: prose only
            return []
    return tokens


def calibration_tokens(text: CalibrationText, tokenizer: Tokenizer) -> list[mx.array]:
    """The text's tokens, then its question/answer pairs as chat turns, as sequences of up to ``SEQUENCE_LENGTH``
    (each ``[1, L]``, at most ``MAX_TOKENS`` in all); QuantizeError when the text is too short to calibrate on."""
    prose = tokenizer.encode(text.text)
    if len(prose) < MIN_TOKENS:
        raise QuantizeError(f"calibration text {text.name}: only {len(prose)} tokens; calibration needs at least "
                            f"{MIN_TOKENS} (a few KB of text)")
    chat = _chat_tokens(text.text, tokenizer)[:SEQUENCE_LENGTH]
    prose = prose[: MAX_TOKENS - len(chat)]
    sequences = [prose[i : i + SEQUENCE_LENGTH] for i in range(0, len(prose), SEQUENCE_LENGTH)]
    return [mx.array(s)[None] for s in sequences + ([chat] if chat else [])]
