"""What quantize copies, follows and writes when the source folder or the options are hostile.

- A source folder's side files (README, NOTICE, tokenizer, templates) reach the output only when they are
  the folder's own: ``README.md -> /proc/self/environ`` or ``NOTICE -> /etc/shadow`` must not put the
  environment or a secret file into OUT, nor a linked chat template into the prompt. Links inside the
  folder, and a Hub snapshot's links into its repo's blobs, are the folder's own. Weights and config.json
  may be links anywhere (a folder assembled by hand from links is legitimate; they are parsed, never
  passed on verbatim).
- An OUT that cannot be a new folder ("", ".", "..", "/", the current or home folder, the source) is
  refused in one line before any work; bad --group-size and recipe rules that match nothing likewise.
- edge-llm's own bandwidth.json, damaged, is measured again instead of a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from edge_llm.machine.bandwidth import remembered_bandwidth
from edge_llm.tokenizer import Tokenizer
from quant.quantize import QuantizeError, quantize
from tests.hf_oracle import build_tiny_checkpoint
from tests.hub_cache_layout import COMMIT, cache_entry
from tests.tiny_configs import TINY_CONFIGS

REPO = Path(__file__).resolve().parent.parent
SECRET = "s3cr3t-marker-7f1c2e"


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("src") / "llama", with_tokenizer=True,
                                 **TINY_CONFIGS["llama"])


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def holds_secret(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]


class NoWork:
    """A progress that fails the test if the conversion ever starts writing."""

    def start(self, tensors, nbytes):
        raise AssertionError("the conversion started")

    def advance(self, name, nbytes):
        raise AssertionError("the conversion started")


def test_side_file_links_out_of_the_folder_are_not_copied(src, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(src, model)
    shadow = tmp_path / "shadow"  # an /etc/shadow of our own
    shadow.write_text(f"root:$6${SECRET}:19000:0:99999:7:::\n")
    (model / "NOTICE").symlink_to(shadow)
    (model / "README.md").symlink_to("/proc/self/environ")  # the converting process's environment
    (model / "LICENSE").symlink_to(tmp_path)  # a folder outside
    (model / "USE_POLICY.md").symlink_to(tmp_path / "nowhere")  # dangling
    (model / "docs").mkdir()
    (model / "docs" / "card.md").write_text("a model card")
    (model / "MODEL_CARD.md").symlink_to("docs/card.md")  # a link inside the folder is the folder's own
    out = tmp_path / "out"
    env = {**os.environ, "EDGE_LLM_TEST_TOKEN": SECRET, "NO_COLOR": "1"}
    proc = subprocess.run([sys.executable, "-m", "cli.main", "quantize", str(model), "-o", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert holds_secret(out) == []
    names = listing(out)
    assert not {"NOTICE", "README.md", "LICENSE", "USE_POLICY.md", "docs"} & set(names), names
    assert {"MODEL_CARD.md", "tokenizer.json", "tokenizer_config.json", "config.json"} <= set(names)
    assert (out / "MODEL_CARD.md").read_text() == "a model card" and not (out / "MODEL_CARD.md").is_symlink()
    assert f"not copied into the output: NOTICE (a link to {shadow}, outside the model folder)" in proc.stderr
    assert "not copied into the output: README.md (a link to /proc/self/environ, outside" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_chat_template_linked_from_outside_is_not_read(src, tmp_path, caplog):
    """A template is read verbatim into the prompt: through a link out it would hand the model a secret file."""
    model = tmp_path / "model"
    shutil.copytree(src, model)
    (tmp_path / "secret").write_text(SECRET)
    (model / "chat_template.jinja").symlink_to(tmp_path / "secret")
    with caplog.at_level(logging.WARNING):
        prompt = Tokenizer.load(model).apply_chat_template([{"role": "user", "content": "hi"}])
    assert SECRET not in prompt and "hi" in prompt
    assert any("chat_template.jinja not used" in r.getMessage() for r in caplog.records)
    (model / "chat_template.jinja").unlink()
    (model / "templates").mkdir()
    (model / "templates" / "chat.jinja").write_text("{{ messages[0]['content'] }} in-folder template")
    (model / "chat_template.jinja").symlink_to("templates/chat.jinja")  # inside the folder: its own
    assert Tokenizer.load(model).apply_chat_template([{"role": "user", "content": "hi"}]) == "hi in-folder template"


def test_hub_snapshot_links_into_its_blobs_are_copied(src, tmp_path, caplog):
    repo = cache_entry(tmp_path / "hub", src)
    (repo / "blobs" / "readme").write_text("the repo's README")
    snapshot = repo / "snapshots" / COMMIT
    (snapshot / "README.md").symlink_to("../../blobs/readme")
    (tmp_path / "secret").write_text(SECRET)
    (snapshot / "NOTICE").symlink_to(tmp_path / "secret")
    with caplog.at_level(logging.WARNING):
        result = quantize(snapshot, tmp_path / "out")
    names = listing(tmp_path / "out")
    assert "README.md" in names and "tokenizer.json" in names and "NOTICE" not in names
    assert (tmp_path / "out" / "README.md").read_text() == "the repo's README"
    assert result.skipped_files == ("NOTICE",) and holds_secret(tmp_path / "out") == []
    assert any("NOTICE" in r.getMessage() and "outside the model folder" in r.getMessage() for r in caplog.records)


def test_weights_assembled_from_links_are_converted(src, tmp_path):
    """Weights and config.json are parsed, not passed on: links to them elsewhere make a legitimate model folder."""
    linked = tmp_path / "linked"
    linked.mkdir()
    for name in ("config.json", "model.safetensors"):
        (linked / name).symlink_to(src / name)
    quantize(linked, tmp_path / "from_links", bits=8)
    quantize(src, tmp_path / "from_files", bits=8)
    assert (tmp_path / "from_links" / "model.safetensors").read_bytes() == \
        (tmp_path / "from_files" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("where", ["empty", "dot", "dotdot", "root", "cwd", "above_cwd", "home", "source_parent"])
def test_outputs_that_cannot_be_a_new_folder_are_refused_before_any_work(src, tmp_path, monkeypatch, where):
    work = tmp_path / "work"
    work.mkdir()
    (work / "mine.txt").write_text("keep me")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    out = {"empty": "", "dot": ".", "dotdot": "..", "root": "/", "cwd": str(work), "above_cwd": str(tmp_path),
           "home": "~", "source_parent": str(src.parent)}[where]
    before = listing(tmp_path), listing(work), listing(src.parent)
    with pytest.raises(QuantizeError):
        quantize(src, out, force=True, progress=NoWork())
    result = CliRunner().invoke(app, ["quantize", str(src), "-o", out, "--force"])
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert "Traceback" not in result.output
    assert (listing(tmp_path), listing(work), listing(src.parent)) == before


def test_group_size_must_be_one_that_mlx_supports(src, tmp_path):
    for bad in ("0", "48", "-64"):
        result = CliRunner().invoke(app, ["quantize", str(src), "-o", str(tmp_path / "q"), "--group-size", bad])
        assert result.exit_code == 1, result.output
        assert result.stderr.strip() == f"error: --group-size must be 32, 64 or 128, got {bad}"
    assert listing(tmp_path) == []


@pytest.mark.parametrize("recipe, named", [(",,,", "',,,'"), ("[=8", "'[=8'"), ("*.v_proj=8,lm_hed=6", "'lm_hed=6'"),
                                           ("model.layers.9.*=8", "'model.layers.9.*=8'")])
def test_recipe_rules_that_match_nothing_are_refused(src, tmp_path, recipe, named):
    result = CliRunner().invoke(app, ["quantize", str(src), "-o", str(tmp_path / "q"), "--recipe", recipe])
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert named in result.stderr and "Traceback" not in result.output
    assert listing(tmp_path) == []


def test_a_rule_that_matches_is_applied(src, tmp_path):
    result = CliRunner().invoke(app, ["quantize", str(src), "-o", str(tmp_path / "q"), "--recipe", "*.v_proj=8"])
    assert result.exit_code == 0, result.output
    quantization = json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]
    assert quantization["model.layers.0.self_attn.v_proj"]["bits"] == 8 and quantization["bits"] == 4


@pytest.mark.parametrize("content", [b"[1, 2, 3]", b"\xff\xfe garbage", b'{"cpu:x": "fast"}', b"1e999",
                                     b"[" * 100_000, b'{"a": 1e999, "b": -5, "c": true, "d": ' + b"9" * 400 + b"}"])
def test_a_damaged_bandwidth_store_counts_as_not_measured(tmp_path, monkeypatch, content):
    monkeypatch.setenv("EDGE_LLM_HOME", str(tmp_path))
    (tmp_path / "bandwidth.json").write_bytes(content)
    assert remembered_bandwidth() is None


def test_doctor_measures_again_over_a_damaged_bandwidth_store(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_LLM_HOME", str(tmp_path))
    (tmp_path / "bandwidth.json").write_text("[1, 2, 3]")
    result = CliRunner().invoke(app, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    figure = json.loads(result.stdout)["bandwidth_bytes_per_s"]
    assert figure > 1e8 and remembered_bandwidth() == figure
    assert list(json.loads((tmp_path / "bandwidth.json").read_text()).values()) == [figure]
    assert listing(tmp_path) == ["bandwidth.json"]  # no temporary file left behind
