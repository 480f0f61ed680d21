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
#include <cstdlib>
#include <cstdint>
#include <atomic>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FOURBIT_X86 1
// the tile unit (AMX) needs the compiler's intrinsics (GCC 11, clang 12) and the OS's consent (Linux: arch_prctl)
#if defined(__linux__) && ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11))
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#define FOURBIT_AMX 1
#endif
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
  const uint8_t* map_bytes = nullptr;  // optional: `dynmap` as MapBytes lays it out, for dq_scales

  inline float operator()(int64_t block) const {
    if (absmax) return absmax[block];
    const float prod = dynmap[qabsmax[block]] * nested[block >> 8];  // two roundings (no FMA), as bitsandbytes
    return prod + offset;
  }
};

// the 256-entry map's bytes in four planes (byte p of entry i at 256 p + i): dq_scales looks the planes up with byte
// permutes, 64 blocks at a time
struct MapBytes {
  alignas(64) uint8_t b[4 * 256];
  explicit MapBytes(const float* dynmap) {
    for (int i = 0; i < 256; ++i) {
      uint32_t u;
      std::memcpy(&u, dynmap + i, 4);
      for (int p = 0; p < 4; ++p) b[256 * p + i] = static_cast<uint8_t>(u >> (8 * p));
    }
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

// `count` elements of a reused scratch buffer, on pages of its own: the buffer starts on a page and the vector holds
// a page more after it, so no page holds another buffer's data. Each thread writes its own buffers, and where two
// threads' buffers shared pages the stores ran up to 3x slower (g @ W one row, two threads: each task's scale pass
// 50-108 against 30-40 thousand cycles a call), presumably the other core's prefetches pulling the lines away.
// Page-aligned, the vector paths' 64-byte loads and stores never straddle two lines either.
template <typename T>
T* aligned_buffer(std::vector<T>& buf, int64_t count) {
  constexpr int64_t per_page = 4096 / sizeof(T);
  buf.resize(count + 2 * per_page);
  const int64_t misaligned = reinterpret_cast<uintptr_t>(buf.data()) % 4096 / sizeof(T);
  return buf.data() + (misaligned ? per_page - misaligned : 0);
}

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
// AVX2 (with FMA and F16C): the x86-64 CPUs without AVX-512, such as AMD Zen 1-3. The same steps as the AVX-512
// path, 8 lanes at a time.
#define AVX2 __attribute__((target("avx2,fma,f16c")))

AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
AVX2 inline __m256 load8(const at::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
AVX2 inline __m256 load8(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

AVX2 inline float reduce_max8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

template <typename T>
AVX2 void quantize_avx2(const T* x, int64_t n, int64_t blocksize, const float* mid, const uint8_t* order,
                        uint8_t* packed, float* absmax, int64_t b0, int64_t b1, std::atomic<int64_t>* bad) {
  const __m256 sign_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i exp_mask = _mm256_set1_epi32(0x7f800000);
  __m256 mids[15];
  for (int k = 0; k < 15; ++k) mids[k] = _mm256_set1_ps(mid[k]);
  const __m128i order16 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(order));
  const __m256i order_v = _mm256_inserti128_si256(_mm256_castsi128_si256(order16), order16, 1);
  const __m256i dword_order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const __m256 lo1 = _mm256_set1_ps(-1.f), hi1 = _mm256_set1_ps(1.f);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * blocksize;
    if (start + blocksize > n) {  // the partial last block divides instead: scalar
      quantize_scalar(x, n, blocksize, mid, order, packed, absmax, b, b + 1, bad);
      continue;
    }
    __m256 vmax = _mm256_setzero_ps();
    __m256i nonfinite = _mm256_setzero_si256();
    for (int64_t i = start; i < start + blocksize; i += 8) {
      const __m256 v = load8(x + i);
      const __m256i e = _mm256_and_si256(_mm256_castps_si256(v), exp_mask);
      nonfinite = _mm256_or_si256(nonfinite, _mm256_cmpeq_epi32(e, exp_mask));
      vmax = _mm256_max_ps(vmax, _mm256_and_ps(v, sign_mask));
    }
    if (!_mm256_testz_si256(nonfinite, nonfinite)) {  // find the exact index in scalar code
      quantize_scalar(x, n, blocksize, mid, order, packed, absmax, b, b + 1, bad);
      continue;
    }
    const float amax = reduce_max8(vmax);
    absmax[b] = amax;
    const __m256 recip = _mm256_set1_ps(1.0f / std::max(amax, 1e-38f));
    for (int64_t i = start; i < start + blocksize; i += 32) {
      __m256i cnt[4];
      for (int h = 0; h < 4; ++h) {
        __m256 s = _mm256_mul_ps(load8(x + i + 8 * h), recip);
        s = _mm256_min_ps(_mm256_max_ps(s, lo1), hi1);
        __m256i c = _mm256_setzero_si256();
        for (int k = 0; k < 15; ++k)  // a true comparison is -1
          c = _mm256_sub_epi32(c, _mm256_castps_si256(_mm256_cmp_ps(mids[k], s, _CMP_LT_OQ)));
        cnt[h] = c;
      }
      // the 32 counts as bytes in element order: the packs work within 128-bit lanes, the dword permute undoes that
      const __m256i words01 = _mm256_packus_epi32(cnt[0], cnt[1]), words23 = _mm256_packus_epi32(cnt[2], cnt[3]);
      const __m256i ranks = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(words01, words23), dword_order);
      const __m256i codes = _mm256_shuffle_epi8(order_v, ranks);
      // word j holds element 2j (low byte) and 2j+1: the packed byte puts the even element in the high nibble
      const __m256i pairs = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(codes, _mm256_set1_epi16(0xff)), 4),
                                            _mm256_srli_epi16(codes, 8));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(packed + i / 2),
                       _mm_packus_epi16(_mm256_castsi256_si128(pairs), _mm256_extracti128_si256(pairs, 1)));
    }
  }
}
#endif

// FOURBIT_CPU_PATH=scalar, =avx2, =avx512 or =avx512-bf16 caps the vector paths below what the CPU has, so the tests can
// run every path on one machine
int cpu_cap() {
  static const int cap = [] {
    const char* env = std::getenv("FOURBIT_CPU_PATH");
    if (env && std::strcmp(env, "scalar") == 0) return 0;
    if (env && std::strcmp(env, "avx2") == 0) return 1;
    if (env && std::strcmp(env, "avx512") == 0) return 2;
    if (env && std::strcmp(env, "avx512-bf16") == 0) return 3;
    return 4;
  }();
  return cap;
}

bool has_avx2() {  // with FMA and F16C
#ifdef FOURBIT_X86
  static const bool ok = cpu_cap() >= 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
#else
  return false;
#endif
}

bool has_avx512() {
#ifdef FOURBIT_X86
  static const bool ok = cpu_cap() >= 2 && has_avx2() && __builtin_cpu_supports("avx512f") &&
                         __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return ok;
#else
  return false;
#endif
}

bool has_vbmi() {  // byte shuffles: dequantize's spread, the pairing of two rows in the bf16 g @ W
#ifdef FOURBIT_X86
  static const bool ok = cpu_cap() >= 3 && has_avx512() && __builtin_cpu_supports("avx512vbmi");
  return ok;
#else
  return false;
#endif
}

bool has_bf16() {  // vdpbf16ps: the bf16 fused products
#ifdef FOURBIT_X86
  static const bool ok = has_vbmi() && __builtin_cpu_supports("avx512bf16");
  return ok;
#else
  return false;
#endif
}

bool has_amx() {  // the tile unit's bf16 products (AMX-TILE, AMX-BF16)
#ifdef FOURBIT_AMX
  // Linux hands the tile registers' state only to a process that asks for it (arch_prctl, kernel 5.16+)
  static const bool ok = [] {
    if (cpu_cap() < 4 || !has_bf16()) return false;
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 22) & 1) || !((d >> 24) & 1)) return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
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
    if (has_avx2() && blocksize % 32 == 0) {
      quantize_avx2(x, n, blocksize, mid, order, packed, absmax, b0, b1, bad);
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

// two-source permute indices taking a's and b's lanes alternately: lanes 0-7 of each (interleave_low), then 8-15
AVX512 inline __m512i interleave_low() { return _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23); }
AVX512 inline __m512i interleave_high() { return _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31); }

template <typename T>
AVX512 void dequantize_avx512(const uint8_t* packed, const Scales& scales, const float* code, int64_t blocksize,
                              int64_t start, int64_t end, T* out) {
  const int64_t head = std::min(end, (start + 31) / 32 * 32);
  dequantize_scalar(packed, scales, code, blocksize, start, head, out);
  const int shift = __builtin_ctzll(blocksize);  // blocksizes are powers of two
  const __m512 table = _mm512_loadu_ps(code);
  const __m512i lo_idx = interleave_low();
  const __m512i hi_idx = interleave_high();
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

// With VBMI the scale is folded into the 16-entry table once per block (the same fp32 products code * scale, so the
// same bytes), after which an element costs a byte spread, a shift and a lookup: the spread puts each packed byte in
// the lanes of both its elements, the even element's lane is shifted right by 4, and the lookups read only the low 4
// (vpermps) or 5 (vpermw, whose 32-entry table holds the 16 values twice) index bits, so the odd element needs no mask.
#define AVX512VBMI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi")))

// the scaled table rounded to bf16 exactly as store16 rounds, in both 16-word halves of a 32-word table
AVX512 inline __m512i bf16_table_exact(__m512 scaled) {
  __m512i u = _mm512_castps_si512(scaled);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
  const __m256i half = _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16));
  return _mm512_inserti64x4(_mm512_castsi256_si512(half), half, 1);
}

struct SpreadIndices {  // byte shuffles and shift counts for the two output widths
  __m512i bf16, f32_lo, f32_hi, shift16, shift32;
};

AVX512 inline SpreadIndices spread_indices() {
  alignas(64) uint8_t b16[64], lo[64], hi[64];
  alignas(64) uint16_t s16[32];
  alignas(64) uint32_t s32[16];
  for (int p = 0; p < 64; ++p) {
    b16[p] = static_cast<uint8_t>(p / 4);  // word w = p / 2 takes byte w / 2 (odd bytes of a word are zeroed)
    lo[p] = static_cast<uint8_t>(p / 8);   // dword d = p / 4 takes byte d / 2 (bytes 1-3 of a dword are zeroed)
    hi[p] = static_cast<uint8_t>(8 + p / 8);
  }
  for (int w = 0; w < 32; ++w) s16[w] = w % 2 ? 0 : 4;  // the even element is the high nibble
  for (int d = 0; d < 16; ++d) s32[d] = d % 2 ? 0 : 4;
  return {_mm512_load_si512(b16), _mm512_load_si512(lo), _mm512_load_si512(hi), _mm512_load_si512(s16),
          _mm512_load_si512(s32)};
}

// 32 elements from 16 packed bytes
AVX512VBMI inline void dequant32(const uint8_t* bytes, __m512i table, const SpreadIndices& ix, at::BFloat16* out) {
  const __m512i src = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
  const __m512i idx = _mm512_srlv_epi16(_mm512_maskz_permutexvar_epi8(0x5555555555555555ULL, ix.bf16, src), ix.shift16);
  _mm512_storeu_si512(out, _mm512_permutexvar_epi16(idx, table));
}
AVX512VBMI inline void dequant32(const uint8_t* bytes, __m512 table, const SpreadIndices& ix, float* out) {
  const __m512i src = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
  const __mmask64 low_bytes = 0x1111111111111111ULL;
  const __m512i lo = _mm512_srlv_epi32(_mm512_maskz_permutexvar_epi8(low_bytes, ix.f32_lo, src), ix.shift32);
  const __m512i hi = _mm512_srlv_epi32(_mm512_maskz_permutexvar_epi8(low_bytes, ix.f32_hi, src), ix.shift32);
  _mm512_storeu_ps(out, _mm512_permutexvar_ps(lo, table));
  _mm512_storeu_ps(out + 16, _mm512_permutexvar_ps(hi, table));
}

AVX512 inline __m512 output_table(__m512 scaled, float*) { return scaled; }
AVX512 inline __m512i output_table(__m512 scaled, at::BFloat16*) { return bf16_table_exact(scaled); }

// fp32 and bf16 outputs (fp16 keeps dequantize_avx512)
template <typename T>
AVX512VBMI void dequantize_vbmi(const uint8_t* packed, const Scales& scales, const float* code, int64_t blocksize,
                                int64_t start, int64_t end, T* out) {
  const int64_t head = std::min(end, (start + 31) / 32 * 32);
  dequantize_scalar(packed, scales, code, blocksize, start, head, out);
  const int shift = __builtin_ctzll(blocksize);  // blocksizes are powers of two
  const __m512 table = _mm512_loadu_ps(code);
  const SpreadIndices ix = spread_indices();
  int64_t i = head;
  while (i + 32 <= end) {
    const int64_t block = i >> shift;
    const int64_t stop = std::min(end, (block + 1) << shift);
    const auto scaled = output_table(_mm512_mul_ps(table, _mm512_set1_ps(scales(block))), out);
    for (; i + 32 <= stop; i += 32) dequant32(packed + i / 2, scaled, ix, out + (i - start));
    if (i < stop) break;  // the range ends inside this block: the rest is the scalar tail
  }
  dequantize_scalar(packed, scales, code, blocksize, i, end, out + (i - start));
}
// AVX2: the scaled table's 16 values are looked up 8 lanes at a time, vpermps into each half and a blend on index
// bit 3 (fp32, fp16 outputs), or as bf16 with vpshufb into two 16-byte tables, one per byte of the bf16 value.
// the 32 codes of 16 packed bytes as bytes in element order (the even element is the high nibble), 16 and 16
AVX2 inline void nibbles32(const uint8_t* bytes, __m128i* first16, __m128i* last16) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)), low4 = _mm_set1_epi8(15);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), low4), lo = _mm_and_si128(v, low4);
  *first16 = _mm_unpacklo_epi8(hi, lo);
  *last16 = _mm_unpackhi_epi8(hi, lo);
}

// table[idx] for 8 indices in 0..15 (dwords; vpermps reads the low 3 bits, the blend bit 3 moved to the sign)
AVX2 __attribute__((always_inline)) inline __m256 lookup16(__m256 lo8, __m256 hi8, __m256i idx, __m256i bit3_at_sign) {
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo8, idx), _mm256_permutevar8x32_ps(hi8, idx),
                          _mm256_castsi256_ps(bit3_at_sign));
}

AVX2 inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
AVX2 inline void store8(at::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

// 8 floats rounded to bf16 bits as to_bf16_bits rounds them (nearest even; inf and nan kept), one per dword
AVX2 inline __m256i bf16_bits_x8(__m256 v) {
  const __m256i u = _mm256_castps_si256(v), exponent = _mm256_set1_epi32(0x7f800000);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)), 16);
  const __m256i special = _mm256_cmpeq_epi32(_mm256_and_si256(u, exponent), exponent);
  const __m256i no_payload = _mm256_cmpeq_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0xffff)), _mm256_setzero_si256());
  const __m256i kept = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_andnot_si256(no_payload, _mm256_set1_epi32(0x40)));
  return _mm256_blendv_epi8(rounded, kept, special);
}

// the 16-entry scaled table rounded to bf16, as two vpshufb tables (low bytes, high bytes) in both 128-bit lanes
AVX2 inline void bf16_byte_tables(__m256 lo8, __m256 hi8, __m256i* low_bytes, __m256i* high_bytes) {
  const __m256i q = _mm256_permute4x64_epi64(_mm256_packus_epi32(bf16_bits_x8(lo8), bf16_bits_x8(hi8)), 0xD8);
  const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                         0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  // [low bytes of values 0-7, 8-15, high bytes of 0-7, 8-15]
  const __m256i planes = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(q, split), 0xD8);
  *low_bytes = _mm256_permute2x128_si256(planes, planes, 0x00);
  *high_bytes = _mm256_permute2x128_si256(planes, planes, 0x11);
}

AVX2 inline void dequant32_avx2(const uint8_t* bytes, __m256i low_bytes, __m256i high_bytes, at::BFloat16* out) {
  __m128i first, last;
  nibbles32(bytes, &first, &last);
  const __m256i idx = _mm256_inserti128_si256(_mm256_castsi128_si256(first), last, 1);
  const __m256i lo = _mm256_shuffle_epi8(low_bytes, idx), hi = _mm256_shuffle_epi8(high_bytes, idx);
  const __m256i a = _mm256_unpacklo_epi8(lo, hi), b = _mm256_unpackhi_epi8(lo, hi);  // elements 0-7 16-23, 8-15 24-31
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_permute2x128_si256(a, b, 0x20));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16), _mm256_permute2x128_si256(a, b, 0x31));
}

template <typename T>
AVX2 inline void dequant32_avx2(const uint8_t* bytes, __m256 lo8, __m256 hi8, T* out) {
  __m128i part[2];
  nibbles32(bytes, &part[0], &part[1]);
  for (int h = 0; h < 2; ++h)
    for (int q = 0; q < 2; ++q) {
      const __m256i idx = _mm256_cvtepu8_epi32(q ? _mm_unpackhi_epi64(part[h], part[h]) : part[h]);
      store8(out + 16 * h + 8 * q, lookup16(lo8, hi8, idx, _mm256_slli_epi32(idx, 28)));
    }
}

template <typename T>
AVX2 void dequantize_avx2(const uint8_t* packed, const Scales& scales, const float* code, int64_t blocksize,
                          int64_t start, int64_t end, T* out) {
  const int64_t head = std::min(end, (start + 31) / 32 * 32);
  dequantize_scalar(packed, scales, code, blocksize, start, head, out);
  const int shift = __builtin_ctzll(blocksize);  // blocksizes are powers of two
  const __m256 code_lo = _mm256_loadu_ps(code), code_hi = _mm256_loadu_ps(code + 8);
  int64_t i = head;
  while (i + 32 <= end) {
    const int64_t block = i >> shift;
    const int64_t stop = std::min(end, (block + 1) << shift);
    const __m256 scale = _mm256_set1_ps(scales(block));
    const __m256 lo8 = _mm256_mul_ps(code_lo, scale), hi8 = _mm256_mul_ps(code_hi, scale);
    if constexpr (std::is_same<T, at::BFloat16>::value) {
      __m256i low_bytes, high_bytes;
      bf16_byte_tables(lo8, hi8, &low_bytes, &high_bytes);
      for (; i + 32 <= stop; i += 32) dequant32_avx2(packed + i / 2, low_bytes, high_bytes, out + (i - start));
    } else {
      for (; i + 32 <= stop; i += 32) dequant32_avx2(packed + i / 2, lo8, hi8, out + (i - start));
    }
    if (i < stop) break;  // the range ends inside this block: the rest is the scalar tail
  }
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
      if constexpr (!std::is_same<T, at::Half>::value) {
        if (has_vbmi() && blocksize % 32 == 0) {
          dequantize_vbmi(packed, scales, code, blocksize, s, e, out + (s - start));
          continue;
        }
      }
      if (has_avx512() && blocksize % 32 == 0) {
        dequantize_avx512(packed, scales, code, blocksize, s, e, out + (s - start));
        continue;
      }
      if (has_avx2() && blocksize % 32 == 0) {
        dequantize_avx2(packed, scales, code, blocksize, s, e, out + (s - start));
        continue;
      }
#endif
      dequantize_scalar(packed, scales, code, blocksize, s, e, out + (s - start));
    }
  });
}

// ---------------------------------------------------------------------------------------------------------------
// fused products for small M (at most 16 rows of activations).
//
// Activations arrive de-interleaved (even and odd columns apart, [M, K/2] each) so decoded weights never need
// re-interleaving; g @ W returns its even and odd columns apart for the same reason. K % 32 == 0, so a 32-column chunk
// of a row lies in one block. Per block the scale is folded into the 16-entry table (table * scale: the products
// dequantize makes, so the decoded weights are dequantize's); a weight then costs a shift (even columns only) and a
// lookup, which reads only the low index bits, so the odd columns' high nibble needs no mask.
//
// Two vector paths. fp32 activations (AVX-512F): vpermps into the scaled table, then FMA, 32 weights per step. bf16
// activations (AVX512_BF16 and VBMI): vpermw into the scaled table rounded to bf16 (what dequantize to bf16 gives),
// then vdpbf16ps, 64 weights per step: the product equals dequantize-then-bf16-matmul with fp32 accumulation. Where
// the bf16 path does not apply, bf16 activations are widened to fp32 (exactly) and take the fp32 path. With 12-16
// rows of bf16 x, x @ W^T puts the rows of x in the vector lanes instead (nt_bcast_range): the same products.

struct Weights {
  const uint8_t* packed;
  Scales scales;
  int64_t N, K;
  int shift;      // log2(blocksize): blocksizes are powers of two
  int64_t mask;   // blocksize - 1
  bool bf16w = false;  // bf16 activations on an fp32 path: multiply the scaled table rounded to bf16, as dequantize does

  float scale_at(int64_t n, int64_t c) const { return scales((n * K + c) >> shift); }
  bool block_starts(int64_t n, int64_t c) const { return ((n * K + c) & mask) == 0; }
  const uint8_t* row(int64_t n) const { return packed + n * (K / 2); }
  // blocks of 64 with double-quantized scales, bitsandbytes' default: the products' own instantiation (block_scale)
  bool dq64() const { return mask == 63 && scales.qabsmax != nullptr; }
};

// a decoded weight, rounded to bf16 where the activations are bf16 (dequantize-to-bf16's weights, as the vector
// paths multiply)
inline float weight_value(float scaled, bool bf16w) {
  if (!bf16w) return scaled;
  const uint32_t bits = static_cast<uint32_t>(to_bf16_bits(scaled)) << 16;
  float v;
  std::memcpy(&v, &bits, 4);
  return v;
}

void matmul_nt_scalar(const float* xe, const float* xo, int64_t M, const Weights& w, const float* code,
                      float* out, int64_t n0, int64_t n1) {
  const int64_t half = w.K / 2;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.row(n);
    for (int64_t m = 0; m < M; ++m) {
      float acc = 0.f;
      for (int64_t j = 0; j < half; ++j) {
        const float s = w.scale_at(n, 2 * j);
        acc += xe[m * half + j] * weight_value(code[row[j] >> 4] * s, w.bf16w) +
               xo[m * half + j] * weight_value(code[row[j] & 15] * s, w.bf16w);
      }
      out[m * w.N + n] = acc;
    }
  }
}

// accumulates into oe, oo (zeroed by the caller) the packed columns [j0, j1) (output columns 2 j0 .. 2 j1)
void matmul_nn_scalar(const float* g, int64_t M, const Weights& w, const float* code, float* oe,
                      float* oo, int64_t j0, int64_t j1) {
  const int64_t half = w.K / 2;
  for (int64_t n = 0; n < w.N; ++n) {
    const uint8_t* row = w.row(n);
    for (int64_t j = j0; j < j1; ++j) {
      const float s = w.scale_at(n, 2 * j);
      const float we = weight_value(code[row[j] >> 4] * s, w.bf16w), wo = weight_value(code[row[j] & 15] * s, w.bf16w);
      for (int64_t m = 0; m < M; ++m) {
        oe[m * half + j] += g[m * w.N + n] * we;
        oo[m * half + j] += g[m * w.N + n] * wo;
      }
    }
  }
}

#ifdef FOURBIT_X86
#define AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx512bf16")))

// the block's scaled table; rounded to bf16 (as to_bf16_bits rounds, specials included) for bf16 activations, so
// that every path multiplies dequantize's bf16 weights
AVX512 inline __m512 f32_table(__m512 code, float scale, bool bf16w) {
  const __m512 v = _mm512_mul_ps(code, _mm512_set1_ps(scale));
  if (!bf16w) return v;
  const __m512i u = _mm512_castps_si512(v), exponent = _mm512_set1_epi32(0x7f800000);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
  const __mmask16 special = _mm512_cmpeq_epi32_mask(_mm512_and_si512(u, exponent), exponent);  // inf, nan
  const __mmask16 payload = _mm512_test_epi32_mask(u, _mm512_set1_epi32(0xffff));
  const __m512i kept = _mm512_mask_or_epi32(u, payload, u, _mm512_set1_epi32(0x400000));
  const __m512i top = _mm512_mask_mov_epi32(rounded, special, kept);
  return _mm512_castsi512_ps(_mm512_and_si512(top, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}

// the scaled table rounded to bf16 (round to nearest even), in both halves of the 32-word vpermw table
AVX512BF16 inline __m512i bf16_table(__m512 code, float scale) {
  const __m512 v = _mm512_mul_ps(code, _mm512_set1_ps(scale));
  return (__m512i)_mm512_cvtne2ps_pbh(v, v);
}

// a 64-column step of a row (its 32 bytes) looked up in the block's table: the 32 even columns, then the 32 odd ones
// (the odd lookup reads only the low five index bits, and bf16_table repeats the table in both halves)
AVX512BF16 __attribute__((always_inline)) inline void decode_step(const uint8_t* bytes, __m512i tab, __m512i& even,
                                                                  __m512i& odd) {
  const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes)));
  even = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), tab);
  odd = _mm512_permutexvar_epi16(v, tab);
}

// What a walk over rows fetches ahead (rows are only K/2 bytes, too short for the hardware prefetcher to run ahead:
// without help a small-batch product waits on memory instead of overlapping it with the decode).
// - kNextRows (one row of x): the rows the next group of R reads, a cache line of each as this group's walk
//   reaches the same offset, into L1 (measured at M=1, 4096x4096: 1.6x faster, where it now takes what reading the
//   weight takes).
// - kNextTile (several rows of x, which decode each weight for more multiply-adds, so the walk is slower): the next
//   tile of rows, read in order into L2, `lines` cache lines per step from pf (M=8: 0.56 -> 0.50 ms).
// - neither (PF 0) for the second group of rows of x over the same tile.
enum Prefetch { kNoPrefetch = 0, kNextRows = 1, kNextTile = 2 };

template <int R, int PF>
AVX512 __attribute__((always_inline)) inline void prefetch_ahead(const Weights& w, int64_t n, int64_t c,
                                                                 const uint8_t* pf, int64_t step) {
  if constexpr (PF == kNextRows) {
    for (int r = 0; r < R; ++r)
      if ((c & 127) == 0 && n + r + R < w.N)
        _mm_prefetch(reinterpret_cast<const char*>(w.row(n + r + R) + c / 2), _MM_HINT_T0);
  } else if constexpr (PF == kNextTile) {
    constexpr int lines = (R + 1) / 2;  // a tile's lines per step of R rows and 64 columns: R/2
    for (int i = 0; i < lines; ++i)
      _mm_prefetch(reinterpret_cast<const char*>(pf + (step * lines + i) * 64), _MM_HINT_T1);
  }
}

// x @ W^T, rows n .. n+R of W over columns [k0, k1). x comes in steps: for each step of 32 (fp32) or 64 (bf16) columns,
// its M rows one after another, each as the step's even columns then its odd ones, so a step reads one contiguous
// run (rows of x K/2 apart would all fall in the same few L1 sets). R rows of W share each load of x, the M rows of x
// share each decoded weight. The R*M accumulators (16 lanes each, summed by the caller) stay in `acc` between calls, so a row can
// be walked in K slices that keep the slice of x in L1.
// decodes step c of rows n .. n+R (fp32 weights), refreshing a row's table where its block starts
template <int R>
AVX512 __attribute__((always_inline)) inline void nt_f32_decode(const Weights& w, __m512 table, int64_t n, int64_t c,
                                                                __m512* tab, __m512* even, __m512* odd) {
  for (int r = 0; r < R; ++r) {
    if (w.block_starts(n + r, c)) tab[r] = f32_table(table, w.scale_at(n + r, c), w.bf16w);
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.row(n + r) + c / 2)));
    even[r] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), tab[r]);
    odd[r] = _mm512_permutexvar_ps(v, tab[r]);
  }
}

// The next step's weights are decoded before this step's multiply-adds are issued: the decode is a chain of dependent
// loads and shuffles that would otherwise wait behind a step's worth of queued multiply-adds (about 2x slower).
template <int M, int R, int PF>
AVX512 void nt_f32_rows(const void* x_steps, const Weights& w, const float* code, int64_t n, int64_t k0, int64_t k1,
                        float* acc_io, const uint8_t* pf) {
  const __m512 table = _mm512_loadu_ps(code);
  __m512 acc[R][M], tab[R], even[R], odd[R];
  for (int r = 0; r < R; ++r) {
    tab[r] = f32_table(table, w.scale_at(n + r, k0), w.bf16w);
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_loadu_ps(acc_io + (r * M + m) * 16);
  }
  nt_f32_decode<R>(w, table, n, k0, tab, even, odd);
  for (int64_t c = k0; c < k1; c += 32) {
    __m512 next_even[R], next_odd[R];
    if (c + 32 < k1) {
      prefetch_ahead<R, PF>(w, n, c + 32, pf, (c - k0) / 32);
      nt_f32_decode<R>(w, table, n, c + 32, tab, next_even, next_odd);
    }
    const float* x = static_cast<const float*>(x_steps) + c * M;  // this step's M rows: 16 even, 16 odd columns
    for (int m = 0; m < M; ++m) {
      const __m512 a = _mm512_loadu_ps(x + 32 * m), b = _mm512_loadu_ps(x + 32 * m + 16);
      for (int r = 0; r < R; ++r) {
        acc[r][m] = _mm512_fmadd_ps(a, even[r], acc[r][m]);
        acc[r][m] = _mm512_fmadd_ps(b, odd[r], acc[r][m]);
      }
    }
    for (int r = 0; r < R; ++r) {
      even[r] = next_even[r];
      odd[r] = next_odd[r];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) _mm512_storeu_ps(acc_io + (r * M + m) * 16, acc[r][m]);
}

// the scale of the block holding column c of row n. DQ64: blocks of 64 with double-quantized scales, bitsandbytes'
// default, where every 64-column step starts a block: the scale without the general case's tests
template <bool DQ64>
inline float block_scale(const Weights& w, int64_t n, int64_t c) {
  if constexpr (DQ64) {
    const int64_t b = (n * w.K + c) >> 6;
    return w.scales.dynmap[w.scales.qabsmax[b]] * w.scales.nested[b >> 8] + w.scales.offset;  // as Scales does
  } else {
    return w.scale_at(n, c);
  }
}

// the same with bf16 activations, 64 columns per step (K % 64 == 0, blocksize >= 64). DQ64 (see block_scale): `ahead`
// holds the rows' scales for step c and is refilled with step c + 64's (where c + 64 < k1), so that a decode's table
// does not wait on the scale's three dependent loads (x @ W^T M=8: 5% faster). What the walk reads per step is in
// locals: read through `w`, GCC reloaded the fields every step (M=8 4096x4096, two threads: 0.478 -> 0.455 ms).
template <int M, int R, int PF, bool DQ64>
AVX512BF16 void nt_bf16_rows(const void* x_steps, const Weights& w, const float* code, int64_t n, int64_t k0,
                             int64_t k1, float* acc_io, const uint8_t* pf) {
  const __m512 table = _mm512_loadu_ps(code);
  const uint8_t* const rows = w.row(n);
  const int64_t stride = w.K / 2, first_block = n * w.K >> 6;  // DQ64: blocks of 64, stride / 32 per row
  const uint8_t* const qabs = w.scales.qabsmax;
  const float* const dyn = w.scales.dynmap;
  const float* const nested = w.scales.nested;
  const float offset = w.scales.offset;
  auto scale = [&](int r, int64_t c) AVX512BF16 __attribute__((always_inline)) {
    if constexpr (DQ64) {
      const int64_t b = first_block + r * (stride >> 5) + (c >> 6);
      return dyn[qabs[b]] * nested[b >> 8] + offset;
    } else {
      return w.scale_at(n + r, c);
    }
  };
  __m512 acc[R][M];
  __m512i tab[R];
  __m512bh even[R], odd[R];
  float ahead[R];
  for (int r = 0; r < R; ++r) {
    ahead[r] = scale(r, k0);
    tab[r] = bf16_table(table, ahead[r]);
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_loadu_ps(acc_io + (r * M + m) * 16);
  }
  auto decode = [&](int64_t c, __m512bh* e, __m512bh* o) AVX512BF16 __attribute__((always_inline)) {
    for (int r = 0; r < R; ++r) {
      if constexpr (DQ64) {
        tab[r] = bf16_table(table, ahead[r]);
        if (c + 64 < k1) ahead[r] = scale(r, c + 64);
      } else if (w.block_starts(n + r, c)) {
        tab[r] = bf16_table(table, scale(r, c));
      }
      __m512i ev, od;
      decode_step(rows + r * stride + c / 2, tab[r], ev, od);
      e[r] = (__m512bh)ev;
      o[r] = (__m512bh)od;
    }
  };
  decode(k0, even, odd);
  for (int64_t c = k0; c < k1; c += 64) {
    __m512bh next_even[R], next_odd[R];
    if (c + 64 < k1) {
      prefetch_ahead<R, PF>(w, n, c + 64, pf, (c - k0) / 64);
      decode(c + 64, next_even, next_odd);
    }
    const uint16_t* x = static_cast<const uint16_t*>(x_steps) + c * M;  // 32 even, then 32 odd columns per row
    for (int m = 0; m < M; ++m) {
      const __m512bh a = (__m512bh)_mm512_loadu_si512(x + 64 * m);
      const __m512bh b = (__m512bh)_mm512_loadu_si512(x + 64 * m + 32);
      for (int r = 0; r < R; ++r) {  // each lane sums a pair of products: all lanes are summed at the end anyway
        acc[r][m] = _mm512_dpbf16_ps(acc[r][m], a, even[r]);
        acc[r][m] = _mm512_dpbf16_ps(acc[r][m], b, odd[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      even[r] = next_even[r];
      odd[r] = next_odd[r];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) _mm512_storeu_ps(acc_io + (r * M + m) * 16, acc[r][m]);
}

// x @ W^T for one row of x (a decoded token), bf16: the same products as nt_bf16_rows, shaped for a walk bound by its
// decode rather than by multiply-adds (2 per 64 weights against 16 at 8 rows). Measured single-threaded at 4096x4096
// on Zen 5 (AVX512_BF16), where the decode's permutes, widening, broadcasts and conversions all issue on two pipes:
// 0.35 -> 0.24 ms (docs/kernels.md).
// - The R rows' scales for the slice are dequantized first (dq_scales; in one run where the slice is whole rows, the
//   next group's codes fetched meanwhile), into an array the table's multiply reads as its broadcast operand: no
//   broadcast on those pipes, and no scale lookups (three dependent loads and their address arithmetic for each 64
//   weights) in the walk.
// - Each row of W sums its even and odd columns in two accumulators: with the walk this short, one accumulator's
//   chain of multiply-adds (6 cycles each) bounds it.
// - Everything the walk reads per step is in locals (a pointer and the row stride): read through `w`, the fields are
//   reloaded every step, since the compiler cannot tell that nothing writes them.
constexpr int64_t kMaxSliceSteps = 128;  // nt_range's K slices at one row of bf16 x: at most 8192 columns

// the scales of double-quantized blocks [b, b + count) as Scales dequantizes them (the map's value times the group's
// maximum, plus the offset: two roundings), 64 at a time. The map is looked up byte by byte: each of its four byte
// planes (`planes`, 16 registers loaded by load_map_planes) is 256 bytes, two two-register byte permutes and a blend
// on bit 7 of the code, after which two rounds of unpacking put the bytes of each entry together. The unpacking works
// within 128-bit lanes, so the codes are first permuted into the order that makes its output come out in block order.
// Measured on Zen 5: about 0.3 cycles per block, against 0.7 for a tree of 8 two-register float permutes over the map
// (16 blocks at a time) and 1.1 for gathers.
AVX512BF16 inline void load_map_planes(const Scales& s, __m512i* planes) {
  for (int i = 0; i < 16; ++i) planes[i] = _mm512_load_si512(s.map_bytes + 64 * i);
}

AVX512BF16 inline void dq_scales(const Scales& s, const __m512i* planes, int64_t b, int64_t count, float* out) {
  // code 16L + 4j + t goes to the slot of block 16j + 4L + t (L, j < 4: 128-bit lane, output vector; t < 4)
  alignas(64) static constexpr uint8_t kOrder[64] = {
      0, 1, 2, 3, 16, 17, 18, 19, 32, 33, 34, 35, 48, 49, 50, 51, 4, 5, 6, 7, 20, 21, 22, 23, 36, 37, 38, 39, 52, 53, 54, 55,
      8, 9, 10, 11, 24, 25, 26, 27, 40, 41, 42, 43, 56, 57, 58, 59, 12, 13, 14, 15, 28, 29, 30, 31, 44, 45, 46, 47, 60, 61, 62, 63};
  const __m512i order = _mm512_load_si512(kOrder);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t i = 0; i < count; i += 64) {
    const int64_t left = count - i;
    const __mmask64 live = left >= 64 ? ~0ULL : (1ULL << left) - 1;
    const __m512i q = _mm512_permutexvar_epi8(order, _mm512_maskz_loadu_epi8(live, s.qabsmax + b + i));
    const __mmask64 high = _mm512_movepi8_mask(q);  // codes 128-255
    __m512i plane[4];
    for (int p = 0; p < 4; ++p)
      plane[p] = _mm512_mask_blend_epi8(high, _mm512_permutex2var_epi8(planes[4 * p], q, planes[4 * p + 1]),
                                        _mm512_permutex2var_epi8(planes[4 * p + 2], q, planes[4 * p + 3]));
    const __m512i lo01 = _mm512_unpacklo_epi8(plane[0], plane[1]), hi01 = _mm512_unpackhi_epi8(plane[0], plane[1]);
    const __m512i lo23 = _mm512_unpacklo_epi8(plane[2], plane[3]), hi23 = _mm512_unpackhi_epi8(plane[2], plane[3]);
    const __m512i value[4] = {_mm512_unpacklo_epi16(lo01, lo23), _mm512_unpackhi_epi16(lo01, lo23),
                              _mm512_unpacklo_epi16(hi01, hi23), _mm512_unpackhi_epi16(hi01, hi23)};
    if (left >= 64 && (b + i) >> 8 == (b + i + 63) >> 8) {  // 64 blocks under one maximum (always, when aligned)
      const __m512 nested = _mm512_set1_ps(s.nested[(b + i) >> 8]), offset = _mm512_set1_ps(s.offset);
      for (int j = 0; j < 4; ++j)
        _mm512_storeu_ps(out + i + 16 * j, _mm512_add_ps(_mm512_mul_ps(_mm512_castsi512_ps(value[j]), nested), offset));
      continue;
    }
    for (int j = 0; j < 4 && 16 * j < left; ++j) {
      const __mmask16 store = left - 16 * j >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (left - 16 * j)) - 1);
      // 16 consecutive blocks span at most two groups of 256
      const int64_t first = b + i + 16 * j, group = first >> 8;
      const __mmask16 next =
          _mm512_cmpge_epi32_mask(lane, _mm512_set1_epi32(static_cast<int>(256 - (first & 255)))) & store;
      __m512 nested = _mm512_set1_ps(s.nested[group]);
      if (next) nested = _mm512_mask_mov_ps(nested, next, _mm512_set1_ps(s.nested[group + 1]));
      const __m512 code = _mm512_castsi512_ps(value[j]);
      _mm512_mask_storeu_ps(out + i + 16 * j, store, _mm512_add_ps(_mm512_mul_ps(code, nested), _mm512_set1_ps(s.offset)));
    }
  }
}

// step j of rows n .. n+R (p: row n at that step), each looked up in its block's table
template <int R>
AVX512BF16 __attribute__((always_inline)) inline void one_row_decode(const uint8_t* p, int64_t stride,
                                                                     const float* scales, int64_t steps, __m512 table,
                                                                     __m512bh* even, __m512bh* odd) {
  for (int r = 0; r < R; ++r) {
    __m512i e, o;
    decode_step(p + r * stride, bf16_table(table, scales[r * steps]), e, o);
    even[r] = (__m512bh)e;
    odd[r] = (__m512bh)o;
  }
}

template <int R, int PF>
AVX512BF16 void nt_bf16_one_row(const void* x_steps, const Weights& w, const float* code, int64_t n, int64_t k0,
                                int64_t k1, float* acc_io, const uint8_t*) {
  static_assert(PF != kNextTile, "one row of x walks rows, not tiles");
  const int64_t steps = (k1 - k0) / 64;
  alignas(64) float scales[R * kMaxSliceSteps];
  if (w.dq64() && w.scales.map_bytes) {  // the rows' scales, `steps` apart: in one run where the slice is whole rows
    __m512i planes[16];
    load_map_planes(w.scales, planes);
    if (k1 - k0 == w.K) {
      dq_scales(w.scales, planes, n * w.K >> 6, R * steps, scales);
      if (PF == kNextRows)  // the next group's codes, which its first dq_scales would otherwise wait for
        for (int64_t i = 0; i < R * steps; i += 64)
          _mm_prefetch(reinterpret_cast<const char*>(w.scales.qabsmax + (std::min(n + R, w.N - R) * w.K >> 6) + i), _MM_HINT_T0);
    } else {
      for (int r = 0; r < R; ++r) dq_scales(w.scales, planes, ((n + r) * w.K + k0) >> 6, steps, scales + r * steps);
    }
  } else {
    for (int r = 0; r < R; ++r)
      for (int64_t j = 0; j < steps; ++j) scales[r * steps + j] = w.scale_at(n + r, k0 + 64 * j);
  }
  const __m512 table = _mm512_loadu_ps(code);
  __m512 acc[R], acc_odd[R];
  for (int r = 0; r < R; ++r) {
    acc[r] = _mm512_loadu_ps(acc_io + r * 16);
    acc_odd[r] = _mm512_setzero_ps();
  }
  const int64_t stride = w.K / 2;
  const uint8_t* const p = w.row(n) + k0 / 2;
  const uint8_t* const next = w.row(std::min(n + R, w.N - R)) + k0 / 2;  // the next group's rows (kNextRows)
  const uint16_t* const x = static_cast<const uint16_t*>(x_steps) + k0;  // per step: 32 even, then 32 odd columns
  __m512bh even[R], odd[R];
  one_row_decode<R>(p, stride, scales, steps, table, even, odd);
  for (int64_t j = 1; j <= steps; ++j) {
    __m512bh next_even[R], next_odd[R];
    if (j < steps) {
      if (PF == kNextRows && (j & 1) == 0)  // a cache line of each of the next group's rows every 128 columns
        for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(next + r * stride + 32 * j), _MM_HINT_T0);
      one_row_decode<R>(p + 32 * j, stride, scales + j, steps, table, next_even, next_odd);
    }
    const __m512bh a = (__m512bh)_mm512_loadu_si512(x + 64 * (j - 1));
    const __m512bh b = (__m512bh)_mm512_loadu_si512(x + 64 * (j - 1) + 32);
    for (int r = 0; r < R; ++r) {
      acc[r] = _mm512_dpbf16_ps(acc[r], a, even[r]);
      acc_odd[r] = _mm512_dpbf16_ps(acc_odd[r], b, odd[r]);
      even[r] = next_even[r];
      odd[r] = next_odd[r];
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(acc_io + r * 16, _mm512_add_ps(acc[r], acc_odd[r]));
}

// rows of W decoded together: R*M accumulators, 2R decoded vectors and R tables must fit the 32 vector registers
// (3 rows at 3-4 rows of x fit too; with the walk's locals they measured 10% slower than 2)
constexpr int nt_rows_per_step(int M) { return M <= 2 ? 4 : 2; }

// one group of at most 8 rows of x over rows [t0, t0 + count) of W and columns [k0, k1); `pf` walks the next tile
// (see prefetch_ahead), advanced past what this call fetched
template <int G, bool BF16, int PF>
void nt_group(const void* x_steps, const Weights& w, const float* code, int64_t t0, int64_t count, int64_t k0,
              int64_t k1, float* acc, const uint8_t*& pf) {
  constexpr int R = nt_rows_per_step(G);
  constexpr int64_t STEP = BF16 ? 64 : 32;
  using Rows = void (*)(const void*, const Weights&, const float*, int64_t, int64_t, int64_t, float*, const uint8_t*);
  Rows rows, one;  // R rows of W at a time, then one at a time
  if constexpr (!BF16)
    rows = nt_f32_rows<G, R, PF>, one = nt_f32_rows<G, 1, PF>;
  else if constexpr (G == 1)
    rows = nt_bf16_one_row<R, PF>, one = nt_bf16_one_row<1, PF>;
  else if (w.dq64())
    rows = nt_bf16_rows<G, R, PF, true>, one = nt_bf16_rows<G, 1, PF, true>;
  else
    rows = nt_bf16_rows<G, R, PF, false>, one = nt_bf16_rows<G, 1, PF, false>;
  const int64_t steps = (k1 - k0) / STEP;
  int64_t r = 0;
  for (; r + R <= count; r += R) {
    rows(x_steps, w, code, t0 + r, k0, k1, acc + r * G * 16, pf);
    if (pf) pf += steps * ((R + 1) / 2) * 64;
  }
  for (; r < count; ++r) {
    one(x_steps, w, code, t0 + r, k0, k1, acc + r * G * 16, pf);
    if (pf) pf += steps * 64;
  }
}

// 16 floats rounded to bf16 as to_bf16_bits rounds each
AVX512 inline __m256i bf16_bits_x16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v), high = _mm512_srli_epi32(u, 16);
  const __m512i exponent = _mm512_set1_epi32(0x7f800000);
  const __m512i rounded = _mm512_srli_epi32(
      _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(high, _mm512_set1_epi32(1)))), 16);
  const __mmask16 special = _mm512_cmpeq_epi32_mask(_mm512_and_si512(u, exponent), exponent);  // inf, nan
  const __mmask16 payload = _mm512_test_epi32_mask(u, _mm512_set1_epi32(0xffff));
  const __m512i kept = _mm512_mask_or_epi32(high, payload, high, _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, special, kept));
}

// the sums of the 8 vectors v[0], v[stride], ..., each added in _mm512_reduce_add_ps's order (lane i plus lane i+8,
// then i+4, i+2, i+1: the same results), stored as 8 consecutive outputs
template <typename OutT>
AVX512 inline void store_sums_of_8(OutT* out, const float* v, int64_t stride) {
  const __m512i h8a = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
  const __m512i h8b = _mm512_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  const __m512i h4a = _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27);
  const __m512i h4b = _mm512_setr_epi32(4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  const __m512i h2a = _mm512_setr_epi32(0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29);
  const __m512i h2b = _mm512_setr_epi32(2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  __m512 a[4], b[2];
  for (int k = 0; k < 4; ++k) {  // a[k]: v[2k]'s 8 partial sums, then v[2k+1]'s
    const __m512 x = _mm512_loadu_ps(v + 2 * k * stride), y = _mm512_loadu_ps(v + (2 * k + 1) * stride);
    a[k] = _mm512_add_ps(_mm512_permutex2var_ps(x, h8a, y), _mm512_permutex2var_ps(x, h8b, y));
  }
  for (int k = 0; k < 2; ++k)  // b[k]: 4 partial sums each of v[4k] .. v[4k+3]
    b[k] = _mm512_add_ps(_mm512_permutex2var_ps(a[2 * k], h4a, a[2 * k + 1]),
                         _mm512_permutex2var_ps(a[2 * k], h4b, a[2 * k + 1]));
  const __m512 c = _mm512_add_ps(_mm512_permutex2var_ps(b[0], h2a, b[1]), _mm512_permutex2var_ps(b[0], h2b, b[1]));
  const __m512 d = _mm512_add_ps(c, _mm512_permute_ps(c, 0xB1));  // lane 2r: the sum of v[r]
  const __m512 sums = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 0, 0, 0, 0, 0, 0, 0, 0), d);
  if constexpr (std::is_same_v<OutT, float>) {
    _mm256_storeu_ps(out, _mm512_castps512_ps256(sums));
  } else {
    static_assert(std::is_same_v<OutT, at::BFloat16>, "x @ W^T writes fp32 or bf16");
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm256_castsi256_si128(bf16_bits_x16(sums)));
  }
}

// x @ W^T for output columns [n0, n1): tiles of T rows of W, walked in K slices of x small enough for L1 (from
// kBcastMinRows rows of bf16 x, nt_bcast_range takes all but the rows of W past the last block of 16). More than 8
// rows of x go in two groups, each with its own steps (x_steps, x_steps2), over the same tile and slice: a weight is
// then decoded twice, but x is loaded once per two rows of W instead of once per row (measured single-threaded: 16 rows as
// 8 + 8 about 1.15x faster than 16 at once, which fits only one row of W beside its 16 accumulators).
template <int M, bool BF16, typename OutT>
AVX512 void nt_range(const void* x_steps, const void* x_steps2, const Weights& w, const float* code, OutT* out, int64_t n0,
              int64_t n1) {
  constexpr int G1 = M > 8 ? 8 : M, G2 = M > 8 ? M - 8 : 0;
  constexpr int R = nt_rows_per_step(G1);
  // T*M*64 bytes of accumulators: at most 8 KiB (measured: M=8 1.2x slower with 16 rows, M=16 1.1x faster with 8)
  constexpr int T = M > 8 ? 8 : std::max(R, std::min(16, 64 / M)) / R * R;
  constexpr int64_t STEP = BF16 ? 64 : 32, XBYTES = BF16 ? 2 : 4;
  const int64_t slice = std::min(w.K, std::max(STEP, 16384 / (M * XBYTES) / STEP * STEP));
  alignas(64) float acc[T * M * 16];
  float* acc2 = acc + T * G1 * 16;
  for (int64_t t0 = n0; t0 < n1; t0 += T) {
    const int64_t count = std::min<int64_t>(T, n1 - t0);
    std::fill(acc, acc + T * M * 16, 0.f);
    const uint8_t* pf = M > 1 ? w.row(std::max<int64_t>(0, std::min(t0 + T, w.N - T))) : nullptr;  // the next tile
    for (int64_t k0 = 0; k0 < w.K; k0 += slice) {
      const int64_t k1 = std::min(w.K, k0 + slice);
      nt_group<G1, BF16, M == 1 ? kNextRows : kNextTile>(x_steps, w, code, t0, count, k0, k1, acc, pf);
      const uint8_t* none = nullptr;
      if constexpr (G2 > 0) nt_group<G2, BF16, kNoPrefetch>(x_steps2, w, code, t0, count, k0, k1, acc2, none);
    }
    int64_t r = 0;
    for (; r + 8 <= count; r += 8)  // 8 consecutive outputs of each row of x at once
      for (int m = 0; m < M; ++m) {
        const float* a = m < G1 ? acc + (r * G1 + m) * 16 : acc2 + (r * G2 + m - G1) * 16;
        store_sums_of_8(out + m * w.N + t0 + r, a, (m < G1 ? G1 : G2) * 16);
      }
    for (; r < count; ++r)
      for (int m = 0; m < M; ++m) {
        const float* a = m < G1 ? acc + (r * G1 + m) * 16 : acc2 + (r * G2 + m - G1) * 16;
        store_one(out, m * w.N + t0 + r, _mm512_reduce_add_ps(_mm512_loadu_ps(a)));
      }
  }
}

// x @ W^T for many rows of bf16 x (kBcastMinRows to 16): the 16 lanes of a vector are the rows of x. A block of 16
// rows of W is decoded, 256 columns at a time, into bf16 pairs (two adjacent columns of one row per dword) in L1;
// then for each pair of columns every row of W's dword is broadcast straight from L1 into a vdpbf16ps against the 16
// rows' values of that pair (one load of x per 16 multiply-adds, 16 accumulators). The next slice is decoded while
// this one is multiplied (double buffer), and the next block of W read into L2 in order. Measured at 4096x4096 on 2
// threads: M=16 1.45 -> 1.05 ms against two groups of 8 rows over vectors along K (which decode every weight twice
// and load x once per 2 multiply-adds); from 12 rows of x on it is the faster (rows of x past M are zero lanes).
constexpr int kBcastRows = 16;      // rows of W per block: 16 accumulators
constexpr int64_t kBcastCols = 256;  // columns per decoded slice: 2 x 16 rows x 512 B of bf16 pairs
constexpr int kBcastMinRows = 12;

// columns [c, c + 64) of row n, as 32 dwords of (even, odd) column pairs, in the order unpacking gives: slots 0-15
// hold pairs 8L+t (L = 0..3, t = 0..3), slots 16-31 pairs 8L+4+t (bcast_pair_of is that order)
AVX512BF16 __attribute__((always_inline)) inline void bcast_decode(__m512 table, const uint8_t* src, float scale,
                                                                   uint32_t* dst) {
  __m512i e, o;
  decode_step(src, bf16_table(table, scale), e, o);
  _mm512_store_si512(dst, _mm512_unpacklo_epi16(e, o));
  _mm512_store_si512(dst + 16, _mm512_unpackhi_epi16(e, o));
}

// acc[r] += x . (the dword p[128 r], in every lane), r < 8: half a slot of the lanes path, each broadcast in its
// multiply-add's memory operand. In assembly because compilers emit a separate broadcast for _mm512_set1_epi32 (an
// instruction more per multiply-add for the front end, which then bounds the loop) and, given one multiply-add at
// a time, keep the accumulators in memory.
static_assert(kBcastCols / 2 * 4 == 512, "the offsets below are the rows of a decoded slice");
AVX512BF16 __attribute__((always_inline)) inline void dpbf16_bcast8(__m512& a0, __m512& a1, __m512& a2, __m512& a3,
                                                                    __m512& a4, __m512& a5, __m512& a6, __m512& a7,
                                                                    __m512bh x, const uint32_t* p) {
  using Rows = const uint32_t[7 * kBcastCols / 2 + 1];  // the dwords it reads lie in p[0 .. 7 * 128]
  asm("vdpbf16ps (%[p])%{1to16%}, %[x], %[a0]\n\t"
      "vdpbf16ps 512(%[p])%{1to16%}, %[x], %[a1]\n\t"
      "vdpbf16ps 1024(%[p])%{1to16%}, %[x], %[a2]\n\t"
      "vdpbf16ps 1536(%[p])%{1to16%}, %[x], %[a3]\n\t"
      "vdpbf16ps 2048(%[p])%{1to16%}, %[x], %[a4]\n\t"
      "vdpbf16ps 2560(%[p])%{1to16%}, %[x], %[a5]\n\t"
      "vdpbf16ps 3072(%[p])%{1to16%}, %[x], %[a6]\n\t"
      "vdpbf16ps 3584(%[p])%{1to16%}, %[x], %[a7]\n\t"
      : [a0] "+v"(a0), [a1] "+v"(a1), [a2] "+v"(a2), [a3] "+v"(a3), [a4] "+v"(a4), [a5] "+v"(a5), [a6] "+v"(a6),
        [a7] "+v"(a7)
      : [x] "v"(x), [p] "r"(p), "m"(*reinterpret_cast<Rows*>(p)));
}

inline int64_t bcast_pair_of(int64_t slot) {  // the column pair (within a 64-column step) a dword slot holds
  const int64_t half = slot / 16, q = slot % 16;
  return 8 * (q / 4) + 4 * half + q % 4;
}

// the scales of rows [n, n + 16) of W, one per 64-column step (blocksize >= 64), row after row, computed ahead so that
// a decode's scale is one load (measured at M=16: 8% faster than the scale's three dependent loads in the decode).
// DQ64: these blocks are consecutive and, n being a multiple of 16, start at a multiple of 16; 16 at a time from a
// gather into the 256-entry map, sharing one nested maximum (one per 256 blocks)
template <bool DQ64>
AVX512BF16 void bcast_scales(const Weights& w, int64_t n, float* dst) {
  TORCH_CHECK(n % kBcastRows == 0, "a lanes block starts at a multiple of 16 rows");
  const int64_t steps = w.K / 64, count = kBcastRows * steps;
  if constexpr (DQ64) {
    const Scales& s = w.scales;
    const int64_t b0 = n * steps;
    const __m512 offset = _mm512_set1_ps(s.offset);
    for (int64_t i = 0; i < count; i += 16) {
      const int64_t b = b0 + i;
      const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s.qabsmax + b)));
      const __m512 nested = _mm512_set1_ps(s.nested[b >> 8]);  // b % 16 == 0: the 16 share it
      const __m512 prod = _mm512_mul_ps(_mm512_i32gather_ps(q, s.dynmap, 4), nested);  // as Scales does
      _mm512_storeu_ps(dst + i, _mm512_add_ps(prod, offset));
    }
  } else {
    for (int r = 0; r < kBcastRows; ++r)
      for (int64_t c = 0; c < steps; ++c) dst[r * steps + c] = w.scale_at(n + r, 64 * c);
  }
}

// rows [n0, n0 + 16 * blocks) of W; x2: per dword slot (K/2 of them, in bcast_decode's order) the 16 rows' pairs
template <bool DQ64, typename OutT>
AVX512BF16 void nt_bcast_range(const uint32_t* x2, int64_t M, const Weights& w, const float* code, OutT* out,
                               int64_t n0, int64_t blocks) {
  constexpr int RB = kBcastRows;
  constexpr int64_t SL = kBcastCols;
  const __m512 table = _mm512_loadu_ps(code);
  const int64_t K = w.K, steps = K / 64, slices = (K + SL - 1) / SL;
  alignas(64) uint32_t bufs[2][RB * SL / 2];
  thread_local std::vector<float> scale_store;
  scale_store.resize(2 * RB * steps);
  float* const scales[2] = {scale_store.data(), scale_store.data() + RB * steps};
  auto steps_of = [&](int64_t si) { return (std::min(K, (si + 1) * SL) - si * SL) / 64; };
  const int64_t n1 = n0 + RB * blocks;
  bcast_scales<DQ64>(w, n0, scales[0]);
  for (int r = 0; r < RB; ++r)
    for (int64_t s = 0; s < steps_of(0); ++s)
      bcast_decode(table, w.row(n0 + r) + 32 * s, scales[0][r * steps + s], bufs[0] + r * (SL / 2) + 32 * s);
  int cur = 0, sc = 0;
  for (int64_t n = n0; n < n1; n += RB) {
    if (n + RB < n1) bcast_scales<DQ64>(w, n + RB, scales[sc ^ 1]);
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0, a8 = a0, a9 = a0,
           a10 = a0, a11 = a0, a12 = a0, a13 = a0, a14 = a0, a15 = a0;
    const uint8_t* next_block = w.row(std::min(n + RB, w.N - RB));
    for (int64_t si = 0; si < slices; ++si) {
      const int64_t slots = steps_of(si) * 32;
      const bool last = si + 1 == slices;
      // the slice decoded meanwhile: rows nn.. of W, columns from nc, row dr and step ds next
      const int64_t nn = last ? n + RB : n, nc = last ? 0 : (si + 1) * SL, nsteps = steps_of(last ? 0 : si + 1);
      const uint8_t* src = w.row(nn) + nc / 2;
      const float* sp = scales[last ? sc ^ 1 : sc] + nc / 64;
      int dr = nn < n1 ? 0 : RB;
      int64_t ds = 0;
      const uint32_t* buf = bufs[cur];
      uint32_t* nxt = bufs[cur ^ 1];
      const uint32_t* xs = x2 + si * (SL / 2) * 16;
      for (int64_t d = 0; d < slots; ++d) {
        const int64_t D = si * (SL / 2) + d;  // the block's K/2 slots spread the next block's RB*K/2 bytes
        if ((D & 3) == 0) _mm_prefetch(reinterpret_cast<const char*>(next_block + D * RB), _MM_HINT_T1);
        if ((d & 1) == 0 && dr < RB) {
          bcast_decode(table, src + dr * (K / 2) + 32 * ds, sp[dr * steps + ds], nxt + dr * (SL / 2) + 32 * ds);
          if (++ds == nsteps) ds = 0, ++dr;
        }
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(xs + d * 16);
        // (an asm statement takes at most 30 operands; an array of accumulators would live in memory)
        dpbf16_bcast8(a0, a1, a2, a3, a4, a5, a6, a7, xv, buf + d);
        dpbf16_bcast8(a8, a9, a10, a11, a12, a13, a14, a15, xv, buf + 8 * (SL / 2) + d);
      }
      for (; dr < RB; ds = 0, ++dr)
        for (; ds < nsteps; ++ds)
          bcast_decode(table, src + dr * (K / 2) + 32 * ds, sp[dr * steps + ds], nxt + dr * (SL / 2) + 32 * ds);
      cur ^= 1;
    }
    sc ^= 1;
    const __m512 acc[RB] = {a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15};
    alignas(64) float lanes[RB][16];  // [row of W][row of x]
    for (int r = 0; r < RB; ++r) _mm512_store_ps(lanes[r], acc[r]);
    for (int64_t m = 0; m < M; ++m)  // row by row of out: its M rows lie N apart, often all in one L1 set
      for (int r = 0; r < RB; ++r) store_one(out, m * w.N + n + r, lanes[r][m]);
  }
}

// x @ W^T for a dense bf16 W (the output head, kept in 16 bits) and a few rows of bf16 x: bound by reading W once,
// which oneDNN's bf16 path on these CPUs does at about a third of the bandwidth. Row n of W against the M rows of x,
// 32 columns per step, fp32 accumulation; the M sums go to out[m * ldo].
template <int M>
AVX512BF16 void dense_bf16_row(const uint16_t* x, const uint16_t* wt, int64_t K, int64_t n, float* out, int64_t ldo) {
  __m512 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t c = 0; c < K; c += 32) {
    const __m512bh wv = (__m512bh)_mm512_loadu_si512(wt + n * K + c);
    for (int m = 0; m < M; ++m)
      acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)_mm512_loadu_si512(x + m * K + c), wv);
  }
  for (int m = 0; m < M; ++m) out[m * ldo] = _mm512_reduce_add_ps(acc[m]);
}

// Results go to a local tile first: the M rows of `out` lie N floats apart, for a vocabulary-sized N a multiple of
// 4 KiB, so writing them in place puts all M lines in one L1 set. One row of W at a time, the M rows of x sharing
// each load of it; more than 8 rows of x go in two passes over a tile of W, the second reading it from L2.
// Measured on the 49152-row head (2 threads): M=8 3.0 ms in place with two rows of W per pass, 1.2 ms this way.
template <int M>
AVX512BF16 void dense_bf16_range(const uint16_t* x, const uint16_t* wt, int64_t N, int64_t K, float* out, int64_t n0,
                                 int64_t n1) {
  constexpr int G1 = M > 8 ? 8 : M, G2 = M - G1;
  constexpr int64_t TILE = 64;
  alignas(64) float tile[M * TILE];
  for (int64_t t0 = n0; t0 < n1; t0 += TILE) {
    const int64_t t1 = std::min(n1, t0 + TILE);
    for (int64_t n = t0; n < t1; ++n) dense_bf16_row<G1>(x, wt, K, n, tile + (n - t0), TILE);
    if constexpr (G2 > 0)
      for (int64_t n = t0; n < t1; ++n) dense_bf16_row<G2>(x + G1 * K, wt, K, n, tile + G1 * TILE + (n - t0), TILE);
    for (int m = 0; m < M; ++m) std::copy(tile + m * TILE, tile + m * TILE + (t1 - t0), out + m * N + t0);
  }
}

// g @ W walks W in tiles of kNnTile rows, each over all columns chunk by chunk. As a chunk starts a cache line, the
// same line of the row two tiles down is fetched into L2 (into L1 it would be evicted before use), so the walk
// overlaps its memory traffic (the same reason as prefetch_ahead; measured at M=1, 4096x4096: 0.38 -> 0.29 ms).
constexpr int64_t kNnTile = 64;

AVX512 __attribute__((always_inline)) inline void prefetch_next_tile(const Weights& w, int64_t row, int64_t c) {
  if (row + 2 * kNnTile < w.N) _mm_prefetch(reinterpret_cast<const char*>(w.row(row + 2 * kNnTile) + c / 2), _MM_HINT_T1);
}

// g @ W: the accumulators run along K (the output), 32 columns (even and odd apart) for G rows of g; rows [n0, n1) of
// W pass through them, each decoded weight multiplied by the broadcast g[m, n]. g comes transposed (g[n * ldg + m])
// so the G values for one row of W sit together. `first` starts from zero.
AVX512 __attribute__((always_inline)) inline void nn_f32_decode(const Weights& w, __m512 table, int64_t n, int64_t c,
                                                                bool new_line, __m512* even, __m512* odd) {
  const uint8_t* p = w.row(n) + c / 2;
  if (new_line) prefetch_next_tile(w, n, c);
  const __m512 tab = f32_table(table, w.scale_at(n, c), w.bf16w);
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  *even = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), tab);
  *odd = _mm512_permutexvar_ps(v, tab);
}

// As in nt_f32_rows, the next row is decoded before this row's multiply-adds are issued.
template <int G>
AVX512 void nn_f32_cols(const void* g_, int64_t ldg, const Weights& w, const float* code, int64_t n0, int64_t n1,
                        int64_t c, float* oe, float* oo, bool first) {
  const float* g = static_cast<const float*>(g_);
  const int64_t half = w.K / 2;
  const __m512 table = _mm512_loadu_ps(code);
  __m512 ae[G], ao[G];
  for (int m = 0; m < G; ++m) {
    ae[m] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(oe + m * half + c / 2);
    ao[m] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(oo + m * half + c / 2);
  }
  const bool new_line = (c & 127) == 0;  // this chunk starts a cache line of every row: fetch the next one early
  __m512 even, odd;
  nn_f32_decode(w, table, n0, c, new_line, &even, &odd);
  for (int64_t n = n0; n < n1; ++n) {
    __m512 next_even, next_odd;
    if (n + 1 < n1) nn_f32_decode(w, table, n + 1, c, new_line, &next_even, &next_odd);
    for (int m = 0; m < G; ++m) {
      const __m512 gm = _mm512_set1_ps(g[n * ldg + m]);
      ae[m] = _mm512_fmadd_ps(gm, even, ae[m]);
      ao[m] = _mm512_fmadd_ps(gm, odd, ao[m]);
    }
    even = next_even;
    odd = next_odd;
  }
  for (int m = 0; m < G; ++m) {
    _mm512_storeu_ps(oe + m * half + c / 2, ae[m]);
    _mm512_storeu_ps(oo + m * half + c / 2, ao[m]);
  }
}

// the same with bf16 g, two rows of W at a time (N even): vdpbf16ps sums the products of a lane's pair of words, so
// each lane pairs column j of row n with column j of row n+1, and g[m, n], g[m, n+1] are one broadcast dword (g comes
// as [N/2][M][2]). The 32-word table holds row n's scaled table in words 0-15 and row n+1's in 16-31; bit 4 of the
// index picks the row.
// pair indices into the two rows' bytes: vpermw indices of the even (high nibble) and odd columns, bit 4 set in row
// n+1's words, whose table is the upper half
AVX512BF16 __attribute__((always_inline)) inline void pair_indices(__m512i a, __m512i b, __m512i pair, __m512i* ie,
                                                                   __m512i* io) {
  const __m512i nibble = _mm512_set1_epi32(0x000f000f), second_row = _mm512_set1_epi32(0x00100000);
  const __m512i d = _mm512_maskz_permutex2var_epi8(0x5555555555555555ULL, a, pair, b);
  *io = _mm512_ternarylogic_epi32(d, nibble, second_row, 0xEA);  // (v & nibble) | second_row
  *ie = _mm512_ternarylogic_epi32(_mm512_srli_epi16(d, 4), nibble, second_row, 0xEA);
}

// the pair table of rows n, n+1 for the block holding column c
template <bool DQ64>
AVX512BF16 __attribute__((always_inline)) inline __m512i pair_table(const Weights& w, __m512 table, int64_t n,
                                                                    int64_t c) {
  const __m512 t0 = _mm512_mul_ps(table, _mm512_set1_ps(block_scale<DQ64>(w, n, c)));
  const __m512 t1 = _mm512_mul_ps(table, _mm512_set1_ps(block_scale<DQ64>(w, n + 1, c)));
  return (__m512i)_mm512_cvtne2ps_pbh(t1, t0);
}

// vpermt2b indices making dword i = byte first+i of row n | byte first+i of row n+1 << 16 (other bytes are masked)
struct PairBytes {
  alignas(64) uint8_t b[64];
  constexpr explicit PairBytes(int first) : b{} {
    for (int p = 0; p < 64; ++p) b[p] = static_cast<uint8_t>(p % 4 == 0 ? first + p / 4 : 64 + first + p / 4);
  }
};
constexpr PairBytes kPairBytes[4] = {PairBytes{0}, PairBytes{16}, PairBytes{32}, PairBytes{48}};

// The walk over a tile of rows reads, pair by pair, the next tile's bytes into L2 in order, 32*H of them per pair
// (the tile's share of the next tile for this chunk of 32*H columns): rows are K/2 bytes apart, so a tile's rows
// share a couple of L1 sets and the hardware prefetcher, which follows one stream, cannot run ahead of them
// (measured at M=1, 4096x4096: 0.29 -> 0.19 ms with H=4).
template <int H>
AVX512 __attribute__((always_inline)) inline void prefetch_pair(const uint8_t* next, int64_t pair) {
  if constexpr (H == 1) {
    if ((pair & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(next + pair * 32), _MM_HINT_T1);
  } else {
    for (int i = 0; i < H / 2; ++i) _mm_prefetch(reinterpret_cast<const char*>(next + pair * 32 * H + 64 * i), _MM_HINT_T1);
  }
}

// g @ W for G rows of g over pairs of rows [n0, n1) and the 32 columns from c (even and odd columns apart in oe, oo),
// accumulating (or from zero if `first`). g holds LDG rows (a template argument: with g's stride known, GCC keeps the
// walk's registers free, 3-5% faster at 8 rows). Tables come from `tabs` (one per pair, built for the block holding c
// by the caller, so that both 32-column halves of a 64-column block, and both groups of 8 rows of g, share them) or,
// without, are built here.
template <int G, int LDG, bool DQ64>
AVX512BF16 void nn_bf16_cols(const void* g_, const Weights& w, const float* code, int64_t n0,
                             int64_t n1, int64_t c, float* oe, float* oo, bool first, const __m512i* tabs,
                             const uint8_t* next) {
  const uint16_t* g = static_cast<const uint16_t*>(g_);
  const int64_t half = w.K / 2;
  const __m512 table = _mm512_loadu_ps(code);
  __m512 ae[G], ao[G];
  for (int m = 0; m < G; ++m) {
    ae[m] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(oe + m * half + c / 2);
    ao[m] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(oo + m * half + c / 2);
  }
  // decodes pair n (and fetches the next tile's share for it)
  auto decode = [&](int64_t n, __m512bh* even, __m512bh* odd) AVX512BF16 __attribute__((always_inline)) {
    const uint8_t* p0 = w.row(n) + c / 2;
    prefetch_pair<1>(next, (n - n0) / 2);
    const __m512i tab = tabs ? _mm512_load_si512(tabs + (n - n0) / 2) : pair_table<DQ64>(w, table, n, c);
    const __m512i a = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p0)));
    const __m512i b = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p0 + half)));
    __m512i ie, io;
    pair_indices(a, b, _mm512_load_si512(kPairBytes[0].b), &ie, &io);
    *even = (__m512bh)_mm512_permutexvar_epi16(ie, tab);
    *odd = (__m512bh)_mm512_permutexvar_epi16(io, tab);
  };
  // the next pair decoded before this pair's multiply-adds are issued (see nt_f32_rows)
  __m512bh even, odd;
  decode(n0, &even, &odd);
  for (int64_t n = n0; n < n1; n += 2) {
    __m512bh next_even, next_odd;
    if (n + 2 < n1) decode(n + 2, &next_even, &next_odd);
    for (int m = 0; m < G; ++m) {
      int32_t gg;
      std::memcpy(&gg, g + n * LDG + 2 * m, 4);
      const __m512bh gm = (__m512bh)_mm512_set1_epi32(gg);
      ae[m] = _mm512_dpbf16_ps(ae[m], gm, even);
      ao[m] = _mm512_dpbf16_ps(ao[m], gm, odd);
    }
    even = next_even, odd = next_odd;
  }
  for (int m = 0; m < G; ++m) {
    _mm512_storeu_ps(oe + m * half + c / 2, ae[m]);
    _mm512_storeu_ps(oo + m * half + c / 2, ao[m]);
  }
}

// With up to 4 rows of g, where decoding the weights bounds the walk rather than the multiply-adds, each block's
// scale is folded into g instead of into a table per pair of rows: per pair of rows, row of g and 64-column step j,
// the dword bf16(g[m, n] * scale[n, j]) | bf16(g[m, n+1] * scale[n+1, j]) << 16 (`gs`, [pair][m][j], nb steps per row)
// multiplies the code table rounded to bf16 (`tab`, the same in both halves, so an index needs neither a mask nor a
// row bit). That takes the table's multiplies and conversion and the indices' masks out of the walk (M=1 4096x4096,
// two threads, processes alternated: 0.17-0.18 -> 0.135-0.145 ms). The weights multiplied are then bf16(code) * scale
// with g * scale rounded to bf16, not dequantize's bf16(code * scale): two roundings of 2^-9 per product instead of
// one (measured against the fp64 product of the fp32 weights, the error norm of the bf16 result is 2.7e-3 against
// 2.35e-3, most of it the output's own rounding).
// g @ W for G rows of g over pairs of rows [n0, n1) and the 32*H columns from c (H halves of 32).
template <int G, int H>
AVX512BF16 void nn_folded_cols(const uint32_t* gs, int64_t nb, const Weights& w, __m512i tab, int64_t n0, int64_t n1,
                               int64_t c, float* oe, float* oo, bool first, const uint8_t* next) {
  const int64_t half = w.K / 2;
  __m512 ae[H][G], ao[H][G];
  for (int h = 0; h < H; ++h)
    for (int m = 0; m < G; ++m) {
      ae[h][m] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(oe + m * half + c / 2 + 16 * h);
      ao[h][m] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(oo + m * half + c / 2 + 16 * h);
    }
  if constexpr (H == 8) {  // 16 accumulators: each 64-column half decoded and multiplied in turn, the codes loaded first
    for (int64_t n = n0; n < n1; n += 2) {
      const uint8_t* p0 = w.row(n) + c / 2;
      prefetch_pair<H>(next, (n - n0) / 2);
      const __m512i a[2] = {_mm512_loadu_si512(p0), _mm512_loadu_si512(p0 + 64)};
      const __m512i b[2] = {_mm512_loadu_si512(p0 + half), _mm512_loadu_si512(p0 + half + 64)};
      const uint32_t* gp = gs + (n - n0) / 2 * G * nb + c / 64;
      for (int h = 0; h < H; ++h) {
        const __m512i d =
            _mm512_maskz_permutex2var_epi8(0x5555555555555555ULL, a[h / 4], _mm512_load_si512(kPairBytes[h % 4].b), b[h / 4]);
        const __m512bh even = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(d, 4), tab);
        const __m512bh odd = (__m512bh)_mm512_permutexvar_epi16(d, tab);
        for (int m = 0; m < G; ++m) {
          const __m512bh gm = (__m512bh)_mm512_set1_epi32(static_cast<int>(gp[m * nb + h / 2]));
          ae[h][m] = _mm512_dpbf16_ps(ae[h][m], gm, even);
          ao[h][m] = _mm512_dpbf16_ps(ao[h][m], gm, odd);
        }
      }
    }
  } else {
    auto decode = [&](int64_t n, __m512bh* even, __m512bh* odd) AVX512BF16 __attribute__((always_inline)) {
      const uint8_t* p0 = w.row(n) + c / 2;
      prefetch_pair<H>(next, (n - n0) / 2);
      __m512i a, b;
      if constexpr (H == 4) {
        a = _mm512_loadu_si512(p0);
        b = _mm512_loadu_si512(p0 + half);
      } else {
        a = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p0)));
        b = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p0 + half)));
      }
      for (int h = 0; h < H; ++h) {  // words: the byte of row n, the byte of row n+1 (high bytes zero)
        const __m512i d = _mm512_maskz_permutex2var_epi8(0x5555555555555555ULL, a, _mm512_load_si512(kPairBytes[h].b), b);
        even[h] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(d, 4), tab);
        odd[h] = (__m512bh)_mm512_permutexvar_epi16(d, tab);  // reads the low 5 bits: bit 4 picks an identical half
      }
    };
    auto multiply = [&](int64_t n, const __m512bh* even, const __m512bh* odd) AVX512BF16 __attribute__((always_inline)) {
      const uint32_t* gp = gs + (n - n0) / 2 * G * nb + c / 64;
      for (int m = 0; m < G; ++m)
        for (int h = 0; h < H; ++h) {
          const __m512bh gm = (__m512bh)_mm512_set1_epi32(static_cast<int>(gp[m * nb + h / 2]));
          ae[h][m] = _mm512_dpbf16_ps(ae[h][m], gm, even[h]);
          ao[h][m] = _mm512_dpbf16_ps(ao[h][m], gm, odd[h]);
        }
    };
    if constexpr (H <= 2 || G == 1) {  // the next pair decoded first (see nt_f32_rows), where the registers allow
      __m512bh even[H], odd[H];
      decode(n0, even, odd);
      for (int64_t n = n0; n < n1; n += 2) {
        __m512bh next_even[H], next_odd[H];
        if (n + 2 < n1) decode(n + 2, next_even, next_odd);
        multiply(n, even, odd);
        for (int h = 0; h < H; ++h) even[h] = next_even[h], odd[h] = next_odd[h];
      }
    } else {
      for (int64_t n = n0; n < n1; n += 2) {
        __m512bh even[H], odd[H];
        decode(n, even, odd);
        multiply(n, even, odd);
      }
    }
  }
  for (int h = 0; h < H; ++h)
    for (int m = 0; m < G; ++m) {
      _mm512_storeu_ps(oe + m * half + c / 2 + 16 * h, ae[h][m]);
      _mm512_storeu_ps(oo + m * half + c / 2 + 16 * h, ao[h][m]);
    }
}

// the folded g (see nn_folded_cols) of rows [t0, t1) from their scales (`scales`: nb per row, from row t0) and g
// ([N/2][M][2]). A pair's scales are interleaved first (row n's and row n+1's for the same step side by side), so that
// for each row of g one multiply by (g[n], g[n+1], g[n], ...) and one conversion give 16 steps' dwords in order.
template <int M>
AVX512BF16 void fold_scales_into_g(const uint16_t* g, const float* scales, int64_t nb, int64_t t0, int64_t t1,
                                   uint32_t* gs) {
  const __m512i lo = interleave_low();
  const __m512i hi = interleave_high();
  for (int64_t n = t0; n < t1; n += 2) {
    const float* s0 = scales + (n - t0) * nb;
    const float* s1 = s0 + nb;
    __m512 g01[M];  // g[m, n], g[m, n+1] as fp32 in alternate lanes (a bf16 value is the high half of its fp32)
    for (int m = 0; m < M; ++m) {
      const uint16_t* gg = g + (n / 2 * M + m) * 2;
      g01[m] = _mm512_castsi512_ps(_mm512_set1_epi64(static_cast<int64_t>(static_cast<uint64_t>(gg[0]) << 16 |
                                                                          static_cast<uint64_t>(gg[1]) << 48)));
    }
    for (int64_t j = 0; j < nb; j += 16) {
      const __mmask16 live = nb - j >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (nb - j)) - 1);
      const __m512 a = _mm512_maskz_loadu_ps(live, s0 + j), b = _mm512_maskz_loadu_ps(live, s1 + j);
      const __m512 first = _mm512_permutex2var_ps(a, lo, b), second = _mm512_permutex2var_ps(a, hi, b);
      for (int m = 0; m < M; ++m) {
        const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(second, g01[m]), _mm512_mul_ps(first, g01[m]));
        _mm512_mask_storeu_epi32(gs + ((n - t0) / 2 * M + m) * nb + j, live, both);
      }
    }
  }
}

// bf16 g @ W over rows [r0, r1) (N even) into oe, oo, which it overwrites. Tiles of rows, each walked chunk by chunk
// over all columns. The shape per M, measured at 4096x4096 on 2 threads:
// - M <= 4 (blocks of at least 64, K % 64 == 0): g folded with the tile's scales (nn_folded_cols), tiles of 64 rows,
//   128 columns per pass for M <= 2 (a whole cache line of every row) where K allows, else 64.
// - otherwise: 32 columns per pass for at most 8 rows of g (16 accumulators), tiles of 128 or 256 rows, the pair tables
//   built once per 64-column block and shared by both halves and both groups of g (M=8 0.69 -> 0.52 ms, M=16 1.5 ->
//   0.95 ms).
template <int M, bool DQ64>
AVX512BF16 void nn_bf16_range(const void* g, const Weights& w, const float* code, float* oe, float* oo, int64_t r0,
                              int64_t r1) {
  const int64_t half = w.K / 2;
  auto next_tile = [&](int64_t t0, int64_t tile) { return w.row(std::max<int64_t>(0, std::min(t0 + tile, w.N - tile))); };
  const bool wide = w.mask >= 63 && w.K % 64 == 0;  // a 64-column chunk lies in one block
  if constexpr (M <= 4) {
    if (wide) {
      constexpr int64_t TILE = 64;
      const int64_t nb = w.K / 64;
      const bool by_planes = DQ64 && w.scales.map_bytes;  // the tile's scales in one run (see nt_bf16_one_row)
      thread_local std::vector<float> scale_buf;
      thread_local std::vector<uint32_t> folded_buf;
      float* const tile_scales = aligned_buffer(scale_buf, TILE * nb);
      uint32_t* const folded = aligned_buffer(folded_buf, TILE / 2 * M * nb);
      __m512i planes[16];
      if (by_planes) load_map_planes(w.scales, planes);
      const __m512 code_f = _mm512_loadu_ps(code);
      const __m512i tab = (__m512i)_mm512_cvtne2ps_pbh(code_f, code_f);
      const bool h8 = M == 1 && w.K % 256 == 0, h4 = M <= 2 && w.K % 128 == 0;
      for (int64_t t0 = r0; t0 < r1; t0 += TILE) {
        const int64_t t1 = std::min(r1, t0 + TILE);
        if (by_planes) {  // and the next tile's codes fetched meanwhile
          dq_scales(w.scales, planes, t0 * nb, (t1 - t0) * nb, tile_scales);
          for (int64_t i = t1 * nb; i < std::min(r1, t1 + TILE) * nb; i += 64)
            _mm_prefetch(reinterpret_cast<const char*>(w.scales.qabsmax + i), _MM_HINT_T1);
        } else {
          for (int64_t n = t0; n < t1; ++n)
            for (int64_t j = 0; j < nb; ++j) tile_scales[(n - t0) * nb + j] = w.scale_at(n, 64 * j);
        }
        fold_scales_into_g<M>(static_cast<const uint16_t*>(g), tile_scales, nb, t0, t1, folded);
        const uint8_t* next = next_tile(t0, TILE);
        if (h8) {
          for (int64_t c = 0; c < w.K; c += 256)
            nn_folded_cols<M, 8>(folded, nb, w, tab, t0, t1, c, oe, oo, t0 == r0, next + c / 256 * TILE * 128);
        } else if (h4) {
          for (int64_t c = 0; c < w.K; c += 128)
            nn_folded_cols<M, 4>(folded, nb, w, tab, t0, t1, c, oe, oo, t0 == r0, next + c / 128 * TILE * 64);
        } else {
          for (int64_t c = 0; c < w.K; c += 64)
            nn_folded_cols<M, 2>(folded, nb, w, tab, t0, t1, c, oe, oo, t0 == r0, next + c / 64 * TILE * 32);
        }
      }
      return;
    }
  }
  constexpr int G1 = M > 8 ? 8 : M, G2 = M > 8 ? M - 8 : 1;
  // tiles of 128 rows up to 8 rows of g, 256 above (measured in one process, 4096x4096: M=8 3-11% faster with 128
  // than 256; M=16 0-3% slower)
  constexpr int64_t TILE = M <= 4 ? 64 : (M <= 8 ? 128 : 256);
  const uint16_t* g8 = static_cast<const uint16_t*>(g) + 2 * G1;  // rows 8.. of g
  alignas(64) __m512i tabs[TILE / 2];
  for (int64_t t0 = r0; t0 < r1; t0 += TILE) {
    const int64_t t1 = std::min(r1, t0 + TILE);
    const uint8_t* next = next_tile(t0, TILE);
    const __m512 table = _mm512_loadu_ps(code);
    for (int64_t c = 0; c < w.K; c += 32) {
      const bool shared = wide && (c & 63) == 0;
      if (shared)
        for (int64_t n = t0; n < t1; n += 2) tabs[(n - t0) / 2] = pair_table<DQ64>(w, table, n, c);
      const __m512i* t = wide ? tabs : nullptr;
      const uint8_t* nx = next + c / 32 * TILE * 16;
      nn_bf16_cols<G1, M, DQ64>(g, w, code, t0, t1, c, oe, oo, t0 == r0, t, nx);
      if constexpr (M > 8) nn_bf16_cols<G2, M, DQ64>(g8, w, code, t0, t1, c, oe + G1 * half, oo + G1 * half, t0 == r0, t, nx);
    }
  }
}

// fp32 g @ W over rows [r0, r1) of W into oe, oo (all K columns, which it overwrites). Tiles of kNnTile rows of W (a
// tile stays in L2 while its chunks are walked); at most 8 rows of g per pass so the 2*8 accumulators fit the
// registers (M > 8: two passes over the tile).
template <int M>
void nn_f32_range(const void* g, const Weights& w, const float* code, float* oe, float* oo, int64_t r0, int64_t r1) {
  constexpr int G1 = M > 8 ? 8 : M, G2 = M > 8 ? M - 8 : 1;
  const int64_t half = w.K / 2;
  const float* g8 = static_cast<const float*>(g) + G1;  // rows 8.. of g
  for (int64_t t0 = r0; t0 < r1; t0 += kNnTile) {
    const int64_t t1 = std::min(r1, t0 + kNnTile);
    for (int64_t c = 0; c < w.K; c += 32) {
      nn_f32_cols<G1>(g, M, w, code, t0, t1, c, oe, oo, t0 == r0);
      if (M > 8) nn_f32_cols<G2>(g8, M, w, code, t0, t1, c, oe + G1 * half, oo + G1 * half, t0 == r0);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// AVX2 products (fp32 FMA, 8 lanes): the AVX-512 fp32 paths' layouts and order of work, with a 16-entry lookup
// built from two 8-entry vpermps and a blend (lookup16). bf16 activations are widened to fp32 and multiply the
// scaled table rounded to bf16 (Weights::bf16w): dequantize-to-bf16's weights, as on the vdpbf16ps path.

AVX2 __attribute__((always_inline)) inline void scaled_table8(__m256 code_lo, __m256 code_hi, float scale, bool bf16w,
                                                              __m256* lo, __m256* hi) {
  const __m256 s = _mm256_set1_ps(scale);
  *lo = _mm256_mul_ps(code_lo, s);
  *hi = _mm256_mul_ps(code_hi, s);
  if (bf16w) {
    *lo = _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits_x8(*lo), 16));
    *hi = _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits_x8(*hi), 16));
  }
}

// 8 packed bytes of a row: its 8 even columns (high nibbles) and 8 odd ones, in the row's scaled table
AVX2 __attribute__((always_inline)) inline void decode16(const uint8_t* bytes, const float* tab, __m256* even,
                                                         __m256* odd) {
  const __m256i d = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes)));
  const __m256 lo = _mm256_load_ps(tab), hi = _mm256_load_ps(tab + 8);
  *even = lookup16(lo, hi, _mm256_srli_epi32(d, 4), _mm256_slli_epi32(d, 24));
  *odd = lookup16(lo, hi, d, _mm256_slli_epi32(d, 28));
}

AVX2 inline float reduce_add8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// x @ W^T, rows n .. n+R of W over columns [k0, k1), x in 32-column steps (see nt_f32_rows), each step in two halves
// of 8 bytes per row of W. The R*M accumulators (8 lanes each) stay in `acc_io` between K slices. As a 128-column
// run starts, a cache line of each of the next R rows is fetched (see prefetch_ahead).
template <int M, int R>
AVX2 void nt_avx2_rows(const float* xs, const Weights& w, const float* code, int64_t n, int64_t k0, int64_t k1,
                       float* acc_io) {
  const __m256 code_lo = _mm256_loadu_ps(code), code_hi = _mm256_loadu_ps(code + 8);
  alignas(32) float tab[R][16];
  __m256 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm256_loadu_ps(acc_io + (r * M + m) * 8);
  for (int64_t c = k0; c < k1; c += 32) {
    for (int r = 0; r < R; ++r) {
      if (c == k0 || w.block_starts(n + r, c)) {
        __m256 lo, hi;
        scaled_table8(code_lo, code_hi, w.scale_at(n + r, c), w.bf16w, &lo, &hi);
        _mm256_store_ps(tab[r], lo);
        _mm256_store_ps(tab[r] + 8, hi);
      }
      if ((c & 127) == 0 && n + r + R < w.N)
        _mm_prefetch(reinterpret_cast<const char*>(w.row(n + r + R) + c / 2), _MM_HINT_T0);
    }
    const float* x = xs + c * M;  // this step's M rows: 16 even, 16 odd columns
    for (int h = 0; h < 2; ++h) {
      __m256 even[R], odd[R];
      for (int r = 0; r < R; ++r) decode16(w.row(n + r) + c / 2 + 8 * h, tab[r], &even[r], &odd[r]);
      for (int m = 0; m < M; ++m) {
        const __m256 a = _mm256_loadu_ps(x + 32 * m + 8 * h), b = _mm256_loadu_ps(x + 32 * m + 16 + 8 * h);
        for (int r = 0; r < R; ++r) {
          acc[r][m] = _mm256_fmadd_ps(a, even[r], acc[r][m]);
          acc[r][m] = _mm256_fmadd_ps(b, odd[r], acc[r][m]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) _mm256_storeu_ps(acc_io + (r * M + m) * 8, acc[r][m]);
}

// rows of W decoded together: R*M accumulators and 2R decoded vectors in the 16 vector registers
constexpr int nt_avx2_rows_per_step(int M) { return M == 1 ? 4 : (M == 2 ? 3 : (M <= 4 ? 2 : 1)); }

template <int G>
AVX2 void nt_avx2_group(const float* xs, const Weights& w, const float* code, int64_t t0, int64_t count, int64_t k0,
                        int64_t k1, float* acc) {
  constexpr int R = nt_avx2_rows_per_step(G);
  int64_t r = 0;
  for (; r + R <= count; r += R) nt_avx2_rows<G, R>(xs, w, code, t0 + r, k0, k1, acc + r * G * 8);
  for (; r < count; ++r) nt_avx2_rows<G, 1>(xs, w, code, t0 + r, k0, k1, acc + r * G * 8);
}

// x @ W^T for output columns [n0, n1): tiles of 16 rows of W walked in K slices of x that fit L1; more than 8 rows of
// x in two groups over the same tile and slice (see nt_range)
template <int M>
AVX2 void nt_avx2_range(const float* xs, const float* xs2, const Weights& w, const float* code, float* out, int64_t n0,
                        int64_t n1) {
  constexpr int G1 = M > 8 ? 8 : M, G2 = M > 8 ? M - 8 : 0, T = 16;
  const int64_t slice = std::min(w.K, std::max<int64_t>(32, 16384 / (M * 4) / 32 * 32));
  alignas(32) float acc[T * M * 8];
  float* acc2 = acc + T * G1 * 8;
  for (int64_t t0 = n0; t0 < n1; t0 += T) {
    const int64_t count = std::min<int64_t>(T, n1 - t0);
    std::fill(acc, acc + T * M * 8, 0.f);
    for (int64_t k0 = 0; k0 < w.K; k0 += slice) {
      const int64_t k1 = std::min(w.K, k0 + slice);
      nt_avx2_group<G1>(xs, w, code, t0, count, k0, k1, acc);
      if constexpr (G2 > 0) nt_avx2_group<G2>(xs2, w, code, t0, count, k0, k1, acc2);
    }
    for (int64_t r = 0; r < count; ++r)
      for (int m = 0; m < M; ++m) {
        const float* a = m < G1 ? acc + (r * G1 + m) * 8 : acc2 + (r * G2 + m - G1) * 8;
        out[m * w.N + t0 + r] = reduce_add8(_mm256_loadu_ps(a));
      }
  }
}

// g @ W: accumulators along K, 16 columns (8 even, 8 odd) for G rows of g (g transposed, g[n * ldg + m]); rows
// [n0, n1) of W pass through them, each decoded weight multiplied by the broadcast g[m, n] (see nn_f32_cols)
template <int G>
AVX2 void nn_avx2_cols(const float* g, int64_t ldg, const Weights& w, const float* code, int64_t n0, int64_t n1,
                       int64_t c, float* oe, float* oo, bool first) {
  const int64_t half = w.K / 2;
  const __m256 code_lo = _mm256_loadu_ps(code), code_hi = _mm256_loadu_ps(code + 8);
  __m256 ae[G], ao[G];
  for (int m = 0; m < G; ++m) {
    ae[m] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(oe + m * half + c / 2);
    ao[m] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(oo + m * half + c / 2);
  }
  const bool new_line = (c & 127) == 0;
  alignas(32) float tab[16];
  for (int64_t n = n0; n < n1; ++n) {
    if (new_line && n + 2 * kNnTile < w.N)
      _mm_prefetch(reinterpret_cast<const char*>(w.row(n + 2 * kNnTile) + c / 2), _MM_HINT_T1);
    __m256 lo, hi, even, odd;
    scaled_table8(code_lo, code_hi, w.scale_at(n, c), w.bf16w, &lo, &hi);
    _mm256_store_ps(tab, lo);
    _mm256_store_ps(tab + 8, hi);
    decode16(w.row(n) + c / 2, tab, &even, &odd);
    for (int m = 0; m < G; ++m) {
      const __m256 gm = _mm256_broadcast_ss(g + n * ldg + m);
      ae[m] = _mm256_fmadd_ps(gm, even, ae[m]);
      ao[m] = _mm256_fmadd_ps(gm, odd, ao[m]);
    }
  }
  for (int m = 0; m < G; ++m) {
    _mm256_storeu_ps(oe + m * half + c / 2, ae[m]);
    _mm256_storeu_ps(oo + m * half + c / 2, ao[m]);
  }
}

// rows [r0, r1) of W into a task's partial sums oe, oo ([M, K/2] each): tiles of kNnTile rows, each over all columns
// 16 at a time, in groups of at most 4 rows of g (8 accumulators)
template <int M>
AVX2 void nn_avx2_range(const float* g, const Weights& w, const float* code, float* oe, float* oo, int64_t r0,
                        int64_t r1) {
  const int64_t half = w.K / 2;
  for (int64_t t0 = r0; t0 < r1; t0 += kNnTile) {
    const int64_t t1 = std::min(r1, t0 + kNnTile);
    for (int64_t c = 0; c < w.K; c += 16)
      for (int m0 = 0; m0 < M; m0 += 4) {
        float* e = oe + m0 * half;
        float* o = oo + m0 * half;
        switch (std::min(4, M - m0)) {
          case 1: nn_avx2_cols<1>(g + m0, M, w, code, t0, t1, c, e, o, t0 == r0); break;
          case 2: nn_avx2_cols<2>(g + m0, M, w, code, t0, t1, c, e, o, t0 == r0); break;
          case 3: nn_avx2_cols<3>(g + m0, M, w, code, t0, t1, c, e, o, t0 == r0); break;
          default: nn_avx2_cols<4>(g + m0, M, w, code, t0, t1, c, e, o, t0 == r0); break;
        }
      }
  }
}

// rows [m0, m1) of g @ W's output from the tasks' partial sums (task 0's plus the others', those added first, in task
// order), even and odd columns interleaved (see nn_reduce)
template <typename OutT>
AVX2 void nn_reduce_avx2(const float* pp, int64_t tasks, int64_t part, int64_t M, int64_t K, int64_t m0, int64_t m1,
                         OutT* dst) {
  const int64_t half = K / 2;
  for (int64_t m = m0; m < m1; ++m)
    for (int64_t j = 0; j < half; ++j)
      for (int h = 0; h < 2; ++h) {
        const float* first = pp + (h * M + m) * half + j;
        float more = 0.f;
        for (int64_t t = 1; t < tasks; ++t) more += first[t * part];
        store_one<OutT>(dst, m * K + 2 * j + h, tasks > 1 ? first[0] + more : first[0]);
      }
}

#ifdef FOURBIT_AMX
// ---------------------------------------------------------------------------------------------------------------
// AMX (Sapphire Rapids and later): the bf16 path's decode (the same scaled tables, the same bf16 weights) written to
// small tiles in L1 and multiplied by the tile unit, TDPBF16PS (C[16 x 16] += A[16 x 32] B[32 x 16], bf16 products
// summed in fp32). One TDPBF16PS takes the place of up to 16 vdpbf16ps, so with up to 16 rows of activations the
// products cost about what the decode costs, whatever M is (on a Xeon with AMX, 4096x4096, processes alternated
// against the vdpbf16ps path: x @ W^T 8 rows 1.7 -> 0.55 ms, 16 rows 3.0 -> 0.65; g @ W 8 rows 1.7 -> 0.79, 16 rows
// 3.3 -> 0.91; vdpbf16ps runs at about 1.5 cycles there, which made the multiply-adds, not the decode, the bound).
//
// x @ W^T: A = 16 rows of W (a 64-column step's even columns, then its odd ones: what the decode gives), B = x in
// the matching pairs (B[p][m] = x[m][c+4p], x[m][c+4p+2] for the even tile), C = [16 rows of W][M]. g @ W: A = 32
// columns of g as they are, B = pairs of rows of W (B[p] = W[2p][k], W[2p+1][k] over 16 columns k), C = [M][16 even or
// odd columns], kept in the tasks' partial sums as the bf16 path keeps them.

#define AMXBF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx512bf16,amx-tile,amx-bf16")))

// The compiler's tile intrinsics are asm without a memory clobber: it would not know that a tile load reads the rows
// just stored (it may drop or sink the stores) nor that a tile store writes memory read afterwards
#define amx_load(tile, base, stride)     \
  do {                                   \
    __asm__ volatile("" ::: "memory");   \
    _tile_loadd(tile, base, stride);     \
  } while (0)
#define amx_store(tile, base, stride)    \
  do {                                   \
    _tile_stored(tile, base, stride);    \
    __asm__ volatile("" ::: "memory");   \
  } while (0)

struct alignas(64) TileConfig {  // the 64-byte operand of LDTILECFG, palette 1
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  void set(int tile, int rows_, int colsb_) {
    rows[tile] = static_cast<uint8_t>(rows_);
    colsb[tile] = static_cast<uint16_t>(colsb_);
  }
};

// Rows of W are short (K/2 bytes), so the hardware prefetcher does not run ahead of a walk over many of them: each
// step fetches into L2 its share of the rows the walk reads next, [next, end), `lines` cache lines per step
AMXBF16 inline void amx_prefetch(const uint8_t* next, const uint8_t* end, int64_t step, int lines) {
  for (int i = 0; i < lines; ++i) {
    const uint8_t* p = next + (step * lines + i) * 64;
    if (p < end) _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T1);
  }
}

// x [M, K] bf16 into x @ W^T's B tiles: per 64-column step two tiles (even, odd) of [16 pairs][M]
void x_in_amx_pairs(const uint16_t* x, int64_t M, int64_t K, uint32_t* xb) {
  for (int64_t q = 0; q < K / 64; ++q)
    for (int t = 0; t < 2; ++t)
      for (int64_t p = 0; p < 16; ++p) {
        uint32_t* dst = xb + ((q * 2 + t) * 16 + p) * M;
        const int64_t k = q * 64 + 4 * p + t;
        for (int64_t m = 0; m < M; ++m)
          dst[m] = static_cast<uint32_t>(x[m * K + k]) | (static_cast<uint32_t>(x[m * K + k + 2]) << 16);
      }
}

// a 64-column step of one row of W, decoded as the bf16 path does (decode_step), into two rows of A tiles
template <bool DQ64>
AMXBF16 __attribute__((always_inline)) inline void amx_decode_row(const Weights& w, __m512 table, int64_t n, int64_t c,
                                                                  uint16_t* even, uint16_t* odd) {
  __m512i e, o;
  decode_step(w.row(n) + c / 2, bf16_table(table, block_scale<DQ64>(w, n, c)), e, o);
  _mm512_store_si512(even, e);
  _mm512_store_si512(odd, o);
}

// G groups of 16 rows of W from row n, all K columns, into sums [G * 16][M]. Software-pipelined: a step's tiles are
// loaded and multiplied after the next step is decoded (three buffer sets)
template <int G, bool DQ64>
AMXBF16 void nt_amx_rows(const uint32_t* xb, int64_t M, const Weights& w, const float* code, int64_t n, float* sums) {
  constexpr int R = 16 * G;
  const int64_t steps = w.K / 64;
  alignas(64) uint16_t buf[3][G][2][16 * 32];
  const __m512 table = _mm512_loadu_ps(code);
  const uint8_t* next = w.row(std::min(w.N, n + R));
  const uint8_t* const end = w.row(std::min(w.N, n + 2 * R));
  auto decode = [&](int64_t q) AMXBF16 {
    amx_prefetch(next, end, q, R / 2);  // the next rows: R rows x 32 bytes per step
    uint16_t(*const set)[2][16 * 32] = buf[q % 3];
    for (int g = 0; g < G; ++g)
      for (int r = 0; r < 16; ++r)
        amx_decode_row<DQ64>(w, table, n + 16 * g + r, q * 64, set[g][0] + 32 * r, set[g][1] + 32 * r);
  };
  auto multiply = [&](int64_t q) AMXBF16 {
    uint16_t(*const set)[2][16 * 32] = buf[q % 3];
    const uint32_t* b = xb + q * 32 * M;
    amx_load(6, b, 4 * M);
    amx_load(7, b + 16 * M, 4 * M);
    amx_load(2, set[0][0], 64);
    amx_load(3, set[0][1], 64);
    _tile_dpbf16ps(0, 2, 6);
    _tile_dpbf16ps(0, 3, 7);
    if constexpr (G == 2) {
      amx_load(4, set[1][0], 64);
      amx_load(5, set[1][1], 64);
      _tile_dpbf16ps(1, 4, 6);
      _tile_dpbf16ps(1, 5, 7);
    }
  };
  _tile_zero(0);
  if constexpr (G == 2) _tile_zero(1);
  decode(0);
  for (int64_t q = 1; q < steps; ++q) {
    decode(q);
    multiply(q - 1);
  }
  multiply(steps - 1);
  amx_store(0, sums, 4 * M);
  if constexpr (G == 2) amx_store(1, sums + 16 * M, 4 * M);
}

// rows [n0, n1) of x @ W^T (n1 - n0 a multiple of 16) into out [M, N]
template <bool DQ64, typename OutT>
AMXBF16 void nt_amx_range(const uint32_t* xb, int64_t M, const Weights& w, const float* code, OutT* out, int64_t n0,
                          int64_t n1) {
  TileConfig cfg;
  for (int t : {0, 1, 6, 7}) cfg.set(t, 16, 4 * M);
  for (int t : {2, 3, 4, 5}) cfg.set(t, 16, 64);
  _tile_loadconfig(&cfg);
  alignas(64) float sums[32 * 16];
  for (int64_t n = n0; n < n1;) {
    const int64_t rows = n1 - n >= 32 ? 32 : 16;
    if (rows == 32)
      nt_amx_rows<2, DQ64>(xb, M, w, code, n, sums);
    else
      nt_amx_rows<1, DQ64>(xb, M, w, code, n, sums);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t r = 0; r < rows; ++r) store_one<OutT>(out, m * w.N + n + r, sums[r * M + m]);
    n += rows;
  }
  _tile_release();
}

// g @ W: 64-column steps of a pair of rows of W as B tiles, their columns in natural order: decode_step's lookups,
// but from bytes spread by one vpermb instead of zero-extended in order. Word P of a decode holds byte pi(P) of the
// step (below), so that interleaving two rows' decodes word by word within 128-bit lanes (unpack) pairs columns 0-15
// in one tile and 16-31 in the other, of the even columns and of the odd ones
template <bool DQ64>
AMXBF16 __attribute__((always_inline)) inline void amx_decode_pair(const Weights& w, __m512 table, __m512i spread,
                                                                   int64_t n, int64_t c, uint16_t* const* b, int p) {
  __m512i even[2], odd[2];
  for (int r = 0; r < 2; ++r) {
    const __m512i tab = bf16_table(table, block_scale<DQ64>(w, n + r, c));
    const __m512i bytes = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.row(n + r) + c / 2)));
    const __m512i v = _mm512_maskz_permutexvar_epi8(0x5555555555555555ULL, spread, bytes);
    even[r] = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), tab);
    odd[r] = _mm512_permutexvar_epi16(v, tab);
  }
  _mm512_store_si512(b[0] + 32 * p, _mm512_unpacklo_epi16(even[0], even[1]));
  _mm512_store_si512(b[1] + 32 * p, _mm512_unpackhi_epi16(even[0], even[1]));
  _mm512_store_si512(b[2] + 32 * p, _mm512_unpacklo_epi16(odd[0], odd[1]));
  _mm512_store_si512(b[3] + 32 * p, _mm512_unpackhi_epi16(odd[0], odd[1]));
}

// bf16 g [M, N] @ W over rows [r0, r1) of W (multiples of 32) into oe, oo (all K columns, which it overwrites), in
// tiles of 128 rows as nn_bf16_range walks them
template <bool DQ64>
AMXBF16 void nn_amx_range(const uint16_t* g, int64_t M, const Weights& w, const float* code, float* oe, float* oo,
                          int64_t r0, int64_t r1) {
  TileConfig cfg;
  for (int t = 0; t < 6; ++t) cfg.set(t, static_cast<int>(M), 64);  // 0-3 sums, 4 the columns of g
  for (int t : {6, 7}) cfg.set(t, 16, 64);
  _tile_loadconfig(&cfg);
  alignas(64) int8_t spread_bytes[64];  // byte 2P <- byte pi(P); odd bytes are zeroed by the mask
  for (int P = 0; P < 32; ++P) spread_bytes[2 * P] = spread_bytes[2 * P + 1] = static_cast<int8_t>(P % 8 < 4 ? P / 8 * 4 + P % 8 : 16 + P / 8 * 4 + P % 8 - 4);
  const __m512i spread = _mm512_load_si512(spread_bytes);
  const __m512 table = _mm512_loadu_ps(code);
  const int64_t half = w.K / 2, stride = 4 * half;
  alignas(64) uint16_t buf[2][4][16 * 32];
  int set = 0;
  constexpr int64_t TILE = 128;
  for (int64_t t0 = r0; t0 < r1; t0 += TILE) {
    const int64_t t1 = std::min(r1, t0 + TILE);
    const uint8_t* next = w.row(std::min(w.N, t0 + TILE));
    const uint8_t* const end = w.row(std::min(w.N, t0 + 2 * TILE));
    for (int64_t c = 0; c < w.K; c += 64) {
      amx_prefetch(next, end, c / 64, TILE / 2);  // the next tile: TILE rows x 32 bytes per step
      float* e = oe + c / 2;
      float* o = oo + c / 2;
      if (t0 == r0) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
      } else {
        amx_load(0, e, stride);
        amx_load(1, e + 16, stride);
        amx_load(2, o, stride);
        amx_load(3, o + 16, stride);
      }
      for (int64_t s = t0; s < t1; s += 32) {
        uint16_t* b[4] = {buf[set][0], buf[set][1], buf[set][2], buf[set][3]};
        set ^= 1;
        for (int p = 0; p < 16; ++p) amx_decode_pair<DQ64>(w, table, spread, s + 2 * p, c, b, p);
        amx_load(4, g + s, 2 * w.N);
        amx_load(6, b[0], 64);
        amx_load(7, b[1], 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        amx_load(6, b[2], 64);
        amx_load(7, b[3], 64);
        _tile_dpbf16ps(2, 4, 6);
        _tile_dpbf16ps(3, 4, 7);
      }
      amx_store(0, e, stride);
      amx_store(1, e + 16, stride);
      amx_store(2, o, stride);
      amx_store(3, o + 16, stride);
    }
  }
  _tile_release();
}

#endif  // FOURBIT_AMX

#define FOURBIT_SWITCH_M(M, CALL)                                                                                    \
  switch (M) {                                                                                                       \
    case 1: CALL(1); break; case 2: CALL(2); break; case 3: CALL(3); break; case 4: CALL(4); break;                  \
    case 5: CALL(5); break; case 6: CALL(6); break; case 7: CALL(7); break; case 8: CALL(8); break;                  \
    case 9: CALL(9); break; case 10: CALL(10); break; case 11: CALL(11); break; case 12: CALL(12); break;            \
    case 13: CALL(13); break; case 14: CALL(14); break; case 15: CALL(15); break; case 16: CALL(16); break;          \
    default: break;                                                                                                  \
  }
#endif

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// entry points

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

torch::Tensor pool_empty(int64_t numel, at::ScalarType dtype);

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
    // from fourbit's pool (allocator.cpp), which hands back the pages of a freed output of the same size class.
    // No transparent huge pages asked for: faster when the kernel has free ones, but 20x slower when it must
    // compact memory for them (defrag=madvise, as here).
    out = pool_empty(end - start, dtype);
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

Weights make_weights(const torch::Tensor& packed, const Scales& scales, int64_t blocksize, int64_t N, int64_t K) {
  TORCH_CHECK(K % 32 == 0, "fused product needs K % 32 == 0");
  TORCH_CHECK(blocksize >= 32 && (blocksize & (blocksize - 1)) == 0, "blocksize must be a power of two >= 32");
  return {packed.data_ptr<uint8_t>(), scales, N, K, __builtin_ctzll(blocksize), blocksize - 1};
}

// rows [m0, m1) of x [M, K] in the vector paths' step layout: [K / step][m1 - m0][even, odd][step / 2]
template <typename T>
const T* x_in_steps(const T* x, int64_t m0, int64_t m1, int64_t K, int64_t step, std::vector<T>& buf) {
  const int64_t rows = m1 - m0, half = step / 2;
  T* const first = aligned_buffer(buf, rows * K);
  T* dst = first;
  for (int64_t s = 0; s < K / step; ++s)
    for (int64_t m = m0; m < m1; ++m) {
      const T* src = x + m * K + s * step;
      for (int64_t j = 0; j < half; ++j) {
        dst[j] = src[2 * j];
        dst[half + j] = src[2 * j + 1];
      }
      dst += step;
    }
  return first;
}

// the same for bf16 x in 64-column steps, two word permutes per row and step (the plain loop above compiles to
// 16-byte SSE2 unpacks, the baseline this file is built for)
AVX512 const uint16_t* x_in_steps_bf16(const uint16_t* x, int64_t m0, int64_t m1, int64_t K, std::vector<uint16_t>& buf) {
  uint16_t* const first = aligned_buffer(buf, (m1 - m0) * K);
  alignas(64) uint16_t even[32], odd[32];
  for (int i = 0; i < 32; ++i) even[i] = static_cast<uint16_t>(2 * i), odd[i] = static_cast<uint16_t>(2 * i + 1);
  const __m512i ie = _mm512_load_si512(even), io = _mm512_load_si512(odd);
  uint16_t* dst = first;
  for (int64_t s = 0; s < K / 64; ++s)
    for (int64_t m = m0; m < m1; ++m, dst += 64) {
      const __m512i a = _mm512_loadu_si512(x + m * K + s * 64), b = _mm512_loadu_si512(x + m * K + s * 64 + 32);
      _mm512_store_si512(dst, _mm512_permutex2var_epi16(a, ie, b));
      _mm512_store_si512(dst + 32, _mm512_permutex2var_epi16(a, io, b));
    }
  return first;
}

// the M rows of bf16 x [M, K] (as K/2 dword pairs) in the lanes path's layout: per dword slot, in bcast_decode's
// order, the 16 rows' pairs (rows past M zero), one masked gather per slot
AVX512 const uint32_t* x_in_pairs(const uint32_t* x, int64_t M, int64_t K, std::vector<uint32_t>& buf) {
  uint32_t* const dst = aligned_buffer(buf, K / 2 * 16);
  const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(static_cast<int>(K / 2)));
  const __mmask16 live = static_cast<__mmask16>((1u << M) - 1);
  for (int64_t slot = 0; slot < K / 2; ++slot) {
    const int64_t pair = slot / 32 * 32 + bcast_pair_of(slot % 32);
    _mm512_store_si512(dst + slot * 16, _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, rows, x + pair, 4));
  }
  return dst;
}

// [begin, end) in chunks of at least `grain`, about four per thread, each taken by whichever task is free: when one
// core runs slower than the other (on this VM one of the two often runs 25-30% slower for seconds at a time, a
// neighbour on its sibling), the faster takes more of the work instead of waiting for it (x @ W^T at 8 rows, processes
// alternated: median 0.562 -> 0.518 ms, fastest round unchanged). Every element is computed inside one chunk, so the
// results do not depend on how the work was split.
// `prepare` runs in each thread that takes part, before its chunks (per-thread copies of the inputs).
template <typename P, typename F>
void parallel_chunks(int64_t begin, int64_t end, int64_t grain, const P& prepare, const F& fn) {
  if (end <= begin) return;
  const int64_t threads = at::get_num_threads();
  const int64_t chunk = std::max(grain, (end - begin + 4 * threads - 1) / (4 * threads));
  const int64_t chunks = (end - begin + chunk - 1) / chunk;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, chunks), 1, [&](int64_t, int64_t) {
    prepare();
    for (int64_t i = next.fetch_add(1); i < chunks; i = next.fetch_add(1))
      fn(begin + i * chunk, std::min(end, begin + (i + 1) * chunk));
  });
}

template <typename F>
void parallel_chunks(int64_t begin, int64_t end, int64_t grain, const F& fn) {
  parallel_chunks(begin, end, grain, [] {}, fn);
}

// x: [M, K] fp32, bf16 or fp16, M <= 16. Returns x @ W.T [M, N]: bf16 for bf16 x on the vector paths (rounded once
// from the fp32 sums), else fp32.
torch::Tensor matmul_nt(torch::Tensor x, torch::Tensor packed, torch::Tensor absmax, c10::optional<torch::Tensor> nested,
                        c10::optional<torch::Tensor> dynmap, double offset, torch::Tensor code, int64_t blocksize,
                        int64_t N, int64_t K) {
  Weights w = make_weights(packed, make_scales(absmax, nested, dynmap, offset), blocksize, N, K);
  w.bf16w = x.scalar_type() == torch::kBFloat16;
  std::optional<MapBytes> map_bytes;  // for dq_scales, on the paths that use it (shared by the workers)
  if (w.dq64() && w.bf16w && has_bf16()) w.scales.map_bytes = map_bytes.emplace(w.scales.dynmap).b;
  const int64_t M = x.size(0);
  TORCH_CHECK(M <= 16 && x.dim() == 2 && x.size(1) == K, "fused 4-bit products take [M <= 16, K] inputs");
  const bool bf16_out = x.scalar_type() == torch::kBFloat16 && has_avx512();
  auto out = torch::empty({M, N}, x.options().dtype(bf16_out ? torch::kBFloat16 : torch::kFloat32));
  if (M == 0 || N == 0) return out;
  if (K == 0) return out.zero_();
  const bool bf16 = w.bf16w && has_bf16() && K % 64 == 0 && blocksize >= 64;
  x = (bf16 ? x : x.to(torch::kFloat32)).contiguous();  // bf16 and fp16 widen to fp32 exactly
  const float* c = code.data_ptr<float>();
#ifdef FOURBIT_X86
  if (!has_avx512() && has_avx2()) {  // x in 32-column steps, rows 0-7 and 8-15 apart (see nt_avx2_range)
    thread_local std::vector<float> avx2_steps[2];
    const float* px = x.data_ptr<float>();
    const float* xs = x_in_steps(px, 0, std::min<int64_t>(M, 8), K, 32, avx2_steps[0]);
    const float* xs2 = M > 8 ? x_in_steps(px, 8, M, K, 32, avx2_steps[1]) : xs;
    float* o = out.data_ptr<float>();
    parallel_chunks(0, N, std::max<int64_t>(16, 65536 / K), [&](int64_t n0, int64_t n1) {
#define CALL_NT(MM) nt_avx2_range<MM>(xs, xs2, w, c, o, n0, n1)
      FOURBIT_SWITCH_M(M, CALL_NT)
#undef CALL_NT
    });
    return out;
  }
#endif
  if (!has_avx512()) {  // the scalar path reads the even and odd columns apart, [M, K/2] each
    const torch::Tensor x_even = x.view({M, K / 2, 2}).select(2, 0).contiguous();
    const torch::Tensor x_odd = x.view({M, K / 2, 2}).select(2, 1).contiguous();
    const float* xe = x_even.data_ptr<float>();
    const float* xo = x_odd.data_ptr<float>();
    float* o = out.data_ptr<float>();
    at::parallel_for(0, N, std::max<int64_t>(16, 65536 / K),
                     [&](int64_t n0, int64_t n1) { matmul_nt_scalar(xe, xo, M, w, c, o, n0, n1); });
    return out;
  }
#ifdef FOURBIT_AMX
  // the tile unit from 2 rows of x (at one row the vdpbf16ps path is as fast), groups of 16 rows of W per chunk
  if (bf16 && M >= 2 && has_amx() && N % 16 == 0) {
    thread_local std::vector<uint32_t> x_tiles;
    uint32_t* xb = aligned_buffer(x_tiles, M * K / 2);
    x_in_amx_pairs(reinterpret_cast<const uint16_t*>(x.data_ptr()), M, K, xb);
    const bool dq64 = w.dq64();
    auto run_amx = [&](auto* o) {
      using OutT = std::remove_pointer_t<decltype(o)>;
      parallel_chunks(0, N / 16, std::max<int64_t>(1, 4096 / K), [&](int64_t b0, int64_t b1) {
        (dq64 ? nt_amx_range<true, OutT> : nt_amx_range<false, OutT>)(xb, M, w, c, o, b0 * 16, b1 * 16);
      });
    };
    if (bf16_out)
      run_amx(out.data_ptr<at::BFloat16>());
    else
      run_amx(out.data_ptr<float>());
    return out;
  }
#endif
#ifdef FOURBIT_X86
  // many rows of bf16 x: lanes over the rows of x (see nt_bcast_range) for whole blocks of rows of W, x as
  // [K/2 slots][16 rows] of column pairs; the rows of W past the last block, and every row with fewer rows of x,
  // take nt_range, which reads x step by step (see nt_f32_rows), rows 0-7 and 8-15 apart. Both layouts go into
  // reused buffers with plain loops, since a handful of torch ops here cost more than a small layer's product.
  const bool lanes = bf16 && M >= kBcastMinRows && N >= kBcastRows;
  const int64_t lane_rows = lanes ? N / kBcastRows * kBcastRows : 0;
  const bool dq64 = w.dq64();
  thread_local std::vector<uint32_t> x_pairs;
  const uint32_t* xp = nullptr;  // points into the calling thread's buffer, which the workers must not name
  if (lanes) xp = x_in_pairs(reinterpret_cast<const uint32_t*>(x.data_ptr()), M, K, x_pairs);
  // x in steps: each thread makes its own copy before its chunks (a copy made by the calling thread alone is read
  // by the other core line by line from this core's cache: 8 rows, two threads, 2.5% slower), in its own buffers
  thread_local std::vector<uint16_t> bf16_steps[2];
  thread_local std::vector<float> f32_steps[2];
  thread_local const void* xs = nullptr;
  thread_local const void* xs2 = nullptr;
  auto x_steps = [&] {
    const int64_t g1 = std::min<int64_t>(M, 8);
    if (bf16) {
      const uint16_t* px = reinterpret_cast<const uint16_t*>(x.data_ptr());
      xs = x_in_steps_bf16(px, 0, g1, K, bf16_steps[0]);
      xs2 = M > 8 ? x_in_steps_bf16(px, 8, M, K, bf16_steps[1]) : xs;
    } else {
      const float* px = x.data_ptr<float>();
      xs = x_in_steps(px, 0, g1, K, 32, f32_steps[0]);
      xs2 = M > 8 ? x_in_steps(px, 8, M, K, 32, f32_steps[1]) : xs;
    }
  };
  auto run = [&](auto* o) {
    using OutT = std::remove_pointer_t<decltype(o)>;
    if (lanes) {  // whole blocks per chunk, so that a block's first row is a multiple of 16 (see bcast_scales)
      parallel_chunks(0, lane_rows / kBcastRows, std::max<int64_t>(1, 4096 / K), [&](int64_t b0, int64_t b1) {
        (dq64 ? nt_bcast_range<true, OutT> : nt_bcast_range<false, OutT>)(xp, M, w, c, o, b0 * kBcastRows, b1 - b0);
      });
      if (lane_rows == N) return;
    }
    parallel_chunks(lane_rows, N, std::max<int64_t>(16, 65536 / K), x_steps, [&](int64_t n0, int64_t n1) {
      if (bf16) {
#define CALL_NT(MM) nt_range<MM, true, OutT>(xs, xs2, w, c, o, n0, n1)
        FOURBIT_SWITCH_M(M, CALL_NT)
#undef CALL_NT
        return;
      }
#define CALL_NT(MM) nt_range<MM, false, OutT>(xs, xs2, w, c, o, n0, n1)
      FOURBIT_SWITCH_M(M, CALL_NT)
#undef CALL_NT
    });
  };
  if (bf16_out)
    run(out.data_ptr<at::BFloat16>());
  else
    run(out.data_ptr<float>());
#endif
  return out;
}

// g: [M, N] fp32, bf16 or fp16, M <= 16. Returns g @ W [M, K]: bf16 for bf16 g on the vector paths (rounded once
// from the fp32 sums), else fp32.
AVX512 inline void store_pairs_x16(float* dst, __m512 a, __m512 b) {
  _mm512_storeu_ps(dst, a);
  _mm512_storeu_ps(dst + 16, b);
}
AVX512 inline void store_pairs_x16(at::BFloat16* dst, __m512 a, __m512 b) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), bf16_bits_x16(a));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16), bf16_bits_x16(b));
}

// rows [m0, m1) of g @ W's output: task 0's sums plus the others' (those added first, in task order), even and odd
// columns interleaved, in the output dtype (16 columns of each per turn)
template <typename OutT>
AVX512 void nn_reduce(const float* pp, int64_t tasks, int64_t part, int64_t M, int64_t K, int64_t m0, int64_t m1,
                      OutT* dst) {
  const int64_t half = K / 2;
  const __m512i lo = interleave_low();
  const __m512i hi = interleave_high();
  for (int64_t m = m0; m < m1; ++m) {
    const float* e = pp + m * half;
    const float* o = e + M * half;
    int64_t j = 0;
    for (; j + 16 <= half; j += 16) {
      __m512 se = _mm512_loadu_ps(e + j), so = _mm512_loadu_ps(o + j);
      if (tasks > 1) {
        __m512 me = _mm512_loadu_ps(e + part + j), mo = _mm512_loadu_ps(o + part + j);
        for (int64_t t = 2; t < tasks; ++t) {
          me = _mm512_add_ps(me, _mm512_loadu_ps(e + t * part + j));
          mo = _mm512_add_ps(mo, _mm512_loadu_ps(o + t * part + j));
        }
        se = _mm512_add_ps(se, me);
        so = _mm512_add_ps(so, mo);
      }
      store_pairs_x16(dst + m * K + 2 * j, _mm512_permutex2var_ps(se, lo, so), _mm512_permutex2var_ps(se, hi, so));
    }
    for (; j < half; ++j)
      for (int h = 0; h < 2; ++h) {
        const float* first = (h ? o : e) + j;
        float more = 0.f;
        for (int64_t t = 1; t < tasks; ++t) more += first[t * part];
        store_one<OutT>(dst, m * K + 2 * j + h, tasks > 1 ? first[0] + more : first[0]);
      }
  }
}

torch::Tensor matmul_nn(torch::Tensor g, torch::Tensor packed, torch::Tensor absmax,
                                     c10::optional<torch::Tensor> nested, c10::optional<torch::Tensor> dynmap,
                                     double offset, torch::Tensor code, int64_t blocksize, int64_t N, int64_t K) {
  Weights w = make_weights(packed, make_scales(absmax, nested, dynmap, offset), blocksize, N, K);
  w.bf16w = g.scalar_type() == torch::kBFloat16;
  std::optional<MapBytes> map_bytes;  // for dq_scales, on the paths that use it (shared by the workers)
  if (w.dq64() && w.bf16w && has_bf16()) w.scales.map_bytes = map_bytes.emplace(w.scales.dynmap).b;
  const int64_t M = g.size(0);
  TORCH_CHECK(M <= 16 && g.dim() == 2 && g.size(1) == N, "fused 4-bit products take [M <= 16, N] inputs");
  const bool bf16 = w.bf16w && has_bf16() && N % 2 == 0;
  const float* c = code.data_ptr<float>();
#ifdef FOURBIT_X86
  if ((has_avx512() || has_avx2()) && M > 0 && N > 0 && K > 0) {
    const bool bf16_out = w.bf16w;
    g = (bf16 ? g : g.to(torch::kFloat32)).contiguous();
    // g transposed into a reused buffer, the values for one row of W (bf16: a pair of rows, [N/2][M][2]) together,
    // each task transposing the rows it multiplies; plain loops, since a handful of torch ops here cost more than a
    // small layer's product
    thread_local std::vector<uint16_t> g_pairs;
    thread_local std::vector<float> g_rows;
    void* const gp = bf16 ? static_cast<void*>(aligned_buffer(g_pairs, M * N)) : aligned_buffer(g_rows, M * N);
    auto transpose_g = [&](int64_t r0, int64_t r1) {
      if (bf16) {
        const uint16_t* src = reinterpret_cast<const uint16_t*>(g.data_ptr());
        uint16_t* dst = static_cast<uint16_t*>(gp);
        for (int64_t n2 = r0 / 2; n2 < r1 / 2; ++n2)
          for (int64_t m = 0; m < M; ++m) {
            dst[(n2 * M + m) * 2] = src[m * N + 2 * n2];
            dst[(n2 * M + m) * 2 + 1] = src[m * N + 2 * n2 + 1];
          }
      } else {
        const float* src = g.data_ptr<float>();
        float* dst = static_cast<float*>(gp);
        for (int64_t n = r0; n < r1; ++n)
          for (int64_t m = 0; m < M; ++m) dst[n * M + m] = src[m * N + n];
      }
    };
    // each task takes whole tiles of rows and sums into its own [M, K] outputs (even and odd columns apart), added up
    // at the end: a task then reads W in one contiguous run, which streams from memory where the tasks' owning
    // column ranges (every row, half of it each) did not (1.6x slower at M=1)
    const int64_t tiles = (N + kNnTile - 1) / kNnTile;
    const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tiles));
    const int64_t half = K / 2, part = (2 * M * half + 1023) / 1024 * 1024;  // each task's sums on pages of their own
    const bool dq64 = w.dq64();  // see block_scale
    // the tile unit from 2 rows of g (one row: 0.70 against 0.52 ms on the vdpbf16ps path, 4096x4096)
    const bool amx = bf16 && M >= 2 && has_amx() && K % 64 == 0 && w.mask >= 63 && N % 32 == 0;
    thread_local std::vector<float> parts;
    float* pp = aligned_buffer(parts, tasks * part);
    at::parallel_for(0, tasks, 1, [&](int64_t a, int64_t b) {
      for (int64_t t = a; t < b; ++t) {
        const int64_t r0 = t * tiles / tasks * kNnTile, r1 = std::min(N, (t + 1) * tiles / tasks * kNnTile);
        float* e = pp + t * part;
        float* o = e + M * half;
#ifdef FOURBIT_AMX
        if (amx) {
          const uint16_t* gb = reinterpret_cast<const uint16_t*>(g.data_ptr());
          (dq64 ? nn_amx_range<true> : nn_amx_range<false>)(gb, M, w, c, e, o, r0, r1);
          continue;
        }
#endif
        transpose_g(r0, r1);
        if (bf16) {
#define CALL_NN(MM) dq64 ? nn_bf16_range<MM, true>(gp, w, c, e, o, r0, r1) : nn_bf16_range<MM, false>(gp, w, c, e, o, r0, r1)
          FOURBIT_SWITCH_M(M, CALL_NN)
#undef CALL_NN
        } else if (has_avx512()) {
#define CALL_NN(MM) nn_f32_range<MM>(gp, w, c, e, o, r0, r1)
          FOURBIT_SWITCH_M(M, CALL_NN)
#undef CALL_NN
        } else {
          const float* gf = static_cast<const float*>(gp);
#define CALL_NN(MM) nn_avx2_range<MM>(gf, w, c, e, o, r0, r1)
          FOURBIT_SWITCH_M(M, CALL_NN)
#undef CALL_NN
        }
      }
    });
    // task 0's sums plus the others' (in task order), even and odd columns interleaved, in the output dtype
    auto out = torch::empty({M, K}, g.options().dtype(bf16_out ? torch::kBFloat16 : torch::kFloat32));
    const int64_t grain = std::max<int64_t>(1, 4096 / K);
    auto reduce = [&](auto* dst) {
      at::parallel_for(0, M, grain, [&](int64_t m0, int64_t m1) {
        if (has_avx512())
          nn_reduce(pp, tasks, part, M, K, m0, m1, dst);
        else
          nn_reduce_avx2(pp, tasks, part, M, K, m0, m1, dst);
      });
    };
    if (bf16_out)
      reduce(out.data_ptr<at::BFloat16>());
    else
      reduce(out.data_ptr<float>());
    return out;
  }
#endif
  // the scalar path: each task owns a range of 32-column chunks of the output, nothing to reduce afterwards
  auto oe = torch::zeros({M, K / 2}, g.options().dtype(torch::kFloat32));
  auto oo = torch::zeros({M, K / 2}, g.options().dtype(torch::kFloat32));
  if (M > 0 && N > 0 && K > 0) {
    g = g.to(torch::kFloat32).contiguous();
    float* pe = oe.data_ptr<float>();
    float* po = oo.data_ptr<float>();
    at::parallel_for(0, K / 32, std::max<int64_t>(1, 65536 / (N * 32)), [&](int64_t u0, int64_t u1) {
      matmul_nn_scalar(g.data_ptr<float>(), M, w, c, pe, po, u0 * 16, u1 * 16);
    });
  }
  return torch::stack({oe, oo}, 2).view({M, K});  // the kernels keep even and odd columns apart
}

// x: [M <= 16, K] bf16, W: [N, K] bf16, K % 32 == 0, on a CPU with AVX512_BF16 (dense_ok). Returns fp32 [M, N].
bool dense_ok() { return has_bf16(); }

torch::Tensor matmul_dense_nt(torch::Tensor x, torch::Tensor weight) {
  TORCH_CHECK(has_bf16(), "matmul_dense_nt needs AVX512_BF16");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1) && x.size(0) <= 16 &&
                  x.size(1) % 32 == 0 && x.scalar_type() == torch::kBFloat16 &&
                  weight.scalar_type() == torch::kBFloat16,
              "matmul_dense_nt takes bf16 x [M <= 16, K] and W [N, K], K % 32 == 0");
  x = x.contiguous();
  weight = weight.contiguous();
  const int64_t M = x.size(0), N = weight.size(0), K = x.size(1);
  auto out = torch::empty({M, N}, x.options().dtype(torch::kFloat32));
  if (M == 0 || N == 0) return out;
  const uint16_t* px = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const uint16_t* pw = reinterpret_cast<const uint16_t*>(weight.data_ptr());
  float* o = out.data_ptr<float>();
#ifdef FOURBIT_X86
  at::parallel_for(0, N, std::max<int64_t>(16, 65536 / K), [&](int64_t n0, int64_t n1) {
#define CALL_DENSE(MM) dense_bf16_range<MM>(px, pw, N, K, o, n0, n1)
    FOURBIT_SWITCH_M(M, CALL_DENSE)
#undef CALL_DENSE
  });
#endif
  return out;
}

std::string cpu_path() {
  if (has_amx()) return "avx512-amx";
  if (has_bf16()) return "avx512-bf16";
  if (has_avx512()) return "avx512";
  return has_avx2() ? "avx2" : "scalar";
}

// defined in dropout.cpp
torch::Tensor hash_dropout(torch::Tensor x, double p, int64_t seed, c10::optional<at::ScalarType> dtype);
// defined in attention.cpp
bool decode_attention_ok();
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor keys, torch::Tensor values,
                               c10::optional<torch::Tensor> mask, double scale);
bool pool_install(int64_t cap_bytes);
void pool_uninstall();
void pool_release();
std::vector<int64_t> pool_stats();

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quantize", &quantize, "blockwise 4-bit quantization");
  m.def("dequantize", &dequantize, "blockwise 4-bit dequantization of flat elements [start, end)");
  m.def("matmul_nt", &matmul_nt, "x @ W.T with W decoded on the fly (small M)");
  m.def("matmul_nn", &matmul_nn, "g @ W with W decoded on the fly (small M)");
  m.def("cpu_path", &cpu_path, "which vector path this CPU runs");
  m.def("dense_ok", &dense_ok, "whether matmul_dense_nt runs here (AVX512_BF16)");
  m.def("matmul_dense_nt", &matmul_dense_nt, "x @ W.T for bf16 x with at most 16 rows and a dense bf16 W");
  m.def("hash_dropout", &hash_dropout, "dropout whose mask is a hash of (seed, index)");
  m.def("decode_attention_ok", &decode_attention_ok, "whether decode_attention runs here (AVX-512)");
  m.def("decode_attention", &decode_attention, "attention for one query position per row (decoding)");
  m.def("pool_install", &pool_install, "route CPU allocations of 128 KiB and more through fourbit's pool");
  m.def("pool_uninstall", &pool_uninstall, "back to c10's default CPU allocator");
  m.def("pool_release", &pool_release, "unmap the pool's cached mappings");
  m.def("pool_stats", &pool_stats, "[live bytes, cached bytes, hits, misses, installed]");
}
