// The ternary GEMM entry point (xla_ffi/gemm.h) on one thread, without XLA: median time per call
// at 1 to 128 activation rows, for A/B runs of a kernel change on one core. Each result is first
// checked against the scalar twin; the weights cycle through 8 copies (one N x K matrix each) so
// that one row streams them from memory, as in a model. Build and run from the repository root:
//
//   g++ -O3 -DNDEBUG -std=c++17 -Ixla_ffi benchmarks/ternary_rows.cc xla_ffi/cpu_isa.cc \
//       xla_ffi/gemm.cc xla_ffi/gemm_x86.cc xla_ffi/gemm_arm.cc -o /tmp/ternary_rows
//   /tmp/ternary_rows [N K [isa]]      (default 6912 2560 avx2; isa: scalar, avx2, avx512)
//
// `bitnet-jax bench kernels` is the benchmark of record (XLA's thread pool, the machine's limits).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "cpu_isa.h"
#include "gemm.h"
#include "layout.h"
#include "scratch.h"

using bitnet::Isa;

int main(int argc, char** argv) {
  const int64_t n = argc > 2 ? std::atol(argv[1]) : 6912, k = argc > 2 ? std::atol(argv[2]) : 2560;
  const char* name = argc > 3 ? argv[3] : "avx2";
  const Isa isa = !std::strcmp(name, "scalar") ? Isa::kScalar : !std::strcmp(name, "avx512") ? Isa::kAvx512Vnni : Isa::kAvx2;
  const int64_t kb = bitnet::CeilDiv(k, bitnet::kBlockK), kp = kb * bitnet::kBlockK;
  const int64_t groups = bitnet::CeilDiv(n, bitnet::kRowsPerGroup);
  std::mt19937 rng(1);
  std::vector<int8_t> t(n * k);
  for (auto& v : t) v = static_cast<int8_t>(static_cast<int>(rng() % 3) - 1);
  std::vector<uint8_t> w(groups * kb * bitnet::kGroupBlockBytes);
  bitnet::PackTernary(t.data(), n, k, w.data());
  constexpr int kCopies = 8;
  std::vector<uint8_t> copies(w.size() * kCopies);
  for (int c = 0; c < kCopies; ++c) std::copy(w.begin(), w.end(), copies.begin() + c * w.size());
  std::printf("%s, N x K = %lld x %lld\n", name, static_cast<long long>(n), static_cast<long long>(k));
  for (int rows : {1, 2, 4, 8, 16, 32, 128}) {
    std::vector<int8_t> x_storage;  // from a cache line, as the FFI handlers' activations (scratch.h)
    int8_t* x = bitnet::CacheLineScratch(x_storage, rows * kp);
    std::fill(x, x + rows * kp, int8_t{0});
    std::vector<int32_t> x_sum(rows, 0), acc(rows * n), ref(rows * n);
    for (int m = 0; m < rows; ++m) {
      for (int64_t i = 0; i < k; ++i) {
        x[m * kp + i] = static_cast<int8_t>(static_cast<int>(rng() % 256) - 128);
        x_sum[m] += x[m * kp + i];
      }
    }
    bitnet::TernaryGemmI32(Isa::kScalar, x, x_sum.data(), rows, kb, w.data(), 0, groups, n, ref.data());
    bitnet::TernaryGemmI32(isa, x, x_sum.data(), rows, kb, w.data(), 0, groups, n, acc.data());
    if (acc != ref) {
      std::printf("rows %d: differs from the scalar twin\n", rows);
      return 1;
    }
    std::vector<double> seconds;
    for (int i = 0; i < 24; ++i) {
      const auto start = std::chrono::steady_clock::now();
      bitnet::TernaryGemmI32(isa, x, x_sum.data(), rows, kb, copies.data() + (i % kCopies) * w.size(), 0,
                             groups, n, acc.data());
      seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    }
    std::sort(seconds.begin(), seconds.end());
    const double median = seconds[seconds.size() / 2];
    std::printf("rows %3d  %9.1f us  %6.1f GOPS  %5.1f GB/s of weights\n", rows, median * 1e6,
                2.0 * rows * n * k / median / 1e9, w.size() / median / 1e9);
  }
  return 0;
}
