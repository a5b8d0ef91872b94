"""XLA FFI CPU kernels of bitnet_jax, registered with JAX at import.

Importing this module loads the compiled extension `bitnet_jax._ffi_ext` (built from `xla_ffi/`
by `pip install .`) and registers its handlers as CPU custom-call targets:

  bitnet_act_quant_i8   per-row absmax int8 quantization of activations x [..., K]:
                          amax  = max_k |x|                              (float32)
                          scale = 127 / max(amax, 1e-5)                  (float32, [..., 1])
                          x_q   = clamp(round(x * scale), -128, 127)     (int8, [..., K])
                        with round half-to-even, so it equals the pure-JAX
                        `bitnet_jax.quant.act_quantize(x, "token", 8)` bit for bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .errors import BitNetError

try:
    from . import _ffi_ext
except ImportError as e:  # pragma: no cover - depends on how the package was installed
    raise ImportError(
        f"bitnet_jax._ffi_ext (the compiled XLA FFI kernels) is missing next to {__file__}. "
        "It is built by `pip install .`; a source checkout on sys.path (e.g. `python -m pytest` "
        "from the repository root) shadows the installed package, so run the `pytest` script "
        "instead, or reinstall.") from e

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
            "reshape it to [1] to quantize a single value")
    if not jnp.issubdtype(x_k.dtype, jnp.floating):
        raise BitNetError(
            f"act_quant_i8: expected a floating-point array, got dtype {x_k.dtype}; "
            "cast it with .astype(jnp.float32)")
    if x_k.shape[-1] == 0:
        raise BitNetError(
            f"act_quant_i8: expected a non-empty last axis K, got shape {x_k.shape}")
    if x_k.dtype not in _NATIVE_DTYPES:
        x_k = x_k.astype(jnp.float32)
    out_types = (
        jax.ShapeDtypeStruct(x_k.shape, jnp.int8),                 # x_q [..., K]
        jax.ShapeDtypeStruct(x_k.shape[:-1] + (1,), jnp.float32),  # scale [..., 1]
    )
    # Rows are independent, so a vmapped call is the same kernel on a batch-leading input.
    call = jax.ffi.ffi_call("bitnet_act_quant_i8", out_types, vmap_method="broadcast_all")
    return call(x_k)
