"""Model references: the one place every command turns MODEL into a checkpoint.

A reference is, in this order: an existing local checkpoint folder or GGUF file; a Hugging Face Hub repo
id (``owner/name``), found in the standard Hub cache (HF_HUB_CACHE / HF_HOME, shared with transformers and
mlx-lm) or else asked of the Hub (``find_local`` takes these branches for everyone). ``resolve_model``
pulls what is missing (``pull``) and returns the local folder (``run``, ``quantize``, ``bench``, the
loader); ``read_model_headers`` reads config and tensor headers only, a repo that is not cached straight
from the Hub (``remote``; ``info``, ``estimate`` and ``run``'s memory check). A cached snapshot is used
without any network request, as ollama does with its local models; ``edge-llm pull`` fetches updates.
With HF_HUB_OFFLINE=1 only the cache is consulted.

Library code never prints: an implicit pull is announced through a ``PullObserver`` (the CLI installs one
that draws progress on stderr with ``set_pull_observer``) and through ``logging``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import CheckpointError, HubError
from ..formats.checkpoint import Checkpoint
from ..formats.open import open_checkpoint
from .cache import cached_snapshot, hub_cache_dir
from .pull import PullObserver, hub_endpoint, offline, pull
from .remote import RemoteModel, read_remote
from .repo_id import is_repo_id

log = logging.getLogger(__name__)

_observer_factory: Callable[[], PullObserver] | None = None


def set_pull_observer(factory: Callable[[], PullObserver] | None) -> None:
    """Makes implicit pulls (``run``/``info`` of a repo not yet cached) report to ``factory()``."""
    global _observer_factory
    _observer_factory = factory


def find_local(ref: str | Path, *, revision: str | None = None, cache_dir: str | Path | None = None) -> Path | None:
    """The folder or GGUF file ``ref`` names on this machine, or None for a Hub repo id to ask the Hub about.

    The branches every command shares (``resolve_model`` pulls what this leaves to the Hub;
    ``read_model_headers`` reads it remotely). Raises CheckpointError when ``ref`` is neither a path nor a
    repo id, HubError when it is a repo id that is not cached and HF_HUB_OFFLINE=1 forbids asking the Hub.
    """
    if not str(ref).strip():  # Path("") is ".", the current folder: never what an empty reference meant
        raise CheckpointError("empty model reference: give a model folder, a .gguf file or a Hub repo id (owner/name)")
    path = Path(ref).expanduser()
    if path.exists():
        return path
    text = str(ref)
    if path.suffix.lower() == ".gguf":
        raise CheckpointError(f"{ref}: no such GGUF file")
    if not is_repo_id(text):
        raise CheckpointError(f"{ref}: no such model folder (a Hub model is named owner/name)")
    snapshot = cached_snapshot(text, revision or "main", cache_dir)
    if snapshot is not None:
        log.debug("%s: using the cached snapshot %s", text, snapshot)
        return snapshot
    if offline():
        raise HubError(f"{text}: not a local folder, and not in the Hub cache ({hub_cache_dir(cache_dir)}); "
                       f"HF_HUB_OFFLINE=1 forbids downloading it: unset HF_HUB_OFFLINE or `edge-llm pull {text}`")
    return None


def resolve_model(ref: str | Path, *, revision: str | None = None, cache_dir: str | Path | None = None,
                  observer: PullObserver | None = None) -> Path:
    """The local folder for ``ref``: a folder as is; a Hub repo id from the cache, pulled when missing.

    Raises CheckpointError when ``ref`` is neither a folder nor a repo id, HubError when the repo cannot
    be had (offline and not cached, gated, missing, unreachable, unsupported).
    """
    local = find_local(ref, revision=revision, cache_dir=cache_dir)
    if local is not None:
        return local
    text = str(ref)
    observer = observer or (_observer_factory() if _observer_factory else PullObserver())
    note = f"{text} is not in the Hub cache: pulling it from {hub_endpoint()}"
    log.info(note)
    observer.message(note)
    return pull(text, revision, observer=observer, cache_dir=cache_dir).path


@dataclass(frozen=True)
class ModelHeaders:
    """A model reference read cheaply: a local folder / GGUF file, or a Hub repo read header-only."""

    checkpoint: Checkpoint  # a repo read from the Hub: its path is the temporary folder of its small files
    local: Path | None  # the folder or GGUF file on disk; None when read from the Hub
    remote: RemoteModel | None

    @property
    def folder(self) -> Path | None:
        """The local model folder (where its tokenizer files are); None for a GGUF file or a repo on the Hub."""
        return self.local if self.local is not None and self.local.is_dir() else None

    @property
    def named(self) -> Checkpoint:
        """The checkpoint with ``path`` naming what the user named: a repo read from the Hub by its repo id, not
        the temporary folder its small files are in (gone once this object is)."""
        return self.checkpoint if self.remote is None else replace(self.checkpoint, path=Path(self.remote.repo_id))


def read_model_headers(ref: str, revision: str | None = None) -> ModelHeaders:
    """Config and tensor headers for ``ref`` without downloading weights. Raises CheckpointError / HubError
    with one line, through the branches ``resolve_model`` takes (``find_local``)."""
    local = find_local(ref, revision=revision)
    if local is not None:
        return ModelHeaders(open_checkpoint(local), local, None)
    remote = read_remote(ref, revision)
    return ModelHeaders(remote.checkpoint, None, remote)
