// What the x86-64 kernel files share: the target attributes of their AVX2 and AVX-512 VNNI
// functions, and the two multiply-add steps written as inline assembly. Include it only where
// BITNET_JAX_X86_SIMD is set (cpu_isa.h).
#ifndef BITNET_JAX_XLA_FFI_X86_SIMD_H_
#define BITNET_JAX_XLA_FFI_X86_SIMD_H_

#include "cpu_isa.h"

#if !BITNET_JAX_X86_SIMD
#error "x86_simd.h is for x86-64 builds (BITNET_JAX_X86_SIMD)"
#endif

// GCC 12's AVX-512 headers build some results from _mm*_undefined_*() and then warn that they
// "may be used uninitialized"; the warning is about the header, not this code.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#define BITNET_AVX2 __attribute__((target("avx2,fma")))
#define BITNET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
// 256-bit helpers that functions of both targets inline: GCC inlines only into a caller whose
// target holds the callee's, and the AVX-512 target implies AVX2 but not FMA.
#define BITNET_AVX2_SHARED __attribute__((target("avx2")))

namespace bitnet {

// acc += maddubs(codes, x) in int16 lanes. From the intrinsics GCC emits the add into the
// product's register and a move back to the accumulator, and it loads x into a register first;
// the inline assembly names the accumulator as read-write and lets x be a memory operand, so a
// step is the peak loop's two instructions (machine.cc, PeakAvx2). The assembly's operand is a
// local copy, not `acc` itself: an asm output written through the reference kept GCC from
// turning a caller's array of accumulators into registers (as for Dpbusd below).
BITNET_AVX2 inline void MaddubsAdd(__m256i& acc, __m256i codes, __m256i x) {
  __m256i a = acc, t;
  asm("vpmaddubsw %[x], %[c], %[t]\n\t"
      "vpaddw %[t], %[acc], %[acc]"
      : [acc] "+x"(a), [t] "=&x"(t)
      : [c] "x"(codes), [x] "xm"(x));
  acc = a;
}

// acc += u8 . s8 (4-way dot products into int32 lanes). GCC compiles the intrinsic as if it
// were not destructive: it copies every accumulator before the instruction and spills the
// copies, which halves the inner loop's speed. The inline assembly names the accumulator as
// read-write, through a local copy: with `acc` itself as the output, a caller's array of
// accumulators could stay in memory, loaded and stored at every step (GCC 12's scalar
// replacement skips arrays written by asm through a may_alias reference; the group-scale prefill
// tile ran 3x slower so).
BITNET_AVX512 inline void Dpbusd(__m512i& acc, __m512i u8, __m512i s8) {
#if defined(__GNUC__) && !defined(__clang__)
  __m512i a = acc;
  asm("vpdpbusd %2, %1, %0" : "+v"(a) : "v"(u8), "v"(s8));
  acc = a;
#else
  acc = _mm512_dpbusd_epi32(acc, u8, s8);
#endif
}

}  // namespace bitnet

#endif  // BITNET_JAX_XLA_FFI_X86_SIMD_H_
