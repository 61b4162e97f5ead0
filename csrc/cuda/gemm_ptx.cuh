// PTX building blocks of the GEMM kernels (csrc/cuda/gemm_kernel.cuh): cp.async, ldmatrix,
// integer mma.sync, and the register-level INT4 / INT3 -> INT8 unpacks of the Hopper path.
//
// Fragment layouts assumed (PTX ISA, "Matrix fragments for mma.m16n8k32 / m16n8k64"), with
// lane = 4 * g + t (g = groupID in 0..7, t = threadID_in_group in 0..3):
//
//  mma.m16n8k32 .s8 (A row-major 16x32, B "col" = W rows [n][k]):
//    A a0: row g,   k 4t..4t+3      a1: row g+8, k 4t..4t+3
//      a2: row g,   k 16+4t..+3     a3: row g+8, k 16+4t..+3      (byte j of a reg = k + j)
//    B b0: n g, k 4t..4t+3          b1: n g, k 16+4t..+3
//    C c0,c1: row g, n 2t, 2t+1     c2,c3: row g+8, n 2t, 2t+1
//  mma.m16n8k64 .s4: the same with 8 nibbles per register (nibble j = k + j):
//    A a0: row g, k 8t..8t+7  a1: row g+8, k 8t..  a2: row g, k 32+8t..  a3: row g+8, k 32+8t..
//    B b0: n g, k 8t..8t+7    b1: n g, k 32+8t..;  C as above.
//  ldmatrix.m8n8.x4.b16: lanes 8i..8i+7 give the 8 row addresses (16 bytes each) of matrix i;
//    register i of lane 4g+t receives bytes 4t..4t+3 of row g of matrix i.
//
// So a "k-chunk" of 32 bytes per row (64 INT4 values or 32 INT8 values) gives every path the
// same ldmatrix registers: reg 0/1 = bytes 0..15 (rows g / g+8), reg 2/3 = bytes 16..31; lane
// (g, t) always holds bytes 4t..4t+3 of a 16-byte piece. For s4 and INT8 these are exactly the
// mma fragments above. For the INT4 -> INT8 path a 16-byte piece (32 INT4 values) is one k32
// step: the lane's 8 nibbles (k 8t..8t+7) split into even k -> a0/b0 slot and odd k -> a2/b1
// slot. That permutes k inside the step, identically for A and W, so the dot is unchanged.
#pragma once
#include <cstdint>

#include "pack_format.h"

namespace bisup {
namespace gemm {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared; src_bytes < 16 zero-fills the rest (0: all zeros, and
// src is not read).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// c += a * b over k = 64 signed 4-bit values (Ampere/Ada tensor cores).
__device__ __forceinline__ void mma_s4(int32_t (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// c += a * b over k = 32 signed 8-bit values (every arch >= sm_80, Hopper included).
__device__ __forceinline__ void mma_s8(int32_t (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 8 signed nibbles (nibble j = value j) -> int8 lanes holding 16 * value: the nibble is moved to
// the high half of its byte, where its two's complement sign is the byte's sign. even: values
// 0,2,4,6; odd: values 1,3,5,7. The 16x factor is removed (exactly) when a group is flushed.
__device__ __forceinline__ uint32_t int4_even_x16(uint32_t p) { return (p << 4) & 0xF0F0F0F0u; }
__device__ __forceinline__ uint32_t int4_odd_x16(uint32_t p) { return p & 0xF0F0F0F0u; }

// Four consecutive INT3 values 4s..4s+3 of a 32-value block (pack_format.h's int3_quad) -> int8
// lanes holding 32 * value: each 3-bit code moves to bits 5-7, where its sign bit is the byte's.
__device__ __forceinline__ uint32_t int3_quad_x32(uint32_t low_word, uint32_t high_word, int s) {
  return int3_quad(low_word, high_word, s) << 5;
}

// Lane t's INT3 values 8t..8t+7 of a block, split like int4_even/odd: even k in `even`, odd in `odd`.
// words: the block's 3 words; low bits of values 8t..8t+7 live in word t/2.
__device__ __forceinline__ void int3_lane_x32(uint32_t low_word, uint32_t high_word, int t, uint32_t& even,
                                              uint32_t& odd) {
  const uint32_t q0 = int3_quad_x32(low_word, high_word, 2 * t);      // values 8t .. 8t+3
  const uint32_t q1 = int3_quad_x32(low_word, high_word, 2 * t + 1);  // values 8t+4 .. 8t+7
  even = __byte_perm(q0, q1, 0x6420);  // bytes: q0.0, q0.2, q1.0, q1.2
  odd = __byte_perm(q0, q1, 0x7531);   // bytes: q0.1, q0.3, q1.1, q1.3
}

}  // namespace gemm
}  // namespace bisup
