"""The ``edge-llm`` command: one typer app, one module per command."""

from __future__ import annotations

import logging
import os
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version

import typer

from edge_llm.hub.resolve import set_pull_observer

from . import bench, doctor, estimate, info, models, pull, quantize, run, serve
from .usage import App, Command

app = typer.Typer(
    name="edge-llm",
    cls=App,
    help="Run open language models (Mixture-of-Experts first) on this machine, with MLX.",
    no_args_is_help=True,
    rich_markup_mode=None,  # plain help and one-line errors (cli/usage.py), not rich boxes
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

COMMANDS = {
    "run": run.run, "info": info.info, "doctor": doctor.doctor, "bench": bench.bench, "pull": pull.pull,
    "list": models.list_cached, "rm": models.rm, "quantize": quantize.quantize_cmd, "estimate": estimate.estimate_cmd,
    "serve": serve.serve,
}
for name, command in COMMANDS.items():
    app.command(name, cls=Command)(command)


def _print_version(value: bool) -> None:
    if not value:
        return
    try:
        number = package_version("edge-llm")
    except PackageNotFoundError:  # run from a source tree that was never installed
        number = "unknown (not installed)"
    print(f"edge-llm {number}")
    raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print edge-llm's version and exit."),
) -> None:
    """Run open language models (Mixture-of-Experts first) on this machine, with MLX."""


# run/info/... of a repo id not yet cached pull it, with the same progress display as `pull`.
set_pull_observer(pull.RichPullObserver)


def _configure_logging() -> None:
    """EDGE_LLM_LOG=debug|info|warning|error; an unknown level is said once, never a traceback."""
    wanted = os.environ.get("EDGE_LLM_LOG", "WARNING").strip().upper() or "WARNING"
    known = isinstance(logging.getLevelName(wanted), int)
    logging.basicConfig(level=wanted if known else logging.WARNING, format="%(levelname)s: %(message)s")
    if not known:
        logging.warning("EDGE_LLM_LOG=%s is not a log level (debug, info, warning, error); using warning",
                        os.environ["EDGE_LLM_LOG"])


_configure_logging()

if __name__ == "__main__":
    app()
