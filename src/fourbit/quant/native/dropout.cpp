// Dropout whose mask is a hash of (seed, element index) instead of a stream from a sequential generator.
//
// torch's CPU dropout draws one mt19937 number per element on one thread: on a QLoRA step it cost a quarter of the
// time. Here the keep decision for element i is fmix32(i * golden ^ key(seed, i >> 32)) >= p * 2^32, so any thread
// can decide any element, and the backward pass regenerates the same mask from the seed instead of storing it.
// The AVX-512 and portable paths compute the same hash, so they give the same mask.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FOURBIT_X86 1
#endif

namespace {

inline uint32_t fmix32(uint32_t h) {  // MurmurHash3's finalizer: every input bit flips each output bit ~half the time
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  h ^= h >> 16;
  return h;
}

inline uint32_t key_for(uint64_t seed, uint64_t i) {
  return fmix32(static_cast<uint32_t>(seed) ^ fmix32(static_cast<uint32_t>(seed >> 32) + static_cast<uint32_t>(i >> 32)));
}

inline uint32_t hash_at(uint32_t key, uint64_t i) {
  return fmix32((static_cast<uint32_t>(i) * 0x9e3779b1u) ^ key);
}

inline float to_float(float v) { return v; }
inline float to_float(at::BFloat16 v) { return static_cast<float>(v); }
inline float to_float(at::Half v) { return static_cast<float>(v); }
template <typename T> inline T from_float(float v) { return static_cast<T>(v); }

template <typename T, typename U>
void dropout_scalar(const T* x, U* y, int64_t i0, int64_t i1, uint64_t seed, uint32_t threshold, float scale) {
  uint64_t hi = ~uint64_t(0);
  uint32_t key = 0;
  for (int64_t i = i0; i < i1; ++i) {
    if ((static_cast<uint64_t>(i) >> 32) != hi) {
      hi = static_cast<uint64_t>(i) >> 32;
      key = key_for(seed, i);
    }
    y[i] = hash_at(key, i) >= threshold ? from_float<U>(to_float(x[i]) * scale) : from_float<U>(0.f);
  }
}

#ifdef FOURBIT_X86
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

AVX512 inline __m512i fmix32x16(__m512i h) {
  h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
  h = _mm512_mullo_epi32(h, _mm512_set1_epi32(static_cast<int>(0x85ebca6bu)));
  h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 13));
  h = _mm512_mullo_epi32(h, _mm512_set1_epi32(static_cast<int>(0xc2b2ae35u)));
  return _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
}

AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
AVX512 inline __m512 load16(const at::BFloat16* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
AVX512 inline __m512 load16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
AVX512 inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
AVX512 inline void store16(at::BFloat16* p, __m512 v) {  // round to nearest even, as the scalar cast does
  __m512i b = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  b = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(b));
}
AVX512 inline void store16(at::Half* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

template <typename T, typename U>
AVX512 void dropout_avx512(const T* x, U* y, int64_t i0, int64_t i1, uint64_t seed, uint32_t threshold, float scale) {
  const int64_t v0 = (i0 + 15) / 16 * 16;
  const int64_t v1 = i1 / 16 * 16;
  if (v0 >= v1) return dropout_scalar(x, y, i0, i1, seed, threshold, scale);
  dropout_scalar(x, y, i0, v0, seed, threshold, scale);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i golden = _mm512_set1_epi32(static_cast<int>(0x9e3779b1u));
  const __m512i thr = _mm512_set1_epi32(static_cast<int>(threshold));
  const __m512 s = _mm512_set1_ps(scale);
  uint64_t hi = ~uint64_t(0);
  __m512i key = _mm512_setzero_si512();
  for (int64_t i = v0; i < v1; i += 16) {  // 16-aligned groups never straddle a 2^32 boundary
    if ((static_cast<uint64_t>(i) >> 32) != hi) {
      hi = static_cast<uint64_t>(i) >> 32;
      key = _mm512_set1_epi32(static_cast<int>(key_for(seed, i)));
    }
    __m512i idx = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(i))), lane);
    __m512i h = fmix32x16(_mm512_xor_si512(_mm512_mullo_epi32(idx, golden), key));
    __mmask16 keep = _mm512_cmpge_epu32_mask(h, thr);
    store16(y + i, _mm512_maskz_mul_ps(keep, load16(x + i), s));
  }
  dropout_scalar(x, y, v1, i1, seed, threshold, scale);
}

bool has_avx512_dropout() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return ok;
}
#endif

template <typename T, typename U>
void dropout_dispatch(const T* x, U* y, int64_t n, uint64_t seed, uint32_t threshold, float scale) {
  at::parallel_for(0, n, 16384, [&](int64_t i0, int64_t i1) {
#ifdef FOURBIT_X86
    if (has_avx512_dropout()) return dropout_avx512(x, y, i0, i1, seed, threshold, scale);
#endif
    dropout_scalar(x, y, i0, i1, seed, threshold, scale);
  });
}

}  // namespace

template <typename T>
void dropout_to(const torch::Tensor& x, torch::Tensor& y, uint64_t seed, uint32_t threshold, float scale) {
  const T* xp = x.data_ptr<T>();
  const int64_t n = x.numel();
  switch (y.scalar_type()) {
    case at::kFloat: return dropout_dispatch(xp, y.data_ptr<float>(), n, seed, threshold, scale);
    case at::kBFloat16: return dropout_dispatch(xp, y.data_ptr<at::BFloat16>(), n, seed, threshold, scale);
    case at::kHalf: return dropout_dispatch(xp, y.data_ptr<at::Half>(), n, seed, threshold, scale);
    default: TORCH_CHECK(false, "hash_dropout writes float32, bfloat16 or float16, not ", y.scalar_type());
  }
}

// y = x * keep / (1 - p) elementwise, in `dtype` (a cast fused into the same pass), keep decided by
// (seed, flat index); the same call on the gradient is the backward pass.
torch::Tensor hash_dropout(torch::Tensor x, double p, int64_t seed, c10::optional<at::ScalarType> dtype) {
  TORCH_CHECK(x.device().is_cpu(), "hash_dropout runs on CPU tensors");
  TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout probability must be in [0, 1)");
  x = x.contiguous();
  auto y = torch::empty(x.sizes(), x.options().dtype(dtype.value_or(x.scalar_type())));
  const double t = p * 4294967296.0;
  const uint32_t threshold = t >= 4294967295.0 ? 0xffffffffu : static_cast<uint32_t>(t);
  const float scale = static_cast<float>(1.0 / (1.0 - p));
  const uint64_t s = static_cast<uint64_t>(seed);
  switch (x.scalar_type()) {
    case at::kFloat: dropout_to<float>(x, y, s, threshold, scale); break;
    case at::kBFloat16: dropout_to<at::BFloat16>(x, y, s, threshold, scale); break;
    case at::kHalf: dropout_to<at::Half>(x, y, s, threshold, scale); break;
    default: TORCH_CHECK(false, "hash_dropout takes float32, bfloat16 or float16, got ", x.scalar_type());
  }
  return y;
}
