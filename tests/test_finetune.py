"""`bitnet-jax train --init SRC`: fine-tuning starts from released weights, with their
architecture and tokenizer, and refuses settings that contradict them.

The Hugging Face fixture was written by transformers (2B4T layout: packed offline `bitlinear`
weights, a byte-level BPE tokenizer), so "the run starts from those weights" is checked against
a reader proven on files we did not write (`load_hf`, tests/test_hf_parity.py).
"""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from tiny_run import CORPUS_FILES

from bitnet_jax import BitNetConfig, BitNetError, cli, init_params, load_hf, pack
from bitnet_jax.data.pipeline import stdlib_root
from bitnet_jax.data.tokenizer_training import train_sentencepiece
from bitnet_jax.serve.pack import unpack
from bitnet_jax.train.run_folder import load_run

SOURCE = Path(__file__).parent / "fixtures" / "hf" / "packed_bitlinear"
# One step at learning rate 0 (and no weight decay) changes no weight: the checkpoint then holds
# exactly the parameters the run started from.
FROZEN = ["steps=1", "learning_rate=0.0", "stage2_learning_rate=0.0", "min_learning_rate=0.0", "weight_decay=0.0"]
SMALL = ["seq_len=32", "batch_size=2", "eval_batches=1", "heldout_fraction=0.2", "warmup_steps=1"]


@pytest.fixture(scope="module")
def corpus(tiny_env):
    return tiny_env["corpus"]


def _args(out, corpus, *sets, init=SOURCE):
    args = ["train", "--no-progress", "--out", str(out), "--set", f"corpus={corpus}"]
    if init is not None:
        args += ["--init", str(init)]
    return args + [a for s in (*SMALL, *sets) for a in ("--set", s)]


def _assert_same_tree(got, want):
    got_flat = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(got)[0]}
    want_flat = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(want)[0]}
    assert got_flat.keys() == want_flat.keys()
    for name in want_flat:
        np.testing.assert_array_equal(got_flat[name], want_flat[name], err_msg=name)


def test_init_from_a_hugging_face_folder(tmp_path, corpus):
    out = tmp_path / "run"
    assert cli.main(_args(out, corpus, *FROZEN)) == 0
    run, params, tokenizer = load_run(str(out))
    config, hf_params = load_hf(SOURCE)
    assert run.model == config and run.init == str(SOURCE)
    _assert_same_tree(params, hf_params)  # lr 0: the weights it started from, bit for bit
    # The tokenizer is the model's, copied into the run folder.
    assert tokenizer.vocab_size == config.vocab_size and tokenizer.eos_id == 418
    assert (out / "tokenizer.json").is_file()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert np.isfinite(metrics[0]["eval_loss"])
    # And it learns: a few steps at a real rate lower the training loss.
    out2 = tmp_path / "tuned"
    assert cli.main(_args(out2, corpus, "steps=4", "learning_rate=3e-3", "log_every=1", "eval_every=4")) == 0
    losses = [json.loads(line)["loss"] for line in (out2 / "metrics.jsonl").read_text().splitlines()[1:]]
    assert losses[-1] < losses[0]


def test_init_from_a_packed_folder_starts_from_its_ternary_codes(tmp_path, corpus):
    packed = tmp_path / "packed"
    assert cli.main(["convert", str(SOURCE), str(packed), "--lm-head", "float"]) == 0
    out = tmp_path / "run"
    assert cli.main(_args(out, corpus, *FROZEN, init=packed)) == 0
    run, params, _ = load_run(str(out))
    config, hf_params = load_hf(SOURCE)
    # Master weights made from the codes: packing them again gives the same codes, and scales
    # equal up to the float32 rounding of a mean (rtol 1e-5: 100x the pairwise-sum bound).
    want, got = pack(config, hf_params, lm_head="float"), pack(run.model, params, lm_head="float")
    for (path, w), (_, g) in zip(
        jax.tree_util.tree_flatten_with_path(want)[0], jax.tree_util.tree_flatten_with_path(got)[0]
    ):
        if np.asarray(w).dtype == np.uint8:
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=jax.tree_util.keystr(path))
        else:
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("weight_quant", ["tensor", "channel", "group:16"])
def test_unpack_inverts_pack(weight_quant):
    config = BitNetConfig.preset(
        "tiny",
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        weight_quant=weight_quant,
        tie_word_embeddings=weight_quant != "channel",
    )
    packed = pack(config, init_params(config, seed=4), lm_head="float")
    again = pack(config, unpack(config, packed), lm_head="float")
    for (path, w), (_, g) in zip(
        jax.tree_util.tree_flatten_with_path(packed)[0], jax.tree_util.tree_flatten_with_path(again)[0]
    ):
        name = jax.tree_util.keystr(path)
        if np.asarray(w).dtype == np.uint8:
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=name)
        else:
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, err_msg=name)


def test_settings_that_contradict_the_weights_are_refused(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert cli.main(_args(out, corpus, "model.hidden_size=128")) == 2
    err = capsys.readouterr().err
    assert "model.hidden_size=128 (the weights have 112)" in err
    # Agreeing settings are accepted; unknown model keys are named.
    assert cli.main(_args(out, corpus, "model.hiden_size=112")) == 2
    assert "did you mean 'model.hidden_size'" in capsys.readouterr().err
    # A tokenizer with another vocabulary than the weights.
    other = tmp_path / "other_tok"
    other.mkdir()
    train_sentencepiece([stdlib_root() / n for n in CORPUS_FILES], 640, str(other))
    assert cli.main(_args(out, corpus, f"tokenizer={other}")) == 2
    err = capsys.readouterr().err
    assert "vocab_size=640" in err and "vocab_size=419" in err
    assert not (out / "checkpoints").exists()
    # A missing source names the path.
    assert cli.main(_args(out, corpus, init=tmp_path / "nowhere")) == 2
    assert "nowhere" in capsys.readouterr().err


def test_initial_params_must_fit_the_model(tmp_path):
    from bitnet_jax.train.loop import _placed
    from bitnet_jax.train.run_config import RunConfig

    config = BitNetConfig.preset("tiny", hidden_size=64, intermediate_size=96, num_hidden_layers=2)
    other = init_params(config.replace(intermediate_size=128))
    with pytest.raises(BitNetError, match="do not fit the run's model config"):
        _placed(other, RunConfig(model=config), jax.tree.map(lambda _: None, other))
