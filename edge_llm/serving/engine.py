"""Continuous batching: one thread owns the model and decodes every running request in one batch.

MLX is not thread-safe, so every MLX call happens on the engine's thread. HTTP handlers ``submit`` jobs
(counted at once, so ``--max-queue`` answers 429 without racing) and read events a job's ``emit`` hands
over. Each loop turn: waiting jobs join while there are free rows (taking a kept cache when their prompt
starts with a recent conversation), one prefill chunk runs for a row still reading its prompt, then one
decode step runs for all rows that are decoding, each with its own cache (``models.cache.BatchRows``) and
sampler. A row leaves the batch when it finishes or its client goes; its cache is kept for reuse.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import asdict, dataclass

import mlx.core as mx

from ..generation.generate import PREFILL_CHUNK
from ..models.base import CausalLM
from ..models.cache import BatchRows, truncate_cache
from .errors import QueueFull, ShuttingDown
from .job import Failed, Job
from .prompt_cache import PromptCache
from .row import Row

log = logging.getLogger(__name__)


@dataclass
class EngineStats:
    running: int = 0  # rows in the batch (reading their prompt or decoding)
    waiting: int = 0  # accepted jobs waiting for a row
    completed: int = 0
    cancelled: int = 0  # clients that went away before their answer ended
    failed: int = 0
    prompt_tokens: int = 0  # prefilled (cached_tokens are not counted here)
    cached_tokens: int = 0  # prompt tokens served from kept caches
    generated_tokens: int = 0
    decode_steps: int = 0
    largest_batch: int = 0  # the most rows one decode step has run together
    prompt_cache_entries: int = 0


class Engine:
    def __init__(self, model: CausalLM, tokenizer, *, kv_bits: int | None = None, max_batch: int = 8,
                 max_queue: int = 16, prompt_cache: int = 8, prompt_cache_tokens: int | None = None,
                 prefill_chunk: int = PREFILL_CHUNK) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be at least 1 and max_queue at least 0")
        self.model, self.tokenizer, self.kv_bits = model, tokenizer, kv_bits
        # Arrays still lazy here were made on this thread; MLX (0.32) evaluates an array only on the thread
        # whose stream made it ("There is no Stream(cpu, 0) in current thread"), so settle them now.
        mx.eval(model.parameters())
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.eos = set(tokenizer.eos_token_ids)
        self.prompt_cache = PromptCache(prompt_cache, prompt_cache_tokens)
        self.stats = EngineStats()
        self._waiting: deque[Job] = deque()
        self._rows: list[Row] = []
        self._joining: list[Job] = []  # taken from the queue, not yet rows
        self._in_flight = 0
        self._in_step: tuple[list[Row], list[tuple[mx.array, mx.array | None]]] | None = None  # launched, not read
        self._stopping = False
        self.broken: str | None = None  # why the engine's thread ended early (/health reports it)
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="edge-llm-engine", daemon=True)

    # -- any thread ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queues ``job``; QueueFull when ``max_batch + max_queue`` jobs are already in flight."""
        with self._wake:
            if self._stopping:
                raise ShuttingDown()
            if self._in_flight >= self.max_batch + self.max_queue:
                raise QueueFull(self.max_batch + self.max_queue)
            self._in_flight += 1
            self._waiting.append(job)
            self.stats.waiting = len(self._waiting)
            self._wake.notify()

    def cancel(self, job: Job) -> None:
        """Stops ``job`` at the engine's next step (nothing more is emitted); harmless once it has ended."""
        with self._wake:
            job.cancelled = True
            self._wake.notify()

    def stop(self, timeout: float = 5.0) -> None:
        """Ends every job (Failed: shutting down) and the thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def snapshot(self) -> dict[str, int]:
        return asdict(self.stats)

    # -- the engine's thread -------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
            self._fail_all("the server is shutting down")
        except Exception as e:  # a bug here must not leave clients waiting forever on a dead thread
            log.exception("the engine stopped")
            with self._wake:
                self._stopping, self.broken = True, f"the engine stopped: {e!r}"
            self._fail_all(self.broken)
        finally:
            # a step launched for rows that have finished may still be computing; the process must not
            # exit under it (MLX aborts: "terminate called without an active exception")
            self._in_step = None
            mx.synchronize()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._stopping or self._waiting or self._rows):
                    self._wake.wait()
                if self._stopping:
                    return
                gone = [job for job in self._waiting if job.cancelled]  # their clients left while they waited
                for job in gone:
                    self._waiting.remove(job)
                while self._waiting and len(self._rows) + len(self._joining) < self.max_batch:
                    self._joining.append(self._waiting.popleft())
                self.stats.waiting = len(self._waiting)
            for job in gone:
                self._end(job, cancelled=True)
            while self._joining:
                self._join(self._joining[0])
                self._joining.pop(0)
            self._drop_cancelled()
            self._prefill_one()
            self._decode()

    def _join(self, job: Job) -> None:
        if job.cancelled:
            self._end(job, cancelled=True)
            return
        cache, reused = self.prompt_cache.take(job.prompt)
        cache = cache if cache is not None else self.model.make_cache(self.kv_bits)
        self.stats.cached_tokens += reused
        self._rows.append(Row(job, cache, reused, self.tokenizer, self.eos))
        self._update_counts()

    def _drop_cancelled(self) -> None:
        for row in [r for r in self._rows if r.job.cancelled and not r.finished]:
            row.finished = True
            log.info("request %d cancelled after %d tokens", row.job.id, len(row.generated))
            self._leave(row, cancelled=True)

    def _prefill_one(self) -> None:
        """One chunk of one row's prompt: long prompts arrive over several steps while the others decode."""
        row = next((r for r in self._rows if not r.decoding), None)
        if row is None:
            return
        chunk, row.to_prefill = row.to_prefill[: self.prefill_chunk], row.to_prefill[self.prefill_chunk:]
        try:
            self.model(mx.array(chunk)[None], cache=row.cache)
            mx.eval([c.state for c in row.cache])
        except Exception as e:  # a model error ends this request, not the server
            log.exception("prefill failed")
            self._fail(row, f"generation failed: {e}")
            return
        self.stats.prompt_tokens += len(chunk)
        if row.decoding:
            mx.clear_cache()  # hand the chunks' activation buffers back rather than keep them resident

    def _decode(self) -> None:
        """Launches the next step, then hands out the tokens of the one before: the device computes step n + 1
        while this thread detokenizes and emits step n (``generation.generate`` overlaps the same way). A row
        that finished at step n also ran in step n + 1; its cache keeps only what its tokens account for."""
        previous, self._in_step = self._in_step, self._launch()
        if previous is not None:
            self._hand_out(*previous)

    def _launch(self) -> tuple[list[Row], list[tuple[mx.array, mx.array | None]]] | None:
        rows = [r for r in self._rows if r.decoding and not r.finished]
        if not rows:
            return None
        try:
            tokens = mx.concatenate([r.next_input for r in rows])[:, None]  # [B, 1]
            layers = len(rows[0].cache)
            cache = rows[0].cache if len(rows) == 1 else [BatchRows([r.cache[i] for r in rows]) for i in range(layers)]
            logits = self.model(tokens, cache=cache)[:, -1, :]  # [B, V]
            sampled = [r.sample(logits[i : i + 1]) for i, r in enumerate(rows)]
            mx.async_eval([a for pair in sampled for a in pair if a is not None])
        except Exception as e:  # a model error ends these requests, not the server
            self._fail_step(rows, e)
            return None
        for row, (token, _) in zip(rows, sampled, strict=True):
            row.next_input = token
        self.stats.decode_steps += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(rows))
        return rows, sampled

    def _hand_out(self, rows: list[Row], sampled: list[tuple[mx.array, mx.array | None]]) -> None:
        try:
            mx.eval([a for pair in sampled for a in pair if a is not None])
        except Exception as e:
            self._fail_step(rows, e)
            return
        for row, (token, logprobs) in zip(rows, sampled, strict=True):
            if row.finished or row.job.cancelled:
                continue  # gone (or going at the next turn, with nothing more sent)
            before = len(row.generated)
            row.accept(token.item(), logprobs)
            self.stats.generated_tokens += len(row.generated) - before
            if row.finished:
                self._leave(row)

    def _fail_step(self, rows: list[Row], error: Exception) -> None:
        log.error("decode step failed: %r", error)
        for row in rows:
            if not row.finished:
                self._fail(row, f"generation failed: {error}")

    # -- leaving ---------------------------------------------------------------------------------
    def _leave(self, row: Row, cancelled: bool = False, failed: bool = False) -> None:
        """Takes ``row`` out of the batch and keeps its cache (what it holds is known exactly) for reuse."""
        self._rows.remove(row)
        tokens = row.cache_tokens()
        truncate_cache(row.cache, len(tokens))
        self.prompt_cache.put(tokens, row.cache)
        self._end(row.job, cancelled=cancelled, failed=failed)

    def _fail(self, row: Row, message: str) -> None:
        row.finished = True
        row.job.emit(Failed(message))
        self._leave(row, failed=True)

    def _end(self, job: Job, cancelled: bool = False, failed: bool = False) -> None:
        with self._wake:
            self._in_flight -= 1
        if cancelled:
            self.stats.cancelled += 1
        elif failed:
            self.stats.failed += 1
        else:
            self.stats.completed += 1
        self._update_counts()

    def _update_counts(self) -> None:
        self.stats.running = len(self._rows)
        self.stats.prompt_cache_entries = len(self.prompt_cache)

    def _fail_all(self, message: str) -> None:
        """Ends every job the engine holds with ``message`` (their caches are not kept: the engine is ending)."""
        with self._wake:
            waiting, self._waiting = [*self._joining, *self._waiting], deque()
        jobs = [*waiting, *(r.job for r in self._rows if not r.finished)]
        self._joining, self._rows = [], []
        for job in jobs:
            job.emit(Failed(message))
            self._end(job, failed=True)
