"""Model references, file selection, snapshot completeness, and the pull API's progress contract (in process).

The in-process pull passes ``endpoint=`` and ``cache_dir=`` explicitly (huggingface_hub reads HF_ENDPOINT
only at import), still through the real client and the loopback Hub.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_llm.errors import CheckpointError, HubError
from edge_llm.hub.cache import cached_snapshot, missing_files
from edge_llm.hub.pull import PullObserver, RemoteFile, pull, select_files
from edge_llm.hub.repo_id import is_repo_id
from edge_llm.hub.resolve import resolve_model
from tests.hub_server import HubServer, ServedRepo


def remote(path: str, size: int = 10) -> RemoteFile:
    lfs = path.endswith((".safetensors", ".bin", ".pth", ".model"))
    return RemoteFile(path, size, "a" * 64 if lfs else None, "b" * 40)


@pytest.mark.parametrize("ref,expected", [
    ("mlx-community/Qwen3-30B-A3B-4bit", True), ("HuggingFaceTB/SmolLM2-135M-Instruct", True),
    ("gpt2", False), ("a/b/c", False), ("./models/x", False), ("org/na--me", False), ("org/..", False),
    ("/abs/path", False), ("org/name.", False),
])
def test_repo_ids(ref, expected):
    assert is_repo_id(ref) is expected


def test_local_folders_and_bad_references(tmp_path):
    assert resolve_model(tmp_path) == tmp_path
    with pytest.raises(CheckpointError, match="no such model folder"):
        resolve_model(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="owner/name"):
        resolve_model("just-a-name")


def test_selection_skips_pickles_subfolders_and_unindexed_weights():
    tree = {f.path: f for f in map(remote, [
        "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
        "special_tokens_map.json", "chat_template.jinja", "additional_chat_templates/tools.jinja", "README.md",
        "pytorch_model.bin", "original/consolidated.00.pth", "original/model.safetensors",
        "consolidated.safetensors",  # Mistral's own format beside the HF shards: not in the index
        "model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
    ])}
    chosen = [f.path for f in select_files(tree, ["model-00001-of-00002.safetensors",
                                                  "model-00002-of-00002.safetensors"])]
    assert chosen == [
        "config.json", "generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
        "special_tokens_map.json", "chat_template.jinja", "additional_chat_templates/tools.jinja",
        "model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
    ]
    no_index = {p: f for p, f in tree.items() if "model-0000" not in p and "index" not in p}
    assert [f.path for f in select_files(no_index, None)][-1:] == ["consolidated.safetensors"]
    with pytest.raises(HubError, match="does not have"):
        select_files(tree, ["model-00003-of-00003.safetensors"])


def test_snapshot_completeness(tmp_path):
    snap = tmp_path / "models--org--m" / "snapshots" / ("c" * 40)
    snap.mkdir(parents=True)
    assert missing_files(snap) == ["config.json"]
    (snap / "config.json").write_text("{}")
    assert missing_files(snap) == ["*.safetensors"]
    (snap / "model-00002-of-00003.safetensors").write_bytes(b"")
    assert missing_files(snap) == ["model-00001-of-00003.safetensors", "model-00003-of-00003.safetensors"]
    (snap / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00003.safetensors", "b": "model-00002-of-00003.safetensors"}}))
    assert missing_files(snap) == ["model-00001-of-00003.safetensors"]
    assert cached_snapshot("org/m", "main", tmp_path) is None  # no ref yet
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("c" * 40)
    assert cached_snapshot("org/m", "main", tmp_path) is None  # a shard is missing
    (snap / "model-00001-of-00003.safetensors").write_bytes(b"")
    assert cached_snapshot("org/m", "main", tmp_path) == snap
    assert resolve_model("org/m", cache_dir=tmp_path) == snap  # from the cache, no network


class Recorder(PullObserver):
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def start(self, plan) -> None:
        self.events.append(("start", plan.download_bytes))

    def file_start(self, file) -> None:
        self.events.append(("file", file.path))

    def file_progress(self, file, nbytes) -> None:
        self.events.append(("bytes", file.path, nbytes))

    def file_done(self, file, seconds) -> None:
        self.events.append(("done", file.path))

    def close(self) -> None:
        self.events.append(("close",))


def test_pull_reports_every_byte(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    folder = tmp_path / "repo"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\0" * 3_000_000)
    with HubServer() as hub:
        hub.add(ServedRepo.from_folder("org/m", folder))
        recorder = Recorder()
        result = pull("org/m", observer=recorder, cache_dir=tmp_path / "cache", endpoint=hub.url, token=False)
        again = pull("org/m", observer=Recorder(), cache_dir=tmp_path / "cache", endpoint=hub.url, token=False)
    sizes = {p.name: p.stat().st_size for p in folder.iterdir()}
    assert recorder.events[0] == ("start", sum(sizes.values())) and recorder.events[-1] == ("close",)
    for name, size in sizes.items():
        assert sum(e[2] for e in recorder.events if e[0] == "bytes" and e[1] == name) == size
        assert ("done", name) in recorder.events
    assert result.path == Path(tmp_path / "cache" / "models--org--m" / "snapshots" / result.commit)
    assert result.downloaded_bytes == sum(sizes.values()) and again.downloaded_bytes == 0
