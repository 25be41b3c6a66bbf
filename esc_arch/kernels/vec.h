// Vector helpers shared by the CPU kernels: one struct per vector width with the operations the
// kernels use (F8: AVX2 + FMA, 8 floats; F16: AVX-512F, 16 floats, only where the compiler is
// given -mavx512f; Wide is the widest the build has), a vectorised 2^t for non-positive t and
// the exact (erf) GELU.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace esc_arch_vec {

// 8 floats (AVX2 + FMA)
struct F8 {
  using T = __m256;
  static constexpr int n = 8;
  static T load(const float* p) { return _mm256_load_ps(p); }
  static T loadu(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, T v) { _mm256_store_ps(p, v); }
  static void storeu(float* p, T v) { _mm256_storeu_ps(p, v); }
  static T set1(float x) { return _mm256_set1_ps(x); }
  static T zero() { return _mm256_setzero_ps(); }
  static T add(T a, T b) { return _mm256_add_ps(a, b); }
  static T sub(T a, T b) { return _mm256_sub_ps(a, b); }
  static T mul(T a, T b) { return _mm256_mul_ps(a, b); }
  static T max(T a, T b) { return _mm256_max_ps(a, b); }
  static T min(T a, T b) { return _mm256_min_ps(a, b); }
  // v where x >= t (or x is NaN), else 0
  static T zero_below(T x, float t, T v) { return _mm256_and_ps(_mm256_cmp_ps(x, _mm256_set1_ps(t), _CMP_NLT_UQ), v); }
  static T fmadd(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static constexpr bool any_exponent = false;  // 2^n is built in the exponent bits: n in [-126, 127]
  // 2^n from r = n + kPow2Shift (n an integer in [-126, 127]): r's low mantissa bits hold n + 127
  static T pow2_of_shifted(T r) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(r), 23)); }
  static float hmax(T v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
  }
  static float hsum(T v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // (a0, a0, a1, a1, ..) from the first / second half of v: one real per (re, im) pair
  static T pairs_low(T v) { return _mm256_permutevar8x32_ps(v, _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3)); }
  static T pairs_high(T v) { return _mm256_permutevar8x32_ps(v, _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7)); }
  static T reciprocal(T x) { return _mm256_div_ps(_mm256_set1_ps(1.0f), x); }
  // the bias of n consecutive keys: one run of 8 starting at row[run[0]]
  static T bias(const float* row, const int64_t* run) { return _mm256_loadu_ps(row + run[0]); }
};

#if defined(__AVX512F__)
// 16 floats (AVX-512F)
struct F16 {
  using T = __m512;
  static constexpr int n = 16;
  static T load(const float* p) { return _mm512_load_ps(p); }
  static T loadu(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, T v) { _mm512_store_ps(p, v); }
  static void storeu(float* p, T v) { _mm512_storeu_ps(p, v); }
  static T set1(float x) { return _mm512_set1_ps(x); }
  static T zero() { return _mm512_setzero_ps(); }
  static T add(T a, T b) { return _mm512_add_ps(a, b); }
  static T sub(T a, T b) { return _mm512_sub_ps(a, b); }
  static T mul(T a, T b) { return _mm512_mul_ps(a, b); }
  static T max(T a, T b) { return _mm512_max_ps(a, b); }
  static T min(T a, T b) { return _mm512_min_ps(a, b); }
  // v where x >= t (or x is NaN), else 0
  static T zero_below(T x, float t, T v) {
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(t), _CMP_NLT_UQ), v);
  }
  static T fmadd(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static T round(T x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static constexpr bool any_exponent = true;  // scalef: any integral n, 0 below the float range
  static T times_pow2(T p, T n) { return _mm512_scalef_ps(p, n); }
  static float hmax(T v) { return _mm512_reduce_max_ps(v); }
  static float hsum(T v) { return _mm512_reduce_add_ps(v); }
  static T pairs_low(T v) {
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7), v);
  }
  static T pairs_high(T v) {
    return _mm512_permutexvar_ps(_mm512_setr_epi32(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15), v);
  }
  static T reciprocal(T x) {  // 14-bit estimate and one Newton step (~2^-27 relative), 2x faster than a divide
    const __m512 r = _mm512_rcp14_ps(x);
    return _mm512_fmadd_ps(r, _mm512_fnmadd_ps(x, r, _mm512_set1_ps(1.0f)), r);
  }
  // two runs of 8 keys; within one key row (w % 16 == 0) they are adjacent in the table
  static T bias(const float* row, const int64_t* run) {
    if (run[1] == run[0] + 8) return _mm512_loadu_ps(row + run[0]);
    const __m512 lo = _mm512_castps256_ps512(_mm256_loadu_ps(row + run[0]));
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(lo), _mm256_castps_pd(_mm256_loadu_ps(row + run[1])), 1));
  }
};
using Wide = F16;
#else
using Wide = F8;
#endif

// 1.5 * 2^23 + 127: adding it to a float t in [-2^22, 2^22] rounds t to the nearest integer n
// (ties to even) and leaves n + 127 in the sum's low mantissa bits
constexpr float kPow2Shift = 12583039.0f;

// 2^t for finite t <= 0 (the softmax's exponents), the caller computing t = x log2(e) (fused
// with its shift: one FMA): 2^n 2^f, n = round(t), 2^f by a degree-5 minimax polynomial on
// |f| <= 1/2 (<= 2.4e-7 relative in float32; the degree-6 Taylor polynomial's ~1e-7 cost one more
// FMA: 3-4% of the attention kernel). t itself carries the rounding of the product, ~|t| 6e-8
// relative to the result: ~1e-7 where softmax weights matter (t near 0), more where they are
// negligible (2^-20 and below at |t| > 20). Far below the float range the result is 0 (AVX-512's
// scalef takes any n) or 2^-126 ~ 1.2e-38 (AVX2 builds 2^n in the exponent bits, so t is clamped
// at -126 first); a NaN stays NaN. AVX2 rounds by adding and subtracting kPow2Shift and shifts the
// sum's bits into 2^n: 4 single-uop instructions where vroundps (2 uops on Intel), a conversion,
// an integer add and the shift took 5 (attention kernel 137 -> 131 ms, AVX2 build on the Xeon).
template <class F>
inline typename F::T exp2_nonpositive(typename F::T t) {
  typename F::T n, shifted;
  if constexpr (F::any_exponent) {
    n = F::round(t);
  } else {
    t = F::max(F::set1(-126.0f), t);  // max(a, b) is b if either is NaN
    shifted = F::add(t, F::set1(kPow2Shift));
    n = F::sub(shifted, F::set1(kPow2Shift));
  }
  const auto f = F::sub(t, n);
  auto p = F::set1(1.3276471736871657e-3f);  // minimax (Lawson) fit of the relative error
  p = F::fmadd(p, f, F::set1(9.675541540082577e-3f));
  p = F::fmadd(p, f, F::set1(5.550713276094744e-2f));
  p = F::fmadd(p, f, F::set1(2.4022119720074606e-1f));
  p = F::fmadd(p, f, F::set1(6.93146967062042e-1f));
  p = F::fmadd(p, f, F::set1(1.000000071655432f));
  if constexpr (F::any_exponent) return F::times_pow2(p, n);
  else return F::mul(p, F::pow2_of_shifted(shifted));
}

// Exact (erf) GELU, x / 2 (1 + erf(x / sqrt 2)), with erf(z) = z P(z^2) / Q(z^2) for |z| <= 3.925
// (a rational minimax fit, degrees 6 and 4 in z^2, absolute error 5e-8 in exact arithmetic; beyond
// 3.925 erf is +-1 in float32, so z is clamped there, and below x = -5.55 (GELU > -8e-8) the result
// is 0: 1 + erf would otherwise keep float32's last bit of erf, ~6e-8 |x|). In float32 within
// 2.2e-7 max(1, |x|) of the float64 GELU (Abramowitz & Stegun 7.1.26 with exp(-z^2), the previous
// form: 1.7e-7; this one is 23 vector operations instead of 28). A NaN stays NaN. gelu_n takes
// K vectors at once, each step on all K before the next: K independent dependency chains side by
// side, where one GELU alone is a chain of ~20 dependent operations that leaves the FMA units
// idle (ConvFFN's depthwise + GELU pass, 4 pixels at a time; see conv_ffn_cpu.cpp).
template <class F, int K>
inline void gelu_n(typename F::T* x) {
  using T = typename F::T;
  static constexpr float pc[7] = {1.984935735789547e-08f, -1.994187382038226e-06f, 0.0001497056028970281f,
                                  0.004007483303201904f,  0.05150973516756912f,   0.2069487256017648f,
                                  1.1283787965223582f};
  static constexpr float qc[5] = {0.001032135924196817f, 0.014960954703930659f, 0.1179108125353598f,
                                  0.5167323764514825f,   1.0f};
  T z[K], w[K], p[K], q[K];
#pragma GCC unroll 8
  for (int i = 0; i < K; ++i) {
    z[i] = F::min(F::max(F::mul(x[i], F::set1(0.70710678118654752f)), F::set1(-3.925f)), F::set1(3.925f));
    w[i] = F::mul(z[i], z[i]);
    p[i] = F::set1(pc[0]);
    q[i] = F::set1(qc[0]);
  }
#pragma GCC unroll 8
  for (int c = 1; c < 7; ++c)
#pragma GCC unroll 8
    for (int i = 0; i < K; ++i) {
      p[i] = F::fmadd(p[i], w[i], F::set1(pc[c]));
      if (c < 5) q[i] = F::fmadd(q[i], w[i], F::set1(qc[c]));
    }
#pragma GCC unroll 8
  for (int i = 0; i < K; ++i) {
    const T erf = F::mul(F::mul(z[i], p[i]), F::reciprocal(q[i]));
    const T half = F::mul(F::set1(0.5f), x[i]);
    x[i] = F::zero_below(x[i], -5.55f, F::fmadd(half, erf, half));
  }
}

template <class F>
inline typename F::T gelu(typename F::T x) {
  gelu_n<F, 1>(&x);
  return x;
}

}  // namespace esc_arch_vec
