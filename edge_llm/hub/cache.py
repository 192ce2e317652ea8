"""The local Hugging Face Hub cache: find a repo's snapshot, tell whether it is complete, list, remove.

The cache is huggingface_hub's own, shared with transformers, mlx-lm and the ``hf`` CLI (reference:
huggingface_hub ``file_download.py`` and ``utils/_cache_manager.py``)::

    $HF_HUB_CACHE (default $HF_HOME/hub, default ~/.cache/huggingface/hub)
      models--{owner}--{name}/
        refs/{revision}             the commit hash a branch or tag pointed to when it was pulled
        snapshots/{commit}/{file}   symlinks into blobs/
        blobs/{sha256 | git blob id}
        blobs/{etag}.{id}.incomplete   a download in flight, or one killed mid-way (never used as a file)

A file appears in a snapshot only once fully downloaded (huggingface_hub renames it into place), so a
snapshot is complete when config.json and every weight file it needs are present.

The cache is read as untrusted: a ref must hold a commit hash (never a path: ``/abs/path`` or ``../..``
would load a folder outside the cache), a revision must not climb out of ``refs/``, and a snapshot must
lie inside its repo's folder once links are resolved. ``rm`` of an entry that is a link removes the link,
never what it points to.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..errors import EdgeLLMError, HubError
from ..formats.folder import INDEX_FILE
from ..formats.open import open_checkpoint
from ..modelinfo import ModelInfo, describe

log = logging.getLogger(__name__)

COMMIT = re.compile(r"[0-9a-f]{40}")
MAX_REF_BYTES = 4096  # a ref holds 40 hex digits (a newline at most); more is not a ref
SHARD = re.compile(r"^(?P<stem>.+)-(?P<i>\d+)-of-(?P<n>\d+)\.safetensors$")


def hub_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """The Hub cache in use: ``cache_dir``, else HF_HUB_CACHE / HF_HOME as huggingface_hub read them."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser()


def repo_folder(repo_id: str, cache_dir: str | Path | None = None) -> Path:
    return hub_cache_dir(cache_dir) / ("models--" + repo_id.replace("/", "--"))


def cached_commit(repo_id: str, revision: str = "main", cache_dir: str | Path | None = None) -> str | None:
    """The commit a revision resolves to in the cache (a commit hash resolves to itself), or None.

    Raises HubError for a revision that is a path, or a ref file that does not hold a commit hash."""
    folder = repo_folder(repo_id, cache_dir)
    if COMMIT.fullmatch(revision):
        return revision if (folder / "snapshots" / revision).is_dir() else None
    if not revision or Path(revision).is_absolute() or ".." in Path(revision).parts or "\0" in revision:
        raise HubError(f"revision {revision!r}: not a branch, tag or commit name")
    return _read_ref(folder / "refs" / revision, repo_id)


def _read_ref(ref: Path, repo_id: str) -> str | None:
    """The commit a ref file holds; None when there is none, or it is empty (a write cut short). Never blocks (on
    a FIFO) nor reads more than a ref; HubError for anything but a commit hash."""
    try:
        fd = os.open(ref, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
        data = os.read(fd, MAX_REF_BYTES) if regular else b""
    except OSError:
        return None
    finally:
        os.close(fd)
    text = data.decode("utf-8", errors="replace").strip()
    if regular and not text:
        return None
    if not COMMIT.fullmatch(text):
        holds = f"holds {text[:60]!r}" if regular else "is not a file"
        raise HubError(f"{ref}: {holds}, not a commit hash; the cache entry is damaged: `edge-llm pull {repo_id}` "
                       f"rewrites it, `edge-llm rm {repo_id}` removes it")
    return text


def missing_files(snapshot: Path) -> list[str]:
    """What a snapshot still lacks to be loadable: config.json and the weight files it names."""
    if not (snapshot / "config.json").is_file():
        return ["config.json"]
    index = snapshot / INDEX_FILE
    if index.is_file():
        try:
            shards = dict.fromkeys(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            return [INDEX_FILE]
        return [name for name in shards if not (snapshot / name).is_file()]
    present = sorted(p.name for p in snapshot.glob("*.safetensors"))
    if not present:
        return ["*.safetensors"]
    missing: list[str] = []
    for name in present:  # a `-00001-of-00003` set without an index must be whole
        if m := SHARD.match(name):
            width, n = len(m["i"]), int(m["n"])
            expected = [f"{m['stem']}-{i:0{width}d}-of-{m['n']}.safetensors" for i in range(1, n + 1)]
            missing += [e for e in expected if e not in present and e not in missing]
    return missing


def cached_snapshot(repo_id: str, revision: str = "main", cache_dir: str | Path | None = None) -> Path | None:
    """The complete cached snapshot for ``repo_id`` at ``revision``, or None (absent or partial)."""
    commit = cached_commit(repo_id, revision, cache_dir)
    if commit is None:
        return None
    repo = repo_folder(repo_id, cache_dir)
    snapshot = repo / "snapshots" / commit
    if not snapshot.is_dir():
        return None
    if repo.resolve() not in snapshot.resolve().parents:
        raise HubError(f"{snapshot}: a link to {snapshot.resolve()}, outside {repo}; the cache entry is damaged: "
                       f"`edge-llm rm {repo_id}` removes it")
    missing = missing_files(snapshot)
    if missing:
        log.info("%s: cached snapshot %s is incomplete (lacks %s)", repo_id, commit[:12], missing[0])
        return None
    return snapshot


@dataclass(frozen=True)
class CachedModel:
    """One runnable snapshot in the cache."""

    repo_id: str
    revision: str  # the refs that point at it ("main"), or the short commit when none does
    commit: str
    path: Path
    size_on_disk: int
    modified: float  # POSIX time of the newest file
    info: ModelInfo


def list_models(cache_dir: str | Path | None = None) -> list[CachedModel]:
    """Every complete snapshot in the cache that edge-llm can run (supported architecture, weights whole)."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        scan = scan_cache_dir(hub_cache_dir(cache_dir))
    except CacheNotFound:
        return []
    for warning in scan.warnings:
        log.info("skipping a corrupted cache entry: %s", warning)
    models = []
    for repo in sorted(scan.repos, key=lambda r: r.repo_id.lower()):
        if repo.repo_type != "model":
            continue
        for rev in sorted(repo.revisions, key=lambda r: -r.last_modified):
            if missing_files(rev.snapshot_path):
                continue
            try:
                info = describe(open_checkpoint(rev.snapshot_path))
            except EdgeLLMError as e:  # an architecture we don't run, or an unreadable folder
                log.info("skipping %s: %s", rev.snapshot_path, e)
                continue
            revision = ", ".join(sorted(rev.refs)) or rev.commit_hash[:12]
            models.append(CachedModel(repo.repo_id, revision, rev.commit_hash, rev.snapshot_path,
                                      rev.size_on_disk, rev.last_modified, info))
    return models


@dataclass(frozen=True)
class Removal:
    """A repo folder about to be deleted, or the link standing for one (``link_target``); ``execute`` does it."""

    repo_id: str
    path: Path
    size_on_disk: int  # what deleting frees: 0 for a link
    link_target: str | None = None  # the entry is a link to this: only the link goes

    def execute(self) -> None:
        if self.link_target is not None:  # what a link points to is not the cache's to delete
            self.path.unlink()
            return
        # Rename first, then delete: a crash mid-way leaves a hidden folder, never a half repo that
        # still looks cached to us or to other tools.
        doomed = self.path.with_name(f".{self.path.name}.deleting-{uuid.uuid4().hex[:8]}")
        os.replace(self.path, doomed)
        shutil.rmtree(doomed)
        locks = self.path.parent / ".locks" / self.path.name
        shutil.rmtree(locks, ignore_errors=True)


def plan_removal(repo_id: str, cache_dir: str | Path | None = None) -> Removal:
    """What ``rm`` would delete for ``repo_id``: its whole cache folder (every revision, partial downloads)."""
    folder = repo_folder(repo_id, cache_dir)
    if folder.is_symlink():
        return Removal(repo_id, folder, 0, os.readlink(folder))
    if not folder.is_dir():
        raise HubError(f"{repo_id}: not in the Hub cache ({hub_cache_dir(cache_dir)}); `edge-llm list` shows what is")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
    return Removal(repo_id, folder, size)
