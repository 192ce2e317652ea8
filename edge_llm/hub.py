"""Model references -> local folders: the one place every command turns MODEL into a path.

A reference is, in this order: an existing local checkpoint folder; a Hugging Face Hub repo id
(``owner/name``), found in the standard Hub cache (HF_HUB_CACHE / HF_HOME, shared with transformers and
mlx-lm) or pulled into it when missing (see ``hub_pull``). A cached snapshot is used without any network
request, as ollama does with its local models; ``edge-llm pull`` fetches updates. With HF_HUB_OFFLINE=1
only the cache is consulted.

Library code never prints: an implicit pull is announced through a ``PullObserver`` (the CLI installs one
that draws progress on stderr with ``set_pull_observer``) and through ``logging``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

from .errors import CheckpointError, HubError
from .hub_pull import PullObserver

log = logging.getLogger(__name__)

# owner/name as the Hub spells them: letters, digits, '-', '_', '.'; no '--' or '..' (reserved in the cache).
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")

_observer_factory: Callable[[], PullObserver] | None = None


def set_pull_observer(factory: Callable[[], PullObserver] | None) -> None:
    """Makes implicit pulls (``run``/``info`` of a repo not yet cached) report to ``factory()``."""
    global _observer_factory
    _observer_factory = factory


def is_repo_id(ref: str) -> bool:
    return bool(REPO_ID.match(ref)) and "--" not in ref and ".." not in ref and not ref.endswith(".")


def check_repo_id(ref: str) -> None:
    if not is_repo_id(ref):
        raise HubError(f"{ref!r} is not a Hub repo id; expected owner/name, "
                       "e.g. mlx-community/Llama-3.2-1B-Instruct-4bit")


def find_local(ref: str | Path, *, revision: str | None = None, cache_dir: str | Path | None = None) -> Path | None:
    """The folder or GGUF file ``ref`` names on this machine, or None for a Hub repo id to ask the Hub about.

    The branches every command shares (``resolve_model`` pulls what this leaves to the Hub; the header-only
    reader in ``hub_remote`` reads it remotely). Raises CheckpointError when ``ref`` is neither a path nor a
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
    from .hub_cache import cached_snapshot, hub_cache_dir
    from .hub_pull import offline

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
    from .hub_pull import hub_endpoint, pull

    text = str(ref)
    observer = observer or (_observer_factory() if _observer_factory else PullObserver())
    note = f"{text} is not in the Hub cache: pulling it from {hub_endpoint()}"
    log.info(note)
    observer.message(note)
    return pull(text, revision, observer=observer, cache_dir=cache_dir).path
