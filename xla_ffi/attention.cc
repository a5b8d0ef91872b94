// bitnet_decode_attention: grouped-query attention of a decode step's or a prefill chunk's
// queries over the stacked KV cache, read in place.
//
//   q           f32 [B, T, N, H]       queries (N = K * G: query head n reads kv head n / G)
//   k_cache     f32 [L, Bc, K, S, H]   the whole stacked cache; only layer `layer` is read
//   v_cache     f32 [L, Bc, K, S, H]
//   layer       int32 []               in [0, L)
//   positions   int32 [B, T]           query (b, t) attends slots 0..positions[b, t] (< P * S) of
//                                      its row; a negative position gives zeros
//   pages       int32 [B, P]           where query row b's slots are: slot s is slot s % S of cache
//                                      row pages[b, s / S], in [0, Bc). P = 1: one cache row per
//                                      query row (a server that runs only some of its rows passes
//                                      theirs); P > 1: a paged cache, pages of S slots (S a
//                                      multiple of kAttentionChunk, so no chunk spans two pages)
//   -> out      f32 [B, T, N, H]       softmax_s((q . k_s) * H^-0.5) weighting v_s
//
// bitnet_decode_attention_i8 reads an int8 cache, a quarter of the bytes, with a float scale per
// slot and kv head (slot s of kv head k holds k_scale[.., k, s] * k_cache[.., k, s, :]):
//   k_cache, v_cache   s8  [L, Bc, K, S, H]
//   k_scale, v_scale   f32 [L, Bc, K, S]
// and the other operands as above; its arithmetic is AttendChunkInt8's (attention_kernel.h).
//
// The alternative in XLA ops slices the layer out of the stack (a copy of every slot, at every
// step) and attends to all S slots under a mask; this reads only the filled slots of the rows
// asked for, each key and value row once for the G query heads that share it.
//
// Work is split on XLA's intra-op pool over (query, kv head) outputs where there are enough of
// them for the threads (prefill chunks, batches), a task computing an output's chunks of
// kAttentionChunk slots and merging their partial softmaxes in slot order (attention_kernel.h);
// otherwise (a decode step of a row or two) over (query, kv head, chunk), each chunk's partial to
// its own slot of a buffer, and a second pass merges each output's partials in slot order. Both
// run the same arithmetic on the same chunks. Nothing in a row's arithmetic depends on
// the batch, the other rows' positions or the threads, so a row's output is the same bits alone
// or in any batch (what the batching server's invariance rests on), and the same whether its slots
// lie in one cache row or in pages of whole chunks anywhere in the cache.
//
// Shapes, the layer, positions and cache rows are checked; a bad one is an error (a Python
// exception at the call site), never an out-of-bounds read.

#include "attention.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "attention_kernel.h"
#include "cpu_isa.h"
#include "ffi_util.h"
#include "parallel.h"

namespace ffi = xla::ffi;

namespace bitnet {
namespace {

// (query, kv head) outputs per parallel task of the merge: each is only G * H * chunks flops.
constexpr int64_t kMinMergesPerTask = 16;

// (query, kv head) outputs per thread from which a task is a whole output, all its chunks, rather
// than one chunk: enough tasks for the threads to share them evenly.
constexpr int64_t kMinHeadTasksPerThread = 4;

// Queries of a batch row per thread from which the threads transpose the row's keys for them
// (TransposeKeysInt8: where AttendChunkInt8 reads them, ReadsTransposedKeys). A thread transposes
// a kv head's keys once for the queries it takes, at about the cost of attending one query, and
// each query then scores ~10% faster: on the Zen 4, 2 threads, 2048 slots, from 8 queries a row
// (a thread's 4) to 64, the transposing took 1.20, 1.04, 0.95 and 0.93x the time of not
// transposing; a decode step's one query a row (alone, or a batch of them) had taken 1.9x
// (benchmarks/RESULTS.md).
constexpr int64_t kMinQueriesPerTransposition = 16;

ffi::Error Invalid(const std::string& message) {
  return ffi::Error::InvalidArgument("bitnet_decode_attention: " + message);
}

using Dims = ffi::AnyBuffer::Dimensions;

bool SameDims(Dims a, Dims b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
}

// Chunk `chunk` of query `query` (= b * T + t) against kv head `kv_head`.
struct WorkItem {
  int64_t query;
  int64_t kv_head;
  int64_t chunk;
};

// A call's work items and partials. Work items run query-major, then kv head, then chunk, so
// that the partials of one (query, kv head) are adjacent and in slot order.
struct Plan {
  std::vector<WorkItem> items;
  std::vector<int64_t> chunks;      // per query
  std::vector<int64_t> first_item;  // per query
  std::vector<float> partials;      // per item, PartialFloats(G, H) floats
};

// Storage per handler thread, reused (a fresh allocation per call costs page faults, as in
// matmul.cc). The parallel bodies run on pool threads too, so they use the pointer returned on the
// handler's thread: a thread_local named inside them would be their own thread's, empty, copy.
Plan* ThreadPlan() {
  thread_local Plan plan;
  return &plan;
}

// A thread's transposed keys (TransposeKeysInt8) of one (batch row, kv head) in one call, chunk
// by chunk as its queries reach them. Kept from one of the thread's parallel chunks of tasks to
// its next, so that the queries of a kv head, split over several chunks, find the keys their
// thread transposed for the chunks before; `call` tells calls apart (between two, the layer and
// the cache's contents change).
struct TransposedKeys {
  uint64_t call = 0;
  int64_t row = -1, head = -1, chunks = 0;
  std::vector<int16_t> keys;
};

std::atomic<uint64_t> next_call{1};

// The sizes of a call, from its operands' shapes.
struct Sizes {
  int64_t b, t, n, h;           // queries [B, T, N, H]
  int64_t layers, rows, kv, s;  // caches [L, Bc, K, S, H]
  int64_t pages;                // pages per query row, P
};

ffi::Error CheckShapes(Dims q_dims, Dims c_dims, Dims v_dims, Dims layer_dims, Dims p_dims, Dims r_dims,
                       Dims out_dims, const Dims* scale_dims, Sizes* z) {
  if (q_dims.size() != 4) return Invalid("expected queries q [B, T, N, H], got shape " + ShapeString(q_dims));
  if (c_dims.size() != 5) {
    return Invalid("expected the stacked cache k_cache [L, B, K, S, H], got shape " + ShapeString(c_dims));
  }
  if (!SameDims(v_dims, c_dims)) {
    return Invalid("v_cache " + ShapeString(v_dims) + " must have the shape of k_cache " + ShapeString(c_dims));
  }
  *z = {q_dims[0], q_dims[1], q_dims[2], q_dims[3], c_dims[0], c_dims[1], c_dims[2], c_dims[3]};
  if (c_dims[4] != z->h) {
    return Invalid("the cache's head dim " + std::to_string(c_dims[4]) + " differs from the queries' " +
                   std::to_string(z->h) + " (q " + ShapeString(q_dims) + ", cache " + ShapeString(c_dims) + ")");
  }
  if (z->kv < 1 || z->n % z->kv != 0) {
    return Invalid("the queries' " + std::to_string(z->n) + " heads are not a multiple of the cache's " +
                   std::to_string(z->kv) + " kv heads");
  }
  if (scale_dims != nullptr) {  // the int8 cache's k_scale, v_scale: [L, Bc, K, S]
    for (int i = 0; i < 2; ++i) {
      const Dims d = scale_dims[i];
      if (d.size() != 4 || !std::equal(d.begin(), d.end(), c_dims.begin())) {
        return Invalid(std::string(i == 0 ? "k_scale " : "v_scale ") + ShapeString(d) +
                       " must be the cache's shape without the head dim, [L, B, K, S] of " + ShapeString(c_dims));
      }
    }
  }
  if (!SameDims(out_dims, q_dims)) {
    return Invalid("the output must have the shape of q " + ShapeString(q_dims) + ", got " + ShapeString(out_dims));
  }
  if (layer_dims.size() != 0) return Invalid("expected a scalar int32 layer, got shape " + ShapeString(layer_dims));
  if (p_dims.size() != 2 || p_dims[0] != z->b || p_dims[1] != z->t) {
    return Invalid("expected positions int32 [B, T] = [" + std::to_string(z->b) + ", " + std::to_string(z->t) +
                   "], got shape " + ShapeString(p_dims));
  }
  if (r_dims.size() != 2 || r_dims[0] != z->b || r_dims[1] < 1) {
    return Invalid("expected pages int32 [B, P] = [" + std::to_string(z->b) + ", P >= 1], got shape " +
                   ShapeString(r_dims));
  }
  z->pages = r_dims[1];
  if (z->pages > 1 && z->s % kAttentionChunk != 0) {
    return Invalid("a paged cache needs pages of a multiple of " + std::to_string(kAttentionChunk) +
                   " slots (the kernel's chunk), got " + std::to_string(z->s) + " (cache " + ShapeString(c_dims) +
                   ", pages " + ShapeString(r_dims) + ")");
  }
  return ffi::Error::Success();
}

// The indices the kernel reads memory at: the layer, each query's last slot and the pages up to it.
ffi::Error CheckIndices(int64_t layer, const int32_t* positions, const int32_t* pages, const Sizes& z) {
  if (layer < 0 || layer >= z.layers) {
    return Invalid("layer " + std::to_string(layer) + " is outside the cache's " + std::to_string(z.layers) +
                   " layers");
  }
  const int64_t row_slots = z.pages * z.s;
  for (int64_t i = 0; i < z.b * z.t; ++i) {
    if (positions[i] >= row_slots) {
      return Invalid("position " + std::to_string(positions[i]) + " of query [" + std::to_string(i / z.t) + ", " +
                     std::to_string(i % z.t) + "] is past its row's " + std::to_string(row_slots) +
                     " slots: a query attends slots 0..position, so position must be < " + std::to_string(row_slots));
    }
  }
  for (int64_t i = 0; i < z.b; ++i) {
    for (int64_t p = 0; p < z.pages; ++p) {
      const int32_t row = pages[i * z.pages + p];
      if (row < 0 || row >= z.rows) {
        return Invalid("pages[" + std::to_string(i) + ", " + std::to_string(p) + "] = " + std::to_string(row) +
                       " is outside the cache's " + std::to_string(z.rows) + " rows");
      }
    }
  }
  return ffi::Error::Success();
}

// The caches' element type T: float, or int8_t with per-slot scales (k_scale, v_scale: null for float).
template <typename T>
ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, const T* k_data, const T* v_data,
                           const float* k_scale, const float* v_scale, const Sizes& z, const int32_t* positions,
                           const int32_t* pages, int64_t layer, ffi::Result<ffi::Buffer<ffi::F32>> out) {
  if (auto e = CheckIndices(layer, positions, pages, z); e.failure()) return e;
  const int64_t b = z.b, t = z.t, n = z.n, h = z.h, rows = z.rows, kv = z.kv, s = z.s;
  Isa isa;
  std::string isa_error;
  if (!SelectIsa(&isa, &isa_error)) return Invalid(isa_error);
  // The float cache's 512-bit kernels only widen the arithmetic: where the CPU splits 512-bit
  // operations in two, the AVX2 ones are faster (attention_kernel.cc). The int8 cache's VNNI
  // kernel halves the instructions as well, and is the faster on every AVX-512 CPU measured.
  if (std::is_same_v<T, float> && isa == Isa::kAvx512Vnni && !CpuRuns512AtFullWidth()) isa = Isa::kAvx2;
  if (b * t * n * h == 0) return ffi::Error::Success();

  const int64_t g = n / kv;
  const int64_t partial_floats = PartialFloats(g, h);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(h)));
  const float* q_data = q.typed_data();
  float* out_data = out->typed_data();
  const int64_t layer_slots = layer * rows * kv * s;  // the layer's first slot, in slots
  const T* k_layer = k_data + layer_slots * h;
  const T* v_layer = v_data + layer_slots * h;
  auto chunks_of = [&](int64_t query) { return positions[query] < 0 ? 0 : positions[query] / kAttentionChunk + 1; };
  // The first slot of chunk `chunk` of batch row `batch_row` and kv head `kv_head`, within the layer.
  auto chunk_slot = [&](int64_t batch_row, int64_t kv_head, int64_t chunk) {
    const int64_t first_slot = chunk * kAttentionChunk;
    return (pages[batch_row * z.pages + first_slot / s] * kv + kv_head) * s + first_slot % s;
  };
  // An int8 cache: the int16 codes of `query`'s heads on `kv_head` into scratch, once for all the
  // chunks that query reads there (false: it takes the float arithmetic; always false for a float
  // cache, which has no codes).
  auto code_query = [&](int64_t query, int64_t kv_head, float* scratch) {
    if constexpr (std::is_same_v<T, int8_t>) {
      return CodeQueriesInt16(isa, q_data + (query * n + kv_head * g) * h, g, h, scratch);
    } else {
      return false;
    }
  };
  // An int8 cache: kt holding the keys of `batch_row`'s `kv_head` in call `call` transposed, up to
  // its first `chunks` chunks (TransposedKeys: only the chunks it lacks are transposed now).
  auto transpose_keys = [&](uint64_t call, int64_t batch_row, int64_t kv_head, int64_t chunks, TransposedKeys& kt) {
    if constexpr (std::is_same_v<T, int8_t>) {
      if (kt.call != call || kt.row != batch_row || kt.head != kv_head) {
        kt.call = call;
        kt.row = batch_row;
        kt.head = kv_head;
        kt.chunks = 0;
      }
      const int64_t elements = TransposedKeysElements(h);
      if (static_cast<int64_t>(kt.keys.size()) < chunks * elements) kt.keys.resize(chunks * elements);
      for (; kt.chunks < chunks; ++kt.chunks) {  // the chunk's slots that lie in the cache's row
        const int64_t first = kt.chunks * kAttentionChunk;
        TransposeKeysInt8(isa, k_layer + chunk_slot(batch_row, kv_head, kt.chunks) * h,
                          std::min<int64_t>(kAttentionChunk, s - first % s), h, kt.keys.data() + kt.chunks * elements);
      }
    } else {
      (void)call, (void)batch_row, (void)kv_head, (void)chunks, (void)kt;
    }
  };
  // The partial softmax of chunk `chunk` of `query` against `kv_head`: every task's arithmetic
  // (int8 cache only: kt, the chunk's keys transposed, or null; coded, what code_query returned
  // for this query and kv head into this scratch).
  auto attend = [&](int64_t query, int64_t kv_head, int64_t chunk, float* scratch, float* partial,
                    const int16_t* kt, bool coded) {
    const int64_t slots = std::min<int64_t>(kAttentionChunk, positions[query] + 1 - chunk * kAttentionChunk);
    const int64_t slot = chunk_slot(query / t, kv_head, chunk);
    const float* q_gh = q_data + (query * n + kv_head * g) * h;
    if constexpr (std::is_same_v<T, int8_t>) {
      AttendChunkInt8(isa, q_gh, g, h, k_layer + slot * h, v_layer + slot * h, k_scale + layer_slots + slot,
                      v_scale + layer_slots + slot, slots, scale, scratch, partial, kt, coded);
    } else {
      (void)kt, (void)coded;
      AttendChunk(isa, q_gh, g, h, k_layer + slot * h, v_layer + slot * h, slots, scale, scratch, partial);
    }
  };

  const int64_t heads = b * t * kv;  // (query, kv head) outputs
  if (heads >= kMinHeadTasksPerThread * std::max<int64_t>(1, pool.num_threads())) {
    // Enough outputs to keep every thread busy (prefill chunks, batches): a task computes one
    // output's chunks in slot order, into its thread's buffer, and merges them. Tasks go kv head
    // by kv head, a batch row's queries in order, so that a thread's run of tasks shares one
    // (batch row, kv head): on AVX-512 VNNI over an int8 cache, where a row has enough queries
    // (kMinQueriesPerTransposition), the thread transposes those keys chunk by chunk as its
    // queries first reach them (TransposeKeysInt8, kept in TransposedKeys from one of its chunks
    // of tasks to the next), and every query it takes there computes its scores from them. Each
    // output's arithmetic is the same whichever thread computes it, in whatever order, from
    // transposed keys or not.
    const bool transposed = std::is_same_v<T, int8_t> && ReadsTransposedKeys(isa, h) &&
                            t >= kMinQueriesPerTransposition * std::max<int64_t>(1, pool.num_threads());
    const int64_t kt_elements = TransposedKeysElements(h);
    const uint64_t call = next_call.fetch_add(1, std::memory_order_relaxed);
    ParallelFor(pool, heads, 1, [&](int64_t begin, int64_t end) {
      thread_local std::vector<float> scratch, partials;
      thread_local TransposedKeys kt;
      scratch.resize(ScratchFloats(g, h));
      for (int64_t i = begin; i < end; ++i) {
        const int64_t query = i % (b * t), kh = i / (b * t), chunks = chunks_of(query);
        float* out_gh = out_data + (query * n + kh * g) * h;
        if (chunks == 0) {
          std::fill(out_gh, out_gh + g * h, 0.0f);
          continue;
        }
        if (transposed) transpose_keys(call, query / t, kh, chunks, kt);
        partials.resize(chunks * partial_floats);
        const bool coded = code_query(query, kh, scratch.data());
        for (int64_t c = 0; c < chunks; ++c) {
          attend(query, kh, c, scratch.data(), partials.data() + c * partial_floats,
                 transposed ? kt.keys.data() + c * kt_elements : nullptr, coded);
        }
        MergeChunks(partials.data(), chunks, g, h, out_gh);
      }
    });
    return ffi::Error::Success();
  }

  // A few outputs (a decode step of one or two rows): a task per chunk, so that one output's
  // chunks spread over the threads, each partial to its own slot of a buffer; a second pass
  // merges each output's partials in slot order.
  Plan* plan = ThreadPlan();
  plan->items.clear();
  plan->chunks.assign(b * t, 0);
  plan->first_item.assign(b * t, 0);
  for (int64_t i = 0; i < b * t; ++i) {
    const int64_t chunks = chunks_of(i);
    plan->chunks[i] = chunks;
    plan->first_item[i] = static_cast<int64_t>(plan->items.size());
    for (int64_t kh = 0; kh < kv; ++kh) {
      for (int64_t c = 0; c < chunks; ++c) plan->items.push_back({i, kh, c});
    }
  }
  plan->partials.resize(plan->items.size() * partial_floats);
  ParallelForInOrder(pool, static_cast<int64_t>(plan->items.size()), [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> scratch;
    scratch.resize(ScratchFloats(g, h));
    int64_t coded_query = -1, coded_head = -1;  // whose codes scratch holds (a run's items share them)
    bool coded = false;
    for (int64_t i = begin; i < end; ++i) {
      const WorkItem& w = plan->items[i];
      if (w.query != coded_query || w.kv_head != coded_head) {
        coded = code_query(w.query, w.kv_head, scratch.data());
        coded_query = w.query;
        coded_head = w.kv_head;
      }
      attend(w.query, w.kv_head, w.chunk, scratch.data(), plan->partials.data() + i * partial_floats, nullptr, coded);
    }
  });
  ParallelFor(pool, heads, kMinMergesPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t query = i / kv, kh = i % kv;
      float* out_gh = out_data + (query * n + kh * g) * h;
      const int64_t chunks = plan->chunks[query];
      if (chunks == 0) {
        std::fill(out_gh, out_gh + g * h, 0.0f);
      } else {
        const float* first = plan->partials.data() + (plan->first_item[query] + kh * chunks) * partial_floats;
        MergeChunks(first, chunks, g, h, out_gh);
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error DecodeAttentionF32(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_cache,
                              ffi::Buffer<ffi::F32> v_cache, ffi::Buffer<ffi::S32> layer,
                              ffi::Buffer<ffi::S32> positions, ffi::Buffer<ffi::S32> pages,
                              ffi::Result<ffi::Buffer<ffi::F32>> out) {
  Sizes z;
  if (auto e = CheckShapes(q.dimensions(), k_cache.dimensions(), v_cache.dimensions(), layer.dimensions(),
                           positions.dimensions(), pages.dimensions(), out->dimensions(), nullptr, &z);
      e.failure()) {
    return e;
  }
  return DecodeAttention<float>(pool, q, k_cache.typed_data(), v_cache.typed_data(), nullptr, nullptr, z,
                                positions.typed_data(), pages.typed_data(), layer.typed_data()[0], out);
}

ffi::Error DecodeAttentionI8(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::S8> k_cache,
                             ffi::Buffer<ffi::S8> v_cache, ffi::Buffer<ffi::F32> k_scale, ffi::Buffer<ffi::F32> v_scale,
                             ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> positions,
                             ffi::Buffer<ffi::S32> pages, ffi::Result<ffi::Buffer<ffi::F32>> out) {
  Sizes z;
  const Dims scale_dims[2] = {k_scale.dimensions(), v_scale.dimensions()};
  if (auto e = CheckShapes(q.dimensions(), k_cache.dimensions(), v_cache.dimensions(), layer.dimensions(),
                           positions.dimensions(), pages.dimensions(), out->dimensions(), scale_dims, &z);
      e.failure()) {
    return e;
  }
  return DecodeAttention<int8_t>(pool, q, k_cache.typed_data(), v_cache.typed_data(), k_scale.typed_data(),
                                 v_scale.typed_data(), z, positions.typed_data(), pages.typed_data(),
                                 layer.typed_data()[0], out);
}

}  // namespace
}  // namespace bitnet

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    BitnetDecodeAttention, bitnet::DecodeAttentionF32,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()
        .Arg<ffi::Buffer<ffi::F32>>()    // q: queries [B, T, N, H]
        .Arg<ffi::Buffer<ffi::F32>>()    // k_cache: the stacked key cache [L, Bc, K, S, H], read in place
        .Arg<ffi::Buffer<ffi::F32>>()    // v_cache: the stacked value cache, k_cache's shape
        .Arg<ffi::Buffer<ffi::S32>>()    // layer: int32 scalar, the layer of the caches to read
        .Arg<ffi::Buffer<ffi::S32>>()    // positions: int32 [B, T], the last slot each query attends
        .Arg<ffi::Buffer<ffi::S32>>()    // pages: int32 [B, P], the cache rows of each query row's slots
        .Ret<ffi::Buffer<ffi::F32>>());  // out: [B, T, N, H]

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    BitnetDecodeAttentionI8, bitnet::DecodeAttentionI8,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()
        .Arg<ffi::Buffer<ffi::F32>>()    // q: queries [B, T, N, H]
        .Arg<ffi::Buffer<ffi::S8>>()     // k_cache: the stacked int8 key cache [L, Bc, K, S, H], read in place
        .Arg<ffi::Buffer<ffi::S8>>()     // v_cache: the stacked int8 value cache, k_cache's shape
        .Arg<ffi::Buffer<ffi::F32>>()    // k_scale: [L, Bc, K, S], each slot's key scale
        .Arg<ffi::Buffer<ffi::F32>>()    // v_scale: [L, Bc, K, S], each slot's value scale
        .Arg<ffi::Buffer<ffi::S32>>()    // layer: int32 scalar, the layer of the caches to read
        .Arg<ffi::Buffer<ffi::S32>>()    // positions: int32 [B, T], the last slot each query attends
        .Arg<ffi::Buffer<ffi::S32>>()    // pages: int32 [B, P], the cache rows of each query row's slots
        .Ret<ffi::Buffer<ffi::F32>>());  // out: [B, T, N, H]
