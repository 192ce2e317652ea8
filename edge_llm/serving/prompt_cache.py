"""The KV caches of recent conversations, so that a client resending a whole chat each turn prefills only
what is new (as ``generation.chat.ChatSession`` does for the REPL, across requests here).

A finished request leaves its cache with the tokens it holds (prompt and answer); a new request takes the
entry sharing the longest prefix with its prompt, cut back to that prefix. Entries are owned by one
request at a time (taken, not shared), and the oldest go first beyond ``capacity`` entries or beyond
``max_tokens`` tokens in all (the server passes its context: the kept caches then hold at most the KV
cache of one full conversation, what the memory check counted).
"""

from __future__ import annotations

from ..generation.chat import common_prefix
from ..models.cache import Cache, truncate_cache


class PromptCache:
    def __init__(self, capacity: int, max_tokens: int | None = None) -> None:
        self.capacity, self.max_tokens = capacity, max_tokens
        self._entries: list[tuple[list[int], list[Cache]]] = []  # oldest first

    def __len__(self) -> int:
        return len(self._entries)

    def take(self, prompt: list[int]) -> tuple[list[Cache] | None, int]:
        """(a cache holding the first ``n`` tokens of ``prompt``, n), or (None, 0) when no entry shares any.
        At least the last prompt token is left to compute, so that its logits give the first answer token."""
        best, best_len = None, 0
        for i, (tokens, _) in enumerate(self._entries):
            shared = min(common_prefix(tokens, prompt), len(prompt) - 1)
            if shared > best_len:
                best, best_len = i, shared
        if best is None:
            return None, 0
        _, cache = self._entries.pop(best)
        truncate_cache(cache, best_len)
        return cache, best_len

    def put(self, tokens: list[int], cache: list[Cache]) -> None:
        if self.capacity <= 0 or not tokens or (self.max_tokens is not None and len(tokens) > self.max_tokens):
            return
        self._entries.append((tokens, cache))
        del self._entries[: max(0, len(self._entries) - self.capacity)]
        while self.max_tokens is not None and sum(len(t) for t, _ in self._entries) > self.max_tokens:
            del self._entries[0]
