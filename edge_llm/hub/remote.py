"""A Hub repo read header-only: config.json, the small metadata files and every safetensors header, no weights.

``estimate``, ``info`` and ``run``'s memory check answer from this for a repo that is not in the local Hub
cache. It asks the Hub in the order ``pull`` does (``pull.repo_tree`` / ``check_repo``, so both refuse
the same repos with the same words), then reads each weight file's header with HTTP range requests
(``HfApi.parse_safetensors_file_metadata``: the first 100 KB, more only for a larger header). Small files
go into a temporary folder that lives as long as the ``RemoteModel``, never into the shared Hub cache, so
a later ``run`` cannot mistake a partial snapshot for a model.

Every request is made once (huggingface_hub retries only inside ``hf_hub_download`` and its
``http_backoff`` helpers, neither of which is used here), and the first one is bounded by
HF_HUB_ETAG_TIMEOUT: with no network, the first refusal is the answer.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import HubError
from ..formats.checkpoint import Checkpoint
from ..formats.folder import FolderCheckpoint, read_config
from ..formats.tensors import TensorInfo
from ..tokenizer import TokenizerInfo
from ..tokenizer.chat_template import read_chat_templates
from .errors import hub_errors
from .pull import META_FILES, RemoteFile, check_repo, hub_endpoint, repo_tree, select_files

# Metadata worth having without the weights: everything ``pull`` fetches first except the tokenizer itself
# (tokenizer.json is 2-35 MB on current models), for the chat templates and generation defaults.
SMALL_FILES = tuple(name for name in META_FILES if name not in ("tokenizer.json", "tokenizer.model"))
MAX_SMALL_FILE = 4 * 1024 * 1024


@dataclass(frozen=True)
class RemoteModel:
    """What the Hub holds for a repo, read without its weights."""

    repo_id: str
    revision: str
    commit: str
    endpoint: str
    checkpoint: Checkpoint  # its path is the temporary folder holding the small files
    files: dict[str, RemoteFile]  # every file of the repo at ``commit``
    folder: tempfile.TemporaryDirectory = field(repr=False)  # removed once this object is gone

    @property
    def where(self) -> str:
        return self.repo_id if self.revision == "main" else f"{self.repo_id}@{self.revision}"

    def tokenizer_info(self) -> TokenizerInfo:
        """The tokenizer as far as the small files tell: its kind and chat templates (its vocabulary is in the
        tokenizer file, not read here)."""
        kind = next((name for name in ("tokenizer.json", "tokenizer.model") if name in self.files), None)
        path = self.checkpoint.path / "tokenizer_config.json"
        try:
            config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except (OSError, ValueError):
            config = {}
        templates = read_chat_templates(self.checkpoint.path, config if isinstance(config, dict) else {})
        return TokenizerInfo(kind, None, ", ".join(templates) or None)


def read_remote(repo_id: str, revision: str | None = None, *, endpoint: str | None = None,
                token: str | bool | None = None) -> RemoteModel:
    """Reads ``repo_id`` header-only (its small files into a temporary folder); raises HubError (one line)."""
    from huggingface_hub import HfApi

    tmp = tempfile.TemporaryDirectory(prefix="edge-llm-headers-")
    folder = Path(tmp.name)
    api = HfApi(endpoint=endpoint, token=token)
    where = f"{repo_id}@{revision}" if revision else repo_id
    with hub_errors(repo_id, revision or "main", hub_endpoint(endpoint)):
        commit, tree = repo_tree(api, repo_id, revision)

        def fetch(file: RemoteFile) -> Path:
            return _fetch_small(api, repo_id, commit, file, folder)

        shards = check_repo(where, tree, fetch)
        files = select_files(tree, shards)
        for f in files:
            if (f.path in SMALL_FILES or f.path.startswith("additional_chat_templates/")) and f.size <= MAX_SMALL_FILE:
                fetch(f)
        tensors: dict[str, TensorInfo] = {}
        for f in files:
            if f.path.endswith(".safetensors"):
                tensors.update(_header(api, repo_id, commit, f.path, where))
    if not tensors:
        raise HubError(f"{where}: its safetensors files hold no tensors")
    checkpoint = FolderCheckpoint(folder, read_config(folder), tensors)
    return RemoteModel(repo_id, revision or "main", commit, hub_endpoint(endpoint), checkpoint, tree, tmp)


def _header(api, repo_id: str, commit: str, path: str, where: str) -> dict[str, TensorInfo]:
    from huggingface_hub.errors import SafetensorsParsingError

    try:
        header = api.parse_safetensors_file_metadata(repo_id, path, revision=commit)
    except SafetensorsParsingError as e:
        raise HubError(f"{where}: {path} has an unreadable safetensors header ({e})") from None
    return {name: TensorInfo(name, Path(path), info.dtype, tuple(info.shape)) for name, info in header.tensors.items()}


def _fetch_small(api, repo_id: str, commit: str, file: RemoteFile, folder: Path) -> Path:
    """One GET, no retries, into ``folder`` (the Hub cache stays untouched)."""
    from huggingface_hub import constants, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    target = folder / file.path
    if target.is_file():
        return target
    url = hf_hub_url(repo_id, file.path, revision=commit, endpoint=api.endpoint)
    headers = build_hf_headers(token=api.token)
    response = get_session().get(url, headers=headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT, follow_redirects=True)
    hf_raise_for_status(response)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(response.content)
    return target
