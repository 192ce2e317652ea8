"""The Hub cache read as untrusted: refs, snapshots and `rm` never reach outside the cache or end half-done.

A cache entry is laid out as huggingface_hub writes it (refs/main -> a commit, snapshots/{commit}/ links into
blobs/). A ref holding a path (``/abs/path``, ``../../..``) or a snapshot that is a link to elsewhere must
not make ``run owner/name`` load a folder outside the cache: one line naming the file, exit 1. ``rm`` of an
entry that is a link removes the link, never what it points to.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from edge_llm.errors import HubError
from edge_llm.hub.cache import cached_snapshot
from edge_llm.hub.resolve import resolve_model
from tests.hf_oracle import build_tiny_checkpoint
from tests.hub_cache_layout import COMMIT, cache_entry
from tests.hub_server import cli_env, run_cli
from tests.tiny_configs import TINY_CONFIGS

REPO_ID = "someone/tiny"


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("src") / "llama", with_tokenizer=True,
                                 **TINY_CONFIGS["llama"])


def offline_env(tmp_path: Path) -> dict[str, str]:
    return cli_env("http://127.0.0.1:9", tmp_path / "hf", HF_HUB_OFFLINE="1")


def test_a_sound_entry_resolves_to_its_snapshot(src, tmp_path):
    repo = cache_entry(tmp_path / "hub", src)
    assert resolve_model(REPO_ID, cache_dir=tmp_path / "hub") == repo / "snapshots" / COMMIT
    (repo / "refs" / "main").write_text("")  # a ref write cut short: not cached, not an error
    assert cached_snapshot(REPO_ID, cache_dir=tmp_path / "hub") is None


@pytest.mark.parametrize("ref", ["absolute", "relative", "hex_then_path", "a_folder"])
def test_a_ref_that_is_not_a_commit_hash_is_refused(src, tmp_path, ref):
    outside = tmp_path / "outside"
    shutil.copytree(src, outside)  # a loadable model: following the ref would "work"
    repo = cache_entry(tmp_path / "hf" / "hub", src)
    main = repo / "refs" / "main"
    if ref == "a_folder":
        main.unlink()
        main.mkdir()
    else:
        main.write_text({"absolute": str(outside), "relative": "../../../../outside",
                         "hex_then_path": f"{COMMIT}/../../../../../outside"}[ref])
    with pytest.raises(HubError, match="not a commit hash"):
        resolve_model(REPO_ID, cache_dir=tmp_path / "hf" / "hub")
    answer = run_cli("run", REPO_ID, "--prompt", "hi", "--max-tokens", "2", env=offline_env(tmp_path))
    assert answer.returncode == 1 and answer.stdout == "", answer.stderr
    assert len(answer.stderr.strip().splitlines()) == 1 and f"{main}: " in answer.stderr
    assert "Traceback" not in answer.stderr


def test_a_snapshot_that_links_out_of_its_repo_is_refused(src, tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(src, outside)
    repo = cache_entry(tmp_path / "hub", src)
    snapshot = repo / "snapshots" / COMMIT
    shutil.rmtree(snapshot)
    snapshot.symlink_to(outside)
    with pytest.raises(HubError, match="outside"):
        resolve_model(REPO_ID, cache_dir=tmp_path / "hub")


@pytest.mark.parametrize("revision", ["../../../outside", "/abs/ref", "main/../../.."])
def test_a_revision_that_is_a_path_is_refused(src, tmp_path, revision):
    cache_entry(tmp_path / "hub", src)
    with pytest.raises(HubError, match="not a branch, tag or commit name"):
        cached_snapshot(REPO_ID, revision, cache_dir=tmp_path / "hub")


def test_rm_of_an_entry_that_is_a_link_removes_only_the_link(src, tmp_path):
    elsewhere = tmp_path / "disk2"
    real = cache_entry(elsewhere, src)  # moved to another disk, linked back into the cache
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    link = cache / real.name
    link.symlink_to(real)
    env = offline_env(tmp_path)
    declined = run_cli("rm", REPO_ID, env=env, stdin="n\n")
    assert "only the link goes" in declined.stderr and link.is_symlink(), declined.stderr
    removed = run_cli("rm", REPO_ID, "--yes", env=env)
    assert removed.returncode == 0, removed.stderr
    assert f"removed {REPO_ID} (the link; {real} is kept)" in removed.stderr and "Traceback" not in removed.stderr
    assert sorted(p.name for p in cache.iterdir()) == []  # no half-renamed entry left
    assert (real / "snapshots" / COMMIT / "model.safetensors").is_file()  # what it pointed to is untouched
    again = run_cli("rm", REPO_ID, "--yes", env=env)
    assert again.returncode == 1 and "not in the Hub cache" in again.stderr
