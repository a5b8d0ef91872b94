// The decode attention kernels (attention_kernel.h) on one path, against double precision: the
// exp within 2 ulp, and chunked attention (AttendChunk per chunk of slots, MergeChunks) within
// the float32 rounding bound derived below, on odd head dims, group sizes and slot counts, for a
// float cache and for an int8 cache with per-slot scales (AttendChunkInt8).
// Part of kernel_test (kernel_test.cc calls CheckAttention for every path this CPU runs).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "../attention_kernel.h"
#include "../cpu_isa.h"

namespace {

int failures = 0;

// Distance to the next float above |x|'s binade floor: one unit in the last place of x.
double Ulp(double x) { return std::ldexp(1.0, std::ilogb(x) - 23); }

void CheckExp(bitnet::Isa isa) {
  std::vector<float> x;
  for (int i = 0; i <= 200000; ++i) x.push_back(-87.0f * static_cast<float>(i) / 200000.0f);
  for (float v : {-0.0f, -1e-30f, -1e-7f, -0.34657359f, -0.34657360f, -86.99999f, -87.0f}) x.push_back(v);
  std::vector<float> y = x;
  bitnet::ExpNonPositive(isa, y.data(), static_cast<int64_t>(y.size()));
  double worst = 0.0;
  for (size_t i = 0; i < x.size(); ++i) {
    const double want = std::exp(static_cast<double>(x[i]));
    worst = std::max(worst, std::abs(y[i] - want) / Ulp(want));
  }
  // Below the clamp: exp(-87), a normal float, never a denormal or garbage.
  std::vector<float> low = {-87.5f, -100.0f, -1e30f, -INFINITY};
  bitnet::ExpNonPositive(isa, low.data(), static_cast<int64_t>(low.size()));
  bool low_ok = true;
  for (float v : low) low_ok &= std::abs(v - std::exp(-87.0)) <= 2 * Ulp(std::exp(-87.0));
  // NaN in, NaN out (a NaN score must not turn into a weight), in every lane of a vector.
  std::vector<float> nan(19, std::nanf(""));
  bitnet::ExpNonPositive(isa, nan.data(), static_cast<int64_t>(nan.size()));
  bool nan_ok = true;
  for (float v : nan) nan_ok &= std::isnan(v);
  if (worst > 2.0 || !low_ok || !nan_ok) {
    ++failures;
    std::printf("FAIL exp isa=%s: worst error %.2f ulp (want <= 2), below -87 %s, NaN %s\n", bitnet::IsaName(isa),
                worst, low_ok ? "ok" : "wrong", nan_ok ? "stays NaN" : "lost");
  }
}

// The int8 cache's integer arithmetic (AttendChunkInt8) rounds a head's query and its weights of a
// chunk to int16 codes of a step = (largest magnitude) / 32767. A code is within 0.51 steps of its
// value: half a step, and one float rounding of value * (32767 / largest), at most 32767 u.

// The most a query's codes move any score: 0.51 * step * scale * sum_i |k_ji| over the exact keys
// kd; a weight exp(s_j - max) moves by at most twice that, relatively (s_j and the max).
double QueryCodeError(const float* q, int64_t h, const std::vector<double>& kd, int64_t slots) {
  double largest = 0.0, worst = 0.0;
  for (int64_t i = 0; i < h; ++i) largest = std::max(largest, std::abs(static_cast<double>(q[i])));
  for (int64_t j = 0; j < slots; ++j) {
    double sum = 0.0;
    for (int64_t i = 0; i < h; ++i) sum += std::abs(kd[j * h + i]);
    worst = std::max(worst, sum);
  }
  return 0.51 * largest / 32767 * worst / std::sqrt(static_cast<double>(h));
}

// The most the weights' codes move output element i: a chunk's weights w_j = p_j * v_scale_j (p_j
// its exp(s_j - chunk max)) are coded in steps of max_j w_j / 32767, each code within 0.51 steps,
// against the int8 values v8_ji; the merge scales the chunk by exp(chunk max - max) / total. So
// per chunk: 0.51 / 32767 * max_j(P_j v_scale_j) * sum_j |v8_ji|, P_j the normalized weights
// (p[j] / total below, p[j] = exp(s_j - max)).
double WeightCodeError(const std::vector<double>& p, double total, const std::vector<float>& v_scale,
                       const std::vector<int8_t>& v8, int64_t h, int64_t i) {
  const int64_t slots = static_cast<int64_t>(p.size());
  double error = 0.0;
  for (int64_t first = 0; first < slots; first += bitnet::kAttentionChunk) {
    double largest = 0.0, sum = 0.0;
    for (int64_t j = first; j < std::min(slots, first + bitnet::kAttentionChunk); ++j) {
      largest = std::max(largest, p[j] / total * v_scale[j]);
      sum += std::abs(static_cast<double>(v8[j * h + i]));
    }
    error += 0.51 / 32767 * largest * sum;
  }
  return error;
}

// One query's G heads over `slots` slots, chunk by chunk as the FFI handler cuts them, against
// the softmax-weighted values in double precision.
//
// Tolerance, from float32 rounding (u = 2^-24), first order: a score's dot product of H terms
// and its scaling are off by at most (H + 1) u a_j, with a_j = scale * sum_i |q_i k_ji| <= A;
// subtracting the chunk max, merging maxes and the exps add 2uA + 2uA + 3u, so every weight
// exp(s_j - max) carries a relative error of at most d = (H + 5) u A + 3u. The sums of weights
// and of weighted values run over at most S + 1 terms in sequence (within a chunk, then over
// chunks), and the division rounds once: |out - exact| <= (2d + (2S + 5) u) * sum_j p_j |v_j|.
//
// With an int8 cache the reference is the cache's exact values, scale_j * int8_j. The int8 values
// widen exactly; a score's scaling is two roundings (k_scale_j * scale, then the product), within
// the (H + 1) u a_j above plus u; a weight times v_scale_j rounds once more: d grows by 2u.
void CheckChunkedAttention(bitnet::Isa isa, int64_t g, int64_t h, int64_t slots, bool int8_cache, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> code(-127, 127);
  std::uniform_real_distribution<float> slot_scale(0.002f, 0.05f);
  std::vector<float> q(g * h), k(slots * h), v(slots * h), k_scale(slots), v_scale(slots);
  std::vector<int8_t> k8(slots * h), v8(slots * h);
  for (auto& x : q) x = normal(rng);
  if (int8_cache) {
    for (int64_t j = 0; j < slots; ++j) {
      k_scale[j] = slot_scale(rng);
      v_scale[j] = slot_scale(rng);
      for (int64_t i = 0; i < h; ++i) {
        k8[j * h + i] = static_cast<int8_t>(code(rng));
        v8[j * h + i] = static_cast<int8_t>(code(rng));
      }
    }
  } else {
    for (auto& x : k) x = normal(rng);
    for (auto& x : v) x = normal(rng);
  }
  // The exact values the reference below reads (for int8: a float times a small integer, exact
  // in double).
  std::vector<double> kd(slots * h), vd(slots * h);
  for (int64_t j = 0; j < slots; ++j) {
    for (int64_t i = 0; i < h; ++i) {
      kd[j * h + i] = int8_cache ? static_cast<double>(k_scale[j]) * k8[j * h + i] : k[j * h + i];
      vd[j * h + i] = int8_cache ? static_cast<double>(v_scale[j]) * v8[j * h + i] : v[j * h + i];
    }
  }
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(h)));
  const int64_t chunks = (slots + bitnet::kAttentionChunk - 1) / bitnet::kAttentionChunk;
  const int64_t stride = bitnet::PartialFloats(g, h);
  std::vector<float> scratch(bitnet::ScratchFloats(g, h)), partials(chunks * stride), out(g * h);
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t first = c * bitnet::kAttentionChunk;
    const int64_t n = std::min(bitnet::kAttentionChunk, slots - first);
    if (int8_cache) {
      bitnet::AttendChunkInt8(isa, q.data(), g, h, k8.data() + first * h, v8.data() + first * h,
                              k_scale.data() + first, v_scale.data() + first, n, scale, scratch.data(),
                              partials.data() + c * stride);
    } else {
      bitnet::AttendChunk(isa, q.data(), g, h, k.data() + first * h, v.data() + first * h, n, scale,
                          scratch.data(), partials.data() + c * stride);
    }
  }
  bitnet::MergeChunks(partials.data(), chunks, g, h, out.data());

  const double u = std::ldexp(1.0, -24);
  for (int64_t gi = 0; gi < g; ++gi) {
    std::vector<double> s(slots);
    double a_max = 0.0;
    for (int64_t j = 0; j < slots; ++j) {
      double dot = 0.0, abs_dot = 0.0;
      for (int64_t i = 0; i < h; ++i) {
        dot += static_cast<double>(q[gi * h + i]) * kd[j * h + i];
        abs_dot += std::abs(static_cast<double>(q[gi * h + i]) * kd[j * h + i]);
      }
      s[j] = dot / std::sqrt(static_cast<double>(h));
      a_max = std::max(a_max, abs_dot / std::sqrt(static_cast<double>(h)));
    }
    const double m = *std::max_element(s.begin(), s.end());
    double total = 0.0;
    for (double& x : s) total += (x = std::exp(x - m));
    double d = (h + 5) * u * a_max + (int8_cache ? 5 : 3) * u;
    if (int8_cache) d += 2 * QueryCodeError(q.data() + gi * h, h, kd, slots);
    for (int64_t i = 0; i < h; ++i) {
      double want = 0.0, magnitude = 0.0;
      for (int64_t j = 0; j < slots; ++j) {
        want += s[j] / total * vd[j * h + i];
        magnitude += s[j] / total * std::abs(vd[j * h + i]);
      }
      double tol = (2 * d + (2.0 * slots + 5) * u) * magnitude;
      if (int8_cache) tol += WeightCodeError(s, total, v_scale, v8, h, i);
      const double got = out[gi * h + i];
      if (!(std::abs(got - want) <= tol) && ++failures <= 20) {
        std::printf("FAIL attention%s isa=%s g=%lld h=%lld slots=%lld at [%lld, %lld]: got %.9g want %.9g (tol %.3g)\n",
                    int8_cache ? " (int8 cache)" : "", bitnet::IsaName(isa), (long long)g, (long long)h, (long long)slots, (long long)gi, (long long)i,
                    got, want, tol);
      }
    }
  }
}

}  // namespace

// The int8 kernels' float fallback (attention_kernel.h): a query with a NaN gives NaN, not codes
// of garbage, in every output of its head and only there.
void CheckInt8NonFinite(bitnet::Isa isa) {
  const int64_t g = 4, h = 128, n = 100;
  std::vector<float> q(g * h, 0.5f), k_scale(n, 0.01f), v_scale(n, 0.02f);
  std::vector<int8_t> k8(n * h), v8(n * h);
  for (int64_t i = 0; i < n * h; ++i) {
    k8[i] = static_cast<int8_t>(i % 255 - 127);
    v8[i] = static_cast<int8_t>((7 * i) % 255 - 127);
  }
  q[h + 5] = std::nanf("");  // head 1
  std::vector<float> scratch(bitnet::ScratchFloats(g, h)), partial(bitnet::PartialFloats(g, h)), out(g * h);
  if (bitnet::CodeQueriesInt16(isa, q.data(), g, h, scratch.data())) {
    ++failures;
    std::printf("FAIL CodeQueriesInt16 isa=%s: a NaN query must take the float arithmetic\n", bitnet::IsaName(isa));
  }
  bitnet::AttendChunkInt8(isa, q.data(), g, h, k8.data(), v8.data(), k_scale.data(), v_scale.data(), n, 0.088f,
                          scratch.data(), partial.data());
  bitnet::MergeChunks(partial.data(), 1, g, h, out.data());
  bool ok = true;
  for (int64_t gi = 0; gi < g; ++gi) {
    for (int64_t i = 0; i < h; ++i) ok &= std::isnan(out[gi * h + i]) == (gi == 1);
  }
  if (!ok) {
    ++failures;
    std::printf("FAIL attention (int8 cache) isa=%s: a NaN in head 1's query must give NaN there, finite elsewhere\n",
                bitnet::IsaName(isa));
  }
}

// Transposed keys (attention_kernel.h): TransposeKeysInt8 writes its layout on every path, and
// AttendChunkInt8 given them returns the bits it returns without them, also where they were
// transposed from more slots than the query attends (as a prefill chunk's are).
void CheckTransposedKeys(bitnet::Isa isa, int64_t g, int64_t h, std::mt19937& rng) {
  const int64_t chunk = bitnet::kAttentionChunk;
  std::uniform_int_distribution<int> code(-128, 127);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> slot_scale(0.002f, 0.05f);
  std::vector<int8_t> k8(chunk * h), v8(chunk * h);
  std::vector<float> q(g * h), k_scale(chunk), v_scale(chunk);
  for (auto& x : k8) x = static_cast<int8_t>(code(rng));
  for (auto& x : v8) x = static_cast<int8_t>(code(rng));
  for (auto& x : q) x = normal(rng);
  for (int64_t j = 0; j < chunk; ++j) k_scale[j] = slot_scale(rng), v_scale[j] = slot_scale(rng);
  std::vector<int16_t> kt(bitnet::TransposedKeysElements(h), -1);
  for (int64_t n_built : {int64_t{1}, int64_t{37}, chunk}) {
    bitnet::TransposeKeysInt8(isa, k8.data(), n_built, h, kt.data());
    bool layout_ok = true;
    for (int64_t d = 0; d < bitnet::KeyPairs(h); ++d)
      for (int64_t j = 0; j < chunk; ++j)
        for (int64_t e = 0; e < 2; ++e) {
          const int16_t want = j < n_built && 2 * d + e < h ? k8[j * h + 2 * d + e] : 0;
          layout_ok &= kt[(d * chunk + j) * 2 + e] == want;
        }
    if (!layout_ok && ++failures <= 20) {
      std::printf("FAIL TransposeKeysInt8 isa=%s h=%lld n=%lld: layout differs\n", bitnet::IsaName(isa),
                  (long long)h, (long long)n_built);
    }
    for (int64_t n : {int64_t{1}, int64_t{5}, int64_t{16}, int64_t{17}, int64_t{37}, int64_t{100}, chunk}) {
      if (n > n_built) continue;
      std::vector<float> scratch(bitnet::ScratchFloats(g, h)), want(bitnet::PartialFloats(g, h)),
          got(bitnet::PartialFloats(g, h));
      bitnet::AttendChunkInt8(isa, q.data(), g, h, k8.data(), v8.data(), k_scale.data(), v_scale.data(), n, 0.088f,
                              scratch.data(), want.data());
      bitnet::AttendChunkInt8(isa, q.data(), g, h, k8.data(), v8.data(), k_scale.data(), v_scale.data(), n, 0.088f,
                              scratch.data(), got.data(), kt.data());
      if (std::memcmp(want.data(), got.data(), want.size() * sizeof(float)) != 0 && ++failures <= 20) {
        std::printf("FAIL attention (int8 cache, transposed keys) isa=%s g=%lld h=%lld n=%lld (of %lld): other bits\n",
                    bitnet::IsaName(isa), (long long)g, (long long)h, (long long)n, (long long)n_built);
      }
      // The query coded once (CodeQueriesInt16), then two chunks from the same scratch.
      std::vector<float> coded_scratch(bitnet::ScratchFloats(g, h));
      if (!bitnet::CodeQueriesInt16(isa, q.data(), g, h, coded_scratch.data()) && ++failures <= 20) {
        std::printf("FAIL CodeQueriesInt16 isa=%s g=%lld h=%lld: a finite query must take the integer arithmetic\n",
                    bitnet::IsaName(isa), (long long)g, (long long)h);
      }
      for (int round = 0; round < 2; ++round) {
        bitnet::AttendChunkInt8(isa, q.data(), g, h, k8.data(), v8.data(), k_scale.data(), v_scale.data(), n, 0.088f,
                                coded_scratch.data(), got.data(), round == 0 ? kt.data() : nullptr, true);
        if (std::memcmp(want.data(), got.data(), want.size() * sizeof(float)) != 0 && ++failures <= 20) {
          std::printf("FAIL attention (int8 cache, query coded before) isa=%s g=%lld h=%lld n=%lld round %d: other bits\n",
                      bitnet::IsaName(isa), (long long)g, (long long)h, (long long)n, round);
        }
      }
    }
  }
}

// Failures on path `isa` (printed, at most 20 lines).
int CheckAttention(bitnet::Isa isa) {
  failures = 0;
  std::mt19937 rng(4321);
  CheckExp(isa);
  // Head dims below, at and past a vector (8 floats), odd ones; slot counts below, at and past
  // the 4-slot blocks and the 128-slot chunks.
  for (int64_t g : {1, 2, 4, 5}) {
    for (int64_t h : {1, 3, 8, 13, 64, 72, 80, 128}) {
      for (int64_t slots : {1, 3, 4, 5, 9, 127, 128, 129, 300, 513}) {
        for (bool int8_cache : {false, true}) CheckChunkedAttention(isa, g, h, slots, int8_cache, rng);
      }
    }
  }
  // A head dim past kInt8MaxExactDim: the int8 cache in float arithmetic.
  for (int64_t slots : {5, 129}) CheckChunkedAttention(isa, 4, 300, slots, true, rng);
  CheckInt8NonFinite(isa);
  for (int64_t g : {1, 4, 5}) {
    for (int64_t h : {1, 3, 13, 31, 32, 33, 64, 72, 128, 256}) CheckTransposedKeys(isa, g, h, rng);
  }
  return failures;
}
