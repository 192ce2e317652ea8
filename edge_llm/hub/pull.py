"""Pull a checkpoint from the Hugging Face Hub into the standard Hub cache, safely.

Order, so that nothing large is fetched for a model we cannot run:
1. model info (the commit a revision points to) and the file tree (sizes, sha256 of LFS files);
2. config.json alone, and refuse an unsupported ``model_type`` (or a quantization we cannot read);
3. the safetensors index, if any, to learn which shards are needed;
4. free disk space against the bytes still to download;
5. the files, one at a time: config / generation config, tokenizer files and chat templates, then the
   weights (the index's shards, else the top-level ``*.safetensors``). Pickled weights (``*.bin``,
   ``*.pt``, ``*.pth``, ``*.pkl``) are never requested.

Downloads go through huggingface_hub's ``hf_hub_download`` (reference: ``file_download.py``), which
writes each file to a process-unique ``.incomplete`` file and renames it into place, so an
interrupted pull never leaves a truncated file where a model file should be; huggingface_hub 2.x does
not resume across runs, so the next pull starts that file again and removes the stale partial.
``verify`` re-hashes the cached files against the Hub's checksums (sha256 for LFS files, the git blob
id for others) with ``HfApi.verify_repo_checksums`` and re-downloads any that differ.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import HubError
from ..machine.memory import human_bytes
from ..models import supported_model_types
from .cache import COMMIT, cached_snapshot, hub_cache_dir, repo_folder
from .errors import hub_errors
from .repo_id import check_repo_id

log = logging.getLogger(__name__)

META_FILES = (
    "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "chat_template.jinja", "chat_template.json",
)
INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# Integer formats that need their own kernels; the loader reads MLX affine quantization and plain floats.
UNSUPPORTED_QUANT = {"gptq", "awq", "bitsandbytes", "aqlm", "exl2", "hqq", "eetq", "quanto", "vptq", "higgs"}


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    sha256: str | None  # LFS files
    blob_id: str  # git blob id (of the LFS pointer for LFS files)

    @property
    def etag(self) -> str:
        """The name huggingface_hub gives the file's blob in the cache."""
        return self.sha256 or self.blob_id


@dataclass
class PullPlan:
    repo_id: str
    revision: str
    commit: str
    endpoint: str
    files: list[RemoteFile]  # in download order
    cached: set[str] = field(default_factory=set)  # paths already in the snapshot

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def download_bytes(self) -> int:
        return sum(f.size for f in self.files if f.path not in self.cached)


@dataclass(frozen=True)
class PullResult:
    repo_id: str
    revision: str
    commit: str
    path: Path
    files: list[str]
    downloaded_bytes: int
    verified: int | None = None  # files re-hashed by ``verify``
    repaired: list[str] = field(default_factory=list)  # files re-downloaded because their hash differed


class PullObserver:
    """What a front end hears about a pull; every method is optional. Library code only logs."""

    def message(self, text: str) -> None: ...
    def start(self, plan: PullPlan) -> None: ...
    def file_start(self, file: RemoteFile) -> None: ...
    def file_progress(self, file: RemoteFile, nbytes: int) -> None: ...  # a delta; negative on a restart
    def file_done(self, file: RemoteFile, seconds: float) -> None: ...
    def close(self) -> None: ...


def offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode()


def hub_endpoint(endpoint: str | None = None) -> str:
    from huggingface_hub import constants

    return (endpoint or constants.ENDPOINT).rstrip("/")


def select_files(tree: dict[str, RemoteFile], shards: list[str] | None) -> list[RemoteFile]:
    """The files edge-llm needs, in download order: metadata and tokenizer, then weights.

    ``shards`` are the index's weight files when the repo has an index. Only top-level files count:
    repos often carry other formats in sub-folders (``original/consolidated.pth``).
    """
    meta = [tree[name] for name in META_FILES if name in tree]
    meta += [f for p, f in sorted(tree.items()) if p.startswith("additional_chat_templates/") and p.endswith(".jinja")]
    if shards is not None:
        missing = [s for s in shards if s not in tree]
        if missing:
            raise HubError(f"{INDEX} names {missing[0]}, which the repo does not have; the repo is broken")
        weights = [tree[INDEX]] + [tree[s] for s in shards]
    else:
        weights = [f for p, f in sorted(tree.items()) if "/" not in p and p.endswith(".safetensors")]
    chosen = meta + weights
    assert not any(f.path.endswith(PICKLE_SUFFIXES) for f in chosen)
    return chosen


def pull(repo_id: str, revision: str | None = None, *, verify: bool = False, observer: PullObserver | None = None,
         cache_dir: str | Path | None = None, endpoint: str | None = None, token: str | bool | None = None,
         ) -> PullResult:
    """Downloads what edge-llm needs of ``repo_id`` into the Hub cache and returns where it is.

    ``token`` None uses HF_TOKEN or a prior ``hf auth login``. With HF_HUB_OFFLINE=1 only the cache is
    consulted. Raises HubError (one line) for gated, missing, unreachable, unsupported or disk-full cases.
    """
    check_repo_id(repo_id)
    observer = observer or PullObserver()
    revision = revision or "main"
    cache = hub_cache_dir(cache_dir)
    try:
        if offline():
            snapshot = cached_snapshot(repo_id, revision, cache)
            if snapshot is None:
                raise HubError(f"{repo_id}: not in the Hub cache ({cache}) and HF_HUB_OFFLINE=1 forbids downloading; "
                               "unset HF_HUB_OFFLINE to pull it")
            if verify:
                raise HubError("--verify compares against the Hub's checksums: unset HF_HUB_OFFLINE to use it")
            return PullResult(repo_id, revision, snapshot.name, snapshot, [], 0)
        with hub_errors(repo_id, revision, hub_endpoint(endpoint)):
            return _pull(repo_id, revision, verify, observer, cache, endpoint, token)
    finally:
        observer.close()


def _pull(repo_id, revision, verify, observer, cache: Path, endpoint, token) -> PullResult:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token)
    commit, tree = repo_tree(api, repo_id, revision)
    where = f"{repo_id}@{revision}" if revision != "main" else repo_id
    snapshot = repo_folder(repo_id, cache) / "snapshots" / commit
    present = {p for p in tree if (snapshot / p).is_file()}  # before this run
    fetch = functools.partial(_fetch, repo_id, commit, cache, endpoint, token)
    early: dict[str, float] = {}  # files fetched before the plan exists -> seconds taken
    shards = check_repo(where, tree, functools.partial(fetch, timings=early))
    files = select_files(tree, shards)
    plan = PullPlan(repo_id, revision, commit, hub_endpoint(endpoint), files, cached={f.path for f in files} & present)
    remove_stale_partials(repo_folder(repo_id, cache))
    check_disk_space(plan, cache)
    log.info("pulling %s (commit %s): %d files, %d bytes to download", where, commit[:12], len(files),
             plan.download_bytes)
    observer.start(plan)
    for f in files:
        if f.path in plan.cached:
            continue
        if f.path in early:  # already here: report it like the others
            observer.file_start(f)
            observer.file_progress(f, f.size)
            observer.file_done(f, early[f.path])
        else:
            fetch(f, observer)
    write_ref(repo_folder(repo_id, cache), revision, commit)
    result = PullResult(repo_id, revision, commit, snapshot, [f.path for f in files], plan.download_bytes)
    if verify:
        result = verify_files(api, result, tree, fetch, observer, cache)
    return result


def repo_tree(api, repo_id: str, revision: str | None) -> tuple[str, dict[str, RemoteFile]]:
    """The commit ``revision`` points to and the repo's files at it.

    The first request is bounded by HF_HUB_ETAG_TIMEOUT and is made once: with no network it fails at
    once, before any call that huggingface_hub retries (``hf_hub_download`` re-asks five times with
    back-off, ~24 s, when it cannot reach the Hub and has no cached copy).
    """
    from huggingface_hub import constants
    from huggingface_hub.hf_api import RepoFile

    commit = api.model_info(repo_id, revision=revision, timeout=constants.HF_HUB_ETAG_TIMEOUT).sha
    tree = {
        f.path: RemoteFile(f.path, f.size, f.lfs.sha256 if f.lfs else None, f.blob_id)
        for f in api.list_repo_tree(repo_id, revision=commit, recursive=True)
        if isinstance(f, RepoFile)
    }
    return commit, tree


def check_repo(where: str, tree: dict[str, RemoteFile], fetch: Callable[[RemoteFile], Path]) -> list[str] | None:
    """Refuses a repo edge-llm cannot run, from its file list and config.json (``fetch`` gets a file);
    returns the index's weight files, or None when the repo has no index."""
    if "config.json" not in tree:
        raise HubError(f"{where}: no config.json, so not a transformers/MLX checkpoint edge-llm can run")
    check_config(where, fetch(tree["config.json"]))
    if not any("/" not in p and p.endswith(".safetensors") for p in tree):
        pickles = [p for p in tree if "/" not in p and p.endswith(PICKLE_SUFFIXES)]
        hint = f" (only {pickles[0]}: pickled weights, which edge-llm never loads)" if pickles else ""
        raise HubError(f"{where}: no *.safetensors weights{hint}; pick a safetensors or mlx-community repo")
    return read_index(fetch(tree[INDEX])) if INDEX in tree else None


def _fetch(repo_id: str, commit: str, cache: Path, endpoint, token, file: RemoteFile,
           observer: PullObserver | None = None, timings: dict[str, float] | None = None) -> Path:
    """One file into the cache through hf_hub_download, its byte counts forwarded to ``observer``."""
    from huggingface_hub import hf_hub_download

    observer = observer or PullObserver()
    counter = _ByteCounter(file, observer)
    observer.file_start(file)
    started = time.monotonic()
    path = hf_hub_download(repo_id, file.path, revision=commit, cache_dir=cache, endpoint=endpoint, token=token,
                           tqdm_class=counter.bar)
    if counter.total != file.size:  # nothing was transferred: the blob was already there (another revision)
        observer.file_progress(file, file.size - counter.total)
    seconds = time.monotonic() - started
    observer.file_done(file, seconds)
    if timings is not None:
        timings[file.path] = seconds
    return Path(path)


class _ByteCounter:
    """Stands in for tqdm inside hf_hub_download (so no tqdm bar is drawn) and forwards its byte counts.

    huggingface_hub calls ``tqdm_class(total=, initial=, desc=, unit=...)`` -- any callable will do --, then
    ``update(n)`` per chunk, with a negative n when a server ignores a resumed range and it starts over.
    """

    def __init__(self, file: RemoteFile, observer: PullObserver) -> None:
        self.file, self.observer, self.total = file, observer, 0

    def bar(self, *, initial: int = 0, **_: object) -> _ByteCounter:
        if initial:
            self.update(initial)
        return self

    def update(self, n: int | float | None = 1) -> None:
        n = int(n or 0)
        self.total += n
        self.observer.file_progress(self.file, n)

    def close(self) -> None: ...

    def __enter__(self) -> _ByteCounter:
        return self

    def __exit__(self, *exc) -> None: ...


def check_config(where: str, path: Path) -> None:
    """Refuses, from config.json alone, a model edge-llm cannot run."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HubError(f"{where}: config.json is not valid JSON ({e})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in supported_model_types():
        raise HubError(f"{where}: model_type {model_type!r} is not supported (supported: "
                       f"{', '.join(supported_model_types())}); nothing else was downloaded")
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method in UNSUPPORTED_QUANT:
        raise HubError(f"{where}: {method} quantization is not supported (edge-llm reads MLX affine quantization "
                       "and float weights); pick the unquantized or an mlx-community repo")


def read_index(path: Path) -> list[str]:
    try:
        return list(dict.fromkeys(json.loads(path.read_text(encoding="utf-8"))["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise HubError(f"{path.name}: invalid safetensors index (no weight_map)") from None


def check_disk_space(plan: PullPlan, cache: Path) -> None:
    blobs = repo_folder(plan.repo_id, cache) / "blobs"
    needed = sum(f.size for f in plan.files if f.path not in plan.cached and not (blobs / f.etag).is_file())
    probe = cache
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise HubError(f"not enough disk space for {plan.repo_id}: it needs {human_bytes(needed)} in {cache}, "
                       f"{human_bytes(free)} is free; free some space or set HF_HUB_CACHE to a larger disk")


def remove_stale_partials(folder: Path) -> None:
    """Deletes ``.incomplete`` files left by killed pulls, unless another process is downloading that blob."""
    from filelock import Timeout  # huggingface_hub's own lock library (a dependency of it)
    from huggingface_hub.utils import WeakFileLock

    for partial in (folder / "blobs").glob("*.incomplete"):
        lock = folder.parent / ".locks" / folder.name / f"{partial.name.split('.')[0]}.lock"
        try:
            with WeakFileLock(lock, timeout=0.05):  # the lock hf_hub_download holds while downloading
                partial.unlink(missing_ok=True)
                log.info("removed a partial download left by an interrupted pull: %s", partial.name)
        except Timeout:
            continue


def write_ref(folder: Path, revision: str, commit: str) -> None:
    """Points ``refs/{revision}`` at ``commit`` once the snapshot is whole (atomically, as huggingface_hub does)."""
    if COMMIT.fullmatch(revision):
        return
    ref = folder / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    tmp = ref.with_name(f"{ref.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(commit)
    os.replace(tmp, ref)


def verify_files(api, result: PullResult, tree: dict[str, RemoteFile], fetch, observer: PullObserver,
                 cache: Path) -> PullResult:
    """Re-hashes the pulled files against the Hub's checksums; re-downloads any that differ, once."""
    wanted = set(result.files)
    size = sum(tree[p].size for p in wanted)
    observer.message(f"verifying {len(wanted)} files ({human_bytes(size)}) against the Hub's checksums")
    repaired: list[str] = []
    for attempt in range(2):
        check = api.verify_repo_checksums(result.repo_id, revision=result.commit, cache_dir=cache)
        # Files we never pull (pickles, sub-folders) are "missing" by design; only ours count.
        bad = sorted(({m["path"] for m in check.mismatches} | set(check.missing_paths)) & wanted)
        if not bad:
            return PullResult(result.repo_id, result.revision, result.commit, result.path, result.files,
                              result.downloaded_bytes, verified=len(wanted), repaired=repaired)
        if attempt == 1:
            raise HubError(f"{result.repo_id}: {bad[0]} still differs from the Hub's checksum after re-downloading it; "
                           "the download is being corrupted (disk or network): try again later")
        for path in bad:
            observer.message(f"{path}: checksum differs from the Hub's; downloading it again")
            _drop_cached(result.path / path)
            fetch(tree[path], observer)
            repaired.append(path)
    raise AssertionError("unreachable")


def _drop_cached(pointer: Path) -> None:
    """Removes a snapshot file and the blob behind it, so the next download fetches it afresh."""
    blob = pointer.resolve() if pointer.is_symlink() else None
    pointer.unlink(missing_ok=True)
    if blob is not None:
        blob.unlink(missing_ok=True)
