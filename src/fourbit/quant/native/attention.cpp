// Attention for one decoding step (one query position per row), for fourbit.serve.llama_step.
//
// torch's scaled_dot_product_attention takes its flash-attention path on these CPUs, which is built for blocks of
// queries: at one query per row (8 rows, SmolLM2's 9 query heads over 3 key heads, about 100 keys) a call took
// 90-150 us, about 30% of a batch-8 decoding step, for a few hundred thousand multiply-adds. Here one task per (row,
// key head) scores the query heads sharing that key head against its keys, softmaxes and sums the values, in fp32
// (as the flash path computes), reading keys and values in the cache's dtype (bf16 or fp32).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FOURBIT_X86 1
#endif

namespace {

#ifdef FOURBIT_X86
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
AVX512 inline __m512 load16(const at::BFloat16* p) {  // bf16 is the high half of an fp32
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// e^x: x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor polynomial to r^6 (relative error below 2e-7), times 2^n
AVX512 inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));  // e^-104 is below the smallest fp32 denormal
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln2 in two parts (Cody-Waite)
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  for (const float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// one (row, key head): q [G][16*DV], keys and values [T] rows of 16*DV (row stride ld), mask[t * mask_step] added to
// the scores (null: none); out [G][16*DV]
template <int DV, typename T>
AVX512 void attend_group(const T* q, const T* keys, const T* values, int64_t ld, int64_t len, int64_t groups,
                         const T* mask, int64_t mask_step, float scale, T* out, std::vector<float>& scores) {
  constexpr int D = 16 * DV;
  scores.resize(groups * (len + 16));
  for (int64_t g = 0; g < groups; ++g) {
    __m512 qv[DV];
    for (int j = 0; j < DV; ++j) qv[j] = _mm512_mul_ps(load16(q + g * D + 16 * j), _mm512_set1_ps(scale));
    float* s = scores.data() + g * (len + 16);
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < len; ++t) {
      const T* k = keys + t * ld;
      __m512 acc = _mm512_mul_ps(qv[0], load16(k));
      for (int j = 1; j < DV; ++j) acc = _mm512_fmadd_ps(qv[j], load16(k + 16 * j), acc);
      float v = _mm512_reduce_add_ps(acc);
      if (mask) v += static_cast<float>(mask[t * mask_step]);
      s[t] = v;
      top = std::max(top, v);
    }
    __m512 acc[DV];
    for (int j = 0; j < DV; ++j) acc[j] = _mm512_setzero_ps();
    if (!(top > -std::numeric_limits<float>::infinity())) {  // every key hidden: nothing to attend to
      for (int j = 0; j < DV; ++j)
        for (int i = 0; i < 16; ++i) out[g * D + 16 * j + i] = static_cast<T>(0.0f);
      continue;
    }
    // weights e^(s - top), summed 16 at a time; the tail past len is padded with -inf, whose weight is 0
    for (int64_t t = len; t < ((len + 15) & ~int64_t{15}); ++t) s[t] = -std::numeric_limits<float>::infinity();
    __m512 total = _mm512_setzero_ps();
    for (int64_t t = 0; t < len; t += 16) {
      const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + t), _mm512_set1_ps(top)));
      _mm512_storeu_ps(s + t, e);
      total = _mm512_add_ps(total, e);
    }
    for (int64_t t = 0; t < len; ++t) {
      const __m512 w = _mm512_set1_ps(s[t]);
      const T* v = values + t * ld;
      for (int j = 0; j < DV; ++j) acc[j] = _mm512_fmadd_ps(w, load16(v + 16 * j), acc[j]);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
    for (int j = 0; j < DV; ++j) {
      alignas(64) float o[16];
      _mm512_store_ps(o, _mm512_mul_ps(acc[j], inv));
      for (int i = 0; i < 16; ++i) out[g * D + 16 * j + i] = static_cast<T>(o[i]);
    }
  }
}

bool cpu_ok() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return ok;
}
#endif

template <int DV, typename T>
void attend_all(const torch::Tensor& q, const torch::Tensor& keys, const torch::Tensor& values,
                const c10::optional<torch::Tensor>& mask, double scale, torch::Tensor& out) {
#ifdef FOURBIT_X86
  const int64_t B = q.size(0), KV = q.size(1), G = q.size(2), len = keys.size(2);
  const T* qp = q.data_ptr<T>();
  const T* kp = keys.data_ptr<T>();
  const T* vp = values.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const T* mp = mask ? mask->data_ptr<T>() : nullptr;
  const int64_t mask_row = mask ? (mask->size(0) == 1 ? 0 : mask->stride(0)) : 0;
  const int64_t mask_step = mask ? mask->stride(3) : 0;
  at::parallel_for(0, B * KV, 1, [&](int64_t a, int64_t b) {
    thread_local std::vector<float> scores;
    for (int64_t task = a; task < b; ++task) {
      const int64_t row = task / KV, head = task % KV;
      attend_group<DV, T>(qp + task * G * 16 * DV, kp + row * keys.stride(0) + head * keys.stride(1),
                          vp + row * values.stride(0) + head * values.stride(1), keys.stride(2), len, G,
                          mp ? mp + row * mask_row : nullptr, mask_step, static_cast<float>(scale),
                          op + task * G * 16 * DV, scores);
    }
  });
#endif
}

}  // namespace

bool decode_attention_ok() {
#ifdef FOURBIT_X86
  return cpu_ok();
#else
  return false;
#endif
}

// softmax(q k^T * scale + mask) v for q [B, KV, G, D] (the G query heads that share each key head), keys and values
// [B, KV, T, D] (rows of D contiguous, e.g. a view into a longer cache), mask additive [B or 1, 1, 1, T] or none;
// D 64 or 128, all one dtype (bf16 or fp32). Returns [B, KV, G, D].
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor keys, torch::Tensor values,
                               c10::optional<torch::Tensor> mask, double scale) {
  TORCH_CHECK(decode_attention_ok(), "decode_attention needs AVX-512");
  TORCH_CHECK(q.dim() == 4 && keys.dim() == 4 && values.dim() == 4, "decode_attention takes 4-D q, keys, values");
  const int64_t D = q.size(3);
  TORCH_CHECK(D == 64 || D == 128, "decode_attention takes head_dim 64 or 128, got ", D);
  TORCH_CHECK(keys.sizes() == values.sizes() && keys.size(0) == q.size(0) && keys.size(1) == q.size(1) &&
                  keys.size(3) == D && keys.stride(3) == 1 && values.stride(3) == 1 &&
                  keys.strides() == values.strides(),
              "decode_attention: keys and values [B, KV, T, D] with contiguous rows, q [B, KV, G, D]");
  TORCH_CHECK(q.scalar_type() == keys.scalar_type() && q.scalar_type() == values.scalar_type() &&
                  (q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kFloat),
              "decode_attention takes bf16 or fp32, one dtype for all");
  if (mask) {
    TORCH_CHECK(mask->dim() == 4 && mask->size(3) == keys.size(2) && mask->size(1) == 1 && mask->size(2) == 1 &&
                    (mask->size(0) == 1 || mask->size(0) == q.size(0)) && mask->scalar_type() == q.scalar_type(),
                "decode_attention: an additive mask [B or 1, 1, 1, T] in q's dtype");
  }
  q = q.contiguous();
  auto out = torch::empty(q.sizes(), q.options());
  if (q.numel() == 0) return out;
  TORCH_CHECK(keys.size(2) > 0, "decode_attention needs at least one key");
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  if (D == 64)
    bf16 ? attend_all<4, at::BFloat16>(q, keys, values, mask, scale, out) : attend_all<4, float>(q, keys, values, mask, scale, out);
  else
    bf16 ? attend_all<8, at::BFloat16>(q, keys, values, mask, scale, out) : attend_all<8, float>(q, keys, values, mask, scale, out);
  return out;
}
