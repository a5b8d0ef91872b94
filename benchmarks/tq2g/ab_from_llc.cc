#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <cstdlib>
#include <functional>
#include <random>
#include <vector>
#include <algorithm>
#include <thread>
#include "gemm.h"
#include "layout.h"
namespace bitnet_old {
enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512Vnni = 2, kNeon = 3, kNeonDot = 4 };
void TernaryGroupGemmF32(Isa isa, const int8_t* x_q, const int32_t* x_group, int64_t rows, int64_t kb,
                         const uint8_t* w, const float* w_scale, int64_t group_k, int64_t groups, int64_t g_begin,
                         int64_t g_end, int64_t n_total, float* dot);
int64_t TernaryGroupGemmGroupsPerTask(Isa isa, int64_t rows);
}
using namespace bitnet;
// a 2-thread spin pool: run(fn) calls fn(0) here and fn(1) on the helper
struct Pool {
  std::atomic<int> gen{0}, done{0}; std::function<void(int)> fn; bool stop = false; std::thread th;
  Pool() { th = std::thread([this] { int seen = 0; while (true) { while (gen.load() == seen) {} seen = gen.load(); if (stop) return; fn(1); done.fetch_add(1); } }); }
  void run(std::function<void(int)> f) { fn = f; done = 0; gen.fetch_add(1); fn(0); while (done.load() == 0) {} }
  ~Pool() { stop = true; gen.fetch_add(1); th.join(); }
};
int main(int argc, char** argv) {
  int64_t K = atoi(argv[1]), N = atoi(argv[2]), M = atoi(argv[3]); int isa_i = atoi(argv[4]);
  int64_t G = 64, groups = K / G;
  int64_t kp = TernaryTileKp(K), tiles = (N + 15) / 16;
  int64_t kb = CeilDiv(K, kBlockK), kpo = kb * kBlockK, rg = CeilDiv(N, kRowsPerGroup);
  std::mt19937 rng(1);
  std::vector<int8_t> t(N * K), x(M * kp, 0), xo(M * kpo, 0);
  for (auto& v : t) v = (int)(rng() % 3) - 1;
  for (int64_t m = 0; m < M; ++m) for (int64_t k = 0; k < K; ++k) xo[m * kpo + k] = x[m * kp + k] = (int)(rng() % 255) - 127;
  std::vector<uint8_t> w(tiles * TernaryTileBytes(kp)), wo(rg * kb * kGroupBlockBytes);
  PackTernaryTiles(t.data(), N, K, w.data());
  PackTernary(t.data(), N, K, wo.data());
  std::vector<float> sc(groups * N);
  for (auto& v : sc) v = 0.5f + (rng() % 100) / 100.0f;
  std::vector<int32_t> xg(groups * M), xgo(groups * M);
  TernaryGroupSums(x.data(), M, kp, G, groups, xg.data());
  TernaryGroupSums(xo.data(), M, kpo, G, groups, xgo.data());
  std::vector<float> out(M * N), outo(M * N);
  Pool pool;
  auto run_new = [&](int nt) { pool.run([&](int i) { if (i >= nt) return; int64_t a = tiles * i / nt, b = tiles * (i + 1) / nt;
      TernaryGroupGemmF32((Isa)isa_i, x.data(), xg.data(), M, kp, w.data(), sc.data(), G, groups, a, b, N, out.data()); }); };
  int64_t task = bitnet_old::TernaryGroupGemmGroupsPerTask((bitnet_old::Isa)isa_i, M);
  auto run_old = [&](int nt) { pool.run([&](int i) { if (i >= nt) return; int64_t tasks = CeilDiv(rg, task); int64_t a = tasks * i / nt * task, b = std::min(rg, tasks * (i + 1) / nt * task);
      bitnet_old::TernaryGroupGemmF32((bitnet_old::Isa)isa_i, xo.data(), xgo.data(), M, kb, wo.data(), sc.data(), G, groups, a, b, N, outo.data()); }); };
  for (int nt : {1, 2}) {
    run_new(nt); run_old(nt);
    for (int64_t i = 0; i < M * N; ++i) if (std::memcmp(&out[i], &outo[i], 4)) { printf("MISMATCH at %ld: %a %a\n", i, out[i], outo[i]); return 1; }
    std::vector<double> tn, to;
    for (int r = 0; r < 400; ++r) {
      auto a = std::chrono::steady_clock::now(); run_new(nt); auto b = std::chrono::steady_clock::now(); run_old(nt); auto c = std::chrono::steady_clock::now();
      tn.push_back(std::chrono::duration<double, std::micro>(b - a).count()); to.push_back(std::chrono::duration<double, std::micro>(c - b).count());
    }
    std::sort(tn.begin(), tn.end()); std::sort(to.begin(), to.end());
    double bytes = w.size() + sc.size() * 4.0;
    printf("K=%ld N=%ld M=%ld isa=%d threads=%d: new median %.0f us (%.1f GB/s, min %.0f), old %.0f (min %.0f): new/old %.2f\n", K, N, M, isa_i, nt, tn[200], bytes / tn[200] / 1e3, tn[0], to[200], to[0], tn[200] / to[200]);
  }
}
