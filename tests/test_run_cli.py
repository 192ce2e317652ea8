"""``edge-llm run`` as people use it: pipes, a terminal, Ctrl-C, hostile stdin, the chat's /show and /set.

Real processes with real pipes (subprocess) or a real pseudo-terminal (pexpect), the embedded default model.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pexpect
import pytest

from edge_llm.default_model import CARD_SOURCE, default_model_path
from edge_llm.tokenizer import Tokenizer

RUN = [sys.executable, "-m", "cli.main", "run"]
ENV = {**os.environ, "NO_COLOR": "1", "TERM": "dumb"}


def run(*args: str, stdin: bytes | None = b"", timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*RUN, *args], input=stdin, capture_output=True, timeout=timeout, env=ENV)


def one_line_error(result: subprocess.CompletedProcess, code: int = 1) -> str:
    stderr = result.stderr.decode()
    assert result.returncode == code, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def test_prompt_and_piped_text_become_one_prompt():
    """As ollama does: `cat notes.txt | edge-llm run --prompt "Summarize:"` sends both."""
    result = run("--prompt", "Repeat after me:", "--temp", "0", "--max-tokens", "1", "--json",
                 stdin=b"The capital of France\n")
    assert result.returncode == 0, result.stderr.decode()
    tokenizer = Tokenizer.from_gguf(default_model_path())
    expected = tokenizer.encode_chat([{"role": "user", "content": "Repeat after me:\n\nThe capital of France"}])
    assert json.loads(result.stdout)["prompt_tokens"] == len(expected)


@pytest.mark.parametrize(("stdin", "args", "says"), [
    (b"What is\0this?", (), "binary data"),
    (b"caf\xe9 au lait", (), "not UTF-8"),
    (b"", ("--prompt", ""), "no prompt"),
])
def test_bad_stdin_or_prompt_is_one_line(stdin, args, says):
    assert says in one_line_error(run(*args, stdin=stdin))


def test_prompt_that_is_not_utf8_is_one_line():
    result = subprocess.run([*map(os.fsencode, RUN), b"--prompt", b"caf\xe9"], capture_output=True, timeout=60,
                            env=ENV, stdin=subprocess.DEVNULL)
    assert "--prompt is not UTF-8" in one_line_error(result)


def test_endless_stdin_is_refused_in_bounded_time_and_memory():
    with open("/dev/zero", "rb") as zero:
        result = subprocess.run(RUN, stdin=zero, capture_output=True, timeout=60, env=ENV)
    assert "stdin holds more than" in one_line_error(result)


def test_one_shot_ctrl_c_prints_what_it_had_and_exits_130():
    proc = subprocess.Popen([*RUN, "--prompt", "Write a very long story about a dragon who learns to code.",
                             "--temp", "0", "--max-tokens", "500"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    first = proc.stdout.read(20)  # the answer is streaming
    proc.send_signal(signal.SIGINT)
    rest, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr.decode()
    assert len(first + rest) >= 20 and (first + rest).endswith(b"\n")
    assert "Traceback" not in stderr.decode() and "interrupted" in stderr.decode()


def test_piped_output_has_no_progress_and_no_stray_lines():
    result = run("--prompt", "Say hello.", "--temp", "0", "--max-tokens", "8")
    assert result.returncode == 0
    assert result.stderr.decode().strip() == ""  # nothing on stderr when nobody watches it
    out = result.stdout.decode()
    assert out.strip() and out.endswith("\n") and not out.endswith("\n\n") and not out.startswith("\n")


def spawn(*args: str, term: str = "dumb") -> pexpect.spawn:
    return pexpect.spawn(sys.executable, ["-m", "cli.main", "run", *args], encoding="utf-8", timeout=120,
                         dimensions=(40, 200), env={**ENV, "TERM": term})


def test_one_shot_in_a_terminal_shows_loading_on_stderr():
    child = spawn("--prompt", "Say hello.", "--temp", "0", "--max-tokens", "4", term="xterm")
    child.expect_exact("loading SmolLM2-135M-Instruct")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_json_in_interactive_mode_is_refused():
    child = spawn("--json")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 2
    assert "--json" in child.before and "--prompt" in child.before and "Traceback" not in child.before


def test_chat_show_and_set_without_a_value():
    child = spawn()
    child.expect_exact(">>> ")
    child.sendline("/show")
    child.expect_exact(">>> ")
    shown = child.before
    assert "chat template" in shown and "the model's own" in shown
    assert re.search(rf"temperature\s+0.2\s+{CARD_SOURCE}", shown)
    assert re.search(r"min_p\s+0.1\s+edge-llm default", shown)
    child.sendline("/set temp")
    child.expect_exact("no value given for temp")
    child.expect_exact(">>> ")
    child.sendline("/set temp 0")
    child.expect_exact("temp = 0")
    child.expect_exact(">>> ")
    child.sendline("/show")
    child.expect(r"temperature\s+0\s+set in this chat")
    child.expect_exact(">>> ")
    child.sendline("/set seed -1")
    child.expect_exact("cannot set seed to '-1'")
    child.expect_exact(">>> ")
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
