"""How the command line presents itself: help in the classic shape, and every failure as one line.

Typer draws help and usage errors in rich boxes and tags each option with its Python type (``--json
<bool>``, ``{model} <str>``). Here, once for the whole app: ``Command`` prints ``MODEL`` / ``[MODEL]``
and ``--bits N`` (flags take no metavar), and ``App.main`` turns a usage error into one stderr line
(exit 2, as usage errors conventionally exit) and any exception a command let through into one line
and exit 1, the traceback only under ``EDGE_LLM_LOG=debug``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Any

import typer
from typer._click.exceptions import ClickException, NoArgsIsHelpError  # typer >= 0.29 ships its own click
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from .common import one_line, print_error

log = logging.getLogger("edge_llm.cli")

# Metavars for options that name none: by the value's Python type.
TYPE_METAVARS = {"int": "N", "float": "NUMBER", "str": "TEXT"}
MAX_MESSAGE = 400  # characters of an unexpected error's message worth a line


def _argument_name(param: TyperArgument) -> str:
    return param.metavar or param.name.upper()


def _option_metavar(param: TyperOption) -> str:
    desc = param.type_descriptor
    if desc.is_choice and desc.choices:
        return "[" + "|".join(str(getattr(c, "value", c)) for c in desc.choices) + "]"
    return TYPE_METAVARS.get(param.bare_type(), "VALUE")


class Command(TyperCommand):
    """A command whose help reads ``Usage: edge-llm info [OPTIONS] [MODEL]`` and ``--bits N``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if isinstance(param, TyperOption) and not param.is_flag and param.metavar is None:
                param.metavar = _option_metavar(param)

    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                name = _argument_name(param)
                pieces.append(name if param.required else f"[{name}]")
        return pieces

    def format_options(self, ctx: typer.Context, formatter: Any) -> None:
        params = [p for p in self.get_params(ctx) if not p.hidden]
        arguments = [(_argument_name(p), p.help or "") for p in params if isinstance(p, TyperArgument)]
        options = [r for p in params if not isinstance(p, TyperArgument) and (r := p.get_help_record(ctx))]
        for title, rows in (("Arguments", arguments), ("Options", options)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


def usage_line(e: ClickException) -> str:
    """``invalid value for '--temp': ... (see `edge-llm run --help`)``."""
    text = one_line(e.format_message()).rstrip(".")
    text = text[:1].lower() + text[1:]
    ctx = getattr(e, "ctx", None)
    return f"{text} (see `{ctx.command_path} --help`)" if ctx is not None else text


class App(TyperGroup):
    """The ``edge-llm`` group: runs a command and turns whatever escapes it into one stderr line."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except NoArgsIsHelpError as e:  # bare `edge-llm`: the help, not an error line
            e.show()
            sys.exit(e.exit_code)
        except ClickException as e:
            print_error(usage_line(e))
            sys.exit(e.exit_code)
        except typer.Abort:
            print_error("aborted")
            sys.exit(1)
        except Exception as e:  # the last line of defence: a bug, still one line
            log.debug("unexpected error", exc_info=True)
            message = f": {one_line(str(e), MAX_MESSAGE)}" if str(e).strip() else ""
            print_error(f"unexpected {type(e).__name__}{message} (a bug in edge-llm; run with EDGE_LLM_LOG=debug "
                        "for the traceback)")
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)
