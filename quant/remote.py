"""MODEL for the estimator: a local folder, a cached Hub snapshot, or a Hub repo read header-only.

For a repo that is not in the local Hub cache, only ``config.json`` (into a temporary folder, so the
shared cache never holds a partial snapshot) and the safetensors headers (``get_safetensors_metadata``:
HTTP range requests for the first bytes of each shard) are fetched; never weights. References:
huggingface_hub ``hf_api.get_safetensors_metadata``, ``file_download.hf_hub_download``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from edge_llm.checkpoint import Checkpoint, TensorInfo, normalize_config, read_checkpoint
from edge_llm.errors import CheckpointError, HubError
from edge_llm.hub import is_repo_id
from edge_llm.models import supported_model_types


def locate(model: str, revision: str | None = None) -> tuple[Checkpoint, Path | None]:
    """The checkpoint (config + headers) and, when it is local, its folder (for tokenizer files)."""
    path = Path(model).expanduser()
    if path.exists():
        checkpoint = read_checkpoint(path)
        return checkpoint, path if path.is_dir() else None
    if not is_repo_id(model):
        raise CheckpointError(f"{model}: no such model folder (a Hub model is named owner/name)")
    from edge_llm.hub_cache import cached_snapshot

    snapshot = cached_snapshot(model, revision or "main")
    if snapshot is not None:
        return read_checkpoint(snapshot), snapshot
    return remote_checkpoint(model, revision), None


def remote_checkpoint(repo_id: str, revision: str | None = None) -> Checkpoint:
    """config.json and every tensor header of a Hub repo, without downloading weights."""
    from huggingface_hub import errors as hf
    from huggingface_hub import get_safetensors_metadata, hf_hub_download

    where = f"{repo_id}" + (f"@{revision}" if revision else "")
    try:
        with tempfile.TemporaryDirectory(prefix="edge-llm-estimate-") as tmp:
            config_file = hf_hub_download(repo_id, "config.json", revision=revision, local_dir=tmp)
            raw = json.loads(Path(config_file).read_text(encoding="utf-8"))
        meta = get_safetensors_metadata(repo_id, revision=revision)
    except hf.GatedRepoError:  # subclasses RepositoryNotFoundError: catch it first
        raise HubError(f"{where}: gated repo; accept its terms on the Hub and log in (hf auth login)") from None
    except hf.RepositoryNotFoundError:
        raise HubError(f"{where}: no such repo on the Hub (or it is private: log in with hf auth login)") from None
    except hf.RevisionNotFoundError:
        raise HubError(f"{where}: no such revision") from None
    except hf.EntryNotFoundError:
        raise HubError(f"{where}: the repo has no config.json; not a transformers model") from None
    except hf.NotASafetensorsRepoError:
        raise HubError(f"{where}: the repo has no safetensors weights; edge-llm reads only safetensors") from None
    except hf.LocalEntryNotFoundError:
        raise HubError(f"{where}: not in the Hub cache and the Hub cannot be reached (offline?)") from None
    except (hf.SafetensorsParsingError, json.JSONDecodeError) as e:
        raise HubError(f"{where}: unreadable config or safetensors header ({e})") from None
    except OSError as e:  # HfHubHTTPError and connection errors
        raise HubError(f"{where}: cannot read from the Hub ({e})") from None
    config = normalize_config(raw)
    if config.get("model_type") not in supported_model_types():
        raise CheckpointError(f"{where}: model_type {config.get('model_type')!r} is not supported "
                              f"(supported: {', '.join(supported_model_types())})")
    tensors = {}
    for filename, file_meta in meta.files_metadata.items():
        for name, info in file_meta.tensors.items():
            tensors[name] = TensorInfo(name, Path(filename), info.dtype, tuple(info.shape))
    return Checkpoint(Path(repo_id), config, tensors)
