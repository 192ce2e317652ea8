"""The chat as a person uses it: a real pseudo-terminal, typed turns, Ctrl-C, /clear, /bye."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pexpect
import pytest

pytestmark = pytest.mark.slow

PROMPT = ">>> "
STATS = re.compile(r"(\d+) tokens · [\d.]+ tok/s · prompt (\d+) tokens(?:, (\d+) reused)?")


def spawn_chat(folder, *args: str) -> pexpect.spawn:
    child = pexpect.spawn(
        sys.executable, ["-m", "cli.main", "run", str(folder), "--temp", "0", *args],
        encoding="utf-8", timeout=120, dimensions=(40, 200), env={**os.environ, "NO_COLOR": "1", "TERM": "dumb"},
    )
    child.expect_exact(PROMPT)
    return child


def ask(child: pexpect.spawn, text: str) -> tuple[str, re.Match]:
    child.sendline(text)
    child.expect(STATS)
    stats = child.match
    answer = child.before
    child.expect_exact(PROMPT)
    return answer, stats


def test_chat_session(smollm2_folder):
    child = spawn_chat(smollm2_folder, "--max-tokens", "48")
    first, stats1 = ask(child, "What is the capital of France?")
    assert "Paris" in first
    assert stats1.group(3) is None  # nothing to reuse on the first turn
    second, stats2 = ask(child, "What is the population of that city?")
    assert "Paris" in second.split("that city?")[-1]  # only the first turn says which city
    # The second turn prefills only its new tokens: most of the prompt comes from the cache.
    new, reused = int(stats2.group(2)), int(stats2.group(3))
    assert reused > int(stats1.group(2)) and new < 20

    child.sendline("/clear")
    child.expect_exact("conversation cleared")
    child.expect_exact(PROMPT)
    _, stats3 = ask(child, "Hello!")
    assert stats3.group(3) is None  # the cache was emptied

    # long enough that Ctrl-C lands mid-answer however fast decoding is (the CPU kernels made 400 tokens ~6 s)
    child.sendline("/set max_tokens 3000")
    child.expect_exact("max_tokens = 3000")
    child.expect_exact(PROMPT)
    child.sendline("Write a very long story about a dragon who learns to code.")
    child.expect_exact("learns to code.\r\n")  # the echo of what was typed
    child.expect(r"\w+ \w+ \w+ \w+")  # the answer is streaming
    child.sendintr()
    child.expect_exact("(answer stopped)")
    child.expect(STATS)
    assert int(child.match.group(1)) < 3000
    child.expect_exact(PROMPT)
    answer, _ = ask(child, "What is the capital of France?")
    assert "Paris" in answer.split("France?")[-1]

    child.sendintr()  # Ctrl-C at the prompt does not leave
    child.expect_exact("/bye or Ctrl-D")
    child.sendline("/stats")
    child.expect(STATS)
    child.expect_exact(PROMPT)
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_multiline_and_ctrl_d(smollm2_folder):
    child = spawn_chat(smollm2_folder, "--max-tokens", "8")
    child.sendline('"""')
    child.sendline("Say yes")
    child.sendline('or no."""')
    child.expect(STATS)
    child.expect_exact(PROMPT)
    child.sendline("/system You are a pirate.")
    child.expect_exact("system prompt set")
    child.expect_exact(PROMPT)
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_piped_stdin_is_one_shot(smollm2_folder):
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "run", str(smollm2_folder), "--temp", "0", "--max-tokens", "24"],
        input="What is the capital of France?", capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert PROMPT not in result.stdout
