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


def test_quantizer_eps_matches_the_kernels():
    """The C++ quantizer (xla_ffi/quantize.h) clamps the absmax with the same epsilon as quant.EPS,
    so that an all-zero row gets the same scale in the kernels and in the pure-JAX reference."""
    header = (Path(__file__).resolve().parent.parent / "xla_ffi" / "quantize.h").read_text()
    (eps,) = re.findall(r"constexpr float kQuantEps = ([0-9.eE+-]+)f;", header)
    assert np.float32(eps) == np.float32(quant.EPS)
