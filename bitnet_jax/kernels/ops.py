"""Integer serving math: the pure-JAX ("xla") twins of the FFI kernels, and the serving switch.

Serving parameters come from `bitnet_jax.serve.pack` (the one convert step). Their linear layers hold
2-bit ternary codes and scales (`layout.py`); a serving forward quantizes activations per row,
multiplies in exact integers and rescales:

    y[m, n] = (sum_k x_q[m, k] * t[n, k]) * (1 / x_scale[m]) * w_scale[n or 0]

The FFI backend does this in one custom call (`ffi.ternary_matmul`); the functions here do it
with XLA ops, giving the same bits (integer sums are exact either way), for checking the kernels
and for machines or shardings the kernels do not cover. The 'pallas' backend runs the ternary
matmuls as a Pallas kernel for GPUs (`kernels/pallas.py`, the same bits again) and everything else
as 'xla' does. `serving_backend` is the one rule that picks between them: 'ffi' on CPU, 'xla' on
GPU and TPU (the custom calls exist for CPU only); 'pallas' when asked for.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from bitnet_jax.errors import BitNetError
from bitnet_jax.kernels import layout, pallas
from bitnet_jax.model.quant import absmax_quantize, act_quantize, rescale

if TYPE_CHECKING:
    from bitnet_jax.model.config import BitNetConfig
    from bitnet_jax.model.transformer import KVCache

BACKENDS = ("ffi", "xla", "pallas")
LM_HEADS = ("int8", "int8-tied", "int4", "int4-tied", "float")
KV_CACHES = ("float32", "int8")  # the serving KV cache's dtype (int8: with a scale per slot and kv head)


def head_table(lm_head: str) -> tuple[str | None, bool]:
    """(the quantized table's kind, 'int8' / 'int4' / None for a float head; whether the input
    embedding reads the same table) of an lm_head kind of LM_HEADS."""
    kind = lm_head.removesuffix("-tied")
    return (None if kind == "float" else kind), lm_head.endswith("-tied")


def default_lm_head(config: BitNetConfig) -> str:
    """The lm_head a model is packed and served with unless one is asked for: the one rule, for
    `pack`, `load_gguf` and the benchmarks. 'int8-tied' for tied models (one int8 table for both
    ends: 2B4T then serves in 1.17 GB instead of 1.82), else 'int8'. On a trained model the tied
    table costs 0.31% relative logit error against the float head, 0.23% for 'int8' alone
    (README, "lm_head"); 'int4' / 'int4-tied' read 44% fewer head bytes per token for more error,
    so they are asked for, not defaulted to."""
    return "int8-tied" if config.tie_word_embeddings else "int8"


def serving_backend(platform: str, requested: str | None = None, *, group_size: int = 0) -> str:
    """The serving backend for a packed model whose computation runs on `platform` ('cpu', 'gpu',
    'tpu', ... as `jax.Device.platform` names them): the one rule that chooses it.

    The FFI kernels are XLA custom calls registered for CPU only, and take one weight scale per
    tensor, per output row, or per output row and group of `group_size` inputs (weight_quant
    'group:G') when G is a multiple of `layout.TERNARY_GROUP_ALIGN`: unset, the backend is 'ffi'
    on CPU where they take the model's scales and 'xla' (the same integer math in XLA ops)
    elsewhere. An explicit 'ffi' that cannot run is an error here, not an "unknown custom call
    target" from the compiler later. 'pallas' (the ternary matmuls as a Pallas kernel, the rest as
    'xla') runs compiled on NVIDIA GPUs and interpreted (slowly: for tests) on CPU, and is an error
    elsewhere.
    """
    if requested not in (None, *BACKENDS):
        raise BitNetError(f"backend={requested!r}: expected one of {BACKENDS} (or None for the default).")
    if requested == "ffi" and platform != "cpu":
        raise BitNetError(
            f"backend='ffi': the FFI kernels are registered for CPU only, and this computation runs on "
            f"{platform!r} devices. Use backend='xla' (or leave it unset): the same integer math in XLA ops."
        )
    if requested == "pallas" and platform not in ("gpu", "cuda", "cpu"):
        raise BitNetError(
            f"backend='pallas': the Pallas ternary kernel is written for NVIDIA GPUs (Triton), and this "
            f"computation runs on {platform!r} devices. Use backend='xla' (or leave it unset)."
        )
    if requested == "pallas" and platform == "cpu" and not pallas_interprets():
        # CPU devices beside a GPU default backend would get a compiled Triton kernel they cannot run.
        raise BitNetError(
            "backend='pallas' with parameters on CPU devices while the default backend is "
            f"{jax.default_backend()!r}: put them on the GPU (jax.device_put), or use backend='ffi' or 'xla' on CPU."
        )
    if requested == "ffi" and not ffi_takes_groups(group_size):
        _refuse_ffi_group_scales(group_size)
    if requested is not None:
        return requested
    return "ffi" if platform == "cpu" and ffi_takes_groups(group_size) else "xla"


def ffi_takes_groups(group_size: int) -> bool:
    """Whether the FFI kernels take weight scales per group of `group_size` inputs (0: per tensor
    or per channel, which they always take): the group must be whole 64-weight strips of the
    packed layout (xla_ffi/gemm.h, TernaryGroupGemmF32)."""
    return group_size % layout.TERNARY_GROUP_ALIGN == 0


def computation_platform(tree=None) -> str:
    """The platform of the devices a computation on `tree` (e.g. parameters) runs on: that of its
    placed arrays (or sharded abstract leaves), else of the mesh set with `jax.set_mesh`, else
    `jax.default_backend()`."""
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)  # None for numpy and unplaced abstract leaves
        if sharding is not None:
            return next(iter(sharding.device_set)).platform
    mesh = jax.sharding.get_mesh()
    if not mesh.empty:
        return mesh.devices.flat[0].platform
    return jax.default_backend()


def _refuse_ffi_group_scales(group_size: int):
    raise BitNetError(
        f"backend='ffi': the FFI kernels take weight scales per tensor, per output channel, or per group "
        f"of a multiple of {layout.TERNARY_GROUP_ALIGN} inputs, and this model has a scale per group of "
        f"{group_size} inputs (weight_quant='group:{group_size}'). Use backend='xla' (or leave it unset), "
        "which runs the same integer math in XLA ops."
    )


@dataclasses.dataclass(frozen=True)
class ServingSpec:
    """How a packed model runs (a Flax module attribute, so hashable and static under jit).

    backend: 'ffi' (our C++ kernels as XLA custom calls) or 'xla' (the same math in XLA ops);
      unset, `serving_backend` picks it for `platform`.
    lm_head: 'int8' (per-row int8 lm_head; the input embedding keeps its float table),
      'int8-tied' (tied models: one int8 table serves both ends), 'int4' / 'int4-tied' (the same
      with 4-bit codes and a float16 scale per 32 inputs, the smallest) or 'float': the
      kind the parameters were packed with (`serving_layers.lm_head_kind(params)`). Required:
      which kind a model gets is `default_lm_head`'s rule, applied where it is packed.
    act_bits: bits of the per-token activation quantizer.
    platform: where the model runs ('cpu', 'gpu', 'tpu'; default `jax.default_backend()`), so that
      'ffi' is never chosen, nor accepted, where its custom calls do not exist.
    kv_cache: the KV cache's dtype, 'float32' or 'int8' (a quarter of the bytes per slot, read per
      decoded token: each slot's keys and values per kv head quantized by their absmax,
      `model.transformer.quantize_kv`; attention math stays float32).
    """

    backend: str | None = None
    lm_head: str | None = None  # required (a keyword default only so that `backend` may come first)
    act_bits: int = 8
    platform: str | None = None
    kv_cache: str = "float32"

    def __post_init__(self):
        if self.lm_head not in LM_HEADS:
            raise ValueError(
                f"ServingSpec: lm_head={self.lm_head!r}; expected one of {LM_HEADS}, the kind the parameters "
                "were packed with (bitnet_jax.model.serving_layers.lm_head_kind(params))."
            )
        if self.kv_cache not in KV_CACHES:
            raise BitNetError(f"ServingSpec: kv_cache={self.kv_cache!r}; expected one of {KV_CACHES}.")
        # Resolved here, once, so that the layers only ever see 'ffi' or 'xla'.
        object.__setattr__(self, "backend", serving_backend(self.platform or jax.default_backend(), self.backend))


TENSOR_AXIS = "tensor"


def ternary_linear(
    x_mk, w_packed, w_scale, n: int, act_bits: int, backend: str, layer=None, *, split: str = "n"
) -> jax.Array:
    """Serving BitLinear: float32 [..., N] from activations [..., K] and packed ternary weights
    (w_packed [G, X], w_scale [S]; or stacked [L, G, X], [L, S] with `layer` selecting one).

    Under a mesh with a 'tensor' axis (`jax.set_mesh`), the FFI call runs tensor-parallel inside
    a shard_map, instead of a bare custom call, which would make XLA all-gather the weights onto
    every device first: `split='n'` gives each device its own output rows (column-parallel: the
    q/k/v/gate/up projections), `split='k'` its own share of K, with a psum of the exact int32
    partial products (row-parallel: o_proj and down_proj, whose inputs training shards over
    'tensor'). A split that does not divide the weights' blocks falls back to the other one,
    then to a bare call.
    """
    if w_scale.ndim - (w_packed.ndim - 2) == 2:  # [(L,) T, (K / group) * 16]: per group of inputs (TQ2G)
        return _grouped_ternary(x_mk, w_packed, w_scale, n, act_bits, backend, layer)
    if backend == "ffi":
        from bitnet_jax.kernels import ffi

        parts = _tensor_parts()
        k = x_mk.shape[-1]
        k_ok = k % (layout.BLOCK_K * parts) == 0
        n_ok = n % (layout.ROWS_PER_GROUP * parts) == 0
        if parts > 1 and k_ok and (split == "k" or not n_ok):
            return _k_parallel_ternary(x_mk, w_packed, w_scale, n, act_bits, parts, layer)
        if parts > 1 and n_ok:
            return _n_parallel_ternary(x_mk, w_packed, w_scale, n, act_bits, parts, layer)
        return ffi.ternary_matmul(x_mk, w_packed, w_scale, n, act_bits, layer)
    x_q, x_scale = act_quantize(x_mk, "token", act_bits)
    x_q = x_q.astype(jnp.int8)
    if backend == "pallas" and _tensor_parts() == 1 and pallas.takes(n, math.prod(x_mk.shape[:-1])):
        acc = _pallas_product(x_q, w_packed, n, layer)
    else:  # the XLA integer path
        w_gx = w_packed[layer] if w_packed.ndim == 3 else w_packed
        t_nk = layout.unpack_ternary(w_gx, n, x_mk.shape[-1])
        acc = jnp.einsum("...k,nk->...n", x_q, t_nk, preferred_element_type=jnp.int32)
    return rescale(acc, x_scale, w_scale[layer] if w_packed.ndim == 3 else w_scale)


def pallas_interprets() -> bool:
    """Whether the Pallas kernel runs interpreted (the default backend is not a GPU: on CPU, for
    the tests) rather than compiled with Triton: `_pallas_product` runs it so, and
    `serving_backend` refuses the CPU parameters that a compiled kernel could not serve."""
    return jax.default_backend() not in ("gpu", "cuda")


def _pallas_product(x_q, w_packed, n, layer):
    """The exact int32 products [..., N] of int8 codes [..., K] as the Pallas kernel (compiled on
    GPUs, interpreted elsewhere), reading stacked weights at `layer` in place: the XLA path's
    integer sums, so its quantization and rescale around them give the same bits."""
    lead, k = x_q.shape[:-1], x_q.shape[-1]
    acc = pallas.ternary_matmul_i32(x_q.reshape(-1, k), w_packed, n, layer, interpret=pallas_interprets())
    return acc.reshape(*lead, n)


def ternary_linears(x_mk, projections, act_bits: int, backend: str, layer=None, *, split: str = "n") -> tuple:
    """`ternary_linear` of each (w_packed, w_scale, n) of `projections` on the same x, the same
    results. On the FFI backend, with per-tensor or per-row scales and no 'tensor' mesh axis, that
    is one custom call (`ffi.ternary_matmuls`): one quantization of x, and the projections' output
    rows split over the threads together, so that small ones (a decode step's k and v) do not each
    wait for a thread to start; otherwise one `ternary_linear` each."""
    projections = list(projections)
    per_row = all(w_scale.ndim == w_packed.ndim - 1 for w_packed, w_scale, _ in projections)
    if backend == "ffi" and per_row and _tensor_parts() == 1 and len(projections) > 1:
        from bitnet_jax.kernels import ffi

        return ffi.ternary_matmuls(x_mk, projections, act_bits, layer)
    return tuple(
        ternary_linear(x_mk, w_packed, w_scale, n, act_bits, backend, layer, split=split)
        for w_packed, w_scale, n in projections
    )


def _grouped_ternary(x_mk, w_packed, w_scale_tx, n, act_bits, backend, layer):
    """Per-group weight scales (TQ2G tiles and their scales): one exact int32 sum per group of
    K / C inputs, scaled and added in float32. The FFI kernel (`ffi.ternary_group_matmul`) adds the
    same terms in one fixed order of its own, so the two backends agree to float32 rounding, not
    bit for bit. Under a mesh with a 'tensor' axis the XLA ops run, which XLA partitions (the
    kernel has no shard_map split)."""
    k, c = x_mk.shape[-1], w_scale_tx.shape[-1] // layout.TILE_ROWS
    if backend == "ffi":
        if not ffi_takes_groups(k // c):  # a ServingSpec built by hand for such a model
            _refuse_ffi_group_scales(k // c)
        if _tensor_parts() == 1:
            from bitnet_jax.kernels import ffi

            return ffi.ternary_group_matmul(x_mk, w_packed, w_scale_tx, n, act_bits, layer)
    if w_packed.ndim == 3:
        w_packed, w_scale_tx = w_packed[layer], w_scale_tx[layer]
    w_scale_cn = layout.untile_group_scales(w_scale_tx, n)
    x_q, x_scale = act_quantize(x_mk, "token", act_bits)
    t_ncg = layout.unpack_ternary_tiles(w_packed, n, k).reshape(n, c, k // c)
    x_q_cg = x_q.astype(jnp.int8).reshape(*x_mk.shape[:-1], c, k // c)
    acc_cn = jnp.einsum("...cg,ncg->...cn", x_q_cg, t_ncg, preferred_element_type=jnp.int32)
    y = jnp.sum(acc_cn.astype(jnp.float32) * w_scale_cn, axis=-2)
    return y * (1 / jax.lax.optimization_barrier(x_scale))


def _tensor_parts() -> int:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or TENSOR_AXIS not in mesh.axis_names:
        return 1
    return mesh.shape[TENSOR_AXIS]


def _n_parallel_ternary(x_mk, w_packed, w_scale, n, act_bits, parts, layer):
    """Columns split over the 'tensor' axis: whole 4-row groups per device, so every shard is a
    valid packed matrix of n / parts rows. Activations are replicated; each device quantizes
    the same rows identically, so the result equals the single-device call bit for bit."""
    from jax.sharding import PartitionSpec as P

    from bitnet_jax.kernels import ffi

    per_channel = w_scale.shape[-1] != 1
    lead = (None,) * (x_mk.ndim - 1)
    stack = (None,) * (w_packed.ndim - 2)  # the layer axis, if stacked, is not split
    layer = jnp.asarray(0 if layer is None else layer, jnp.int32)
    local = lambda x, w, s, i: ffi.ternary_matmul(x, w, s, n // parts, act_bits, i)
    return jax.shard_map(
        local,
        in_specs=(P(), P(*stack, TENSOR_AXIS), P(*stack, TENSOR_AXIS) if per_channel else P(), P()),
        out_specs=P(*lead, TENSOR_AXIS),
        check_vma=False,
    )(x_mk, w_packed, w_scale, layer)


def _k_parallel_ternary(x_mk, w_packed, w_scale, n, act_bits, parts, layer):
    """K split over the 'tensor' axis in whole 256-wide blocks: a row's blocks are contiguous in
    the packed layout, so each device's slice of the packed bytes is a valid packed matrix of
    K / parts, and it takes the matching slice of the activations. Each token's absmax is the max
    over devices (pmax), so every device quantizes its slice as one device would quantize the
    row; the int32 partial products add up exactly (psum) before the one rescale: the result
    equals the single-device call bit for bit."""
    from jax.sharding import PartitionSpec as P

    from bitnet_jax.kernels import ffi

    lead = (None,) * (x_mk.ndim - 1)
    stack = (None,) * (w_packed.ndim - 2)
    layer = jnp.asarray(0 if layer is None else layer, jnp.int32)

    def local(x, w, s, i):
        x = x.astype(jnp.float32)
        amax = jax.lax.pmax(jnp.max(jnp.abs(x), axis=-1, keepdims=True), TENSOR_AXIS)
        x_q, x_scale = absmax_quantize(x, amax, act_bits)
        acc = jax.lax.psum(ffi.ternary_matmul_i32(x_q.astype(jnp.int8), w, n, i), TENSOR_AXIS)
        return rescale(acc, x_scale, s[i] if s.ndim == 2 else s)

    return jax.shard_map(
        local, in_specs=(P(*lead, TENSOR_AXIS), P(*stack, None, TENSOR_AXIS), P(), P()), out_specs=P(), check_vma=False
    )(x_mk, w_packed, w_scale, layer)


def int8_linear(x_mk, w_int8, w_scale, act_bits: int, backend: str) -> jax.Array:
    """Int8-weight linear (the lm_head): float32 [..., N] from [..., K] and int8 rows [N, Kp]."""
    if backend == "ffi":
        from bitnet_jax.kernels import ffi

        return ffi.int8_matmul(x_mk, w_int8, w_scale, act_bits)
    x_q, x_scale = act_quantize(x_mk, "token", act_bits)
    w_nk = layout.unpack_int8(w_int8, x_mk.shape[-1])
    acc = jnp.einsum("...k,nk->...n", x_q.astype(jnp.int8), w_nk, preferred_element_type=jnp.int32)
    return rescale(acc, x_scale, w_scale)


def int4_linear(x_mk, w_int4, w_scale, act_bits: int, backend: str) -> jax.Array:
    """Int4-weight linear (the 4-bit lm_head): float32 [..., N] from [..., K], codes uint8 [N, Kp / 2]
    and float16 scales [N, Kp / 32]: exact int32 sums per group of 32 inputs, scaled and added in
    float32, times 1 / x_scale. The FFI kernel adds the same terms in one fixed order of its own
    (`ffi.int4_matmul_dot`), so the two backends agree to float32 rounding, not bit for bit."""
    if backend == "ffi":
        from bitnet_jax.kernels import ffi

        return ffi.int4_matmul(x_mk, w_int4, w_scale, act_bits)
    k = x_mk.shape[-1]
    c = w_scale.shape[-1]
    x_q, x_scale = act_quantize(x_mk, "token", act_bits)
    kp = c * layout.INT4_GROUP_K
    x_q = jnp.pad(x_q.astype(jnp.int8), [(0, 0)] * (x_mk.ndim - 1) + [(0, kp - k)])
    q_ncg = layout.unpack_int4(w_int4, kp).reshape(-1, c, layout.INT4_GROUP_K)
    x_q_cg = x_q.reshape(*x_mk.shape[:-1], c, layout.INT4_GROUP_K)
    acc_ncx = jnp.einsum("...cg,ncg->...nc", x_q_cg, q_ncg, preferred_element_type=jnp.int32)
    dot = jnp.sum(acc_ncx.astype(jnp.float32) * w_scale.astype(jnp.float32), axis=-1)
    return dot * (1 / jax.lax.optimization_barrier(x_scale))


# Queries per row up to which attention over the cache takes the FFI kernel on every kernel path
# (decode steps, short prompts). More queries (prefill chunks) take it where the kernel has SIMD
# code, ATTENTION_SIMD_ISAS: its scalar twin (aarch64, a forced scalar path) would be slower there
# than XLA's matmul over the [T, S] square.
FFI_ATTENTION_MAX_T = 16
ATTENTION_SIMD_ISAS = ("avx2", "avx512")


def ffi_attends(backend: str, q_btnh, k_lbksh) -> bool:
    """Whether attention over a stacked KV cache runs as the FFI kernel (`cached_attention`): on the
    FFI backend, for float32 queries and a float32 or int8 cache, outside a multi-device mesh (a
    bare custom call there would see the sharded cache all-gathered); for more than
    FFI_ATTENTION_MAX_T queries per row, only on a SIMD kernel path. The kernel reads each query's
    slots up to its position, where XLA ops score every slot of the row into a [T, S] matrix:
    twice the causal work and, for a 2B4T 256-token prefill chunk at 2048 tokens, 126 MB of scores
    (benchmarks/RESULTS.md)."""
    mesh = jax.sharding.get_abstract_mesh()
    if not (
        backend == "ffi"
        and q_btnh.dtype == jnp.float32
        and k_lbksh.dtype in (jnp.float32, jnp.int8)
        and (mesh.empty or mesh.size == 1)
    ):
        return False
    if q_btnh.shape[1] <= FFI_ATTENTION_MAX_T:
        return True
    from bitnet_jax.kernels import ffi  # only here: the XLA backends never load the extension

    return ffi.selected_isa() in ATTENTION_SIMD_ISAS


def ffi_cuts(serving: ServingSpec | None) -> bool:
    """Whether sampling's top-k and top-p cuts and its argmaxes run as the FFI kernels
    (`ffi.sampling_cut`, `ffi.argmax`): on the FFI backend outside a multi-device mesh (where a
    bare custom call would see the logits all-gathered), as `ffi_attends` decides for attention.
    `serving` None (training parameters): no."""
    if serving is None or serving.backend != "ffi":
        return False
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or mesh.size == 1


def cached_attention(q_btnh, cache: KVCache, layer, positions_bt, cache_rows=None) -> jax.Array:
    """Attention of queries [B, T, N, H] over layer `layer` of the stacked cache [L, B, K, S, H],
    query (b, t) over slots 0..positions_bt[b, t], as the FFI kernel (`ffi.decode_attention`): it
    reads the layer in place, and only the filled slots. A position past the row (a batching
    server's idle row keeps counting) attends every slot, as the mask `slot <= position` makes it
    do in XLA ops. `cache_rows`: the cache row of each query row [B] (default row b), or its
    pages [B, P] (`KVCache`)."""
    from bitnet_jax.kernels import ffi

    positions_bt = jnp.minimum(positions_bt, cache.row_slots(cache_rows) - 1)
    rows, pages = (cache_rows, None) if cache_rows is None or cache_rows.ndim == 1 else (None, cache_rows)
    return ffi.decode_attention(
        q_btnh,
        cache.k_lbksh,
        cache.v_lbksh,
        layer,
        positions_bt,
        rows,
        cache.k_scale_lbks,
        cache.v_scale_lbks,
        cache_pages_bp=pages,
    )


def float_embed(table_vd, ids, backend: str = "xla") -> jax.Array:
    """Rows of a float embedding table as float32 [..., D] (serving computes in f32).

    The FFI backend reads the rows in place (`ffi.embed_rows`). In XLA ops, a 16-bit table is
    gathered as raw uint16 and only the rows are widened: XLA otherwise rewrites
    convert(gather(table)) into gather(convert(table)) and hoists the convert of the whole table
    (1.3 GB of f32 for 2B4T) out of the decode loop; XLA:CPU still materializes the uint16 view
    once per call (0.66 GB for 2B4T), which the FFI op avoids.
    """
    if backend == "ffi":
        from bitnet_jax.kernels import ffi

        return ffi.embed_rows(table_vd, ids)
    if jnp.dtype(table_vd.dtype).itemsize == 2:
        rows = jnp.take(jax.lax.bitcast_convert_type(table_vd, jnp.uint16), ids, axis=0)
        return jax.lax.bitcast_convert_type(rows, table_vd.dtype).astype(jnp.float32)
    return jnp.take(table_vd, ids, axis=0).astype(jnp.float32)


def int8_embed(ids, w_int8, w_scale, dim: int) -> jax.Array:
    """Rows of an int8 embedding table, dequantized to float32 [..., D]."""
    return w_int8[ids, :dim].astype(jnp.float32) * w_scale[ids][..., None]


def int4_embed(ids, w_int4, w_scale, dim: int) -> jax.Array:
    """Rows of an int4 embedding table (codes and float16 group scales), dequantized to float32 [..., D]."""
    q = layout.unpack_int4(w_int4[ids], w_int4.shape[-1] * 2).astype(jnp.float32)
    s = jnp.repeat(w_scale[ids].astype(jnp.float32), layout.INT4_GROUP_K, axis=-1)
    return (q * s)[..., :dim]
