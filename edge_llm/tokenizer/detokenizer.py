"""Streaming detokenizer: token ids in, text pieces out, never a broken character.

The offset approach (as in text-generation-inference and mlx-lm's NaiveStreamingDetokenizer, written
afresh here): decode a short window of recent tokens twice, once without and once with the new token,
and emit the difference. The window starts at the last point where the text was known to be stable, so
each step decodes a few tokens, not the whole sequence.

The text is held back (``add`` returns "") while it may still change:

- it ends in U+FFFD: a byte-level BPE token ended mid-character;
- the last token is a byte-fallback token (``<0xE4>``): `tokenizers`' ByteFallback decoder turns a
  whole run of byte tokens into U+FFFD, one per byte, if any part of the run is invalid, so a run is
  only final once a non-byte token closes it (a special token that decoding skips does not);
- ``cleanup_spaces`` is on and the text ends in the start of a pattern that transformers'
  ``clean_up_tokenization`` rewrites (" ." -> ".").

Decoders that strip one leading space of the decoded text (sentencepiece's "▁" prefix) strip it from
both decodes of the window, so the difference is unaffected; for that a window never starts with
tokens that decode to nothing. The pieces joined equal ``decode(ids)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

# Prefixes of the patterns transformers' clean_up_tokenization rewrites (" .", " n't", " 's", ...).
_CLEANUP_PATTERNS = (" .", " ?", " !", " ,", " ' ", " n't", " 'm", " 's", " 've", " 're")
_CLEANUP_PREFIXES = tuple(sorted({p[:i] for p in _CLEANUP_PATTERNS for i in range(1, len(p))}, key=len))


class StreamingDetokenizer:
    """Turns a stream of token ids into text pieces whose concatenation is ``decode(all ids)``.

    ``decode`` decodes a list of ids; ``byte_fallback_ids`` are the ids of ``<0xNN>`` tokens when the
    tokenizer's decoder uses byte fallback; ``skipped_ids`` are ids that ``decode`` drops;
    ``cleanup_spaces`` mirrors transformers' ``clean_up_tokenization_spaces``. Use
    ``Tokenizer.detokenizer()`` rather than building one.
    """

    def __init__(
        self,
        decode: Callable[[Sequence[int]], str],
        *,
        byte_fallback_ids: frozenset[int] = frozenset(),
        skipped_ids: frozenset[int] = frozenset(),
        cleanup_spaces: bool = False,
    ) -> None:
        self._decode = decode
        self._byte_ids = byte_fallback_ids
        self._skipped_ids = skipped_ids
        self._cleanup = cleanup_spaces
        self.reset()

    def reset(self) -> None:
        """Forget all tokens and text, ready for a new sequence."""
        self._tokens: list[int] = []
        self._start = 0  # window start: text before it is final and emitted
        self._read = 0  # tokens before it have been emitted
        self._window_text = ""  # decode(tokens[start:read])
        self._pieces: list[str] = []
        self._in_byte_run = False

    @property
    def tokens(self) -> list[int]:
        """All token ids added so far."""
        return list(self._tokens)

    @property
    def text(self) -> str:
        """All text emitted so far (held-back text appears after the next piece or ``finalize``)."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def add(self, token_id: int) -> str:
        """Add one token; return the text it completes (often one word piece, sometimes "")."""
        token_id = int(token_id)  # numpy / mlx scalars too
        self._tokens.append(token_id)
        if token_id in self._byte_ids:
            self._in_byte_run = True
        elif token_id not in self._skipped_ids:
            self._in_byte_run = False
        if self._in_byte_run:
            return ""
        text = self._decode(self._tokens[self._start :])
        if text.endswith("\ufffd") or (self._cleanup and text.endswith(_CLEANUP_PREFIXES)):
            return ""
        if not text.startswith(self._window_text):
            # The decoder rewrote earlier text; wait for more context rather than emit a wrong piece.
            return ""
        return self._commit(text)

    def finalize(self) -> str:
        """Flush whatever is held back; call once the sequence has ended."""
        if self._read == len(self._tokens):
            return ""
        return self._commit(self._decode(self._tokens[self._start :]))

    def _commit(self, text: str) -> str:
        piece = text[len(self._window_text) :]
        # The next window starts at the tokens just emitted, unless they decode to nothing: a window
        # whose first text is new would let a leading-space strip eat a space the full decode keeps.
        emitted = self._decode(self._tokens[self._read :])
        if emitted:
            self._start, self._window_text = self._read, emitted
        else:
            self._window_text = text
        self._read = len(self._tokens)
        if piece:
            self._pieces.append(piece)
        return piece
