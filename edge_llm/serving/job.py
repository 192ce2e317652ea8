"""What the engine decodes for one request, and the events it sends back while it does."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from ..generation.sampling import SamplingParams


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the likeliest alternatives, most likely first


@dataclass(frozen=True)
class Piece:
    """Text ready to send (may be empty while a stop string could still start) and the token that made it."""

    text: str
    token: int | None = None
    logprob: TokenLogprob | None = None


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop" or "length", as OpenAI's
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens served from a kept cache, not prefilled again


@dataclass(frozen=True)
class Failed:
    message: str


Event = Piece | Finished | Failed
_ids = itertools.count(1)


@dataclass(eq=False)
class Job:
    """One generation. ``emit`` is called on the engine's thread; it must hand events over, not block."""

    prompt: list[int]
    params: SamplingParams
    max_tokens: int
    emit: Callable[[Event], None]
    stops: tuple[str, ...] = ()
    top_logprobs: int | None = None  # None: no logprobs; n: the token's logprob and n alternatives
    ignore_eos: bool = False
    id: int = field(default_factory=lambda: next(_ids))
    cancelled: bool = False  # set from another thread; the engine drops the job at its next step
