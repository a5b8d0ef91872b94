"""`chat:` sources for supervised fine-tuning: conversations rendered by the model's chat template,
the loss only on assistant tokens.

References computed another way: the expected token ids and mask are spelled out by hand from the
template's markup (no jinja, no prefix rendering); batches against a token-by-token walk over the
documents; the loss against a numpy cross-entropy of the model's logits; a fine-tuning run
against its own first evaluation.
"""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from bitnet_jax import BitNetConfig, BitNetLM, cli, init_params
from bitnet_jax.data import documents
from bitnet_jax.data import pipeline as data
from bitnet_jax.data.chat import chat_prompt_ids, chat_training_ids, tokenizer_chat_template
from bitnet_jax.data.sources import DataSource, parse_source
from bitnet_jax.data.tokenizer import copy_tokenizer, load_tokenizer
from bitnet_jax.errors import BitNetError
from bitnet_jax.research.eval import ChatDocument, evaluate, split_documents
from bitnet_jax.serve.chat import chat_template
from bitnet_jax.train.step import make_train_step, training_loss

FIXTURE = Path(__file__).parent / "fixtures" / "hf" / "packed_bitlinear"
# LLaMA-3's chat markup (2B4T's family): headers and the end of turn are special tokens.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# Ends every turn with eos_token (as Mistral-style templates do), so EOS ids occur inside a
# conversation: for the fixture's tokenizer, whose only special tokens are BOS and EOS.
EOS_TURN_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": " hello there "},
    {"role": "user", "content": "how are you?"},
    {"role": "assistant", "content": "fine"},
]


def _conversations(n):
    """n short conversations; the replies follow a pattern a tiny model can learn in a few steps."""
    out = []
    for i in range(n):
        messages = [{"role": "user", "content": f"{i} plus one?"}, {"role": "assistant", "content": f"{i + 1}."}]
        if i % 3 == 0:
            messages = [{"role": "system", "content": "Count."}, *messages]
        if i % 4 == 1:
            messages += [{"role": "user", "content": "and again?"}, {"role": "assistant", "content": f"{i + 1}."}]
        out.append({"messages": messages})
    return out


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def llama3_folder(tmp_path_factory):
    """A tiny byte-level BPE with LLaMA-3's special tokens and chat template."""
    folder = tmp_path_factory.mktemp("llama3_tok")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["system user assistant hello there how are you fine brief"] * 20, trainer)
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "chat_template": LLAMA3_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """The packed 2B4T-style HF fixture with a chat template that ends turns with its EOS."""
    folder = tmp_path_factory.mktemp("chat_model") / "model"
    shutil.copytree(FIXTURE, folder)
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(tok_config, chat_template=EOS_TURN_TEMPLATE)))
    return folder


def _streams(path, tokenizer, cache=None, fraction=0.0, source=None):
    return documents.source_streams(
        source or DataSource("chat", str(path)),
        tokenizer,
        default_suffixes=(".txt",),
        heldout_fraction=fraction,
        cache_dir=cache,
    )


# The mask.
def test_mask_marks_exactly_the_assistant_tokens_llama3(llama3_folder):
    tok = load_tokenizer(llama3_folder)
    special = [tok.encode(t) for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")]
    assert all(len(ids) == 1 for ids in special)  # each one token, as in LLaMA-3's vocabulary
    sh, eh, eot = (ids[0] for ids in special)

    def header(role):
        return [sh, *tok.encode(role), eh, *tok.encode("\n\n")]

    # LLaMA-3's rendering, by hand: contents trimmed; each reply and its <|eot_id|> are targets,
    # its header and every system / user token are not.
    pieces = [
        ([tok.bos_id, *header("system"), *tok.encode("Be brief."), eot], 0),
        ([*header("user"), *tok.encode("hi"), eot, *header("assistant")], 0),
        ([*tok.encode("hello there"), eot], 1),
        ([*header("user"), *tok.encode("how are you?"), eot, *header("assistant")], 0),
        ([*tok.encode("fine"), eot], 1),
    ]
    ids, mask = chat_training_ids(LLAMA3_TEMPLATE, CONVERSATION, tok)
    assert ids == [i for piece, _ in pieces for i in piece]
    assert mask == [m for piece, m in pieces for _ in piece]
    # Up to the last reply, the ids are the prompt `chat` / `serve` build for that conversation.
    prompt = chat_prompt_ids(LLAMA3_TEMPLATE, CONVERSATION[:-1], tok)
    assert ids[: len(prompt)] == prompt and mask[len(prompt) - 1] == 0 and mask[len(prompt)] == 1


def test_mask_with_eos_as_end_of_turn(chat_model):
    tok = load_tokenizer(chat_model)
    enc, eos = tok.encode, tok.eos_id
    pieces = [
        ([tok.bos_id, *enc("system: Be brief."), eos, *enc("user: hi"), eos, *enc("assistant: ")], 0),
        ([*enc(" hello there "), eos], 1),  # this template does not trim
        ([*enc("user: how are you?"), eos, *enc("assistant: ")], 0),
        ([*enc("fine"), eos], 1),
    ]
    ids, mask = chat_training_ids(EOS_TURN_TEMPLATE, CONVERSATION, tok)
    assert ids == [i for piece, _ in pieces for i in piece]
    assert mask == [m for piece, m in pieces for _ in piece]


# Through the pipeline.
def _reference_stream(docs, masks, eos_id):
    """Per stream position: token, loss flag and document index, walking `doc EOS doc EOS ...`."""
    tokens, loss, doc_of = [], [], []
    for d, (ids, mask) in enumerate(zip(docs, masks)):
        tokens += [*ids, eos_id]
        loss += [*mask, 0]
        doc_of += [d] * (len(ids) + 1)
    return np.array(tokens), np.array(loss), np.array(doc_of)


def test_batches_carry_the_mask_and_keep_each_conversation_one_segment(chat_model, tmp_path):
    tok = load_tokenizer(chat_model)
    records = _conversations(12)
    path = _write_jsonl(tmp_path / "chat.jsonl", records)
    train, held = _streams(path, tok, cache=tmp_path / "cache")
    assert isinstance(train, data.MaskedStream) and len(held) == 0
    cached, _ = _streams(path, tok, cache=tmp_path / "cache")  # from the cache: the same
    np.testing.assert_array_equal(cached.tokens, train.tokens)
    np.testing.assert_array_equal(cached.flags, train.flags)

    rendered = [chat_training_ids(EOS_TURN_TEMPLATE, r["messages"], tok) for r in records]
    tokens, loss, doc_of = _reference_stream(*zip(*rendered), tok.eos_id)
    np.testing.assert_array_equal(train.tokens, tokens)
    t = 16
    batches = data.make_eval_batches(train, t, 2, eos_id=tok.eos_id)
    inner_eos = 0
    for b, batch in enumerate(batches):
        for row in range(2):
            start = (b * 2 + row) * t
            np.testing.assert_array_equal(batch["inputs"][row], tokens[start : start + t])
            np.testing.assert_array_equal(batch["loss_mask"][row], loss[start + 1 : start + t + 1])
            docs = doc_of[start : start + t]
            np.testing.assert_array_equal(batch["segment_ids"][row], docs - docs[0] + 1)
            # EOS ids inside a conversation (its turns' ends) start no new segment.
            inside = (tokens[start : start + t] == tok.eos_id) & (doc_of[start + 1 : start + t + 1] == docs)
            inner_eos += int(inside.sum())
    assert inner_eos > 0
    # Assistant replies are targets; their EOS too; users' turns are not.
    assert 0 < loss.mean() < 0.5


def test_chat_batches_are_the_same_from_worker_processes_and_across_hosts(chat_model, tmp_path):
    """A chat source's loss mask travels with its tokens through grain's worker processes
    (`worker_count`, the stream pickled into each) and through the per-host shards of a
    multi-process run: the same batches, mask and segments included, as one process builds."""
    tok = load_tokenizer(chat_model)
    train, _ = _streams(_write_jsonl(tmp_path / "chat.jsonl", _conversations(12)), tok)
    make = lambda **kw: data.make_train_iterator(train, 16, 4, 7, eos_id=tok.eos_id, shard_index=0, shard_count=1, **kw)
    take = lambda it, n: [next(it) for _ in range(n)]
    expected = take(make(), 5)
    assert all(b["loss_mask"].any() for b in expected)
    workers = make(worker_count=1)
    try:
        from_workers = take(workers, 5)
    finally:
        workers.close()
    hosts = [take(data.make_train_iterator(train, 16, 4, 7, eos_id=tok.eos_id, shard_index=i, shard_count=2), 5)
             for i in range(2)]  # fmt: skip
    for b, want in enumerate(expected):
        for key in ("inputs", "targets", "segment_ids", "loss_mask"):
            np.testing.assert_array_equal(from_workers[b][key], want[key], err_msg=f"{key}, batch {b}")
            # Each host gets every second window of the global order: rows 0, 2 and 1, 3.
            together = np.empty_like(want[key])
            together[0::2], together[1::2] = hosts[0][b][key], hosts[1][b][key]
            np.testing.assert_array_equal(together, want[key], err_msg=f"{key}, batch {b}, hosts")


def test_mixed_corpus_masks_chat_and_counts_every_plain_token(chat_model, tmp_path):
    tok = load_tokenizer(chat_model)
    chat_path = _write_jsonl(tmp_path / "chat.jsonl", _conversations(10))
    plain_path = _write_jsonl(tmp_path / "plain.jsonl", [{"text": f"plain text number {i}."} for i in range(12)])
    chat_stream, _ = _streams(chat_path, tok)
    plain_stream, _ = documents.source_streams(
        parse_source(f"jsonl:{plain_path}"), tok, default_suffixes=(".txt",), heldout_fraction=0.0, cache_dir=None
    )
    t = 12
    expected = {}  # window tokens -> (loss mask, segment ids) of every window of both streams
    for stream, flags in ((chat_stream.tokens, chat_stream.flags), (plain_stream, None)):
        stream = np.asarray(stream, np.int64)
        for start in range(0, len(stream) - t, t):
            window = stream[start : start + t + 1]
            if flags is None:  # plain text: every target counts, EOS ends documents
                mask, ends = np.ones(t, int), window[:-1] == tok.eos_id
            else:
                mask, ends = flags[start + 1 : start + t + 1] & data.LOSS, flags[start : start + t] & data.DOC_END
            ended = np.cumsum(ends != 0) - (ends != 0)
            expected[window.tobytes()] = (mask != 0, ended + 1)
    it = data.make_train_iterator(
        [chat_stream, plain_stream], t, 4, 0, weights=[1, 1], eos_id=tok.eos_id, shard_index=0, shard_count=1
    )
    seen = {"chat": 0, "plain": 0}
    for _ in range(6):
        batch = next(it)
        for row in range(4):
            window = np.concatenate([batch["inputs"][row], batch["targets"][row][-1:]]).astype(np.int64)
            mask, segments = expected[window.tobytes()]
            np.testing.assert_array_equal(batch["loss_mask"][row], mask)
            np.testing.assert_array_equal(batch["segment_ids"][row], segments)
            seen["plain" if mask.all() else "chat"] += 1
    assert seen["chat"] and seen["plain"]
    it.close()
    # Held-out streams of both kinds join into one masked stream; plain documents stay plain.
    joined = data.concat_streams([chat_stream, plain_stream], tok.eos_id)
    docs = split_documents(joined, tok.eos_id)
    assert sum(isinstance(d, ChatDocument) for d in docs) == 10 and len(docs) == 22


def test_pre_tokenized_chat_folder_gives_the_same_masked_streams(chat_model, tmp_path, capsys):
    tok = load_tokenizer(chat_model)
    path = _write_jsonl(tmp_path / "chat.jsonl", _conversations(12))
    out = tmp_path / "tok"
    assert cli.main(["tokenize", "--corpus", f"chat:{path}", "--tokenizer", str(chat_model), "--out", str(out)]) == 0
    assert "Wrote 12 documents" in capsys.readouterr().out
    folder = parse_source(f"array_record:{out}")
    for direct, stored in zip(_streams(path, tok, fraction=0.25), _streams(out, tok, fraction=0.25, source=folder)):
        assert isinstance(stored, data.MaskedStream) and len(stored) == len(direct) > 0
        np.testing.assert_array_equal(np.asarray(stored.tokens), direct.tokens)
        np.testing.assert_array_equal(np.asarray(stored.flags), direct.flags)
        # Windows read lazily from the folder: the same batches.
        for a, b in zip(
            data.make_eval_batches(direct, 8, 2, eos_id=tok.eos_id),
            data.make_eval_batches(stored, 8, 2, eos_id=tok.eos_id),
        ):
            assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # A run on the folder uses the template stored with its tokenizer.
    assert tokenizer_chat_template(load_tokenizer(out)) == EOS_TURN_TEMPLATE


# The loss.
def test_training_loss_is_the_masked_cross_entropy(chat_model, tmp_path):
    tok = load_tokenizer(chat_model)
    train, _ = _streams(_write_jsonl(tmp_path / "chat.jsonl", _conversations(8)), tok)
    batch = data.make_eval_batches(train, 16, 4, max_batches=1, eos_id=tok.eos_id)[0]
    assert 0 < batch["loss_mask"].sum() < batch["loss_mask"].size
    config = BitNetConfig.preset(
        "tiny",
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model, params = BitNetLM(config), init_params(config, seed=3)
    plain = {k: v for k, v in batch.items() if k != "loss_mask"}

    @jax.jit  # one program: the forward passes are the same computation, compiled once
    def forward_and_losses(params):
        logits = model.apply({"params": params}, batch["inputs"], segment_ids_bt=batch["segment_ids"])
        return logits, training_loss(params, model, batch)[1], training_loss(params, model, plain)[1]

    logits, masked_loss, plain_loss = forward_and_losses(params)
    logits = np.asarray(logits, np.float64)
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    ce = log_z - np.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]  # [B, T]
    np.testing.assert_allclose(masked_loss, (ce * batch["loss_mask"]).sum() / batch["loss_mask"].sum(), rtol=1e-5)
    np.testing.assert_allclose(plain_loss, ce.mean(), rtol=1e-5)  # no mask: every target

    # Gradient accumulation weights each micro-batch (rows 0, 2 and rows 1, 3) by its masked-in
    # tokens, so that the step's loss (and its gradient, summed with the same weights) is the whole
    # batch's mean: here the micro-batches hold 3 and 19 such tokens, and the plain mean of their
    # means would differ.
    uneven = dict(batch, loss_mask=batch["loss_mask"].copy())
    uneven["loss_mask"][1] = 1
    counts = uneven["loss_mask"].reshape(2, 2, -1).swapaxes(0, 1).sum(axis=(1, 2))
    assert counts[0] != counts[1]
    optimizer = optax.sgd(0.5)
    _, _, loss = make_train_step(model, optimizer, grad_accum_steps=2)(params, optimizer.init(params), uneven)
    np.testing.assert_allclose(loss, (ce * uneven["loss_mask"]).sum() / uneven["loss_mask"].sum(), rtol=1e-5)


def test_eval_scores_only_the_assistant_tokens(chat_model):
    tok = load_tokenizer(chat_model)
    ids, mask = chat_training_ids(EOS_TURN_TEMPLATE, CONVERSATION, tok)

    class Scorer:  # log p(target j) = -j: the sum tells which targets were scored
        def score(self, seqs):
            return [(-np.arange(1, len(s), dtype=np.float64), None) for s in seqs]

    doc = ChatDocument(np.array(ids, np.int32), np.array(mask, bool))
    result = evaluate(Scorer(), tok, [doc])
    targets = [j for j in range(1, len(ids)) if mask[j]]
    assert result.tokens == len(targets) and result.nll == sum(targets)
    assert result.bytes == len(b" hello there ") + len(b"fine")  # replies only (EOS spells nothing)
    assert evaluate(Scorer(), tok, [doc], max_tokens=2).nll == sum(targets[:2])


# End to end.
def test_finetune_on_chat_data_end_to_end(chat_model, tiny_env, tmp_path):
    path = _write_jsonl(tmp_path / "chat.jsonl", _conversations(30))
    out = tmp_path / "run"
    settings = [
        f"corpus=chat:{path}",
        "seq_len=32",
        "batch_size=2",
        "eval_batches=2",
        "heldout_fraction=0.2",
        "warmup_steps=1",
        "steps=6",
        "learning_rate=0.1",  # the fixture's random logits are large (std ~10): a high rate moves them
        "log_every=1",
        "eval_every=6",
    ]
    args = ["train", "--no-progress", "--init", str(chat_model), "--out", str(out)]
    assert cli.main(args + [a for s in settings for a in ("--set", s)]) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 6 and all(np.isfinite(losses))
    # The held-out assistant-token loss (the same batches each time) goes down, and so does
    # training's (over batches of a few dozen targets each: compared over three steps).
    assert metrics[-1]["eval_loss"] < 0.8 * metrics[0]["eval_loss"]
    assert np.mean(losses[3:]) < np.mean(losses[:3])
    # The run folder keeps the template: a resume, `chat` and `serve` render as this run did.
    assert chat_template(str(out)) == EOS_TURN_TEMPLATE


# Bad input.
GOOD = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "invalid JSON"),
        (json.dumps({"conversation": []}), "no field \"messages\"; this record has 'conversation'"),
        (json.dumps({"messages": [{"role": "bot", "content": "x"}]}), "message 1 has role 'bot'"),
        (
            json.dumps({"messages": [{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "x"}]}),
            "message 1 \\(user\\) has content of JSON type list",
        ),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "no assistant message"),
        (json.dumps({"messages": []}), "non-empty list"),
    ],
)
def test_bad_records_name_file_and_line(llama3_folder, tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{GOOD}\n\n{line}\n")
    with pytest.raises(BitNetError, match=f"bad.jsonl, line 3: .*{message}"):
        _streams(path, load_tokenizer(llama3_folder))


def test_templates_that_cannot_be_used_are_refused(llama3_folder, tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(f"{GOOD}\n{GOOD}\n")
    folder = tmp_path / "tok"
    shutil.copytree(llama3_folder, folder)

    def with_template(template):
        config = json.loads((llama3_folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps(dict(config, chat_template=template)))
        return load_tokenizer(folder)

    # No template: the source is named, and how to get one.
    tok = with_template(None)
    with pytest.raises(BitNetError, match=f"chat:{path}: the tokenizer .* has no chat template"):
        _streams(path, tok)
    # A template that refuses the conversation: its message, with file and line.
    tok = with_template("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(BitNetError, match="chat.jsonl, line 1: chat template: roles must alternate"):
        _streams(path, tok)
    # A template that renders an earlier reply unlike the last one (dropping it, as reasoning
    # templates drop thoughts): which tokens are the reply's cannot be told, so it is refused.
    tok = with_template(
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}[...]"
        "{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
    )
    _write_jsonl(path, [json.loads(GOOD), {"messages": CONVERSATION}])
    with pytest.raises(
        BitNetError, match="chat.jsonl, line 2: .* first 3 messages \\(up to an assistant reply\\) differently"
    ):
        _streams(path, tok)
    # A run that would train a new tokenizer (no --init, no tokenizer=) has no template either.
    with pytest.raises(BitNetError, match="chat data are rendered by the model's chat template"):
        documents.training_documents(DataSource("chat", str(path)), (".txt",), 0.1)


def test_chat_source_forms():
    assert parse_source("chat:/data/sft.jsonl") == DataSource("chat", "/data/sft.jsonl")
    source = parse_source({"kind": "chat", "path": "/data/*.jsonl", "weight": 0.5})
    assert source == DataSource("chat", "/data/*.jsonl", weight=0.5) and source.name == "chat:/data/*.jsonl"
    assert parse_source(source.to_spec()) == source
    with pytest.raises(BitNetError, match="unknown key.*'field'"):
        parse_source({"kind": "chat", "path": "x.jsonl", "field": "messages"})


def test_template_in_chat_template_jinja_travels_with_the_tokenizer(llama3_folder, tmp_path):
    # Recent transformers versions save the template as chat_template.jinja beside the tokenizer.
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(llama3_folder / "tokenizer.json", folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>"}))
    (folder / "chat_template.jinja").write_text(LLAMA3_TEMPLATE)
    tok = load_tokenizer(folder)
    assert tokenizer_chat_template(tok) == LLAMA3_TEMPLATE == chat_template(str(folder))
    copy_tokenizer(tok, tmp_path / "run")
    assert tokenizer_chat_template(load_tokenizer(tmp_path / "run")) == LLAMA3_TEMPLATE
