"""Quantizers against short numpy references, and the straight-through gradient."""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax.model import quant
from bitnet_jax.model.layers import BitLinear, QuantSpec
from bitnet_jax.model.quant import act_quantize, fake_quant_act, fake_quant_weight, weight_quantize


def ref_weight(w, mode):
    """numpy fake-quant of a [K, N] kernel: absmean ternary per tensor / output channel / group."""
    w = w.astype(np.float64)
    if mode == "tensor":
        scale = max(np.abs(w).mean(), 1e-5)
    elif mode == "channel":
        scale = np.maximum(np.abs(w).mean(axis=0), 1e-5)
    else:
        g = int(mode.split(":")[1])
        scale = np.repeat(np.maximum(np.abs(w.reshape(-1, g, w.shape[1])).mean(axis=1), 1e-5), g, axis=0)
    return np.clip(np.round(w / scale), -1, 1) * scale


def ref_act(x, mode, bits):
    q = 2 ** (bits - 1) - 1
    amax = np.abs(x).max(axis=-1, keepdims=True) if mode == "token" else np.abs(x).max()
    scale = q / np.maximum(amax, 1e-5)
    return np.clip(np.round(x * scale), -q - 1, q) / scale


@pytest.mark.parametrize("mode", ["tensor", "channel", "group:8", "group:32"])
def test_weight_granularities_match_reference(mode):
    w = np.random.default_rng(0).normal(size=(64, 24)).astype(np.float32)
    got = np.asarray(fake_quant_weight(jnp.asarray(w), mode))
    np.testing.assert_allclose(got, ref_weight(w, mode), rtol=1e-6, atol=1e-7)
    w_t, _ = weight_quantize(jnp.asarray(w), mode)
    assert set(np.unique(np.asarray(w_t))) <= {-1.0, 0.0, 1.0}


def test_per_channel_scales_differ_by_column():
    w = np.random.default_rng(1).normal(size=(16, 3)).astype(np.float32) * np.array([1.0, 10.0, 100.0], np.float32)
    _, scale = weight_quantize(jnp.asarray(w), "channel")
    np.testing.assert_allclose(np.asarray(scale)[0], np.abs(w).mean(axis=0), rtol=1e-6)


@pytest.mark.parametrize("mode", ["token", "tensor"])
@pytest.mark.parametrize("bits", [8, 4])
def test_activation_granularities_match_reference(mode, bits):
    x = np.random.default_rng(2).normal(size=(3, 5, 40)).astype(np.float32) * 3
    got = np.asarray(fake_quant_act(jnp.asarray(x), mode, bits))
    np.testing.assert_allclose(got, ref_act(x.astype(np.float64), mode, bits), rtol=1e-5, atol=1e-6)


def test_activation_rounding_is_half_to_even_and_clamped():
    # max |x| = 127 -> scale 1: 2.5 -> 2, 3.5 -> 4, -0.5 -> -0 (half to even, as torch.round).
    x = jnp.array([[127.0, 2.5, 3.5, -0.5, -127.0]])
    x_q, scale = act_quantize(x, "token", 8)
    np.testing.assert_array_equal(np.asarray(x_q), [[127, 2, 4, 0, -127]])
    assert float(scale[0, 0]) == 1.0
    zeros_q, zeros_scale = act_quantize(jnp.zeros((2, 3)), "token", 8)
    assert np.all(np.asarray(zeros_q) == 0) and np.allclose(np.asarray(zeros_scale), 127 / 1e-5)


def test_none_modes_are_identity():
    x = jnp.linspace(-2, 2, 12).reshape(3, 4)
    np.testing.assert_array_equal(fake_quant_weight(x, "none"), x)
    np.testing.assert_array_equal(fake_quant_act(x, "none", 8), x)


def test_straight_through_gradients_are_identity():
    w = jax.random.normal(jax.random.PRNGKey(0), (8, 6))
    cotangent = jax.random.normal(jax.random.PRNGKey(1), (8, 6))
    for fn in (lambda v: fake_quant_weight(v, "tensor"), lambda v: fake_quant_act(v, "token", 8)):
        grad = jax.grad(lambda v: jnp.sum(fn(v) * cotangent))(w)
        np.testing.assert_array_equal(np.asarray(grad), np.asarray(cotangent))


def test_bitlinear_gradient_is_the_ste_definition():
    """STE: y = Q(x) @ Q(W); dL/dx = g @ Q(W)^T and dL/dW = Q(x)^T @ g, as if Q were the identity."""
    spec = QuantSpec("tensor", "token", 8)
    layer = BitLinear(5, spec)
    x = np.random.default_rng(3).normal(size=(4, 7)).astype(np.float32)
    params = layer.init(jax.random.PRNGKey(0), x)["params"]
    g = np.random.default_rng(4).normal(size=(4, 5)).astype(np.float32)
    loss = lambda p, x: jnp.sum(layer.apply({"params": p}, x) * g)
    grad_p, grad_x = jax.grad(loss, argnums=(0, 1))(params, x)

    w = np.asarray(params["kernel"])
    qw, qx = ref_weight(w, "tensor"), ref_act(x.astype(np.float64), "token", 8)
    np.testing.assert_allclose(np.asarray(layer.apply({"params": params}, x)), qx @ qw, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grad_x), g @ qw.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grad_p["kernel"]), qx.T @ g, rtol=1e-5, atol=1e-5)


def test_bf16_bitlinear_gradient_is_the_ste_definition():
    """With bfloat16 activations the backward products take bf16 residuals (Q(x) and Q(W) rounded
    to bf16) and the bf16 gradient, and accumulate in float32. The reference is the same products
    of those bf16 values in float64, so what may differ is the float32 sums (at most n * 2^-24 *
    sum |a b| over the n terms) and, for dx, its final rounding to the activations' bf16 (bf16's
    unit roundoff: 2^-8 relative)."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(24, 96)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(96, 40)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(24, 40)), jnp.bfloat16)
    grad_x, grad_w = jax.grad(
        lambda x, w: jnp.sum(quant.bitlinear_matmul(x, w, "tensor", "token", 8) * g.astype(jnp.float32)),
        argnums=(0, 1),
    )(x, w)
    assert grad_x.dtype == jnp.bfloat16 and grad_w.dtype == jnp.float32

    as64 = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32), np.float64)
    x_q, x_scale = act_quantize(x.astype(jnp.float32), "token", 8)
    w_t, w_scale = weight_quantize(w, "tensor")
    qx, qw, g64 = as64(x_q / x_scale), as64(w_t * w_scale), as64(g)
    for got, a, b, last_rounding in ((grad_x, g64, qw.T, 2.0**-8), (grad_w, qx.T, g64, 0.0)):
        want, magnitude = a @ b, np.abs(a) @ np.abs(b)
        bound = a.shape[1] * 2.0**-24 * magnitude + last_rounding * np.abs(want)
        assert np.all(np.abs(np.asarray(got, np.float64) - want) <= bound + 1e-30)


def test_bitlinear_backward_writes_no_transpose():
    """The backward products contract the residuals as they lie (`lax.dot_general` dimension
    numbers): a transpose written in front of a dot makes XLA:CPU run a bfloat16 product in
    float32 (quant._bitlinear_bwd; benchmarks/dot_layouts.py)."""
    x = jnp.ones((6, 64), jnp.bfloat16)
    w = jnp.ones((64, 32), jnp.float32)
    loss = lambda x, w: jnp.sum(quant.bitlinear_matmul(x, w, "tensor", "token", 8))
    grad = jax.value_and_grad(loss, argnums=(0, 1))
    text = jax.jit(grad).lower(x, w).as_text()
    dots = re.findall(r"stablehlo\.dot_general .*", text)
    assert len(dots) == 3  # the forward product and the two backward ones
    assert all("xbf16>" in dot.split(" -> ")[0] for dot in dots)  # every operand in bf16
    assert "stablehlo.transpose" not in text


def test_quantizer_eps_matches_the_kernels():
    """The C++ quantizer (xla_ffi/quantize.h) clamps the absmax with the same epsilon as quant.EPS,
    so that an all-zero row gets the same scale in the kernels and in the pure-JAX reference."""
    header = (Path(__file__).resolve().parent.parent / "xla_ffi" / "quantize.h").read_text()
    (eps,) = re.findall(r"constexpr float kQuantEps = ([0-9.eE+-]+)f;", header)
    assert np.float32(eps) == np.float32(quant.EPS)
