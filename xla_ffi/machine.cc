// This machine's limits, measured by the benchmarks in their own run (bitnet_jax/bench/machine.py):
//
//   bitnet_read_bandwidth  buffer u8 [n] -> seconds f32 [P], checksum u32 [P, 2]
//                          reads the whole buffer P times on `threads` threads (contiguous
//                          ranges, one per thread), with the vector loads of the selected path,
//                          fetching each thread's stream `read_ahead` bytes ahead into L2 (0: the
//                          hardware prefetcher alone); seconds[p] is pass p's wall time,
//                          checksum[p] the sum of the bytes (mod 2^64, as low and high 32-bit
//                          words), which proves every byte was read.
//   bitnet_int8_peak       -> seconds f32 [P], checksum u32 [P, 2], macs u32 [2]
//                          runs Int8PeakLoop(`iterations`, a, b) on each of `threads` threads, P
//                          times; checksum[p] is the sum of the threads' results (int64 as two
//                          words), macs the multiply-adds of one thread's loop (uint64, two words).
//
// The path is the kernels' (SelectIsa: BITNET_JAX_ISA, else the widest), so a benchmark can set
// it per measurement as it does for the kernels. Threads come from XLA's intra-op pool, as the
// kernels' do (parallel.h). Times are taken here, around each pass, so no dispatch is in them.

#include "machine.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <initializer_list>
#include <string>

#include "cpu_isa.h"
#include "ffi_util.h"
#include "parallel.h"
#include "prefetch.h"
#include "xla/ffi/api/ffi.h"

#if BITNET_JAX_X86_SIMD
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace bitnet {

namespace {

// ---------------------------------------------------------------------------------------------
// Scalar twins.

// Eight bytes at a time: the even and odd bytes of each word add into 16-bit lanes of two
// accumulators, folded into the total every 256 words (256 * 255 < 2^16: no lane overflows).
uint64_t SumBytesScalar(const uint8_t* p, int64_t n) {
  constexpr uint64_t kEvenBytes = 0x00FF00FF00FF00FFull;
  const auto fold = [](uint64_t lanes) {
    return (lanes & 0xFFFF) + ((lanes >> 16) & 0xFFFF) + ((lanes >> 32) & 0xFFFF) + (lanes >> 48);
  };
  uint64_t total = 0;
  int64_t i = 0;
  while (n - i >= 8) {
    const int64_t words = std::min<int64_t>(256, (n - i) / 8);
    uint64_t even = 0, odd = 0;
    for (int64_t w = 0; w < words; ++w) {
      uint64_t v;
      std::memcpy(&v, p + i + 8 * w, 8);
      even += v & kEvenBytes;
      odd += (v >> 8) & kEvenBytes;
    }
    total += fold(even) + fold(odd);
    i += 8 * words;
  }
  for (; i < n; ++i) total += p[i];
  return total;
}

// The scalar kernels' multiply-add (int32 += int8 * int8) on 4 independent accumulators. The
// empty asm at the end of each round tells the compiler that `x` and the accumulators may have
// changed in their registers: it can neither hoist the products out of the loop, nor replace the
// loop by its closed form, nor turn the accumulators into a vector. Unsigned arithmetic: the
// accumulators wrap mod 2^32 instead of overflowing.
constexpr int kScalarAccumulators = 4;

int64_t PeakScalar(int64_t iterations, uint8_t a, int8_t b, int64_t* macs) {
  const auto operand = [b](int u) { return static_cast<uint32_t>(static_cast<int8_t>(b + u)); };
  const uint32_t b0 = operand(0), b1 = operand(1), b2 = operand(2), b3 = operand(3);
  uint32_t x = a, acc0 = 0, acc1 = 0, acc2 = 0, acc3 = 0;
  for (int64_t i = 0; i < iterations; ++i) {
    acc0 += x * b0;
    acc1 += x * b1;
    acc2 += x * b2;
    acc3 += x * b3;
    asm("" : "+r"(x), "+r"(acc0), "+r"(acc1), "+r"(acc2), "+r"(acc3));
  }
  *macs = iterations * kScalarAccumulators;
  int64_t sum = 0;
  for (const uint32_t acc : {acc0, acc1, acc2, acc3}) sum += static_cast<int32_t>(acc);
  return sum;
}

}  // namespace

#if BITNET_JAX_X86_SIMD

namespace {

#define BITNET_AVX2 __attribute__((target("avx2,fma")))
#define BITNET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

// ---------------------------------------------------------------------------------------------
// AVX2

// 128 bytes per round in four 32-byte loads; vpsadbw against zero sums each 8 bytes into a
// 64-bit lane (one cheap instruction per load: DRAM, not the adds, sets the pace). With
// read_ahead > 0 the stream is fetched that far ahead into L2, as the kernels fetch theirs.
BITNET_AVX2 uint64_t SumBytesAvx2(const uint8_t* p, int64_t n, int64_t read_ahead) {
  const __m256i zero = _mm256_setzero_si256();
  __m256i s[4] = {zero, zero, zero, zero};
  int64_t i = 0;
  for (; n - i >= 128; i += 128) {
    if (read_ahead > 0) {
      PrefetchL2At(p, i + read_ahead);
      PrefetchL2At(p, i + read_ahead + 64);
    }
    for (int j = 0; j < 4; ++j) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 32 * j));
      s[j] = _mm256_add_epi64(s[j], _mm256_sad_epu8(v, zero));
    }
  }
  const __m256i t = _mm256_add_epi64(_mm256_add_epi64(s[0], s[1]), _mm256_add_epi64(s[2], s[3]));
  alignas(32) uint64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), t);
  return lanes[0] + lanes[1] + lanes[2] + lanes[3] + SumBytesScalar(p + i, n - i);
}

// The ternary AVX2 kernel's inner loop (gemm_x86.cc, TernaryRowAvx2): vpmaddubsw (u8 x s8, pairs
// summed into int16) added into int16 partial sums, widened every 8 steps with vpmaddwd against
// ones into int32. One round: 8 steps x 4 accumulators x 32 multiply-adds. Each step is written
// in assembly (AT&T order: vpmaddubsw s8, u8, dst), so that the compiler can neither compute a
// product once for all steps nor reorder the sums into a tree that spills registers.
constexpr int kAvx2Accumulators = 4;
constexpr int kAvx2Steps = 8;

BITNET_AVX2 int64_t PeakAvx2(int64_t iterations, uint8_t a, int8_t b, int64_t* macs) {
  const __m256i av = _mm256_set1_epi8(static_cast<char>(a));
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i b0 = _mm256_set1_epi8(static_cast<char>(b)), b1 = _mm256_set1_epi8(static_cast<char>(b + 1));
  const __m256i b2 = _mm256_set1_epi8(static_cast<char>(b + 2)), b3 = _mm256_set1_epi8(static_cast<char>(b + 3));
  __m256i acc0 = _mm256_setzero_si256(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
  for (int64_t i = 0; i < iterations; ++i) {
    __m256i p0 = _mm256_setzero_si256(), p1 = p0, p2 = p0, p3 = p0, t;
    for (int s = 0; s < kAvx2Steps; ++s) {
      asm("vpmaddubsw %[b0], %[a], %[t]\n\t"
          "vpaddw %[t], %[p0], %[p0]\n\t"
          "vpmaddubsw %[b1], %[a], %[t]\n\t"
          "vpaddw %[t], %[p1], %[p1]\n\t"
          "vpmaddubsw %[b2], %[a], %[t]\n\t"
          "vpaddw %[t], %[p2], %[p2]\n\t"
          "vpmaddubsw %[b3], %[a], %[t]\n\t"
          "vpaddw %[t], %[p3], %[p3]"
          : [p0] "+x"(p0), [p1] "+x"(p1), [p2] "+x"(p2), [p3] "+x"(p3), [t] "=&x"(t)
          : [a] "x"(av), [b0] "x"(b0), [b1] "x"(b1), [b2] "x"(b2), [b3] "x"(b3));
    }
    acc0 = _mm256_add_epi32(acc0, _mm256_madd_epi16(p0, ones));
    acc1 = _mm256_add_epi32(acc1, _mm256_madd_epi16(p1, ones));
    acc2 = _mm256_add_epi32(acc2, _mm256_madd_epi16(p2, ones));
    acc3 = _mm256_add_epi32(acc3, _mm256_madd_epi16(p3, ones));
  }
  *macs = iterations * kAvx2Steps * kAvx2Accumulators * 32;
  int64_t sum = 0;
  alignas(32) int32_t lanes[8];
  for (const __m256i acc : {acc0, acc1, acc2, acc3}) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc);
    for (int32_t lane : lanes) sum += lane;
  }
  return sum;
}

// ---------------------------------------------------------------------------------------------
// AVX-512 VNNI

BITNET_AVX512 uint64_t SumBytesAvx512(const uint8_t* p, int64_t n, int64_t read_ahead) {
  const __m512i zero = _mm512_setzero_si512();
  __m512i s[4] = {zero, zero, zero, zero};
  int64_t i = 0;
  for (; n - i >= 256; i += 256) {
    for (int j = 0; j < 4; ++j) {
      if (read_ahead > 0) PrefetchL2At(p, i + read_ahead + 64 * j);
      const __m512i v = _mm512_loadu_si512(p + i + 64 * j);
      s[j] = _mm512_add_epi64(s[j], _mm512_sad_epu8(v, zero));
    }
  }
  const __m512i t = _mm512_add_epi64(_mm512_add_epi64(s[0], s[1]), _mm512_add_epi64(s[2], s[3]));
  alignas(64) uint64_t lanes[8];
  _mm512_store_si512(lanes, t);
  uint64_t total = SumBytesScalar(p + i, n - i);
  for (uint64_t lane : lanes) total += lane;
  return total;
}

// The VNNI kernels' instruction: vpdpbusd (u8 x s8, 4-way sums into int32; AT&T order:
// vpdpbusd s8, u8, acc), on 12 independent accumulators (enough to cover its latency at two per
// cycle), one round in one asm block so that every accumulator stays in a register.
constexpr int kAvx512Accumulators = 12;

BITNET_AVX512 int64_t PeakAvx512(int64_t iterations, uint8_t a, int8_t b, int64_t* macs) {
  const __m512i av = _mm512_set1_epi8(static_cast<char>(a));
  __m512i bv[kAvx512Accumulators];
  for (int u = 0; u < kAvx512Accumulators; ++u) bv[u] = _mm512_set1_epi8(static_cast<char>(b + u));
  __m512i c0 = _mm512_setzero_si512(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0;
  __m512i c6 = c0, c7 = c0, c8 = c0, c9 = c0, c10 = c0, c11 = c0;
  for (int64_t i = 0; i < iterations; ++i) {
    // Two blocks of six: GCC takes at most 30 operands per asm, and a "+v" counts twice.
    asm("vpdpbusd %[b0], %[a], %[c0]\n\t"
        "vpdpbusd %[b1], %[a], %[c1]\n\t"
        "vpdpbusd %[b2], %[a], %[c2]\n\t"
        "vpdpbusd %[b3], %[a], %[c3]\n\t"
        "vpdpbusd %[b4], %[a], %[c4]\n\t"
        "vpdpbusd %[b5], %[a], %[c5]"
        : [c0] "+v"(c0), [c1] "+v"(c1), [c2] "+v"(c2), [c3] "+v"(c3), [c4] "+v"(c4), [c5] "+v"(c5)
        : [a] "v"(av), [b0] "v"(bv[0]), [b1] "v"(bv[1]), [b2] "v"(bv[2]), [b3] "v"(bv[3]), [b4] "v"(bv[4]),
          [b5] "v"(bv[5]));
    asm("vpdpbusd %[b6], %[a], %[c6]\n\t"
        "vpdpbusd %[b7], %[a], %[c7]\n\t"
        "vpdpbusd %[b8], %[a], %[c8]\n\t"
        "vpdpbusd %[b9], %[a], %[c9]\n\t"
        "vpdpbusd %[b10], %[a], %[c10]\n\t"
        "vpdpbusd %[b11], %[a], %[c11]"
        : [c6] "+v"(c6), [c7] "+v"(c7), [c8] "+v"(c8), [c9] "+v"(c9), [c10] "+v"(c10), [c11] "+v"(c11)
        : [a] "v"(av), [b6] "v"(bv[6]), [b7] "v"(bv[7]), [b8] "v"(bv[8]), [b9] "v"(bv[9]), [b10] "v"(bv[10]),
          [b11] "v"(bv[11]));
  }
  *macs = iterations * kAvx512Accumulators * 64;
  int64_t sum = 0;
  alignas(64) int32_t lanes[16];
  for (const __m512i c : {c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11}) {
    _mm512_store_si512(lanes, c);
    for (int32_t lane : lanes) sum += lane;
  }
  return sum;
}

}  // namespace

uint64_t SumBytes(Isa isa, const uint8_t* p, int64_t n, int64_t read_ahead) {
  switch (isa) {
    case Isa::kAvx2: return SumBytesAvx2(p, n, read_ahead);
    case Isa::kAvx512Vnni: return SumBytesAvx512(p, n, read_ahead);
    default: return SumBytesScalar(p, n);  // kScalar, and paths of other CPUs
  }
}

int64_t Int8PeakLoop(Isa isa, int64_t iterations, uint8_t a, int8_t b, int64_t* macs) {
  switch (isa) {
    case Isa::kAvx2: return PeakAvx2(iterations, a, b, macs);
    case Isa::kAvx512Vnni: return PeakAvx512(iterations, a, b, macs);
    default: return PeakScalar(iterations, a, b, macs);
  }
}

const char* Int8PeakInstruction(Isa isa) {
  switch (isa) {
    case Isa::kAvx2: return "vpmaddubsw ymm (+ vpaddw, vpmaddwd)";
    case Isa::kAvx512Vnni: return "vpdpbusd zmm";
    default: return "scalar multiply-add";
  }
}

#else  // !BITNET_JAX_X86_SIMD

const char* Int8PeakInstruction(Isa) { return "scalar multiply-add"; }

uint64_t SumBytes(Isa, const uint8_t* p, int64_t n, int64_t) { return SumBytesScalar(p, n); }

int64_t Int8PeakLoop(Isa, int64_t iterations, uint8_t a, int8_t b, int64_t* macs) {
  return PeakScalar(iterations, a, b, macs);
}

#endif  // BITNET_JAX_X86_SIMD

namespace {

// Read ranges are whole multiples of this (the last one excepted), so threads split on pages.
constexpr int64_t kReadBlock = 4096;

ffi::Error Invalid(const std::string& op, const std::string& message) {
  return ffi::Error::InvalidArgument(op + ": " + message);
}

ffi::Error CheckThreads(const std::string& op, ffi::ThreadPool& pool, int64_t threads) {
  // ParallelFor runs on the pool's threads, the caller among them: at most that many at once.
  const int64_t most = std::max<int64_t>(1, pool.num_threads());
  if (threads < 1 || threads > most) {
    return Invalid(op, "threads=" + std::to_string(threads) + ": expected 1 to " + std::to_string(most) +
                           " (the size of XLA's CPU thread pool, i.e. the CPUs this process may use)");
  }
  return ffi::Error::Success();
}

ffi::Error CheckPasses(const std::string& op, ffi::AnyBuffer::Dimensions seconds,
                       ffi::AnyBuffer::Dimensions checksum) {
  if (seconds.size() != 1 || seconds[0] < 1 || checksum.size() != 2 || checksum[0] != seconds[0] ||
      checksum[1] != 2) {
    return Invalid(op, "expected outputs seconds [P] and checksum [P, 2] with P >= 1, got " +
                           ShapeString(seconds) + " and " + ShapeString(checksum));
  }
  return ffi::Error::Success();
}

void PutU64(uint64_t value, uint32_t* words) {
  words[0] = static_cast<uint32_t>(value);
  words[1] = static_cast<uint32_t>(value >> 32);
}

// Runs fn(t) once on each of `threads` threads (fn(0) alone for one) and returns the seconds.
template <typename Fn>
double TimedOnThreads(ffi::ThreadPool& pool, int64_t threads, const Fn& fn) {
  const auto start = std::chrono::steady_clock::now();
  if (threads == 1) {
    fn(int64_t{0});
  } else {
    // One unit per thread and a minimum chunk of one unit: ParallelFor makes `threads` chunks.
    ParallelFor(pool, threads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) fn(t);
    });
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

Isa SelectedIsa(std::string* error, bool* ok) {
  Isa isa = Isa::kScalar;
  *ok = SelectIsa(&isa, error);
  return isa;
}

ffi::Error ReadBandwidthImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::U8> buffer,
                             ffi::Result<ffi::Buffer<ffi::F32>> seconds,
                             ffi::Result<ffi::Buffer<ffi::U32>> checksum, int64_t threads, int64_t read_ahead) {
  const std::string op = "bitnet_read_bandwidth";
  if (read_ahead < 0) return Invalid(op, "read_ahead=" + std::to_string(read_ahead) + ": expected >= 0 bytes");
  if (buffer.dimensions().size() != 1) {
    return Invalid(op, "expected a buffer of rank 1 ([n] bytes), got shape " + ShapeString(buffer.dimensions()));
  }
  if (auto e = CheckPasses(op, seconds->dimensions(), checksum->dimensions()); e.failure()) return e;
  if (auto e = CheckThreads(op, pool, threads); e.failure()) return e;
  std::string error;
  bool ok;
  const Isa isa = SelectedIsa(&error, &ok);
  if (!ok) return Invalid(op, error);
  const uint8_t* data = buffer.typed_data();
  const int64_t n = buffer.dimensions()[0];
  const int64_t blocks = (n + kReadBlock - 1) / kReadBlock;
  const int64_t per_thread = (blocks + threads - 1) / threads;
  for (int64_t p = 0; p < seconds->dimensions()[0]; ++p) {
    std::atomic<uint64_t> total{0};
    seconds->typed_data()[p] = static_cast<float>(TimedOnThreads(pool, threads, [&](int64_t t) {
      const int64_t begin = std::min(n, t * per_thread * kReadBlock);
      const int64_t end = std::min(n, (t + 1) * per_thread * kReadBlock);
      total.fetch_add(SumBytes(isa, data + begin, end - begin, read_ahead), std::memory_order_relaxed);
    }));
    PutU64(total.load(), checksum->typed_data() + 2 * p);
  }
  return ffi::Error::Success();
}

ffi::Error Int8PeakImpl(ffi::ThreadPool pool, ffi::Result<ffi::Buffer<ffi::F32>> seconds,
                        ffi::Result<ffi::Buffer<ffi::U32>> checksum, ffi::Result<ffi::Buffer<ffi::U32>> macs,
                        int64_t iterations, int64_t threads, int64_t a, int64_t b) {
  const std::string op = "bitnet_int8_peak";
  if (auto e = CheckPasses(op, seconds->dimensions(), checksum->dimensions()); e.failure()) return e;
  if (macs->dimensions().size() != 1 || macs->dimensions()[0] != 2) {
    return Invalid(op, "expected the output macs of shape [2], got " + ShapeString(macs->dimensions()));
  }
  if (auto e = CheckThreads(op, pool, threads); e.failure()) return e;
  if (iterations < 1) return Invalid(op, "iterations=" + std::to_string(iterations) + ": expected >= 1");
  // Accumulator u multiplies by int8(b + u), u < 16: keep that from wrapping, so that the
  // arithmetic stays the one documented.
  if (a < 0 || a > 255 || b < -128 || b > 127 - 15) {
    return Invalid(op, "a=" + std::to_string(a) + ", b=" + std::to_string(b) +
                           ": expected a in [0, 255] and b in [-128, 112]");
  }
  std::string error;
  bool ok;
  const Isa isa = SelectedIsa(&error, &ok);
  if (!ok) return Invalid(op, error);
  std::atomic<int64_t> loop_macs{0};
  for (int64_t p = 0; p < seconds->dimensions()[0]; ++p) {
    std::atomic<int64_t> total{0};
    seconds->typed_data()[p] = static_cast<float>(TimedOnThreads(pool, threads, [&](int64_t) {
      int64_t thread_macs;
      total.fetch_add(Int8PeakLoop(isa, iterations, static_cast<uint8_t>(a), static_cast<int8_t>(b), &thread_macs),
                      std::memory_order_relaxed);
      loop_macs.store(thread_macs, std::memory_order_relaxed);  // the same on every thread
    }));
    PutU64(static_cast<uint64_t>(total.load()), checksum->typed_data() + 2 * p);
  }
  PutU64(static_cast<uint64_t>(loop_macs.load()), macs->typed_data());
  return ffi::Error::Success();
}

}  // namespace
}  // namespace bitnet

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    BitnetReadBandwidth, bitnet::ReadBandwidthImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()
        .Arg<ffi::Buffer<ffi::U8>>()     // buffer: the bytes to read, [n]
        .Ret<ffi::Buffer<ffi::F32>>()    // seconds: [P], one per pass
        .Ret<ffi::Buffer<ffi::U32>>()    // checksum: [P, 2], sum of the bytes (uint64 as lo, hi)
        .Attr<int64_t>("threads")        // threads reading, each a contiguous range
        .Attr<int64_t>("read_ahead"));   // bytes each stream is fetched ahead into L2; 0: none

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    BitnetInt8Peak, bitnet::Int8PeakImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()
        .Ret<ffi::Buffer<ffi::F32>>()    // seconds: [P], one per pass
        .Ret<ffi::Buffer<ffi::U32>>()    // checksum: [P, 2], sum of the threads' loop results (int64)
        .Ret<ffi::Buffer<ffi::U32>>()    // macs: [2], multiply-adds of one thread's loop (uint64)
        .Attr<int64_t>("iterations")     // rounds of the loop
        .Attr<int64_t>("threads")        // threads, each running the whole loop
        .Attr<int64_t>("a")              // the u8 operand, [0, 255]
        .Attr<int64_t>("b"));            // accumulator u's s8 operand is b + u, b in [-128, 112]
