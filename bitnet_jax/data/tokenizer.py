"""Tokenizers: sentencepiece models this project trains, and Hugging Face `tokenizer.json` files.

Both backends share one small interface (`Tokenizer`): `encode` never adds BOS/EOS (the data
pipeline and the sampler decide where those go), `decode` drops control/special tokens.

Sentencepiece models trained here (`tokenizer_training.train_sentencepiece`) are byte-level-safe
BPE models for code:
- ids: pad=0 `<pad>`, bos=1 `<s>`, eos=2 `</s>`, unk=3 `<unk>`, then the 256 byte-fallback pieces
  `<0x00>`..`<0xFF>` (ids 4..259), then the learned merges;
- identity normalization, no dummy prefix, no whitespace folding: `decode(encode(text)) == text`
  for any text (tabs, blank lines, long indentation, emoji), with one sentencepiece limitation:
  the character U+2581 (LOWER ONE EIGHTH BLOCK) is its internal space symbol and comes back as " ";
- newlines are ordinary characters: training sentences are multi-line chunks of the files, so
  pieces such as `":\\n"` and `"\\n\\n"` are learned like any other.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Protocol, Sequence

import sentencepiece as spm
import tokenizers

from bitnet_jax.errors import BitNetError

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SENTENCEPIECE_FILE = "tokenizer.model"
HF_TOKENIZER_FILE = "tokenizer.json"

# Training sentences are chunks of whole lines of about this many bytes: several lines, so that
# pieces spanning a newline can be learned, and far below the trainer's sentence-length limit.
# Special tokens looked up by name when no config file names them (LLaMA-3, LLaMA-2, GPT-2).
_KNOWN_BOS = ("<|begin_of_text|>", "<s>", "<bos>")
_KNOWN_EOS = ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>")


class Tokenizer(Protocol):
    """What the data pipeline, the sampler and the CLI need from a tokenizer."""

    vocab_size: int  # number of ids the tokenizer can produce or decode
    bos_id: int
    eos_id: int
    pad_id: int | None
    stop_ids: frozenset[int]  # ids that end generation (always contains eos_id)
    fingerprint: str  # changes when the model file or the special ids change; keys caches

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def id_to_token(self, token_id: int) -> str:
        """The token's own string, special tokens included (`decode` drops those): e.g.
        '<|begin_of_text|>' for LLaMA-3's BOS, '<s>' for a sentencepiece BOS."""
        ...


def _fingerprint(model_bytes: bytes, *ids: int | None) -> str:
    h = hashlib.sha256(model_bytes)
    h.update(repr(ids).encode())
    return h.hexdigest()[:16]


def _check_ids(ids: Sequence[int], vocab_size: int, source: str) -> list[int]:
    out = [int(i) for i in ids]
    bad = [i for i in out if not 0 <= i < vocab_size]
    if bad:
        raise BitNetError(
            f"Cannot decode token id {bad[0]}: the tokenizer ({source}) has ids "
            f"0..{vocab_size - 1}. The model's vocab_size is probably larger than the "
            "tokenizer's; use the tokenizer that was trained with this model."
        )
    return out


def _check_special(name: str, value: int | None, vocab_size: int, source: str) -> None:
    if value is not None and not 0 <= value < vocab_size:
        raise BitNetError(
            f"{name}={value} is outside the tokenizer's ids 0..{vocab_size - 1} ({source}). "
            f"Pass the {name} from the model config that matches this tokenizer."
        )


class SentencePieceTokenizer:
    """A sentencepiece `tokenizer.model` (the format `train_sentencepiece` writes)."""

    # Set by train_sentencepiece: {"files", "bytes", "seconds"} of the training run.
    train_stats: dict | None = None

    def __init__(self, model_path: str | os.PathLike, *, bos_id: int | None = None, eos_id: int | None = None):
        self.path = Path(model_path)
        model_bytes = self.path.read_bytes()
        self._sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id = self._sp.bos_id() if bos_id is None else int(bos_id)
        self.eos_id = self._sp.eos_id() if eos_id is None else int(eos_id)
        pad = self._sp.pad_id()
        self.pad_id = None if pad < 0 else pad
        for name, value in (("bos_id", self.bos_id), ("eos_id", self.eos_id)):
            if value < 0:
                raise BitNetError(
                    f"{self.path} defines no {name}. Pass {name}=... to load_tokenizer (from the model config)."
                )
            _check_special(name, value, self.vocab_size, str(self.path))
        self.stop_ids = frozenset({self.eos_id})
        self.fingerprint = _fingerprint(model_bytes, self.bos_id, self.eos_id, self.pad_id)
        self._threads = os.cpu_count() or 1

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), num_threads=self._threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(_check_ids(ids, self.vocab_size, str(self.path)))

    def id_to_token(self, token_id: int) -> str:
        return self._sp.id_to_piece(_check_ids([token_id], self.vocab_size, str(self.path))[0])

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (e.g. the LLaMA-3 byte-level BPE of BitNet b1.58 2B4T).

    BOS/EOS/PAD come from, in order: the arguments; `tokenizer_config.json` (`bos_token`, ...);
    `config.json` (`bos_token_id`, ...); well-known token names in the vocabulary. `stop_ids`
    collects every EOS id those files name (2B4T's chat EOS `<|eot_id|>` and text EOS
    `<|end_of_text|>` differ), plus `generation_config.json`'s.
    """

    def __init__(self, json_path: str | os.PathLike, *, bos_id: int | None = None, eos_id: int | None = None):
        self.path = Path(json_path)
        folder = self.path.parent
        model_bytes = self.path.read_bytes()
        try:
            self._tok = tokenizers.Tokenizer.from_str(model_bytes.decode("utf-8"))
        except Exception as e:  # the Rust side raises a bare Exception on a malformed file
            raise BitNetError(
                f"Could not read {self.path} as a Hugging Face tokenizer.json ({e}). "
                "Check that the file is complete (not a Git LFS pointer) and not hand-edited."
            ) from e
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

        tok_config = _read_json(folder / "tokenizer_config.json")
        model_config = _read_json(folder / "config.json")
        gen_config = _read_json(folder / "generation_config.json")

        def from_token(key: str) -> int | None:
            tok = tok_config.get(key)
            if isinstance(tok, dict):
                tok = tok.get("content")
            return self._tok.token_to_id(tok) if isinstance(tok, str) else None

        def from_ids(config: dict, key: str) -> list[int]:
            value = config.get(key)
            values = value if isinstance(value, list) else [value]
            return [int(v) for v in values if isinstance(v, int)]

        def from_names(names: Sequence[str]) -> int | None:
            found = (self._tok.token_to_id(n) for n in names)
            return next((i for i in found if i is not None), None)

        def first(*candidates: int | None) -> int | None:
            return next((c for c in candidates if c is not None), None)

        config_bos = from_ids(model_config, "bos_token_id")
        config_eos = from_ids(model_config, "eos_token_id")
        self.bos_id = first(bos_id, from_token("bos_token"), *config_bos, from_names(_KNOWN_BOS))
        self.eos_id = first(eos_id, from_token("eos_token"), *config_eos, from_names(_KNOWN_EOS))
        self.pad_id = first(from_token("pad_token"), *from_ids(model_config, "pad_token_id"))
        for name, value, known in (("bos_id", self.bos_id, _KNOWN_BOS), ("eos_id", self.eos_id, _KNOWN_EOS)):
            if value is None:
                raise BitNetError(
                    f"Found no {name} for {self.path}: looked in tokenizer_config.json, "
                    f"config.json and for the tokens {', '.join(known)}. "
                    f"Pass {name}=... to load_tokenizer (from the model config)."
                )
            _check_special(name, value, self.vocab_size, str(self.path))
        _check_special("pad_id", self.pad_id, self.vocab_size, str(self.path))
        stops = {self.eos_id, *config_eos, *from_ids(gen_config, "eos_token_id")}
        self.stop_ids = frozenset(i for i in stops if 0 <= i < self.vocab_size)
        self.fingerprint = _fingerprint(model_bytes, self.bos_id, self.eos_id, self.pad_id)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(_check_ids(ids, self.vocab_size, str(self.path)), skip_special_tokens=True)

    def id_to_token(self, token_id: int) -> str:
        return self._tok.id_to_token(_check_ids([token_id], self.vocab_size, str(self.path))[0])

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BitNetError(f"Could not parse {path} as JSON ({e}). Fix or remove the file.") from e
    return data if isinstance(data, dict) else {}


def load_tokenizer(folder: str | os.PathLike, bos_id: int | None = None, eos_id: int | None = None) -> Tokenizer:
    """Loads `folder/tokenizer.json` if present, else `folder/tokenizer.model`.

    `folder` may also be the path of either file. `bos_id` / `eos_id` (e.g. from the model's
    config) override what the tokenizer files say.
    """
    path = Path(folder)
    if path.is_file():
        folder, candidates = path.parent, [path]
    else:
        folder, candidates = path, [path / HF_TOKENIZER_FILE, path / SENTENCEPIECE_FILE]
    for candidate in candidates:
        if not candidate.is_file():
            continue
        if candidate.suffix == ".json":
            return HFTokenizer(candidate, bos_id=bos_id, eos_id=eos_id)
        return SentencePieceTokenizer(candidate, bos_id=bos_id, eos_id=eos_id)
    what = "does not exist" if not folder.exists() else "contains neither"
    raise BitNetError(
        f"No tokenizer in {folder}: it {what} {HF_TOKENIZER_FILE} (Hugging Face) nor "
        f"{SENTENCEPIECE_FILE} (sentencepiece). Point to a model folder that has one, or train one "
        "with train_sentencepiece."
    )


# Files a tokenizer folder may hold besides tokenizer.json / tokenizer.model: its special-token
# settings and its chat template (tokenizer_config.json's `chat_template`, or chat_template.jinja).
_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "chat_template.jinja")


def copy_tokenizer(tokenizer: Tokenizer, out_dir: str | os.PathLike) -> None:
    """Copies a loaded tokenizer's file and the side files beside it into `out_dir`, so that
    `load_tokenizer(out_dir)` gives the same tokenizer back, with the same chat template."""
    source = Path(tokenizer.path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = HF_TOKENIZER_FILE if isinstance(tokenizer, HFTokenizer) else SENTENCEPIECE_FILE
    if (out / name).resolve() != source.resolve():
        shutil.copy(source, out / name)
    for side in _SIDE_FILES:
        if (source.parent / side).is_file() and (out / side).resolve() != (source.parent / side).resolve():
            shutil.copy(source.parent / side, out / side)
