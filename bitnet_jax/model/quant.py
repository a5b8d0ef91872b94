"""Fake quantization for quantization-aware training: BitNet b1.58's quantizers and their STE.

Each quantizer returns integer codes as floats plus the scale that maps them back, so that the
same function serves the training forward (dequantize at once) and, later, packing for serving.

Weights (absmean, b1.58 eq. 1-3): `scale = mean|W|` over a granule (the tensor, an output
channel, or a group of G inputs of one output channel), `W_t = clamp(round(W / scale), -1, 1)`,
dequantized as `W_t * scale`.

Activations (absmax): `scale = Qp / max|x|` over a granule (a token or the whole tensor),
`x_q = clamp(round(x * scale), -Qp - 1, Qp)` with `Qp = 2**(bits-1) - 1`, dequantized as
`x_q / scale`. Rounding is half-to-even, as in `torch.round`.

A BitLinear with per-tensor or per-channel weight scales multiplies the integer codes exactly
(`bitlinear_matmul`: float32 sums of integers below 2^24 are exact in any order) and rescales
once, in the serving kernels' order (`rescale`): the training forward and the packed serving
forward compute the same float numbers, bit for bit.

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
# finite scales. xla_ffi/quantize.h's kQuantEps is the kernels' copy (tests/test_ffi_matmul.py
# checks that they agree).
EPS = 1e-5


def weight_quantize(w_kn: jax.Array, mode: str) -> tuple[jax.Array, jax.Array]:
    """Ternary absmean quantization of a [K, N] (in, out) kernel.

    Returns `(w_t, scale)`: `w_t` has w's shape and values in {-1, 0, 1}; `scale` broadcasts
    against `w_kn` ([1, 1] for 'tensor', [1, N] for 'channel') except for 'group:G', where it is
    [K/G, 1, N] and broadcasts against `w_kn.reshape(K/G, G, N)`.
    """
    ratio_kn, scale = weight_ratio(w_kn, mode)
    return jnp.clip(jnp.round(ratio_kn), -1, 1), scale


def weight_ratio(w_kn: jax.Array, mode: str) -> tuple[jax.Array, jax.Array]:
    """`(W / scale, scale)`: what `weight_quantize` rounds, [K, N], before rounding.

    Apart from quantizing, this tells how close each weight sits to a rounding boundary (|r| =
    0.5), i.e. which codes float noise in the scale could flip.
    """
    w = w_kn.astype(jnp.float32)
    if mode == "tensor":
        scale = jnp.maximum(jnp.mean(jnp.abs(w)), EPS).reshape(1, 1)
        return w / scale, scale
    if mode == "channel":
        scale = jnp.maximum(jnp.mean(jnp.abs(w), axis=0, keepdims=True), EPS)
        return w / scale, scale
    if mode.startswith("group:"):
        group = int(mode.split(":")[1])
        k, n = w.shape
        w_cgn = w.reshape(k // group, group, n)
        scale = jnp.maximum(jnp.mean(jnp.abs(w_cgn), axis=1, keepdims=True), EPS)
        return (w_cgn / scale).reshape(k, n), scale
    raise ValueError(f"weight_quantize: unknown mode {mode!r}")


def weight_dequantize(w_t: jax.Array, scale: jax.Array) -> jax.Array:
    if scale.ndim == 3:  # per group
        k, n = w_t.shape
        return (w_t.reshape(scale.shape[0], -1, n) * scale).reshape(k, n)
    return w_t * scale


def ternary_master_weights(t, scale, mode: str = "tensor"):
    """Master weights for ternary codes and their scales, such that `weight_quantize(w, mode)`
    gives back the same codes and scales: in each granule, `w = t * scale / p` with p the fraction
    of non-zero codes, so mean|w| = scale and round(w / scale) = t (|t| / p >= 1 rounds to +-1).
    How weights stored quantized (Hugging Face offline checkpoints, packed folders, GGUF files)
    become trainable again, and how `hf_export` writes packed models as master weights.

    t: codes in {-1, 0, 1}: any shape for 'tensor' (scale: one number), [K, N] for 'channel'
    (scale [N]) and 'group:G' (scale [K / G, N]). numpy in, float32 numpy out; a float32 `t` is
    scaled in place and returned (a 2B4T layer read from disk is not copied). float32 is enough:
    every weight of a granule is 0 or +-(one float32 number)."""
    import numpy as np

    w = np.asarray(t, np.float32)
    scale = np.asarray(scale, np.float64)
    if mode == "tensor":
        nonzero = max(np.count_nonzero(w) / max(w.size, 1), 1.0 / max(w.size, 1))
        w *= np.float32(float(scale.reshape(-1)[0]) / nonzero)
        return w
    k, n = w.shape
    group = k if mode == "channel" else int(mode.partition(":")[2])
    w_cgn = w.reshape(k // group, group, n)  # a view: scaling it scales w
    nonzero_c1n = np.maximum(np.count_nonzero(w_cgn, axis=1, keepdims=True) / group, 1.0 / group)
    w_cgn *= (scale.reshape(-1, 1, n) / nonzero_c1n).astype(np.float32)
    return w


def act_quantize(x: jax.Array, mode: str, bits: int) -> tuple[jax.Array, jax.Array]:
    """Absmax quantization of activations [..., K] per token ('token') or per tensor ('tensor').

    Returns `(x_q, scale)` with x_q integer-valued float32 and `x ~= x_q / scale`.
    """
    q_max = 2 ** (bits - 1) - 1
    ratio, scale = act_ratio(x, mode, bits)
    return jnp.clip(jnp.round(ratio), -q_max - 1, q_max), scale


def absmax_quantize(x: jax.Array, amax: jax.Array, bits: int) -> tuple[jax.Array, jax.Array]:
    """`act_quantize` given the absolute maximum (broadcastable to x), e.g. one reduced over devices."""
    q_max = 2 ** (bits - 1) - 1
    ratio, scale = absmax_ratio(x, amax, bits)
    return jnp.clip(jnp.round(ratio), -q_max - 1, q_max), scale


def act_ratio(x: jax.Array, mode: str, bits: int) -> tuple[jax.Array, jax.Array]:
    """`(x * scale, scale)`: what `act_quantize` rounds, before rounding (see `weight_ratio`)."""
    x = x.astype(jnp.float32)
    if mode == "token":
        amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    elif mode == "tensor":
        amax = jnp.max(jnp.abs(x)).reshape((1,) * x.ndim)
    else:
        raise ValueError(f"act_quantize: unknown mode {mode!r}")
    return absmax_ratio(x, amax, bits)


def absmax_ratio(x: jax.Array, amax: jax.Array, bits: int) -> tuple[jax.Array, jax.Array]:
    scale = (2 ** (bits - 1) - 1) / jnp.maximum(amax, EPS)
    return x.astype(jnp.float32) * scale, scale


def rescale(acc_mn: jax.Array, x_scale_m1: jax.Array, w_scale: jax.Array) -> jax.Array:
    """`acc / x_scale * w_scale` in float32: the float steps after an exact integer product, in
    the serving kernels' order. The barrier keeps XLA from folding 1 / (q_max / amax) into
    another expression, which rounds differently (by an ulp)."""
    y = (acc_mn.astype(jnp.float32) * (1 / jax.lax.optimization_barrier(x_scale_m1))) * w_scale
    return jax.lax.optimization_barrier(y)


def has_exact_matmul(weight_mode: str, act_mode: str) -> bool:
    """Whether `bitlinear_matmul` takes these modes: one scale per token (or tensor) of the
    activations and per tensor (or output channel) of the weights, so that the scales factor
    out of the sum over K."""
    return weight_mode in ("tensor", "channel") and act_mode in ("token", "tensor")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def bitlinear_matmul(x_mk: jax.Array, w_kn: jax.Array, weight_mode: str, act_mode: str, act_bits: int) -> jax.Array:
    """`Q_act(x) @ Q_weight(W)` [M, N] in float32, computed as integers times integers, rescaled.

    The backward pass is the straight-through estimator of the quantize-dequantize form:
    dx = g @ Q_weight(W)^T, dW = Q_act(x)^T @ g.
    """
    return _bitlinear_fwd(x_mk, w_kn, weight_mode, act_mode, act_bits)[0]


def _bitlinear_fwd(x_mk, w_kn, weight_mode, act_mode, act_bits):
    x_q, x_scale = act_quantize(x_mk, act_mode, act_bits)
    w_t, w_scale = weight_quantize(w_kn, weight_mode)
    # Codes are exact in bf16 as well (|x_q| <= 128); float32 accumulation keeps the sum exact.
    acc = jnp.dot(x_q.astype(x_mk.dtype), w_t.astype(x_mk.dtype), preferred_element_type=jnp.float32)
    # The backward pass needs the dequantized operands, and the kernel's dtype (in a 0-d array:
    # residuals must be arrays).
    residuals = ((x_q / x_scale).astype(x_mk.dtype), (w_t * w_scale).astype(x_mk.dtype), jnp.zeros((), w_kn.dtype))
    return rescale(acc, x_scale, w_scale), residuals


def matmul_grads(g_mo: jax.Array, x_mi: jax.Array, w: jax.Array, w_in_axis: int = 0) -> tuple[jax.Array, jax.Array]:
    """The float32 gradients (dx [..., I], dw) of y = x [..., I] times w, [I, O] (`w_in_axis=0`) or
    [O, I] (`w_in_axis=1`), from g = dL/dy [..., O] (in the operands' dtype): the backward products
    of BitLinear and of `layers.dot_f32`.

    Each contracts the operands as they lie, with no transpose written out: XLA:CPU runs a
    bfloat16 dot natively (YNNPACK) only where it sees no transpose in front of it, and upcasts
    the rest to float32 first. g @ W^T written as `jnp.dot(g, w.T)` ran in float32 under
    `compute_dtype=bfloat16`; as a contraction of the two as they lie it runs in bfloat16, about
    twice as fast at the tiny preset's shapes (benchmarks/dot_layouts.py; benchmarks/RESULTS.md,
    "bfloat16 dots with a transposed operand"). dw, which contracts the tokens, runs in float32
    either way.
    """
    dx = jax.lax.dot_general(
        g_mo, w, (((g_mo.ndim - 1,), (1 - w_in_axis,)), ((), ())), preferred_element_type=jnp.float32
    )
    # w's gradient sums over every row: [M, I] and [M, O] contracted over M.
    x_2d, g_2d = x_mi.reshape(-1, x_mi.shape[-1]), g_mo.reshape(-1, g_mo.shape[-1])
    over_m = (((0,), (0,)), ((), ()))
    if w_in_axis == 0:
        dw = jax.lax.dot_general(x_2d, g_2d, over_m, preferred_element_type=jnp.float32)
    else:
        dw = jax.lax.dot_general(g_2d, x_2d, over_m, preferred_element_type=jnp.float32)
    return dx, dw


def _bitlinear_bwd(weight_mode, act_mode, act_bits, residuals, g_mn):
    x_mk, w_kn, w_dtype = residuals
    dx, dw = matmul_grads(g_mn.astype(x_mk.dtype), x_mk, w_kn)
    return dx.astype(x_mk.dtype), dw.astype(w_dtype.dtype)


bitlinear_matmul.defvjp(_bitlinear_fwd, _bitlinear_bwd)


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
