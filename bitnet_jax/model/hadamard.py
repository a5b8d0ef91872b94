"""BitNet v2's online Hadamard transform (H-BitLinear, arXiv 2504.18415), as a block-diagonal
Walsh-Hadamard rotation of a linear layer's input.

The inputs of o_proj and down_proj (the outputs of attention and of the gated FFN, after their
sub-norms) have a few outlier channels: an absmax quantizer then spends its range on them, and at
4 bits most other values round to zero. Rotating the input by an orthonormal Hadamard matrix H
spreads every channel over a whole block, which makes the per-token distribution close to
Gaussian, so that few levels cover it. BitNet v2 places the rotation right before the activation
quantizer, `Y = Q_w(W') Q_a(H x)`, and does not rotate weights anywhere: the parameter W' *is*
the weight in the rotated basis, trained from scratch there and quantized there by the usual
absmean ternary quantizer. In exact arithmetic without quantization, `(x H) W' = x W` for
`W' = H^T W`: the rotation changes the basis the quantizers see, not what the layer can express
(`rotate_kernel` maps a weight into that basis, e.g. to compare with an unrotated model).

`H = diag(H_b, ..., H_b) / sqrt(b)` over blocks of b inputs (b a power of two): one n-wide
transform needs n to be a power of two, which widths such as 2B4T's 6912 = 27 * 256 are not;
blocks of the largest power of two that divides the width cover any even width. H_b is
Sylvester's Hadamard matrix, `H_2m = [[H_m, H_m], [H_m, -H_m]]`, the Kronecker power of
`[[1, 1], [1, -1]]`: `hadamard_transform` applies that 2 x 2 butterfly along each of the log2(b)
axes of a block reshaped to [2, 2, ..., 2], O(b log b) adds per block instead of a b x b matmul.
H is symmetric and orthonormal, so it is its own inverse and its own transpose: the backward
pass (JAX's transpose of these adds) is the same transform of the gradient, as in the paper.

`hadamard_seed` makes it the randomized Hadamard transform of QuaRot and SpinQuant: `x -> x D H`
(H (D x) for a column vector), D a fixed diagonal of +-1 signs. H alone maps an input that lines
up with one of its rows (a Walsh function) onto a single channel, an outlier again; the signs make
any fixed input unlikely to line up with the rows of D H. R = D H is still orthonormal but no
longer symmetric: its inverse is `R^T = H D` (the backward pass applies H, then the signs; JAX
transposes the sign multiply as it does the adds) and `rotate_kernel` holds W as `R^T W`. The
signs are a function of (seed, input width) alone (`hadamard_signs`, a SHA-256 stream), so the
config reproduces them anywhere: no array is stored, in run folders or packed folders.

Serving applies the same function to the activation before the kernels' quantizer
(`serving_layers.TernaryLinear`), and packing quantizes W' as training does: the packed model
computes what the fake-quant model computes.
"""

from __future__ import annotations

import functools
import hashlib

import jax
import jax.numpy as jnp
import numpy as np

from bitnet_jax.model.config import hadamard_block


@functools.cache
def hadamard_signs(seed: int, width: int) -> np.ndarray:
    """D's diagonal for inputs `width` wide: float32 [width] of +-1, input i negated where bit i of
    the stream is 1. The stream is SHA-256 of `f"bitnet-jax hadamard signs seed={seed}
    width={width} chunk={c}"` for c = 0, 1, ..., digests concatenated, bits least significant
    first within each byte: fixed by this text, not by a library's random generator, so any
    version (or another implementation) derives the same signs. Read-only (it is cached)."""
    chunks = -(-width // 256)  # 256 bits per digest
    stream = b"".join(
        hashlib.sha256(f"bitnet-jax hadamard signs seed={seed} width={width} chunk={c}".encode()).digest()
        for c in range(chunks)
    )
    bits = np.unpackbits(np.frombuffer(stream, np.uint8), bitorder="little")[:width]
    signs = (1.0 - 2.0 * bits).astype(np.float32)
    signs.flags.writeable = False
    return signs


def hadamard_transform(x: jax.Array, block: int, signs: np.ndarray | None = None) -> jax.Array:
    """`x @ D @ H` for x [..., K]: the orthonormal block-diagonal Walsh-Hadamard rotation with
    blocks of `block` inputs (a power of two dividing K), after multiplying input k by `signs[k]`
    (+-1, [K]; None: D = I, not even a multiply). Computed in float32 (log2(block) rounds of adds
    would lose bits in bf16), returned in x's dtype."""
    k = x.shape[-1]
    if block < 1 or block & (block - 1) or k % block:
        raise ValueError(f"hadamard_transform: block={block} must be a power of two dividing the width {k}")
    x32 = x.astype(jnp.float32)
    if signs is not None:
        if np.shape(signs) != (k,):
            raise ValueError(f"hadamard_transform: signs of shape {np.shape(signs)}, expected ({k},)")
        x32 = x32 * jnp.asarray(signs, jnp.float32)  # exact: a sign flip
    stages = block.bit_length() - 1
    # [..., K / block, 2, ..., 2]: index bits of a position inside its block, one axis each.
    y = x32.reshape(*x.shape[:-1], k // block, *(2,) * stages)
    for axis in range(-stages, 0):  # H_2 = [[1, 1], [1, -1]] along each bit's axis
        a, b = jnp.take(y, 0, axis=axis), jnp.take(y, 1, axis=axis)
        y = jnp.stack([a + b, a - b], axis=axis)
    return (y.reshape(x.shape) * (block**-0.5)).astype(x.dtype)


def rotate_input(x_bi: jax.Array, setting: int, seed: int | None = None) -> jax.Array:
    """`x R`, the input of an H-BitLinear, for `BitNetConfig.hadamard` and `hadamard_seed`
    settings (hadamard 0: x unchanged, whatever the seed; seed None: R = H, no signs)."""
    block = hadamard_block(setting, x_bi.shape[-1])
    if not block:
        return x_bi
    signs = None if seed is None else hadamard_signs(seed, x_bi.shape[-1])
    return hadamard_transform(x_bi, block, signs)


def rotate_kernel(kernel_io: jax.Array, setting: int, seed: int | None = None) -> jax.Array:
    """`R^T W` for a kernel [I, O] whose input `rotate_input` rotates with these settings, so that
    `rotate_input(x) @ rotate_kernel(W) == x @ W` (to float rounding): the same full-precision layer
    in the rotated basis. (`R^T W = (W^T R)^T`: the rotation applied to the rows of W^T.)"""
    return jnp.swapaxes(rotate_input(jnp.swapaxes(kernel_io, -1, -2), setting, seed), -1, -2)
