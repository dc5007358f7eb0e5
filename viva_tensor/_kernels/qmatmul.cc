// viva_tensor CPU kernels, registered with XLA through the FFI API (jax.ffi).
//
// vt_qmatmul:  y[b, n] = sum_k x[b, k] * w[n, k]   (kn = 0: weight stored (N, K), packed and blocked along K)
//              y[b, n] = sum_k x[b, k] * w[k, n]   (kn = 1: weight stored (K, N), packed and blocked along N)
// vt_decode:   w[r, c] for a weight stored (R, C), packed and blocked along C (natural order, float32).
// vt_qmatmul_i8: y[b, n] = xs[b] * sum_blk s[n, blk] * sum_{k in blk} xq[b, k] * w[n, k]   (W8A8: int8 activations
//              per row with a float32 scale, int8 weight (N, K) with a float32 scale per block of K; int32 sums,
//              VNNI vpdpbusd where the CPU has it: (xq + 128) * w, minus 128 * w, per 4 bytes).
//
// A weight value is   lut[code] * scale[row, c / block] (+ offset[row, c / block])   for 4-bit codes, or
//                     code * scale[row, c / block] (+ offset)                        for int8 codes.
// Scales are read as the record stores them (scale_kind): 0 float32, 1 float16, 2 bfloat16, 3 one byte per block
// through a 256-entry float32 table (E4M3 times the tensor scale, E8M0). Offsets (offset_kind): 0 none, 1 float32,
// 2 float16, 3 packed 4-bit zero points (first block in the low nibble), offset = -zero * scale. So no call converts
// a plane to float32 first: the kernel streams the record's own bytes.
// 4-bit layouts: 0 = pairs, first value in the low nibble (E2M1 / blackwell, awq, int4_group);
//                1 = pairs, first value in the high nibble (NF4, bitsandbytes);
//                2 = GGML halves (byte j of a 32-value group holds value j low and value j + 16 high);
//                3 = int8 codes (one signed byte per value).
// From `gemm_min` rows of x on (an attribute: Python passes 16, or 0 for none), a blocked
// GEMM whose packing step is the decode (AVX-512 builds; see "GEMM" below). The portable build has no GEMM: there
// Python decodes the weight in panels with vt_decode and hands each panel to XLA's own GEMM.
// Work is split over XLA's intra-op thread pool (the FFI ThreadPool context), the calling thread included.
// Values are decoded 32 at a time (16 bytes of nibbles or 32 int8) into two 16-lane vectors in "decode order";
// instead of interleaving the decoded lanes we permute x (kn = 0) or y (kn = 1) once per call.
// Requirements (checked in Python, re-checked here): the packed axis is a multiple of 32, the block is 16 or a
// multiple of 32 dividing the packed axis.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <atomic>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__) || defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>  // also for half_to_float's F16C conversion on CPUs without AVX-512
#endif
#if defined(__AVX512F__)
#define VT_AVX512 1
#else
#define VT_AVX512 0
#endif
#if !VT_AVX512 && defined(__AVX2__) && defined(__FMA__)
#define VT_AVX2 1
#else
#define VT_AVX2 0
#endif

namespace ffi = xla::ffi;

namespace {

enum Layout : int { kLowFirst = 0, kHighFirst = 1, kHalves = 2, kInt8 = 3 };

// Original index (0..31) within a 32-value group of the value at decode position i.
inline int decode_perm(int layout, int i) {
  switch (layout) {
    case kLowFirst: return i < 16 ? 2 * i : 2 * (i - 16) + 1;
    case kHighFirst: return i < 16 ? 2 * i + 1 : 2 * (i - 16);
    default: return i;
  }
}

enum ScaleKind : int { kF32 = 0, kF16 = 1, kBF16 = 2, kByte = 3 };
enum OffsetKind : int { kNoOffset = 0, kOffF32 = 1, kOffF16 = 2, kZeroNibbles = 3 };

inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu, bits;
  if (exp == 0x1Fu) {
    bits = sign | 0x7F800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal half: normalise
    int e = -1;
    do { ++e; man <<= 1; } while ((man & 0x400u) == 0);
    bits = sign | ((112u - e) << 23) | ((man & 0x3FFu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

struct Planes {
  const uint8_t* codes;   // rows of packed values
  const float* lut;       // 16 floats (4-bit layouts)
  const void* scales;     // rows of blocks, as scale_kind says
  const void* offsets;    // rows of blocks (or of packed zero pairs), or nullptr
  const float* scale_table;  // 256 floats for kByte scales
  int scale_kind;
  int offset_kind;
  int64_t zrow;           // bytes of packed zero points per row (kZeroNibbles)
  int64_t row_bytes;      // bytes of codes per row
  int64_t nblk;           // blocks per row
  int64_t ngroups;        // 32-value groups per row
  int layout;
  int block;
  std::vector<int32_t> gblk;  // block index of each group (block >= 32); 2 * g for block 16
};

// The float32 scale of block `blk` of row `row`, and its offset (0 when there is none).
inline float scale_at(const Planes& p, int64_t row, int64_t blk) {
  const int64_t i = row * p.nblk + blk;
  switch (p.scale_kind) {
    case kF16: return half_to_float(static_cast<const uint16_t*>(p.scales)[i]);
    case kBF16: {
      const uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(p.scales)[i]) << 16;
      float f;
      std::memcpy(&f, &bits, 4);
      return f;
    }
    case kByte: return p.scale_table[static_cast<const uint8_t*>(p.scales)[i]];
    default: return static_cast<const float*>(p.scales)[i];
  }
}

inline float offset_at(const Planes& p, int64_t row, int64_t blk) {
  switch (p.offset_kind) {
    case kOffF32: return static_cast<const float*>(p.offsets)[row * p.nblk + blk];
    case kOffF16: return half_to_float(static_cast<const uint16_t*>(p.offsets)[row * p.nblk + blk]);
    case kZeroNibbles: {
      const uint8_t z = static_cast<const uint8_t*>(p.offsets)[row * p.zrow + blk / 2];
      return -static_cast<float>((blk & 1) ? (z >> 4) : (z & 15)) * scale_at(p, row, blk);
    }
    default: return 0.f;
  }
}

// The same with the kinds known at compile time (KD = scale_kind * 4 + offset_kind): no branch per group.
template <int KD>
inline float scale_t(const Planes& p, int64_t row, int64_t blk) {
  constexpr int SK = KD >> 2;
  const int64_t i = row * p.nblk + blk;
  if constexpr (SK == kF16) return half_to_float(static_cast<const uint16_t*>(p.scales)[i]);
  else if constexpr (SK == kByte) return p.scale_table[static_cast<const uint8_t*>(p.scales)[i]];
  else return static_cast<const float*>(p.scales)[i];
}

template <int KD>
inline float offset_t(const Planes& p, int64_t row, int64_t blk) {
  constexpr int OK = KD & 3;
  if constexpr (OK == kOffF16) {
    return half_to_float(static_cast<const uint16_t*>(p.offsets)[row * p.nblk + blk]);
  } else if constexpr (OK == kZeroNibbles) {
    const uint8_t z = static_cast<const uint8_t*>(p.offsets)[row * p.zrow + blk / 2];
    return -static_cast<float>((blk & 1) ? (z >> 4) : (z & 15)) * scale_t<KD>(p, row, blk);
  } else if constexpr (OK == kOffF32) {
    return static_cast<const float*>(p.offsets)[row * p.nblk + blk];
  } else {
    return 0.f;
  }
}

// The (scale_kind, offset_kind) pairs compiled into the vector kernels; Python widens any other pair to float32.
constexpr int kd(int sk, int ok) { return sk * 4 + ok; }

// Scalar decode of one group into decode order (also the reference for the vector path).
inline void decode_group_scalar(const Planes& p, int64_t row, int64_t g, float* out) {
  const uint8_t* c = p.codes + row * p.row_bytes + g * (p.layout == kInt8 ? 32 : 16);
  const bool off = p.offset_kind != kNoOffset;
  for (int i = 0; i < 32; ++i) {
    float v;
    if (p.layout == kInt8) {
      v = static_cast<float>(static_cast<int8_t>(c[i]));
    } else {
      int byte = c[i & 15];
      v = p.lut[i < 16 ? (byte & 15) : (byte >> 4)];
    }
    int orig = decode_perm(p.layout, i);
    int64_t blk = p.block == 16 ? 2 * g + orig / 16 : p.gblk[g];
    const float sc = scale_at(p, row, blk);
    out[i] = off ? __builtin_fmaf(v, sc, offset_at(p, row, blk)) : v * sc;
  }
}

#if VT_AVX512
template <int L, bool BS16, int KD>
inline void decode_group(const Planes& p, __m512 lut, int64_t row, int64_t g, __m512& wa, __m512& wb) {
  constexpr bool OFF = (KD & 3) != kNoOffset;
  const uint8_t* c = p.codes + row * p.row_bytes + g * (L == kInt8 ? 32 : 16);
  if (L != kInt8 && !BS16) {
    // one scale for the 32 values: scale the 16-entry table instead of the 32 values (the same products)
    const int64_t blk = p.gblk[g];
    const __m512 sv = _mm512_set1_ps(scale_t<KD>(p, row, blk));
    const __m512 t = OFF ? _mm512_fmadd_ps(lut, sv, _mm512_set1_ps(offset_t<KD>(p, row, blk))) : _mm512_mul_ps(lut, sv);
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c)));
    wa = _mm512_permutexvar_ps(v, t);
    wb = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), t);
    return;
  }
  __m512 a, b;
  if (L == kInt8) {
    a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c))));
    b = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + 16))));
  } else {
    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c)));
    a = _mm512_permutexvar_ps(v, lut);  // vpermps reads the low 4 bits of each index: no mask needed
    b = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut);
  }
  __m512 sa, sb, oa = _mm512_setzero_ps(), ob = _mm512_setzero_ps();
  if (!BS16) {
    int64_t blk = p.gblk[g];
    sa = sb = _mm512_set1_ps(scale_t<KD>(p, row, blk));
    if (OFF) oa = ob = _mm512_set1_ps(offset_t<KD>(p, row, blk));
  } else if (L == kLowFirst || L == kHighFirst) {
    // lanes 0..7 of both vectors hold values of block 2g, lanes 8..15 of block 2g + 1
    sa = sb = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(scale_t<KD>(p, row, 2 * g)),
                                   _mm512_set1_ps(scale_t<KD>(p, row, 2 * g + 1)));
    if (OFF)
      oa = ob = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(offset_t<KD>(p, row, 2 * g)),
                                     _mm512_set1_ps(offset_t<KD>(p, row, 2 * g + 1)));
  } else {
    sa = _mm512_set1_ps(scale_t<KD>(p, row, 2 * g));
    sb = _mm512_set1_ps(scale_t<KD>(p, row, 2 * g + 1));
    if (OFF) {
      oa = _mm512_set1_ps(offset_t<KD>(p, row, 2 * g));
      ob = _mm512_set1_ps(offset_t<KD>(p, row, 2 * g + 1));
    }
  }
  if (OFF) {
    wa = _mm512_fmadd_ps(a, sa, oa);
    wb = _mm512_fmadd_ps(b, sb, ob);
  } else {
    wa = _mm512_mul_ps(a, sa);
    wb = _mm512_mul_ps(b, sb);
  }
}

// decode_group's one-scale 4-bit case in two steps, so that a block of several groups scales its table once:
// block_table (the 16 values of the block's codes) and decode_with_table (the same bits as decode_group).
template <int KD>
inline __m512 block_table(const Planes& p, __m512 lut, int64_t row, int64_t blk) {
  constexpr bool OFF = (KD & 3) != kNoOffset;
  const __m512 sv = _mm512_set1_ps(scale_t<KD>(p, row, blk));
  return OFF ? _mm512_fmadd_ps(lut, sv, _mm512_set1_ps(offset_t<KD>(p, row, blk))) : _mm512_mul_ps(lut, sv);
}

inline void decode_with_table(const Planes& p, __m512 t, int64_t row, int64_t g, __m512& wa, __m512& wb) {
  const uint8_t* c = p.codes + row * p.row_bytes + g * 16;
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c)));
  wa = _mm512_permutexvar_ps(v, t);
  wb = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), t);
}

// Software prefetch of the codes of group g of `row` (one prefetch per 64-byte line): the kernels fetch the rows
// they will read next while decoding the current ones, so that a weight streamed from memory (not in cache) is
// not read one stall at a time. Rows past the end are not touched.
template <int L>
inline void prefetch_group(const Planes& p, int64_t row, int64_t rows, int64_t g) {
  constexpr int64_t gbytes = L == kInt8 ? 32 : 16, per_line = 64 / gbytes;
  if (row < rows && (g % per_line) == 0)
    _mm_prefetch(reinterpret_cast<const char*>(p.codes + row * p.row_bytes + g * gbytes), _MM_HINT_T0);
}

// kn = 0, rows [n0, n1): RN rows at a time, NB batch rows at a time, x already permuted to decode order.
// K is walked in chunks whose NB rows of x stay in L1 (16 KiB); the vector accumulators of a block of rows live in
// a small buffer between chunks. Every output is summed in the same order whatever B is (two accumulators, one
// per half of each 32-value group, added at the end).
template <int L, bool BS16, int KD, int NB>
void nk_rows(const Planes& p, const float* xp, int64_t B, int64_t K, float* y, int64_t N, int64_t b0, int64_t n0,
             int64_t n1) {
  const __m512 lut = _mm512_loadu_ps(p.lut);
  constexpr int RN = NB == 1 ? 4 : 2;  // one row of x: 4 weight rows at a time (8 independent FMA chains)
  constexpr int64_t RB = 128;  // rows per block
  const int64_t gk = std::max<int64_t>(1, (int64_t(4096) / (32 * NB)));  // groups per chunk: NB x 16 KiB / NB
  std::vector<__m512> accbuf(static_cast<size_t>(RB * NB * 2));
  for (int64_t nb0 = n0; nb0 < n1; nb0 += RB) {
    const int64_t nb1 = std::min(n1, nb0 + RB);
    for (auto& v : accbuf) v = _mm512_setzero_ps();
    for (int64_t g0 = 0; g0 < p.ngroups; g0 += gk) {
      const int64_t g1 = std::min(p.ngroups, g0 + gk);
      int64_t n = nb0;
      for (; n + RN <= nb1; n += RN) {
        __m512 acc[RN][NB][2];
        __m512* mem = accbuf.data() + (n - nb0) * NB * 2;
        for (int r = 0; r < RN; ++r)
          for (int b = 0; b < NB; ++b) {
            acc[r][b][0] = mem[(r * NB + b) * 2];
            acc[r][b][1] = mem[(r * NB + b) * 2 + 1];
          }
        // 4-bit codes with one scale per block of several groups: the block's table is scaled once per row (with
        // blocks of 32 it is per group anyway, and the test costs: measured slower for Q4_0)
        const bool kTable = L != kInt8 && !BS16 && p.block >= 64;
        __m512 tab[RN];
        int64_t tblk = -1;
        for (int64_t g = g0; g < g1; ++g) {
          __m512 w[RN][2];
          for (int r = 0; r < RN; ++r) prefetch_group<L>(p, n + RN + r, n1, g);
          if (kTable) {
            if (p.gblk[g] != tblk) {
              tblk = p.gblk[g];
              for (int r = 0; r < RN; ++r) tab[r] = block_table<KD>(p, lut, n + r, tblk);
            }
            for (int r = 0; r < RN; ++r) decode_with_table(p, tab[r], n + r, g, w[r][0], w[r][1]);
          } else {
            for (int r = 0; r < RN; ++r) decode_group<L, BS16, KD>(p, lut, n + r, g, w[r][0], w[r][1]);
          }
          for (int b = 0; b < NB; ++b) {
            const float* xb = xp + (b0 + b) * K + g * 32;
            __m512 x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);
            for (int r = 0; r < RN; ++r) {
              acc[r][b][0] = _mm512_fmadd_ps(w[r][0], x0, acc[r][b][0]);
              acc[r][b][1] = _mm512_fmadd_ps(w[r][1], x1, acc[r][b][1]);
            }
          }
        }
        for (int r = 0; r < RN; ++r)
          for (int b = 0; b < NB; ++b) {
            mem[(r * NB + b) * 2] = acc[r][b][0];
            mem[(r * NB + b) * 2 + 1] = acc[r][b][1];
          }
      }
      for (; n < nb1; ++n) {
        __m512* mem = accbuf.data() + (n - nb0) * NB * 2;
        __m512 acc[NB][2];
        for (int b = 0; b < NB; ++b) {
          acc[b][0] = mem[b * 2];
          acc[b][1] = mem[b * 2 + 1];
        }
        for (int64_t g = g0; g < g1; ++g) {
          __m512 w0, w1;
          decode_group<L, BS16, KD>(p, lut, n, g, w0, w1);
          for (int b = 0; b < NB; ++b) {
            const float* xb = xp + (b0 + b) * K + g * 32;
            acc[b][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xb), acc[b][0]);
            acc[b][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + 16), acc[b][1]);
          }
        }
        for (int b = 0; b < NB; ++b) {
          mem[b * 2] = acc[b][0];
          mem[b * 2 + 1] = acc[b][1];
        }
      }
    }
    for (int64_t n = nb0; n < nb1; ++n)  // row n + r of a pair was stored at the same place as a lone row
      for (int b = 0; b < NB; ++b) {
        const __m512* m = accbuf.data() + (n - nb0) * NB * 2 + b * 2;
        y[(b0 + b) * N + n] = _mm512_reduce_add_ps(_mm512_add_ps(m[0], m[1]));
      }
  }
}

// kn = 1, column groups [g0, g1) of the weight (K, N). Columns in chunks whose B x chunk accumulators stay in L1;
// rows of the weight KQ at a time: decoded once into a small buffer, then used by every batch row. The accumulators
// are in decode order; they are written back to y in natural order.
template <int KQ, int NB>
inline void kn_accumulate(const float* wbuf, int64_t gc, int64_t ng, const float* x, int64_t K, int64_t k, int kq,
                          float* acc, int64_t b0) {
  __m512 xv[NB][KQ];
  for (int b = 0; b < NB; ++b)
    for (int q = 0; q < KQ; ++q) xv[b][q] = _mm512_set1_ps(q < kq ? x[(b0 + b) * K + k + q] : 0.f);
  for (int64_t t = 0; t < ng; ++t) {
    __m512 s[NB][2];
    for (int b = 0; b < NB; ++b) {
      s[b][0] = _mm512_loadu_ps(acc + ((b0 + b) * gc + t) * 32);
      s[b][1] = _mm512_loadu_ps(acc + ((b0 + b) * gc + t) * 32 + 16);
    }
    for (int q = 0; q < KQ; ++q) {
      __m512 w0 = _mm512_loadu_ps(wbuf + (q * gc + t) * 32), w1 = _mm512_loadu_ps(wbuf + (q * gc + t) * 32 + 16);
      for (int b = 0; b < NB; ++b) {
        s[b][0] = _mm512_fmadd_ps(w0, xv[b][q], s[b][0]);
        s[b][1] = _mm512_fmadd_ps(w1, xv[b][q], s[b][1]);
      }
    }
    for (int b = 0; b < NB; ++b) {
      _mm512_storeu_ps(acc + ((b0 + b) * gc + t) * 32, s[b][0]);
      _mm512_storeu_ps(acc + ((b0 + b) * gc + t) * 32 + 16, s[b][1]);
    }
  }
}

template <int L, bool BS16, int KD>
void kn_cols(const Planes& p, const float* x, int64_t B, int64_t K, float* y, int64_t N, int64_t g0, int64_t g1) {
  constexpr int KQ = 8;
  const __m512 lut = _mm512_loadu_ps(p.lut);
  int perm[32];
  for (int i = 0; i < 32; ++i) perm[i] = decode_perm(L, i);
  // B x gc x 32 accumulators in 16 KiB, KQ x gc x 32 decoded values beside them
  const int64_t gc = std::max<int64_t>(1, std::min<int64_t>(g1 - g0, (int64_t(1) << 12) / (32 * std::max<int64_t>(B, 1))));
  std::vector<float> accv(static_cast<size_t>(B * gc * 32));
  std::vector<float> wv(static_cast<size_t>(KQ * gc * 32));
  float* acc = accv.data();
  float* wbuf = wv.data();
  for (int64_t c0 = g0; c0 < g1; c0 += gc) {
    const int64_t ng = std::min(gc, g1 - c0);
    std::fill(accv.begin(), accv.end(), 0.f);
    for (int64_t k = 0; k < K; k += KQ) {
      const int kq = static_cast<int>(std::min<int64_t>(KQ, K - k));
      for (int q = 0; q < KQ; ++q)
        for (int64_t t = 0; t < ng; ++t) {
          prefetch_group<L>(p, k + KQ + q, K, c0 + t);
          __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
          if (q < kq) decode_group<L, BS16, KD>(p, lut, k + q, c0 + t, a, b);
          _mm512_storeu_ps(wbuf + (q * gc + t) * 32, a);
          _mm512_storeu_ps(wbuf + (q * gc + t) * 32 + 16, b);
        }
      int64_t bb = 0;
      for (; bb + 4 <= B; bb += 4) kn_accumulate<KQ, 4>(wbuf, gc, ng, x, K, k, kq, acc, bb);
      for (; bb + 2 <= B; bb += 2) kn_accumulate<KQ, 2>(wbuf, gc, ng, x, K, k, kq, acc, bb);
      if (bb < B) kn_accumulate<KQ, 1>(wbuf, gc, ng, x, K, k, kq, acc, bb);
    }
    for (int64_t bb = 0; bb < B; ++bb)
      for (int64_t t = 0; t < ng; ++t) {
        const float* src = acc + (bb * gc + t) * 32;
        float* yb = y + bb * N + (c0 + t) * 32;
        for (int i = 0; i < 32; ++i) yb[perm[i]] = src[i];
      }
  }
}

// Decode order -> natural order inside a group of 32, as two-source permutes: natural lanes 0..15 are
// _mm512_permutex2var_ps(a, pa, b), lanes 16..31 the same with pb (a, b: the two decoded vectors).
inline void natural_perms(int layout, __m512i& pa, __m512i& pb) {
  alignas(64) int32_t ia[16], ib[16];
  int inv[32];
  for (int i = 0; i < 32; ++i) inv[decode_perm(layout, i)] = i;
  for (int j = 0; j < 16; ++j) {
    ia[j] = inv[j];
    ib[j] = inv[j + 16];
  }
  pa = _mm512_load_si512(ia);
  pb = _mm512_load_si512(ib);
}

template <int L, bool BS16, int KD>
void decode_rows(const Planes& p, float* w, int64_t C, int64_t r0, int64_t r1) {
  const __m512 lut = _mm512_loadu_ps(p.lut);
  __m512i pa, pb;
  natural_perms(L, pa, pb);
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t g = 0; g < p.ngroups; ++g) {
      __m512 a, b;
      decode_group<L, BS16, KD>(p, lut, r, g, a, b);
      float* out = w + r * C + g * 32;
      _mm512_storeu_ps(out, _mm512_permutex2var_ps(a, pa, b));
      _mm512_storeu_ps(out + 16, _mm512_permutex2var_ps(a, pb, b));
    }
}
#endif  // VT_AVX512

// Portable fallbacks (no AVX-512): decode a group to decode order, then plain loops.
void nk_rows_scalar(const Planes& p, const float* xp, int64_t B, int64_t K, float* y, int64_t N, int64_t n0,
                    int64_t n1) {
  float w[32];
  std::vector<float> acc(B);
  for (int64_t n = n0; n < n1; ++n) {
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t g = 0; g < p.ngroups; ++g) {
      decode_group_scalar(p, n, g, w);
      for (int64_t b = 0; b < B; ++b) {
        const float* xb = xp + b * K + g * 32;
        float s = 0.f;
        for (int i = 0; i < 32; ++i) s += w[i] * xb[i];
        acc[b] += s;
      }
    }
    for (int64_t b = 0; b < B; ++b) y[b * N + n] = acc[b];
  }
}

void kn_cols_scalar(const Planes& p, const float* x, int64_t B, int64_t K, float* y, int64_t N, int64_t g0,
                    int64_t g1) {
  float w[32];
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = g0 * 32; c < g1 * 32; ++c) y[b * N + c] = 0.f;
  for (int64_t k = 0; k < K; ++k)
    for (int64_t g = g0; g < g1; ++g) {
      decode_group_scalar(p, k, g, w);
      for (int64_t b = 0; b < B; ++b) {
        float xv = x[b * K + k];
        float* yb = y + b * N + g * 32;
        for (int i = 0; i < 32; ++i) yb[decode_perm(p.layout, i)] += w[i] * xv;
      }
    }
}

void decode_rows_scalar(const Planes& p, float* w, int64_t C, int64_t r0, int64_t r1) {
  float tmp[32];
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t g = 0; g < p.ngroups; ++g) {
      decode_group_scalar(p, r, g, tmp);
      for (int i = 0; i < 32; ++i) w[r * C + g * 32 + decode_perm(p.layout, i)] = tmp[i];
    }
}

// Scratch memory kept between calls. A fresh allocation of a few MiB costs a page fault per 4 KiB page (the
// kernel zeroing each) on every call: measured as a third of the GEMM path's time at MiniLM's shapes. Buffers go
// back to a small pool (at most kPoolBuffers, the smallest dropped first) and are reused by the next call whose
// need fits; their contents are not initialised.
class ScratchPool {
 public:
  struct Free {
    void operator()(float* f) const { std::free(f); }
  };
  struct Buffer {
    std::unique_ptr<float[], Free> data;
    size_t size = 0;
  };
  Buffer take(size_t n) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto best = free_.end();
    for (auto it = free_.begin(); it != free_.end(); ++it)
      if (it->size >= n && (best == free_.end() || it->size < best->size)) best = it;
    if (best != free_.end()) {
      Buffer b = std::move(*best);
      free_.erase(best);
      return b;
    }
    Buffer b;
    // 64-byte aligned (a cache line; malloc's large blocks start 16 bytes into a page, so that every vector load
    // of the GEMM's packed x, decoded blocks and accumulators straddled two lines)
    b.size = (std::max<size_t>(n, 16) + 15) / 16 * 16;
    b.data.reset(static_cast<float*>(std::aligned_alloc(64, b.size * sizeof(float))));
    if (!b.data) throw std::bad_alloc();
    return b;
  }
  void give(Buffer b) {
    std::lock_guard<std::mutex> lock(mutex_);
    free_.push_back(std::move(b));
    if (free_.size() > kPoolBuffers) {
      auto smallest = std::min_element(free_.begin(), free_.end(),
                                       [](const Buffer& a, const Buffer& c) { return a.size < c.size; });
      free_.erase(smallest);
    }
  }

 private:
  static constexpr size_t kPoolBuffers = 8;
  std::mutex mutex_;
  std::vector<Buffer> free_;
};

ScratchPool& scratch_pool() {
  static ScratchPool pool;
  return pool;
}

// n floats of scratch from the pool for the lifetime of this object (uninitialised).
class Scratch {
 public:
  explicit Scratch(size_t n) : buf_(scratch_pool().take(n)) {}
  ~Scratch() { scratch_pool().give(std::move(buf_)); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  float* data() { return buf_.data.get(); }

 private:
  ScratchPool::Buffer buf_;
};

// Splits [0, total) into contiguous chunks, each a multiple of `align` except the last, run on XLA's own intra-op
// thread pool (threads of our own competed with the pool's workers): up to `per_thread` chunks per thread,
// claimed one at a time from a shared counter by the caller and by `threads - 1` pool tasks. A thread that is
// slowed (a core shared with another process) takes fewer chunks instead of holding back the whole call, and a
// busy pool cannot deadlock it: the caller claims whatever chunks no worker has taken. The chunks' bounds depend
// only on (total, align, threads), never on which thread runs them.
// (per_thread = 1: one fixed range per thread, for a kernel whose chunks of columns read the weight in shorter
// runs: the fused (K, N) kernel at one row of x was 1.3x slower with 4.)
template <typename F>
void parallel_for_pool(int64_t total, int64_t align, ffi::ThreadPool& pool, int threads, F&& f, int per_thread = 4) {
  const int64_t units = (total + align - 1) / align;
  const int t = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, units)));
  if (t == 1) {
    f(0, total);
    return;
  }
  const int64_t chunks = std::min<int64_t>(units, int64_t(t) * std::max(1, per_thread));
  struct State {
    std::atomic<int64_t> next{0};  // the next chunk to claim
    std::atomic<int64_t> done{0};  // chunks finished
  };
  auto st = std::make_shared<State>();
  auto run = [units, chunks, align, total](F& fn, int64_t c) {
    const int64_t a = (units * c) / chunks * align, b = c + 1 == chunks ? total : (units * (c + 1)) / chunks * align;
    fn(a, std::min(b, total));
  };
  auto* fp = &f;
  for (int i = 1; i < t; ++i)
    pool.Schedule([st, fp, chunks, run] {
      // the caller waits until every claimed chunk is done: fp is alive while a chunk runs
      for (int64_t c; (c = st->next.fetch_add(1)) < chunks;) {
        run(*fp, c);
        st->done.fetch_add(1, std::memory_order_release);
      }
    });
  for (int64_t c; (c = st->next.fetch_add(1)) < chunks;) {
    run(f, c);
    st->done.fetch_add(1, std::memory_order_release);
  }
  while (st->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

#if VT_AVX512
// kn = 0 for B > 4: NB rows of x against rows r0..r1 of a decoded block (wbuf: RB rows x GK groups, two vectors
// each), accumulators of (row, batch row) in accbuf. The same FMAs per output, in the same order, as nk_rows.
constexpr int64_t kWideRB = 16;  // weight rows per decoded block
constexpr int64_t kWideGK = 8;   // groups per decoded block: 16 x 8 x 128 B = 16 KiB
template <int NB>
inline void nk_wide_accumulate(const __m512* wbuf, int64_t rows, int64_t ng, const float* xp, int64_t K,
                               int64_t g0, int64_t b0, __m512* accbuf, int64_t B) {
  int64_t r = 0;
  for (; r + 2 <= rows; r += 2) {
    __m512 acc[2][NB][2];
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < NB; ++j) {
        acc[i][j][0] = accbuf[((r + i) * B + b0 + j) * 2];
        acc[i][j][1] = accbuf[((r + i) * B + b0 + j) * 2 + 1];
      }
    for (int64_t t = 0; t < ng; ++t) {
      const __m512* w0 = wbuf + (r * kWideGK + t) * 2;
      const __m512* w1 = wbuf + ((r + 1) * kWideGK + t) * 2;
      for (int j = 0; j < NB; ++j) {
        const float* xb = xp + (b0 + j) * K + (g0 + t) * 32;
        const __m512 x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);
        acc[0][j][0] = _mm512_fmadd_ps(w0[0], x0, acc[0][j][0]);
        acc[0][j][1] = _mm512_fmadd_ps(w0[1], x1, acc[0][j][1]);
        acc[1][j][0] = _mm512_fmadd_ps(w1[0], x0, acc[1][j][0]);
        acc[1][j][1] = _mm512_fmadd_ps(w1[1], x1, acc[1][j][1]);
      }
    }
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < NB; ++j) {
        accbuf[((r + i) * B + b0 + j) * 2] = acc[i][j][0];
        accbuf[((r + i) * B + b0 + j) * 2 + 1] = acc[i][j][1];
      }
  }
  for (; r < rows; ++r) {
    __m512 acc[NB][2];
    for (int j = 0; j < NB; ++j) {
      acc[j][0] = accbuf[(r * B + b0 + j) * 2];
      acc[j][1] = accbuf[(r * B + b0 + j) * 2 + 1];
    }
    for (int64_t t = 0; t < ng; ++t) {
      const __m512* w0 = wbuf + (r * kWideGK + t) * 2;
      for (int j = 0; j < NB; ++j) {
        const float* xb = xp + (b0 + j) * K + (g0 + t) * 32;
        acc[j][0] = _mm512_fmadd_ps(w0[0], _mm512_loadu_ps(xb), acc[j][0]);
        acc[j][1] = _mm512_fmadd_ps(w0[1], _mm512_loadu_ps(xb + 16), acc[j][1]);
      }
    }
    for (int j = 0; j < NB; ++j) {
      accbuf[(r * B + b0 + j) * 2] = acc[j][0];
      accbuf[(r * B + b0 + j) * 2 + 1] = acc[j][1];
    }
  }
}

// kn = 0, B > 4: each 32-value group is decoded once per call (into a 16 KiB block that stays in L1) and used by
// every row of x, instead of once per 4 rows of x.
template <int L, bool BS16, int KD>
void nk_rows_wide(const Planes& p, const float* xp, int64_t B, int64_t K, float* y, int64_t N, int64_t n0,
                  int64_t n1) {
  const __m512 lut = _mm512_loadu_ps(p.lut);
  std::vector<__m512> accbuf(static_cast<size_t>(kWideRB * B * 2));
  std::vector<__m512> wbuf(static_cast<size_t>(kWideRB * kWideGK * 2));
  for (int64_t nb0 = n0; nb0 < n1; nb0 += kWideRB) {
    const int64_t rows = std::min(n1, nb0 + kWideRB) - nb0;
    for (auto& v : accbuf) v = _mm512_setzero_ps();
    for (int64_t g0 = 0; g0 < p.ngroups; g0 += kWideGK) {
      const int64_t ng = std::min(p.ngroups, g0 + kWideGK) - g0;
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t t = 0; t < ng; ++t) {
          prefetch_group<L>(p, nb0 + r, n1, g0 + kWideGK + t);  // the same rows' next groups
          __m512* w = wbuf.data() + (r * kWideGK + t) * 2;
          decode_group<L, BS16, KD>(p, lut, nb0 + r, g0 + t, w[0], w[1]);
        }
      int64_t b = 0;
      for (; b + 4 <= B; b += 4) nk_wide_accumulate<4>(wbuf.data(), rows, ng, xp, K, g0, b, accbuf.data(), B);
      switch (B - b) {
        case 3: nk_wide_accumulate<3>(wbuf.data(), rows, ng, xp, K, g0, b, accbuf.data(), B); break;
        case 2: nk_wide_accumulate<2>(wbuf.data(), rows, ng, xp, K, g0, b, accbuf.data(), B); break;
        case 1: nk_wide_accumulate<1>(wbuf.data(), rows, ng, xp, K, g0, b, accbuf.data(), B); break;
        default: break;
      }
    }
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t b = 0; b < B; ++b) {
        const __m512* m = accbuf.data() + (r * B + b) * 2;
        y[b * N + nb0 + r] = _mm512_reduce_add_ps(_mm512_add_ps(m[0], m[1]));
      }
  }
}

// Dispatch on the batch chunk (NB) for one range; the batch is processed in chunks of at most MaxNB rows.
template <int L, bool BS16, int KD>
void nk_range(const Planes& p, const float* xp, int64_t B, int64_t K, float* y, int64_t N, int64_t n0, int64_t n1) {
  if (B > 4) return nk_rows_wide<L, BS16, KD>(p, xp, B, K, y, N, n0, n1);
  int64_t b = 0;
  for (; b + 4 <= B; b += 4) nk_rows<L, BS16, KD, 4>(p, xp, B, K, y, N, b, n0, n1);
  switch (B - b) {
    case 3: nk_rows<L, BS16, KD, 3>(p, xp, B, K, y, N, b, n0, n1); break;
    case 2: nk_rows<L, BS16, KD, 2>(p, xp, B, K, y, N, b, n0, n1); break;
    case 1: nk_rows<L, BS16, KD, 1>(p, xp, B, K, y, N, b, n0, n1); break;
    default: break;
  }
}

// kn = 1, one row of x: rows of the weight KQ at a time decoded in registers straight into the accumulators (L1).
template <int L, bool BS16, int KD>
void kn_cols_b1(const Planes& p, const float* x, int64_t K, float* y, int64_t g0, int64_t g1) {
  constexpr int KQ = 8;
  const __m512 lut = _mm512_loadu_ps(p.lut);
  int perm[32];
  for (int i = 0; i < 32; ++i) perm[i] = decode_perm(L, i);
  std::vector<float> accv(static_cast<size_t>((g1 - g0) * 32), 0.f);
  float* acc = accv.data();
  int64_t k = 0;
  if constexpr (L != kInt8 && !BS16) {
    // 4-bit codes, one scale (and offset) per block of 32 or more values: each row's scaled 16-entry table is
    // built once per block (int4_group / AWQ: once per 4 groups) and kept in a register while the block's groups
    // are decoded: the same table decode_group builds, so the same values. At batch 1 the table's scalar work
    // (fp16 scale, packed zero point) costs more than the two FMAs of a group.
    constexpr bool OFF = (KD & 3) != kNoOffset;
    for (; k + KQ <= K; k += KQ) {
      __m512 xv[KQ], tq[KQ];
      for (int q = 0; q < KQ; ++q) xv[q] = _mm512_set1_ps(x[k + q]);
      int64_t prev = -1;
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t blk = p.gblk[g];
        if (blk != prev) {
          for (int q = 0; q < KQ; ++q) {
            const __m512 sv = _mm512_set1_ps(scale_t<KD>(p, k + q, blk));
            tq[q] = OFF ? _mm512_fmadd_ps(lut, sv, _mm512_set1_ps(offset_t<KD>(p, k + q, blk))) : _mm512_mul_ps(lut, sv);
          }
          prev = blk;
        }
        float* a = acc + (g - g0) * 32;
        for (int q = 0; q < KQ; ++q) prefetch_group<L>(p, k + KQ + q, K, g);
        __m512 s0 = _mm512_loadu_ps(a), s1 = _mm512_loadu_ps(a + 16);
        for (int q = 0; q < KQ; ++q) {
          const __m512i v = _mm512_cvtepu8_epi32(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(p.codes + (k + q) * p.row_bytes + g * 16)));
          s0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(v, tq[q]), xv[q], s0);
          s1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), tq[q]), xv[q], s1);
        }
        _mm512_storeu_ps(a, s0);
        _mm512_storeu_ps(a + 16, s1);
      }
    }
  }
  for (; k + KQ <= K; k += KQ) {
    __m512 xv[KQ];
    for (int q = 0; q < KQ; ++q) xv[q] = _mm512_set1_ps(x[k + q]);
    for (int64_t g = g0; g < g1; ++g) {
      float* a = acc + (g - g0) * 32;
      for (int q = 0; q < KQ; ++q) prefetch_group<L>(p, k + KQ + q, K, g);
      __m512 s0 = _mm512_loadu_ps(a), s1 = _mm512_loadu_ps(a + 16);
      for (int q = 0; q < KQ; ++q) {
        __m512 w0, w1;
        decode_group<L, BS16, KD>(p, lut, k + q, g, w0, w1);
        s0 = _mm512_fmadd_ps(w0, xv[q], s0);
        s1 = _mm512_fmadd_ps(w1, xv[q], s1);
      }
      _mm512_storeu_ps(a, s0);
      _mm512_storeu_ps(a + 16, s1);
    }
  }
  for (; k < K; ++k) {
    __m512 xv = _mm512_set1_ps(x[k]);
    for (int64_t g = g0; g < g1; ++g) {
      float* a = acc + (g - g0) * 32;
      __m512 w0, w1;
      decode_group<L, BS16, KD>(p, lut, k, g, w0, w1);
      _mm512_storeu_ps(a, _mm512_fmadd_ps(w0, xv, _mm512_loadu_ps(a)));
      _mm512_storeu_ps(a + 16, _mm512_fmadd_ps(w1, xv, _mm512_loadu_ps(a + 16)));
    }
  }
  for (int64_t g = g0; g < g1; ++g)
    for (int i = 0; i < 32; ++i) y[g * 32 + perm[i]] = acc[(g - g0) * 32 + i];
}

template <int L, bool BS16, int KD>
void kn_range(const Planes& p, const float* x, int64_t B, int64_t K, float* y, int64_t N, int64_t g0, int64_t g1) {
  if (B == 1) return kn_cols_b1<L, BS16, KD>(p, x, K, y, g0, g1);
  kn_cols<L, BS16, KD>(p, x, B, K, y, N, g0, g1);
}

#endif  // VT_AVX512

#if VT_AVX2
// ---------------------------------------------------------------------------------------------------------------
// AVX2 + FMA (CPUs without AVX-512, e.g. AMD Zen 2/3, Intel before Skylake-SP): the fused kernels and the decode
// with 8-lane vectors. A 32-value group decodes into four vectors in the same decode order as the AVX-512 path
// (positions 0..7, 8..15, 16..23, 24..31), so x is permuted the same way; each decoded value is the same float
// (the same products and FMAs as decode_group_scalar). The 16-entry table of 4-bit codes is looked up with vpshufb,
// one byte plane at a time (nibble_values8). Sums over k: two accumulators per output (positions 0..7 and 16..23
// into the first, 8..15 and 24..31 into the second), added at the end: the order does not depend on B or the
// threads. No GEMM: from PANEL_BATCH rows of x Python decodes panels (decode_rows) for XLA's GEMM.
// ---------------------------------------------------------------------------------------------------------------
// The 16-entry table as four vpshufb tables: plane j holds byte j of each entry (both 128-bit lanes alike).
struct Planes8 {
  __m256i b[4];
};

inline Planes8 byte_planes(const float* lut) {
  alignas(32) uint8_t t[4][32];
  for (int c = 0; c < 16; ++c) {
    uint32_t bits;
    std::memcpy(&bits, lut + c, 4);
    for (int j = 0; j < 4; ++j) t[j][c] = t[j][c + 16] = static_cast<uint8_t>(bits >> (8 * j));
  }
  Planes8 p;
  for (int j = 0; j < 4; ++j) p.b[j] = _mm256_load_si256(reinterpret_cast<const __m256i*>(t[j]));
  return p;
}

// The table's values for a 4-bit group's codes, unscaled, in decode order (w[0]: low nibbles of bytes 0..7, w[1]:
// of bytes 8..15, w[2], w[3]: the high nibbles), by in-lane byte shuffles: the nibbles are arranged so that
// lane 0 holds the dwords [lo 0-3, lo 8-11, hi 0-3, hi 8-11] and lane 1 [lo 4-7, lo 12-15, hi 4-7, hi 12-15];
// each plane's vpshufb then gives one byte of 32 floats, and two rounds of unpacks put the bytes together as
// floats 0..3 / 4..7 / 8..11 / 12..15 of each lane: exactly the four vectors. Measured on an AMD Zen 3 (no
// AVX-512): 1.5x faster than vpermps lookups blended on bit 3, whose lane-crossing shuffles are the bottleneck.
inline void nibble_values8(const uint8_t* c, const Planes8& t, __m256* w) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c));
  const __m128i m = _mm_set1_epi8(0x0F);
  const __m256i both = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_and_si128(raw, m)),
                                               _mm_and_si128(_mm_srli_epi16(raw, 4), m), 1);
  const __m256i idx = _mm256_permutevar8x32_epi32(both, _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7));
  const __m256i b0 = _mm256_shuffle_epi8(t.b[0], idx), b1 = _mm256_shuffle_epi8(t.b[1], idx);
  const __m256i b2 = _mm256_shuffle_epi8(t.b[2], idx), b3 = _mm256_shuffle_epi8(t.b[3], idx);
  const __m256i l01 = _mm256_unpacklo_epi8(b0, b1), h01 = _mm256_unpackhi_epi8(b0, b1);
  const __m256i l23 = _mm256_unpacklo_epi8(b2, b3), h23 = _mm256_unpackhi_epi8(b2, b3);
  w[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(l01, l23));
  w[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(l01, l23));
  w[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(h01, h23));
  w[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(h01, h23));
}

template <int L, bool BS16, int KD>
inline void decode_group8(const Planes& p, const Planes8& lut, int64_t row, int64_t g, __m256* w) {
  constexpr bool OFF = (KD & 3) != kNoOffset;
  const uint8_t* c = p.codes + row * p.row_bytes + g * (L == kInt8 ? 32 : 16);
  if (L == kInt8) {
    for (int i = 0; i < 4; ++i)
      w[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + 8 * i))));
  } else {
    nibble_values8(c, lut, w);
  }
  if (!BS16) {  // one scale (and offset) for the 32 values
    const int64_t blk = p.gblk[g];
    const __m256 sv = _mm256_set1_ps(scale_t<KD>(p, row, blk));
    if (OFF) {
      const __m256 ov = _mm256_set1_ps(offset_t<KD>(p, row, blk));
      for (int i = 0; i < 4; ++i) w[i] = _mm256_fmadd_ps(w[i], sv, ov);
    } else {
      for (int i = 0; i < 4; ++i) w[i] = _mm256_mul_ps(w[i], sv);
    }
    return;
  }
  // blocks of 16: the block of each vector by its values' original positions
  int64_t blk[4];
  if (L == kLowFirst || L == kHighFirst) {  // positions 0..7 and 16..23 hold original values 0..15
    blk[0] = blk[2] = 2 * g;
    blk[1] = blk[3] = 2 * g + 1;
  } else {  // halves, int8: positions are original indices
    blk[0] = blk[1] = 2 * g;
    blk[2] = blk[3] = 2 * g + 1;
  }
  for (int i = 0; i < 4; ++i) {
    const __m256 sv = _mm256_set1_ps(scale_t<KD>(p, row, blk[i]));
    w[i] = OFF ? _mm256_fmadd_ps(w[i], sv, _mm256_set1_ps(offset_t<KD>(p, row, blk[i]))) : _mm256_mul_ps(w[i], sv);
  }
}

template <int L>
inline void prefetch_group8(const Planes& p, int64_t row, int64_t rows, int64_t g) {
  constexpr int64_t gbytes = L == kInt8 ? 32 : 16, per_line = 64 / gbytes;
  if (row < rows && (g % per_line) == 0)
    _mm_prefetch(reinterpret_cast<const char*>(p.codes + row * p.row_bytes + g * gbytes), _MM_HINT_T0);
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// R weight rows (from n) against NB rows of x (from b0) over groups [g0, g1): decode each group once, FMAs into the
// accumulators `mem` (R x NB x 2 vectors, kept between K chunks). R and NB are compile-time, so acc stays in registers.
// R weight rows (from n) against NB rows of x (from b0) over groups [g0, g1): decode each group once, FMAs into the
// accumulators `mem` (R x NB x 2 vectors, kept between K chunks). R and NB are compile-time, so acc stays in registers.
template <int L, bool BS16, int KD, int R, int NB>
inline void nk_block(const Planes& p, const Planes8& lut, const float* xp, int64_t K, int64_t b0, int64_t n,
                     int64_t n1, int64_t g0, int64_t g1, __m256* mem) {
  __m256 acc[R][NB][2];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < NB; ++b)
      for (int h = 0; h < 2; ++h) acc[r][b][h] = mem[(r * NB + b) * 2 + h];
  for (int64_t g = g0; g < g1; ++g) {
    for (int r = 0; r < R; ++r) {
      prefetch_group8<L>(p, n + R + r, n1, g);
      __m256 w[4];
      decode_group8<L, BS16, KD>(p, lut, n + r, g, w);
      for (int b = 0; b < NB; ++b) {
        const float* xb = xp + (b0 + b) * K + g * 32;
        acc[r][b][0] = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(xb), acc[r][b][0]);
        acc[r][b][1] = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xb + 8), acc[r][b][1]);
        acc[r][b][0] = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xb + 16), acc[r][b][0]);
        acc[r][b][1] = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xb + 24), acc[r][b][1]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < NB; ++b)
      for (int h = 0; h < 2; ++h) mem[(r * NB + b) * 2 + h] = acc[r][b][h];
}

// kn = 0, rows [n0, n1) against NB rows of x from b0 (x in decode order): RN weight rows at a time, K in chunks
// whose NB rows of x stay in L1; the accumulators of a block of rows wait in a small buffer between chunks. A lone
// row runs the same FMAs in the same order as a row of a pair: y does not depend on the split.
template <int L, bool BS16, int KD, int NB>
void nk_rows(const Planes& p, const float* xp, int64_t K, float* y, int64_t N, int64_t b0, int64_t n0, int64_t n1) {
  const Planes8 lut = byte_planes(p.lut);
  constexpr int RN = NB == 1 ? 2 : 1;  // at most 8 accumulators: with 16 vector registers, 4 rows spilled
  constexpr int64_t RB = 128;
  const int64_t gk = std::max<int64_t>(1, int64_t(4096) / (32 * NB));
  std::vector<__m256> accbuf(static_cast<size_t>(RB * NB * 2));
  for (int64_t nb0 = n0; nb0 < n1; nb0 += RB) {
    const int64_t nb1 = std::min(n1, nb0 + RB);
    for (auto& v : accbuf) v = _mm256_setzero_ps();
    for (int64_t g0 = 0; g0 < p.ngroups; g0 += gk) {
      const int64_t g1 = std::min(p.ngroups, g0 + gk);
      int64_t n = nb0;
      for (; n + RN <= nb1; n += RN)
        nk_block<L, BS16, KD, RN, NB>(p, lut, xp, K, b0, n, n1, g0, g1, accbuf.data() + (n - nb0) * NB * 2);
      for (; n < nb1; ++n)
        nk_block<L, BS16, KD, 1, NB>(p, lut, xp, K, b0, n, n1, g0, g1, accbuf.data() + (n - nb0) * NB * 2);
    }
    for (int64_t n = nb0; n < nb1; ++n)
      for (int b = 0; b < NB; ++b) {
        const __m256* m = accbuf.data() + (n - nb0) * NB * 2 + b * 2;
        y[(b0 + b) * N + n] = hsum8(_mm256_add_ps(m[0], m[1]));
      }
  }
}

// kn = 0, B > 4: each group is decoded once per call into a block of 16 rows x 8 groups (16 KiB, in L1) that every
// row of x then reads, instead of once per 4 rows of x. The same FMAs per output, in the same order, as nk_rows.
constexpr int64_t kWideRB8 = 16, kWideGK8 = 4;

template <int R, int NB>
inline void nk_wide8(const float* wbuf, int64_t ng, const float* xp, int64_t K, int64_t g0, int64_t r, int64_t b0,
                     __m256* accbuf, int64_t B) {
  __m256 acc[R][NB][2];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < NB; ++j)
      for (int h = 0; h < 2; ++h) acc[i][j][h] = accbuf[((r + i) * B + b0 + j) * 2 + h];
  // per 8 positions: R weight vectors and NB x vectors in registers, R x NB FMAs (each accumulator still takes
  // positions 0..7 then 16..23, or 8..15 then 24..31, group after group: nk_rows' order)
  for (int64_t t = 0; t < ng; ++t)
    for (int c = 0; c < 4; ++c) {
      __m256 wv[R], xv[NB];
      for (int i = 0; i < R; ++i) wv[i] = _mm256_load_ps(wbuf + ((r + i) * kWideGK8 + t) * 32 + 8 * c);
      for (int j = 0; j < NB; ++j) xv[j] = _mm256_loadu_ps(xp + (b0 + j) * K + (g0 + t) * 32 + 8 * c);
      for (int i = 0; i < R; ++i)
        for (int j = 0; j < NB; ++j) acc[i][j][c & 1] = _mm256_fmadd_ps(wv[i], xv[j], acc[i][j][c & 1]);
    }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < NB; ++j)
      for (int h = 0; h < 2; ++h) accbuf[((r + i) * B + b0 + j) * 2 + h] = acc[i][j][h];
}

template <int L, bool BS16, int KD>
void nk_rows_wide(const Planes& p, const float* xp, int64_t B, int64_t K, float* y, int64_t N, int64_t n0,
                  int64_t n1) {
  const Planes8 lut = byte_planes(p.lut);
  std::vector<__m256> accbuf(static_cast<size_t>(kWideRB8 * B * 2));
  alignas(32) float wbuf[kWideRB8 * kWideGK8 * 32];
  for (int64_t nb0 = n0; nb0 < n1; nb0 += kWideRB8) {
    const int64_t rows = std::min(n1, nb0 + kWideRB8) - nb0;
    for (auto& v : accbuf) v = _mm256_setzero_ps();
    for (int64_t g0 = 0; g0 < p.ngroups; g0 += kWideGK8) {
      const int64_t ng = std::min(p.ngroups, g0 + kWideGK8) - g0;
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t t = 0; t < ng; ++t) {
          prefetch_group8<L>(p, nb0 + r, n1, g0 + kWideGK8 + t);  // the same rows' next groups
          __m256 w[4];
          decode_group8<L, BS16, KD>(p, lut, nb0 + r, g0 + t, w);
          for (int i = 0; i < 4; ++i) _mm256_store_ps(wbuf + (r * kWideGK8 + t) * 32 + 8 * i, w[i]);
        }
      int64_t r = 0;
      for (; r + 2 <= rows; r += 2) {
        int64_t b = 0;
        for (; b + 3 <= B; b += 3) nk_wide8<2, 3>(wbuf, ng, xp, K, g0, r, b, accbuf.data(), B);
        for (; b < B; ++b) nk_wide8<2, 1>(wbuf, ng, xp, K, g0, r, b, accbuf.data(), B);
      }
      for (; r < rows; ++r) {
        int64_t b = 0;
        for (; b + 4 <= B; b += 4) nk_wide8<1, 4>(wbuf, ng, xp, K, g0, r, b, accbuf.data(), B);
        for (; b < B; ++b) nk_wide8<1, 1>(wbuf, ng, xp, K, g0, r, b, accbuf.data(), B);
      }
    }
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t b = 0; b < B; ++b) {
        const __m256* m = accbuf.data() + (r * B + b) * 2;
        y[b * N + nb0 + r] = hsum8(_mm256_add_ps(m[0], m[1]));
      }
  }
}

template <int L, bool BS16, int KD>
void nk_range(const Planes& p, const float* xp, int64_t B, int64_t K, float* y, int64_t N, int64_t n0, int64_t n1) {
  if (B > 4) return nk_rows_wide<L, BS16, KD>(p, xp, B, K, y, N, n0, n1);
  int64_t b = 0;
  for (; b + 4 <= B; b += 4) nk_rows<L, BS16, KD, 4>(p, xp, K, y, N, b, n0, n1);
  switch (B - b) {
    case 3: nk_rows<L, BS16, KD, 3>(p, xp, K, y, N, b, n0, n1); break;
    case 2: nk_rows<L, BS16, KD, 2>(p, xp, K, y, N, b, n0, n1); break;
    case 1: nk_rows<L, BS16, KD, 1>(p, xp, K, y, N, b, n0, n1); break;
    default: break;
  }
}

// kn = 1, column groups [g0, g1) of the weight (K, N): for KQ rows of the weight at a time, the groups of a chunk of
// columns are decoded once into wbuf (decode order) and used by every row of x; the accumulators (B x chunk, in
// decode order, in L1) go back to y in natural order at the end of the chunk.
template <int KQ, int NB>
inline void kn_accumulate8(const float* wbuf, int64_t gc, int64_t ng, const float* x, int64_t K, int64_t k, int kq,
                           float* acc, int64_t b0) {
  for (int64_t t = 0; t < ng; ++t) {
    __m256 s[NB][4];
    for (int b = 0; b < NB; ++b)
      for (int i = 0; i < 4; ++i) s[b][i] = _mm256_loadu_ps(acc + ((b0 + b) * gc + t) * 32 + 8 * i);
    for (int q = 0; q < kq; ++q) {
      const float* wq = wbuf + (q * gc + t) * 32;
      for (int b = 0; b < NB; ++b) {
        const __m256 xv = _mm256_set1_ps(x[(b0 + b) * K + k + q]);
        for (int i = 0; i < 4; ++i) s[b][i] = _mm256_fmadd_ps(_mm256_loadu_ps(wq + 8 * i), xv, s[b][i]);
      }
    }
    for (int b = 0; b < NB; ++b)
      for (int i = 0; i < 4; ++i) _mm256_storeu_ps(acc + ((b0 + b) * gc + t) * 32 + 8 * i, s[b][i]);
  }
}

// kn = 1, one row of x: KQ rows of the weight at a time decoded in registers straight into a group's accumulators.
template <int L, bool BS16, int KD>
void kn_cols_b1(const Planes& p, const float* x, int64_t K, float* y, int64_t g0, int64_t g1) {
  constexpr int KQ = 8;
  const Planes8 lut = byte_planes(p.lut);
  int perm[32];
  for (int i = 0; i < 32; ++i) perm[i] = decode_perm(L, i);
  std::vector<float> accv(static_cast<size_t>((g1 - g0) * 32), 0.f);
  float* acc = accv.data();
  for (int64_t k = 0; k < K; k += KQ) {
    const int kq = static_cast<int>(std::min<int64_t>(KQ, K - k));
    for (int64_t g = g0; g < g1; ++g) {
      float* a = acc + (g - g0) * 32;
      __m256 s[4];
      for (int i = 0; i < 4; ++i) s[i] = _mm256_loadu_ps(a + 8 * i);
      for (int q = 0; q < kq; ++q) {
        prefetch_group8<L>(p, k + KQ + q, K, g);
        __m256 w[4];
        decode_group8<L, BS16, KD>(p, lut, k + q, g, w);
        const __m256 xv = _mm256_set1_ps(x[k + q]);
        for (int i = 0; i < 4; ++i) s[i] = _mm256_fmadd_ps(w[i], xv, s[i]);
      }
      for (int i = 0; i < 4; ++i) _mm256_storeu_ps(a + 8 * i, s[i]);
    }
  }
  for (int64_t g = g0; g < g1; ++g)
    for (int i = 0; i < 32; ++i) y[g * 32 + perm[i]] = acc[(g - g0) * 32 + i];
}

template <int L, bool BS16, int KD>
void kn_range(const Planes& p, const float* x, int64_t B, int64_t K, float* y, int64_t N, int64_t g0, int64_t g1) {
  if (B == 1) return kn_cols_b1<L, BS16, KD>(p, x, K, y, g0, g1);
  constexpr int KQ = 8;
  const Planes8 lut = byte_planes(p.lut);
  int perm[32];
  for (int i = 0; i < 32; ++i) perm[i] = decode_perm(L, i);
  // B x gc x 32 accumulators in 16 KiB (all the thread's columns at one row of x), KQ x gc x 32 decoded values
  const int64_t gc = std::max<int64_t>(1, std::min<int64_t>(g1 - g0, (int64_t(1) << 12) / (32 * std::max<int64_t>(B, 1))));
  std::vector<float> accv(static_cast<size_t>(B * gc * 32));
  std::vector<float> wv(static_cast<size_t>(KQ * gc * 32));
  float* acc = accv.data();
  float* wbuf = wv.data();
  for (int64_t c0 = g0; c0 < g1; c0 += gc) {
    const int64_t ng = std::min(gc, g1 - c0);
    std::fill(accv.begin(), accv.end(), 0.f);
    for (int64_t k = 0; k < K; k += KQ) {
      const int kq = static_cast<int>(std::min<int64_t>(KQ, K - k));
      for (int q = 0; q < kq; ++q)
        for (int64_t t = 0; t < ng; ++t) {
          prefetch_group8<L>(p, k + KQ + q, K, c0 + t);
          __m256 w[4];
          decode_group8<L, BS16, KD>(p, lut, k + q, c0 + t, w);
          for (int i = 0; i < 4; ++i) _mm256_storeu_ps(wbuf + (q * gc + t) * 32 + 8 * i, w[i]);
        }
      int64_t bb = 0;
      for (; bb + 2 <= B; bb += 2) kn_accumulate8<KQ, 2>(wbuf, gc, ng, x, K, k, kq, acc, bb);
      if (bb < B) kn_accumulate8<KQ, 1>(wbuf, gc, ng, x, K, k, kq, acc, bb);
    }
    for (int64_t bb = 0; bb < B; ++bb)
      for (int64_t t = 0; t < ng; ++t) {
        const float* src = acc + (bb * gc + t) * 32;
        float* yb = y + bb * N + (c0 + t) * 32;
        for (int i = 0; i < 32; ++i) yb[perm[i]] = src[i];
      }
  }
}

// Decoded rows in natural order: halves and int8 are already in order; the nibble-pair layouts interleave
// positions 0..15 with 16..31 (low nibble first: position i is value 2i; high nibble first: value 2i + 1).
template <int L, bool BS16, int KD>
void decode_rows(const Planes& p, float* w, int64_t C, int64_t r0, int64_t r1) {
  const Planes8 lut = byte_planes(p.lut);
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t g = 0; g < p.ngroups; ++g) {
      __m256 v[4];
      decode_group8<L, BS16, KD>(p, lut, r, g, v);
      float* out = w + r * C + g * 32;
      if (L == kHalves || L == kInt8) {
        for (int i = 0; i < 4; ++i) _mm256_storeu_ps(out + 8 * i, v[i]);
        continue;
      }
      for (int h = 0; h < 2; ++h) {  // natural 16h .. 16h + 15 from positions 8h .. 8h + 7 and 16 + 8h ..
        const __m256 even = L == kLowFirst ? v[h] : v[2 + h], odd = L == kLowFirst ? v[2 + h] : v[h];
        const __m256 lo = _mm256_unpacklo_ps(even, odd), hi = _mm256_unpackhi_ps(even, odd);
        _mm256_storeu_ps(out + 16 * h, _mm256_permute2f128_ps(lo, hi, 0x20));
        _mm256_storeu_ps(out + 16 * h + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
      }
    }
}
#endif  // VT_AVX2

#if VT_AVX512 || VT_AVX2
template <template <int, bool, int> class Fn, typename... A>
void dispatch(const Planes& p, A&&... args) {
  const bool bs16 = p.block == 16;
  const int k = kd(p.scale_kind, p.offset_kind);
#define VT_KD(L, B, K) \
  if (bs16 == B && k == K) return Fn<L, B, K>::run(p, args...);
#define VT_KINDS(L, B)                                                                                         \
  VT_KD(L, B, kd(kF32, kNoOffset)) VT_KD(L, B, kd(kF32, kOffF32)) VT_KD(L, B, kd(kF16, kNoOffset))           \
  VT_KD(L, B, kd(kF16, kOffF16)) VT_KD(L, B, kd(kF16, kZeroNibbles)) VT_KD(L, B, kd(kByte, kNoOffset))
#define VT_CASE(L) \
  if (p.layout == L) { VT_KINDS(L, true) VT_KINDS(L, false) }
  VT_CASE(kLowFirst) VT_CASE(kHighFirst) VT_CASE(kHalves) VT_CASE(kInt8)
#undef VT_KD
#undef VT_KINDS
#undef VT_CASE
}

template <int L, bool BS16, int KD>
struct NK {
  static void run(const Planes& p, const float* xp, int64_t B, int64_t K, float* y, int64_t N, int64_t n0,
                  int64_t n1) {
    nk_range<L, BS16, KD>(p, xp, B, K, y, N, n0, n1);
  }
};
template <int L, bool BS16, int KD>
struct KN {
  static void run(const Planes& p, const float* x, int64_t B, int64_t K, float* y, int64_t N, int64_t g0,
                  int64_t g1) {
    kn_range<L, BS16, KD>(p, x, B, K, y, N, g0, g1);
  }
};
template <int L, bool BS16, int KD>
struct DEC {
  static void run(const Planes& p, float* w, int64_t C, int64_t r0, int64_t r1) {
    decode_rows<L, BS16, KD>(p, w, C, r0, r1);
  }
};
#endif

// ---------------------------------------------------------------------------------------------------------------
// GEMM: batches of `gemm_min` rows and more, a blocked GEMM whose packing step is the decode. XLA's GEMM on a
// decoded float32 panel costs the panel's bytes twice (written by vt_decode, read back by the GEMM's own packing);
// here each 32-value group is decoded once per call (per group of 1024 rows of x) straight into the small block
// that the inner kernel reads from L1.
//   nk (weight (N, K), blocked along K): R weight rows decoded into `tile` (R x KC, decode order along K), x packed
//       once per call into strips of 16 V rows (xp[strip][k][16 V], K in decode order): the inner kernel broadcasts
//       a weight value and multiplies a vector of 16 x rows; the accumulators hold y transposed (a block of
//       NB weight rows x the group's rows of x, in L2), written to y by 16 x 16 register transposes at the end.
//   kn (weight (K, N), blocked along N): x packed into strips of at most 14 rows (xa[strip][k][14]), KC rows of the
//       weight decoded (natural order) into bp[32-column strip][k][32]; the inner kernel broadcasts an x value and
//       multiplies 32 weight values; the accumulators are y itself.
// Every output is one chain of float32 FMAs over k in a fixed order (nk: the decode order within each 32-value
// group; kn: natural), continued across K chunks through memory: the result does not depend on B, N, the
// blocking or the threads.
// ---------------------------------------------------------------------------------------------------------------
#if VT_AVX512
constexpr int64_t kGemmKC = 128;   // k per chunk (multiple of 32): tile + x strip chunk stay in L1
constexpr int kGemmMR = 14;        // kn: x rows per strip

// c[i][16 j + l] (+)= sum_k a[i * SI + k * SK] * b[k * 16 V + 16 j + l], i < R, j < V; c rows `ldc` apart.
// Not inlined: inside its callers GCC ran out of vector registers and spilled a vector of b to the stack.
template <int R, int V, int64_t SI, int64_t SK>
__attribute__((noinline)) void gemm_micro(const float* a, const float* b, int64_t kc, float* c, int64_t ldc,
                                          bool init) {
  __m512 acc[R][V];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < V; ++j) acc[i][j] = init ? _mm512_setzero_ps() : _mm512_loadu_ps(c + i * ldc + 16 * j);
  for (int64_t k = 0; k < kc; ++k) {
    __m512 bv[V];
    _mm_prefetch(reinterpret_cast<const char*>(b + (k + 8) * 16 * V), _MM_HINT_T0);
    for (int j = 0; j < V; ++j) bv[j] = _mm512_loadu_ps(b + k * 16 * V + 16 * j);
    const float* ak = a + k * SK;
    for (int i = 0; i < R; ++i) {
      const __m512 av = _mm512_set1_ps(ak[i * SI]);
      for (int j = 0; j < V; ++j) acc[i][j] = _mm512_fmadd_ps(av, bv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < V; ++j) _mm512_storeu_ps(c + i * ldc + 16 * j, acc[i][j]);
}

// 16 x 16 transpose: dst[c * ds + r] = src[r * ss + c] for r < rows, c < cols. Only source rows < rows and columns
// < cols are read (the rest count as zeros); destination rows c < cols are written, `lanes` lanes of each.
inline void transpose16(const float* src, int64_t ss, int rows, int cols, float* dst, int64_t ds, int lanes) {
  const __mmask16 cm = static_cast<__mmask16>(cols >= 16 ? 0xFFFFu : (1u << cols) - 1u);
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = i < rows ? _mm512_maskz_loadu_ps(cm, src + i * ss) : _mm512_setzero_ps();
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  // r[4 i + c], 128-bit lane L: rows 4 i .. 4 i + 3 of column 4 L + c
  const __mmask16 m = static_cast<__mmask16>(lanes >= 16 ? 0xFFFFu : (1u << lanes) - 1u);
  __m512 o[16];
  for (int c = 0; c < 4; ++c) {
    const __m512 w0 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x44), w1 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xEE);
    const __m512 w2 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x44);
    const __m512 w3 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xEE);
    o[c] = _mm512_shuffle_f32x4(w0, w2, 0x88);
    o[4 + c] = _mm512_shuffle_f32x4(w0, w2, 0xDD);
    o[8 + c] = _mm512_shuffle_f32x4(w1, w3, 0x88);
    o[12 + c] = _mm512_shuffle_f32x4(w1, w3, 0xDD);
  }
  for (int c = 0; c < cols && c < 16; ++c) _mm512_mask_storeu_ps(dst + c * ds, m, o[c]);
}

// nk: x (B, K) into strips of 16 V rows, k in decode order: xp[(s * K + k) * 16 V + l] = x[16 V s + l, perm(k)];
// rows past B are zeros. Strips [s0, s1).
template <int V>
void gemm_pack_x_nk(const float* x, int64_t B, int64_t K, int layout, float* xp, int64_t s0, int64_t s1) {
  alignas(64) int32_t ia[16], ib[16];
  for (int i = 0; i < 16; ++i) { ia[i] = decode_perm(layout, i); ib[i] = decode_perm(layout, i + 16); }
  const __m512i pa = _mm512_load_si512(ia), pb = _mm512_load_si512(ib);
  alignas(64) float buf[16 * 32];
  for (int64_t s = s0; s < s1; ++s)
    for (int64_t h = 0; h < V; ++h) {
      const int64_t b0 = s * 16 * V + h * 16;
      const int rows = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(16, B - b0)));
      for (int64_t g = 0; g < K / 32; ++g) {
        for (int r = 0; r < 16; ++r) {
          __m512 lo = _mm512_setzero_ps(), hi = _mm512_setzero_ps();
          if (r < rows) {
            const float* xr = x + (b0 + r) * K + g * 32;
            lo = _mm512_loadu_ps(xr);
            hi = _mm512_loadu_ps(xr + 16);
          }
          _mm512_store_ps(buf + r * 32, _mm512_permutex2var_ps(lo, pa, hi));
          _mm512_store_ps(buf + r * 32 + 16, _mm512_permutex2var_ps(lo, pb, hi));
        }
        float* dst = xp + (s * K + g * 32) * 16 * V + h * 16;
        transpose16(buf, 32, 16, 16, dst, 16 * V, 16);
        transpose16(buf + 16, 32, 16, 16, dst + 16 * 16 * V, 16 * V, 16);
      }
    }
}

template <int R, int V>
inline void gemm_nk_tile(const float* tile, const float* xp, int64_t K, int64_t nstrips, int64_t pc, int64_t kc,
                         float* acc, int64_t ldacc, bool init) {
  for (int64_t s = 0; s < nstrips; ++s)
    gemm_micro<R, V, kGemmKC, 1>(tile, xp + (s * K + pc) * 16 * V, kc, acc + s * 16 * V, ldacc, init);
}

// nk, weight rows [n0, n1) of this thread: blocks of NB rows; per K chunk, R rows at a time decoded into `tile`.
template <int L, bool BS16, int KD, int V>
void gemm_nk(const Planes& p, const float* xp, int64_t B, int64_t K, float* y, int64_t N, int64_t n0, int64_t n1) {
  constexpr int R = V == 2 ? 14 : 16;  // 28 x 1 measured half the speed of 16 x 1 (broadcasts bound it)
  const __m512 lut = _mm512_loadu_ps(p.lut);
  const int64_t nstrips = (B + 16 * V - 1) / (16 * V), bpad = nstrips * 16 * V;
  // accumulator rows one cache line longer than x's strips: rows 4 KiB apart (1024 rows of x) fell in one L1 set
  const int64_t ldacc = bpad + 16;
  // a block of NB weight rows keeps its accumulators (NB x bpad floats) in L2 beside the chunk of x (bpad x KC):
  // together about 768 KiB (at 384 x 384 and 1024 rows of x, 512 KiB of accumulators were 1.24x slower than 128)
  const int64_t xchunk = bpad * kGemmKC * 4;
  const int64_t acc_bytes = std::min<int64_t>(512 << 10, std::max<int64_t>(128 << 10, (768 << 10) - xchunk));
  const int64_t nb_rows = std::max<int64_t>(R, (acc_bytes / 4 / ldacc) / R * R);
  alignas(64) float tile[R * kGemmKC];
  // rows [t0, t0 + rows) of the weight, K chunk [pc, pc + kc), into `tile` (rows past `rows` as zeros); the codes of
  // (next_row + r, next_group + t) are prefetched meanwhile
  auto decode_tile = [&](int64_t t0, int64_t rows, int64_t pc, int64_t kc, int64_t next_row, int64_t next_group) {
    const int64_t g0 = pc / 32;
    for (int64_t r = 0; r < R; ++r) {
      float* dst = tile + r * kGemmKC;
      if (r >= rows) {
        for (int64_t q = 0; q < kc; q += 16) _mm512_store_ps(dst + q, _mm512_setzero_ps());
        continue;
      }
      for (int64_t t = 0; t < kc / 32; ++t) {
        prefetch_group<L>(p, next_row + r, n1, next_group + t);
        __m512 a, b;
        decode_group<L, BS16, KD>(p, lut, t0 + r, g0 + t, a, b);
        _mm512_store_ps(dst + t * 32, a);
        _mm512_store_ps(dst + t * 32 + 16, b);
      }
    }
  };
  // accumulators (weight row, x row) of rows [r0, r1) -> y (x row, weight row)
  auto write_back = [&](const float* acc, int64_t r0, int64_t r1) {
    for (int64_t q = r0; q < r1; q += 16) {
      const int rows = static_cast<int>(std::min<int64_t>(16, r1 - q));
      for (int64_t b0 = 0; b0 < B; b0 += 16)
        transpose16(acc + (q - r0) * ldacc + b0, ldacc, rows, static_cast<int>(std::min<int64_t>(16, B - b0)),
                    y + b0 * N + q, N, rows);
    }
  };
  if (bpad * K * 4 <= (512 << 10)) {
    // all of packed x stays in L2 (up to 32 rows of x at K = 4096): each tile walks K to its end, its codes and
    // scales read in order (with a chunk of K outermost, the scales' loads of every row missed the cache: half
    // of the decode's time at batch 16)
    Scratch accbuf(static_cast<size_t>(R * ldacc));
    for (int64_t t0 = n0; t0 < n1; t0 += R) {
      const int64_t rows = std::min<int64_t>(R, n1 - t0);
      for (int64_t pc = 0; pc < K; pc += kGemmKC) {
        const int64_t kc = std::min(kGemmKC, K - pc);
        decode_tile(t0, rows, pc, kc, t0, (pc + kc) / 32);
        gemm_nk_tile<R, V>(tile, xp, K, nstrips, pc, kc, accbuf.data(), ldacc, pc == 0);
      }
      write_back(accbuf.data(), t0, t0 + rows);
    }
    return;
  }
  Scratch accbuf(static_cast<size_t>(nb_rows * ldacc));
  for (int64_t nb0 = n0; nb0 < n1; nb0 += nb_rows) {
    const int64_t nb1 = std::min(n1, nb0 + nb_rows);
    for (int64_t pc = 0; pc < K; pc += kGemmKC) {
      const int64_t kc = std::min(kGemmKC, K - pc);
      for (int64_t t0 = nb0; t0 < nb1; t0 += R) {
        decode_tile(t0, std::min<int64_t>(R, nb1 - t0), pc, kc, t0 + R, pc / 32);
        gemm_nk_tile<R, V>(tile, xp, K, nstrips, pc, kc, accbuf.data() + (t0 - nb0) * ldacc, ldacc, pc == 0);
      }
    }
    write_back(accbuf.data(), nb0, nb1);
  }
}

// kn: x (B, K) into strips of W rows: xa[(s * K + k) * W + i] = x[s * W + i, k] (rows past B: 0); any K.
// W = kGemmMR for gemm_kn, 16 for gemm_kn_small.
template <int W>
void gemm_pack_x_kn(const float* x, int64_t B, int64_t K, float* xa, int64_t s0, int64_t s1) {
  for (int64_t s = s0; s < s1; ++s) {
    const int64_t b0 = s * W;
    const int rows = static_cast<int>(std::min<int64_t>(W, B - b0));
    for (int64_t k0 = 0; k0 < K; k0 += 16)  // 16 columns of the strip's rows -> 16 rows of W values
      transpose16(x + b0 * K + k0, K, rows, static_cast<int>(std::min<int64_t>(16, K - k0)), xa + (s * K + k0) * W,
                  W, W);
  }
}

// kn, 32-column strips [g0, g1) of the weight (K, N) for this thread; per K chunk the strips of a block of
// columns are decoded into bp (natural order), then every x strip runs against each.
template <int R>
inline void gemm_kn_strip(const float* xa, const float* bp, int64_t K, int64_t pc, int64_t kc, float* y, int64_t N,
                          bool init) {
  gemm_micro<R, 2, 1, kGemmMR>(xa + pc * kGemmMR, bp, kc, y, N, init);
}

// kn: decode rows [pc, pc + kc) of the `ng` 32-column strips from `gb` into natural order:
// tile[(t * ld + k) * 32 + j] = W[pc + k, (gb + t) * 32 + j]. PREFETCH: fetch the codes of rows 4 ahead (gemm_kn, whose
// block of strips walks 16 strips per row; measured no gain for gemm_kn_small's single strip).
template <int L, bool BS16, int KD, bool PREFETCH>
inline void gemm_kn_decode(const Planes& p, __m512 lut, __m512i pa, __m512i pb, int64_t K, int64_t pc, int64_t kc,
                           int64_t gb, int64_t ng, int64_t ld, float* tile) {
  for (int64_t k = 0; k < kc; ++k)
    for (int64_t t = 0; t < ng; ++t) {
      if constexpr (PREFETCH) prefetch_group<L>(p, pc + k + 4, K, gb + t);
      __m512 a, b;
      decode_group<L, BS16, KD>(p, lut, pc + k, gb + t, a, b);
      float* dst = tile + (t * ld + k) * 32;
      _mm512_storeu_ps(dst, _mm512_permutex2var_ps(a, pa, b));
      _mm512_storeu_ps(dst + 16, _mm512_permutex2var_ps(a, pb, b));
    }
}

template <int L, bool BS16, int KD>
void gemm_kn(const Planes& p, const float* xa, int64_t B, int64_t K, float* y, int64_t N, int64_t g0, int64_t g1) {
  const __m512 lut = _mm512_loadu_ps(p.lut);
  __m512i pa, pb;
  natural_perms(L, pa, pb);
  const int64_t nstrips = (B + kGemmMR - 1) / kGemmMR;
  constexpr int64_t kBlock = 16;  // 32-column strips per block: 16 x KC x 32 floats = 256 KiB
  Scratch bp(static_cast<size_t>(kBlock * kGemmKC * 32));
  // the block's accumulators (B x 512), rows padded by a cache line: y's own rows are N floats apart (16 KiB at
  // N = 4096, so that the 14 rows of a tile fell in one L1 set)
  constexpr int64_t ldc = kBlock * 32 + 16;
  Scratch cbuf(static_cast<size_t>(nstrips * kGemmMR * ldc));
  for (int64_t gb = g0; gb < g1; gb += kBlock) {
    const int64_t ng = std::min(g1, gb + kBlock) - gb;
    for (int64_t pc = 0; pc < K; pc += kGemmKC) {
      const int64_t kc = std::min(kGemmKC, K - pc);
      gemm_kn_decode<L, BS16, KD, true>(p, lut, pa, pb, K, pc, kc, gb, ng, kGemmKC, bp.data());
      for (int64_t t = 0; t < ng; ++t) {
        const float* bs = bp.data() + t * kGemmKC * 32;
        for (int64_t s = 0; s < nstrips; ++s) {
          const int64_t b0 = s * kGemmMR;
          const int rows = static_cast<int>(std::min<int64_t>(kGemmMR, B - b0));
          float* ct = cbuf.data() + b0 * ldc + t * 32;
          const float* xs = xa + s * K * kGemmMR;
          switch (rows) {
#define VT_R(n) case n: gemm_kn_strip<n>(xs, bs, K, pc, kc, ct, ldc, pc == 0); break;
            VT_R(1) VT_R(2) VT_R(3) VT_R(4) VT_R(5) VT_R(6) VT_R(7) VT_R(8) VT_R(9) VT_R(10) VT_R(11) VT_R(12)
            VT_R(13) VT_R(14)
#undef VT_R
            default: break;
          }
        }
      }
    }
    for (int64_t b = 0; b < B; ++b) std::memcpy(y + b * N + gb * 32, cbuf.data() + b * ldc, ng * 32 * 4);
  }
}

// kn, fewer than 2 kGemmMR rows of x (up to 27): strips of 14 rows would leave most of the second strip empty (at 16
// rows: 14 + 2, the 2-row kernel bound by its loads). Instead x is packed in strips of 16 rows (any K)
// and the inner kernel broadcasts a decoded weight value against a vector of 16 rows of x: the accumulators hold
// y transposed. What a 32-column strip needs stays in L1 while it walks K to its end: 128 rows x 32 columns decoded
// at a time (16 KiB), its accumulators (32 columns x the strips of x) and a 128-row chunk of x; written to y by
// 16 x 16 transposes. Each output is the same chain of FMAs over k in natural order as gemm_kn's: the same bits.
// Measured at 4096 x 4096, batch 16 (AMD Zen 5): one strip at a time walking K in chunks of 128, 3.7-3.8 ms; two
// strips x 64, 3.9; four strips x 32, 4.3-4.9; prefetching the scales and codes of rows 16 to 256 ahead: no gain.
constexpr int64_t kSmallKC = kGemmKC;

template <int L, bool BS16, int KD>
void gemm_kn_small(const Planes& p, const float* xp, int64_t B, int64_t K, float* y, int64_t N, int64_t g0,
                   int64_t g1) {
  const __m512 lut = _mm512_loadu_ps(p.lut);
  __m512i pa, pb;
  natural_perms(L, pa, pb);
  const int64_t nstrips = (B + 15) / 16;
  const int64_t ldacc = nstrips * 16 + 16;  // accumulator rows (one per column of y) padded by a cache line
  alignas(64) float tile[kSmallKC * 32];
  Scratch acc(static_cast<size_t>(32 * ldacc));
  for (int64_t g = g0; g < g1; ++g) {  // one 32-column strip of the weight at a time, K in chunks of kSmallKC
    for (int64_t pc = 0; pc < K; pc += kSmallKC) {
      const int64_t kc = std::min(kSmallKC, K - pc);
      gemm_kn_decode<L, BS16, KD, false>(p, lut, pa, pb, K, pc, kc, g, 1, kSmallKC, tile);
      for (int64_t h = 0; h < 2; ++h)
        for (int64_t s = 0; s < nstrips; ++s)
          gemm_micro<16, 1, 1, 32>(tile + 16 * h, xp + (s * K + pc) * 16, kc, acc.data() + 16 * h * ldacc + s * 16,
                                   ldacc, pc == 0);
    }
    for (int64_t q = 0; q < 32; q += 16)
      for (int64_t b0 = 0; b0 < B; b0 += 16)
        transpose16(acc.data() + q * ldacc + b0, ldacc, 16, static_cast<int>(std::min<int64_t>(16, B - b0)),
                    y + b0 * N + g * 32 + q, N, 16);
  }
}

// Rows of x in groups (the packed x of a group, one K chunk of it, stays in L2): each group decodes the weight again.
constexpr int64_t kGemmGroupNK = 256;           // nk: 8 strips of 32 rows
constexpr int64_t kGemmGroupKN = 18 * kGemmMR;  // kn: 18 strips of 14 rows (y block 252 x 512 floats)

// Rows per group for B rows of x: groups as even as whole strips allow, none longer than `most` + a quarter. Each
// group decodes the whole weight again: with fixed groups of `most`, batch 256 in (K, N) ran as 252 rows + 4 rows,
// the second decode costing as much as a fifth of the call.
inline int64_t gemm_group_rows(int64_t B, int64_t most, int64_t strip) {
  const int64_t cap = most + most / 4;
  const int64_t groups = (B + cap - 1) / cap;
  const int64_t rows = (B + groups - 1) / groups;
  return (rows + strip - 1) / strip * strip;
}

template <int L, bool BS16, int KD>
struct GNK {
  static void run(const Planes& p, const float* xp, int64_t B, int64_t K, float* y, int64_t N, int64_t n0,
                  int64_t n1) {
    const int64_t group = gemm_group_rows(B, kGemmGroupNK, 32);
    for (int64_t b0 = 0; b0 < B; b0 += group) {
      const int64_t bg = std::min(group, B - b0);
      if (B > 16) gemm_nk<L, BS16, KD, 2>(p, xp + b0 * K, bg, K, y + b0 * N, N, n0, n1);
      else gemm_nk<L, BS16, KD, 1>(p, xp + b0 * K, bg, K, y + b0 * N, N, n0, n1);
    }
  }
};
template <int L, bool BS16, int KD>
struct GKN {
  static void run(const Planes& p, const float* xa, int64_t B, int64_t K, float* y, int64_t N, int64_t g0,
                  int64_t g1) {
    const int64_t group = gemm_group_rows(B, kGemmGroupKN, kGemmMR);
    for (int64_t b0 = 0; b0 < B; b0 += group)
      gemm_kn<L, BS16, KD>(p, xa + b0 * K, std::min(group, B - b0), K, y + b0 * N, N, g0, g1);
  }
};

template <int L, bool BS16, int KD>
struct GKNSmall {
  static void run(const Planes& p, const float* xp, int64_t B, int64_t K, float* y, int64_t N, int64_t g0,
                  int64_t g1) {
    gemm_kn_small<L, BS16, KD>(p, xp, B, K, y, N, g0, g1);
  }
};

// The GEMM path of vt_qmatmul: x packed once (in parallel), then the weight's rows (nk) or 32-column strips (kn)
// split between the threads.
void gemm_call(const Planes& p, const float* x, int64_t B, int64_t K, float* y, int64_t N, bool kn, int nt,
               ffi::ThreadPool& pool) {
  if (!kn) {
    const int V = B > 16 ? 2 : 1;
    const int64_t nstrips = (B + 16 * V - 1) / (16 * V);
    Scratch xp(static_cast<size_t>(nstrips * 16 * V * K));
    parallel_for_pool(nstrips, 1, pool, nt, [&](int64_t s0, int64_t s1) {
      if (V == 2) gemm_pack_x_nk<2>(x, B, K, p.layout, xp.data(), s0, s1);
      else gemm_pack_x_nk<1>(x, B, K, p.layout, xp.data(), s0, s1);
    });
    const int64_t R = V == 2 ? 14 : 16;
    parallel_for_pool(N, R, pool, nt, [&](int64_t n0, int64_t n1) { dispatch<GNK>(p, xp.data(), B, K, y, N, n0, n1); });
  } else if (B < 2 * kGemmMR) {
    const int64_t nstrips = (B + 15) / 16;
    Scratch xp(static_cast<size_t>(nstrips * 16 * K));
    parallel_for_pool(nstrips, 1, pool, nt, [&](int64_t s0, int64_t s1) { gemm_pack_x_kn<16>(x, B, K, xp.data(), s0, s1); });
    parallel_for_pool(N / 32, 1, pool, nt, [&](int64_t g0, int64_t g1) { dispatch<GKNSmall>(p, xp.data(), B, K, y, N, g0, g1); });
  } else {
    const int64_t nstrips = (B + kGemmMR - 1) / kGemmMR;
    Scratch xa(static_cast<size_t>(nstrips * kGemmMR * K));
    parallel_for_pool(nstrips, 1, pool, nt, [&](int64_t s0, int64_t s1) { gemm_pack_x_kn<kGemmMR>(x, B, K, xa.data(), s0, s1); });
    parallel_for_pool(N / 32, 1, pool, nt, [&](int64_t g0, int64_t g1) { dispatch<GKN>(p, xa.data(), B, K, y, N, g0, g1); });
  }
}
#endif

ffi::Error check_planes(int layout, int64_t block, int64_t packed, int64_t rows, int64_t code_bytes,
                        int64_t scale_elems, int64_t offset_elems, int64_t scale_kind, int64_t offset_kind,
                        int64_t table_elems, int64_t scale_bytes, int64_t offset_bytes) {
  if (scale_kind < 0 || scale_kind > 3) return ffi::Error::InvalidArgument("vt kernel: scale_kind must be 0..3");
  if (offset_kind < 0 || offset_kind > 3) return ffi::Error::InvalidArgument("vt kernel: offset_kind must be 0..3");
  const int64_t sbytes[4] = {4, 2, 2, 1}, obytes[4] = {0, 4, 2, 1};
  if (scale_bytes != scale_elems * sbytes[scale_kind])
    return ffi::Error::InvalidArgument("vt kernel: the scales' dtype does not match scale_kind");
  if (scale_kind == kByte && table_elems != 256)
    return ffi::Error::InvalidArgument("vt kernel: byte scales need a 256-entry table");
  if (offset_kind != kNoOffset && offset_bytes != offset_elems * obytes[offset_kind])
    return ffi::Error::InvalidArgument("vt kernel: the offsets' dtype does not match offset_kind");
  const int k = kd(static_cast<int>(scale_kind), static_cast<int>(offset_kind));
  if (k != kd(kF32, kNoOffset) && k != kd(kF32, kOffF32) && k != kd(kF16, kNoOffset) && k != kd(kF16, kOffF16) &&
      k != kd(kF16, kZeroNibbles) && k != kd(kByte, kNoOffset))
    return ffi::Error::InvalidArgument("vt kernel: this (scale_kind, offset_kind) pair is not compiled");
  if (layout < 0 || layout > 3) return ffi::Error::InvalidArgument("vt kernel: layout must be 0..3");
  if (packed % 32 != 0) return ffi::Error::InvalidArgument("vt kernel: the packed axis must be a multiple of 32");
  if (!(block == 16 || (block > 0 && block % 32 == 0)) || packed % block != 0)
    return ffi::Error::InvalidArgument("vt kernel: block must be 16 or a multiple of 32 dividing the packed axis");
  if (layout == kHalves && block == 16) return ffi::Error::InvalidArgument("vt kernel: GGML halves need block >= 32");
  int64_t per_row = layout == kInt8 ? packed : packed / 2;
  if (code_bytes != rows * per_row) return ffi::Error::InvalidArgument("vt kernel: codes have the wrong size");
  if (scale_elems != rows * (packed / block)) return ffi::Error::InvalidArgument("vt kernel: scales have the wrong size");
  const int64_t want_off = offset_kind == kNoOffset ? 0
                           : offset_kind == kZeroNibbles ? rows * ((packed / block + 1) / 2) : scale_elems;
  if (offset_elems != want_off)
    return ffi::Error::InvalidArgument("vt kernel: offsets must be empty, shaped like scales, or packed zero pairs");
  return ffi::Error::Success();
}

Planes make_planes(const void* codes, const float* lut, const void* scales, const void* offsets, const float* table,
                   int scale_kind, int offset_kind, int layout, int block, int64_t packed) {
  Planes p;
  p.codes = static_cast<const uint8_t*>(codes);
  p.lut = lut;
  p.scales = scales;
  p.offsets = offset_kind != kNoOffset ? offsets : nullptr;
  p.scale_table = table;
  p.scale_kind = scale_kind;
  p.offset_kind = offset_kind;
  p.zrow = (packed / block + 1) / 2;
  p.layout = layout;
  p.block = block;
  p.row_bytes = layout == kInt8 ? packed : packed / 2;
  p.nblk = packed / block;
  p.ngroups = packed / 32;
  p.gblk.resize(p.ngroups);
  for (int64_t g = 0; g < p.ngroups; ++g) p.gblk[g] = block == 16 ? 2 * g : static_cast<int32_t>(g * 32 / block);
  return p;
}

ffi::Error QMatmulImpl(ffi::Buffer<ffi::F32> x, ffi::AnyBuffer codes, ffi::Buffer<ffi::F32> lut,
                       ffi::AnyBuffer scales, ffi::AnyBuffer offsets, ffi::Buffer<ffi::F32> table,
                       ffi::ResultBuffer<ffi::F32> y, int64_t layout, int64_t block, int64_t kn, int64_t threads,
                       int64_t scale_kind, int64_t offset_kind, int64_t gemm_min, ffi::ThreadPool pool) {
  auto xd = x.dimensions();
  auto yd = y->dimensions();
  if (xd.size() != 2 || yd.size() != 2 || xd[0] != yd[0])
    return ffi::Error::InvalidArgument("vt_qmatmul: x must be (B, K) and y (B, N)");
  if (lut.element_count() != 16) return ffi::Error::InvalidArgument("vt_qmatmul: lut must hold 16 floats");
  const int64_t B = xd[0], K = xd[1], N = yd[1];
  const int64_t packed = kn ? N : K, rows = kn ? K : N;
  ffi::Error err = check_planes(static_cast<int>(layout), block, packed, rows, codes.size_bytes(),
                                scales.element_count(), offsets.element_count(), scale_kind, offset_kind,
                                table.element_count(), scales.size_bytes(), offsets.size_bytes());
  if (err.failure()) return err;
  Planes p = make_planes(codes.untyped_data(), lut.typed_data(), scales.untyped_data(), offsets.untyped_data(),
                         table.typed_data(), static_cast<int>(scale_kind), static_cast<int>(offset_kind),
                         static_cast<int>(layout), static_cast<int>(block), packed);
  const float* xv = x.typed_data();
  float* yv = y->typed_data();
  int nt = static_cast<int>(std::max<int64_t>(1, threads));
  if (B == 0 || N == 0) return ffi::Error::Success();
#if VT_AVX512
  if (gemm_min > 0 && B >= gemm_min) {
    gemm_call(p, xv, B, K, yv, N, kn != 0, nt, pool);
    return ffi::Error::Success();
  }
#endif
  if (!kn) {
    // x to decode order, once per call
    Scratch xbuf(static_cast<size_t>(B * K));
    float* xp = xbuf.data();
    int perm[32];
    for (int i = 0; i < 32; ++i) perm[i] = decode_perm(p.layout, i);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t g = 0; g < K / 32; ++g)
        for (int i = 0; i < 32; ++i) xp[b * K + g * 32 + i] = xv[b * K + g * 32 + perm[i]];
    const float* xpp = xp;
    parallel_for_pool(N, 2, pool, nt, [&](int64_t n0, int64_t n1) {
#if VT_AVX512 || VT_AVX2
      dispatch<NK>(p, xpp, B, K, yv, N, n0, n1);
#else
      nk_rows_scalar(p, xpp, B, K, yv, N, n0, n1);
#endif
    });
  } else {
    parallel_for_pool(
        N / 32, 4, pool, nt,
        [&](int64_t g0, int64_t g1) {
#if VT_AVX512 || VT_AVX2
          dispatch<KN>(p, xv, B, K, yv, N, g0, g1);
#else
          kn_cols_scalar(p, xv, B, K, yv, N, g0, g1);
#endif
        },
        1);
  }
  return ffi::Error::Success();
}

ffi::Error DecodeImpl(ffi::AnyBuffer codes, ffi::Buffer<ffi::F32> lut, ffi::AnyBuffer scales, ffi::AnyBuffer offsets,
                      ffi::Buffer<ffi::F32> table, ffi::ResultBuffer<ffi::F32> w, int64_t layout, int64_t block,
                      int64_t threads, int64_t scale_kind, int64_t offset_kind, ffi::ThreadPool pool) {
  auto wd = w->dimensions();
  if (wd.size() != 2) return ffi::Error::InvalidArgument("vt_decode: w must be (R, C)");
  if (lut.element_count() != 16) return ffi::Error::InvalidArgument("vt_decode: lut must hold 16 floats");
  const int64_t R = wd[0], C = wd[1];
  ffi::Error err = check_planes(static_cast<int>(layout), block, C, R, codes.size_bytes(), scales.element_count(),
                                offsets.element_count(), scale_kind, offset_kind, table.element_count(),
                                scales.size_bytes(), offsets.size_bytes());
  if (err.failure()) return err;
  Planes p = make_planes(codes.untyped_data(), lut.typed_data(), scales.untyped_data(), offsets.untyped_data(),
                         table.typed_data(), static_cast<int>(scale_kind), static_cast<int>(offset_kind),
                         static_cast<int>(layout), static_cast<int>(block), C);
  float* wv = w->typed_data();
  parallel_for_pool(R, 1, pool, static_cast<int>(std::max<int64_t>(1, threads)), [&](int64_t r0, int64_t r1) {
#if VT_AVX512 || VT_AVX2
    dispatch<DEC>(p, wv, C, r0, r1);
#else
    decode_rows_scalar(p, wv, C, r0, r1);
#endif
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------------------------
// W8A8: int8 activations times an int8 weight (N, K), int32 sums per block of K (a multiple of 32).
// ---------------------------------------------------------------------------------------------------------------
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define VT_VNNI 1
// Per 64-byte step c of a weight row (two 32-value groups): -128 * sum(w) per 4-byte lane (the start of the int32
// sum, so that vpdpbusd on x + 128 leaves sum(x * w)) and the two groups' scales (lanes 0..7, 8..15).
inline void i8_prepare(const int8_t* wr, const float* sr, int64_t K, int block, __m512i* negcorr, __m512* sv) {
  const __m512i k128 = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t k = 0, c = 0; k < K; k += 64, ++c) {
    const bool full = K - k >= 64;
    const __mmask64 m = full ? ~__mmask64(0) : __mmask64(0xFFFFFFFFull);
    const __m512i wv = _mm512_maskz_loadu_epi8(m, wr + k);
    negcorr[c] = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), k128, wv));
    const float s0 = sr[k / block], s1 = full ? sr[(k + 32) / block] : 0.f;
    sv[c] = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(s0), _mm512_set1_ps(s1));
  }
}

// NT weight rows times BT rows of x: every x load serves NT rows, every weight load BT rows (16 accumulators at
// 4 x 4). Per lane: acc += scale * int32(sum over 4 bytes), steps in order: the same sums whatever the tiling.
template <int NT, int BT>
inline void i8_tile(const uint8_t* xu, const int8_t* w, int64_t K, const __m512i* negcorr, const __m512* sv,
                    int64_t nch, float* out /* [BT][NT] */) {
  __m512 acc[NT][BT];
  for (int t = 0; t < NT; ++t)
    for (int r = 0; r < BT; ++r) acc[t][r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < nch; ++c) {
    const int64_t k = c * 64;
    const __mmask64 m = K - k >= 64 ? ~__mmask64(0) : __mmask64(0xFFFFFFFFull);
    __m512i wv[NT];
    for (int t = 0; t < NT; ++t) wv[t] = _mm512_maskz_loadu_epi8(m, w + t * K + k);
    for (int r = 0; r < BT; ++r) {
      const __m512i xv = _mm512_maskz_loadu_epi8(m, xu + r * K + k);
      for (int t = 0; t < NT; ++t) {
        const __m512i d = _mm512_dpbusd_epi32(negcorr[t * nch + c], xv, wv[t]);
        acc[t][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sv[t * nch + c], acc[t][r]);
      }
    }
  }
  for (int r = 0; r < BT; ++r)
    for (int t = 0; t < NT; ++t) out[r * NT + t] = _mm512_reduce_add_ps(acc[t][r]);
}

// Blocks of a multiple of 64 values (int8 with a scale per row, or per 64k values): the int32 sums run over the
// whole block inside vpdpbusd's own accumulator, and are converted and scaled once per block (not per 64 bytes).
inline void i8_prepare_blocks(const int8_t* wr, const float* sr, int64_t K, int block, __m512i* negblk,
                              __m512* svblk) {
  const __m512i k128 = _mm512_set1_epi8(static_cast<char>(0x80));
  const int64_t nblk = K / block, spb = block / 64;
  for (int64_t j = 0; j < nblk; ++j) {
    __m512i acc = _mm512_setzero_si512();
    for (int64_t c = 0; c < spb; ++c)
      acc = _mm512_dpbusd_epi32(acc, k128, _mm512_loadu_si512(wr + j * block + c * 64));
    negblk[j] = _mm512_sub_epi32(_mm512_setzero_si512(), acc);
    svblk[j] = _mm512_set1_ps(sr[j]);
  }
}

template <int NT, int BT>
inline void i8_tile_blocks(const uint8_t* xu, const int8_t* w, int64_t K, const __m512i* negblk, const __m512* svblk,
                           int64_t nblk, int64_t spb, float* out /* [BT][NT] */) {
  __m512 acc[NT][BT];
  for (int t = 0; t < NT; ++t)
    for (int r = 0; r < BT; ++r) acc[t][r] = _mm512_setzero_ps();
  for (int64_t j = 0; j < nblk; ++j) {
    __m512i ia[NT][BT];
    for (int t = 0; t < NT; ++t)
      for (int r = 0; r < BT; ++r) ia[t][r] = negblk[t * nblk + j];
    for (int64_t c = 0; c < spb; ++c) {
      const int64_t k = (j * spb + c) * 64;
      __m512i wv[NT];
      for (int t = 0; t < NT; ++t) wv[t] = _mm512_loadu_si512(w + t * K + k);
      for (int r = 0; r < BT; ++r) {
        const __m512i xv = _mm512_loadu_si512(xu + r * K + k);
        for (int t = 0; t < NT; ++t) ia[t][r] = _mm512_dpbusd_epi32(ia[t][r], xv, wv[t]);
      }
    }
    for (int t = 0; t < NT; ++t)
      for (int r = 0; r < BT; ++r) acc[t][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[t][r]), svblk[t * nblk + j], acc[t][r]);
  }
  for (int r = 0; r < BT; ++r)
    for (int t = 0; t < NT; ++t) out[r * NT + t] = _mm512_reduce_add_ps(acc[t][r]);
}

// The same for rows b0..b1 of x against NT weight rows from n prepared by i8_prepare_blocks.
template <int NT>
inline void i8_rows_tile_blocks(const uint8_t* xu, const float* xs, const int8_t* w, int64_t K, int64_t N, int block,
                                float* y, int64_t n, int64_t b0, int64_t b1, const __m512i* negblk,
                                const __m512* svblk) {
  const int64_t nblk = K / block, spb = block / 64;
  float out[2 * NT];
  int64_t b = b0;
  for (; b + 2 <= b1; b += 2) {
    i8_tile_blocks<NT, 2>(xu + b * K, w + n * K, K, negblk, svblk, nblk, spb, out);
    for (int r = 0; r < 2; ++r)
      for (int t = 0; t < NT; ++t) y[(b + r) * N + n + t] = out[r * NT + t] * xs[b + r];
  }
  for (; b < b1; ++b) {
    i8_tile_blocks<NT, 1>(xu + b * K, w + n * K, K, negblk, svblk, nblk, spb, out);
    for (int t = 0; t < NT; ++t) y[b * N + n + t] = out[t] * xs[b];
  }
}

// Rows b0..b1 of x against NT prepared weight rows from n.
template <int NT>
inline void i8_rows_tile(const uint8_t* xu, const float* xs, const int8_t* w, int64_t K, int64_t N, float* y,
                         int64_t n, int64_t b0, int64_t b1, const __m512i* negcorr, const __m512* sv) {
  const int64_t nch = (K + 63) / 64;
  float out[4 * NT];
  int64_t b = b0;
  for (; b + 4 <= b1; b += 4) {
    i8_tile<NT, 4>(xu + b * K, w + n * K, K, negcorr, sv, nch, out);
    for (int r = 0; r < 4; ++r)
      for (int t = 0; t < NT; ++t) y[(b + r) * N + n + t] = out[r * NT + t] * xs[b + r];
  }
  for (; b < b1; ++b) {
    i8_tile<NT, 1>(xu + b * K, w + n * K, K, negcorr, sv, nch, out);
    for (int t = 0; t < NT; ++t) y[b * N + n + t] = out[t] * xs[b];
  }
}

// Weight rows kI8Rows at a time (prepared once), against x kI8Batch rows at a time: both stay in L1/L2, instead of
// streaming the whole of x again for every 4 weight rows (at 4096 tokens x 384 that made W8A8 2x slower than float32).
constexpr int64_t kI8Rows = 64;
constexpr int64_t kI8Batch = 64;

// Large batches (B >= kI8Wide): the GEMM form. 32 weight rows (two vectors of 16 output columns) are repacked once
// into 4-byte columns (Wp[v][k/4] holds w[n, k..k+3] of 16 rows n), and each 4 bytes of a row of x are broadcast
// against them: no horizontal sums, stores of 16 contiguous outputs, int32 sums over each block, one conversion
// and scale per block and output. The per-output sums are the same whatever B, N or the threads.
constexpr int64_t kI8Wide = 16;

template <int BT>
inline void i8_gemm_tile(const uint8_t* xu, const float* xs, int64_t K, int block, const __m512i* wp,
                         const __m512i* neg, const __m512* sc, int64_t nblk, float* y, int64_t N, int64_t n,
                         int64_t b, __mmask16 m0, __mmask16 m1) {
  const int64_t k4b = block / 4, k4n = K / 4;
  __m512 acc[BT][2];
  for (int r = 0; r < BT; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t j = 0; j < nblk; ++j) {
    __m512i ia[BT][2];
    for (int r = 0; r < BT; ++r) {
      ia[r][0] = neg[j];
      ia[r][1] = neg[nblk + j];
    }
    for (int64_t q = j * k4b; q < (j + 1) * k4b; ++q) {
      const __m512i w0 = wp[q], w1 = wp[k4n + q];
      for (int r = 0; r < BT; ++r) {
        int32_t four;
        std::memcpy(&four, xu + (b + r) * K + 4 * q, 4);
        const __m512i xb = _mm512_set1_epi32(four);
        ia[r][0] = _mm512_dpbusd_epi32(ia[r][0], xb, w0);
        ia[r][1] = _mm512_dpbusd_epi32(ia[r][1], xb, w1);
      }
    }
    for (int r = 0; r < BT; ++r) {
      acc[r][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[r][0]), sc[j], acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[r][1]), sc[nblk + j], acc[r][1]);
    }
  }
  for (int r = 0; r < BT; ++r) {
    const __m512 xsv = _mm512_set1_ps(xs[b + r]);
    _mm512_mask_storeu_ps(y + (b + r) * N + n, m0, _mm512_mul_ps(acc[r][0], xsv));
    _mm512_mask_storeu_ps(y + (b + r) * N + n + 16, m1, _mm512_mul_ps(acc[r][1], xsv));
  }
}

void i8_gemm(const uint8_t* xu, const float* xs, const int8_t* w, const float* s, int64_t B, int64_t K, int64_t N,
             int block, float* y, int64_t n0, int64_t n1) {
  const int64_t k4n = K / 4, nblk = K / block;
  std::vector<__m512i> wp(static_cast<size_t>(2 * k4n)), neg(static_cast<size_t>(2 * nblk));
  std::vector<__m512> sc(static_cast<size_t>(2 * nblk));
  for (int64_t n = n0; n < n1; n += 32) {
    alignas(64) int32_t lane[16];
    alignas(64) float fl[16];
    for (int v = 0; v < 2; ++v) {
      for (int64_t q = 0; q < k4n; ++q) {
        for (int l = 0; l < 16; ++l) {
          const int64_t row = n + v * 16 + l;
          lane[l] = 0;
          if (row < n1) std::memcpy(&lane[l], w + row * K + 4 * q, 4);
        }
        wp[v * k4n + q] = _mm512_load_si512(lane);
      }
      for (int64_t j = 0; j < nblk; ++j) {
        for (int l = 0; l < 16; ++l) {
          const int64_t row = n + v * 16 + l;
          int32_t sum = 0;
          if (row < n1)
            for (int64_t k = j * block; k < (j + 1) * block; ++k) sum += w[row * K + k];
          lane[l] = -128 * sum;  // (x + 128) * w summed, minus 128 * w: x * w
          fl[l] = row < n1 ? s[row * nblk + j] : 0.f;
        }
        neg[v * nblk + j] = _mm512_load_si512(lane);
        sc[v * nblk + j] = _mm512_load_ps(fl);
      }
    }
    const int64_t left = n1 - n;
    const __mmask16 m0 = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
    const __mmask16 m1 = left >= 32 ? __mmask16(0xFFFF) : left <= 16 ? __mmask16(0) : __mmask16((1u << (left - 16)) - 1);
    int64_t b = 0;
    for (; b + 4 <= B; b += 4) i8_gemm_tile<4>(xu, xs, K, block, wp.data(), neg.data(), sc.data(), nblk, y, N, n, b, m0, m1);
    for (; b < B; ++b) i8_gemm_tile<1>(xu, xs, K, block, wp.data(), neg.data(), sc.data(), nblk, y, N, n, b, m0, m1);
  }
}
#else
#define VT_VNNI 0
#endif

#if VT_VNNI
// Weight rows kI8Rows at a time (prepared once) against x kI8Batch rows at a time. BLK: blocks of a multiple of 64
// (int32 sums over each block), else 64 bytes at a time (blocks of 32).
template <bool BLK>
void i8_rows_vnni(const uint8_t* xu, const float* xs, const int8_t* w, const float* s, int64_t B, int64_t K,
                  int64_t N, int block, float* y, int64_t n0, int64_t n1) {
  const int64_t nblk = K / block, per = BLK ? nblk : (K + 63) / 64;  // prepared vectors per weight row
  std::vector<__m512i> negcorr(static_cast<size_t>(kI8Rows * per));
  std::vector<__m512> sv(static_cast<size_t>(kI8Rows * per));
  for (int64_t nb0 = n0; nb0 < n1; nb0 += kI8Rows) {
    const int64_t nb1 = std::min(n1, nb0 + kI8Rows);
    for (int64_t n = nb0; n < nb1; ++n) {
      __m512i* nc = &negcorr[(n - nb0) * per];
      __m512* sc = &sv[(n - nb0) * per];
      if constexpr (BLK) i8_prepare_blocks(w + n * K, s + n * nblk, K, block, nc, sc);
      else i8_prepare(w + n * K, s + n * nblk, K, block, nc, sc);
    }
    for (int64_t b0 = 0; b0 < B; b0 += kI8Batch) {
      const int64_t b1 = std::min(B, b0 + kI8Batch);
      for (int64_t n = nb0; n < nb1;) {
        const __m512i* nc = &negcorr[(n - nb0) * per];
        const __m512* sc = &sv[(n - nb0) * per];
        const int nt = n + 4 <= nb1 ? 4 : 1;
        if constexpr (BLK) {
          if (nt == 4) i8_rows_tile_blocks<4>(xu, xs, w, K, N, block, y, n, b0, b1, nc, sc);
          else i8_rows_tile_blocks<1>(xu, xs, w, K, N, block, y, n, b0, b1, nc, sc);
        } else {
          if (nt == 4) i8_rows_tile<4>(xu, xs, w, K, N, y, n, b0, b1, nc, sc);
          else i8_rows_tile<1>(xu, xs, w, K, N, y, n, b0, b1, nc, sc);
        }
        n += nt;
      }
    }
  }
}
#endif

#if VT_AVX2
// AVX2 (no VNNI): one weight row against NB rows of x. 32 products at a time: |w| (unsigned) times x with w's sign,
// pairs summed to int16 by vpmaddubsw (at most 2 * 127 * 128 = 32512: never saturates, x being in [-127, 127]),
// then to int32 lanes by vpmaddwd; each block's eight int32 lane sums (exact) times its scale go into float lanes,
// summed at the end. The weight row is loaded once for the NB rows.
template <int NB>
inline void i8_dot8(const int8_t* wr, const float* sr, const int8_t* xq, int64_t K, int block, int64_t nblk,
                    float* out) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[NB];
  for (int i = 0; i < NB; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t j = 0; j < nblk; ++j) {
    __m256i s32[NB];
    for (int i = 0; i < NB; ++i) s32[i] = _mm256_setzero_si256();
    for (int64_t k = j * block; k < (j + 1) * block; k += 32) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + k));
      const __m256i aw = _mm256_sign_epi8(wv, wv);
      for (int i = 0; i < NB; ++i) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + i * K + k));
        s32[i] = _mm256_add_epi32(s32[i], _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, wv)), ones));
      }
    }
    const __m256 sv = _mm256_set1_ps(sr[j]);
    for (int i = 0; i < NB; ++i) acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32[i]), sv, acc[i]);
  }
  for (int i = 0; i < NB; ++i) out[i] = hsum8(acc[i]);
}
#endif

void i8_rows(const uint8_t* xu, const int8_t* xq, const float* xs, const int8_t* w, const float* s, int64_t B,
             int64_t K, int64_t N, int block, float* y, int64_t n0, int64_t n1) {
  const int64_t nblk = K / block;
#if VT_VNNI
  (void)xq;
  if (block % 64 == 0) return i8_rows_vnni<true>(xu, xs, w, s, B, K, N, block, y, n0, n1);
  i8_rows_vnni<false>(xu, xs, w, s, B, K, N, block, y, n0, n1);
#elif VT_AVX2
  (void)xu;
  for (int64_t n = n0; n < n1; ++n) {
    int64_t b = 0;
    float out[4];
    for (; b + 4 <= B; b += 4) {
      i8_dot8<4>(w + n * K, s + n * nblk, xq + b * K, K, block, nblk, out);
      for (int i = 0; i < 4; ++i) y[(b + i) * N + n] = out[i] * xs[b + i];
    }
    for (; b < B; ++b) {
      i8_dot8<1>(w + n * K, s + n * nblk, xq + b * K, K, block, nblk, out);
      y[b * N + n] = out[0] * xs[b];
    }
  }
#else
  (void)xu;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wr = w + n * K;
    const float* sr = s + n * nblk;
    for (int64_t b = 0; b < B; ++b) {
      const int8_t* xr = xq + b * K;
      float acc = 0.f;
      for (int64_t j = 0; j < nblk; ++j) {
        int32_t isum = 0;
        for (int64_t k = j * block; k < (j + 1) * block; ++k) isum += int32_t(xr[k]) * int32_t(wr[k]);
        acc += static_cast<float>(isum) * sr[j];
      }
      y[b * N + n] = acc * xs[b];
    }
  }
#endif
}

ffi::Error QMatmulI8Impl(ffi::AnyBuffer xq, ffi::Buffer<ffi::F32> xs, ffi::AnyBuffer codes,
                         ffi::Buffer<ffi::F32> scales, ffi::ResultBuffer<ffi::F32> y, int64_t block, int64_t threads,
                         ffi::ThreadPool pool) {
  auto yd = y->dimensions();
  if (yd.size() != 2) return ffi::Error::InvalidArgument("vt_qmatmul_i8: y must be (B, N)");
  const int64_t B = yd[0], N = yd[1];
  if (B == 0 || N == 0) return ffi::Error::Success();
  if (xs.element_count() != B) return ffi::Error::InvalidArgument("vt_qmatmul_i8: xs must hold B floats");
  const int64_t K = static_cast<int64_t>(xq.size_bytes()) / B;
  if (K * B != static_cast<int64_t>(xq.size_bytes()) || K % 32 != 0 || block <= 0 || block % 32 != 0 ||
      K % block != 0)
    return ffi::Error::InvalidArgument("vt_qmatmul_i8: K must be a multiple of 32 and of the block (a multiple of 32)");
  if (static_cast<int64_t>(codes.size_bytes()) != N * K)
    return ffi::Error::InvalidArgument("vt_qmatmul_i8: codes must be (N, K) int8");
  if (scales.element_count() != N * (K / block))
    return ffi::Error::InvalidArgument("vt_qmatmul_i8: scales must be (N, K / block)");
  const int8_t* xqv = static_cast<const int8_t*>(xq.untyped_data());
  std::vector<uint8_t> xu(static_cast<size_t>(B * K));
  for (int64_t i = 0; i < B * K; ++i) xu[i] = static_cast<uint8_t>(xqv[i]) ^ 0x80;  // xq + 128
  const uint8_t* xup = xu.data();
  const int8_t* wv = static_cast<const int8_t*>(codes.untyped_data());
  const float* sv = scales.typed_data();
  const float* xsv = xs.typed_data();
  float* yv = y->typed_data();
#if VT_VNNI
  if (B >= kI8Wide) {
    parallel_for_pool(N, 32, pool, static_cast<int>(std::max<int64_t>(1, threads)), [&](int64_t n0, int64_t n1) {
      i8_gemm(xup, xsv, wv, sv, B, K, N, static_cast<int>(block), yv, n0, n1);
    });
    return ffi::Error::Success();
  }
#endif
  parallel_for_pool(N, 4, pool, static_cast<int>(std::max<int64_t>(1, threads)), [&](int64_t n0, int64_t n1) {
    i8_rows(xup, xqv, xsv, wv, sv, B, K, N, static_cast<int>(block), yv, n0, n1);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VtQMatmul, QMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x (B, K)
                                  .Arg<ffi::AnyBuffer>()         // codes (uint8 or int8)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lut (16,)
                                  .Arg<ffi::AnyBuffer>()         // scales (rows, blocks), scale_kind
                                  .Arg<ffi::AnyBuffer>()         // offsets (rows, blocks), packed zeros or (0,)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale table (256,) or (0,)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y (B, N)
                                  .Attr<int64_t>("layout")
                                  .Attr<int64_t>("block")
                                  .Attr<int64_t>("kn")
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("scale_kind")
                                  .Attr<int64_t>("offset_kind")
                                  .Attr<int64_t>("gemm_min")
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(VtDecode, DecodeImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()         // codes
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lut
                                  .Arg<ffi::AnyBuffer>()         // scales, scale_kind
                                  .Arg<ffi::AnyBuffer>()         // offsets, packed zeros or (0,)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale table (256,) or (0,)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // w (R, C)
                                  .Attr<int64_t>("layout")
                                  .Attr<int64_t>("block")
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("scale_kind")
                                  .Attr<int64_t>("offset_kind")
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(VtQMatmulI8, QMatmulI8Impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()         // xq (B, K) int8
                                  .Arg<ffi::Buffer<ffi::F32>>()  // xs (B,)
                                  .Arg<ffi::AnyBuffer>()         // codes (N, K) int8
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scales (N, K / block)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y (B, N)
                                  .Attr<int64_t>("block")
                                  .Attr<int64_t>("threads")
                                  .Ctx<ffi::ThreadPool>());

extern "C" int vt_kernels_simd() { return VT_AVX512 ? 512 : VT_AVX2 ? 256 : 0; }
extern "C" int vt_kernels_vnni() { return VT_VNNI; }
