"""Multi-turn chat that reuses the KV cache: each turn prefills only what the cache does not hold.

Every turn renders the whole conversation with the chat template, then keeps the longest prefix the
cache already holds and prefills the rest. That stays correct for templates that re-render earlier
turns differently (the cache is trimmed back to where they diverge) and after an interrupted answer.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from .cache import truncate_cache
from .generate import GenerationChunk, GenerationStats, stream_generate
from .models.base import CausalLM
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


@dataclass
class ChatSession:
    model: CausalLM
    tokenizer: object
    params: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 1024
    system: str | None = None
    messages: list[dict] = field(default_factory=list)
    last: TurnStats | None = None

    def __post_init__(self) -> None:
        self.cache = self.model.make_cache()
        self.cache_tokens: list[int] = []
        self.context_limit = getattr(self.model.args, "max_position_embeddings", None)

    def clear(self) -> None:
        """Forgets the conversation (the system prompt stays); the cache is reset."""
        self.messages.clear()
        truncate_cache(self.cache, 0)
        self.cache_tokens = []

    def set_system(self, text: str | None) -> None:
        self.system = text or None

    def _conversation(self) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.messages

    def _prompt_tokens(self) -> list[int]:
        tokens = self.tokenizer.encode_chat(self._conversation(), add_generation_prompt=True)
        # Over the model's context: forget the oldest turns (keep the latest question).
        while self.context_limit and len(tokens) + self.max_tokens > self.context_limit and len(self.messages) > 1:
            del self.messages[: 2 if len(self.messages) > 2 else 1]
            tokens = self.tokenizer.encode_chat(self._conversation(), add_generation_prompt=True)
        return tokens

    def ask(self, text: str, interrupt: threading.Event | None = None) -> Iterator[GenerationChunk]:
        """Streams the answer to ``text``; the conversation keeps it, also when interrupted."""
        self.messages.append({"role": "user", "content": text})
        prompt = self._prompt_tokens()
        # Keep at least one token to feed, so the model produces logits for the next one.
        reuse = min(common_prefix(self.cache_tokens, prompt), len(prompt) - 1)
        truncate_cache(self.cache, reuse)
        answer, generated = [], []
        stats = None
        try:
            for chunk in stream_generate(
                self.model, self.tokenizer, prompt[reuse:], cache=self.cache,
                params=self.params, max_tokens=self.max_tokens, interrupt=interrupt,
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
            self.last = TurnStats(stats, reuse, self.cache[0].offset if self.cache else 0) if stats else None
