"""`bitnet-jax eval` (bitnet_jax.research.eval) and the lm-evaluation-harness adapter, on a tiny
model with real logit margins, against a reference written here: every token's log-probability
from one plain forward pass over exactly the context the window rule promises it."""

import dataclasses
import functools
import glob
import json
import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax import BitNetConfig, BitNetError, BitNetLM, cli, generate, init_params, pack, save_packed
from bitnet_jax.data.documents import split_indices
from bitnet_jax.data.tokenizer import copy_tokenizer, load_tokenizer
from bitnet_jax.data.tokenizer_training import train_sentencepiece
from bitnet_jax.research.eval import Scorer, _score_rows
from bitnet_jax.train.run_config import RunConfig
from bitnet_jax.train.run_folder import checkpoint_manager, save_checkpoint, write_or_check_run_file

LM_EVAL_TASKS = Path(__file__).parent / "fixtures" / "lm_eval"
DOCS = [json.loads(line)["text"] for line in (LM_EVAL_TASKS / "docs.jsonl").read_text().splitlines()]
CONFIG = BitNetConfig(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,  # pack()'s default then makes an int8 lm_head and keeps a float input embedding
    bos_token_id=1,
    eos_token_id=2,
)
SEQ_LEN = 32  # the run's window, and so eval's default context


def _trained_like(config, seed=0):
    """Random parameters with random norm weights and a spread-out lm_head, as trained models have
    (test_serving.py says why: real logit margins, no exact .5 ties in the activation quantizers).
    Drawn in numpy on init_params' shapes, which saves compiling the initializer."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "weight":  # norms
            return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
        scale = 20.0 if name == "embedding" or "lm_head" in str(path) else 1.0
        return jnp.asarray(rng.normal(0.0, config.initializer_range, leaf.shape) * scale, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, jax.eval_shape(lambda: init_params(config, seed)))


def _write_run(run_dir, run, params, tokenizer):
    """A run folder as `train` leaves it (run.json, tokenizer, a checkpoint of `params`), without training."""
    os.makedirs(run_dir)
    write_or_check_run_file(run, run_dir)
    copy_tokenizer(tokenizer, run_dir)
    manager = checkpoint_manager(run_dir, run)
    save_checkpoint(manager, 1, params, {"unused": np.zeros(1)}, {})
    manager.wait_until_finished()
    return run_dir


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A run folder (training on docs.jsonl, 30% held out), its packed forms, and what made them."""
    root = tmp_path_factory.mktemp("eval")
    tokenizer = train_sentencepiece([], CONFIG.vocab_size, root / "tok", texts=DOCS * 4)
    params = _trained_like(CONFIG)
    run = RunConfig(model=CONFIG, corpus=f"jsonl:{LM_EVAL_TASKS / 'docs.jsonl'}", seq_len=SEQ_LEN, heldout_fraction=0.3)
    folders = {"run": _write_run(str(root / "run"), run, params, tokenizer)}
    for name, lm_head in (("packed", None), ("packed-float", "float")):
        folders[name] = str(root / name)
        save_packed(folders[name], CONFIG, pack(CONFIG, params, lm_head=lm_head))
        copy_tokenizer(tokenizer, folders[name])
    os.environ["BITNET_JAX_CACHE"] = str(root / "cache")
    yield {"params": params, "tokenizer": load_tokenizer(folders["run"]), "root": root, **folders}
    os.environ.pop("BITNET_JAX_CACHE", None)


def reference_logprobs(params, seqs, contexts, config=None):
    """log p(seq[j] | seq[j - c_j : j]) for j = 1 .. n-1 of each sequence, c_j = contexts[i][j - 1]:
    one row per scored token, right-padded, in one forward pass of `config`'s model (CONFIG's
    fake-quant model by default)."""
    rows, where = [], []
    for seq, context in zip(seqs, contexts):
        for j in range(1, len(seq)):
            rows.append(seq[j - context[j - 1] : j])
            where.append((len(rows[-1]) - 1, seq[j]))
    ids = np.zeros((-(-len(rows) // 64) * 64, SEQ_LEN), np.int32)  # few shapes, few compiles
    for r, row in enumerate(rows):
        ids[r, : len(row)] = row
    logp = np.asarray(_reference_forward(params, ids, config or CONFIG), np.float64)
    logp = logp[np.arange(len(rows)), *np.array(where).T]
    return np.split(logp, np.cumsum([len(s) - 1 for s in seqs])[:-1])


@functools.partial(jax.jit, static_argnums=2)
def _reference_forward(params, ids, config):
    return jax.nn.log_softmax(BitNetLM(config).apply({"params": params}, ids), axis=-1)


# The window test checks bookkeeping (which targets each window scores, with how much context),
# so it runs the model without quantizers: its log-probabilities are then continuous in the
# inputs, and the scorer's padded, packed batches differ from the reference's rows only by float
# summation order, far below the 2e-4 bound (float32 log-softmax of logits of order 10: ~1e-5).
# With the quantizers on, such last-bit differences can flip an activation code that sat on a
# rounding boundary and move a log-probability by 1e-3 or more on one CPU and not another: near
# ties are tests/near_ties.py's subject, not this test's. A wrong context moves it by O(1).
FLOAT_CONFIG = dataclasses.replace(CONFIG, weight_quant="none", act_quant="none")


def test_sliding_windows_score_every_token_once_with_its_promised_context(model):
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, CONFIG.vocab_size, n) for n in (5, 50, 23)]
    w = 16
    compiled = _score_rows._cache_size()
    for stride in (1, 6):
        scorer = Scorer(FLOAT_CONFIG, model["params"], context=w, stride=stride)
        got = scorer.score(seqs)
        # Targets up to W share the first window (j tokens before target j); after it each window of
        # W inputs ends S targets further (or at the last one) and scores the targets it adds.
        ends = lambda j, n: min(n - 1, w + stride * -(-(j - w) // stride))
        contexts = [[j if j <= w else j - (ends(j, len(s)) - w) for j in range(1, len(s))] for s in seqs]
        want = reference_logprobs(model["params"], seqs, contexts, FLOAT_CONFIG)
        for (logp, _), ref in zip(got, want):
            assert not np.isnan(logp).any() and logp.shape == ref.shape
            np.testing.assert_allclose(logp, ref, atol=2e-4)  # float summation order (padding, packing)
    assert _score_rows._cache_size() <= compiled + 1  # one program for every batch of both strides

    # Scoring from target 45 of 50 on: one window of the last W inputs (lm-eval's left truncation).
    ((logp, _),) = Scorer(FLOAT_CONFIG, model["params"], context=w, stride=w).score([seqs[1]], [45])
    assert np.isnan(logp[:44]).all()
    (want,) = reference_logprobs(
        model["params"], [seqs[1]], [[max(1, j - (49 - w)) for j in range(1, 50)]], FLOAT_CONFIG
    )
    np.testing.assert_allclose(logp[44:], want[44:], atol=2e-4)


def _eval(capsys, tmp_path, *args):
    out = tmp_path / f"report-{len(list(tmp_path.iterdir()))}.json"
    assert cli.main(["eval", *args, "--json", str(out)]) == 0, capsys.readouterr().err
    return json.loads(out.read_text())


def test_eval_scores_the_runs_held_out_documents(model, capsys, tmp_path):
    report = _eval(capsys, tmp_path, "--model", model["run"], "--stride", "1")
    printed = capsys.readouterr().out
    assert "cross-entropy" in printed and "bits per byte" in printed and "held-out" in printed
    held = [DOCS[i] for i in split_indices(len(DOCS), 0.3)[1]]
    tok = model["tokenizer"]
    seqs = [[tok.bos_id, *tok.encode(d)] for d in held]
    want = reference_logprobs(model["params"], seqs, [[min(j, SEQ_LEN) for j in range(1, len(s))] for s in seqs])
    nll = -sum(float(r.sum()) for r in want)
    n_bytes = sum(len(d.encode("utf-8")) for d in held)
    assert report["documents"] == len(held) and report["tokens"] == sum(len(s) - 1 for s in seqs)
    assert report["bytes"] == n_bytes and report["context"] == SEQ_LEN and report["stride"] == 1
    np.testing.assert_allclose(report["nll"], nll, rtol=1e-5)
    np.testing.assert_allclose(report["bits_per_byte"], nll / np.log(2) / n_bytes, rtol=1e-5)
    np.testing.assert_allclose(report["perplexity"], np.exp(nll / report["tokens"]), rtol=1e-5)

    cut = _eval(capsys, tmp_path, "--model", model["run"], "--stride", "1", "--max-tokens", "9")
    assert cut["tokens"] == 9 and cut["documents"] == 1
    np.testing.assert_allclose(cut["nll"], -float(want[0][:9].sum()), rtol=1e-5)


def test_fake_quant_and_packed_models_agree(model, capsys, tmp_path):
    """Packed serving multiplies the same integers as the fake-quant forward and rescales once, so
    with a float lm_head the logits differ by float summation order only (relative ~1e-6,
    test_serving.py), plus an int8 activation code that may flip at a near-tie: cross-entropy and
    bits per byte agree to 1e-4 relative (measured: 1e-9). `pack`'s default int8 lm_head rounds each
    row of the head to 127 levels of its absmax: 0.2-0.3% relative logit error on a trained model
    (README, "lm_head"), and a token's log-probability moves by at most twice its largest logit
    change, with either sign; tolerance 5e-3 relative (measured: 4e-4)."""
    # A packed folder does not know the run's seq_len: the same window is given to all three.
    corpus = ["--corpus", f"jsonl:{LM_EVAL_TASKS / 'docs.jsonl'}", "--context", str(SEQ_LEN)]
    fake = _eval(capsys, tmp_path, "--model", model["run"], *corpus)
    float_head = _eval(capsys, tmp_path, "--model", model["packed-float"], *corpus)
    int8_head = _eval(capsys, tmp_path, "--model", model["packed"], *corpus)
    assert fake["forward"].startswith("fake-quant") and int8_head["forward"].startswith("packed")
    assert fake["documents"] == len(DOCS) and fake["tokens"] == int8_head["tokens"] == float_head["tokens"]
    for metric in ("cross_entropy", "bits_per_byte"):
        np.testing.assert_allclose(float_head[metric], fake[metric], rtol=1e-4)
        np.testing.assert_allclose(int8_head[metric], fake[metric], rtol=5e-3)


def test_bad_input_is_refused_with_a_message(model, capsys, tmp_path):
    def refused(*args):
        assert cli.main(["eval", *args]) == 2
        return capsys.readouterr().err

    assert "does not exist" in refused("--model", str(tmp_path / "nowhere"), "--corpus", "stdlib")
    assert "pass --corpus" in refused("--model", model["packed"])
    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "a.txt").write_text("  \n\n")
    assert "holds no text" in refused("--model", model["run"], "--corpus", str(blank))
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n{"text": "   "}\n')
    assert "no non-empty documents" in refused("--model", model["run"], "--corpus", f"jsonl:{tmp_path / 'empty.jsonl'}")
    assert "max_tokens=0" in refused("--model", model["run"], "--max-tokens", "0")
    assert "context=65" in refused("--model", model["run"], "--context", "65")
    assert "stride=40" in refused("--model", model["run"], "--stride", "40")
    # A run whose corpus is one document holds none out.
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"text": DOCS[0]}) + "\n")
    run = RunConfig(model=CONFIG, corpus=f"jsonl:{one}", seq_len=SEQ_LEN)
    run_dir = _write_run(str(tmp_path / "run1"), run, model["params"], model["tokenizer"])
    assert "held-out split is empty" in refused("--model", run_dir)


def test_lm_eval_from_the_command_line_matches_eval(model, capsys, tmp_path, monkeypatch):
    """`bitnet-jax lm-eval` runs lm-eval's own command line with the `bitnet-jax` model on three
    tasks of local files: its bits per byte is `bitnet-jax eval`'s on the same documents, each
    choice's loglikelihood the reference's, and each generation `bitnet_jax.generate`'s."""
    # No downloads: the tasks' data are local files (relative paths, hence the working directory).
    for name, value in (("HF_DATASETS_OFFLINE", "1"), ("HF_HUB_OFFLINE", "1"), ("HF_HOME", str(tmp_path / "hf"))):
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(LM_EVAL_TASKS)
    # lm-eval's command line first indexes its own ~13,000 task YAML files (half a minute); these
    # tests use only their own tasks (--include_path), so the index leaves the built-in ones out.
    from lm_eval.tasks import TaskManager

    init = TaskManager.__init__
    monkeypatch.setattr(
        TaskManager, "__init__", lambda self, *a, **k: init(self, *a, **{**k, "include_defaults": False})
    )
    out = tmp_path / "out"
    args = [
        "lm-eval",
        "--model",
        "bitnet-jax",
        "--model_args",
        f"pretrained={model['run']},max_length={SEQ_LEN},stride=16",
        "--tasks",
        "bitnet_tiny_rolling,bitnet_tiny_choice,bitnet_tiny_gen",
        "--include_path",
        str(LM_EVAL_TASKS),
        "--batch_size",
        "8",
        "--output_path",
        str(out),
        "--log_samples",
    ]
    assert cli.main(args) == 0, capsys.readouterr().err[-3000:]
    (results_file,) = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
    results = json.loads(Path(results_file).read_text())["results"]

    ours = _eval(
        capsys, tmp_path, "--model", model["run"], "--corpus", f"jsonl:{LM_EVAL_TASKS / 'docs.jsonl'}", "--stride", "16"
    )
    np.testing.assert_allclose(results["bitnet_tiny_rolling"]["bits_per_byte,none"], ours["bits_per_byte"], rtol=1e-5)

    def samples(task):
        (path,) = glob.glob(str(out / "**" / f"samples_{task}_*.jsonl"), recursive=True)
        return [json.loads(line) for line in Path(path).read_text().splitlines()]

    tok = model["tokenizer"]
    for sample in samples("bitnet_tiny_choice"):
        context = sample["doc"]["context"]
        for choice, resp in zip(sample["doc"]["choices"], sample["resps"]):
            ids = [tok.bos_id, *tok.encode(context + choice)]
            first = len(tok.encode(context)) + 1
            (want,) = reference_logprobs(model["params"], [ids], [list(range(1, len(ids)))])
            np.testing.assert_allclose(float(resp[0][0]), want[first - 1 :].sum(), rtol=1e-4, atol=1e-4)

    prompts = [[tok.bos_id, *tok.encode(sample["doc"]["context"])] for sample in samples("bitnet_tiny_gen")]
    # Padded to the adapter's 8 prompts, so that this reuses its compiled program.
    new_ids = generate(CONFIG, model["params"], prompts + prompts[-1:] * 5, 8, stop_ids=[tok.eos_id])
    for sample, new in zip(samples("bitnet_tiny_gen"), new_ids):
        new = new[: list(new).index(tok.eos_id)] if tok.eos_id in new else new
        assert sample["resps"][0][0] == tok.decode(new.tolist()).split("\n")[0]


def test_lm_eval_requests_longer_than_the_window(model, caplog):
    """Left truncation, lm-eval's convention: a loglikelihood request is scored in one window of its
    last W tokens; a generation prompt keeps its last W - max_gen_toks tokens; max_gen_toks >= W
    is refused."""
    from lm_eval.api.instance import Instance

    from bitnet_jax.research.lm_eval_adapter import BitNetJaxLM

    lm = BitNetJaxLM(pretrained=model["run"], max_length=16, batch_size=8)
    tok = model["tokenizer"]
    # (lm-eval moves a context's trailing whitespace into the continuation: this one has none.)
    context, continuation = DOCS[5].rstrip(), "\n\nx = 1"
    ids = [tok.bos_id, *tok.encode(context + continuation)]
    first = len(tok.encode(context)) + 1
    assert first > 16
    ((logp, _),) = lm.loglikelihood([Instance("loglikelihood", {}, (context, continuation), 0)])
    start = len(ids) - 1 - 16  # one window: the last 16 inputs
    (want,) = reference_logprobs(model["params"], [ids], [[max(1, j - start) for j in range(1, len(ids))]])
    np.testing.assert_allclose(logp, want[first - 1 :].sum(), rtol=1e-4)

    long_prompt = Instance("generate_until", {}, (DOCS[5], {"until": ["\n"], "max_gen_toks": 8}), 0)
    with caplog.at_level(logging.WARNING):
        (text,) = lm.generate_until([long_prompt])
    assert "keeps its last 8" in caplog.text
    kept = [tok.bos_id, *tok.encode(DOCS[5])][-8:]
    new = generate(CONFIG, model["params"], [kept] * 8, 8, stop_ids=[tok.eos_id])[0]
    new = new[: list(new).index(tok.eos_id)] if tok.eos_id in new else new
    assert text == tok.decode(new.tolist()).split("\n")[0]
    with pytest.raises(BitNetError, match="asks for 16 new tokens, but the model's window is 16"):
        lm.generate_until([Instance("generate_until", {}, ("x", {"until": ["\n"], "max_gen_toks": 16}), 0)])
