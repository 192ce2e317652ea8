"""Where edge-llm keeps what it measured or built on this machine: ``$EDGE_LLM_HOME`` (default
``~/.cache/edge-llm``): memory and disk bandwidth figures, the compiled CPU kernels."""

from __future__ import annotations

import os
from pathlib import Path


def state_dir() -> Path:
    return Path(os.environ.get("EDGE_LLM_HOME") or Path.home() / ".cache" / "edge-llm")
