"""``edge-llm list`` and ``edge-llm rm``: the models in the Hugging Face Hub cache that edge-llm can run."""

from __future__ import annotations

import json
import time

import typer

from edge_llm.hub_cache import hub_cache_dir, list_models, plan_removal

from .common import err, fail, human_bytes, human_count, user_errors


def _age(modified: float) -> str:
    seconds = max(time.time() - modified, 0)
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit} ago"
    return "just now"


@user_errors
def list_cached(as_json: bool = typer.Option(False, "--json", help="Print one JSON array.")) -> None:
    """List the cached models edge-llm can run: name, architecture, parameters, quantization, size on disk."""
    models = list_models()
    if as_json:
        print(json.dumps([
            {
                "name": m.repo_id, "revision": m.revision, "commit": m.commit, "path": str(m.path),
                "architecture": m.info.architecture, "model_type": m.info.model_type,
                "params_total": m.info.params_total, "params_active": m.info.params_active,
                "quantization": m.info.quantization, "dtype": m.info.dtype,
                "size_on_disk_bytes": m.size_on_disk, "modified": m.modified,
            }
            for m in models
        ]))
        return
    if not models:
        err.print(f"no runnable models in {hub_cache_dir()}; `edge-llm pull OWNER/NAME` adds one", highlight=False)
        return
    rows = [("NAME", "ARCHITECTURE", "PARAMETERS", "QUANTIZATION", "SIZE", "MODIFIED")]
    for m in models:
        name = m.repo_id if m.revision == "main" else f"{m.repo_id} ({m.revision})"
        params = human_count(m.info.params_total)
        if m.info.params_active != m.info.params_total:
            params += f" ({human_count(m.info.params_active)} active)"
        rows.append((name, m.info.architecture, params, m.info.quantization or m.info.dtype,
                     human_bytes(m.size_on_disk), _age(m.modified)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


@user_errors
def rm(
    model: str = typer.Argument(..., help="Hub repo id, as `edge-llm list` shows it."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Remove a model (every cached revision) from the Hugging Face Hub cache."""
    removal = plan_removal(model)
    if not yes:
        question = f"remove {removal.repo_id} ({human_bytes(removal.size_on_disk)}) from {removal.path.parent}?"
        try:
            confirmed = typer.confirm(question, default=False, err=True)
        except typer.Abort:  # no answer (end of input)
            confirmed = False
        if not confirmed:
            raise fail(f"{removal.repo_id} kept; nothing removed (pass --yes to remove without asking)")
    removal.execute()
    err.print(f"removed {removal.repo_id} ({human_bytes(removal.size_on_disk)} freed)", highlight=False)
