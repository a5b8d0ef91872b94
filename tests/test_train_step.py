"""The train step's options against references computed another way: gradient accumulation
against one step on the whole batch, z-loss against its formula."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bitnet_jax import BitNetConfig, BitNetError, BitNetLM, init_params
from bitnet_jax.train.run_config import load_run_config
from bitnet_jax.train.step import make_optimizer, make_train_step, training_loss

CONFIG = BitNetConfig.preset(
    "tiny",
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=97,
)


def batch(b=8, t=12, seed=0):
    rng = np.random.default_rng(seed)
    segments = np.repeat(np.array([[1] * 7 + [2] * 5]), b, axis=0).astype(np.int32)  # two documents per row
    return {
        "inputs": rng.integers(0, 97, (b, t), dtype=np.int32),
        "targets": rng.integers(0, 97, (b, t), dtype=np.int32),
        "segment_ids": segments,
    }


@pytest.mark.parametrize("accum", [2, 4])
def test_gradient_accumulation_equals_one_big_step(accum):
    model, optimizer = BitNetLM(CONFIG), optax.sgd(0.5)  # plain SGD: the update is the gradient
    params = init_params(CONFIG, seed=1)
    data = batch()
    whole = make_train_step(model, optimizer)
    split = make_train_step(model, optimizer, grad_accum_steps=accum)
    p1, _, loss1 = whole(params, optimizer.init(params), data)
    p2, _, loss2 = split(params, optimizer.init(params), data)
    np.testing.assert_allclose(loss2, loss1, rtol=1e-6)
    # Same sums in another order (fp32): differences at the 1e-6 relative level; a wrong average
    # (sum instead of mean, or one micro-batch only) would be off by a factor.
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_z_loss_adds_its_formula_and_reports_plain_cross_entropy():
    model, params, data = BitNetLM(CONFIG), init_params(CONFIG, seed=2), batch()
    objective, ce = training_loss(params, model, data, z_loss=1e-2)
    logits = np.asarray(model.apply({"params": params}, data["inputs"], segment_ids_bt=data["segment_ids"]), np.float64)
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    want_ce = np.mean(log_z - np.take_along_axis(logits, data["targets"][..., None], -1)[..., 0])
    np.testing.assert_allclose(ce, want_ce, rtol=1e-5)
    np.testing.assert_allclose(objective, want_ce + 1e-2 * np.mean(log_z**2), rtol=1e-5)
    assert training_loss(params, model, data)[0] == training_loss(params, model, data)[1]


def test_z_loss_pulls_the_normalizer_toward_one():
    run = load_run_config(
        None,
        [
            "model.hidden_size=64",
            "model.intermediate_size=96",
            "model.num_hidden_layers=2",
            "model.num_attention_heads=4",
            "model.num_key_value_heads=2",
            "model.vocab_size=97",
            "warmup_steps=0",
            "learning_rate=1e-2",
        ],
    )
    model, data = BitNetLM(run.model), batch()
    mean_log_z = []
    for z in (0.0, 1.0):
        optimizer = make_optimizer(run)
        step = make_train_step(model, optimizer, z_loss=z)
        params = init_params(run.model, seed=3)
        state = optimizer.init(params)
        for _ in range(10):
            params, state, _ = step(params, state, data)
        logits = model.apply({"params": params}, data["inputs"], segment_ids_bt=data["segment_ids"])
        mean_log_z.append(float(jnp.mean(jnp.square(jax.nn.logsumexp(logits, -1)))))
    assert mean_log_z[1] < 0.5 * mean_log_z[0]


def test_grad_accum_must_divide_the_batch():
    with pytest.raises(BitNetError, match="grad_accum_steps=3 is invalid: expected a divisor of batch_size=16"):
        load_run_config(None, ["grad_accum_steps=3"])
