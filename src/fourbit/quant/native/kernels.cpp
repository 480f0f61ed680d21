// fourbit native 4-bit kernels: quantize, dequantize, and fused decode-and-multiply for small batches.
//
// Layout (bitsandbytes-compatible): flat row-major elements, blocks of `blocksize` consecutive elements, two codes
// per byte with the even element in the high nibble. Scales are fp32 per block, or double-quantized
// (uint8 code into the 256-entry dynamic map, times an fp32 maximum per 256 blocks, plus an offset).
//
// Every variant is compiled into this one file; AVX-512 functions carry a target attribute and are chosen at run time
// (never -march=native: the built library is cached and may move between machines). Build with -ffp-contract=off so
// the compiler never fuses the multiply and add whose separate roundings bitsandbytes' bytes depend on.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <atomic>
#include <cstring>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FOURBIT_X86 1
#endif

namespace {

// ---------------------------------------------------------------------------------------------------------------
// block scales

struct Scales {
  const float* absmax = nullptr;      // fp32 per block, or
  const uint8_t* qabsmax = nullptr;   // double quantization: codes into `dynmap`
  const float* nested = nullptr;      // one fp32 max per 256 blocks
  const float* dynmap = nullptr;      // 256 entries
  float offset = 0.f;

  inline float operator()(int64_t block) const {
    if (absmax) return absmax[block];
    const float prod = dynmap[qabsmax[block]] * nested[block >> 8];  // two roundings (no FMA), as bitsandbytes
    return prod + offset;
  }
};

Scales make_scales(const torch::Tensor& absmax, const c10::optional<torch::Tensor>& nested,
                   const c10::optional<torch::Tensor>& dynmap, double offset) {
  Scales s;
  if (nested.has_value() && nested->defined()) {
    TORCH_CHECK(absmax.scalar_type() == torch::kUInt8, "double-quantized absmax must be uint8");
    s.qabsmax = absmax.data_ptr<uint8_t>();
    s.nested = nested->data_ptr<float>();
    s.dynmap = dynmap->data_ptr<float>();
    s.offset = static_cast<float>(offset);
  } else {
    TORCH_CHECK(absmax.scalar_type() == torch::kFloat32, "absmax must be float32");
    s.absmax = absmax.data_ptr<float>();
  }
  return s;
}

inline float load_as_float(const float* p, int64_t i) { return p[i]; }
inline float load_as_float(const at::BFloat16* p, int64_t i) { return static_cast<float>(p[i]); }
inline float load_as_float(const at::Half* p, int64_t i) { return static_cast<float>(p[i]); }

// ---------------------------------------------------------------------------------------------------------------
// quantize: scalar reference (any CPU)

template <typename T>
void quantize_scalar(const T* x, int64_t n, int64_t blocksize, const float* mid, const uint8_t* order,
                     uint8_t* packed, float* absmax, int64_t b0, int64_t b1, std::atomic<int64_t>* bad) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * blocksize, end = std::min(n, start + blocksize);
    float amax = 0.f;
    for (int64_t i = start; i < end; ++i) {
      const float v = load_as_float(x, i);
      if (!std::isfinite(v)) {  // reported to Python, which names the element; the block's bytes are discarded
        bad->store(1);
        amax = 0.f;
        break;
      }
      amax = std::max(amax, std::fabs(v));
    }
    absmax[b] = amax;
    const float clamped = std::max(amax, 1e-38f);
    const bool full = end - start == blocksize;
    const float recip = 1.0f / clamped;
    for (int64_t i = start; i < end; i += 2) {
      uint8_t q[2];
      for (int j = 0; j < 2; ++j) {
        float s = 0.f;  // the pad element of an odd count is a scaled 0.0
        if (i + j < end) {
          const float v = load_as_float(x, i + j);
          s = full ? v * recip : v / clamped;
          s = std::min(1.f, std::max(-1.f, s));
        }
        int cnt = 0;
        for (int k = 0; k < 15; ++k) cnt += mid[k] < s;
        q[j] = order[cnt];
      }
      packed[i / 2] = static_cast<uint8_t>((q[0] << 4) | q[1]);
    }
  }
}

#ifdef FOURBIT_X86
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
AVX512 inline __m512 load16(const at::BFloat16* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
AVX512 inline __m512 load16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// full blocks whose size is a multiple of 32, vectorized; other blocks go through the scalar path
template <typename T>
AVX512 void quantize_avx512(const T* x, int64_t n, int64_t blocksize, const float* mid, const uint8_t* order,
                            uint8_t* packed, float* absmax, int64_t b0, int64_t b1, std::atomic<int64_t>* bad) {
  const __m512 sign_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  const __m512i exp_mask = _mm512_set1_epi32(0x7f800000);
  __m512 mids[15];
  for (int k = 0; k < 15; ++k) mids[k] = _mm512_set1_ps(mid[k]);
  alignas(64) int32_t order32[16];
  for (int k = 0; k < 16; ++k) order32[k] = order[k];
  const __m512i order_v = _mm512_load_si512(order32);
  const __m512i one = _mm512_set1_epi32(1);
  // gathers the 16 codes of even elements and the 16 of odd ones from two vectors of 16 consecutive elements
  const __m512i even_idx = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd_idx = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * blocksize;
    if (start + blocksize > n) {  // the partial last block divides instead: scalar
      quantize_scalar(x, n, blocksize, mid, order, packed, absmax, b, b + 1, bad);
      continue;
    }
    __m512 vmax = _mm512_setzero_ps();
    __mmask16 nonfinite = 0;
    for (int64_t i = start; i < start + blocksize; i += 16) {
      __m512 v = load16(x + i);
      nonfinite |= _mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_castps_si512(v), exp_mask), exp_mask);
      vmax = _mm512_max_ps(vmax, _mm512_and_ps(v, sign_mask));
    }
    if (nonfinite) {  // find the exact index in scalar code
      quantize_scalar(x, n, blocksize, mid, order, packed, absmax, b, b + 1, bad);
      continue;
    }
    const float amax = _mm512_reduce_max_ps(vmax);
    absmax[b] = amax;
    const __m512 recip = _mm512_set1_ps(1.0f / std::max(amax, 1e-38f));
    const __m512 lo1 = _mm512_set1_ps(-1.f), hi1 = _mm512_set1_ps(1.f);
    for (int64_t i = start; i < start + blocksize; i += 32) {
      __m512i codes[2];
      for (int h = 0; h < 2; ++h) {
        __m512 s = _mm512_mul_ps(load16(x + i + 16 * h), recip);
        s = _mm512_min_ps(_mm512_max_ps(s, lo1), hi1);
        __m512i cnt = _mm512_setzero_si512();
        for (int k = 0; k < 15; ++k)
          cnt = _mm512_mask_add_epi32(cnt, _mm512_cmp_ps_mask(mids[k], s, _CMP_LT_OQ), cnt, one);
        codes[h] = _mm512_permutexvar_epi32(cnt, order_v);
      }
      __m512i even = _mm512_permutex2var_epi32(codes[0], even_idx, codes[1]);
      __m512i odd = _mm512_permutex2var_epi32(codes[0], odd_idx, codes[1]);
      __m512i bytes = _mm512_or_si512(_mm512_slli_epi32(even, 4), odd);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(packed + i / 2), _mm512_cvtepi32_epi8(bytes));
    }
  }
}
#endif

bool has_avx512() {
#ifdef FOURBIT_X86
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return ok;
#else
  return false;
#endif
}

template <typename T>
void quantize_dispatch(const T* x, int64_t n, int64_t blocksize, const float* mid, const uint8_t* order,
                       uint8_t* packed, float* absmax, std::atomic<int64_t>* bad) {
  const int64_t n_blocks = (n + blocksize - 1) / blocksize;
  const int64_t grain = std::max<int64_t>(1, 16384 / blocksize);
  at::parallel_for(0, n_blocks, grain, [&](int64_t b0, int64_t b1) {
#ifdef FOURBIT_X86
    if (has_avx512() && blocksize % 32 == 0) {
      quantize_avx512(x, n, blocksize, mid, order, packed, absmax, b0, b1, bad);
      return;
    }
#endif
    quantize_scalar(x, n, blocksize, mid, order, packed, absmax, b0, b1, bad);
  });
}

// ---------------------------------------------------------------------------------------------------------------
// dequantize

inline uint16_t to_bf16_bits(float f) {  // round to nearest even, as torch does for finite values
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7f800000u) == 0x7f800000u) return static_cast<uint16_t>((u >> 16) | ((u & 0xffff) ? 0x40 : 0));
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

template <typename T>
inline void store_one(T* out, int64_t i, float v);
template <>
inline void store_one<float>(float* out, int64_t i, float v) { out[i] = v; }
template <>
inline void store_one<at::BFloat16>(at::BFloat16* out, int64_t i, float v) {
  uint16_t bits = to_bf16_bits(v);
  std::memcpy(out + i, &bits, 2);
}
template <>
inline void store_one<at::Half>(at::Half* out, int64_t i, float v) { out[i] = at::Half(v); }

template <typename T>
void dequantize_scalar(const uint8_t* packed, const Scales& scales, const float* code, int64_t blocksize,
                       int64_t start, int64_t end, T* out) {
  for (int64_t i = start; i < end; ++i) {
    const uint8_t byte = packed[i >> 1];
    const uint8_t nib = (i & 1) ? (byte & 0xf) : (byte >> 4);
    store_one(out, i - start, code[nib] * scales(i / blocksize));
  }
}

#ifdef FOURBIT_X86
AVX512 inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
AVX512 inline void store16(at::BFloat16* p, __m512 v) {
  __m512i u = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
}
AVX512 inline void store16(at::Half* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

// 32 elements (16 bytes) starting at an element index that is a multiple of 32: one block, one scale.
AVX512 inline void decode32(const uint8_t* bytes, __m512 table, __m512 scale, __m512* even, __m512* odd) {
  __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
  *even = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table), scale);
  *odd = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)), table), scale);
}

template <typename T>
AVX512 void dequantize_avx512(const uint8_t* packed, const Scales& scales, const float* code, int64_t blocksize,
                              int64_t start, int64_t end, T* out) {
  const int64_t head = std::min(end, (start + 31) / 32 * 32);
  dequantize_scalar(packed, scales, code, blocksize, start, head, out);
  const int shift = __builtin_ctzll(blocksize);  // blocksizes are powers of two
  const __m512 table = _mm512_loadu_ps(code);
  const __m512i lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  int64_t i = head;
  while (i + 32 <= end) {
    // one scale per block: the chunks of 32 up to the block's end (or the range's) share it
    const int64_t block = i >> shift;
    const int64_t stop = std::min(end, (block + 1) << shift);
    const __m512 scale = _mm512_set1_ps(scales(block));
    for (; i + 32 <= stop; i += 32) {
      __m512 even, odd;
      decode32(packed + i / 2, table, scale, &even, &odd);
      store16(out + (i - start), _mm512_permutex2var_ps(even, lo_idx, odd));
      store16(out + (i - start) + 16, _mm512_permutex2var_ps(even, hi_idx, odd));
    }
    if (i < stop) break;  // the range ends inside this block: the rest is the scalar tail
  }
  // dequantize_scalar writes out[j - start]: shift the base so the tail lands after what was written
  dequantize_scalar(packed, scales, code, blocksize, i, end, out + (i - start));
}
#endif

template <typename T>
void dequantize_dispatch(const uint8_t* packed, const Scales& scales, const float* code, int64_t blocksize,
                         int64_t start, int64_t end, T* out) {
  const int64_t chunk = 1 << 14;  // elements per task, a multiple of 32
  const int64_t first = start / chunk, last = (end + chunk - 1) / chunk;
  at::parallel_for(first, last, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t s = std::max(start, c * chunk), e = std::min(end, (c + 1) * chunk);
      if (s >= e) continue;
#ifdef FOURBIT_X86
      if (has_avx512() && blocksize % 32 == 0) {
        dequantize_avx512(packed, scales, code, blocksize, s, e, out + (s - start));
        continue;
      }
#endif
      dequantize_scalar(packed, scales, code, blocksize, s, e, out + (s - start));
    }
  });
}

// ---------------------------------------------------------------------------------------------------------------
// fused products for small M. Activations arrive de-interleaved (even and odd columns apart, [M, K/2] each) so the
// decoded weights never need re-interleaving. Requires K % 32 == 0 (every 32-element chunk lies in one block).

void matmul_nt_scalar(const float* xe, const float* xo, int64_t M, int64_t N, int64_t K, const uint8_t* packed,
                      const Scales& scales, const float* code, int64_t blocksize, float* out, int64_t n0, int64_t n1) {
  const int64_t half = K / 2;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = packed + n * half;
    for (int64_t m = 0; m < M; ++m) {
      float acc = 0.f;
      for (int64_t j = 0; j < half; ++j) {
        const float s = scales((n * K + 2 * j) / blocksize);
        acc += xe[m * half + j] * (code[row[j] >> 4] * s) + xo[m * half + j] * (code[row[j] & 15] * s);
      }
      out[m * N + n] = acc;
    }
  }
}

#ifdef FOURBIT_X86
// R rows of W at a time share each load of x; M rows of x share each decoded weight
template <int M, int R>
AVX512 void matmul_nt_rows(const float* xe, const float* xo, int64_t N, int64_t K, const uint8_t* packed,
                           const Scales& scales, const __m512 table, int shift, float* out, int64_t n) {
  const int64_t half = K / 2;
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  int64_t block[R];
  __m512 scale[R];
  for (int r = 0; r < R; ++r) block[r] = -1;
  for (int64_t c = 0; c < K; c += 32) {
    __m512 even[R], odd[R];
    for (int r = 0; r < R; ++r) {
      const int64_t b = ((n + r) * K + c) >> shift;
      if (b != block[r]) {
        block[r] = b;
        scale[r] = _mm512_set1_ps(scales(b));
      }
      decode32(packed + (n + r) * half + c / 2, table, scale[r], &even[r], &odd[r]);
    }
    for (int m = 0; m < M; ++m) {
      const __m512 xev = _mm512_loadu_ps(xe + m * half + c / 2);
      const __m512 xov = _mm512_loadu_ps(xo + m * half + c / 2);
      for (int r = 0; r < R; ++r) {
        acc[r][m] = _mm512_fmadd_ps(xev, even[r], acc[r][m]);
        acc[r][m] = _mm512_fmadd_ps(xov, odd[r], acc[r][m]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) out[m * N + n + r] = _mm512_reduce_add_ps(acc[r][m]);
}

template <int M>
AVX512 void matmul_nt_avx512(const float* xe, const float* xo, int64_t N, int64_t K, const uint8_t* packed,
                             const Scales& scales, const float* code, int64_t blocksize, float* out, int64_t n0,
                             int64_t n1) {
  constexpr int R = M <= 2 ? 4 : (M <= 6 ? 2 : 1);  // keeps R*M accumulators within the 32 vector registers
  const __m512 table = _mm512_loadu_ps(code);
  const int shift = __builtin_ctzll(blocksize);
  int64_t n = n0;
  for (; n + R <= n1; n += R) matmul_nt_rows<M, R>(xe, xo, N, K, packed, scales, table, shift, out, n);
  for (; n < n1; ++n) matmul_nt_rows<M, 1>(xe, xo, N, K, packed, scales, table, shift, out, n);
}

// R rows of W at a time: each load and store of the output chunk takes R rows' contributions
template <int M, int R>
AVX512 void matmul_nn_rows(const float* g, int64_t N, int64_t K, const uint8_t* packed, const Scales& scales,
                           const __m512 table, int shift, float* oe, float* oo, int64_t n) {
  const int64_t half = K / 2;
  int64_t block[R];
  __m512 scale[R];
  for (int r = 0; r < R; ++r) block[r] = -1;
  for (int64_t c = 0; c < K; c += 32) {
    __m512 even[R], odd[R];
    for (int r = 0; r < R; ++r) {
      const int64_t b = ((n + r) * K + c) >> shift;
      if (b != block[r]) {
        block[r] = b;
        scale[r] = _mm512_set1_ps(scales(b));
      }
      decode32(packed + (n + r) * half + c / 2, table, scale[r], &even[r], &odd[r]);
    }
    for (int m = 0; m < M; ++m) {
      float* pe = oe + m * half + c / 2;
      float* po = oo + m * half + c / 2;
      __m512 ve = _mm512_loadu_ps(pe), vo = _mm512_loadu_ps(po);
      for (int r = 0; r < R; ++r) {
        const __m512 gm = _mm512_set1_ps(g[m * N + n + r]);
        ve = _mm512_fmadd_ps(gm, even[r], ve);
        vo = _mm512_fmadd_ps(gm, odd[r], vo);
      }
      _mm512_storeu_ps(pe, ve);
      _mm512_storeu_ps(po, vo);
    }
  }
}

template <int M>
AVX512 void matmul_nn_avx512(const float* g, int64_t N, int64_t K, const uint8_t* packed, const Scales& scales,
                             const float* code, int64_t blocksize, float* oe, float* oo, int64_t n0, int64_t n1) {
  constexpr int R = 4;
  const __m512 table = _mm512_loadu_ps(code);
  const int shift = __builtin_ctzll(blocksize);
  int64_t n = n0;
  for (; n + R <= n1; n += R) matmul_nn_rows<M, R>(g, N, K, packed, scales, table, shift, oe, oo, n);
  for (; n < n1; ++n) matmul_nn_rows<M, 1>(g, N, K, packed, scales, table, shift, oe, oo, n);
}

#define FOURBIT_SWITCH_M(M, CALL)                                                                                    \
  switch (M) {                                                                                                       \
    case 1: CALL(1); break; case 2: CALL(2); break; case 3: CALL(3); break; case 4: CALL(4); break;                  \
    case 5: CALL(5); break; case 6: CALL(6); break; case 7: CALL(7); break; case 8: CALL(8); break;                  \
    case 9: CALL(9); break; case 10: CALL(10); break; case 11: CALL(11); break; case 12: CALL(12); break;            \
    case 13: CALL(13); break; case 14: CALL(14); break; case 15: CALL(15); break; case 16: CALL(16); break;          \
    default: TORCH_CHECK(false, "fused 4-bit products take at most 16 rows");                                        \
  }
#endif

void matmul_nn_scalar(const float* g, int64_t M, int64_t N, int64_t K, const uint8_t* packed, const Scales& scales,
                      const float* code, int64_t blocksize, float* oe, float* oo, int64_t n0, int64_t n1) {
  const int64_t half = K / 2;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = packed + n * half;
    for (int64_t j = 0; j < half; ++j) {
      const float s = scales((n * K + 2 * j) / blocksize);
      const float we = code[row[j] >> 4] * s, wo = code[row[j] & 15] * s;
      for (int64_t m = 0; m < M; ++m) {
        oe[m * half + j] += g[m * N + n] * we;
        oo[m * half + j] += g[m * N + n] * wo;
      }
    }
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// entry points

// A fresh output of tens of MB costs more in page faults (one per 4 KiB page) than the decode itself; asking for
// transparent huge pages before the first write cuts the faults 512-fold where the kernel allows it.
void advise_huge_pages(const torch::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const size_t bytes = t.numel() * t.element_size();
  if (bytes < (4u << 20)) return;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t huge = 2u << 20;
  const uintptr_t first = (begin + huge - 1) & ~(huge - 1), last = (begin + bytes) & ~(huge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
}

std::vector<torch::Tensor> quantize(torch::Tensor x, int64_t blocksize, torch::Tensor midpoints, torch::Tensor order) {
  TORCH_CHECK(x.device().is_cpu(), "native kernels run on the CPU");
  x = x.contiguous();
  const int64_t n = x.numel();
  const int64_t n_blocks = (n + blocksize - 1) / blocksize;
  auto packed = torch::empty({(n + 1) / 2}, x.options().dtype(torch::kUInt8));
  auto absmax = torch::empty({n_blocks}, x.options().dtype(torch::kFloat32));
  std::atomic<int64_t> bad{0};
  const float* mid = midpoints.data_ptr<float>();
  const uint8_t* ord = order.data_ptr<uint8_t>();
  switch (x.scalar_type()) {
    case torch::kFloat32:
      quantize_dispatch(x.data_ptr<float>(), n, blocksize, mid, ord, packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(), &bad);
      break;
    case torch::kBFloat16:
      quantize_dispatch(x.data_ptr<at::BFloat16>(), n, blocksize, mid, ord, packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(), &bad);
      break;
    case torch::kFloat16:
      quantize_dispatch(x.data_ptr<at::Half>(), n, blocksize, mid, ord, packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(), &bad);
      break;
    default:
      TORCH_CHECK(false, "quantize takes fp32, bf16 or fp16");
  }
  return {packed, absmax, torch::tensor({bad.load()}, torch::kInt64)};
}

torch::Tensor dequantize(torch::Tensor packed, torch::Tensor absmax, c10::optional<torch::Tensor> nested,
                         c10::optional<torch::Tensor> dynmap, double offset, torch::Tensor code, int64_t blocksize,
                         int64_t start, int64_t end, torch::ScalarType dtype, c10::optional<torch::Tensor> out_buf) {
  const Scales scales = make_scales(absmax, nested, dynmap, offset);
  torch::Tensor out;
  if (out_buf.has_value() && out_buf->defined()) {  // a reused buffer: no fresh pages to fault in
    TORCH_CHECK(out_buf->is_contiguous() && out_buf->numel() >= end - start && out_buf->scalar_type() == dtype,
                "dequantize: out buffer too small, strided or of the wrong dtype");
    out = out_buf->view(-1).narrow(0, 0, end - start);
  } else {
    out = torch::empty({end - start}, packed.options().dtype(dtype));
    advise_huge_pages(out);
  }
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const float* c = code.data_ptr<float>();
  switch (dtype) {
    case torch::kFloat32: dequantize_dispatch(p, scales, c, blocksize, start, end, out.data_ptr<float>()); break;
    case torch::kBFloat16: dequantize_dispatch(p, scales, c, blocksize, start, end, out.data_ptr<at::BFloat16>()); break;
    case torch::kFloat16: dequantize_dispatch(p, scales, c, blocksize, start, end, out.data_ptr<at::Half>()); break;
    default: TORCH_CHECK(false, "dequantize gives fp32, bf16 or fp16");
  }
  return out;
}

// x_even, x_odd: [M, K/2] fp32 contiguous. Returns [M, N] = x @ W.T
torch::Tensor matmul_nt(torch::Tensor x_even, torch::Tensor x_odd, torch::Tensor packed, torch::Tensor absmax,
                        c10::optional<torch::Tensor> nested, c10::optional<torch::Tensor> dynmap, double offset,
                        torch::Tensor code, int64_t blocksize, int64_t N, int64_t K) {
  TORCH_CHECK(K % 32 == 0, "fused product needs K % 32 == 0");
  const Scales scales = make_scales(absmax, nested, dynmap, offset);
  const int64_t M = x_even.size(0);
  auto out = torch::empty({M, N}, x_even.options());
  const float* xe = x_even.data_ptr<float>();
  const float* xo = x_odd.data_ptr<float>();
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const float* c = code.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 65536 / K);
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
#ifdef FOURBIT_X86
    if (has_avx512()) {
#define CALL_NT(MM) matmul_nt_avx512<MM>(xe, xo, N, K, p, scales, c, blocksize, o, n0, n1)
      FOURBIT_SWITCH_M(M, CALL_NT)
#undef CALL_NT
      return;
    }
#endif
    matmul_nt_scalar(xe, xo, M, N, K, p, scales, c, blocksize, o, n0, n1);
  });
  return out;
}

// g: [M, N] fp32 contiguous. Returns (even, odd) columns of g @ W, each [M, K/2].
std::vector<torch::Tensor> matmul_nn(torch::Tensor g, torch::Tensor packed, torch::Tensor absmax,
                                     c10::optional<torch::Tensor> nested, c10::optional<torch::Tensor> dynmap,
                                     double offset, torch::Tensor code, int64_t blocksize, int64_t N, int64_t K) {
  TORCH_CHECK(K % 32 == 0, "fused product needs K % 32 == 0");
  const Scales scales = make_scales(absmax, nested, dynmap, offset);
  const int64_t M = g.size(0);
  const int64_t threads = at::get_num_threads();
  // one partial sum per task, reduced at the end: every task streams its own rows of W once
  const int64_t tasks = std::min<int64_t>(threads, std::max<int64_t>(1, N / 16));
  auto partial_e = torch::zeros({tasks, M, K / 2}, g.options());
  auto partial_o = torch::zeros({tasks, M, K / 2}, g.options());
  const float* gp = g.data_ptr<float>();
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const float* c = code.data_ptr<float>();
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = N * t / tasks, n1 = N * (t + 1) / tasks;
      float* oe = partial_e.data_ptr<float>() + t * M * (K / 2);
      float* oo = partial_o.data_ptr<float>() + t * M * (K / 2);
#ifdef FOURBIT_X86
      if (has_avx512()) {
#define CALL_NN(MM) matmul_nn_avx512<MM>(gp, N, K, p, scales, c, blocksize, oe, oo, n0, n1)
        FOURBIT_SWITCH_M(M, CALL_NN)
#undef CALL_NN
        continue;
      }
#endif
      matmul_nn_scalar(gp, M, N, K, p, scales, c, blocksize, oe, oo, n0, n1);
    }
  });
  return {partial_e.sum(0), partial_o.sum(0)};
}

std::string cpu_path() { return has_avx512() ? "avx512" : "scalar"; }

// defined in dropout.cpp
torch::Tensor hash_dropout(torch::Tensor x, double p, int64_t seed, c10::optional<at::ScalarType> dtype);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quantize", &quantize, "blockwise 4-bit quantization");
  m.def("dequantize", &dequantize, "blockwise 4-bit dequantization of flat elements [start, end)");
  m.def("matmul_nt", &matmul_nt, "x @ W.T with W decoded on the fly (small M)");
  m.def("matmul_nn", &matmul_nn, "g @ W with W decoded on the fly (small M)");
  m.def("cpu_path", &cpu_path, "which vector path this CPU runs");
  m.def("hash_dropout", &hash_dropout, "dropout whose mask is a hash of (seed, index)");
}
