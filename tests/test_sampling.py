"""Sampling functions and stop handling, checked against hand-computed distributions."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from edge_llm.generation.generate import StopMatcher
from edge_llm.generation.sampling import (
    Sampler,
    SamplingParams,
    apply_min_p,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
)

LOGPROBS = mx.log(mx.array([[0.5, 0.25, 0.15, 0.1]]))


def kept(lp: mx.array) -> list[int]:
    return [i for i, v in enumerate(np.array(lp)[0]) if np.isfinite(v)]


def test_top_k():
    assert kept(apply_top_k(LOGPROBS, 2)) == [0, 1]
    assert kept(apply_top_k(LOGPROBS, 0)) == [0, 1, 2, 3]


def test_top_p_keeps_smallest_set_reaching_p():
    assert kept(apply_top_p(LOGPROBS, 0.5)) == [0]
    assert kept(apply_top_p(LOGPROBS, 0.7)) == [0, 1]
    assert kept(apply_top_p(LOGPROBS, 0.8)) == [0, 1, 2]


def test_min_p_relative_to_top():
    assert kept(apply_min_p(LOGPROBS, 0.3)) == [0, 1, 2]  # 0.15 >= 0.3 * 0.5
    assert kept(apply_min_p(LOGPROBS, 0.4)) == [0, 1]


def test_repetition_penalty_matches_transformers():
    import torch
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = np.array([[2.0, -1.0, 0.5, -3.0, 1.0]], dtype=np.float32)
    seen = [1, 2, 2, 4]
    ours = apply_repetition_penalty(mx.array(logits), mx.array(seen), 1.3)
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([seen]), torch.tensor(logits))
    np.testing.assert_allclose(np.array(ours), theirs.numpy(), rtol=1e-6)


def test_sampled_frequencies_follow_distribution():
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=1.0, top_k=0, seed=0))
    draws = np.array([sampler(LOGPROBS).item() for _ in range(20000)])
    freqs = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freqs, [0.5, 0.25, 0.15, 0.1], atol=0.015)  # ~4 standard deviations


def test_greedy_and_invalid_settings():
    assert Sampler(SamplingParams(temperature=0))(LOGPROBS).item() == 0
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)


def test_stop_strings_hold_back_partial_matches():
    m = StopMatcher(["</s>", "STOP"])
    out = [m.feed(piece) for piece in ["Hello ", "wor", "ld <", "/", "s> more"]]
    assert "".join(text for text, _ in out) == "Hello world "
    assert out[-1][1] is True
    m = StopMatcher(["STOP"])
    text = m.feed("ST")[0] + m.feed("AY calm")[0] + m.flush()
    assert text == "STAY calm"
