// One core, the attention kernel's C++ entry point directly: AttendChunkInt8 over `chunks` chunks
// of 128 slots of an int8 cache (G = 4 query heads of 128 on one kv head, 2B4T's shape), one
// query, no XLA, no thread pool. 16 chunks (512 KB) stay in L2; more read from the LLC or memory.
// Prints the median and best time a slot over the repetitions, and a hash of the partials' bits
// (the same with and without KT and CODED: those change the work, not the arithmetic).
//
//   g++ -O3 -std=c++17 -ffp-contract=off -Ixla_ffi -o /tmp/attention_chunk benchmarks/attention_chunk.cc
//       xla_ffi/attention_kernel.cc xla_ffi/cpu_isa.cc     (one command)
//   /tmp/attention_chunk [chunks, default 16] [reps, default 400]
//   BITNET_JAX_ISA=avx2 picks a path (default: the widest this CPU runs); KT=1 gives the kernel
//   each chunk's keys transposed (TransposeKeysInt8, as a prefill chunk's queries share them);
//   CODED=1 codes the query once (CodeQueriesInt16) rather than in every chunk.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "attention_kernel.h"
#include "cpu_isa.h"

using namespace bitnet;

int main(int argc, char** argv) {
  const int64_t g = 4, h = 128, n = kAttentionChunk;
  const int64_t chunks = argc > 1 ? std::atoll(argv[1]) : 16;
  const int reps = argc > 2 ? std::atoi(argv[2]) : 400;
  Isa isa;
  std::string error;
  if (!SelectIsa(&isa, &error)) {
    std::fprintf(stderr, "%s\n", error.c_str());
    return 1;
  }
  std::mt19937 rng(0);
  std::uniform_int_distribution<int> code(-127, 127);
  std::uniform_real_distribution<float> slot_scale(0.01f, 0.02f);
  std::normal_distribution<float> normal;
  std::vector<int8_t> k(chunks * n * h), v(chunks * n * h);
  for (auto& x : k) x = static_cast<int8_t>(code(rng));
  for (auto& x : v) x = static_cast<int8_t>(code(rng));
  std::vector<float> k_scale(chunks * n), v_scale(chunks * n), q(g * h);
  for (auto& x : k_scale) x = slot_scale(rng);
  for (auto& x : v_scale) x = slot_scale(rng);
  for (auto& x : q) x = normal(rng);

  const int64_t kt_elements = TransposedKeysElements(h), stride = PartialFloats(g, h);
  std::vector<int16_t> kt(chunks * kt_elements);
  const bool transposed = std::getenv("KT") != nullptr;
  if (transposed) {
    for (int64_t c = 0; c < chunks; ++c) TransposeKeysInt8(isa, k.data() + c * n * h, n, h, kt.data() + c * kt_elements);
  }
  std::vector<float> scratch(ScratchFloats(g, h)), partials(chunks * stride);
  const bool coded = std::getenv("CODED") != nullptr && CodeQueriesInt16(isa, q.data(), g, h, scratch.data());

  std::vector<double> ns;
  for (int r = 0; r < reps; ++r) {
    const auto start = std::chrono::steady_clock::now();
    for (int64_t c = 0; c < chunks; ++c) {
      AttendChunkInt8(isa, q.data(), g, h, k.data() + c * n * h, v.data() + c * n * h, k_scale.data() + c * n,
                      v_scale.data() + c * n, n, 0.088f, scratch.data(), partials.data() + c * stride,
                      transposed ? kt.data() + c * kt_elements : nullptr, coded);
    }
    ns.push_back(std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - start).count() /
                 static_cast<double>(chunks * n));
  }
  std::sort(ns.begin(), ns.end());
  uint64_t bits = 0;
  for (const float x : partials) {
    uint32_t u;
    std::memcpy(&u, &x, sizeof(u));
    bits = bits * 1000003 + u;
  }
  std::printf("%s, %lld chunks%s%s: %.2f ns a slot (best %.2f), bits %016llx\n", IsaName(isa), (long long)chunks,
              transposed ? ", keys transposed" : "", coded ? ", query coded once" : "", ns[ns.size() / 2], ns[0],
              (unsigned long long)bits);
  return 0;
}
