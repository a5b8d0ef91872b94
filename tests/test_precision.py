"""Precision and layer-loop options of a run: bf16 compute from f32 master weights,
rematerialization of the decoder layers and the unrolled layer scan, each against the plain f32
computation with the scan."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax import BitNetConfig, BitNetError, BitNetLM, init_params
from bitnet_jax.train.run_config import load_run_config
from bitnet_jax.train.step import compute_params, make_model, make_optimizer, make_train_step, training_loss

# initializer_range=0.3: logits far from uniform at init, so the loss depends on every layer
# (with 0.02 it sits at ln V whatever the precision, and comparing it would prove nothing).
CONFIG = BitNetConfig.preset(
    "tiny",
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=97,
    initializer_range=0.3,
)
SMALL = [
    "model.hidden_size=64",
    "model.intermediate_size=96",
    "model.num_hidden_layers=2",
    "model.num_attention_heads=4",
    "model.num_key_value_heads=2",
    "model.vocab_size=97",
    "model.initializer_range=0.3",
    "warmup_steps=0",
    "learning_rate=1e-2",
]


def batch(b=4, t=16, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "inputs": rng.integers(0, 97, (b, t), dtype=np.int32),
        "targets": rng.integers(0, 97, (b, t), dtype=np.int32),
        "segment_ids": np.repeat(np.array([[1] * 9 + [2] * 7]), b, axis=0).astype(np.int32),
    }


def equations(jaxpr):
    """Every equation of a jaxpr, those nested in jit, scan, remat and custom_vjp bodies included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from equations(inner)


def remat_policies(jaxpr) -> list:
    """The policy of every rematerialized region (jax names the primitive remat2 or checkpoint)."""
    return [eqn.params["policy"] for eqn in equations(jaxpr) if eqn.primitive.name in ("remat2", "checkpoint")]


def test_bf16_compute_trains_from_f32_master_state():
    run = load_run_config(None, [*SMALL, "compute_dtype=bfloat16"])
    model, optimizer, data = make_model(run), make_optimizer(run), batch()
    params = params_0 = init_params(run.model, seed=1)  # the step functions do not donate their inputs
    opt_state = optimizer.init(params)

    # The forward pass computes in bf16: every matmul takes bf16 inputs...
    jaxpr = jax.make_jaxpr(lambda p: training_loss(p, model, data, compute_dtype="bfloat16"))(params).jaxpr
    dots = [eqn for eqn in equations(jaxpr) if eqn.primitive.name == "dot_general"]
    assert dots and {str(v.aval.dtype) for eqn in dots for v in eqn.invars} == {"bfloat16"}
    # ...while BitLinear kernels reach their quantizer in f32 (f32 absmean) and the rest is cast.
    cast = compute_params(params, "bfloat16")
    assert cast["layers"]["mlp"]["up_proj"]["kernel"].dtype == jnp.float32
    assert cast["embed_tokens"]["embedding"].dtype == cast["norm"]["weight"].dtype == jnp.bfloat16

    step = make_train_step(model, optimizer, compute_dtype=run.compute_dtype)
    losses = []
    for _ in range(5):
        params, opt_state, loss = step(params, opt_state, data)
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0], losses  # it learns the batch
    # Master weights and Adam moments stay f32: bf16 is only the forward/backward compute.
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    assert {leaf.dtype for leaf in jax.tree.leaves(opt_state) if jnp.issubdtype(leaf.dtype, jnp.floating)} == {
        jnp.dtype(jnp.float32)
    }

    # Step 1's loss (at the same initial parameters) against the f32 run. bf16 keeps 8 mantissa
    # bits: each rounding moves a value by up to 2^-9 = 0.2%, and these errors (weights, the
    # residual stream, 2 layers of matmul outputs) reach the logits as a relative error of a
    # few tenths of a percent; the cross-entropy of logits of this scale moves by about as much.
    # 1% of the loss bounds that with margin; a wrong cast (f16 overflow, bf16 softmax over
    # 97 classes, unquantized kernels) is off by far more. It must also not be bit-identical,
    # which would mean nothing was computed in bf16.
    loss_f32 = float(jax.jit(lambda p: training_loss(p, model, data)[1])(params_0))
    assert losses[0] == pytest.approx(loss_f32, rel=1e-2)
    assert losses[0] != loss_f32


def test_remat_gives_the_gradients_of_no_remat():
    data = batch(seed=1)
    params = init_params(CONFIG, seed=2)
    grad = lambda remat: jax.jit(jax.grad(lambda p: training_loss(p, BitNetLM(CONFIG, remat=remat), data)[0]))
    assert remat_policies(jax.make_jaxpr(grad("none"))(params).jaxpr) == []
    for remat in ("full", "dots_saveable"):
        # It does recompute, with the policy asked for (None: jax.checkpoint's save-nothing default).
        policy = None if remat == "full" else getattr(jax.checkpoint_policies, remat)
        assert set(remat_policies(jax.make_jaxpr(grad(remat))(params).jaxpr)) == {policy}
    # The same arithmetic, recomputed: equal up to fp32 reassociation by XLA (measured ~5e-7 of
    # each leaf's largest gradient, for both). Compared for "full" only, which recomputes the
    # most; a policy changes what is saved, not what is computed (and each compile costs ~8 s).
    for g_plain, g_remat in zip(jax.tree.leaves(grad("none")(params)), jax.tree.leaves(grad("full")(params))):
        scale = float(jnp.max(jnp.abs(g_plain)))
        np.testing.assert_allclose(g_remat, g_plain, rtol=1e-5, atol=1e-5 * scale)


def scan_unrolls(jaxpr) -> list:
    """The `unroll` of every scan in a jaxpr."""
    return [eqn.params["unroll"] for eqn in equations(jaxpr) if eqn.primitive.name == "scan"]


def test_unrolled_layers_give_the_loss_and_gradients_of_the_scan():
    data = batch(seed=3)
    params = init_params(CONFIG, seed=4)
    loss = lambda scan: lambda p: training_loss(p, BitNetLM(CONFIG, scan_layers=scan), data)[0]
    grad = lambda scan: jax.jit(jax.value_and_grad(loss(scan)))
    # The same parameters (stacked over layers) serve both; only the layer scan's unroll differs
    # (the forward scan and its transpose in the backward pass).
    assert set(scan_unrolls(jax.make_jaxpr(grad(True))(params).jaxpr)) == {1}
    assert set(scan_unrolls(jax.make_jaxpr(grad(False))(params).jaxpr)) == {CONFIG.num_hidden_layers}
    # The same arithmetic; XLA fuses the unrolled program differently, so float sums may
    # reassociate: equal to f32 rounding (a few ulps of each leaf's largest gradient), which the
    # 1e-5 bounds leave room for.
    (l_scan, g_scan), (l_flat, g_flat) = grad(True)(params), grad(False)(params)
    np.testing.assert_allclose(l_flat, l_scan, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_scan), jax.tree.leaves(g_flat), strict=True):
        scale = float(jnp.max(jnp.abs(a)))
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * scale)


def test_the_run_setting_reaches_the_model():
    run = load_run_config(None, [*SMALL, "scan_layers=False"])
    assert run.scan_layers is False and make_model(run).scan_layers is False
    assert load_run_config(None, SMALL).scan_layers is True


@pytest.mark.parametrize(
    "setting, message",
    [
        (
            "compute_dtype=float16",
            "RunConfig.compute_dtype='float16' is invalid: expected one of ('float32', 'bfloat16')",
        ),
        (
            "remat=dots",
            "RunConfig.remat='dots' is invalid: expected 'none', 'full' (recompute whole layers) or a "
            "jax.checkpoint policy: dots_saveable",
        ),
        ("remat=save_only_these_names", "RunConfig.remat='save_only_these_names' is invalid"),
        ("scan_layers=2", "RunConfig.scan_layers=2 is invalid: expected True or False"),
    ],
)
def test_bad_precision_settings(setting, message):
    with pytest.raises(BitNetError) as e:
        load_run_config(None, [setting])
    assert message in str(e.value)
