"""The XLA FFI int8 activation quantizer against a 3-line pure-JAX reference, bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax.errors import BitNetError
from bitnet_jax.kernels.ffi import act_quant_i8


def reference(x):
    scale = 127 / jnp.maximum(jnp.max(jnp.abs(x), -1, keepdims=True), 1e-5)
    q = jnp.clip(jnp.round(x * scale), -128, 127).astype(jnp.int8)
    return q, scale


def assert_matches_reference(x, got=None):
    x = jnp.asarray(x, jnp.float32)
    q, scale = act_quant_i8(x) if got is None else got
    q_ref, scale_ref = reference(x)
    assert q.dtype == jnp.int8 and q.shape == x.shape
    assert scale.dtype == jnp.float32 and scale.shape == x.shape[:-1] + (1,)
    np.testing.assert_array_equal(np.asarray(scale), np.asarray(scale_ref))
    np.testing.assert_array_equal(np.asarray(q), np.asarray(q_ref))


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 129), (2, 3, 1000), (17, 2561), (9,)])
def test_random_odd_shapes(shape):
    rng = np.random.default_rng(sum(shape))
    # Rows with very different magnitudes, so the scales differ by orders of magnitude.
    mag = 10.0 ** rng.uniform(-4, 4, size=shape[:-1] + (1,))
    assert_matches_reference(rng.standard_normal(shape) * mag)


def test_exact_half_ties_round_to_even():
    # Row max 127 -> scale exactly 1.0; max 254 -> 0.5; max 63.5 -> 2.0: x * scale lands on k + 0.5.
    x = np.array(
        [
            [127.0, 2.5, -3.5, 0.5, -0.5, 1.5, -1.5, 126.5, -126.5, 0.0],
            [254.0, 5.0, -7.0, 1.0, -1.0, 3.0, -3.0, 253.0, -253.0, 0.0],
            [-63.5, 1.25, -1.75, 0.25, -0.25, 0.75, -0.75, 63.25, -63.25, 0.0],
        ],
        np.float32,
    )
    q, scale = act_quant_i8(x)
    np.testing.assert_array_equal(np.asarray(scale)[:, 0], [1.0, 0.5, 2.0])
    np.testing.assert_array_equal(
        np.asarray(q),
        np.array([[127, 2, -4, 0, 0, 2, -2, 126, -126, 0]] * 2 + [[-127, 2, -4, 0, 0, 2, -2, 126, -126, 0]], np.int8),
    )
    assert_matches_reference(x)


def test_many_ties_random():
    # Half-integers in [-127, 127] with a 127 in every row: every odd entry is a tie.
    rng = np.random.default_rng(0)
    x = rng.integers(-254, 255, size=(31, 257)).astype(np.float32) / 2
    x[:, 5] = 127.0
    assert_matches_reference(x)


def test_zero_tiny_huge_and_negative_max_rows():
    x = np.zeros((6, 11), np.float32)
    # Row 0 all zero: scale = 127 / 1e-5.
    x[1] = np.linspace(-3e-6, 7e-6, 11)  # below the 1e-5 floor
    x[2, ::2] = 1e-40  # subnormals
    x[3] = np.linspace(-3e38, 2e38, 11)  # near float32 max
    x[4] = [-50.0, 1.0, 2.0, -3.0, 49.9, 0.1, -0.1, 25.0, -25.0, 12.5, 0.0]  # max |x| is negative
    x[5] = np.geomspace(1e-30, 1e30, 11) * np.tile([1, -1], 6)[:11]
    q, scale = act_quant_i8(x)
    assert float(scale[0, 0]) == np.float32(127) / np.float32(1e-5)
    assert int(q[4, 0]) == -127
    assert_matches_reference(x)


def test_bfloat16_quantizes_like_its_float32_value():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((7, 300)) * 3, jnp.bfloat16)
    q, scale = act_quant_i8(x)
    assert_matches_reference(x.astype(jnp.float32), (q, scale))


def test_under_jit():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 6, 129)).astype(np.float32)
    assert_matches_reference(x, jax.jit(act_quant_i8)(x))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_under_vmap(axis):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 5, 65)).astype(np.float32) * 4
    q, scale = jax.jit(jax.vmap(act_quant_i8, in_axes=axis, out_axes=axis))(x)
    if axis == 2:
        # Mapping over the last axis makes the quantized rows run along axis 1.
        x_rows = np.moveaxis(x, 2, 1)
        q_ref, scale_ref = reference(jnp.asarray(x_rows))
        np.testing.assert_array_equal(np.asarray(q), np.moveaxis(np.asarray(q_ref), 1, 2))
        np.testing.assert_array_equal(np.asarray(scale), np.moveaxis(np.asarray(scale_ref), 1, 2))
    else:
        assert_matches_reference(x, (q, scale))


def test_nested_vmap_matches_reference():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 4, 33)).astype(np.float32)
    got = jax.vmap(jax.vmap(act_quant_i8, in_axes=1, out_axes=1))(x)
    assert_matches_reference(x, got)


def test_rejects_int_and_scalar_input():
    with pytest.raises(BitNetError, match="floating"):
        act_quant_i8(jnp.arange(12, dtype=jnp.int32).reshape(3, 4))
    with pytest.raises(BitNetError, match="rank"):
        act_quant_i8(jnp.float32(1.0))
    with pytest.raises(BitNetError, match="last axis"):
        act_quant_i8(jnp.zeros((3, 0), jnp.float32))


def test_kernel_reports_bad_output_shape_as_an_error():
    # Bypass the Python checks: the handler itself must return an error, not crash.
    bad = jax.ffi.ffi_call(
        "bitnet_act_quant_i8", (jax.ShapeDtypeStruct((3, 4), jnp.int8), jax.ShapeDtypeStruct((3, 4), jnp.float32))
    )
    with pytest.raises(Exception, match="scale must have shape"):
        jax.block_until_ready(bad(jnp.ones((3, 4), jnp.float32)))
