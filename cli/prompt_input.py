"""The one-shot prompt of ``edge-llm run``: ``--prompt``, piped stdin, or both (as ollama does).

Piped text is read up to a bound (``run < /dev/zero`` must not eat the machine's memory) and must be
text: UTF-8 without NUL bytes. The tokenizer sees only what passed these checks.
"""

from __future__ import annotations

from typing import BinaryIO

MAX_STDIN_BYTES = 8 * 1024 * 1024  # far beyond any context window; a bound, not a working size


def _text(data: bytes, where: str) -> str:
    if b"\0" in data:
        raise ValueError(f"{where} holds binary data (a NUL byte at offset {data.index(0)}); pipe text, not a file "
                         "like an image or an archive")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where} is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); "
                         "convert it first, e.g. with iconv -t utf-8") from None


def check_prompt_text(prompt: str) -> str:
    """``--prompt`` as given: the shell may pass bytes that are not UTF-8 (they arrive as surrogates)."""
    try:
        data = prompt.encode("utf-8")
    except UnicodeEncodeError:
        data = prompt.encode("utf-8", "surrogateescape")
    return _text(data, "--prompt")


def read_stdin(stream: BinaryIO) -> str:
    """All of piped stdin as text; ValueError past ``MAX_STDIN_BYTES`` or for binary data."""
    data = stream.read(MAX_STDIN_BYTES + 1)
    if len(data) > MAX_STDIN_BYTES:
        raise ValueError(f"stdin holds more than {MAX_STDIN_BYTES // 2**20} MiB; pipe less text "
                         "(a model's context holds far less anyway)")
    return _text(data, "stdin")


def one_shot_prompt(prompt: str | None, stdin: BinaryIO | None) -> str:
    """The prompt of a one-shot run: ``--prompt``, then a blank line and the piped text when both are given."""
    parts = [check_prompt_text(prompt).strip()] if prompt is not None else []
    if stdin is not None:
        parts.append(read_stdin(stdin).strip())
    text = "\n\n".join(p for p in parts if p)
    if not text:
        raise ValueError("no prompt: --prompt was empty and nothing was piped; pass --prompt TEXT or pipe a question")
    return text
