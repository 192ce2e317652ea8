"""Checks an OpenAI request body field by field; every problem is a ``RequestError`` naming the field.

``parse_chat`` reads ``/v1/chat/completions`` bodies, ``parse_completion`` ``/v1/completions`` ones. Both
give a ``Request``: the prompt (messages or text/ids, tokenized later), what sampling the request asks for
(None: the model's default, as ``edge-llm run`` uses) and how to answer. Beyond OpenAI's fields the
server takes ``top_k``, ``min_p``, ``repetition_penalty`` (as mlx_lm.server) and ``ignore_eos`` (as
llama-server and vLLM). Fields OpenAI defines that change the answer and that this server cannot honour
(``n`` > 1, tools, JSON modes, penalties other than 0) are refused rather than ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..generation.sampling import SEED_MAX
from .errors import RequestError

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOPS = 4  # as OpenAI
MAX_TOP_LOGPROBS = 20  # chat; completions' ``logprobs`` allows 5
SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@dataclass
class Request:
    model: str | None
    messages: list[dict[str, str]] | None = None  # chat
    prompt: str | list[int] | None = None  # completions: text, or token ids
    sampling: dict[str, float | int] = field(default_factory=dict)  # only the fields the request sets
    seed: int | None = None
    max_tokens: int | None = None
    stops: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    top_logprobs: int | None = None  # None: no logprobs
    ignore_eos: bool = False


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def _invalid_type(name: str, expected: str, value: Any) -> RequestError:
    return RequestError(f"Invalid type for '{name}': expected {expected}, but got {_type_name(value)} instead.",
                        param=name, code="invalid_type")


def _number(body: dict, name: str, low: float, high: float | None = None, *, integer: bool = False,
            low_open: bool = False) -> float | int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise _invalid_type(name, "an integer" if integer else "a number", value)
    if not math.isfinite(value) or value < low or (low_open and value == low) or (high is not None and value > high):
        bounds = f"{'above' if low_open else 'at least'} {low}" + (f" and at most {high}" if high is not None else "")
        raise RequestError(f"Invalid '{name}': {value!r} is out of range; expected a value {bounds}.",
                           param=name, code="invalid_value")
    return value


def _bool(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _invalid_type(name, "a boolean", value)
    return value


def _refuse(name: str, why: str) -> RequestError:
    return RequestError(f"'{name}' {why}", param=name, code="unsupported_value")


def _common(body: dict) -> Request:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _invalid_type("model", "a string", model)
    n = _number(body, "n", 1, integer=True)
    if n is not None and n != 1:
        raise _refuse("n", "must be 1: this server answers one choice per request")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, -2, 2):
            raise _refuse(name, "is not supported (only 0); use repetition_penalty")
    if body.get("logit_bias"):
        raise _refuse("logit_bias", "is not supported")
    if body.get("tools") or body.get("functions"):
        raise _refuse("tools", "are not supported by this server")
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise _refuse("response_format", "is not supported beyond {\"type\": \"text\"}")
    sampling = {
        "temperature": _number(body, "temperature", 0, 2),
        "top_p": _number(body, "top_p", 0, 1),
        "top_k": _number(body, "top_k", 0, integer=True),
        "min_p": _number(body, "min_p", 0, 1),
        "repetition_penalty": _number(body, "repetition_penalty", 0, low_open=True),
    }
    if sampling["top_p"] == 0:  # OpenAI allows 0: only the likeliest token stays (our top_p needs > 0)
        sampling["top_p"] = 1e-9
    if sampling["min_p"] == 1:
        raise RequestError("Invalid 'min_p': expected a value below 1.", param="min_p", code="invalid_value")
    max_tokens = _number(body, "max_completion_tokens", 1, integer=True)
    max_tokens = max_tokens if max_tokens is not None else _number(body, "max_tokens", 1, integer=True)
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise _invalid_type("stream_options", "an object", options)
        if not stream:
            raise RequestError("'stream_options' is only allowed when 'stream' is true.", param="stream_options",
                               code="invalid_value")
        include_usage = _bool(options, "include_usage")
    return Request(
        model=model, sampling={k: v for k, v in sampling.items() if v is not None},
        seed=_number(body, "seed", 0, SEED_MAX, integer=True), max_tokens=max_tokens, stops=_stops(body),
        stream=stream, include_usage=include_usage, ignore_eos=_bool(body, "ignore_eos"),
    )


def _stops(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _invalid_type("stop", "a string or an array of strings", value)
    if len(stops) > MAX_STOPS:
        raise RequestError(f"Invalid 'stop': at most {MAX_STOPS} stop sequences, got {len(stops)}.", param="stop",
                           code="invalid_value")
    return tuple(s for s in stops if s)


def _content(message: dict, where: str) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: text only
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"Invalid '{where}.content[{j}]': only text parts "
                                   "({\"type\": \"text\", \"text\": ...}) are supported.",
                                   param=f"{where}.content", code="invalid_value")
            texts.append(part["text"])
        return "".join(texts)
    if content is None and "content" not in message:
        raise RequestError(f"Missing required parameter: '{where}.content'.", param=f"{where}.content",
                           code="missing_required_parameter")
    raise _invalid_type(f"{where}.content", "a string or an array of text parts", content)


def _messages(body: dict) -> list[dict[str, str]]:
    if "messages" not in body:
        raise RequestError("Missing required parameter: 'messages'.", param="messages",
                           code="missing_required_parameter")
    messages = body["messages"]
    if not isinstance(messages, list):
        raise _invalid_type("messages", "an array", messages)
    if not messages:
        raise RequestError("Invalid 'messages': empty array. Expected an array with at least one message.",
                           param="messages", code="empty_array")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _invalid_type(where, "an object", message)
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise RequestError(f"Invalid '{where}.role': {role!r}; expected one of system, developer, user, "
                               "assistant.", param=f"{where}.role", code="invalid_value")
        out.append({"role": ROLES[role], "content": _content(message, where)})
    return out


def parse_chat(body: dict) -> Request:
    request = _common(body)
    request.messages = _messages(body)
    logprobs = _bool(body, "logprobs")
    top = _number(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, integer=True)
    if top is not None and not logprobs:
        raise RequestError("'top_logprobs' needs 'logprobs' set to true.", param="top_logprobs", code="invalid_value")
    request.top_logprobs = (top or 0) if logprobs else None
    return request


def parse_completion(body: dict, id_limit: int) -> Request:
    request = _common(body)
    if "prompt" not in body:
        raise RequestError("Missing required parameter: 'prompt'.", param="prompt", code="missing_required_parameter")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one prompt
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < id_limit for t in prompt):
            raise RequestError(f"Invalid 'prompt': a list must hold token ids from 0 to {id_limit - 1} (one prompt "
                               "per request).", param="prompt", code="invalid_value")
    elif not isinstance(prompt, str):
        raise _invalid_type("prompt", "a string or an array of token ids", prompt)
    request.prompt = prompt
    if _bool(body, "echo"):
        raise _refuse("echo", "is not supported")
    if body.get("suffix"):
        raise _refuse("suffix", "is not supported")
    best_of = _number(body, "best_of", 1, integer=True)
    if best_of is not None and best_of != 1:
        raise _refuse("best_of", "must be 1")
    logprobs = _number(body, "logprobs", 0, 5, integer=True)
    request.top_logprobs = logprobs
    return request
