"""A model folder laid out as huggingface_hub caches it, without a download: for tests of what edge-llm
reads from (and follows in) the Hub cache."""

from __future__ import annotations

import shutil
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_entry(cache: Path, src: Path, repo_id: str = "someone/tiny") -> Path:
    """``src``'s files as blobs/ with relative links from snapshots/{COMMIT}/ and refs/main; returns the repo
    folder (``cache/models--{owner}--{name}``)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for i, path in enumerate(sorted(src.iterdir())):
        shutil.copy(path, repo / "blobs" / f"blob{i}")
        (snapshot / path.name).symlink_to(f"../../blobs/blob{i}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return repo
