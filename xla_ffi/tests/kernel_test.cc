// Exactness test of the integer kernels (gemm.h) on every path this CPU runs, against a naive
// product of unpacked values, and of each path's activation quantizer (quantize.h) against its
// scalar steps, bit for bit (tests/test_ffi_act_quant.py checks those against JAX). Built by CMake
// with -DBITNET_JAX_BUILD_TESTS=ON, and with -DBITNET_JAX_SANITIZE=ON under AddressSanitizer and
// UndefinedBehaviorSanitizer; also cross-built for aarch64 and run under qemu-user
// (tests/test_cpp_kernels.py does all three). It prints one line per kernel path, "<path>: checked
// N shapes" or "<path>: not checked, <why>", so that a path this machine could not run is never
// mistaken for one that passed. Exit status 0 iff every result matches.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <utility>
#include <vector>

#include "../cpu_isa.h"
#include "../float16.h"
#include "../gemm.h"
#include "../layout.h"
#include "../quantize.h"

// attention_test.cc: the decode attention kernels on path `isa`; returns the failures.
int CheckAttention(bitnet::Isa isa);

namespace {

using bitnet::CeilDiv;

struct Shape {
  int64_t rows, k, n;
};

// Odd shapes: K not a multiple of the 256-wide block, N not a multiple of the 4-row group, rows
// (activation rows) on both sides of the 4-row tile.
const Shape kShapes[] = {
    {1, 1, 1},   {1, 256, 4},  {2, 255, 5},  {3, 257, 7},   {4, 512, 8},   {5, 300, 3},
    {7, 513, 9}, {8, 640, 13}, {9, 1000, 6}, {16, 768, 33}, {17, 777, 17}, {33, 2560, 11},
    // Prefill panels (from 17 rows; AVX-512: 32 output rows, 12-row tiles; NEON sdot: 16 output
    // rows, 4-row tiles; K in chunks of 1024): partial panels, tiles and chunks.
    {16, 1000, 70}, {18, 256, 32}, {40, 2304, 67}, {130, 300, 35}, {25, 1100, 129}, {45, 1100, 129},
    // One row past several int16 widening chunks (8 blocks on AVX2), N not a multiple of 4.
    {1, 4100, 7},
    // AVX-512 pair tiles (8-16 rows; K in equal chunks of at most 3/4 of L1d, 12 blocks on a 32 KB
    // one, 18 on 48 KB): one, two and three chunks on either, the last row group with 1, 2 or 3
    // rows, rows left to the 4-row tiles.
    {8, 4100, 14}, {12, 6912, 11}, {15, 3840, 7}, {16, 2560, 9},
    // AVX-512's 4 x 5 tile (5 rows), a partial last row group.
    {5, 6912, 10},
    // Int8 at one row, K in whole steps of 64 (AVX2: Int8RowOneAvx2's four sums), two calls
    // (rows 0-6 and 7-14).
    {1, 640, 15},
};

int failures = 0;

void Expect(bool ok, const char* what, const char* isa, const Shape& s, int64_t m, int64_t n,
            int64_t got, int64_t want) {
  if (ok) return;
  if (++failures <= 20) {
    std::printf("FAIL %s isa=%s rows=%lld k=%lld n=%lld at [%lld, %lld]: got %lld want %lld\n", what,
                isa, (long long)s.rows, (long long)s.k, (long long)s.n, (long long)m, (long long)n,
                (long long)got, (long long)want);
  }
}

// Random weights and activations; or, with `extreme` set, every weight +1 and every activation
// `extreme` (the largest sums any int16 stage of a kernel can see).
void TestTernary(bitnet::Isa isa, const Shape& s, std::mt19937& rng, int extreme = 0) {
  std::uniform_int_distribution<int> tern(-1, 1), byte(-128, 127);
  const int64_t kb = CeilDiv(s.k, bitnet::kBlockK), kp = kb * bitnet::kBlockK;
  const int64_t groups = CeilDiv(s.n, bitnet::kRowsPerGroup);
  std::vector<int8_t> t(s.n * s.k), x(s.rows * kp, 0);
  for (auto& v : t) v = static_cast<int8_t>(extreme ? 1 : tern(rng));
  for (int64_t m = 0; m < s.rows; ++m)
    for (int64_t i = 0; i < s.k; ++i) x[m * kp + i] = static_cast<int8_t>(extreme ? extreme : byte(rng));
  x[0] = -128;  // the corner case of sign / maddubs tricks
  std::vector<int32_t> x_sum(s.rows, 0);
  for (int64_t m = 0; m < s.rows; ++m)
    for (int64_t i = 0; i < s.k; ++i) x_sum[m] += x[m * kp + i];
  std::vector<uint8_t> w(groups * kb * bitnet::kGroupBlockBytes);
  bitnet::PackTernary(t.data(), s.n, s.k, w.data());

  std::vector<int32_t> acc(s.rows * s.n, -7);
  // Two calls over halves of the row groups, as the thread pool splits them.
  const int64_t mid = groups / 2;
  bitnet::TernaryGemmI32(isa, x.data(), x_sum.data(), s.rows, kb, w.data(), 0, mid, s.n, acc.data());
  bitnet::TernaryGemmI32(isa, x.data(), x_sum.data(), s.rows, kb, w.data(), mid, groups, s.n, acc.data());
  for (int64_t m = 0; m < s.rows; ++m)
    for (int64_t n = 0; n < s.n; ++n) {
      int64_t want = 0;
      for (int64_t i = 0; i < s.k; ++i) want += int64_t{t[n * s.k + i]} * x[m * kp + i];
      Expect(acc[m * s.n + n] == want, "ternary", bitnet::IsaName(isa), s, m, n, acc[m * s.n + n], want);
    }
}

void TestInt8(bitnet::Isa isa, const Shape& s, std::mt19937& rng) {
  std::uniform_int_distribution<int> byte(-128, 127);
  const int64_t kp = CeilDiv(s.k, bitnet::kInt8RowAlign) * bitnet::kInt8RowAlign;
  std::vector<int8_t> w(s.n * kp, 0), x(s.rows * kp, 0);
  for (int64_t n = 0; n < s.n; ++n)
    for (int64_t i = 0; i < s.k; ++i) w[n * kp + i] = static_cast<int8_t>(byte(rng));
  for (int64_t m = 0; m < s.rows; ++m)
    for (int64_t i = 0; i < s.k; ++i) x[m * kp + i] = static_cast<int8_t>(byte(rng));
  w[0] = -128;
  x[0] = -128;  // -128 * -128 = 16384: the product that int16 tricks overflow
  std::vector<int32_t> x_sum(s.rows, 0);
  for (int64_t m = 0; m < s.rows; ++m)
    for (int64_t i = 0; i < s.k; ++i) x_sum[m] += x[m * kp + i];
  std::vector<int32_t> acc(s.rows * s.n, -7);
  const int64_t mid = s.n / 2;
  bitnet::Int8GemmI32(isa, x.data(), x_sum.data(), s.rows, kp, w.data(), 0, mid, s.n, acc.data());
  bitnet::Int8GemmI32(isa, x.data(), x_sum.data(), s.rows, kp, w.data(), mid, s.n, s.n, acc.data());
  for (int64_t m = 0; m < s.rows; ++m)
    for (int64_t n = 0; n < s.n; ++n) {
      int64_t want = 0;
      for (int64_t i = 0; i < s.k; ++i) want += int64_t{w[n * kp + i]} * x[m * kp + i];
      Expect(acc[m * s.n + n] == want, "int8", bitnet::IsaName(isa), s, m, n, acc[m * s.n + n], want);
    }
}

// The float lanes' final sum in gemm.h's order, written out here (not the kernels' SumFloatLanes).
float SumLanesInOrder(const float lane[8]) {
  return ((lane[0] + lane[4]) + (lane[2] + lane[6])) + ((lane[1] + lane[5]) + (lane[3] + lane[7]));
}

// got and want the same float32, bit for bit.
void ExpectSameBits(float got, float want, const char* what, bitnet::Isa isa, const Shape& s, int64_t m, int64_t n) {
  int32_t got_bits, want_bits;
  std::memcpy(&got_bits, &got, 4);
  std::memcpy(&want_bits, &want, 4);
  Expect(got_bits == want_bits, what, bitnet::IsaName(isa), s, m, n, got_bits, want_bits);
}

// Float16 bits of a power of two 2^e (-14 <= e <= 15, the normal range), and of a few other scales.
uint16_t HalfPow2(int e) { return static_cast<uint16_t>((e + 15) << 10); }

// Int4 (I4G): each path against gemm.h's order written out here, bit for bit, on random codes and
// random float16 scales (normal, subnormal, negative); and against the exact integer product when
// every scale is a power of two small enough that no float step rounds.
void TestInt4(bitnet::Isa isa, const Shape& s, std::mt19937& rng, bool pow2_scales) {
  std::uniform_int_distribution<int> code(-7, 7), byte(-128, 127), half(0, 0xffff), e(-2, 0);
  const int64_t kp = CeilDiv(s.k, bitnet::kInt4GroupK) * bitnet::kInt4GroupK, groups = kp / bitnet::kInt4GroupK;
  std::vector<int8_t> q(s.n * s.k), x(s.rows * kp, 0);
  for (auto& v : q) v = static_cast<int8_t>(code(rng));
  for (int64_t m = 0; m < s.rows; ++m)
    for (int64_t i = 0; i < s.k; ++i) x[m * kp + i] = static_cast<int8_t>(byte(rng));
  x[0] = -128;
  q[0] = -7;
  std::vector<uint16_t> scale(s.n * groups);
  for (auto& v : scale) {
    do {
      v = static_cast<uint16_t>(pow2_scales ? HalfPow2(e(rng)) : half(rng));
    } while (((v >> 10) & 0x1f) == 0x1f);  // no inf / NaN scales
  }
  std::vector<uint8_t> w(s.n * groups * bitnet::kInt4GroupBytes);
  bitnet::PackInt4(q.data(), s.n, s.k, w.data());

  std::vector<float> dot(s.rows * s.n, -7.0f);
  const int64_t mid = s.n / 2;
  bitnet::Int4GemmF32(isa, x.data(), s.rows, kp, w.data(), scale.data(), 0, mid, s.n, dot.data());
  bitnet::Int4GemmF32(isa, x.data(), s.rows, kp, w.data(), scale.data(), mid, s.n, s.n, dot.data());
  for (int64_t m = 0; m < s.rows; ++m)
    for (int64_t n = 0; n < s.n; ++n) {
      float lane[8] = {};
      int64_t exact = 0;  // with power-of-two scales: sum_k q * x * scale, in units of 2^-2
      for (int64_t g = 0; g < groups; ++g) {
        const float sg = bitnet::HalfToFloat(scale[n * groups + g]);
        for (int l = 0; l < 8; ++l) {
          int32_t p = 0;
          for (int j = 0; j < 4; ++j) {
            const int64_t k = 32 * g + 4 * l + j;
            if (k < s.k) p += q[n * s.k + k] * x[m * kp + k];
          }
          lane[l] = lane[l] + static_cast<float>(p) * sg;
          exact += static_cast<int64_t>(p) * static_cast<int64_t>(sg * 4.0f);
        }
      }
      const float got = dot[m * s.n + n];
      ExpectSameBits(got, SumLanesInOrder(lane), "int4 order", isa, s, m, n);
      // Scales 2^-2 .. 1: every partial sum is a multiple of 2^-2 of magnitude at most
      // 2560 * 128 * 7 < 2^21.2 (K <= 2560), below 2^24 units: every float step is exact.
      if (pow2_scales && s.k <= 2560) {
        Expect(got * 4.0f == static_cast<float>(exact), "int4 exact", bitnet::IsaName(isa), s, m, n,
               static_cast<int64_t>(got * 4.0f), exact);
      }
    }
}

// Ternary with group scales: each path against gemm.h's order written out here, bit for bit, on
// random codes and scales; and, with power-of-two scales small enough that no float step rounds,
// against the exact sum of t * x * scale. `extreme` as in TestTernary (for the int16 stages).
struct GroupShape {
  int64_t rows, k, n, group_k;
};

const GroupShape kGroupShapes[] = {
    {1, 64, 1, 64},     {1, 256, 4, 64},     {2, 320, 5, 64},     {3, 320, 7, 320},  {4, 512, 8, 128},
    {5, 768, 3, 256},   {1, 640, 13, 128},   {9, 1024, 6, 512},   {1, 2560, 9, 64},  {6, 2560, 11, 256},
    {17, 1280, 10, 64}, {1, 4096, 5, 4096},  {2, 4224, 4, 2112},
    // Tiles of 16 outputs: whole and partial (1, 8, 9, 15 valid outputs: AVX2's halves, NEON's
    // quarters), tiles of the 6 (AVX-512), 4 (AVX2) and 2 (NEON) activation rows and each
    // remainder; K of 64 (one strip) up to 6912, groups of 1 to 64 chunks, one group the whole row.
    {8, 1920, 37, 192}, {16, 6912, 13, 64}, {3, 6912, 6, 64},   {23, 2560, 70, 64}, {40, 1536, 33, 128},
    {18, 1280, 36, 320}, {20, 4096, 9, 4096}, {25, 1024, 40, 64}, {1, 6912, 70, 64}, {1, 1920, 40, 192},
    {1, 320, 33, 64},   {1, 1280, 64, 128},  {1, 4096, 36, 1024}, {2, 2560, 40, 64}, {5, 1280, 64, 128},
    {7, 6912, 36, 64},  {16, 4096, 33, 256}, {11, 1088, 70, 64},  {9, 576, 24, 64},  {12, 192, 31, 64},
};

void TestTernaryGroup(bitnet::Isa isa, const GroupShape& g, std::mt19937& rng, bool pow2_scales, int extreme = 0) {
  std::uniform_int_distribution<int> tern(-1, 1), byte(-128, 127), e(-3, 0);
  std::normal_distribution<float> normal(0.0f, 0.05f);
  const Shape s{g.rows, g.k, g.n};
  const int64_t kp = bitnet::TernaryTileKp(g.k), groups = g.k / g.group_k;
  const int64_t tiles = CeilDiv(g.n, bitnet::kTileRows);
  std::vector<int8_t> t(g.n * g.k), x(g.rows * kp, 0);
  for (auto& v : t) v = static_cast<int8_t>(extreme ? 1 : tern(rng));
  for (int64_t m = 0; m < g.rows; ++m)
    for (int64_t i = 0; i < g.k; ++i) x[m * kp + i] = static_cast<int8_t>(extreme ? extreme : byte(rng));
  x[0] = -128;
  std::vector<float> scale(groups * g.n);  // [groups, n], tiled for the kernel below (layout.h)
  for (auto& v : scale) v = pow2_scales ? std::ldexp(1.0f, e(rng)) : normal(rng);
  std::vector<float> scale_tiles(tiles * groups * bitnet::kTileRows, 0.0f);
  for (int64_t c = 0; c < groups; ++c)
    for (int64_t n = 0; n < g.n; ++n)
      scale_tiles[(n / bitnet::kTileRows * groups + c) * bitnet::kTileRows + n % bitnet::kTileRows] = scale[c * g.n + n];
  std::vector<uint8_t> w(tiles * bitnet::TernaryTileBytes(kp));
  bitnet::PackTernaryTiles(t.data(), g.n, g.k, w.data());
  std::vector<int32_t> x_group(groups * g.rows);
  bitnet::TernaryGroupSums(x.data(), g.rows, kp, g.group_k, groups, x_group.data());

  std::vector<float> dot(g.rows * g.n, -7.0f);
  // Two calls over halves of the tiles, as the thread pool splits them.
  const int64_t mid = tiles / 2;
  bitnet::TernaryGroupGemmF32(isa, x.data(), x_group.data(), g.rows, kp, w.data(), scale_tiles.data(), g.group_k, groups, 0,
                              mid, g.n, dot.data());
  bitnet::TernaryGroupGemmF32(isa, x.data(), x_group.data(), g.rows, kp, w.data(), scale_tiles.data(), g.group_k, groups,
                              mid, tiles, g.n, dot.data());
  for (int64_t m = 0; m < g.rows; ++m)
    for (int64_t n = 0; n < g.n; ++n) {
      float d = 0.0f;
      int64_t exact = 0;  // with power-of-two scales: sum_k t * x * scale, in units of 2^-3
      for (int64_t c = 0; c < groups; ++c) {
        const float sc = scale[c * g.n + n];
        int32_t p = 0;
        for (int64_t k = c * g.group_k; k < (c + 1) * g.group_k; ++k) p += t[n * g.k + k] * x[m * kp + k];
        d = d + static_cast<float>(p) * sc;
        exact += static_cast<int64_t>(p) * static_cast<int64_t>(sc * 8.0f);
      }
      const float got = dot[m * g.n + n];
      ExpectSameBits(got, d, "ternary group order", isa, s, m, n);
      // Scales 2^-3 .. 1: every partial sum is a multiple of 2^-3 of magnitude at most
      // 4224 * 128 < 2^20.1, below 2^24 units: every float step is exact.
      if (pow2_scales) {
        Expect(got * 8.0f == static_cast<float>(exact), "ternary group exact", bitnet::IsaName(isa), s, m, n,
               static_cast<int64_t>(got * 8.0f), exact);
      }
    }
}

// bfloat16 rows: the high halves of float32 values (truncated; any bf16 will do).
std::vector<uint16_t> ToBf16(const std::vector<float>& x) {
  std::vector<uint16_t> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    uint32_t bits;
    std::memcpy(&bits, &x[i], sizeof(bits));
    out[i] = static_cast<uint16_t>(bits >> 16);
  }
  return out;
}

template <typename T>
void ExpectSameQuantization(bitnet::Isa isa, const std::vector<T>& x, int bits, const char* what) {
  const int64_t k = static_cast<int64_t>(x.size());
  std::vector<int8_t> q(k, 99), q_want(k, 99);
  int32_t sum = 5, sum_want = 5;  // QuantizeRow adds to the sum it is given
  const float scale = bitnet::QuantizeRowOn(isa, x.data(), k, bits, q.data(), &sum);
  const float scale_want = bitnet::QuantizeRow(x.data(), k, bits, q_want.data(), &sum_want);
  const bool ok = std::memcmp(&scale, &scale_want, sizeof(scale)) == 0 && sum == sum_want && q == q_want;
  if (!ok && ++failures <= 20) {
    const int64_t at = std::mismatch(q.begin(), q.end(), q_want.begin()).first - q.begin();
    std::printf("FAIL quantize isa=%s %s k=%lld bits=%d: scale %a want %a, sum %d want %d, first q "
                "mismatch at %lld\n",
                bitnet::IsaName(isa), what, (long long)k, bits, scale, scale_want, sum, sum_want,
                (long long)at);
  }
}

// Rows of odd lengths (the SIMD bodies and their scalar tails), float32 and bfloat16: random
// values; rows with a NaN or an inf; all zeros; tiny (amax below the 1e-5 floor); and halves
// under scale 1 (8 bits, amax 127), which must round to even.
void TestQuantize(bitnet::Isa isa, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (int64_t k : {1, 3, 7, 8, 9, 16, 31, 64, 300, 2563}) {
    std::vector<std::pair<const char*, std::vector<float>>> rows;
    std::vector<float> x(k);
    for (auto& v : x) v = normal(rng);
    rows.emplace_back("random", x);
    x[k / 2] = NAN;
    rows.emplace_back("nan", x);
    x[k / 2] = -INFINITY;
    rows.emplace_back("inf", x);
    rows.emplace_back("zeros", std::vector<float>(k, 0.0f));
    for (auto& v : x) v = normal(rng) * 1e-7f;
    rows.emplace_back("tiny", x);
    for (int64_t i = 0; i < k; ++i) x[i] = static_cast<float>(i % 9) - 4.5f;
    x[k - 1] = -126.5f;
    x[0] = 127.0f;
    rows.emplace_back("halves", x);
    for (const auto& [what, row] : rows) {
      for (int bits : {8, 4, 2}) {
        ExpectSameQuantization(isa, row, bits, what);
        ExpectSameQuantization(isa, ToBf16(row), bits, what);
      }
    }
  }
}

// Why kernel_test cannot check path `isa` here.
const char* WhyNotChecked(bitnet::Isa isa) {
  if (bitnet::IsaBuilt(isa)) return "this CPU cannot run it";
  return isa == bitnet::Isa::kNeon || isa == bitnet::Isa::kNeonDot ? "this build is not aarch64"
                                                                    : "this build is not x86-64";
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  const std::vector<bitnet::Isa>& available = bitnet::AvailableIsas();
  for (bitnet::Isa isa : bitnet::kAllIsas) {
    if (std::find(available.begin(), available.end(), isa) == available.end()) {
      std::printf("%s: not checked, %s\n", bitnet::IsaName(isa), WhyNotChecked(isa));
      continue;
    }
    for (const Shape& s : kShapes) {
      TestTernary(isa, s, rng);
      TestInt8(isa, s, rng);
      TestInt4(isa, s, rng, /*pow2_scales=*/false);
      TestInt4(isa, s, rng, /*pow2_scales=*/true);
    }
    // The ternary GEMV tiles (AVX2, NEON, AVX-512 up to 7 rows) over blocks of row groups whose
    // codes fill 256 KB (37 groups at K = 6912, 102 at 2560), where the rows' activations outgrow
    // 3/4 of L1d: each half of the row groups in two blocks, the last partial.
    for (const Shape& s : {Shape{9, 6912, 350}, Shape{7, 6912, 301}, Shape{12, 2560, 900}}) TestTernary(isa, s, rng);
    for (const Shape& s :
         {Shape{1, 2560, 8}, Shape{1, 6912, 6}, Shape{5, 6912, 6}, Shape{8, 6912, 6}, Shape{20, 6912, 40}}) {
      TestInt4(isa, s, rng, /*pow2_scales=*/true);
      TestTernary(isa, s, rng, -128);
      TestTernary(isa, s, rng, 127);
    }
    for (const GroupShape& g : kGroupShapes) {
      TestTernaryGroup(isa, g, rng, /*pow2_scales=*/false);
      TestTernaryGroup(isa, g, rng, /*pow2_scales=*/true);
    }
    // The int16 sums' extremes, across several widenings (4096-wide groups: 64 strips).
    TestTernaryGroup(isa, {2, 4096, 4, 4096}, rng, /*pow2_scales=*/true, -128);
    TestTernaryGroup(isa, {1, 4096, 4, 4096}, rng, /*pow2_scales=*/true, 127);
    TestTernaryGroup(isa, {1, 4096, 32, 4096}, rng, /*pow2_scales=*/true, -128);  // 16-row tiles
    TestTernaryGroup(isa, {1, 6912, 32, 64}, rng, /*pow2_scales=*/true, 127);
    TestTernaryGroup(isa, {6, 4096, 32, 4096}, rng, /*pow2_scales=*/true, -128);
    TestTernaryGroup(isa, {3, 6912, 32, 64}, rng, /*pow2_scales=*/true, 127);
    TestQuantize(isa, rng);
    failures += CheckAttention(isa);
    std::printf("%s: checked %zu shapes\n", bitnet::IsaName(isa), sizeof(kShapes) / sizeof(kShapes[0]));
  }
  std::printf(failures ? "FAILED: %d mismatches\n" : "OK\n", failures);
  return failures ? 1 : 0;
}
