"""The layers every BitNet block is built from: RMSNorm and the fake-quant BitLinear; the untied
output head; and the float32-accumulating product they share.

Axis letters (the model's glossary is in `transformer.py`): M rows of a flattened matmul (tokens),
I input features, O output features, D hidden features, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from bitnet_jax.model.config import BitNetConfig
from bitnet_jax.model.hadamard import rotate_input
from bitnet_jax.model.quant import bitlinear_matmul, fake_quant_act, fake_quant_weight, has_exact_matmul, matmul_grads


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """The quantizer settings a BitLinear needs (a slice of BitNetConfig)."""

    weight: str = "tensor"
    act: str = "token"
    act_bits: int = 8
    input_norm_eps: float | None = None  # an RMSNorm before activation quantization, if set

    @classmethod
    def of(cls, config: BitNetConfig) -> "QuantSpec":
        return cls(config.weight_quant, config.act_quant, config.act_bits, config.linear_norm_eps)

    @property
    def group_size(self) -> int:
        """G of 'group:G' (a weight scale per output and run of G inputs), else 0."""
        kind, _, size = self.weight.partition(":")
        return int(size) if kind == "group" else 0


class RMSNorm(nn.Module):
    eps: float

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return weight * x32.astype(x.dtype)


class BitLinear(nn.Module):
    """`y = Q_act(x) @ Q_weight(W)`, quantize-dequantize in the forward pass, STE backward.

    With `hadamard` set (a `BitNetConfig.hadamard` setting; o_proj and down_proj get it), BitNet
    v2's H-BitLinear: `y = Q_act(x H) @ Q_weight(W)`, the input rotated (`model/hadamard.py`;
    `x D H`, random signs first, with `hadamard_seed`)
    after the input norm and before the activation quantizer. The kernel is not rotated: it is
    trained in the rotated basis from the start, as in the paper, and its ternary codes are
    those of that basis (what `pack` stores, and what serving multiplies the rotated input by).
    """

    features: int
    quant: QuantSpec
    init_std: float = 0.02
    kernel_axes: tuple[str, str] | None = None  # logical (in, out) axis names, for sharding
    hadamard: int = 0  # 0: no rotation
    hadamard_seed: int | None = None  # BitNetConfig.hadamard_seed; None: no sign flips

    @nn.compact
    def __call__(self, x_bi):
        if self.quant.input_norm_eps is not None:
            x_bi = RMSNorm(self.quant.input_norm_eps, name="rms_norm")(x_bi)
        x_bi = rotate_input(x_bi, self.hadamard, self.hadamard_seed)
        kernel_io = self.param(
            "kernel",
            logical(nn.initializers.normal(self.init_std), self.kernel_axes),
            (x_bi.shape[-1], self.features),
            jnp.float32,
        )
        # Flattened to one 2-D matmul, so the weight gradient is a plain [I, M] @ [M, O] dot;
        # accumulated in f32 whatever the parameter dtype.
        x_mi = x_bi.reshape(-1, x_bi.shape[-1])
        q = self.quant
        if has_exact_matmul(q.weight, q.act):
            # Integer codes times integer codes, rescaled: what the serving kernels compute.
            y_mo = bitlinear_matmul(x_mi, kernel_io, q.weight, q.act, q.act_bits)
        else:
            # Group scales (or no quantization on one side): quantize-dequantize, then a float
            # matmul. Quantized from the kernel's own dtype (f32 master weights keep f32
            # statistics), then cast to the activations' dtype so that bf16 compute runs a bf16 matmul.
            w_io = fake_quant_weight(kernel_io, q.weight).astype(x_bi.dtype)
            x_mi = fake_quant_act(x_bi, q.act, q.act_bits).reshape(x_mi.shape)
            y_mo = dot_f32(x_mi, w_io, 0)
        return y_mo.astype(x_bi.dtype).reshape(*x_bi.shape[:-1], self.features)


def logical(init, axes):
    """`init` annotated with logical axis names (boxed params; `init_params` unboxes them)."""
    return init if axes is None else nn.with_logical_partitioning(init, axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dot_f32(x_mi: jax.Array, w: jax.Array, w_in_axis: int) -> jax.Array:
    """x [..., I] times w, [I, O] (`w_in_axis=0`) or [O, I] (`w_in_axis=1`): [..., O] in float32.

    The float products of training: BitLinear without an exact integer product (per-group scales,
    or the full-precision baseline), the untied lm_head, and the tied head against the embedding
    [V, D]. Under `compute_dtype=bfloat16` the operands are bf16 and the sums and result float32,
    where `jnp.dot(x, w, preferred_element_type=jnp.float32)` had a float32 gradient flow back
    through float32 products and `Embed.attend` / `nn.Dense` returned logits rounded to bf16 (2^-8
    relative: some 0.04 on a logit of 10) before the float32 loss. The backward pass takes the
    gradient in the operands' dtype and computes BitLinear's products (`quant.matmul_grads`); every
    product, forward and backward, contracts the operands as they lie, with no transpose written
    in front of it, which XLA:CPU needs to run a bfloat16 dot natively rather than in float32.
    """
    return _dot_f32_fwd(x_mi, w, w_in_axis)[0]


def _dot_f32_fwd(x_mi, w, w_in_axis):
    y = jax.lax.dot_general(x_mi, w, (((x_mi.ndim - 1,), (w_in_axis,)), ((), ())), preferred_element_type=jnp.float32)
    return y, (x_mi, w)


def _dot_f32_bwd(w_in_axis, residuals, g_mo):
    x_mi, w = residuals
    dx, dw = matmul_grads(g_mo.astype(x_mi.dtype), x_mi, w, w_in_axis)
    return dx.astype(x_mi.dtype), dw.astype(w.dtype)


dot_f32.defvjp(_dot_f32_fwd, _dot_f32_bwd)


class LMHead(nn.Module):
    """An untied output projection: `kernel` [D, V] (the parameter `nn.Dense(V, use_bias=False)`
    has, so checkpoints do not change), float32 logits by `dot_f32`."""

    vocab_size: int
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x_bd):
        init = logical(nn.initializers.normal(self.init_std), ("embed", "vocab"))
        kernel_dv = self.param("kernel", init, (x_bd.shape[-1], self.vocab_size), jnp.float32)
        dtype = jnp.result_type(x_bd, kernel_dv)
        return dot_f32(x_bd.astype(dtype), kernel_dv.astype(dtype), 0)
