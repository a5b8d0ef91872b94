// nanobind module `bitnet_jax._ffi_ext`: hands the XLA FFI handlers to Python as capsules, and
// tells Python the packed layout and the kernel paths this CPU runs.
//
// Symbols are hidden in the module, so Python can't find the handlers by name; instead
// `registrations()` returns {target name: capsule(handler pointer)}, and bitnet_jax/kernels/ffi.py passes
// each to jax.ffi.register_ffi_target.

#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "act_quant.h"
#include "attention.h"
#include "cpu_isa.h"
#include "embed.h"
#include "gemm.h"
#include "layout.h"
#include "machine.h"
#include "matmul.h"
#include "nanobind/nanobind.h"
#include "nanobind/stl/string.h"
#include "quantize.h"
#include "sampling.h"
#include "token_stream.h"
#include "zeros.h"
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
  m.doc() = "XLA FFI CPU handlers of bitnet_jax; see bitnet_jax/kernels/ffi.py.";
  m.def("registrations", []() {
    nb::dict registrations;
    registrations["bitnet_act_quant_i8"] = EncapsulateFfiHandler(BitnetActQuantI8);
    registrations["bitnet_ternary_matmul"] = EncapsulateFfiHandler(BitnetTernaryMatmul);
    registrations["bitnet_ternary_matmuls"] = EncapsulateFfiHandler(BitnetTernaryMatmuls);
    registrations["bitnet_ternary_matmul_i32"] = EncapsulateFfiHandler(BitnetTernaryMatmulI32);
    registrations["bitnet_ternary_group_matmul"] = EncapsulateFfiHandler(BitnetTernaryGroupMatmul);
    registrations["bitnet_ternary_group_matmul_dot"] = EncapsulateFfiHandler(BitnetTernaryGroupMatmulDot);
    registrations["bitnet_int8_matmul"] = EncapsulateFfiHandler(BitnetInt8Matmul);
    registrations["bitnet_int8_matmul_i32"] = EncapsulateFfiHandler(BitnetInt8MatmulI32);
    registrations["bitnet_int4_matmul"] = EncapsulateFfiHandler(BitnetInt4Matmul);
    registrations["bitnet_int4_matmul_dot"] = EncapsulateFfiHandler(BitnetInt4MatmulDot);
    registrations["bitnet_embed_rows"] = EncapsulateFfiHandler(BitnetEmbedRows);
    registrations["bitnet_decode_attention"] = EncapsulateFfiHandler(BitnetDecodeAttention);
    registrations["bitnet_decode_attention_i8"] = EncapsulateFfiHandler(BitnetDecodeAttentionI8);
    registrations["bitnet_read_bandwidth"] = EncapsulateFfiHandler(BitnetReadBandwidth);
    registrations["bitnet_int8_peak"] = EncapsulateFfiHandler(BitnetInt8Peak);
    registrations["bitnet_sampling_cut"] = EncapsulateFfiHandler(BitnetSamplingCut);
    registrations["bitnet_argmax"] = EncapsulateFfiHandler(BitnetArgmax);
    registrations["bitnet_stream_tokens"] = EncapsulateFfiHandler(BitnetStreamTokens);
    registrations["bitnet_zeros"] = EncapsulateFfiHandler(BitnetZeros);
    return registrations;
  });
  m.def("layout", []() {
    nb::dict layout;
    layout["version"] = bitnet::kLayoutVersion;
    layout["block_k"] = bitnet::kBlockK;
    layout["block_bytes"] = bitnet::kBlockBytes;
    layout["rows_per_group"] = bitnet::kRowsPerGroup;
    layout["tile_rows"] = bitnet::kTileRows;
    layout["tile_chunk_k"] = bitnet::kTileChunkK;
    layout["tile_align_k"] = bitnet::kTileAlignK;
    layout["int8_row_align"] = bitnet::kInt8RowAlign;
    layout["int4_group_k"] = bitnet::kInt4GroupK;
    layout["ternary_group_align"] = bitnet::kTernaryGroupAlign;
    return layout;
  }, "The packed-layout constants of layout.h, for bitnet_jax/kernels/layout.py to check its mirror.");
  m.def("quant_eps", []() { return bitnet::kQuantEps; },
        "The quantizers' scale floor (quantize.h), for tests to check against model/quant.py's EPS.");
  m.def("available_isas", []() {
    nb::list names;
    for (bitnet::Isa isa : bitnet::AvailableIsas()) names.append(bitnet::IsaName(isa));
    return names;
  }, "Kernel paths this CPU runs, scalar first.");
  m.def("selected_isa", []() {
    bitnet::Isa isa;
    std::string error;
    if (!bitnet::SelectIsa(&isa, &error)) throw nb::value_error(error.c_str());
    return std::string(bitnet::IsaName(isa));
  }, "The path the kernels take now (BITNET_JAX_ISA, else the widest available).");
  // Token streams (token_stream.h), driven by bitnet_jax/serve/generate.py.
  m.def("token_stream_open", &bitnet::OpenTokenStream, nb::arg("stream"), "Opens stream `stream` (empty).");
  m.def("token_stream_pop", [](int64_t stream) -> nb::object {
    std::vector<int32_t> tokens;
    bool got;
    {
      nb::gil_scoped_release release;
      got = bitnet::PopTokens(stream, &tokens);
    }
    if (!got) return nb::none();
    return nb::bytes(reinterpret_cast<const char*>(tokens.data()), tokens.size() * sizeof(int32_t));
  }, nb::arg("stream"),
        "A step's tokens (int32 bytes) once the program has pushed them, or None once the stream is finished "
        "and drained; waits with the GIL released.");
  m.def("token_stream_finish", &bitnet::FinishTokenStream, nb::arg("stream"),
        "No more pushes: token_stream_pop returns None once the queue is empty.");
  m.def("token_stream_cancel", &bitnet::CancelTokenStream, nb::arg("stream"), nb::arg("reason"),
        "Makes the program's next push fail with `reason`.");
  m.def("token_stream_close", &bitnet::CloseTokenStream, nb::arg("stream"), "Forgets the stream.");
  m.def("int8_peak_instructions", []() {
    nb::dict instructions;
    for (bitnet::Isa isa : bitnet::AvailableIsas())
      instructions[bitnet::IsaName(isa)] = bitnet::Int8PeakInstruction(isa);
    return instructions;
  }, "{path: the instruction bitnet_int8_peak times on it} for the paths this CPU runs.");
}
