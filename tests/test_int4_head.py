"""The 4-bit lm_head (`lm_head='int4'` / `'int4-tied'`): the I4G layout, its kernel against
references written here, the XLA path, and models packed with it.

The kernel's result is a float sum of scaled integer group sums, so "exact" has two parts:
  * every kernel path adds the same terms in the one order of xla_ffi/gemm.h, which
    `_dot_in_kernel_order` writes out in numpy (float32 steps, no fused multiply-add): equal bit
    for bit, on any CPU;
  * with power-of-two scales small enough that no float step rounds, the result is the exact
    integer product.
The XLA path sums per-group products in XLA's own order; it is checked against the kernel with a
bound derived from float32 rounding (`_order_bound`).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from float_lanes import lane_sums, sum_in_lane_order

from bitnet_jax import generate
from bitnet_jax.errors import BitNetError
from bitnet_jax.kernels import ffi, layout, ops
from bitnet_jax.kernels.ops import ServingSpec
from bitnet_jax.model.config import BitNetConfig
from bitnet_jax.model.quant import act_quantize
from bitnet_jax.model.serving_layers import Int4Embed, float_rows, lm_head_kind, serving_variables
from bitnet_jax.model.transformer import BitNetLM, init_params
from bitnet_jax.serve.pack import pack, unpack

F32_EPS = 2.0**-24  # float32 unit roundoff
SMALL = dict(vocab_size=300, hidden_size=96, intermediate_size=200, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)  # fmt: skip

# (M, K, N): K not a multiple of the 32-input group, one group, many groups; N odd; M up to a batch.
SHAPES = [(1, 1, 1), (1, 32, 3), (2, 33, 5), (3, 100, 7), (8, 640, 13), (17, 777, 9), (1, 2560, 4)]


def _codes(rng, n, k):
    return rng.integers(-7, 8, size=(n, k)).astype(np.int8)


def _finite_halves(rng, shape):
    """Random float16 bit patterns: normal, subnormal and negative scales (no inf / NaN)."""
    bits = rng.integers(0, 0x10000, size=shape).astype(np.uint16)
    bits[(bits & 0x7C00) == 0x7C00] &= 0xBFFF  # exponent 31 -> 15: a finite number
    return bits.view(np.float16)


def _lane_sums(x_q, q):
    """p [M, N, groups, 8]: gemm.h's lane sums over groups of 32, K padded with zeros to whole groups."""
    kp = -(-x_q.shape[1] // 32) * 32
    pad = lambda a: np.pad(np.asarray(a), [(0, 0), (0, kp - a.shape[1])])
    return lane_sums(pad(x_q), pad(q), 32)


def _dot_in_kernel_order(x_q, q, scale):
    """xla_ffi/gemm.h's Int4GemmF32, in numpy float32 steps (scale [N, groups])."""
    return sum_in_lane_order(_lane_sums(x_q, q), scale)


def _order_bound(x_q, q, scale, x_scale):
    """How far two float32 sums of the same scaled group sums, in different orders, may be apart:
    the kernel's lane products are exact (|p| < 2^12 times an 11-bit float16 significand) and its
    sums of C groups and then 8 lanes round at most C + 3 times per term; XLA's per-group products
    round once and any order of C terms rounds at most C - 1 times. Each rounding is at most u of
    the running sum, itself at most T = sum_k |q x_q| |scale| (the terms' magnitudes); then both
    multiply by 1 / x_scale (one more rounding each)."""
    groups = scale.shape[1]
    p = _lane_sums(np.abs(x_q), np.abs(q)).sum(-1)  # [M, N, groups]: sum_k |q x_q| per group
    t = (p * np.abs(np.asarray(scale, np.float64))[None]).sum(-1)
    return (2 * groups + 8) * F32_EPS * t / np.asarray(x_scale, np.float64).reshape(-1, 1)


def test_layout_mirror_and_nibble_positions():
    assert ffi._ffi_ext.layout()["int4_group_k"] == layout.INT4_GROUP_K == 32
    rng = np.random.default_rng(0)
    q = _codes(rng, 3, 70)
    packed = layout.pack_int4(q)
    assert packed.shape == (3, 48) and packed.dtype == np.uint8
    # The rule of layout.h, one weight at a time: group g is bytes 16g..16g+15; byte i holds weight
    # 32g + i in its low nibble, 32g + 16 + i in its high one, each as q + 8; padding is q = 0.
    for row, col in [(0, 0), (1, 15), (1, 16), (2, 31), (0, 32), (2, 69)]:
        g, i = col // 32, col % 32
        byte = int(packed[row, 16 * g + i % 16])
        assert ((byte >> (4 * (i // 16))) & 15) - 8 == q[row, col]
    assert packed[0, 16 * 2 + 6] >> 4 == 8 and packed[0, 47] == 0x88  # weights 70.. are padding
    np.testing.assert_array_equal(np.asarray(layout.unpack_int4(packed, 70)), q)
    with pytest.raises(BitNetError, match=r"in \[-7, 7\]"):
        layout.pack_int4(np.full((1, 4), -8, np.int8))


def test_quantize_int4_groups_error_bound():
    """Each group's scale is absmax / 7 rounded to float16, and codes are rounded against that
    stored scale: |w - q s| <= s / 2, or, where the float16 scale rounded down and the code
    clipped at 7, at most 7 s times float16's relative rounding (2^-11)."""
    rng = np.random.default_rng(1)
    w = rng.normal(size=(9, 100)).astype(np.float32) * rng.uniform(0.01, 3, size=(9, 1)).astype(np.float32)
    w[3, :40] = 0  # an all-zero group: scale 0, codes 0
    q, scale = layout.quantize_int4_groups(w)
    assert q.dtype == np.int8 and scale.dtype == np.float16 and scale.shape == (9, 4)
    assert q.min() >= -7 and q.max() <= 7 and scale[3, 0] == 0 and not q[3, :32].any()
    s = np.repeat(scale.astype(np.float32), 32, axis=1)[:, :100]
    assert np.all(np.abs(w - q * s) <= s / 2 + 7 * s * 2.0**-11 + 1e-12)
    with pytest.raises(BitNetError, match="float16"):
        layout.quantize_int4_groups(np.full((1, 32), 1e6, np.float32))


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_dot_follows_the_kernel_order_bit_for_bit(isa, m, k, n):
    rng = np.random.default_rng(m * 1000 + k + n)
    q, x_q = _codes(rng, n, k), rng.integers(-128, 128, size=(m, k)).astype(np.int8)
    x_q[0, 0], q[0, 0] = -128, -7
    scale = _finite_halves(rng, (n, -(-k // 32)))
    got = np.asarray(jax.jit(ffi.int4_matmul_dot)(x_q, layout.pack_int4(q), scale))
    np.testing.assert_array_equal(got.view(np.int32), _dot_in_kernel_order(x_q, q, scale).view(np.int32))


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_dot_is_the_exact_product_when_no_float_step_rounds(isa, m, k, n):
    """Scales 1/4, 1/2 or 1: every partial sum is a multiple of 1/4 of magnitude at most
    K * 128 * 7 < 2^21.2 (K <= 2560), so it has at most 23.2 significant bits: float32 holds it
    exactly, and the kernel's result must be the integer product, whatever its order."""
    rng = np.random.default_rng(m + k + n)
    q, x_q = _codes(rng, n, k), rng.integers(-128, 128, size=(m, k)).astype(np.int8)
    scale = rng.choice(np.array([0.25, 0.5, 1.0], np.float16), size=(n, -(-k // 32)))
    s_k = np.repeat(scale.astype(np.float64), 32, axis=1)[:, :k]
    want = x_q.astype(np.float64) @ (q * s_k).T
    got = np.asarray(ffi.int4_matmul_dot(x_q, layout.pack_int4(q), scale))
    np.testing.assert_array_equal(got, want)


def test_fused_matmul_and_the_xla_path(isa):
    """The fused op is the dot of the quantized activations, times 1 / x_scale, bit for bit; the
    XLA path (backend='xla') agrees within `_order_bound`; both approximate the float product."""
    rng = np.random.default_rng(11)
    w = rng.normal(size=(37, 130)).astype(np.float32)
    q, scale = layout.quantize_int4_groups(w)
    packed = layout.pack_int4(q)
    x = rng.normal(size=(3, 130)).astype(np.float32)
    got = np.asarray(ffi.int4_matmul(x, packed, scale))
    x_q, x_scale = (np.asarray(a) for a in act_quantize(x, "token", 8))
    want = _dot_in_kernel_order(x_q, q, scale) * (np.float32(1) / x_scale)
    np.testing.assert_array_equal(got, want)
    got16 = np.asarray(ffi.int4_matmul(jnp.asarray(x, jnp.bfloat16), packed, scale))  # bf16 in: a float32 row
    x16_q, x16_scale = (np.asarray(a) for a in act_quantize(jnp.asarray(x, jnp.bfloat16), "token", 8))
    np.testing.assert_array_equal(got16, _dot_in_kernel_order(x16_q, q, scale) * (np.float32(1) / x16_scale))

    by_xla = np.asarray(jax.jit(lambda x: ops.int4_linear(x, packed, scale, 8, "xla"))(x))
    assert np.all(np.abs(by_xla - got) <= _order_bound(x_q, q, scale, x_scale))
    # ... and the float product, within what the two roundings allow: a weight moves by at most half
    # its group's scale (plus float16's rounding of the scale, `test_quantize_int4_groups_error_bound`),
    # an activation by half a step of 1 / x_scale.
    s_k = np.repeat(scale.astype(np.float64), 32, axis=1)[:, :130]
    bound = np.abs(x) @ (s_k / 2 + 7 * s_k * 2.0**-11).T + (0.5 / x_scale) * (np.abs(q) * s_k).sum(1)
    assert np.all(np.abs(got - x @ w.T) <= bound * (1 + 1e-5))


def test_bad_inputs_raise_instead_of_crashing():
    x = np.ones((2, 100), np.float32)
    codes, scale = np.zeros((4, 64), np.uint8), np.ones((4, 4), np.float16)
    with pytest.raises(Exception, match=r"int4 weights for K=100 inputs must be uint8 \[N, 64\]"):
        ffi.int4_matmul(x, codes[:, :50], scale).block_until_ready()
    with pytest.raises(Exception, match=r"expected w_scale of shape \[4, 4\]"):
        ffi.int4_matmul(x, codes, scale[:, :3]).block_until_ready()
    with pytest.raises(Exception, match="Buffer|dtype|F16|type"):
        ffi.int4_matmul(x, codes, scale.astype(np.float32)).block_until_ready()
    with pytest.raises(BitNetError, match="int8 activations"):
        ffi.int4_matmul_dot(x, codes, scale)


def _params(config, seed=0):
    """Random parameters whose embedding rows have varied norms (0.02 to 0.1 RMS), as trained ones
    do, so that logits have margins and the int4 groups varied scales."""
    params = jax.tree.map(np.asarray, init_params(config, seed))
    rng = np.random.default_rng(seed)
    emb = params["embed_tokens"]["embedding"]
    scale_v1 = rng.uniform(0.02, 0.1, (emb.shape[0], 1)) / emb.std()
    params["embed_tokens"]["embedding"] = (emb * scale_v1).astype(np.float32)
    return params


def _head_inputs_and_logits(config, packed, lm_head, ids, backend):
    """(the final hidden states the head reads, the logits) of one forward on `backend`."""
    seen = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, Int4Embed) and context.method_name == "attend":
            seen.append(args[0])
        return next_fun(*args, **kwargs)

    model = BitNetLM(config, ServingSpec(backend, lm_head))
    with nn.intercept_methods(record):
        logits = model.apply(jax.tree.map(jnp.asarray, serving_variables(packed)), ids)
    return np.asarray(seen[0]), np.asarray(logits)


@pytest.mark.parametrize("lm_head", ["int4", "int4-tied"])
def test_packed_model_with_an_int4_head(lm_head, tmp_path):
    """Packing, the layout of the tree, the FFI model's logits: its head in the kernel's order bit
    for bit, the XLA backend's head within `_order_bound` (each on its own final hidden states),
    the packed folder round trip (same greedy tokens), and unpack."""
    from bitnet_jax.serve.packed_folder import load_packed, save_packed

    config = BitNetConfig(**SMALL)
    params = _params(config)
    packed = pack(config, params, lm_head=lm_head)
    assert lm_head_kind(packed) == lm_head
    table = packed["embed_tokens" if lm_head == "int4-tied" else "lm_head"]
    assert table["w_int4"].shape == (300, 48) and table["w_scale"].shape == (300, 3)
    assert table["w_scale"].dtype == np.float16
    if lm_head == "int4":
        assert packed["embed_tokens"]["embedding"].dtype == np.float32
    else:
        assert "lm_head" not in packed
        # The tied embedding reads the table's dequantized rows.
        ids = jnp.asarray([[3, 299, 0]], jnp.int32)
        rows = Int4Embed(300, 96, ServingSpec("xla", lm_head)).apply({"params": table}, ids)
        np.testing.assert_array_equal(np.asarray(rows)[0], float_rows(table, 96)[[3, 299, 0]])

    ids = jnp.asarray(np.random.default_rng(2).integers(0, 300, (2, 11)), jnp.int32)
    x_ffi, logits_ffi = _head_inputs_and_logits(config, packed, lm_head, ids, "ffi")
    x_xla, logits_xla = _head_inputs_and_logits(config, packed, lm_head, ids, "xla")
    q = np.asarray(layout.unpack_int4(table["w_int4"], 96))
    for x, logits, exact in ((x_ffi, logits_ffi, True), (x_xla, logits_xla, False)):
        x_q, x_scale = (np.asarray(a) for a in act_quantize(x.reshape(-1, 96), "token", 8))
        want = _dot_in_kernel_order(x_q, q, table["w_scale"]) * (np.float32(1) / x_scale)
        if exact:
            np.testing.assert_array_equal(logits.reshape(-1, 300), want)
        else:
            assert np.all(np.abs(logits.reshape(-1, 300) - want) <= _order_bound(x_q, q, table["w_scale"], x_scale))

    prompts = [[1, 5, 9, 33], [1, 7]]
    ffi_ids = generate(config, packed, prompts, 12)
    save_packed(str(tmp_path / "m"), config, packed)
    config2, packed2 = load_packed(str(tmp_path / "m"))
    jax.tree.map(np.testing.assert_array_equal, packed2, packed)
    np.testing.assert_array_equal(generate(config2, packed2, prompts, 12), ffi_ids)
    unpacked = unpack(config, packed)  # the table comes back as its dequantized rows
    np.testing.assert_array_equal(unpacked["embed_tokens"]["embedding"], float_rows(packed["embed_tokens"], 96))


def test_int4_tied_needs_tied_embeddings():
    config = BitNetConfig(**{**SMALL, "tie_word_embeddings": False})
    with pytest.raises(BitNetError, match="lm_head='int4-tied' needs tied embeddings.*use lm_head='int4'"):
        pack(config, _params(config), lm_head="int4-tied")
    with pytest.raises(BitNetError, match="expected one of"):
        pack(config, _params(config), lm_head="int3")
