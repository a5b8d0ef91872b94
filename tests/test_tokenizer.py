"""Tokenizer tests: sentencepiece training and round trips, tokenizer.json loading, streaming."""

import json
import sysconfig
from pathlib import Path

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from bitnet_jax.data.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer
from bitnet_jax.data.tokenizer_training import train_sentencepiece
from bitnet_jax.errors import BitNetError
from bitnet_jax.serve.streaming import StreamDecoder

STDLIB = Path(sysconfig.get_paths()["stdlib"])
CORPUS = [
    STDLIB / name
    for name in (
        "textwrap.py",
        "string.py",
        "json/__init__.py",
        "json/decoder.py",
        "json/encoder.py",
        "fnmatch.py",
        "shlex.py",
        "bisect.py",
        "heapq.py",
        "copy.py",
    )
]

# Things code tokenizers get wrong: tabs, CRLF, runs of blank lines, deep indentation, trailing
# spaces, leading whitespace at the very start, characters outside the training data (they go
# through byte fallback), and text that does not end in a newline.
TRICKY = (
    "  leading spaces\n"
    "\n\n\n"
    "def f(x):\n"
    "\tif x:\t# tab-indented\n"
    "\t\treturn 'héllo wörld ✓ 中文 🐍'\n"
    "                                        deep = 1   \n"
    "    \n"
    "class A:\r\n"
    "    pass\r\n"
    's = \'\\n\' + """\n  doc\n"""\n'
    "end"
)


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    return train_sentencepiece(CORPUS, 512, tmp_path_factory.mktemp("sp"))


def test_sentencepiece_reserved_ids(sp_tok):
    assert (sp_tok.pad_id, sp_tok.bos_id, sp_tok.eos_id) == (0, 1, 2)
    assert sp_tok.vocab_size == 512
    assert sp_tok.stop_ids == {2}
    ids = sp_tok.encode("x = 1\n")
    assert 1 not in ids and 2 not in ids  # encode adds no BOS/EOS
    assert sp_tok.decode([1, *ids, 2, 0]) == "x = 1\n"  # control tokens decode to nothing


def test_sentencepiece_round_trips_code(sp_tok):
    assert sp_tok.decode(sp_tok.encode(TRICKY)) == TRICKY
    for path in CORPUS:  # the training files themselves
        text = path.read_text(encoding="utf-8")
        assert sp_tok.decode(sp_tok.encode(text)) == text


def test_sentencepiece_learns_code_whitespace(sp_tok):
    # Indentation and line ends should be a few pieces, not one per character.
    assert len(sp_tok.encode("        ")) == 1
    assert len(sp_tok.encode("):\n")) <= 2


def test_sentencepiece_byte_fallback_layout(sp_tok):
    # Documented layout: the piece for byte b has id 4 + b. A character unseen in training
    # encodes as its UTF-8 bytes.
    snake = "🐍"
    assert sp_tok.encode(snake) == [4 + b for b in snake.encode("utf-8")]


def test_train_sentencepiece_is_deterministic(sp_tok, tmp_path):
    again = train_sentencepiece(CORPUS, 512, tmp_path)
    assert again.path.read_bytes() == sp_tok.path.read_bytes()
    assert again.fingerprint == sp_tok.fingerprint


def test_train_sentencepiece_max_bytes(tmp_path):
    tok = train_sentencepiece(CORPUS, 400, tmp_path, max_bytes=20_000)
    assert tok.train_stats["bytes"] <= 20_000


def test_train_sentencepiece_rejects_tiny_vocab(tmp_path):
    with pytest.raises(BitNetError, match="vocab_size=100"):
        train_sentencepiece(CORPUS, 100, tmp_path)


def test_load_tokenizer_finds_sentencepiece(sp_tok):
    tok = load_tokenizer(sp_tok.path.parent)
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.encode(TRICKY) == sp_tok.encode(TRICKY)
    assert load_tokenizer(sp_tok.path, eos_id=5).eos_id == 5  # a file path, and an override


def test_load_tokenizer_empty_folder(tmp_path):
    with pytest.raises(BitNetError) as err:
        load_tokenizer(tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message
    assert "tokenizer.json" in message and "tokenizer.model" in message


def test_decode_rejects_ids_outside_vocab(sp_tok):
    with pytest.raises(BitNetError, match="512"):
        sp_tok.decode([5, 512])


def _write_hf_tokenizer(folder: Path, texts: list[str]) -> None:
    """A tiny LLaMA-3-style byte-level BPE, built with the `tokenizers` library."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    tok.save(str(folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    _write_hf_tokenizer(folder, [p.read_text(encoding="utf-8") for p in CORPUS])
    return folder


def test_hf_tokenizer_json(hf_folder, sp_tok, tmp_path):
    folder = tmp_path
    (folder / "tokenizer.json").write_bytes((hf_folder / "tokenizer.json").read_bytes())
    (folder / "tokenizer.model").write_bytes(sp_tok.path.read_bytes())  # tokenizer.json wins
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<|begin_of_text|>",
                "eos_token": {"content": "<|eot_id|>", "special": True},
            }
        )
    )
    (folder / "config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
    tok = load_tokenizer(folder)
    assert isinstance(tok, HFTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 2, None)
    assert tok.stop_ids == {1, 2}  # the chat EOS from tokenizer_config, the text EOS from config
    assert tok.vocab_size == 400
    ids = tok.encode(TRICKY)
    assert 0 not in ids
    assert tok.decode(ids) == TRICKY
    assert tok.decode([0, *ids, 1]) == TRICKY
    assert load_tokenizer(folder, bos_id=1, eos_id=0).eos_id == 0  # caller's ids win


def test_hf_tokenizer_falls_back_to_config_and_names(hf_folder, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((hf_folder / "tokenizer.json").read_bytes())
    tok = HFTokenizer(tmp_path / "tokenizer.json")  # no config files: well-known names
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [2, 1]}))
    assert HFTokenizer(tmp_path / "tokenizer.json").eos_id == 2


def test_hf_tokenizer_malformed_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text("version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(BitNetError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def _stream(tok, ids, step):
    decoder = StreamDecoder(tok)
    parts = [decoder.push(ids[i : i + step]) for i in range(0, len(ids), step)]
    return parts + [decoder.flush()]


@pytest.mark.parametrize("step", [1, 2, 5])
def test_stream_decoder_sentencepiece(sp_tok, step):
    ids = sp_tok.encode(TRICKY)
    parts = _stream(sp_tok, ids, step)
    assert "".join(parts) == sp_tok.decode(ids) == TRICKY
    # Multi-byte characters arrive whole: no replacement characters in any part.
    assert not any("\ufffd" in p for p in parts)
    assert "🐍" in parts or any("🐍" in p for p in parts)


def test_stream_decoder_splits_character_across_byte_tokens(sp_tok):
    ids = sp_tok.encode("a🐍b")
    decoder = StreamDecoder(sp_tok)
    outputs = [decoder.push(i) for i in ids]
    # 'a', then three incomplete bytes of the snake (held back), then the snake, then 'b'.
    assert outputs == ["a", "", "", "", "🐍", "b"]
    assert decoder.flush() == ""


def test_stream_decoder_flushes_incomplete_bytes(sp_tok):
    ids = sp_tok.encode("x🐍")[:-1]  # generation stopped mid-character
    parts = _stream(sp_tok, ids, 1)
    assert "".join(parts) == sp_tok.decode(ids)
    assert parts[-1].endswith("\ufffd")  # only flush() gives out the broken tail


def test_stream_decoder_hf(hf_folder):
    tok = HFTokenizer(hf_folder / "tokenizer.json")
    ids = [0, *tok.encode(TRICKY), 1]
    for step in (1, 3):
        assert "".join(_stream(tok, ids, step)) == tok.decode(ids) == TRICKY


class _DummyPrefixTokenizer:
    """Mimics LLaMA-2-style sentencepiece decoding: the first piece's leading space is dropped."""

    pieces = ["<s>", "</s>", "▁hello", "▁world", "!", "\n", "▁"]

    def decode(self, ids):
        text = "".join(self.pieces[i] for i in ids if i > 1).replace("▁", " ")
        return text[1:] if text.startswith(" ") else text


def test_stream_decoder_keeps_spaces_dropped_by_slice_decoding():
    tok = _DummyPrefixTokenizer()
    ids = [0, 2, 3, 4, 5, 6, 3]
    expected = "hello world!\n  world"
    assert tok.decode(ids) == expected
    assert "".join(_stream(tok, ids, 1)) == expected  # naive per-token decode gives "helloworld!"
