// One core, the C++ entry points directly: the ternary kernels (per tensor, and group:G) or the
// int8 rows kernel or the int4 one (the lm_head's) on a K x N matrix at several activation-row counts, no XLA, no
// thread pool. Weights and activations start on cache lines as the FFI's scratch does. By
// default the weights stay in the last-level cache (the kernel's compute side); COPIES=n rotates
// n copies (n x 4.4 MB for 2B4T's FFN shapes: more than the LLC from 16) so that every call
// reads them from memory (the int8 head, 328 MB, always does).
//
//   g++ -O3 -std=c++17 -ffp-contract=off -Ixla_ffi -o /tmp/ternary_one_core benchmarks/ternary_one_core.cc
//       xla_ffi/{cpu_isa,gemm,gemm_x86,gemm_arm,ternary_group_gemm,int4_gemm}.cc     (one command)
//   /tmp/ternary_one_core 2560 6912 tensor 1,8,16 [reps]     (or: group, int8, int4)
//   ISA=avx2 selects the AVX2 path (default: AVX-512 VNNI; the CPU must have it); GROUP_K=G
//   another group width for `group` (default 64; K must be a multiple of it).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gemm.h"
#include "layout.h"
#include "scratch.h"

using namespace bitnet;

int main(int argc, char** argv) {
  if (argc < 5) {
    std::fprintf(stderr, "usage: %s K N tensor|group|int8|int4 ROWS[,ROWS...] [reps]\n", argv[0]);
    return 2;
  }
  const int64_t k = std::atoll(argv[1]), n = std::atoll(argv[2]);
  const bool group = std::string(argv[3]) == "group", int8 = std::string(argv[3]) == "int8",
             int4 = std::string(argv[3]) == "int4";
  const int reps = argc > 5 ? std::atoi(argv[5]) : 30;
  const Isa isa = getenv("ISA") && std::string(getenv("ISA")) == "avx2" ? Isa::kAvx2 : Isa::kAvx512Vnni;
  const int copies = getenv("COPIES") ? std::max(1, std::atoi(getenv("COPIES"))) : 1;
  std::mt19937 rng(1);
  // group:G takes its own layout (TQ2G tiles of 16 outputs, rows padded to 64 inputs; layout.h).
  const int64_t kb = CeilDiv(k, kBlockK), kp = group ? TernaryTileKp(k) : kb * kBlockK;
  const int64_t groups_n = CeilDiv(n, kRowsPerGroup), tiles = CeilDiv(n, kTileRows);
  const int64_t group_k = getenv("GROUP_K") ? std::atoll(getenv("GROUP_K")) : 64, groups_k = k / group_k;
  if (group && (group_k % kTernaryGroupAlign != 0 || k % group_k != 0)) {
    std::fprintf(stderr, "GROUP_K must be a multiple of %lld that divides K\n",
                 static_cast<long long>(kTernaryGroupAlign));
    return 2;
  }

  std::vector<int8_t> t(n * k);
  for (auto& v : t) v = static_cast<int8_t>(static_cast<int>(rng() % 3) - 1);
  const int64_t kp8 = CeilDiv(k, kInt8RowAlign) * kInt8RowAlign;
  if (int8 && kp8 != kp) {
    std::fprintf(stderr, "int8: K must be a multiple of %lld here\n", static_cast<long long>(kBlockK));
    return 2;
  }
  const int64_t w_bytes = int8    ? n * kp8
                          : int4  ? n * kp / 2
                          : group ? tiles * TernaryTileBytes(kp)
                                  : groups_n * kb * kGroupBlockBytes;
  std::vector<uint8_t> w_storage;
  uint8_t* w = CacheLineScratch(w_storage, w_bytes * copies);
  if (int4) {
    for (int64_t i = 0; i < w_bytes; ++i) w[i] = static_cast<uint8_t>(rng() % 256);
  } else if (int8) {
    std::fill(w, w + w_bytes, 0);
    for (int64_t r = 0; r < n; ++r)
      for (int64_t i = 0; i < k; ++i) w[r * kp8 + i] = static_cast<uint8_t>(rng() % 256);
  } else if (group) {
    PackTernaryTiles(t.data(), n, k, w);
  } else {
    PackTernary(t.data(), n, k, w);
  }
  for (int c = 1; c < copies; ++c) std::memcpy(w + c * w_bytes, w, w_bytes);
  std::vector<float> scale(tiles * groups_k * kTileRows);  // group:G: tiled as the codes (any values do)
  for (auto& v : scale) v = 0.5f + static_cast<float>(rng() % 1000) / 1000.0f;
  std::vector<uint16_t> half_scale(n * (kp / kInt4GroupK));  // int4: float16 bits, 0.5 .. 1.5
  for (auto& v : half_scale) v = static_cast<uint16_t>(0x3800 + rng() % 0x800);

  for (char* p = std::strtok(argv[4], ","); p; p = std::strtok(nullptr, ",")) {
    const int64_t m = std::atoll(p);
    std::vector<int8_t> x_storage;
    int8_t* x = CacheLineScratch(x_storage, m * kp);
    std::fill(x, x + m * kp, 0);
    for (int64_t r = 0; r < m; ++r)
      for (int64_t i = 0; i < k; ++i) x[r * kp + i] = static_cast<int8_t>(static_cast<int>(rng() % 255) - 127);
    std::vector<int32_t> x_sum(m), x_group(groups_k * m), acc(m * n);
    for (int64_t r = 0; r < m; ++r)
      for (int64_t i = 0; i < kp; ++i) x_sum[r] += x[r * kp + i];
    TernaryGroupSums(x, m, kp, group_k, groups_k, x_group.data());
    std::vector<float> dot(m * n);
    std::vector<double> us;
    for (int rep = 0; rep < reps; ++rep) {
      const uint8_t* w_c = w + (rep % copies) * w_bytes;
      const auto start = std::chrono::steady_clock::now();
      if (int4)
        Int4GemmF32(isa, x, m, kp, w_c, half_scale.data(), 0, n, n, dot.data());
      else if (int8)
        Int8GemmI32(isa, x, x_sum.data(), m, kp, reinterpret_cast<const int8_t*>(w_c), 0, n, n, acc.data());
      else if (group)
        TernaryGroupGemmF32(isa, x, x_group.data(), m, kp, w_c, scale.data(), group_k, groups_k, 0, tiles, n,
                            dot.data());
      else
        TernaryGemmI32(isa, x, x_sum.data(), m, kb, w_c, 0, groups_n, n, acc.data());
      us.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count());
    }
    std::sort(us.begin(), us.end());
    const double median = us[us.size() / 2];
    const std::string kind = int4 ? "int4" : int8 ? "int8" : group ? "group:" + std::to_string(group_k) : "tensor";
    std::printf("%s %s %lldx%lld rows=%lld: median %.0f us (min %.0f), %.0f GOPS\n", IsaName(isa), kind.c_str(),
                static_cast<long long>(k),
                static_cast<long long>(n), static_cast<long long>(m), median, us[0], 2.0 * m * n * k / median / 1e3);
  }
  return 0;
}
