// Fused window attention with a relative position bias, for CPU inference (float32):
//   out = softmax(scale * q k^T + B) v,  B[h, i, j] = table[h, kh - qh + w - 1, kw - qw + w - 1]
// where query i sits at (qh, qw) = (i / query_cols, i % query_cols) of a w x w window and key j
// at (kh, kw) = (j / w, j % w) (every key of the window). Head dims 8, 16, 24 or 32; w a
// multiple of 8 (so w * w is a multiple of 64 and no run of 8 keys crosses a key row).
// PyTorch's SDPA spends most of its time here in tiny GEMM calls and online-softmax
// bookkeeping, and reads a dense (heads, w^2, w^2) bias from memory for every window; this
// reads B straight from the (2w-1)^2 table, which stays in L1. One (window, head) pair at a
// time per thread: K goes into panels and V is packed (L2-sized buffers), then blocks of R
// query rows compute their scores, an exact row softmax and the weighted sum of V.
// One source, two builds (esc_arch/kernels/__init__.py picks by CPU): AVX2 + FMA (8 floats per
// vector, 16 registers) and, where the compiler is given -mavx512f, AVX-512 (16 floats, 32
// registers); the algorithm is the same, only the vector type and the block sizes change.
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <type_traits>
#include <vector>

#include "gemm.h"
#include "vec.h"

namespace {

using namespace esc_arch_vec;

// scores and softmax in Wide vectors; V rows too where the head dim is a multiple of their width
#if defined(__AVX512F__)
constexpr int kRows = 8;  // query rows per block: 8 x 2 score accumulators + 8 maxima fit 32 registers
#else
// query rows per block: 4 x 2 score accumulators, 4 maxima and 2 key vectors fit the 16 ymm
// registers (5 or 6 rows measured the same; 8 spill and were ~20% slower)
constexpr int kRows = 4;
#endif

// R query rows q (pre-scaled, R x C floats) against the w * w keys: scores plus bias into s
// (R rows of stride ss), then each row becomes exp(s - max) and its sum. bias[r] points at
// table[h, w - 1 - qh, w - 1 - qw] for row r: key (kh, kw) adds bias[r][kh * (2w - 1) + kw],
// contiguous along kw. Keys come in panels of P = 2n: kp[j / P][d][j % P].
template <class F, int R, int C>
inline void scores_softmax(const float* q, const float* kp, int64_t w, const float* const* bias, float* s,
                           int64_t ss, float* row_sum) {
  using T = typename F::T;
  constexpr int N = F::n, P = 2 * N, RUNS = N / 8;
  const int64_t nk = w * w;
  T mx[R];
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r) mx[r] = F::set1(-std::numeric_limits<float>::infinity());
  // table offsets of the runs of 8 keys (w % 8 == 0, so a run never crosses a key row)
  int64_t b = 0, kw = 0;
  auto next_run = [&]() {
    const int64_t at = b;
    b += 8;
    kw += 8;
    if (kw == w) {  // next key row: on to its run of the table
      kw = 0;
      b += w - 1;
    }
    return at;
  };
  for (int64_t j = 0; j < nk; j += P) {
    int64_t run0[RUNS], run1[RUNS];
    for (int t = 0; t < RUNS; ++t) run0[t] = next_run();
    for (int t = 0; t < RUNS; ++t) run1[t] = next_run();
    T a0[R], a1[R];
#pragma GCC unroll 32
    for (int r = 0; r < R; ++r) {
      a0[r] = F::bias(bias[r], run0);
      a1[r] = F::bias(bias[r], run1);
    }
#pragma GCC unroll 32
    for (int d = 0; d < C; ++d) {
      const T k0 = F::load(kp + j * C + d * P);
      const T k1 = F::load(kp + j * C + d * P + N);
#pragma GCC unroll 32
      for (int r = 0; r < R; ++r) {
        const T qd = F::set1(q[r * C + d]);
        a0[r] = F::fmadd(qd, k0, a0[r]);
        a1[r] = F::fmadd(qd, k1, a1[r]);
      }
    }
#pragma GCC unroll 32
    for (int r = 0; r < R; ++r) {
      F::store(s + r * ss + j, a0[r]);
      F::store(s + r * ss + j + N, a1[r]);
      mx[r] = F::max(mx[r], F::max(a0[r], a1[r]));
    }
  }
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r) {
    const T log2e = F::set1(1.44269504088896341f), shift = F::set1(-F::hmax(mx[r]) * 1.44269504088896341f);
    float* row = s + r * ss;
    T sum = F::zero();
    for (int64_t j = 0; j < nk; j += N) {
      const T p = exp2_nonpositive<F>(F::fmadd(F::load(row + j), log2e, shift));  // exp(s - max)
      F::store(row + j, p);
      sum = F::add(sum, p);
    }
    row_sum[r] = F::hsum(sum);
  }
}

// V rows in the widest vectors that divide the head dim
template <int C>
using ValueVec = typename std::conditional<C % Wide::n == 0, Wide, F8>::type;

template <int R, int C>
inline void row_block(const float* q, int64_t qs, float scale, const float* kp, const float* v, int64_t w,
                      const float* const* bias, float* out, int64_t os, float* qbuf, float* s, int64_t ss) {
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 32
    for (int d = 0; d < C; ++d) qbuf[r * C + d] = q[r * qs + d] * scale;
  float row_sum[R];
  scores_softmax<Wide, R, C>(qbuf, kp, w, bias, s, ss, row_sum);
  float inv[R];
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r) inv[r] = 1.0f / row_sum[r];
  // out row r (stride os) = sum_j p[r, j] v[j, :] / row_sum[r]; v packed nk x C
  using FV = ValueVec<C>;
  gemm_tile<FV, R, C / FV::n>(s, ss, v, C, w * w, nullptr, out, os, inv);
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
    // vector-aligned scratch: key panels (nk x C), packed V (nk x C), scores, scaled q
    constexpr int64_t P = 2 * Wide::n;  // keys per panel
    std::vector<Wide::T> buf((2 * C * nk + kRows * ss + kRows * C) / Wide::n + 1);
    float* kpan = reinterpret_cast<float*>(buf.data());
    float* vb = kpan + C * nk;
    float* s = vb + C * nk;
    float* qbuf = s + kRows * ss;
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t g = pair / heads, h = pair % heads;
      const float* kg = kd + ok[g] + h * kh;
      const float* vg = vp + ov[g] + h * vh;
      for (int64_t j = 0; j < nk; j += P)
        for (int64_t jj = 0; jj < P; ++jj)
#pragma GCC unroll 32
          for (int d = 0; d < C; ++d) {
            kpan[j * C + d * P + jj] = kg[(j + jj) * ks + d];
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
