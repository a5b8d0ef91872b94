// bitnet_zeros: nothing -> any number of buffers, every byte zero.
//
// The server's KV cache is a pool of pages sized for the worst case (every slot at the full
// context), and a request holds only the pages it needs. Zeroed by an XLA program, the whole pool
// is written and so resident from the start (0.16 GB for 4096 int8 slots of 2B4T, 2.5 GB for the
// default 8 x 2048 float32 ones). Zeroed here, its memory is resident only where keys and values
// have been written: the process's memory follows the tokens in flight. (Where transparent huge
// pages are set to `always`, a first write may bring in a 2 MB page rather than 4 KB: coarser,
// still far from the whole pool.)

#include "zeros.h"

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace ffi = xla::ffi;

namespace {

// Sets `bytes` bytes at `data` to zero. On Linux the whole pages inside the range are handed back
// to the kernel (madvise MADV_DONTNEED on private anonymous memory, which XLA:CPU's buffers are),
// which reads them as zeros from then on and allocates them at their first write; the partial
// pages at either end, and any range madvise refuses, are written with memset.
void ZeroLazily(void* data, size_t bytes) {
  auto* begin = static_cast<uint8_t*>(data);
  uint8_t* end = begin + bytes;
#if defined(__linux__)
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  auto* first = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(begin) + page - 1) / page * page);
  auto* last = reinterpret_cast<uint8_t*>(reinterpret_cast<uintptr_t>(end) / page * page);
  if (first < last && madvise(first, static_cast<size_t>(last - first), MADV_DONTNEED) == 0) {
    std::memset(begin, 0, static_cast<size_t>(first - begin));
    std::memset(last, 0, static_cast<size_t>(end - last));
    return;
  }
#endif
  std::memset(begin, 0, bytes);
}

ffi::Error ZerosImpl(ffi::RemainingRets outputs) {
  for (size_t i = 0; i < outputs.size(); ++i) {
    auto out = outputs.get<ffi::AnyBuffer>(i);
    if (!out.has_value()) {
      return ffi::Error::InvalidArgument("bitnet_zeros: output " + std::to_string(i) + " is not an array buffer");
    }
    ZeroLazily((*out)->untyped_data(), (*out)->size_bytes());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BitnetZeros, ZerosImpl, ffi::Ffi::Bind().RemainingRets());
