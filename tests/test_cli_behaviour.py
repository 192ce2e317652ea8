"""The CLI as people use it: one-line usage errors (exit 2), one line for any other failure (exit 1), help
in the classic shape for every command, --version, shell completion, the embedded default model where
MODEL is left out, ``list`` showing it, a declined ``rm``, and clean output on pipes.

CliRunner for the parsing paths, real processes (pipes, a fresh interpreter) where the console or the
environment matters.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import COMMANDS, app
from edge_llm.default_model import NAME as DEFAULT_NAME
from edge_llm.default_model import default_model_path
from tests.hf_oracle import build_tiny_checkpoint
from tests.tiny_configs import TINY_CONFIGS

REPO_ROOT = Path(__file__).resolve().parent.parent
RICH_BOX = re.compile("[╭╰│─]")


def one_error_line(stderr: str) -> str:
    """The single stderr line of a failed command (asserts there is exactly one, and no traceback)."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and "Traceback" not in stderr and not RICH_BOX.search(stderr), stderr
    return lines[0]


def edge_llm(*args: str, env: dict[str, str] | None = None, stdin: str = "", timeout: float = 120,
             cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    """``edge-llm ARGS`` in a fresh process, stdout and stderr on pipes."""
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, input=stdin,
                          env={**os.environ, "NO_COLOR": "1", **(env or {})}, timeout=timeout, cwd=cwd)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llama", with_tokenizer=True,
                                 **TINY_CONFIGS["llama"])


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """A private EDGE_LLM_HOME that already knows this machine's bandwidth (bench would measure it: ~10 s)."""
    from edge_llm.machine.backend import detect

    folder = tmp_path_factory.mktemp("home")
    b = detect()
    (folder / "bandwidth.json").write_text(json.dumps({f"{b.name}:{b.device_name}": 1e10}))
    return folder


@pytest.mark.parametrize("args, says", [
    (["run", "--temp", "-1"], "'--temp'"),
    (["run", "--max-tokens", "0"], "'--max-tokens'"),
    (["estimate", "--context", "0"], "'--context'"),
    (["estimate", "--batch", "0"], "'--batch'"),
    (["bench", "--decode-tokens", "0"], "'--decode-tokens'"),
    (["bench", "--bogus"], "no such option: --bogus"),
    (["quantize", "model"], "missing option '--out'"),
    (["rm"], "missing argument 'MODEL'"),
    (["rnu"], "did you mean 'run'"),
    (["--temp", "1"], "no such option"),
])  # fmt: skip
def test_usage_errors_are_one_line_exit_2(args, says):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    line = one_error_line(result.stderr)
    assert says.lower() in line.lower() and "--help" in line, line


def test_usage_error_through_real_pipes():
    proc = edge_llm("estimate", "--context", "0")
    assert proc.returncode == 2 and proc.stdout == ""
    assert "'--context'" in one_error_line(proc.stderr)


def test_an_unexpected_error_is_one_line_and_its_traceback_only_under_debug(tmp_path):
    # A bug nobody knows of yet, planted where every command is reached: the CLI must still print one line.
    script = ("import sys, cli.doctor as d\n"
              "def detect():\n    raise RuntimeError('planted\\nfault')\n"
              "d.detect = detect\nfrom cli.main import app\nsys.argv[0] = 'edge-llm'\napp()\n")
    command = [sys.executable, "-c", script, "doctor"]
    env = {**os.environ, "NO_COLOR": "1", "EDGE_LLM_LOG": "warning"}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == 1
    line = one_error_line(proc.stderr)
    assert "unexpected RuntimeError: planted fault" in line and "EDGE_LLM_LOG=debug" in line
    debug = subprocess.run(command, capture_output=True, text=True, env={**env, "EDGE_LLM_LOG": "debug"},
                           cwd=REPO_ROOT, timeout=120)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "RuntimeError: planted" in debug.stderr


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_names_real_metavars(command):
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert not re.search(r"<[a-z ]+>|\{[a-z_]+\}", text), text  # typer's <bool>, <int range>, {model}
    assert not RICH_BOX.search(text)
    usage = text.splitlines()[0]
    assert usage.startswith(f"Usage: edge-llm {command} [OPTIONS]"), usage
    for flag in ("--json", "--force", "--eval", "--verify", "--remeasure", "--yes"):
        for line in text.splitlines():
            assert not re.search(rf"{flag} [A-Z<]", line), line  # a flag takes no value


@pytest.mark.parametrize("command, usage", [
    ("run", "[MODEL]"), ("info", "[MODEL]"), ("estimate", "[MODEL]"), ("bench", "[MODEL]"), ("quantize", "MODEL"),
])  # fmt: skip
def test_model_argument_is_spelled_one_way(command, usage):
    text = CliRunner().invoke(app, [command, "--help"]).stdout
    assert text.splitlines()[0].endswith(f"[OPTIONS] {usage}")
    described = " ".join(text.split("Arguments:")[1].split("Options:")[0].split())  # the wrapped lines, joined
    assert described.startswith("MODEL "), described
    assert "folder" in described and ".gguf file" in described and "Hub repo id" in described, described
    if usage == "[MODEL]":
        assert f"default: the embedded {DEFAULT_NAME}" in described, described


def test_version_comes_from_the_package_metadata():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout == f"edge-llm {version('edge-llm')}\n"
    assert result.stdout == "edge-llm 0.1.0\n"


def test_shell_completion_is_offered_and_completes():
    help_text = CliRunner().invoke(app, ["--help"]).stdout
    assert "--install-completion" in help_text and "--show-completion" in help_text
    env = {"_EDGE_LLM_COMPLETE": "complete_bash", "COMP_WORDS": "edge-llm qu", "COMP_CWORD": "1"}
    completed = subprocess.run([sys.executable, "-c", "import sys; sys.argv[0] = 'edge-llm'; "
                                "from cli.main import app; app(prog_name='edge-llm')"],
                               capture_output=True, text=True, env={**os.environ, **env}, cwd=REPO_ROOT, timeout=120)
    assert completed.returncode == 0 and completed.stdout.split() == ["quantize"], completed


@pytest.mark.parametrize("args", [["info", "--json"], ["estimate", "--json"]])
def test_model_defaults_to_the_embedded_one(args):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["params_total"] > 100_000_000 and data.get("model_type", "llama") == "llama"


def test_bench_defaults_to_the_embedded_model(home, monkeypatch):
    monkeypatch.setenv("EDGE_LLM_HOME", str(home))
    result = CliRunner().invoke(app, ["bench", "--prompt-lengths", "8", "--decode-tokens", "2", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["model"] == str(default_model_path())


def test_list_shows_the_embedded_default(tmp_path):
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")}
    table = edge_llm("list", env=env)
    assert table.returncode == 0, table.stderr
    rows = table.stdout.splitlines()
    assert rows[0].split()[0] == "NAME" and rows[1].startswith(f"{DEFAULT_NAME} (default)"), table.stdout
    (entry,) = json.loads(edge_llm("list", "--json", env=env).stdout)
    assert entry["default"] is True and entry["name"] == DEFAULT_NAME and entry["path"] == str(default_model_path())
    assert entry["architecture"] == "LlamaForCausalLM" and entry["size_on_disk_bytes"] > 90_000_000


def test_declining_rm_exits_0_and_keeps_the_model(tmp_path):
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")}
    folder = tmp_path / "hf" / "hub" / "models--org--tiny"
    (folder / "blobs").mkdir(parents=True)
    (folder / "blobs" / "x").write_bytes(b"0" * 1000)
    declined = edge_llm("rm", "org/tiny", env=env, stdin="n\n")
    assert declined.returncode == 0 and "org/tiny kept; nothing removed" in declined.stderr, declined.stderr
    assert "error" not in declined.stderr and folder.is_dir()
    no_answer = edge_llm("rm", "org/tiny", env=env)  # end of input: the same choice
    assert no_answer.returncode == 0 and folder.is_dir()
    removed = edge_llm("rm", "org/tiny", "--yes", env=env)
    assert removed.returncode == 0 and not folder.exists(), removed.stderr


def test_piped_output_has_no_stray_blank_lines(tiny, home, tmp_path):
    for args in (["info", str(tiny)], ["estimate", str(tiny)], ["quantize", str(tiny), "-o", str(tmp_path / "q")],
                 ["bench", str(tiny), "--prompt-lengths", "16", "--decode-tokens", "2"]):
        proc = edge_llm(*args, env={"EDGE_LLM_HOME": str(home)})
        assert proc.returncode == 0, proc.stderr
        for stream in (proc.stdout, proc.stderr):
            assert "" not in stream.splitlines() and "\r" not in stream and "\x1b" not in stream, (args, stream)


def test_an_unknown_log_level_is_said_once_not_a_traceback():
    proc = edge_llm("--version", env={"EDGE_LLM_LOG": "verbose"})
    assert proc.returncode == 0 and proc.stdout == "edge-llm 0.1.0\n"
    assert proc.stderr.strip().splitlines() == [
        "WARNING: EDGE_LLM_LOG=verbose is not a log level (debug, info, warning, error); using warning"]
