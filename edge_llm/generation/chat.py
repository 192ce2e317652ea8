"""Multi-turn chat that reuses the KV cache: each turn prefills only what the cache does not hold.

Every turn renders the whole conversation with the chat template, then keeps the longest prefix the
cache already holds and prefills the rest. That stays correct for templates that re-render earlier
turns differently (the cache is trimmed back to where they diverge) and after an interrupted answer.

The cache holds at most ``context`` tokens. When the conversation outgrows it, the oldest turns are
forgotten (as ollama does) and the turn's stats say how many; a single message that cannot fit is refused
with a ContextError before any prefill, and the session stays as it was.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..errors import ContextError
from ..models.base import CausalLM
from ..models.cache import truncate_cache
from .context import context_window
from .generate import GenerationChunk, GenerationStats, stream_generate
from .sampling import SamplingParams


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass
class TurnStats:
    generation: GenerationStats
    reused_tokens: int  # prompt tokens served from the cache
    context_tokens: int  # tokens in the cache after the turn
    dropped_turns: int = 0  # older turns forgotten before this one so that it fits the context


@dataclass
class ChatSession:
    model: CausalLM
    tokenizer: object
    params: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 1024
    system: str | None = None
    messages: list[dict] = field(default_factory=list)
    last: TurnStats | None = None
    context: int | None = None  # tokens the cache may hold; None: the model's limit, capped (generation.context)
    kv_bits: int | None = None  # 8 or 4: a quantized KV cache

    def __post_init__(self) -> None:
        self.model_limit = self.model.context_length
        self.context = context_window(self.model_limit, self.context)
        self.cache = self.model.make_cache(self.kv_bits)
        self.cache_tokens: list[int] = []
        self.dropped_turns = 0  # in the whole session

    def clear(self) -> None:
        """Forgets the conversation (the system prompt stays); the cache is reset."""
        self.messages.clear()
        truncate_cache(self.cache, 0)
        self.cache_tokens = []

    def set_system(self, text: str | None) -> None:
        self.system = text or None

    def _encode(self, messages: list[dict]) -> list[int]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return self.tokenizer.encode_chat(system + messages, add_generation_prompt=True)

    def _fit(self, messages: list[dict]) -> tuple[list[dict], list[int], int]:
        """(the messages kept, their prompt tokens, turns dropped): the oldest turns go until the prompt
        leaves room for an answer of ``max_tokens``, or a quarter of the context if that is less."""
        messages, dropped = list(messages), 0
        room = min(self.max_tokens, self.context // 4)
        tokens = self._encode(messages)
        while len(tokens) + room > self.context and len(messages) > 1:
            del messages[: 2 if len(messages) > 2 else 1]
            dropped += 1
            tokens = self._encode(messages)
        if len(tokens) >= self.context:
            larger = f" (the model allows up to {self.model_limit})" if (self.model_limit or 0) > self.context else ""
            raise ContextError(f"the prompt is {len(tokens)} tokens but the context holds {self.context}: "
                               f"shorten it or pass a larger --context{larger}")
        return messages, tokens, dropped

    def ask(self, text: str, interrupt: threading.Event | None = None) -> Iterator[GenerationChunk]:
        """Streams the answer to ``text``; the conversation keeps it, also when interrupted.

        Raises ContextError before any work when ``text`` alone cannot fit the context."""
        self.messages, prompt, dropped = self._fit([*self.messages, {"role": "user", "content": text}])
        self.dropped_turns += dropped
        # Keep at least one token to feed, so the model produces logits for the next one.
        reuse = min(common_prefix(self.cache_tokens, prompt), len(prompt) - 1)
        truncate_cache(self.cache, reuse)
        answer, generated = [], []
        stats = None
        try:
            for chunk in stream_generate(
                self.model, self.tokenizer, prompt[reuse:], cache=self.cache,
                params=self.params, max_tokens=min(self.max_tokens, self.context - len(prompt)), interrupt=interrupt,
            ):
                answer.append(chunk.text)
                if chunk.token is not None:
                    generated.append(chunk.token)
                stats = chunk.stats or stats
                yield chunk
        finally:
            self.messages.append({"role": "assistant", "content": "".join(answer)})
            # The cache holds the prompt and every emitted token; an interrupted step may have left
            # one layer ahead of another, so cut all back to what is known.
            held = min((c.offset for c in self.cache), default=0)
            self.cache_tokens = (prompt + generated)[:held]
            truncate_cache(self.cache, len(self.cache_tokens))
            self.last = TurnStats(stats, reuse, self.cache[0].offset if self.cache else 0, dropped) if stats else None
