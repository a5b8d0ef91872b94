"""GGUF tokenizers: the vocabulary in a GGUF file's metadata <-> the project's tokenizer wrappers.

Two kinds, as llama.cpp names them in `tokenizer.ggml.model`:
  'gpt2'   byte-level BPE (LLaMA-3 for 2B4T): `tokenizer.ggml.tokens`, `.token_type`, `.merges`
           ("a b" per merge) and `.pre`, the pre-tokenizer ('llama-bpe': LLaMA-3's split regex;
           'gpt2' / 'default': GPT-2's). Rebuilt as a Hugging Face `tokenizers` BPE.
  'llama'  sentencepiece (runs trained here): tokens, `.scores`, `.token_type`,
           `.add_space_prefix`. Rebuilt as a sentencepiece BPE model with byte fallback.
Special ids come from `tokenizer.ggml.bos_token_id` / `eos_token_id` / `padding_token_id`, the
chat template from `tokenizer.chat_template`.

The wrappers (`data.tokenizer.HFTokenizer`, `SentencePieceTokenizer`) read files, so the rebuilt
tokenizer is written once into the cache (`$BITNET_JAX_CACHE/gguf-tokenizers/<hash>/`, with a
`tokenizer_config.json` naming the special tokens and the chat template) and loaded from there;
`copy_tokenizer` then copies it like any other.
"""

from __future__ import annotations

import hashlib
import json
import os

from bitnet_jax.errors import BitNetError

# Token types (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# LLaMA-3's pre-tokenizer split (tokenizer.json of meta-llama/Meta-Llama-3-8B; llama.cpp 'llama-bpe').
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_PRE_LLAMA3 = ("llama-bpe", "llama3", "llama-v3")
_PRE_GPT2 = ("gpt2", "default")


def gguf_tokenizer(meta, config):
    """The tokenizer of a GGUF file (`meta`: its `gguf.Metadata`), as the project's wrapper."""
    from bitnet_jax.data.tokenizer import HFTokenizer, SentencePieceTokenizer

    kind = meta.string("tokenizer.ggml.model")
    tokens = meta.array("tokenizer.ggml.tokens", "string")
    types = meta.array("tokenizer.ggml.token_type", "int", default=[NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise BitNetError(f"{meta.path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens.")
    if len(tokens) > config.vocab_size:
        raise BitNetError(f"{meta.path}: {len(tokens)} tokens for a model of vocab_size {config.vocab_size}.")
    template = meta.string("tokenizer.chat_template", default="")
    bos, eos = config.bos_token_id, config.eos_ids[0] if config.eos_ids else None
    if kind == "gpt2":
        merges = meta.array("tokenizer.ggml.merges", "string")
        pre = meta.string("tokenizer.ggml.pre", default="default")
        files = {"tokenizer.json": _bpe_json(tokens, types, merges, pre, meta.path)}
    elif kind == "llama":
        scores = meta.array("tokenizer.ggml.scores", "float", default=[0.0] * len(tokens))
        prefix = meta.bool("tokenizer.ggml.add_space_prefix", default=False)
        files = {"tokenizer.model": _spm_bytes(tokens, scores, types, prefix, bos, eos)}
    else:
        raise BitNetError(
            f"{meta.path}: tokenizer.ggml.model={kind!r}; expected 'gpt2' (byte-level BPE, e.g. LLaMA-3) "
            "or 'llama' (sentencepiece)."
        )
    tok_config = {"chat_template": template} if template else {}
    for key, token_id in (("bos_token", bos), ("eos_token", eos)):
        if token_id is not None and token_id < len(tokens):
            tok_config[key] = tokens[token_id]
    files["tokenizer_config.json"] = json.dumps(tok_config, ensure_ascii=False).encode()
    folder = _cache_folder(files)
    if kind == "gpt2":
        return HFTokenizer(os.path.join(folder, "tokenizer.json"), bos_id=bos, eos_id=eos)
    return SentencePieceTokenizer(os.path.join(folder, "tokenizer.model"), bos_id=bos, eos_id=eos)


def _cache_folder(files: dict[str, bytes]) -> str:
    """A cache folder holding `files`, named by their hash (so concurrent loads agree); each file
    is written under a temporary name and renamed, so a reader never sees half a file."""
    from bitnet_jax.train.run_folder import default_cache_dir

    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + files[name] + b"\0")
    folder = os.path.join(default_cache_dir(), "gguf-tokenizers", digest.hexdigest()[:24])
    os.makedirs(folder, exist_ok=True)
    for name, data in files.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
    return folder


def _bpe_json(tokens: list[str], types: list[int], merges: list[str], pre: str, path: str) -> bytes:
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(tokens)}
    pairs = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise BitNetError(f"{path}: tokenizer.ggml.merges entry {merge!r} is not 'left right'.")
        pairs.append((left, right))
    if pre in _PRE_LLAMA3:
        model = models.BPE(vocab, pairs, ignore_merges=True)
        pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(tokenizers.Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    elif pre in _PRE_GPT2:
        model = models.BPE(vocab, pairs)
        pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        raise BitNetError(
            f"{path}: tokenizer.ggml.pre={pre!r}; expected one of {_PRE_LLAMA3 + _PRE_GPT2} "
            "(LLaMA-3 or GPT-2 byte-level BPE)."
        )
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    added = [
        tokenizers.AddedToken(tokens[i], special=types[i] == CONTROL, normalized=False)
        for i in range(len(tokens))
        if types[i] in (CONTROL, USER_DEFINED)
    ]
    tok.add_tokens(added)  # ids are those of the vocabulary: the tokens are in it already
    return tok.to_str().encode()


def _spm_bytes(tokens, scores, types, add_prefix: bool, bos, eos) -> bytes:
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    piece_type = {NORMAL: 1, UNKNOWN: 2, CONTROL: 3, USER_DEFINED: 4, UNUSED: 5, BYTE: 6}
    for token, score, kind in zip(tokens, scores, types):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = token, float(score), piece_type.get(int(kind), 1)
    trainer = proto.trainer_spec
    trainer.model_type = pb.TrainerSpec.BPE
    trainer.byte_fallback = any(int(kind) == BYTE for kind in types)
    trainer.vocab_size = len(tokens)
    unk = next((i for i, kind in enumerate(types) if int(kind) == UNKNOWN), 0)
    trainer.unk_id = unk
    trainer.bos_id = -1 if bos is None else bos
    trainer.eos_id = -1 if eos is None else eos
    trainer.pad_id = -1
    # GGUF does not record these; the values of the models `data.tokenizer.train_sentencepiece` writes.
    trainer.split_by_whitespace = True
    trainer.allow_whitespace_only_pieces = True
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = add_prefix
    proto.normalizer_spec.remove_extra_whitespaces = False
    return proto.SerializeToString()


# --- export -----------------------------------------------------------------------------------


def add_vocab(writer, tokenizer, config, chat_template: str | None) -> None:
    """Writes the tokenizer metadata llama.cpp / bitnet.cpp read (see the module docstring)."""
    from bitnet_jax.data.tokenizer import HFTokenizer

    if isinstance(tokenizer, HFTokenizer):
        _add_bpe(writer, tokenizer, config)
    else:
        _add_spm(writer, tokenizer, config)
    if config.bos_token_id is not None:
        writer.add_bos_token_id(config.bos_token_id)
    if config.eos_ids:
        writer.add_eos_token_id(config.eos_ids[0])
    if config.pad_token_id is not None:
        writer.add_pad_token_id(config.pad_token_id)
    writer.add_add_bos_token(config.bos_token_id is not None)  # bitnet-jax prompts start with BOS
    writer.add_add_eos_token(False)
    if chat_template:
        writer.add_chat_template(chat_template)


def _add_bpe(writer, tokenizer, config) -> None:
    spec = json.loads(tokenizer.path.read_text(encoding="utf-8"))
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise BitNetError(f"{tokenizer.path}: a {model.get('type')} tokenizer; GGUF export takes byte-level BPE.")
    pre = _pre_name(spec.get("pre_tokenizer"))
    if pre is None:
        raise BitNetError(
            f"{tokenizer.path}: its pre-tokenizer is neither LLaMA-3's nor GPT-2's byte-level one, the two "
            "that llama.cpp names ('llama-bpe', 'gpt2'); the exported file would tokenize differently."
        )
    vocab_size = max(config.vocab_size, tokenizer.vocab_size)
    tokens, types = [], []
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    for i in range(vocab_size):
        token = tokenizer.id_to_token(i) if i < tokenizer.vocab_size else None
        if token is None:  # ids the model has and the tokenizer does not (padding to a round size)
            token, kind = f"[PAD{i}]", UNUSED
        elif i in added:
            kind = CONTROL if added[i].get("special") else USER_DEFINED
        else:
            kind = NORMAL
        tokens.append(token)
        types.append(kind)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)


def _pre_name(pre: dict | None) -> str | None:
    if not pre:
        return None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "gpt2"
    if pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers", [])
        if (
            len(parts) == 2
            and parts[0].get("type") == "Split"
            and parts[0].get("pattern", {}).get("Regex") == LLAMA3_SPLIT
            and parts[1].get("type") == "ByteLevel"
            and not parts[1].get("use_regex", True)
        ):
            return "llama-bpe"
    return None


def _add_spm(writer, tokenizer, config) -> None:
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(tokenizer.path.read_bytes())
    if proto.trainer_spec.model_type not in (pb.TrainerSpec.BPE, pb.TrainerSpec.UNIGRAM):
        raise BitNetError(f"{tokenizer.path}: a sentencepiece model of type {proto.trainer_spec.model_type}.")
    kind_of = {1: NORMAL, 2: UNKNOWN, 3: CONTROL, 4: USER_DEFINED, 5: UNUSED, 6: BYTE}
    tokens = [p.piece for p in proto.pieces]
    scores = [p.score for p in proto.pieces]
    types = [kind_of.get(p.type, NORMAL) for p in proto.pieces]
    for i in range(len(tokens), config.vocab_size):
        tokens.append(f"[PAD{i}]")
        scores.append(-1e9)
        types.append(UNUSED)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)
    unk = next((i for i, kind in enumerate(types) if kind == UNKNOWN), None)
    if unk is not None:
        writer.add_unk_token_id(unk)
