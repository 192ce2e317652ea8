"""One running request inside the batch: its own cache, sampler, detokenizer and stop strings.

The engine feeds it one token per decode step (``accept``); the row turns tokens into text events and says
when it is done, with the finish reasons ``generation.generate.stream_generate`` gives (EOS, a stop string,
the token limit).
"""

from __future__ import annotations

import mlx.core as mx

from ..generation.generate import StopMatcher
from ..generation.sampling import Sampler
from ..models.cache import Cache
from .job import Finished, Job, Piece, TokenLogprob


class Row:
    def __init__(self, job: Job, cache: list[Cache], reused: int, tokenizer, eos: set[int]) -> None:
        self.job, self.cache, self.reused = job, cache, reused
        self.sampler = Sampler(job.params, history=job.prompt)
        self.detok, self.stops = tokenizer.detokenizer(), StopMatcher(job.stops)
        self.eos = set() if job.ignore_eos else eos
        self.to_prefill = job.prompt[reused:-1]  # the last prompt token goes through the first decode step
        self.next_input = mx.array(job.prompt[-1:])  # [1]; then the token sampled last, still lazy
        self.generated: list[int] = []
        self.finished = False

    @property
    def decoding(self) -> bool:
        return not self.to_prefill

    def sample(self, logits: mx.array) -> tuple[mx.array, mx.array | None]:
        """(the next token, lazily; the log-probabilities of ``logits [1, V]`` if the request wants them)."""
        token = self.sampler(logits)
        if self.job.top_logprobs is None:
            return token, None
        logits = logits.astype(mx.float32)
        return token, logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    def accept(self, token: int, logprobs: mx.array | None) -> None:
        """Takes the token sampled for this row; emits its text, or finishes the row."""
        if token in self.eos:
            self.finish("stop")
            return
        self.generated.append(token)
        text, hit_stop = self.stops.feed(self.detok.add(token))
        self.job.emit(Piece(text, token, self._logprob(token, logprobs) if logprobs is not None else None))
        if hit_stop:
            self.finish("stop", stopped=True)
        elif len(self.generated) >= self.job.max_tokens:
            self.finish("length")

    def _logprob(self, token: int, logprobs: mx.array) -> TokenLogprob:
        n = self.job.top_logprobs
        row = logprobs[0]
        top: tuple[tuple[int, float], ...] = ()
        if n:
            ids = mx.argpartition(-row, n - 1)[:n]
            pairs = zip(ids.tolist(), row[ids].tolist(), strict=True)
            top = tuple(sorted(pairs, key=lambda p: -p[1]))
        return TokenLogprob(token, row[token].item(), top)

    def finish(self, reason: str, stopped: bool = False) -> None:
        """Sends the held-back text and the usage, once."""
        if self.finished:
            return
        self.finished = True
        tail = ""
        if not stopped:
            tail, stopped = self.stops.feed(self.detok.finalize())
            tail += "" if stopped else self.stops.flush()
            reason = "stop" if stopped else reason
        if tail:
            self.job.emit(Piece(tail))
        self.job.emit(Finished(reason, len(self.job.prompt), len(self.generated), self.reused))

    def cache_tokens(self) -> list[int]:
        """The tokens this row's cache holds (every layer cut back to the shortest after a failed step)."""
        held = min((c.offset for c in self.cache), default=0)
        return (self.job.prompt + self.generated)[:held]
