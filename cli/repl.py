"""The interactive chat loop: slash commands, multi-line input, Ctrl-C that stops only an answer."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import replace

from edge_llm.chat import ChatSession

from .common import err, human_bytes

try:  # line editing and history where the platform has it
    import readline  # noqa: F401
except ImportError:  # pragma: no cover - Windows
    pass

HELP = """\
Commands:
  /help                 this help
  /clear                forget the conversation (the system prompt stays)
  /system TEXT          set the system prompt (empty clears it) and start over
  /set NAME VALUE       temp, top_p, top_k, min_p, repetition_penalty, seed, max_tokens
  /stats                statistics of the last answer
  /bye                  leave (or Ctrl-D)
Enclose several lines in \"\"\" to send them as one message. Ctrl-C stops an answer."""

SETTINGS: dict[str, tuple[str, Callable[[str], object]]] = {
    "temp": ("temperature", float),
    "temperature": ("temperature", float),
    "top_p": ("top_p", float),
    "top_k": ("top_k", int),
    "min_p": ("min_p", float),
    "repetition_penalty": ("repetition_penalty", float),
    "seed": ("seed", int),
}


@contextmanager
def sigint_sets(event: threading.Event):
    """While inside, Ctrl-C sets ``event`` instead of raising (the answer stops, the chat stays)."""
    event.clear()
    previous = signal.signal(signal.SIGINT, lambda *_: event.set())
    try:
        yield event
    finally:
        signal.signal(signal.SIGINT, previous)


def read_message(prompt: str = ">>> ") -> str:
    """One message; a line starting with \"\"\" opens a block that a line ending with \"\"\" closes."""
    line = input(prompt)
    if not line.lstrip().startswith('"""'):
        return line
    body = line.lstrip()[3:]
    if body.rstrip().endswith('"""') and body.strip():
        return body.rstrip()[:-3]
    lines = [body] if body else []
    while True:
        line = input("... ")
        if line.rstrip().endswith('"""'):
            lines.append(line.rstrip()[:-3])
            return "\n".join(lines).strip("\n")
        lines.append(line)


def stats_line(session: ChatSession) -> str:
    t = session.last
    if t is None:
        return "no answer yet"
    g = t.generation
    reused = f", {t.reused_tokens} reused" if t.reused_tokens else ""
    note = "" if g.finish_reason == "stop" else f" · {g.finish_reason}"
    return (
        f"{g.generation_tokens} tokens · {g.generation_tps:.1f} tok/s · "
        f"prompt {g.prompt_tokens} tokens{reused} at {g.prompt_tps:.1f} tok/s · "
        f"peak {human_bytes(g.peak_memory_bytes)}{note}"
    )


def apply_command(session: ChatSession, line: str) -> bool:
    """Runs a slash command; returns False when the user leaves."""
    name, _, arg = line[1:].partition(" ")
    arg = arg.strip()
    if name in ("bye", "exit", "quit"):
        return False
    if name in ("help", "?"):
        print(HELP)
    elif name == "clear":
        session.clear()
        err.print("conversation cleared")
    elif name == "system":
        session.set_system(arg)
        session.clear()
        err.print("system prompt set" if arg else "system prompt cleared")
    elif name == "stats":
        err.print(stats_line(session))
    elif name == "set":
        set_option(session, arg)
    else:
        err.print(f"unknown command /{name}; /help lists them")
    return True


def set_option(session: ChatSession, arg: str) -> None:
    key, _, value = arg.partition(" ")
    value = value.strip()
    try:
        if key == "max_tokens":
            if int(value) < 1:
                raise ValueError("max_tokens must be >= 1")
            session.max_tokens = int(value)
        elif key in SETTINGS:
            field, parse = SETTINGS[key]
            session.params = replace(session.params, **{field: parse(value)})
        else:
            err.print(f"usage: /set {{{'|'.join(list(SETTINGS) + ['max_tokens'])}}} VALUE")
            return
    except ValueError as e:
        err.print(f"cannot set {key} to {value!r}: {e}")
        return
    err.print(f"{key} = {value}")


def answer(session: ChatSession, text: str, interrupt: threading.Event) -> None:
    with sigint_sets(interrupt):
        for chunk in session.ask(text, interrupt=interrupt):
            if chunk.text:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if session.last and session.last.generation.finish_reason == "interrupted":
        err.print("(answer stopped)", style="yellow")
    err.print(stats_line(session), style="dim")


def repl(session: ChatSession, name: str) -> None:
    err.print(f"chatting with {name}; /help for commands, /bye or Ctrl-D to leave")
    interrupt = threading.Event()
    while True:
        try:
            line = read_message()
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print()
            err.print("use /bye or Ctrl-D to leave")
            continue
        if not line.strip():
            continue
        if line.startswith("/"):
            if not apply_command(session, line.strip()):
                return
            continue
        answer(session, line, interrupt)
