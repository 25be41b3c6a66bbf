// Fused window attention with a relative position bias, for CPU inference (float32, AVX2 + FMA):
//   out = softmax(scale * q k^T + B) v,  B[h, i, j] = table[h, kh - qh + w - 1, kw - qw + w - 1]
// where query i sits at (qh, qw) = (i / query_cols, i % query_cols) of a w x w window and key j
// at (kh, kw) = (j / w, j % w) (every key of the window). Head dims 8, 16, 24 or 32; w a
// multiple of 8 (so w * w is a multiple of 16 and no run of 8 keys crosses a key row).
// PyTorch's SDPA spends most of its time here in tiny GEMM calls and online-softmax
// bookkeeping, and reads a dense (heads, w^2, w^2) bias from memory for every window; this
// reads B straight from the (2w-1)^2 table, which stays in L1. One (window, head) pair at a
// time per thread: K goes into panels and V is packed (L2-sized buffers), then blocks of R
// query rows compute their scores, an exact row softmax and the weighted sum of V.
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <vector>

namespace {

// exp(x) for x <= 0 (the row maximum is subtracted first). Range reduction x = n ln2 + r with
// ln2 split in two parts, a degree-6 minimax polynomial for exp(r) on |r| <= ln2 / 2 (the
// classical single-precision coefficients, ~1 ulp), then 2^n through the exponent bits.
// Inputs below -87 give exp(-87) ~ 1.6e-38 instead of 0: nothing a softmax sum can see.
inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// R query rows (pre-scaled, each element broadcast to a vector: q[r * C + d]) against the w * w
// keys: scores plus bias into s (R rows of stride ss), then each row becomes exp(s - max) and
// its sum. bias[r] points at table[h, w - 1 - qh, w - 1 - qw] for row r: key (kh, kw) adds
// bias[r][kh * (2w - 1) + kw], contiguous along kw. Keys come in panels of 16: kp[j / 16][d][j % 16].
template <int R, int C>
inline void scores_softmax(const __m256* q, const float* kp, int64_t w, const float* const* bias, float* s,
                           int64_t ss, float* row_sum) {
  const int64_t nk = w * w;
  __m256 mx[R];
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r) mx[r] = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  // b: table offset of key j's run of 8 (w % 8 == 0, so a run never crosses a key row)
  int64_t b = 0, kw = 0;
  auto next_run = [&]() {
    b += 8;
    kw += 8;
    if (kw == w) {  // next key row: on to its run of the table
      kw = 0;
      b += w - 1;
    }
  };
  for (int64_t j = 0; j < nk; j += 16) {
    const int64_t b0 = b;
    next_run();
    const int64_t b1 = b;
    next_run();
    __m256 a0[R], a1[R];
#pragma GCC unroll 32
    for (int r = 0; r < R; ++r) {
      a0[r] = _mm256_loadu_ps(bias[r] + b0);
      a1[r] = _mm256_loadu_ps(bias[r] + b1);
    }
#pragma GCC unroll 32
    for (int d = 0; d < C; ++d) {
      const __m256 k0 = _mm256_load_ps(kp + j * C + d * 16);
      const __m256 k1 = _mm256_load_ps(kp + j * C + d * 16 + 8);
#pragma GCC unroll 32
      for (int r = 0; r < R; ++r) {
        const __m256 qd = _mm256_load_ps(reinterpret_cast<const float*>(q + r * C + d));
        a0[r] = _mm256_fmadd_ps(qd, k0, a0[r]);
        a1[r] = _mm256_fmadd_ps(qd, k1, a1[r]);
      }
    }
#pragma GCC unroll 32
    for (int r = 0; r < R; ++r) {
      _mm256_store_ps(s + r * ss + j, a0[r]);
      _mm256_store_ps(s + r * ss + j + 8, a1[r]);
      mx[r] = _mm256_max_ps(mx[r], _mm256_max_ps(a0[r], a1[r]));
    }
  }
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r) {
    const __m256 m = _mm256_set1_ps(hmax(mx[r]));
    float* row = s + r * ss;
    __m256 sum = _mm256_setzero_ps();
    for (int64_t j = 0; j < nk; j += 8) {
      const __m256 p = exp_nonpositive(_mm256_sub_ps(_mm256_load_ps(row + j), m));
      _mm256_store_ps(row + j, p);
      sum = _mm256_add_ps(sum, p);
    }
    row_sum[r] = hsum(sum);
  }
}

// out row r (stride os between rows) = sum_j p[r, j] v[j, :] / row_sum[r]; v packed nk x C.
template <int R, int C>
inline void weighted_values(const float* p, int64_t ss, int64_t nk, const float* v, const float* row_sum, float* out,
                            int64_t os) {
  constexpr int NV = C / 8;
  __m256 acc[R][NV];
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 32
    for (int t = 0; t < NV; ++t) acc[r][t] = _mm256_setzero_ps();
  for (int64_t j = 0; j < nk; ++j) {
    __m256 vj[NV];
#pragma GCC unroll 32
    for (int t = 0; t < NV; ++t) vj[t] = _mm256_load_ps(v + j * C + 8 * t);
#pragma GCC unroll 32
    for (int r = 0; r < R; ++r) {
      const __m256 pj = _mm256_broadcast_ss(p + r * ss + j);
#pragma GCC unroll 32
      for (int t = 0; t < NV; ++t) acc[r][t] = _mm256_fmadd_ps(pj, vj[t], acc[r][t]);
    }
  }
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r) {
    const __m256 inv = _mm256_set1_ps(1.0f / row_sum[r]);
#pragma GCC unroll 32
    for (int t = 0; t < NV; ++t) _mm256_storeu_ps(out + r * os + 8 * t, _mm256_mul_ps(acc[r][t], inv));
  }
}

template <int R, int C>
inline void row_block(const float* q, int64_t qs, float scale, const float* kp, const float* v, int64_t w,
                      const float* const* bias, float* out, int64_t os, __m256* qbuf, float* s, int64_t ss) {
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 32
    for (int d = 0; d < C; ++d) qbuf[r * C + d] = _mm256_set1_ps(q[r * qs + d] * scale);
  float row_sum[R];
  scores_softmax<R, C>(qbuf, kp, w, bias, s, ss, row_sum);
  weighted_values<R, C>(s, ss, w * w, v, row_sum, out, os);
}

// Element offsets of every flattened leading index (all dims but the last three).
std::vector<int64_t> leading_offsets(const at::Tensor& t) {
  const int64_t lead = t.dim() - 3;
  std::vector<int64_t> offsets(1, 0);
  for (int64_t d = 0; d < lead; ++d) {
    std::vector<int64_t> next;
    next.reserve(offsets.size() * t.size(d));
    for (int64_t base : offsets)
      for (int64_t i = 0; i < t.size(d); ++i) next.push_back(base + i * t.stride(d));
    offsets.swap(next);
  }
  return offsets;
}

// query rows per block: 4 x 2 score accumulators, 2 key vectors and a query fit the 16 ymm
// registers (5 or 6 rows measured the same; 8 spill and were ~20% slower)
constexpr int kRows = 4;

template <int C>
void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& table, int64_t w,
         int64_t query_cols, double scale, at::Tensor& out) {
  const int64_t heads = q.size(-3), nq = q.size(-2), nk = w * w, side = 2 * w - 1;
  const auto oq = leading_offsets(q), ok = leading_offsets(k), ov = leading_offsets(v), oo = leading_offsets(out);
  const float* qp = q.data_ptr<float>();
  const float* kd = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const float* tp = table.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  const int64_t pairs = static_cast<int64_t>(oq.size()) * heads;
  const int64_t ss = nk + 16;  // score rows padded off a multiple of 4 KiB (L1 set aliasing)
  // strides (elements) of the head and token dims, read once: Tensor::stride() is a call
  const int64_t qh = q.stride(-3), qs = q.stride(-2), kh = k.stride(-3), ks = k.stride(-2);
  const int64_t vh = v.stride(-3), vs = v.stride(-2), oh = out.stride(-3), os = out.stride(-2);
  auto work = [&](int64_t begin, int64_t end) {
    // 32-byte aligned scratch: key panels (nk x C), packed V (nk x C), scores, broadcast q
    std::vector<__m256> buf((2 * C * nk + kRows * ss) / 8 + kRows * C);
    float* kpan = reinterpret_cast<float*>(buf.data());
    float* vb = kpan + C * nk;
    float* s = vb + C * nk;
    __m256* qbuf = reinterpret_cast<__m256*>(s + kRows * ss);
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t g = pair / heads, h = pair % heads;
      const float* kg = kd + ok[g] + h * kh;
      const float* vg = vp + ov[g] + h * vh;
      for (int64_t j = 0; j < nk; j += 16)
        for (int64_t jj = 0; jj < 16; ++jj)
#pragma GCC unroll 32
          for (int d = 0; d < C; ++d) {
            kpan[j * C + d * 16 + jj] = kg[(j + jj) * ks + d];
            vb[(j + jj) * C + d] = vg[(j + jj) * vs + d];
          }
      const float* qg = qp + oq[g] + h * qh;
      const float* th = tp + h * side * side;
      float* og = op + oo[g] + h * oh;
      const float* bias[kRows];
      auto bias_rows = [&](int64_t i, int rows) {
        for (int r = 0; r < rows; ++r)
          bias[r] = th + (w - 1 - (i + r) / query_cols) * side + (w - 1 - (i + r) % query_cols);
      };
      int64_t i = 0;
      for (; i + kRows <= nq; i += kRows) {
        bias_rows(i, kRows);
        row_block<kRows, C>(qg + i * qs, qs, sc, kpan, vb, w, bias, og + i * os, os, qbuf, s, ss);
      }
      for (; i < nq; ++i) {
        bias_rows(i, 1);
        row_block<1, C>(qg + i * qs, qs, sc, kpan, vb, w, bias, og + i * os, os, qbuf, s, ss);
      }
    }
  };
  // PyTorch's own intra-op pool (built with -fopenmp, this library shares torch's OpenMP
  // runtime): no second set of threads competing with the pool's spinning workers
  at::parallel_for(0, pairs, 1, work);
}

void window_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& table,
                      int64_t window_size, int64_t query_cols, double scale, at::Tensor out) {
  TORCH_CHECK(q.dim() >= 3 && k.dim() == q.dim() && v.dim() == q.dim() && out.dim() == q.dim(),
              "window_attention: q, k, v and out must have the same rank (>= 3)");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&q, &k, &v, &table, &out}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat, "window_attention: float32 CPU tensors only");
    TORCH_CHECK(t->stride(-1) == 1, "window_attention: the last dim must be contiguous");
  }
  const int64_t w = window_size, c = q.size(-1), heads = q.size(-3);
  TORCH_CHECK(w > 0 && w % 8 == 0, "window_attention: the window size must be a multiple of 8, got ", w);
  TORCH_CHECK(k.sizes() == v.sizes() && q.sizes().slice(0, q.dim() - 2) == k.sizes().slice(0, k.dim() - 2)
                  && k.size(-2) == w * w && k.size(-1) == c && out.sizes() == q.sizes(),
              "window_attention: q, k, v and out must be (..., heads, tokens, head_dim), k and v with w * w tokens");
  TORCH_CHECK(query_cols > 0 && query_cols <= w && q.size(-2) <= query_cols * w,
              "window_attention: the queries must fit query_cols (", query_cols, ") columns of the window");
  TORCH_CHECK(table.dim() == 3 && table.size(0) == heads && table.size(1) == 2 * w - 1 && table.size(2) == 2 * w - 1
                  && table.is_contiguous(),
              "window_attention: table must be a contiguous (heads, 2w - 1, 2w - 1) tensor");
  switch (c) {
    case 8: run<8>(q, k, v, table, w, query_cols, scale, out); break;
    case 16: run<16>(q, k, v, table, w, query_cols, scale, out); break;
    case 24: run<24>(q, k, v, table, w, query_cols, scale, out); break;
    case 32: run<32>(q, k, v, table, w, query_cols, scale, out); break;
    default: TORCH_CHECK(false, "window_attention: head dim must be 8, 16, 24 or 32, got ", c);
  }
}

}  // namespace

TORCH_LIBRARY(esc_arch, m) {
  m.def("window_attention(Tensor q, Tensor k, Tensor v, Tensor table, int window_size, int query_cols, float scale, "
        "Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(esc_arch, CPU, m) {
  m.impl("window_attention", &window_attention);
}
