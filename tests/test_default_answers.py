"""The embedded default at its default settings answers everyday questions sensibly and stops by itself.

The full count (10 seeds per question) is in benchmarks/RESULTS.md, "Sampling defaults"; here a few seeds
keep the suite short. The settings are the ones `edge-llm run` uses: `model_settings` of the file.
"""

from __future__ import annotations

import pytest

from edge_llm.default_model import default_model_path
from edge_llm.formats.open import open_checkpoint
from edge_llm.generation.chat import ChatSession
from edge_llm.generation.sampling_defaults import model_settings
from edge_llm.loader import load

pytestmark = pytest.mark.slow

# question -> words one of which a right answer contains
QUESTIONS = {
    "What is the capital of France?": ("paris",),
    "How many days are there in a week?": ("seven", "7"),
    "What color is the sky on a clear day?": ("blue",),
}
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def default_model():
    return load(default_model_path())


@pytest.mark.parametrize("question", QUESTIONS)
def test_default_settings_answer_and_stop(default_model, question):
    model, tokenizer = default_model
    settings = model_settings(open_checkpoint(default_model_path()))
    for seed in SEEDS:
        session = ChatSession(model, tokenizer, params=settings.params(seed), max_tokens=200)
        answer = "".join(chunk.text for chunk in session.ask(question))
        assert session.last.generation.finish_reason == "stop", (seed, answer)
        assert any(word in answer.lower() for word in QUESTIONS[question]), (seed, answer)
