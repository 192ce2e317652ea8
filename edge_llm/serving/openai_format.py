"""The JSON objects of OpenAI's API: chat completions and their stream chunks, text completions, usage,
logprobs, the model list. Pure functions of what the engine produced."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .job import Finished, TokenLogprob

TokenText = Callable[[int], str]


@dataclass
class Reply:
    """What one request says back: its id, creation time and model, then what it has produced so far."""

    kind: str  # "chat" or "text"
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = self.id or f"{'chatcmpl' if self.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, text: str, finished: Finished, logprobs: Sequence[TokenLogprob] | None,
              token_text: TokenText) -> dict[str, Any]:
        """The non-streamed answer."""
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": chat_logprobs(logprobs, token_text), "finish_reason": finished.finish_reason}
            return {**self._head("chat.completion"), "choices": [choice], "usage": usage(finished)}
        choice = {"index": 0, "text": text, "logprobs": text_logprobs(logprobs, token_text),
                  "finish_reason": finished.finish_reason}
        return {**self._head("text_completion"), "choices": [choice], "usage": usage(finished)}

    def chunk(self, text: str | None, logprobs: Sequence[TokenLogprob] | None, token_text: TokenText,
              finish_reason: str | None = None, first: bool = False, include_usage: bool = False) -> dict[str, Any]:
        """One streamed chunk: text (the chat's first chunk also names the role), or the finish reason."""
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": text or ""} if first else (
                {"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "logprobs": chat_logprobs(logprobs, token_text),
                      "finish_reason": finish_reason}
            out = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": text_logprobs(logprobs, token_text),
                      "finish_reason": finish_reason}
            out = {**self._head("text_completion"), "choices": [choice]}
        return {**out, "usage": None} if include_usage else out

    def usage_chunk(self, finished: Finished) -> dict[str, Any]:
        """The last chunk when ``stream_options.include_usage``: no choices, the usage."""
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage(finished)}


def usage(finished: Finished) -> dict[str, Any]:
    return {
        "prompt_tokens": finished.prompt_tokens,
        "completion_tokens": finished.completion_tokens,
        "total_tokens": finished.prompt_tokens + finished.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": finished.cached_tokens},
    }


def _entry(token: int, logprob: float, token_text: TokenText) -> dict[str, Any]:
    text = token_text(token)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(logprobs: Sequence[TokenLogprob] | None, token_text: TokenText) -> dict[str, Any] | None:
    if logprobs is None:
        return None
    return {"content": [
        {**_entry(lp.token, lp.logprob, token_text), "top_logprobs": [_entry(t, p, token_text) for t, p in lp.top]}
        for lp in logprobs
    ]}


def text_logprobs(logprobs: Sequence[TokenLogprob] | None, token_text: TokenText) -> dict[str, Any] | None:
    """The legacy completions form: parallel lists of tokens, their logprobs, alternatives and text offsets."""
    if logprobs is None:
        return None
    tokens = [token_text(lp.token) for lp in logprobs]
    offsets, at = [], 0
    for text in tokens:
        offsets.append(at)
        at += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [{token_text(t): p for t, p in lp.top} for lp in logprobs],
        "text_offset": offsets,
    }


def model_list(model_id: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "edge-llm"}]}


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event: ``data: <json>`` and a blank line."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"
