"""The Pallas ternary matmul (bitnet_jax/kernels/pallas.py), its 'pallas' serving backend, and its
lowering for NVIDIA GPUs.

No GPU here: the kernel body runs in Pallas interpret mode (the same body, as XLA ops on CPU), and
its Triton lowering for CUDA is checked by lowering it, which needs no GPU. Integer results must
match exactly (the sums are int32 sums of int8 x ternary products, exact in any order), so the
reference is a plain int64 product in numpy and the serving backend must give the XLA integer
path's bits. What a GPU run measured is in benchmarks/RESULTS.md.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax import BitNetConfig, generate, init_params
from bitnet_jax.errors import BitNetError
from bitnet_jax.kernels import layout, ops, pallas
from bitnet_jax.serve.generate import serving_params
from bitnet_jax.serve.pack import pack

# Widths whose row groups (N / 4) a power of two in [16, 64] divides, so that every projection
# takes the tensor-core kernel in prefill (and the GEMV one in decode): q/o 128 (32 groups), k/v
# 64 (16), gate/up 320 (80 = 16 x 5), K = 320 for down_proj (two 256-wide blocks, the second
# padded).
PALLAS_SIZED = dict(
    vocab_size=256,
    hidden_size=128,
    intermediate_size=320,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
)


def _case(rng, m, k, n):
    t_nk = rng.integers(-1, 2, (n, k)).astype(np.int8)
    x_mk = rng.integers(-128, 128, (m, k)).astype(np.int8)
    return x_mk, t_nk, x_mk.astype(np.int64) @ t_nk.T.astype(np.int64)


@pytest.mark.parametrize(
    "m, k, n",
    [
        (1, 256, 64),  # GEMV: one block, 16 row groups, all in one program
        (1, 300, 20),  # GEMV: K padded to two blocks (one program each), 5 row groups, 1 per program
        (3, 512, 640),  # products: 16-row tile; 160 groups, 16 per program; 2 blocks in one program
        (5, 1280, 64),  # products: 5 blocks, one per program (5 partial sums added)
        (17, 768, 640),  # products: 64-row tile, 32 groups per program; 3 blocks in one program
        (130, 520, 512),  # products: three row tiles, the last mostly padding; 64 groups per program
    ],
)
def test_kernel_is_exact(m, k, n):
    rng = np.random.default_rng(m * 1000 + n)
    x_mk, t_nk, want = _case(rng, m, k, n)
    got = pallas.ternary_matmul_i32(jnp.asarray(x_mk), jnp.asarray(layout.pack_ternary(t_nk)), n, interpret=True)
    assert got.dtype == jnp.int32 and got.shape == (m, n)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_kernel_extremes_are_exact():
    # The largest sums an int8 x ternary product can reach: -128 * -1 over every input, and the
    # most negative, so a lost sign or a code off by one shows at full size.
    k, n = 768, 64
    t_nk = np.where(np.arange(n)[:, None] % 2 == 0, -1, 1) * np.ones((n, k), np.int8)
    x_mk = np.stack([np.full(k, -128), np.full(k, 127), np.zeros(k)]).astype(np.int8)
    w = jnp.asarray(layout.pack_ternary(t_nk))
    for rows in (x_mk[:1], x_mk):  # the GEMV kernel and the tensor-core one
        got = pallas.ternary_matmul_i32(jnp.asarray(rows), w, n, interpret=True)
        np.testing.assert_array_equal(np.asarray(got), rows.astype(np.int64) @ t_nk.T.astype(np.int64))


@pytest.mark.parametrize("m", [1, 12])  # the GEMV kernel and the tensor-core one
def test_stacked_weights_are_read_at_the_layer_index(m):
    rng = np.random.default_rng(7)
    layers, k, n = 3, 512, 64
    t_lnk = rng.integers(-1, 2, (layers, n, k)).astype(np.int8)
    w_lgx = jnp.asarray(np.stack([layout.pack_ternary(t) for t in t_lnk]))
    x_mk = rng.integers(-128, 128, (m, k)).astype(np.int8)
    call = jax.jit(lambda x, w, i: pallas.ternary_matmul_i32(x, w, n, i, interpret=True))
    for i in range(layers):  # a traced index, as a scan over the layers passes it
        np.testing.assert_array_equal(np.asarray(call(x_mk, w_lgx, i)), x_mk.astype(np.int64) @ t_lnk[i].T)


def test_bad_operands_are_refused():
    x = jnp.zeros((2, 256), jnp.int8)
    w = jnp.asarray(layout.pack_ternary(np.zeros((64, 256), np.int8)))
    with pytest.raises(BitNetError, match="int8 activations"):
        pallas.ternary_matmul_i32(x.astype(jnp.float32), w, 64, interpret=True)
    with pytest.raises(BitNetError, match=r"do not hold \[N, K\] = \[128, 256\]"):
        pallas.ternary_matmul_i32(x, w, 128, interpret=True)
    with pytest.raises(BitNetError, match="layer index"):
        pallas.ternary_matmul_i32(x, w, 64, 0, interpret=True)
    # 20 outputs are 5 row groups: the GEMV kernel takes them one group per program, but no
    # tensor-core tile of 16 to 64 groups divides them.
    w20 = jnp.asarray(layout.pack_ternary(np.zeros((20, 256), np.int8)))
    assert pallas.takes(20, 1) and not pallas.takes(20, 2) and pallas.takes(64, 2)
    # Serving leaves prefill (more than 16 rows) to the XLA path, though the kernel takes it.
    assert pallas.takes(64, 16) and not pallas.takes(64, 17)
    with pytest.raises(BitNetError, match="5 row groups.*more than one row.*XLA integer path"):
        pallas.ternary_matmul_i32(x, w20, 20, interpret=True)


# N = 64 is taken by both kernels; N = 20 by the GEMV kernel only, so 2 x 5 rows take the XLA
# path's product instead, and one row the GEMV; 3 x 7 rows (prefill) take the XLA path.
@pytest.mark.parametrize("n, lead", [(64, (2, 5)), (64, (1, 1)), (64, (3, 7)), (20, (2, 5)), (20, (1, 1))])
def test_pallas_backend_gives_the_xla_integer_paths_bits(n, lead):
    rng = np.random.default_rng(n)
    k = 300
    t_nk = rng.integers(-1, 2, (n, k)).astype(np.int8)
    w = jnp.asarray(np.stack([layout.pack_ternary(t_nk)] * 2))  # stacked, two layers
    scale = jnp.asarray([[0.031], [0.02]], jnp.float32)
    x = jnp.asarray(rng.standard_normal((*lead, k)), jnp.float32)
    want = ops.ternary_linear(x, w, scale, n, 8, "xla", 1)
    got = jax.jit(lambda x: ops.ternary_linear(x, w, scale, n, 8, "pallas", 1))(x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_generate_on_the_pallas_backend_equals_the_xla_integer_path():
    config = BitNetConfig(**PALLAS_SIZED)
    assert all(pallas.takes(n, 16) for block in config.linear_shapes.values() for _, n in block.values())
    packed = pack(config, init_params(config, 3), lm_head="int8")
    prompts = [[1, 5, 9, 33, 7], [1, 7]]
    # Every logit is the same float on both backends (the same integer products, the same float
    # steps around them), so greedy picks the same tokens, ties included: no margin is needed.
    want = generate(config, packed, prompts, 6, backend="xla")
    np.testing.assert_array_equal(generate(config, packed, prompts, 6, backend="pallas"), want)
    # Training parameters are packed first (float head), as for 'ffi', and then served on 'pallas'.
    params = init_params(config, 3)
    _, spec = serving_params(config, params, "pallas")
    assert (spec.backend, spec.lm_head) == ("pallas", "float")
    np.testing.assert_array_equal(
        generate(config, params, prompts, 6, backend="pallas"),
        generate(config, pack(config, params, lm_head="float"), prompts, 6, backend="xla"),
    )


def test_the_pallas_backend_is_asked_for_and_refused_where_it_cannot_run():
    assert ops.serving_backend("gpu") == "xla"  # the default on GPUs stays the XLA integer path
    assert ops.serving_backend("gpu", "pallas") == ops.serving_backend("cpu", "pallas") == "pallas"
    with pytest.raises(BitNetError, match="backend='pallas'.*NVIDIA GPUs.*'tpu'"):
        ops.serving_backend("tpu", "pallas")


def test_the_pallas_backend_refuses_cpu_parameters_beside_a_gpu_default(monkeypatch):
    # The kernel is interpreted when the default backend is CPU, compiled for the GPU otherwise:
    # CPU parameters on a GPU machine would get a kernel their devices cannot run.
    assert ops.pallas_interprets()
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not ops.pallas_interprets()
    with pytest.raises(BitNetError, match="parameters on CPU devices while the default backend is 'gpu'"):
        ops.serving_backend("cpu", "pallas")
    assert ops.serving_backend("gpu", "pallas") == "pallas"


@pytest.mark.parametrize(
    "m, n, k", [(1, 2560, 2560), (1, 640, 2560), (8, 6912, 2560), (128, 6912, 2560), (128, 2560, 6912)]
)
def test_kernel_lowers_for_nvidia_gpus(m, n, k):
    """The 2B4T shapes, decode and prefill, stacked weights: lowering for CUDA runs the Pallas
    Triton rules (every load and store a power-of-two size, int8 products, 8-bit arithmetic only
    as bitwise ops) without a GPU; what is left for one is Triton's own compile."""
    g, row_bytes = layout.packed_ternary_shape(n, k)
    call = jax.jit(lambda x, w, i: pallas.ternary_matmul_i32(x, w, n, i))
    lowered = call.trace(
        jax.ShapeDtypeStruct((m, k), jnp.int8),
        jax.ShapeDtypeStruct((30, g, row_bytes), jnp.uint8),
        jax.ShapeDtypeStruct((), jnp.int32),
    ).lower(lowering_platforms=("cuda",))
    assert "bitnet_ternary_matmul" in lowered.as_text()
