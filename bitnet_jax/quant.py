"""Fake quantization for quantization-aware training: BitNet b1.58's quantizers and their STE.

Each quantizer returns integer codes as floats plus the scale that maps them back, so that the
same function serves the training forward (dequantize at once) and, later, packing for serving.

Weights (absmean, b1.58 eq. 1-3): `scale = mean|W|` over a granule (the tensor, an output
channel, or a group of G inputs of one output channel), `W_t = clamp(round(W / scale), -1, 1)`,
dequantized as `W_t * scale`.

Activations (absmax): `scale = Qp / max|x|` over a granule (a token or the whole tensor),
`x_q = clamp(round(x * scale), -Qp - 1, Qp)` with `Qp = 2**(bits-1) - 1`, dequantized as
`x_q / scale`. Rounding is half-to-even, as in `torch.round`.

The straight-through estimator treats quantize-dequantize as the identity in the backward pass
(the gradient of `x + stop_gradient(q(x) - x)`), but the forward value is exactly `q(x)`: the
difference matters for parity with `transformers`, where float error in `x + (q - x)` would
shift values off the quantization grid.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Clamp the absmean / absmax statistics like transformers does, so that all-zero inputs give
# finite scales.
EPS = 1e-5


def weight_quantize(w_kn: jax.Array, mode: str) -> tuple[jax.Array, jax.Array]:
    """Ternary absmean quantization of a [K, N] (in, out) kernel.

    Returns `(w_t, scale)`: `w_t` has w's shape and values in {-1, 0, 1}; `scale` broadcasts
    against `w_kn` ([1, 1] for 'tensor', [1, N] for 'channel') except for 'group:G', where it is
    [K/G, 1, N] and broadcasts against `w_kn.reshape(K/G, G, N)`.
    """
    w = w_kn.astype(jnp.float32)
    if mode == "tensor":
        scale = jnp.maximum(jnp.mean(jnp.abs(w)), EPS).reshape(1, 1)
        return jnp.clip(jnp.round(w / scale), -1, 1), scale
    if mode == "channel":
        scale = jnp.maximum(jnp.mean(jnp.abs(w), axis=0, keepdims=True), EPS)
        return jnp.clip(jnp.round(w / scale), -1, 1), scale
    if mode.startswith("group:"):
        group = int(mode.split(":")[1])
        k, n = w.shape
        w_cgn = w.reshape(k // group, group, n)
        scale = jnp.maximum(jnp.mean(jnp.abs(w_cgn), axis=1, keepdims=True), EPS)
        return jnp.clip(jnp.round(w_cgn / scale), -1, 1).reshape(k, n), scale
    raise ValueError(f"weight_quantize: unknown mode {mode!r}")


def weight_dequantize(w_t: jax.Array, scale: jax.Array) -> jax.Array:
    if scale.ndim == 3:  # per group
        k, n = w_t.shape
        return (w_t.reshape(scale.shape[0], -1, n) * scale).reshape(k, n)
    return w_t * scale


def act_quantize(x: jax.Array, mode: str, bits: int) -> tuple[jax.Array, jax.Array]:
    """Absmax quantization of activations [..., K] per token ('token') or per tensor ('tensor').

    Returns `(x_q, scale)` with x_q integer-valued float32 and `x ~= x_q / scale`.
    """
    x = x.astype(jnp.float32)
    if mode == "token":
        amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    elif mode == "tensor":
        amax = jnp.max(jnp.abs(x)).reshape((1,) * x.ndim)
    else:
        raise ValueError(f"act_quantize: unknown mode {mode!r}")
    return absmax_quantize(x, amax, bits)


def absmax_quantize(x: jax.Array, amax: jax.Array, bits: int) -> tuple[jax.Array, jax.Array]:
    """`act_quantize` given the absolute maximum (broadcastable to x), e.g. one reduced over devices."""
    q_max = 2 ** (bits - 1) - 1
    scale = q_max / jnp.maximum(amax, EPS)
    return jnp.clip(jnp.round(x.astype(jnp.float32) * scale), -q_max - 1, q_max), scale


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def fake_quant_weight(w_kn: jax.Array, mode: str) -> jax.Array:
    """Quantize-dequantize a kernel; the gradient passes straight through."""
    if mode == "none":
        return w_kn
    return weight_dequantize(*weight_quantize(w_kn, mode)).astype(w_kn.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def fake_quant_act(x: jax.Array, mode: str, bits: int) -> jax.Array:
    """Quantize-dequantize activations; the gradient passes straight through."""
    if mode == "none":
        return x
    x_q, scale = act_quantize(x, mode, bits)
    return (x_q / scale).astype(x.dtype)


def _weight_fwd(w, mode):
    return fake_quant_weight.fun(w, mode), None


def _act_fwd(x, mode, bits):
    return fake_quant_act.fun(x, mode, bits), None


fake_quant_weight.defvjp(_weight_fwd, lambda mode, _, g: (g,))
fake_quant_act.defvjp(_act_fwd, lambda mode, bits, _, g: (g,))
