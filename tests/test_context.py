"""The context window at run time: ``--context`` bounded by the model's limit, the memory check at the
context and KV bits actually used, old turns forgotten with a notice, and a prompt longer than the
context refused before any prefill (one line, the session kept)."""

from __future__ import annotations

import os
import re
import sys
import time

import pexpect
import pytest
from typer.testing import CliRunner

from cli.main import app
from edge_llm.default_model import default_model_path
from edge_llm.errors import ContextError
from edge_llm.generation.chat import ChatSession
from edge_llm.generation.context import DEFAULT_CONTEXT, context_window, model_context_limit
from edge_llm.generation.sampling import SamplingParams
from quant.fit import check_fits

SMOLLM2_LIMIT = 8192  # the GGUF's llama.context_length
NOTICE = re.compile(r"context full \((\d+) tokens\): older turns are forgotten from now on")
LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 2223  # 100,035 characters, ~23,000 tokens


def test_context_window_defaults_and_bounds():
    assert context_window(SMOLLM2_LIMIT) == DEFAULT_CONTEXT == 4096
    assert context_window(2048) == 2048  # a smaller limit is the default as it is
    assert context_window(None) == DEFAULT_CONTEXT
    assert context_window(SMOLLM2_LIMIT, 8192) == 8192
    with pytest.raises(ContextError, match="--context 9000 is over the model's limit of 8192 tokens"):
        context_window(SMOLLM2_LIMIT, 9000)
    with pytest.raises(ContextError, match="at least 1"):
        context_window(SMOLLM2_LIMIT, 0)
    # a limit that makes no sense is no limit (config validation reports it), not a --context nobody gave
    assert model_context_limit({"max_position_embeddings": -5}) is None
    assert model_context_limit({"max_position_embeddings": True}) is None


def _one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_run_context_over_the_limit_is_one_line():
    line = _one_line_error(CliRunner().invoke(app, ["run", "--context", "10000", "--prompt", "hi"]))
    assert "--context 10000" in line and "8192" in line


def test_run_kv_bits_other_than_8_or_4_is_one_line():
    line = _one_line_error(CliRunner().invoke(app, ["run", "--kv-bits", "3", "--prompt", "hi"]))
    assert "--kv-bits must be 8 or 4" in line


def test_memory_check_uses_the_context_and_kv_bits():
    ref = str(default_model_path())
    default = check_fits(ref).estimate
    assert default.context == DEFAULT_CONTEXT
    est = check_fits(ref, context=1000, kv_bits=4).estimate
    assert (est.context, est.kv_bits) == (1000, 4)
    assert est.requested.kv_cache_bytes < default.requested.kv_cache_bytes / 4
    with pytest.raises(ContextError, match="8192"):
        check_fits(ref, context=SMOLLM2_LIMIT + 1)


def test_long_prompt_refused_before_prefill():
    """100,000 characters on the 8,192-token default model: counted and refused in seconds (prefilling
    it would take minutes), with the counts in one line."""
    start = time.perf_counter()
    result = CliRunner().invoke(app, ["run", "--prompt", LONG_PROMPT, "--context", str(SMOLLM2_LIMIT)])
    elapsed = time.perf_counter() - start
    line = _one_line_error(result)
    counted = int(re.search(r"the prompt is (\d+) tokens but the context holds 8192", line).group(1))
    assert counted > 20_000
    assert elapsed < 60  # loading and tokenizing; a prefill of 23,000 tokens takes minutes here


def test_session_refuses_a_message_that_cannot_fit_and_stays_as_it_was(smollm2_gguf):
    model, tokenizer = smollm2_gguf
    chat = ChatSession(model, tokenizer, params=SamplingParams(temperature=0), max_tokens=6, context=96)
    list(chat.ask("Hi!"))
    messages, cached, offset = list(chat.messages), list(chat.cache_tokens), chat.cache[0].offset
    with pytest.raises(ContextError, match=r"the prompt is \d+ tokens but the context holds 96: .*up to 8192"):
        next(chat.ask("Tell me everything about " + "the history of Paris and " * 40))
    assert (chat.messages, chat.cache_tokens, chat.cache[0].offset) == (messages, cached, offset)
    list(chat.ask("Thanks!"))  # and the chat goes on, from its cache
    assert chat.last.reused_tokens > 0 and chat.last.dropped_turns == 0


def test_outgrown_context_drops_old_turns_and_says_so(smollm2_gguf):
    model, tokenizer = smollm2_gguf
    chat = ChatSession(model, tokenizer, params=SamplingParams(temperature=0), max_tokens=12, context=80)
    dropped = []
    for question in ("Hi!", "What is the capital of France?", "And of Italy?", "And of Spain?"):
        list(chat.ask(question))
        dropped.append(chat.last.dropped_turns)
        assert chat.cache[0].offset < 80 and chat.last.context_tokens <= 80
    assert dropped[0] == 0 and sum(dropped) >= 1 and chat.dropped_turns == sum(dropped)
    assert chat.messages[0]["content"] != "Hi!"  # the oldest turn is gone
    assert chat.messages[-2]["content"] == "And of Spain?"


def test_answer_stops_at_the_context(smollm2_gguf):
    """A long answer ends where the context is full (finish reason 'length'), not past it."""
    model, tokenizer = smollm2_gguf
    chat = ChatSession(model, tokenizer, params=SamplingParams(temperature=0), max_tokens=500, context=48)
    list(chat.ask("Write a long story about a dragon."))
    g = chat.last.generation
    assert g.finish_reason == "length" and g.prompt_tokens + g.generation_tokens == 48


@pytest.mark.slow
def test_repl_says_once_that_the_context_is_full_and_refuses_a_long_message():
    child = pexpect.spawn(
        sys.executable, ["-m", "cli.main", "run", "--context", "80", "--max-tokens", "8", "--temp", "0"],
        encoding="utf-8", timeout=300, dimensions=(40, 200), env={**os.environ, "NO_COLOR": "1", "TERM": "dumb"},
    )
    child.expect_exact(">>> ")
    notices = 0
    for question in ("Hi!", "What is the capital of France?", "And of Italy?", "And of Spain?", "And of Peru?"):
        child.sendline(question)
        seen = child.expect([NOTICE, r"tok/s"])
        if seen == 0:
            notices += 1
            assert child.match.group(1) == "80"
        child.expect_exact(">>> ")
    assert notices == 1
    child.sendline("Summarize this: " + "the history of Paris and " * 30)
    child.expect(r"error: the prompt is \d+ tokens but the context holds 80")
    child.expect_exact(">>> ")
    child.sendline("Thanks!")  # the session goes on
    child.expect(r"\d+ tokens · [\d.]+ tok/s")
    child.expect_exact(">>> ")
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
