"""How much a quantized model differs from its source: KL divergence and perplexity on a fixed text.

Both models read the same tokens (the source's tokenizer on ``SAMPLE``, public-domain prose: the
opening of Jane Austen's *Pride and Prejudice*, 1813, and of Charles Dickens' *A Tale of Two Cities*,
1859). The mean KL(P_source || P_quantized) over every position measures how far the quantized
next-token distributions drift: 0 means identical; llama.cpp's ``--kl-divergence`` reports the same
figure. Perplexity is exp(mean negative log-likelihood of the actual next token). The source's
log-probabilities are computed first and the source model released before the quantized one loads,
so memory holds one model at a time. Computed in float32.
"""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from edge_llm.loader import load_model
from edge_llm.models.base import CausalLM
from edge_llm.tokenizer import Tokenizer

from .recipes import MIXED

SAMPLE = """It is a truth universally acknowledged, that a single man in possession of a good fortune, must be \
in want of a wife.

However little known the feelings or views of such a man may be on his first entering a neighbourhood, this \
truth is so well fixed in the minds of the surrounding families, that he is considered the rightful property of \
some one or other of their daughters.

"My dear Mr. Bennet," said his lady to him one day, "have you heard that Netherfield Park is let at last?"

Mr. Bennet replied that he had not.

"But it is," returned she; "for Mrs. Long has just been here, and she told me all about it."

Mr. Bennet made no answer.

"Do you not want to know who has taken it?" cried his wife impatiently.

"You want to tell me, and I have no objection to hearing it."

This was invitation enough.

"Why, my dear, you must know, Mrs. Long says that Netherfield is taken by a young man of large fortune from the \
north of England; that he came down on Monday in a chaise and four to see the place, and was so much delighted \
with it, that he agreed with Mr. Morris immediately; that he is to take possession before Michaelmas, and some \
of his servants are to be in the house by the end of next week."

"What is his name?"

"Bingley."

"Is he married or single?"

"Oh! Single, my dear, to be sure! A single man of large fortune; four or five thousand a year. What a fine \
thing for our girls!"

It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness, \
it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it was the season of \
Darkness, it was the spring of hope, it was the winter of despair, we had everything before us, we had nothing \
before us, we were all going direct to Heaven, we were all going direct the other way; in short, the period was \
so far like the present period, that some of its noisiest authorities insisted on its being received, for good \
or for evil, in the superlative degree of comparison only.
"""


@dataclass(frozen=True)
class Quality:
    tokens: int  # positions scored
    kl_mean: float  # nats per token, KL(source || quantized)
    kl_max: float
    ppl_source: float
    ppl_quantized: float
    top1_agreement: float  # fraction of positions where both models' most likely token agree


# ``quantize --eval`` calls a result poor above this mean KL, or below this top-1 agreement while the KL shows
# the distributions really moved: below TOP1_KL_FLOOR the top-1 flips are among near-ties (a random tiny model
# at 4 bits: KL 0.0007, top-1 71%). Measured on SmolLM2-135M (benchmarks/RESULTS.md, "Quantization quality"):
# 8-bit g64 KL 0.0015, top-1 96.9%; 4-bit g32 0.059, 81.5%; 4-bit g64 0.28, 68.9%, which answers "The capital
# of France is indeed France"; 4-bit g64 calibrated (``--calibrate``) 0.147, 80.1%, which answers Paris but still
# drifts measurably ("Calibrated quantization" there).
MAX_KL = 0.05
MIN_TOP1_AGREEMENT = 0.90
TOP1_KL_FLOOR = 0.01
MIXED_HIGH_BITS = 6  # the high bits of the mixed_L_6 recipes


@dataclass(frozen=True)
class Verdict:
    """Whether a quantized model drifted too far from its source, why, and which settings would do better."""

    poor: bool
    reasons: tuple[str, ...]  # the thresholds crossed, e.g. "top-1 agreement 68.9% < 90%"
    suggestions: tuple[str, ...]  # quantize options, the likeliest to help first, e.g. "--bits 8"

    def as_dict(self) -> dict[str, object]:
        return {"poor": self.poor, "reasons": list(self.reasons), "suggestions": list(self.suggestions)}


def judge(quality: Quality, quantization: dict | None, calibrated: bool | None = None) -> Verdict:
    """The verdict on ``quality``, for a model quantized as its config's ``quantization`` block says (None:
    not quantized). Suggestions: 8-bit (nearly lossless), a smaller group, a mixed recipe that keeps the
    most sensitive matrices at 6 bits, and, where ``calibrated`` is False, ``--calibrate`` (same size, on
    SmolLM2 4-bit g64 half the KL); only those that differ from what was done."""
    reasons = []
    if quality.top1_agreement < MIN_TOP1_AGREEMENT and quality.kl_mean > TOP1_KL_FLOOR:
        reasons.append(f"top-1 agreement {quality.top1_agreement:.1%} < {MIN_TOP1_AGREEMENT:.0%}")
    if quality.kl_mean > MAX_KL:
        reasons.append(f"KL divergence {quality.kl_mean:.3f} > {MAX_KL} nats/token")
    if not reasons:
        return Verdict(False, (), ())
    q = quantization or {}
    bits, group_size = q.get("bits"), q.get("group_size")
    mixed = any(isinstance(v, dict) for v in q.values())
    suggestions = []
    if isinstance(bits, int) and bits < 8:
        suggestions.append("--bits 8")
        if isinstance(group_size, int) and group_size > 32:
            suggestions.append("--group-size 32")
        if not mixed and f"mixed_{bits}_{MIXED_HIGH_BITS}" in MIXED:
            suggestions.append(f"--recipe mixed_{bits}_{MIXED_HIGH_BITS}")
        if calibrated is False:
            suggestions.append("--calibrate")
    elif bits is not None:
        suggestions.append("--bits 16")  # 8-bit is already the finest quantization
    return Verdict(True, tuple(reasons), tuple(suggestions))


def sample_tokens(folder: str | Path, text: str = SAMPLE, max_tokens: int | None = None) -> list[int]:
    tokens = Tokenizer.from_folder(folder).encode(text)
    return tokens[:max_tokens] if max_tokens else tokens


def log_probs(model: CausalLM, tokens: list[int]) -> mx.array:
    """Float32 log-softmax of the model's logits at every position: ``[T, V]``."""
    logits = model(mx.array(tokens)[None])[0].astype(mx.float32)
    out = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    mx.eval(out)
    return out


def compare_log_probs(reference: mx.array, candidate: mx.array, tokens: list[int]) -> Quality:
    """KL and perplexities from two ``[T, V]`` log-probability tables over the same ``tokens``."""
    kl = (mx.exp(reference) * (reference - candidate)).sum(-1)[:-1]  # the last position predicts nothing scored
    targets = mx.array(tokens[1:])
    nll_ref = -mx.take_along_axis(reference[:-1], targets[:, None], axis=-1)
    nll_cand = -mx.take_along_axis(candidate[:-1], targets[:, None], axis=-1)
    agree = (reference[:-1].argmax(-1) == candidate[:-1].argmax(-1)).astype(mx.float32)
    return Quality(
        tokens=len(tokens) - 1,
        kl_mean=float(kl.mean().item()),
        kl_max=float(kl.max().item()),
        ppl_source=math.exp(float(nll_ref.mean().item())),
        ppl_quantized=math.exp(float(nll_cand.mean().item())),
        top1_agreement=float(agree.mean().item()),
    )


def evaluate(source: str | Path, quantized: str | Path, text: str = SAMPLE, max_tokens: int | None = None) -> Quality:
    """KL divergence and perplexity of ``quantized`` (a checkpoint folder) against ``source`` (a folder or a GGUF
    file). The text is tokenized with the quantized folder's tokenizer: the source's, as quantize wrote it (a GGUF
    file has no tokenizer.json beside it)."""
    tokens = sample_tokens(quantized, text, max_tokens)
    if len(tokens) < 2:
        raise ValueError("the evaluation text must be at least two tokens long")
    model = load_model(source, dtype="float32")
    reference = log_probs(model, tokens)
    del model
    gc.collect()
    model = load_model(quantized, dtype="float32")
    candidate = log_probs(model, tokens)
    return compare_log_probs(reference, candidate, tokens)
