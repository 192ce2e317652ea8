"""A Hugging Face model folder as a ``Checkpoint``: config.json (both key styles), safetensors shards.

The config is normalized to the classic keys the architectures read (``normalize_config``); every shard's
header is parsed and bounded before MLX sees it (``safetensors_header``); the whole is validated
(``validate.check_checkpoint``). ``mx.load`` reads the weights lazily.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from ..errors import CheckpointError
from ..generation.sampling_defaults import sampling_from_generation_config
from ..limits import MAX_TENSORS
from ..models import supported_model_types
from ..tokenizer import Tokenizer
from .checkpoint import Checkpoint, lazy_zeros
from .safetensors_header import read_safetensors_header
from .side_files import FolderSideFiles, select_side_files
from .tensors import StoredTensor, TensorInfo, safetensors_array
from .validate import check_checkpoint

INDEX_FILE = "model.safetensors.index.json"


def normalize_config(raw: dict[str, Any]) -> dict[str, Any]:
    """Accepts both config key styles and returns the classic one the architectures read.

    transformers 5 writes ``rope_parameters: {rope_theta, rope_type, factor, ...}`` where older
    configs have ``rope_theta`` + ``rope_scaling``, and ``num_local_experts`` where some say
    ``num_experts``. Real Hub checkpoints use both; we fill in whichever is missing.
    """
    config = dict(raw)
    params = config.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        config.setdefault("rope_theta", params["rope_theta"])
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default" and not config.get("rope_scaling"):
            config["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
    scaling = config.get("rope_scaling")
    if isinstance(scaling, dict):
        scaling = dict(scaling)
        scaling.setdefault("rope_type", scaling.get("type", "default"))
        config["rope_scaling"] = None if scaling["rope_type"] == "default" else scaling
    for a, b in (("num_local_experts", "num_experts"), ("num_experts", "num_local_experts")):
        if config.get(a) is not None and config.get(b) is None:
            config[b] = config[a]
    if "quantization" not in config and isinstance(config.get("quantization_config"), dict):
        qc = config["quantization_config"]
        if "group_size" in qc and "bits" in qc and qc.get("quant_method") in (None, "mlx"):
            config["quantization"] = qc
    return config


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json; expected a Hugging Face model folder")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e}); re-download or fix the file") from None
    except RecursionError:
        raise CheckpointError(f"{path}: invalid JSON (nested too deep); re-download or fix the file") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(raw).__name__}")
    return normalize_config(raw)


def _weight_files(folder: Path) -> list[Path]:
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = list(dict.fromkeys(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{index}: invalid index (no weight_map); re-download it") from None
        if not all(isinstance(name, str) and name and Path(name).name == name for name in files):
            raise CheckpointError(f"{index}: invalid index (its weight_map names files outside the folder)")
        return [folder / name for name in files]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt*")]
        hint = f" (found {pickles[0]}: edge-llm never loads pickled weights)" if pickles else ""
        raise CheckpointError(f"{folder}: no *.safetensors weights{hint}")
    return files



@dataclass
class FolderCheckpoint(Checkpoint):
    """A model folder: ``path`` holds config.json, the safetensors shards and the tokenizer files."""

    format_name = "safetensors"

    def load_weights(self, skip: Callable[[str], bool] | None = None) -> dict[str, mx.array]:
        weights: dict[str, mx.array] = {}
        for file in self.weight_files:
            try:
                weights.update(mx.load(str(file)))
            except (RuntimeError, ValueError) as e:
                raise CheckpointError(f"{file}: cannot read weights ({e}); re-download it") from None
        if skip is not None:  # mx.load is lazy: what is replaced here is never read
            weights.update({name: lazy_zeros(self.tensors[name]) for name in weights if skip(name)})
        return weights

    def decode_stored(self, name: str, stored: StoredTensor, data: np.ndarray,
                      shape: tuple[int, ...]) -> dict[str, mx.array]:
        return {name: safetensors_array(data, stored.dtype, shape)}

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_folder(self.path)

    def sampling_config(self) -> tuple[str, dict[str, Any]]:
        path = self.path / "generation_config.json"
        try:
            generation = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except (OSError, ValueError, RecursionError):  # a broken optional file only loses its recommendations
            generation = {}
        values = sampling_from_generation_config(generation) if isinstance(generation, dict) else {}
        return "generation_config.json", values

    def hf_config(self) -> dict[str, Any]:
        """The folder's own config.json, as written (not normalized)."""
        return json.loads(self.config_path.read_text(encoding="utf-8"))

    def side_files(self) -> FolderSideFiles:
        return select_side_files(self.path)


def read_folder(folder: Path) -> FolderCheckpoint:
    """Reads config and tensor headers of a model folder, validating what can be checked cheaply."""
    config = read_config(folder)
    model_type = config.get("model_type")
    if model_type not in supported_model_types():
        raise CheckpointError(
            f"{folder / 'config.json'}: model_type {model_type!r} is not supported "
            f"(supported: {', '.join(supported_model_types())})"
        )
    tensors: dict[str, TensorInfo] = {}
    for file in _weight_files(folder):
        tensors.update(read_safetensors_header(file))
        if len(tensors) > MAX_TENSORS:
            raise CheckpointError(f"{folder}: more than {MAX_TENSORS:,} tensors in its weight files; not a model")
    checkpoint = FolderCheckpoint(folder, config, tensors)
    check_checkpoint(checkpoint)
    return checkpoint
