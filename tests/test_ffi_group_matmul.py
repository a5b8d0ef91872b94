"""The ternary kernel with a weight scale per group of G inputs (`weight_quant='group:G'`, G a
multiple of 64): references written here, the XLA path, and group:G models served through it.

The kernel's result is a float sum of scaled integer group sums, so "exact" has two parts, as for
the int4 lm_head (tests/test_int4_head.py):
  * every kernel path (the GEMV tiles, the AVX-512 prefill panels) adds the same terms in the one
    order of xla_ffi/gemm.h (TernaryGroupGemmF32: group after group), which `_dot_in_kernel_order`
    writes out in numpy float32 steps: equal bit for bit, on any CPU;
  * with power-of-two scales small enough that no float step rounds, the result is the exact
    integer product.
The XLA path sums per-group products in XLA's own order; it is checked against the kernel with a
bound derived from float32 rounding (`_order_bound`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from near_ties import assert_packed_matches_fake_quant

from bitnet_jax.errors import BitNetError
from bitnet_jax.kernels import ffi, layout, ops
from bitnet_jax.model.config import BitNetConfig
from bitnet_jax.model.quant import act_quantize
from bitnet_jax.model.transformer import init_params
from bitnet_jax.serve.pack import pack

F32_EPS = 2.0**-24  # float32 unit roundoff

# (M, K, N, G): one group and many, K of one 64-input strip up to 4096; N within one 16-output
# tile, across tiles and ending inside one (1, 5, 7, 9 and 13 outputs of the last: AVX2's 8-output
# halves, NEON's quarters); 1 to 5 activation rows (AVX2's 3-row tiles and their remainders,
# AVX-512's smaller tiles), 6 and more (AVX-512's 6-row tiles and remainders); a group of 4096
# inputs, past the AVX2 kernel's int16 strips.
SHAPES = [
    (1, 64, 1, 64),
    (1, 320, 5, 64),
    (2, 320, 7, 320),
    (3, 768, 9, 128),
    (5, 1024, 6, 256),
    (1, 2560, 13, 64),
    (17, 640, 11, 128),
    (2, 4096, 4, 4096),
    (33, 1280, 70, 64),
    (4, 192, 16, 64),
    (11, 512, 41, 64),
]


def _ternary(rng, n, k):
    return rng.integers(-1, 2, size=(n, k)).astype(np.int8)


def _group_sums(x_q, t, group: int):
    """p [M, N, K / group]: the exact int64 group sums of x_q [M, K] times t [N, K]."""
    prod = np.asarray(x_q, np.int64)[:, None, :] * np.asarray(t, np.int64)[None]  # [M, N, K]
    return prod.reshape(prod.shape[0], prod.shape[1], -1, group).sum(-1)


def _dot_in_kernel_order(x_q, t, scale_cn):
    """xla_ffi/gemm.h's TernaryGroupGemmF32 in numpy float32 steps: d = 0, then for each group c in
    order d = d + float(p[c]) * scale[c] (product and sum each rounded). |p| <= 4096 * 128 < 2^24:
    its conversion to float32 is exact."""
    p = _group_sums(x_q, t, x_q.shape[1] // scale_cn.shape[0])
    scale = np.asarray(scale_cn, np.float32)
    d = np.zeros(p.shape[:2], np.float32)
    for c in range(p.shape[2]):
        d = d + p[:, :, c].astype(np.float32) * scale[c][None]
    return d


def _order_bound(x_q, t, scale_cn, x_scale):
    """How far two float32 sums of the same scaled group sums, in different orders, may be apart.
    Each of the C terms rounds once when scaled, and any order of C terms rounds at most C - 1
    times (the kernel's and XLA's alike). Each rounding is at most u of the running sum, itself at
    most T = sum_k |t x_q| |scale| (the terms' magnitudes); then both multiply by 1 / x_scale (one
    more rounding each, at most u of the result, which is at most T / x_scale). 2C + 10 units of
    T covers both sides with room."""
    group = x_q.shape[1] // scale_cn.shape[0]
    p = _group_sums(np.abs(x_q), np.abs(t), group)  # [M, N, C]: sum_k |t x_q| per group
    magnitude = (p * np.abs(np.asarray(scale_cn, np.float64)).T[None]).sum(-1)
    return (2 * scale_cn.shape[0] + 10) * F32_EPS * magnitude / np.asarray(x_scale, np.float64).reshape(-1, 1)


def _case(m, k, n, group, seed):
    rng = np.random.default_rng(seed)
    t, x_q = _ternary(rng, n, k), rng.integers(-128, 128, size=(m, k)).astype(np.int8)
    x_q[0, 0] = -128
    scale = rng.normal(scale=0.05, size=(k // group, n)).astype(np.float32)
    return t, x_q, scale


@pytest.mark.parametrize("m,k,n,group", SHAPES)
def test_dot_follows_the_kernel_order_bit_for_bit(isa, m, k, n, group):
    t, x_q, scale = _case(m, k, n, group, seed=m * 1000 + k + n)
    dot = jax.jit(ffi.ternary_group_matmul_dot, static_argnums=3)
    got = np.asarray(dot(x_q, layout.pack_ternary_tiles(t), layout.tile_group_scales(scale), n))
    np.testing.assert_array_equal(got.view(np.int32), _dot_in_kernel_order(x_q, t, scale).view(np.int32))


@pytest.mark.parametrize("m,k,n,group", SHAPES)
def test_dot_is_the_exact_product_when_no_float_step_rounds(isa, m, k, n, group):
    """Scales 1/8 .. 1: every partial sum is a multiple of 1/8 of magnitude at most
    K * 128 < 2^19 (K <= 4096), so it has at most 22 significant bits: float32 holds it exactly,
    and the kernel's result must be the integer product, whatever its order."""
    rng = np.random.default_rng(m + k + n + group)
    t, x_q = _ternary(rng, n, k), rng.integers(-128, 128, size=(m, k)).astype(np.int8)
    scale = rng.choice(np.array([0.125, 0.25, 0.5, 1.0], np.float32), size=(k // group, n))
    want = x_q.astype(np.float64) @ (t * np.repeat(scale.astype(np.float64), group, axis=0).T).T
    got = np.asarray(
        ffi.ternary_group_matmul_dot(x_q, layout.pack_ternary_tiles(t), layout.tile_group_scales(scale), n)
    )
    np.testing.assert_array_equal(got, want)


def test_fused_matmul_stacked_layers_and_the_xla_path(isa):
    """The fused op is the kernel's dot times 1 / x_scale (act_quantize's), bit for bit, also for
    bfloat16 activations, which widen exactly; a stacked layer is read in place; the XLA path
    (backend='xla') agrees within `_order_bound`."""
    rng = np.random.default_rng(3)
    m, k, n, group = 3, 640, 9, 128
    t = np.stack([_ternary(rng, n, k) for _ in range(2)])
    scale = rng.uniform(0.01, 0.1, size=(2, k // group, n)).astype(np.float32)
    packed = np.stack([layout.pack_ternary_tiles(t[i]) for i in range(2)])
    scale_tiles = np.stack([layout.tile_group_scales(scale[i]) for i in range(2)])
    x = rng.normal(size=(m, k)).astype(np.float32) * 3
    for xx in (x, jnp.asarray(x, jnp.bfloat16)):
        x_q, x_scale = act_quantize(xx, "token", 8)
        x_q = np.asarray(x_q, np.int8)
        want = _dot_in_kernel_order(x_q, t[1], scale[1]) * (1 / np.asarray(x_scale, np.float32))
        got = jax.jit(lambda xx, i: ffi.ternary_group_matmul(xx, packed, scale_tiles, n, layer=i))(xx, 1)
        np.testing.assert_array_equal(np.asarray(got), want)
        xla = ops.ternary_linear(xx, packed, scale_tiles, n, 8, "xla", layer=1)
        diff = np.abs(np.asarray(xla, np.float64) - np.asarray(got, np.float64))
        assert np.all(diff <= _order_bound(x_q, t[1], scale[1], x_scale)), diff.max()


def test_bad_operands_are_refused(isa):
    rng = np.random.default_rng(4)
    t, x_q, scale = _case(2, 320, 5, 64, seed=4)
    packed, tiles = layout.pack_ternary_tiles(t), layout.tile_group_scales(scale)
    g32 = layout.tile_group_scales(rng.normal(size=(10, 5)))  # G = 32
    with pytest.raises(
        Exception,
        match=r"expected w_scale float32 \[1, \(K / G\) \* 16\].*for K=320 inputs in groups of G, G a multiple of 64, "
        r"got \[1, 160\]",
    ):
        ffi.ternary_group_matmul_dot(x_q, packed, g32, 5)
    # Scales as the training side holds them, [K / G, N], are refused, with the function that tiles them.
    with pytest.raises(Exception, match=r"w_scale float32 \[1, \(K / G\) \* 16\].*tile_group_scales.*got \[5, 5\]"):
        ffi.ternary_group_matmul_dot(x_q, packed, scale, 5)
    with pytest.raises(Exception, match="layer 2 is outside the 2 layers"):
        ffi.ternary_group_matmul_dot(x_q, np.stack([packed] * 2), np.stack([tiles] * 2), 5, layer=2)
    # Codes packed for a per-tensor model (TQ2B) are refused, with the packer to use.
    with pytest.raises(Exception, match=r"must be uint8 \[1, 1280\].*got \[2, 512\].*pack_ternary_tiles"):
        ffi.ternary_group_matmul_dot(x_q, layout.pack_ternary(t), tiles, 5)
    # A ServingSpec built by hand for groups the kernel does not take is refused, not misread.
    with pytest.raises(BitNetError, match=r"per group of 32 inputs \(weight_quant='group:32'\)"):
        ops.ternary_linear(jnp.ones((1, 320)), packed, g32, 5, 8, "ffi")


SMALL = dict(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)  # fmt: skip


@pytest.mark.parametrize("group", [64, 128])
def test_group_models_serve_through_the_kernel(group):
    """A group:G model packs, its default backend on CPU is the FFI kernel, and its packed forward
    on either backend matches the fake-quant training forward, float order apart (near-ties
    handled by tests/near_ties.py's stated rule)."""
    config = BitNetConfig(**{**SMALL, "weight_quant": f"group:{group}"})
    params = init_params(config, seed=group)
    packed = pack(config, params, lm_head="float")
    assert packed["layers"]["mlp"]["down_proj"]["w_scale"].shape == (2, 128 // 16, 256 // group * 16)  # tiled
    assert ops.serving_backend("cpu", group_size=config.weight_group_size) == "ffi"
    ids = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 21)), jnp.int32)
    assert_packed_matches_fake_quant(config, params, packed, ids, backends=("ffi", "xla"))
