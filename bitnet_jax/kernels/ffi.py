"""XLA FFI CPU kernels of bitnet_jax, registered with JAX at import.

Importing this module loads the compiled extension `bitnet_jax._ffi_ext` (built from `xla_ffi/`
by `pip install .`) and registers its handlers as CPU custom-call targets:

  bitnet_act_quant_i8   per-row absmax int8 quantization of activations x [..., K]:
                          amax  = max_k |x|                              (float32)
                          scale = 127 / max(amax, 1e-5)                  (float32, [..., 1])
                          x_q   = clamp(round(x * scale), -128, 127)     (int8, [..., K])
                        with round half-to-even, so it equals the pure-JAX
                        `bitnet_jax.model.quant.act_quantize(x, "token", 8)` bit for bit.
  bitnet_ternary_matmul / _i32, bitnet_ternary_matmuls, bitnet_ternary_group_matmul / _dot,
  bitnet_int8_matmul / _i32, bitnet_int4_matmul / _dot
                        the serving matmuls on packed weights (see `ternary_matmul` below,
                        xla_ffi/matmul.cc and bitnet_jax/kernels/layout.py).
  bitnet_embed_rows     embedding rows of a float32 / bfloat16 / float16 table as float32,
                        read in place (`embed_rows`, xla_ffi/embed.cc).
  bitnet_decode_attention / _i8
                        grouped-query attention over one layer of the stacked KV cache (float32,
                        or int8 with per-slot scales), read in place (`decode_attention`,
                        xla_ffi/attention.cc).
  bitnet_stream_tokens  a decode step's tokens into a queue that a Python thread reads
                        (`push_tokens`, `TokenStream`, xla_ffi/token_stream.cc).

Kernel paths (scalar; AVX2, AVX-512 VNNI on x86-64; NEON, NEON with sdot on aarch64) are chosen at
run time from the CPU, or forced with the environment variable
BITNET_JAX_ISA=scalar|avx2|avx512|neon|neon_dot (read at every call).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from bitnet_jax.errors import BitNetError

try:
    from bitnet_jax import _ffi_ext
except ImportError as e:  # pragma: no cover - depends on how the package was installed
    raise ImportError(
        f"bitnet_jax._ffi_ext (the compiled XLA FFI kernels) is missing next to {__file__}. "
        "It is built by `pip install .`; a source checkout on sys.path (e.g. `python -m pytest` "
        "from the repository root) shadows the installed package, so run the `pytest` script "
        "instead, or reinstall."
    ) from e

for _name, _capsule in _ffi_ext.registrations().items():
    jax.ffi.register_ffi_target(_name, _capsule, platform="cpu")
del _name, _capsule

# Input dtypes the kernel reads directly; other floating dtypes are cast to float32 first.
_NATIVE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def act_quant_i8(x_k: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Quantize activations per row (last axis) to int8 with an absmax scale.

    Args:
      x_k: floating array [..., K], K >= 1. float32 and bfloat16 are read as they are (bfloat16
        widens exactly, so it quantizes like `x_k.astype(float32)`); float16 and float64 are cast
        to float32 first.

    Returns:
      (x_q, scale): x_q int8 [..., K] and scale float32 [..., 1], with `x_k ~= x_q / scale`.

    Works under `jax.jit` and `jax.vmap` (any batch axis: the op is independent per row). CPU only.
    """
    x_k = jnp.asarray(x_k)
    if x_k.ndim == 0:
        raise BitNetError(
            "act_quant_i8: expected an array of shape [..., K] (rank >= 1), got a scalar; "
            "reshape it to [1] to quantize a single value"
        )
    if not jnp.issubdtype(x_k.dtype, jnp.floating):
        raise BitNetError(
            f"act_quant_i8: expected a floating-point array, got dtype {x_k.dtype}; cast it with .astype(jnp.float32)"
        )
    if x_k.shape[-1] == 0:
        raise BitNetError(f"act_quant_i8: expected a non-empty last axis K, got shape {x_k.shape}")
    if x_k.dtype not in _NATIVE_DTYPES:
        x_k = x_k.astype(jnp.float32)
    out_types = (
        jax.ShapeDtypeStruct(x_k.shape, jnp.int8),  # x_q [..., K]
        jax.ShapeDtypeStruct(x_k.shape[:-1] + (1,), jnp.float32),  # scale [..., 1]
    )
    # Rows are independent, so a vmapped call is the same kernel on a batch-leading input.
    call = jax.ffi.ffi_call("bitnet_act_quant_i8", out_types, vmap_method="broadcast_all")
    return call(x_k)


# --- serving matmuls ------------------------------------------------------------------------------
# Contracts in xla_ffi/matmul.cc; packed formats in bitnet_jax/kernels/layout.py (mirroring layout.h).


def available_isas() -> list[str]:
    """Kernel paths this CPU runs, scalar first (e.g. ['scalar', 'avx2', 'avx512'] or
    ['scalar', 'neon', 'neon_dot'])."""
    return list(_ffi_ext.available_isas())


def selected_isa() -> str:
    """The path the kernels take now: $BITNET_JAX_ISA if set, else the widest available."""
    try:
        return _ffi_ext.selected_isa()
    except ValueError as e:
        raise BitNetError(str(e)) from None


def _rowwise(target: str, out_dtype, n: int, attrs: dict, x, *weights):
    """Calls an FFI matmul on x [..., K] -> [..., n] (`_rowwise_outputs` with one output)."""
    return _rowwise_outputs(target, out_dtype, (n,), attrs, x, *weights)[0]


def _rowwise_outputs(target: str, out_dtype, ns: tuple, attrs: dict, x, *weights) -> tuple:
    """Calls an FFI op on x [..., K] -> one output [..., n] for each n of `ns`. Under vmap, a
    batched x folds into the rows (each row is independent); batched weights fall back to one
    call per batch element."""
    out_batched = (True,) * len(ns)  # every output has the batch axis

    @jax.custom_batching.custom_vmap
    def call(x, *weights):
        out_types = tuple(jax.ShapeDtypeStruct(x.shape[:-1] + (n,), out_dtype) for n in ns)
        return tuple(jax.ffi.ffi_call(target, out_types)(x, *weights, **attrs))

    @call.def_vmap
    def _batched(axis_size, in_batched, x, *weights):
        x_batched, *weights_batched = in_batched
        if not any(weights_batched):
            return call(x, *weights), out_batched
        broadcast = lambda a, batched: a if batched else jnp.broadcast_to(a, (axis_size,) + a.shape)
        args = [broadcast(a, b) for a, b in zip((x, *weights), in_batched)]
        return jax.lax.map(lambda a: call(*a), tuple(args)), out_batched

    return call(x, *weights)


def _check_x(op: str, x, k: int | None = None, integer: bool = False):
    x = jnp.asarray(x)
    if x.ndim == 0:
        raise BitNetError(f"{op}: expected activations [..., K]; found a scalar.")
    if integer and x.dtype != jnp.int8:
        raise BitNetError(f"{op}: expected int8 activations; found {x.dtype}.")
    if not integer:
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise BitNetError(f"{op}: expected floating-point activations; found {x.dtype}.")
        if x.dtype not in _NATIVE_DTYPES:
            x = x.astype(jnp.float32)
    return x


def ternary_matmul(x, w_packed, w_scale, n: int, act_bits: int = 8, layer=None) -> jax.Array:
    """Serving BitLinear in one custom call: y [..., N] float32 =
    (sum_k Q(x)[..., k] * t[n, k]) * (1 / x_scale) * w_scale, Q the per-row absmax quantizer.

    x: float32 or bfloat16 [..., K]; w_packed: uint8 from `layout.pack_ternary` (t [N, K]);
    w_scale: float32 [1] (per tensor) or [N] (per output row).
    layer: with stacked weights (w_packed [L, G, X], w_scale [L, S]), the layer to use (an int32
      scalar, may be traced): the kernel reads it in place, where `w_packed[layer]` would copy.
    """
    from bitnet_jax.kernels import layout

    x = _check_x("ternary_matmul", x)
    layer = jnp.asarray(0 if layer is None else layer, jnp.int32)
    attrs = dict(n=np.int64(n), act_bits=np.int64(act_bits), layout_version=np.int64(layout.LAYOUT_VERSION))
    return _rowwise("bitnet_ternary_matmul", jnp.float32, n, attrs, x, w_packed, w_scale, layer)


def ternary_matmuls(x, projections, act_bits: int = 8, layer=None) -> tuple[jax.Array, ...]:
    """Several serving BitLinears of the same input in one custom call: for each (w_packed,
    w_scale, n) of `projections`, exactly `ternary_matmul(x, w_packed, w_scale, n, act_bits,
    layer)`, the same bits, from one quantization of x and one split of every projection's output
    rows over the threads (a decode step's q, k and v: k and v alone are too small to keep both
    threads streaming). Per-tensor or per-row scales, as `ternary_matmul` takes them."""
    from bitnet_jax.kernels import layout

    x = _check_x("ternary_matmuls", x)
    projections = list(projections)
    if not projections:
        raise BitNetError("ternary_matmuls: expected at least one (w_packed, w_scale, n) projection.")
    layer = jnp.asarray(0 if layer is None else layer, jnp.int32)
    ns = [int(n) for _, _, n in projections]
    attrs = dict(
        ns=np.asarray(ns, np.int64), act_bits=np.int64(act_bits), layout_version=np.int64(layout.LAYOUT_VERSION)
    )
    weights = [a for w_packed, w_scale, _ in projections for a in (w_packed, w_scale)]
    return _rowwise_outputs("bitnet_ternary_matmuls", jnp.float32, tuple(ns), attrs, x, layer, *weights)


def ternary_matmul_i32(x_q, w_packed, n: int, layer=None) -> jax.Array:
    """Exact integer product int32 [..., N] = sum_k x_q[..., k] * t[n, k] (x_q int8 [..., K]);
    `layer` as in `ternary_matmul`."""
    from bitnet_jax.kernels import layout

    x_q = _check_x("ternary_matmul_i32", x_q, integer=True)
    layer = jnp.asarray(0 if layer is None else layer, jnp.int32)
    attrs = dict(n=np.int64(n), layout_version=np.int64(layout.LAYOUT_VERSION))
    return _rowwise("bitnet_ternary_matmul_i32", jnp.int32, n, attrs, x_q, w_packed, layer)


def ternary_group_matmul(x, w_packed, w_scale, n: int, act_bits: int = 8, layer=None) -> jax.Array:
    """Serving BitLinear with a scale per output row and group of G inputs ('group:G'), in one custom
    call: y [..., N] float32 = dot(Q(x), t, w_scale) * (1 / x_scale), dot the kernel's float sum of
    scaled group sums (`ternary_group_matmul_dot`).

    w_packed: TQ2G tiles uint8 [T, Kp * 4] (`layout.pack_ternary_tiles` of t [N, K]); w_scale:
    their scales float32 [T, (K / G) * 16] (`layout.tile_group_scales` of [K / G, N]), G a multiple
    of `layout.TERNARY_GROUP_ALIGN`; stacked weights ([L, T, Kp * 4], [L, T, (K / G) * 16]) with
    `layer` as in `ternary_matmul`.
    """
    from bitnet_jax.kernels import layout

    x = _check_x("ternary_group_matmul", x)
    layer = jnp.asarray(0 if layer is None else layer, jnp.int32)
    attrs = dict(n=np.int64(n), act_bits=np.int64(act_bits), layout_version=np.int64(layout.LAYOUT_VERSION))
    return _rowwise("bitnet_ternary_group_matmul", jnp.float32, n, attrs, x, w_packed, w_scale, layer)


def ternary_group_matmul_dot(x_q, w_packed, w_scale, n: int, layer=None) -> jax.Array:
    """float32 [..., N]: sum over groups c of (sum_k x_q[..., k] * t[n, k] over group c) * scale[c, n]
    (w_scale: `layout.tile_group_scales(scale)`),
    in the one order that every kernel path follows (xla_ffi/gemm.h): d = 0, then group by group
    d = d + float(exact group sum) * scale, each product and sum rounded to float32."""
    from bitnet_jax.kernels import layout

    x_q = _check_x("ternary_group_matmul_dot", x_q, integer=True)
    layer = jnp.asarray(0 if layer is None else layer, jnp.int32)
    attrs = dict(n=np.int64(n), layout_version=np.int64(layout.LAYOUT_VERSION))
    return _rowwise("bitnet_ternary_group_matmul_dot", jnp.float32, n, attrs, x_q, w_packed, w_scale, layer)


def int8_matmul(x, w_int8, w_scale, act_bits: int = 8) -> jax.Array:
    """Int8-weight matmul (the lm_head): y [..., N] float32 = (sum_k Q(x) * w8) * (1 / x_scale) * w_scale.

    w_int8: int8 [N, Kp] from `layout.pack_int8`; w_scale: float32 [N].
    """
    from bitnet_jax.kernels import layout

    x = _check_x("int8_matmul", x)
    attrs = dict(act_bits=np.int64(act_bits), layout_version=np.int64(layout.LAYOUT_VERSION))
    return _rowwise("bitnet_int8_matmul", jnp.float32, w_int8.shape[0], attrs, x, w_int8, w_scale)


def int8_matmul_i32(x_q, w_int8) -> jax.Array:
    """Exact integer product int32 [..., N] = sum_k x_q[..., k] * w8[n, k]."""
    from bitnet_jax.kernels import layout

    x_q = _check_x("int8_matmul_i32", x_q, integer=True)
    attrs = dict(layout_version=np.int64(layout.LAYOUT_VERSION))
    return _rowwise("bitnet_int8_matmul_i32", jnp.int32, w_int8.shape[0], attrs, x_q, w_int8)


def int4_matmul(x, w_int4, w_scale, act_bits: int = 8) -> jax.Array:
    """Int4-weight matmul (the 4-bit lm_head): y [..., N] float32 = dot(Q(x), q, scale) * (1 / x_scale),
    dot the kernel's float sum of group sums times their scales (`int4_matmul_dot`).

    w_int4: uint8 [N, Kp / 2] from `layout.pack_int4`; w_scale: float16 [N, Kp / 32].
    """
    from bitnet_jax.kernels import layout

    x = _check_x("int4_matmul", x)
    attrs = dict(act_bits=np.int64(act_bits), layout_version=np.int64(layout.LAYOUT_VERSION))
    return _rowwise("bitnet_int4_matmul", jnp.float32, w_int4.shape[0], attrs, x, w_int4, w_scale)


def int4_matmul_dot(x_q, w_int4, w_scale) -> jax.Array:
    """float32 [..., N]: sum over groups g of (sum_k x_q[..., k] * q[n, k] over g) * w_scale[n, g], in
    the one order that every kernel path follows (xla_ffi/gemm.h): 8 lanes of 4 neighbouring inputs
    each, accumulated group by group, then summed ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))."""
    from bitnet_jax.kernels import layout

    x_q = _check_x("int4_matmul_dot", x_q, integer=True)
    attrs = dict(layout_version=np.int64(layout.LAYOUT_VERSION))
    return _rowwise("bitnet_int4_matmul_dot", jnp.float32, w_int4.shape[0], attrs, x_q, w_int4, w_scale)


def embed_rows(table_vd, ids) -> jax.Array:
    """Rows `table_vd[ids]` widened to float32 [..., D], read in place from a float32, bfloat16
    or float16 table: no whole-table conversion or copy, which XLA makes of a 16-bit table on
    every call otherwise. Ids must lie in [0, V) (an out-of-range id raises at run time)."""
    table_vd, ids = jnp.asarray(table_vd), jnp.asarray(ids, jnp.int32)
    if table_vd.ndim != 2 or table_vd.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise BitNetError(
            f"embed_rows: expected a float32, bfloat16 or float16 table [V, D]; "
            f"found {table_vd.dtype} {table_vd.shape}."
        )

    @jax.custom_batching.custom_vmap
    def call(table_vd, ids):
        out_type = jax.ShapeDtypeStruct(ids.shape + table_vd.shape[-1:], jnp.float32)
        return jax.ffi.ffi_call("bitnet_embed_rows", out_type)(table_vd, ids)

    @call.def_vmap
    def _batched(axis_size, in_batched, table_vd, ids):
        if not in_batched[0]:  # a batch of ids is more ids
            return call(table_vd, ids), True
        ids = ids if in_batched[1] else jnp.broadcast_to(ids, (axis_size,) + ids.shape)
        return jax.lax.map(lambda a: call(*a), (table_vd, ids)), True

    return call(table_vd, ids)


def decode_attention(
    q_btnh,
    k_lbksh,
    v_lbksh,
    layer,
    positions_bt,
    cache_rows_b=None,
    k_scale_lbks=None,
    v_scale_lbks=None,
    cache_pages_bp=None,
) -> jax.Array:
    """Grouped-query attention over layer `layer` of a stacked KV cache, read in place: float32
    out [B, T, N, H] with, for query (b, t), cache row r = cache_rows_b[b] and G = N // K,

        out[b, t, n] = sum_{s <= positions_bt[b, t]} softmax_s(q[b, t, n] . k[layer, r, n // G, s] * H**-0.5)
                       * v[layer, r, n // G, s]

    or, for a paged cache (`cache_pages_bp`), slot s of query row b at slot s % S of cache row
    cache_pages_bp[b, s // S]: the same sum, the same bits, wherever the pages lie.

    q_btnh: float32 [B, T, N, H]; k_lbksh, v_lbksh: float32 [L, Bc, K, S, H], N a multiple of K;
      or int8 codes of that shape with float32 scales k_scale_lbks, v_scale_lbks [L, Bc, K, S]
      (the cache then holds k = k_scale[..., None] * k_codes, a quarter of the bytes to read).
      Over an int8 cache the kernel multiplies in integers: each head's query, and its softmax
      weights of every 128 slots, are rounded to int16 codes (steps of 1/32767 of the largest),
      so it differs from float attention over the dequantized cache by at most 2^-16 of those
      largest values, far below the cache's own int8 rounding (xla_ffi/attention_kernel.h).
    layer: int32 scalar (may be traced), in [0, L). positions_bt: int32 [B, T], each < S (a larger
      one raises at run time); a negative position gives zeros (a row with nothing to attend).
    cache_rows_b: int32 [B], each in [0, Bc); default 0..B-1 (then Bc must be at least B).
    cache_pages_bp: instead of cache_rows_b, int32 [B, P], each in [0, Bc): the cache rows that
      hold query row b's slots, S each (a paged cache; S a multiple of 128, the kernel's chunk,
      when P > 1); positions then go up to P * S - 1.

    Where `k_lbksh[layer]` and a masked einsum copy the layer's S slots at every call and attend
    to all of them, the kernel reads only slots 0..position of the rows asked for. Each row's
    result is the same bits whatever the batch, the other rows' positions and the thread count
    (fixed chunks of slots, merged in a fixed order: xla_ffi/attention.cc). CPU only.
    """
    q_btnh, k_lbksh, v_lbksh = jnp.asarray(q_btnh), jnp.asarray(k_lbksh), jnp.asarray(v_lbksh)
    if q_btnh.dtype != jnp.float32:
        raise BitNetError(f"decode_attention: expected float32 q_btnh; found {q_btnh.dtype}. Cast it with .astype.")
    int8_cache = k_lbksh.dtype == jnp.int8
    if k_lbksh.dtype not in (jnp.float32, jnp.int8) or v_lbksh.dtype != k_lbksh.dtype:
        raise BitNetError(
            f"decode_attention: expected caches both float32, or both int8 with scales; found {k_lbksh.dtype} and "
            f"{v_lbksh.dtype}."
        )
    if int8_cache != (k_scale_lbks is not None) or int8_cache != (v_scale_lbks is not None):
        raise BitNetError(
            "decode_attention: an int8 cache needs k_scale_lbks and v_scale_lbks (float32 [L, Bc, K, S]), and a "
            "float32 cache takes none."
        )
    if q_btnh.ndim != 4 or k_lbksh.ndim != 5 or v_lbksh.shape != k_lbksh.shape:
        raise BitNetError(
            f"decode_attention: expected q [B, T, N, H] and caches k, v [L, Bc, K, S, H] of one shape; found "
            f"q {q_btnh.shape}, k {k_lbksh.shape}, v {v_lbksh.shape}."
        )
    b, t, n, h = q_btnh.shape
    kv = k_lbksh.shape[2]
    if k_lbksh.shape[4] != h or kv == 0 or n % kv:
        raise BitNetError(
            f"decode_attention: q {q_btnh.shape} does not fit the cache {k_lbksh.shape}: expected the same head "
            f"dim H and N query heads a multiple of the K kv heads."
        )
    if cache_pages_bp is not None:
        if cache_rows_b is not None:
            raise BitNetError("decode_attention: pass cache_rows_b or cache_pages_bp, not both.")
        cache_pages_bp = jnp.asarray(cache_pages_bp)
        if cache_pages_bp.ndim != 2 or cache_pages_bp.shape[0] != b:
            raise BitNetError(
                f"decode_attention: expected cache_pages_bp of shape [B, P] = [{b}, P]; found {cache_pages_bp.shape}."
            )
        pages = _int32_operand("cache_pages_bp", cache_pages_bp, cache_pages_bp.shape)
    elif cache_rows_b is None:
        if b > k_lbksh.shape[1]:
            raise BitNetError(
                f"decode_attention: {b} query rows but the cache has {k_lbksh.shape[1]} rows; pass cache_rows_b "
                "to say which cache row each query row reads."
            )
        pages = jnp.arange(b, dtype=jnp.int32)[:, None]
    else:
        pages = _int32_operand("cache_rows_b", cache_rows_b, (b,))[:, None]
    layer = _int32_operand("layer", layer, ())
    positions_bt = _int32_operand("positions_bt", positions_bt, (b, t))
    out_type = jax.ShapeDtypeStruct(q_btnh.shape, jnp.float32)
    if not int8_cache:
        call = jax.ffi.ffi_call("bitnet_decode_attention", out_type, vmap_method="sequential")
        return call(q_btnh, k_lbksh, v_lbksh, layer, positions_bt, pages)
    scales = [jnp.asarray(x) for x in (k_scale_lbks, v_scale_lbks)]
    if any(x.dtype != jnp.float32 or x.shape != k_lbksh.shape[:-1] for x in scales):
        raise BitNetError(
            f"decode_attention: expected float32 scales of shape {k_lbksh.shape[:-1]} (the cache's without the head "
            f"dim); found {[(str(x.dtype), x.shape) for x in scales]}."
        )
    call = jax.ffi.ffi_call("bitnet_decode_attention_i8", out_type, vmap_method="sequential")
    return call(q_btnh, k_lbksh, v_lbksh, *scales, layer, positions_bt, pages)


def _int32_operand(name: str, x, shape: tuple) -> jax.Array:
    x = jnp.asarray(x)
    if x.shape != shape or not jnp.issubdtype(x.dtype, jnp.integer):
        raise BitNetError(f"decode_attention: expected integer {name} of shape {shape}; found {x.dtype} {x.shape}.")
    return x.astype(jnp.int32)


def sampling_cut(
    ukey_bv: jax.Array, top_k_b: jax.Array, top_p_b: jax.Array, kept: int = 0
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Each row's top-k and then top-p cut, by radix select (xla_ffi/sampling.cc: what
    `generate.top_k_threshold` and `top_p_threshold` find by halvings): (cut uint32 [B, 1], the
    least key the row keeps; kept_bk int32 [B, kept], the indices of the tokens it keeps, ascending,
    where they are at most `kept` (the rest: V); count_b int32 [B], how many it keeps, or kept + 1
    where more). `ukey_bv` uint32 [B, V]: `generate.unsigned_keys` of the scaled logits, whose
    masses, exp(x - max x), the kernel computes; `top_k_b` int32 [B] (<= 0: no top-k cut);
    `top_p_b` float32 [B] (>= 1: no top-p cut). A cut of 0 keeps every token."""
    b, v = ukey_bv.shape
    if ukey_bv.dtype != jnp.uint32 or top_k_b.shape != (b,) or top_p_b.shape != (b,):
        raise BitNetError(
            f"sampling_cut: expected uint32 keys [B, V], top_k [B] and top_p [B]; found keys "
            f"{ukey_bv.dtype} {ukey_bv.shape}, top_k {top_k_b.shape}, top_p {top_p_b.shape}."
        )
    if not 0 <= kept < 2**31 - 1:
        raise BitNetError(f"sampling_cut: kept={kept}: expected a count in [0, 2**31 - 1).")
    out_types = (
        jax.ShapeDtypeStruct((b, 1), jnp.uint32),
        jax.ShapeDtypeStruct((b, kept), jnp.int32),
        jax.ShapeDtypeStruct((b,), jnp.int32),
    )
    call = jax.ffi.ffi_call("bitnet_sampling_cut", out_types, vmap_method="sequential")
    return tuple(call(ukey_bv, top_k_b.astype(jnp.int32), top_p_b.astype(jnp.float32)))


def argmax(x: jax.Array) -> jax.Array:
    """int32 [...]: each row's first index of its largest value along the last axis of `x`
    (float32 [..., V]), NaN counting as larger than any number and -0.0 as 0.0, as
    `jnp.argmax` has it (xla_ffi/sampling.cc, `bitnet_argmax`: one pass over the row, where
    XLA:CPU writes two [..., V] int32 arrays for `generate.greedy_tokens`)."""
    if x.ndim < 1 or x.shape[-1] < 1:
        raise BitNetError(f"argmax: expected x [..., V] with V >= 1, found {x.shape}.")
    out_type = jax.ShapeDtypeStruct(x.shape[:-1], jnp.int32)
    return jax.ffi.ffi_call("bitnet_argmax", out_type, vmap_method="broadcast_all")(x.astype(jnp.float32))


def push_tokens(stream_and_tokens_1b: jax.Array) -> None:
    """Inside a jitted program on CPU: appends a step's tokens to an open `TokenStream`.
    `stream_and_tokens_1b`: int32 [1 + B], the stream's id and then the B tokens. The program
    fails if the stream is not open, or if its consumer has raised."""
    jax.ffi.ffi_call("bitnet_stream_tokens", (), has_side_effect=True)(stream_and_tokens_1b.astype(jnp.int32))


def zeros(shapes):
    """Arrays of zeros of `shapes` (a pytree of `jax.ShapeDtypeStruct`), inside or outside jit, on
    CPU: one custom call (xla_ffi/zeros.cc) that hands the buffers' whole pages back to the OS
    rather than writing them, so that their memory becomes resident only where a later step
    writes (the server's KV cache pool, sized for the worst case)."""
    leaves, tree = jax.tree.flatten(shapes)
    if not leaves:
        return shapes
    structs = [jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) for leaf in leaves]
    return jax.tree.unflatten(tree, jax.ffi.ffi_call("bitnet_zeros", structs)())


class TokenStream:
    """Calls `on_tokens(tokens_b)` (int32 numpy [B]) on a thread of its own for each step that a
    program pushes to stream `stream_id` (`push_tokens`), in order.

    The program's thread only queues the tokens (xla_ffi/token_stream.cc), so a decode step does
    not wait for Python. Use as a context manager around running the program: on exit every
    pushed step has been delivered, and an exception that `on_tokens` raised is raised (the
    program itself stops at its next push, with an error that names it)."""

    def __init__(self, stream_id: int, on_tokens: Callable[[np.ndarray], None]):
        self._id = int(stream_id)
        self._on_tokens = on_tokens
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._deliver, name=f"bitnet-token-stream-{self._id}", daemon=True)

    def __enter__(self) -> "TokenStream":
        _ffi_ext.token_stream_open(self._id)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        _ffi_ext.token_stream_finish(self._id)
        self._thread.join()
        _ffi_ext.token_stream_close(self._id)
        if self.error is not None:
            raise self.error

    def _deliver(self) -> None:
        while (step := _ffi_ext.token_stream_pop(self._id)) is not None:
            if self.error is not None:
                continue  # drain what the program pushed before it saw the cancellation
            try:
                self._on_tokens(np.frombuffer(step, np.int32))
            except BaseException as e:  # handed to the caller by __exit__
                self.error = e
                _ffi_ext.token_stream_cancel(self._id, f"on_tokens raised {type(e).__name__}: {e}")
