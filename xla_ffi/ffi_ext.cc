// nanobind module `bitnet_jax._ffi_ext`: hands the XLA FFI handlers to Python as capsules.
//
// Symbols are hidden in the module, so Python can't find the handlers by name; instead
// `registrations()` returns {target name: capsule(handler pointer)}, and bitnet_jax/ffi.py passes
// each to jax.ffi.register_ffi_target.

#include <type_traits>

#include "act_quant.h"
#include "nanobind/nanobind.h"
#include "xla/ffi/api/ffi.h"

namespace nb = nanobind;

namespace {

template <typename T>
nb::capsule EncapsulateFfiHandler(T* fn) {
  static_assert(std::is_invocable_r_v<XLA_FFI_Error*, T, XLA_FFI_CallFrame*>,
                "Encapsulated function must be an XLA FFI handler");
  return nb::capsule(reinterpret_cast<void*>(fn));
}

}  // namespace

NB_MODULE(_ffi_ext, m) {
  m.doc() = "XLA FFI CPU handlers of bitnet_jax; see bitnet_jax/ffi.py.";
  m.def("registrations", []() {
    nb::dict registrations;
    registrations["bitnet_act_quant_i8"] = EncapsulateFfiHandler(BitnetActQuantI8);
    return registrations;
  });
}
