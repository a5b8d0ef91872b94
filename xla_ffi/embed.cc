// bitnet_embed_rows: table [V, D] float32 | bfloat16 | float16, ids int32 [...] -> f32 [..., D].
//
// Rows of an embedding table, widened to float32 (exactly: every bf16 and f16 value is a float32
// value). XLA would compute convert(gather(table)) as gather(convert(table)), or materialize a
// reinterpreted copy of the whole table, on every call: 0.66 GB per generate call for a bf16
// 128256 x 2560 table. This reads only the rows asked for. Ids outside [0, V) are an error.

#include "embed.h"

#include <cstdint>
#include <cstring>
#include <string>

#include "ffi_util.h"
#include "float16.h"

namespace ffi = xla::ffi;

namespace {

float Widen(float v) { return v; }

// bfloat16: the high half of a float32.
float WidenBf16(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &wide, sizeof(f));
  return f;
}

template <typename T, typename WidenFn>
void Gather(const T* table, int64_t d, const int32_t* ids, int64_t count, WidenFn widen, float* out) {
  for (int64_t i = 0; i < count; ++i) {
    const T* row = table + static_cast<int64_t>(ids[i]) * d;
    for (int64_t j = 0; j < d; ++j) out[i * d + j] = widen(row[j]);
  }
}

ffi::Error EmbedRowsImpl(ffi::AnyBuffer table, ffi::Buffer<ffi::S32> ids, ffi::Result<ffi::Buffer<ffi::F32>> out) {
  const std::string op = "bitnet_embed_rows: ";
  const auto t_dims = table.dimensions();
  if (t_dims.size() != 2) {
    return ffi::Error::InvalidArgument(op + "expected a table [V, D], got shape " + bitnet::ShapeString(t_dims));
  }
  const int64_t v = t_dims[0], d = t_dims[1];
  const int64_t count = static_cast<int64_t>(ids.element_count());
  const auto o_dims = out->dimensions();
  bool ok = o_dims.size() == ids.dimensions().size() + 1 && o_dims.back() == d;
  for (size_t i = 0; ok && i < ids.dimensions().size(); ++i) ok = o_dims[i] == ids.dimensions()[i];
  if (!ok) {
    return ffi::Error::InvalidArgument(op + "the output must have shape ids.shape + [" + std::to_string(d) +
                                       "], got " + bitnet::ShapeString(o_dims));
  }
  const int32_t* id = ids.typed_data();
  for (int64_t i = 0; i < count; ++i) {
    if (id[i] < 0 || id[i] >= v) {
      return ffi::Error::InvalidArgument(op + "id " + std::to_string(id[i]) + " is outside the table's " +
                                         std::to_string(v) + " rows");
    }
  }
  float* y = out->typed_data();
  switch (table.element_type()) {
    case ffi::DataType::F32:
      Gather(static_cast<const float*>(table.untyped_data()), d, id, count, Widen, y);
      break;
    case ffi::DataType::BF16:
      Gather(static_cast<const uint16_t*>(table.untyped_data()), d, id, count, WidenBf16, y);
      break;
    case ffi::DataType::F16:
      Gather(static_cast<const uint16_t*>(table.untyped_data()), d, id, count, bitnet::HalfToFloat, y);
      break;
    default:
      return ffi::Error::InvalidArgument(op + "expected a float32, bfloat16 or float16 table, got XLA dtype code " +
                                         std::to_string(static_cast<int>(table.element_type())));
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    BitnetEmbedRows, EmbedRowsImpl,
    ffi::Ffi::Bind()
        .Arg<ffi::AnyBuffer>()           // table: [V, D], float32 | bfloat16 | float16
        .Arg<ffi::Buffer<ffi::S32>>()    // ids: int32 [...], each in [0, V)
        .Ret<ffi::Buffer<ffi::F32>>());  // rows: float32 [..., D]
