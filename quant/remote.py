"""MODEL for the estimator and ``run``'s memory check: config + tensor headers, never weights.

A local folder or GGUF file, a cached Hub snapshot, or a Hub repo read header-only: all through
``edge_llm.hub_remote.read_model_headers``, the same branches and error lines ``hub.resolve_model`` uses.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from edge_llm.formats.checkpoint import Checkpoint
from edge_llm.hub_remote import read_model_headers


def locate(model: str, revision: str | None = None) -> tuple[Checkpoint, Path | None]:
    """The checkpoint (config + headers) and, when it is a local folder, that folder (for tokenizer files).

    A repo read from the Hub comes back with ``path`` set to its repo id: its small files are gone once
    this returns.
    """
    found = read_model_headers(model, revision)
    if found.remote is not None:
        return replace(found.checkpoint, path=Path(model)), None
    local = found.local
    return found.checkpoint, local if local is not None and local.is_dir() else None
