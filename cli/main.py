"""The ``edge-llm`` command: one typer app, one module per command."""

from __future__ import annotations

import logging
import os

import typer

from edge_llm.hub import set_pull_observer

from . import bench, doctor, estimate, info, models, pull, quantize, run

app = typer.Typer(
    name="edge-llm",
    help="Run open language models (Mixture-of-Experts first) on this machine, with MLX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("run")(run.run)
app.command("info")(info.info)
app.command("doctor")(doctor.doctor)
app.command("bench")(bench.bench)
app.command("pull")(pull.pull)
app.command("list")(models.list_cached)
app.command("rm")(models.rm)
app.command("quantize")(quantize.quantize_cmd)
app.command("estimate")(estimate.estimate_cmd)
# run/info/... of a repo id not yet cached pull it, with the same progress display as `pull`.
set_pull_observer(pull.RichPullObserver)

logging.basicConfig(level=os.environ.get("EDGE_LLM_LOG", "WARNING").upper(), format="%(levelname)s: %(message)s")

if __name__ == "__main__":
    app()
