"""``edge-llm list`` and ``edge-llm rm``: the models in the Hugging Face Hub cache that edge-llm can run."""

from __future__ import annotations

import json
import time

import typer

from edge_llm.default_model import NAME as DEFAULT_NAME
from edge_llm.default_model import default_model_path
from edge_llm.errors import EdgeLLMError
from edge_llm.formats.open import open_checkpoint
from edge_llm.hub.cache import CachedModel, hub_cache_dir, list_models, plan_removal
from edge_llm.machine.memory import human_bytes
from edge_llm.modelinfo import describe

from .common import err, human_count, user_errors


def _age(modified: float) -> str:
    seconds = max(time.time() - modified, 0)
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit} ago"
    return "just now"


def _default_model() -> CachedModel | None:
    """The embedded default model as a row of the list (it lives in a Python package, not the Hub cache)."""
    path = default_model_path()
    if path is None:
        return None
    try:
        info = describe(open_checkpoint(path))
    except EdgeLLMError as e:  # a damaged install: `run` says so when it is used
        err.print(f"the default model {path} cannot be read: {e}", highlight=False, soft_wrap=True)
        return None
    stat = path.stat()
    return CachedModel(DEFAULT_NAME, "", "", path, stat.st_size, stat.st_mtime, info)


@user_errors
def list_cached(as_json: bool = typer.Option(False, "--json", help="Print one JSON array.")) -> None:
    """List the models edge-llm can run without a download: those in the Hugging Face Hub cache and the embedded
    default."""
    models = [(m, False) for m in list_models()]
    default = _default_model()
    if default is not None:
        models.append((default, True))
    if as_json:
        print(json.dumps([
            {
                "name": m.repo_id, "revision": m.revision or None, "commit": m.commit or None, "path": str(m.path),
                "default": is_default,
                "architecture": m.info.architecture, "model_type": m.info.model_type,
                "params_total": m.info.params_total, "params_active": m.info.params_active,
                "quantization": m.info.quantization, "dtype": m.info.dtype,
                "size_on_disk_bytes": m.size_on_disk, "modified": m.modified,
            }
            for m, is_default in models
        ]))
        return
    if not models:
        err.print(f"no runnable models in {hub_cache_dir()}; `edge-llm pull OWNER/NAME` adds one", highlight=False)
        return
    rows = [("NAME", "ARCHITECTURE", "PARAMETERS", "QUANTIZATION", "SIZE", "MODIFIED")]
    for m, is_default in models:
        name = m.repo_id if m.revision in ("main", "") else f"{m.repo_id} ({m.revision})"
        name += " (default)" if is_default else ""
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
    model: str = typer.Argument(..., metavar="MODEL", help="Hub repo id (owner/name), as `edge-llm list` shows it."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Remove a model (every cached revision) from the Hugging Face Hub cache."""
    removal = plan_removal(model)
    what = (f"{removal.repo_id} (a link to {removal.link_target}: only the link goes)" if removal.link_target
            else f"{removal.repo_id} ({human_bytes(removal.size_on_disk)})")
    if not yes:
        question = f"remove {what} from {removal.path.parent}?"
        try:
            confirmed = typer.confirm(question, default=False, err=True)
        except typer.Abort:  # no answer (end of input)
            confirmed = False
        if not confirmed:  # the user's choice, not an error
            err.print(f"{removal.repo_id} kept; nothing removed (pass --yes to remove without asking)",
                      highlight=False)
            return
    removal.execute()
    freed = (f"the link; {removal.link_target} is kept" if removal.link_target
             else f"{human_bytes(removal.size_on_disk)} freed")
    err.print(f"removed {removal.repo_id} ({freed})", highlight=False)
