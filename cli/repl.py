"""The interactive chat loop: slash commands, multi-line input, Ctrl-C that stops only an answer."""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, replace

from edge_llm.errors import ContextError, EdgeLLMError
from edge_llm.experts.load import expert_stats
from edge_llm.generation.chat import ChatSession
from edge_llm.generation.sampling_defaults import SamplingSettings
from edge_llm.machine.memory import human_bytes

from .common import err, expert_line

try:  # line editing and history where the platform has it
    import readline  # noqa: F401
except ImportError:  # pragma: no cover - Windows
    pass

HELP = """\
Commands:
  /help                 this help
  /show                 the model, the chat template and the settings in force (with where each came from)
  /clear                forget the conversation (the system prompt stays)
  /system TEXT          set the system prompt (empty clears it) and start over
  /set NAME VALUE       temp, top_p, top_k, min_p, repetition_penalty, seed, max_tokens
  /stats                statistics of the last answer
  /bye                  leave (or Ctrl-D)
Enclose several lines in \"\"\" to send them as one message. Ctrl-C stops an answer."""

# /set NAME -> the sampling setting it changes ("seed" and "max_tokens" are the session's own)
SETTINGS = {
    "temp": "temperature", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
    "min_p": "min_p", "repetition_penalty": "repetition_penalty",
}
SET_BY_USER = "set in this chat"


@dataclass
class ChatState:
    """What the REPL knows beyond the session: the model's name and path, the settings and their sources."""

    name: str
    path: str
    settings: SamplingSettings
    about: str = ""  # one line on the model: architecture, parameters, quantization, context


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


def apply_command(session: ChatSession, state: ChatState, line: str) -> bool:
    """Runs a slash command; returns False when the user leaves."""
    name, _, arg = line[1:].partition(" ")
    arg = arg.strip()
    if name in ("bye", "exit", "quit"):
        return False
    if name in ("help", "?"):
        print(HELP)
    elif name == "show":
        print(show(session, state))
    elif name == "clear":
        session.clear()
        err.print("conversation cleared")
    elif name == "system":
        session.set_system(arg)
        session.clear()
        err.print("system prompt set" if arg else "system prompt cleared")
    elif name == "stats":
        err.print(stats_line(session))
        if experts := expert_stats(session.model):
            err.print(f"experts since the start: {expert_line(experts)}", soft_wrap=True)
    elif name == "set":
        set_option(session, state, arg)
    else:
        err.print(f"unknown command /{name}; /help lists them")
    return True


def set_option(session: ChatSession, state: ChatState, arg: str) -> None:
    key, _, value = arg.partition(" ")
    value = value.strip()
    names = [*SETTINGS, "seed", "max_tokens"]
    if key not in names or not value:
        missing = f"no value given for {key}; " if key in names else ""
        err.print(f"{missing}usage: /set NAME VALUE, NAME one of {', '.join(names)}", soft_wrap=True)
        return
    try:
        if key == "max_tokens":
            if int(value) < 1:
                raise ValueError("max_tokens must be >= 1")
            session.max_tokens = int(value)
        elif key == "seed":
            session.params = replace(session.params, seed=int(value))
        else:
            number = int(value) if key == "top_k" else float(value)
            state.settings = state.settings.override(SET_BY_USER, **{SETTINGS[key]: number})
            session.params = state.settings.params(session.params.seed)
    except ValueError as e:
        reason = "not a number" if "invalid literal" in str(e) or "could not convert" in str(e) else e
        err.print(f"cannot set {key} to {value!r}: {reason}", soft_wrap=True)
        return
    err.print(f"{key} = {value}")


def show(session: ChatSession, state: ChatState) -> str:
    """/show: the model, its chat template, the settings in force and where each came from."""
    tok = session.tokenizer
    template = ("the model's own" if "default" in tok.chat_templates
                else "none in the model: plain 'System:/User:/Assistant:' turns")
    rows = [("model", f"{state.name} ({state.path})"), ("", state.about), ("chat template", template),
            ("system prompt", session.system or "(none)")]
    rows += [(name, f"{s.value:<8g} {s.source}") for name, s in state.settings.settings.items()]
    rows += [("seed", "none (random)" if session.params.seed is None else str(session.params.seed)),
             ("max_tokens", str(session.max_tokens))]
    return "\n".join(f"{k:>18}  {v}" for k, v in rows if v)


def answer(session: ChatSession, text: str, interrupt: threading.Event) -> None:
    try:
        with sigint_sets(interrupt):
            for chunk in session.ask(text, interrupt=interrupt):
                if chunk.text:
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
    except ContextError as e:  # refused before any work; the conversation is as it was
        err.print(f"error: {e}", style="red")
        return
    sys.stdout.write("\n")
    sys.stdout.flush()
    last = session.last
    if last and last.generation.finish_reason == "interrupted":
        err.print("(answer stopped)", style="yellow")
    if last and last.dropped_turns and session.dropped_turns == last.dropped_turns:  # the first time only
        err.print(f"context full ({session.context} tokens): older turns are forgotten from now on", style="yellow")
    err.print(stats_line(session), style="dim")


def repl(session: ChatSession, state: ChatState) -> None:
    err.print(f"chatting with {state.name}; /help for commands, /bye or Ctrl-D to leave")
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
            if not apply_command(session, state, line.strip()):
                return
            continue
        try:
            answer(session, line, interrupt)
        except EdgeLLMError as e:  # e.g. a message longer than the context: say so, keep the chat
            err.print(f"[bold red]error:[/] {e}", soft_wrap=True)
