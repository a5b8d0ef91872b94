// ParallelFor on XLA's intra-op thread pool (the FFI ThreadPool context), so kernels share the
// threads XLA already runs instead of competing with a private pool.
#ifndef BITNET_JAX_XLA_FFI_PARALLEL_H_
#define BITNET_JAX_XLA_FFI_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace bitnet {

// Calls fn(begin, end) over [0, units) split into chunks of at least min_chunk units, on up to
// pool.num_threads() helpers plus the calling thread, and returns when every chunk is done.
//
// About kChunksPerThread chunks a thread: the last chunk claimed decides when the call ends, and
// on a shared host one thread often runs slower than the other. With 4 a thread, 8 activation
// rows through 2560 x 6912 took 549 us on 2 threads of an Ice Lake Xeon, with 16 420 (one row
// and 128 rows: level or a few percent faster; benchmarks/RESULTS.md).
//
// Chunks are claimed from an atomic counter by whoever is free, the caller included, so the call
// finishes even if no pool thread ever starts (a busy or absent pool) and a slow thread delays
// only the chunk it holds. Helpers that start after all chunks are claimed return at once; the
// shared state they touch is reference-counted, so it outlives this call if it must.
template <typename Fn>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t units, int64_t min_chunk, const Fn& fn) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  constexpr int64_t kChunksPerThread = 16;
  const int64_t per_chunk = (units + kChunksPerThread * threads - 1) / (kChunksPerThread * threads);
  const int64_t chunk = std::max<int64_t>(min_chunk, per_chunk);
  const int64_t chunks = (units + chunk - 1) / chunk;
  if (threads == 1 || chunks <= 1) {
    if (units > 0) fn(int64_t{0}, units);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  const Fn* body = &fn;
  auto work = [state, body, units, chunk, chunks]() {
    for (int64_t c; (c = state->next.fetch_add(1)) < chunks;) {
      const int64_t begin = c * chunk;
      (*body)(begin, std::min(units, begin + chunk));
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min(threads, chunks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule(decltype(work)(work));  // a copy per task
  work();
  // Only chunks already running on helpers remain; they finish without waiting on anything.
  while (state->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

// As ParallelFor, for work whose units lie in memory in order (decode attention's chunks of a
// kv head's slots): each thread starts on its own contiguous share of [0, units), one unit at a
// time, so that its loads form one stream the hardware and the kernel's look-ahead can follow,
// rather than every thread taking every other few units. A thread whose share is done takes
// units from the shares after it, so a slow or absent thread delays only the unit it holds, and
// the call finishes with the caller alone.
template <typename Fn>
void ParallelForInOrder(xla::ffi::ThreadPool& pool, int64_t units, const Fn& fn) {
  const int64_t threads = std::min<int64_t>(std::max<int64_t>(1, pool.num_threads()), units);
  if (threads <= 1) {
    if (units > 0) fn(int64_t{0}, units);
    return;
  }
  struct State {
    explicit State(int64_t shares) : next(new std::atomic<int64_t>[shares]) {}
    std::unique_ptr<std::atomic<int64_t>[]> next;  // per share: its next unit
    std::atomic<int64_t> arrived{0};               // participants so far (the caller is 0)
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>(threads);
  const auto share_begin = [units, threads](int64_t share) { return share * units / threads; };
  for (int64_t share = 0; share < threads; ++share) state->next[share].store(share_begin(share));
  const Fn* body = &fn;
  auto work = [state, body, units, threads, share_begin]() {
    const int64_t me = state->arrived.fetch_add(1);
    for (int64_t k = 0; k < threads; ++k) {
      const int64_t share = (me + k) % threads, end = share_begin(share + 1);
      for (int64_t u; (u = state->next[share].fetch_add(1)) < end;) {
        (*body)(u, u + 1);
        state->done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  for (int64_t i = 0; i < threads - 1; ++i) pool.Schedule(decltype(work)(work));
  work();
  while (state->done.load(std::memory_order_acquire) < units) std::this_thread::yield();
}

}  // namespace bitnet

#endif  // BITNET_JAX_XLA_FFI_PARALLEL_H_
