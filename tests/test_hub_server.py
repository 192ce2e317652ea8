"""The loopback Hub speaks the protocol huggingface_hub's real client expects.

The rest of the hub tests trust this server, so its answers are checked here against the client itself
(in process, with ``endpoint=`` passed explicitly since HF_ENDPOINT is read at import): a full
``snapshot_download`` succeeds and ``verify_repo_checksums`` agrees with the served sha256 / git ids;
each failure arrives as the client's own exception class; ranges are honoured.
"""

from __future__ import annotations

import hashlib
import urllib.request

import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from tests.hub_server import HubServer, ServedRepo, git_blob_id, resolve_url

FILES = {
    "config.json": b'{"model_type": "llama"}',
    "model.safetensors": bytes(range(256)) * 400,
    "tokenizer.json": b'{"version": "1.0"}',
    "original/consolidated.pth": b"pickle" * 10,
}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    folder = tmp_path_factory.mktemp("repo")
    for name, data in FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    with HubServer() as server:
        server.add(ServedRepo.from_folder("org/plain", folder))
        server.add(ServedRepo.from_folder("org/gated", folder, gated=True, allowed_tokens={"hf_granted"}))
        yield server


def test_git_blob_id_matches_git():
    # `echo 'hello' | git hash-object --stdin`
    assert git_blob_id(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"


def test_snapshot_download_and_checksums(hub, tmp_path):
    folder = snapshot_download("org/plain", endpoint=hub.url, cache_dir=tmp_path)
    for name, data in FILES.items():
        assert (tmp_path / "models--org--plain" / "snapshots").exists()
        assert open(f"{folder}/{name}", "rb").read() == data
    blob = tmp_path / "models--org--plain" / "blobs" / hashlib.sha256(FILES["model.safetensors"]).hexdigest()
    assert blob.is_file()  # LFS blobs are named by their sha256, as on the real Hub
    check = HfApi(endpoint=hub.url).verify_repo_checksums("org/plain", cache_dir=tmp_path)
    assert check.checked_count == len(FILES) and not check.mismatches and not check.missing_paths
    # The LFS file came from the CDN host, without the Authorization header leaving the Hub.
    cdn = [r for r in hub.requests_for("org/plain", "GET") if r.path.startswith("/cdn/")]
    assert cdn and all(r.authorization is None for r in cdn)


def test_tree_lists_lfs_and_git_ids(hub):
    entries = {e.path: e for e in HfApi(endpoint=hub.url).list_repo_tree("org/plain", recursive=True)}
    assert entries["model.safetensors"].lfs.sha256 == hashlib.sha256(FILES["model.safetensors"]).hexdigest()
    assert entries["config.json"].lfs is None and entries["config.json"].blob_id == git_blob_id(FILES["config.json"])
    top = {e.path for e in HfApi(endpoint=hub.url).list_repo_tree("org/plain")}
    assert "original" in top and "original/consolidated.pth" not in top


def test_errors_are_the_clients_own(hub, tmp_path):
    api = HfApi(endpoint=hub.url, token=False)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/missing")
    with pytest.raises(RevisionNotFoundError):
        api.model_info("org/plain", revision="nope")
    assert api.model_info("org/gated").gated == "manual"  # gated repos' API pages stay public
    with pytest.raises(GatedRepoError):
        hf_hub_download("org/gated", "config.json", endpoint=hub.url, cache_dir=tmp_path, token=False)
    with pytest.raises(GatedRepoError) as denied:
        hf_hub_download("org/gated", "config.json", endpoint=hub.url, cache_dir=tmp_path, token="hf_other")
    assert denied.value.response.status_code == 403
    path = hf_hub_download("org/gated", "config.json", endpoint=hub.url, cache_dir=tmp_path, token="hf_granted")
    assert open(path, "rb").read() == FILES["config.json"]
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("org/plain", "nope.json", endpoint=hub.url, cache_dir=tmp_path)


def test_ranges(hub):
    repo = hub.repos["org/plain"]
    request = urllib.request.Request(f"{hub.cdn_url}/cdn/org/plain/{repo.files['model.safetensors'].sha256}",
                                     headers={"Range": "bytes=100-199"})
    with urllib.request.urlopen(request) as response:
        assert response.status == 206
        assert response.headers["Content-Range"] == f"bytes 100-199/{len(FILES['model.safetensors'])}"
        assert response.read() == FILES["model.safetensors"][100:200]
    head = urllib.request.Request(resolve_url(hub.url, "org/plain", "config.json"), method="HEAD")
    with urllib.request.urlopen(head) as response:
        assert response.headers["X-Repo-Commit"] == repo.commit
        assert response.headers["ETag"] == f'"{git_blob_id(FILES["config.json"])}"'
