"""Tokenizer files from a stranger (tokenizer.json, tokenizer_config.json, chat templates): each broken one
ends in one line naming the file, exit 1, no traceback; a tokenizer with more ids than the model has
embedding rows is refused at load (issue 13: those ids were gathered out of bounds and printed garbage)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from tests.hostile_files import invoke, one_line_error, tiny_folder

RUN = ("--prompt", "hi", "--max-tokens", "2")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_folder(tmp_path_factory.mktemp("hostile-tokenizer") / "tiny")


def copy(tiny: Path, dst: Path) -> Path:
    shutil.copytree(tiny, dst)
    return dst


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"])
@pytest.mark.parametrize("text", ["{not json", "[" * 200_000 + "]" * 200_000, '"a string"', "\udcff"])
def test_unreadable_tokenizer_files(tiny, tmp_path, name, text):
    folder = copy(tiny, tmp_path / "m")
    (folder / name).write_text(text, errors="surrogateescape")
    for command in ("info", "run"):
        line = one_line_error(command, folder, *(RUN if command == "run" else ()))
        assert name in line, line


@pytest.mark.parametrize("edit", [
    lambda t: t["model"].update(vocab={"a": "zero"}),
    lambda t: t["model"].update(merges=[["qq", "zz"]]),
    lambda t: t["model"].update(merges="nope"),
    lambda t: t.update(added_tokens=[{"id": "x", "content": 5}]),
    lambda t: t.update(pre_tokenizer={"type": "NoSuchThing"}),
    lambda t: t["model"].update(type="Unigram"),
])  # fmt: skip
def test_broken_tokenizer_json(tiny, tmp_path, edit):
    folder = copy(tiny, tmp_path / "m")
    edit_json(folder / "tokenizer.json", edit)
    line = one_line_error("run", folder, *RUN)
    assert "tokenizer.json" in line, line


def test_tokenizer_ids_past_the_embedding(tiny, tmp_path):
    """A vocabulary entry with id 5000 in a 384-row model: refused before any id reaches the embedding.
    (An added token's id is not: `tokenizers` renumbers it to the next free id.)"""
    folder = copy(tiny, tmp_path / "m")
    edit_json(folder / "tokenizer.json", lambda t: t["model"]["vocab"].update({"far": 5000}))
    line = one_line_error("run", folder, *RUN)
    assert "5000" in line and "384 rows" in line, line


def test_config_vocabulary_smaller_than_the_tokenizer(tmp_path):
    folder = tiny_folder(tmp_path / "m", config=None)
    config = json.loads((folder / "config.json").read_text())
    small = tiny_folder(tmp_path / "small", dict(config, vocab_size=300))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(folder / name, small / name)
    assert "300 rows" in one_line_error("run", small, *RUN)


@pytest.mark.parametrize("where", ["chat_template.jinja", "tokenizer_config.json"])
def test_chat_template_bomb_is_stopped(tiny, tmp_path, where):
    folder = copy(tiny, tmp_path / "m")
    loops = "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}"
    if where == "chat_template.jinja":
        (folder / where).write_text(loops)
    else:
        edit_json(folder / where, lambda c: c.update(chat_template=loops))
    start = time.monotonic()
    line = one_line_error("run", folder, *RUN, timeout=20)
    assert "chat template" in line and time.monotonic() - start < 10, line


def test_odd_but_harmless_tokenizer_config_still_runs(tiny, tmp_path):
    """Values transformers would ignore are ignored here too: exit 0, not a refusal."""
    folder = copy(tiny, tmp_path / "m")
    edit_json(folder / "tokenizer_config.json", lambda c: c.update(
        eos_token=5, bos_token={"content": 7}, pad_token=None, extra_special_tokens="x",
        clean_up_tokenization_spaces="maybe", model_max_length=-1))  # fmt: skip
    edit_json(folder / "config.json", lambda c: c.update(eos_token_id=["a", None, 3.5]))
    result = invoke("run", folder, *RUN)
    assert result.exit_code == 0, result.output
