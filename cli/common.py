"""What every command shares: the stderr console, one-line errors, the MODEL argument, option values that
are checked as they are parsed (so a bad one is a usage error), human-readable counts."""

from __future__ import annotations

import functools
import sys
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from edge_llm.default_model import NAME as DEFAULT_NAME
from edge_llm.default_model import require_default_model
from edge_llm.errors import EdgeLLMError
from edge_llm.experts.policy import DEFAULT_POLICY, POLICIES
from edge_llm.machine.backend import DTYPE_NAMES

# Status, progress and errors go to stderr so stdout carries only answers and --json.
err = Console(stderr=True, highlight=False)

MODEL_HELP = "Model folder, .gguf file or Hub repo id (owner/name)"
DEFAULT_MODEL_HELP = f"{MODEL_HELP}; default: the embedded {DEFAULT_NAME}."
MAX_PROMPT_LENGTH = 1 << 20  # bench: far beyond any context a machine here runs; a bound, not a size


def one_line(text: str, limit: int | None = None) -> str:
    """``text`` with its line breaks and runs of spaces folded, cut to ``limit`` characters."""
    line = " ".join(text.split())
    return line if limit is None or len(line) <= limit else line[: limit - 1] + "…"


def print_error(message: str) -> None:
    """``error: message`` on stderr, one line (the message is not read as markup)."""
    err.print(f"[bold red]error:[/] {escape(one_line(message))}", markup=True, soft_wrap=True, highlight=False)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Prints one line to stderr and returns the Exit to raise."""
    print_error(message)
    return typer.Exit(code)


def parse_model_ref(value: str) -> str:
    """MODEL as typed; an empty one is refused (as a path it would mean the current folder)."""
    if not value.strip():
        raise typer.BadParameter("empty model reference; give a model folder, a .gguf file or a Hub repo id "
                                 "(owner/name)", param_hint="MODEL")
    return value


def model_argument(help: str = DEFAULT_MODEL_HELP) -> Any:
    """The optional MODEL argument of the commands that fall back to the embedded default model."""
    return typer.Argument(None, metavar="MODEL", help=help, show_default=False, parser=parse_model_ref)


def model_or_default(model: str | None) -> tuple[str, str]:
    """MODEL as given, or the embedded default's file: (the reference to load, the name to show)."""
    if model is None:
        return str(require_default_model()), f"{DEFAULT_NAME} (default model)"
    return model, model


def parse_dtype(value: str) -> str:
    """``--dtype``: one of the compute dtypes MLX runs (a usage error otherwise)."""
    if value not in DTYPE_NAMES:
        raise typer.BadParameter(f"{value!r} is not a dtype edge-llm computes in; use {', '.join(DTYPE_NAMES)}")
    return value


def parse_half_dtype(value: str) -> str:
    """``quantize --dtype``: the half precision of the output's float tensors and scales."""
    if value not in ("float16", "bfloat16"):
        raise typer.BadParameter(f"{value!r} is not a half-precision dtype; use float16 or bfloat16")
    return value


def parse_memory_size(value: str) -> int:
    """``--max-memory``: a size such as 8GB or 512MiB (a usage error otherwise)."""
    from edge_llm.machine.memory import parse_size

    try:
        return parse_size(value)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


def max_memory_option() -> Any:
    from edge_llm.machine.memory import SIZE_HELP

    return typer.Option(None, "--max-memory", metavar="SIZE", parser=parse_memory_size, show_default=False,
                        help=SIZE_HELP + " A MoE that does not fit streams its experts from disk.")


def parse_expert_policy(value: str) -> str:
    if value not in POLICIES:
        raise typer.BadParameter(f"{value!r}: use lru (least recently used leaves first) or lfu (least often used)")
    return value


def expert_policy_option() -> Any:
    return typer.Option(DEFAULT_POLICY, "--expert-policy", metavar="lru|lfu", parser=parse_expert_policy,
                        help="Streamed experts: which leaves the bank for a miss, the least recently or the least "
                             "often used.")


def parse_prompt_lengths(value: str) -> tuple[int, ...]:
    """``bench --prompt-lengths 128,512``: whole numbers of tokens, 1 to 2**20 each."""
    parts = [p.strip() for p in value.split(",") if p.strip()]
    hint = "'--prompt-lengths'"
    if not parts:
        raise typer.BadParameter("give at least one prompt length, e.g. 128,512", param_hint=hint)
    lengths = []
    for part in parts:
        if not part.isdecimal():
            raise typer.BadParameter(f"{part!r} is not a whole number of tokens; e.g. 128,512,2048", param_hint=hint)
        n = int(part)
        if not 1 <= n <= MAX_PROMPT_LENGTH:
            raise typer.BadParameter(f"{n} is out of range: each length must be 1 to {MAX_PROMPT_LENGTH} tokens",
                                     param_hint=hint)
        lengths.append(n)
    return tuple(lengths)


def user_errors(command):
    """Turns the errors a user can cause into one stderr line and exit code 1, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except EdgeLLMError as e:
            raise fail(str(e)) from None
        except ValueError as e:  # invalid option values (sampling settings, ...)
            raise fail(str(e)) from None
        except OSError as e:
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            raise fail(f"{where}{e.strerror or e}") from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


def human_count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


def expert_line(stats: dict) -> str:
    """Streamed experts in one line: bank, hit rate, bytes read, read speed, time spent waiting for reads."""
    from edge_llm.machine.memory import human_bytes

    return (f"bank {stats['slots']} slots/layer ({human_bytes(stats['bank_bytes'])}), {stats['hit_rate']:.0%} hits, "
            f"{human_bytes(stats['bytes_read'])} read at {human_bytes(stats['read_bytes_per_s'])}/s, "
            f"{stats['read_wait_s']:.2f} s waiting for reads")
