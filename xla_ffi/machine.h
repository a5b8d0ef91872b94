// This machine's limits, for the benchmarks: streaming read bandwidth and the int8 multiply-add
// peak, each measured with the loads / the instruction of a kernel path (see machine.cc).
#ifndef BITNET_JAX_XLA_FFI_MACHINE_H_
#define BITNET_JAX_XLA_FFI_MACHINE_H_

#include <cstdint>

#include "cpu_isa.h"
#include "xla/ffi/api/ffi.h"

namespace bitnet {

// The sum of the bytes p[0..n) (mod 2^64), read with the loads of path `isa`, fetching the stream
// `read_ahead` bytes ahead into L2 (0: the hardware prefetcher alone; the scalar loop never does).
uint64_t SumBytes(Isa isa, const uint8_t* p, int64_t n, int64_t read_ahead);

// One thread's int8 multiply-add loop on path `isa`, all in registers: `iterations` rounds over
// several independent accumulators, accumulator u multiplying a (as u8) by int8(b + u) in every
// lane. Returns the sum of every int32 lane of every accumulator (each lane wraps mod 2^32) and
// sets *macs to the multiply-adds it executed. See machine.cc for what each path's round holds.
int64_t Int8PeakLoop(Isa isa, int64_t iterations, uint8_t a, int8_t b, int64_t* macs);

// What Int8PeakLoop runs on path `isa`, in words (paths without a loop of their own run the scalar one).
const char* Int8PeakInstruction(Isa isa);

}  // namespace bitnet

XLA_FFI_DECLARE_HANDLER_SYMBOL(BitnetReadBandwidth);
XLA_FFI_DECLARE_HANDLER_SYMBOL(BitnetInt8Peak);

#endif  // BITNET_JAX_XLA_FFI_MACHINE_H_
