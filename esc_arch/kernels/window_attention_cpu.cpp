// Fused window attention with a relative position bias, for CPU inference (float32), read and
// written in image layout: q, k, v, out are (batch, H, W, heads, head_dim). The image is cut
// into w x w windows after padding its bottom/right to whole windows; rows[p] / cols[p] name the
// image row / column a padded position shows (the caller's padding, e.g. a reflection), so the
// padded keys are read from the image and no padded copy or window gather exists. For every
// pixel (a query) of a window, with (qh, qw) its place in the window:
//   out = softmax(scale * q k^T + B) v,  B[h, q, key] = table[h, kh - qh + w - 1, kw - qw + w - 1]
// over the window's w * w keys (kh, kw), or, given a dense (heads, w^2, w^2) bias instead of the
// table (FlashBias models, whose bias is no table), B[h, q, key] = bias[h, qh * w + qw, kh * w + kw].
// Only pixels inside the image are queries and only they are written. Head dims 8, 16, 24 or 32;
// w a multiple of 8 (no run of 8 keys crosses a key row).
// PyTorch's SDPA spends most of its time here in tiny GEMM calls and online-softmax
// bookkeeping, and reads a dense (heads, w^2, w^2) bias from memory for every window; this
// reads B straight from the (2w-1)^2 table, which stays in L1. One (window, head) pair at a
// time per thread: K goes into panels and V is packed (L2-sized buffers), then blocks of R
// queries (adjacent pixels of one row) compute their scores, an exact row softmax and the
// weighted sum of V.
// One source, two builds (esc_arch/kernels/__init__.py picks by CPU): AVX2 + FMA (8 floats per
// vector, 16 registers) and, where the compiler is given -mavx512f, AVX-512 (16 floats, 32
// registers); the algorithm is the same, only the vector type and the block sizes change.
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <type_traits>
#include <vector>

#include "gemm.h"
#include "parallel.h"
#include "vec.h"

namespace {

using namespace esc_arch_vec;

// scores and softmax in Wide vectors; V rows too where the head dim is a multiple of their width
// Query rows per block, and per block of a row's last queries where a row is not a whole number
// of blocks (e.g. AVX2's 32 = 4 x 6 + 2 x 4). The AVX2 build has two shapes and picks one by CPU.
template <int Rows, int Tail>
struct Blocks {
  static constexpr int rows = Rows, tail = Tail;
};
#if defined(__AVX512F__)
using Blocks8 = Blocks<8, 8>;  // 8 x 2 score accumulators + 8 maxima fit 32 registers
#else
// 6 x 2 score accumulators + 2 key vectors + a broadcast fit the 16 ymm registers, the 6 maxima
// spill (updated once per 16 keys): AVX2 build on the Xeon 145 ms with 4 rows, 137 ms with 6
// (5: 141, 7: 156, 8: 157 ms); the maxima in a pass of their own instead: 146 ms. On an AMD EPYC
// (Zen 3) 4 rows, all in registers, are faster: 118.6-121.2 ms against 123.3-127.2 ms with 6
// (ESC's layer at 180x320, 2 threads, medians of 5, alternating, 8 rounds; 5 rows: 117-118 vs 115 ms
// with 4 in an earlier run)
using Blocks4 = Blocks<4, 4>;
using Blocks6 = Blocks<6, 4>;
#endif

// R query rows q (pre-scaled, R x C floats) against the w * w keys: scores plus bias into s
// (R rows of stride ss), then each row becomes exp(s - max) and its sum. bias[r] points at
// table[h, w - 1 - qh, w - 1 - qw] for row r: key (kh, kw) adds bias[r][kh * (2w - 1) + kw],
// contiguous along kw, a key row's bias gap = w - 1 floats after the last one's; or (gap 0) at
// row qh * w + qw of a dense bias. Keys come in panels of P = 2n: kp[j / P][d][j % P].
template <class F, int R, int C>
inline void scores_softmax(const float* q, const float* kp, int64_t w, int64_t gap, const float* const* bias,
                           float* s, int64_t ss, float* row_sum) {
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
      b += gap;
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

// out row r (stride os) = inv[r] sum_j p[r, j] v[j, :] for V rows of one vector (v packed nk x F::n,
// nk even): even and odd keys go to separate accumulators, 2R independent FMA chains instead of R
// (the kernel on ESC's layer, AVX-512, head dim 16, medians of 15 alternating: 81.2-83.9 -> 79.1-79.8 ms)
template <class F, int R>
inline void weighted_sum_one_vector(const float* p, int64_t ps, const float* v, int64_t nk, float* out, int64_t os,
                                    const float* inv) {
  using T = typename F::T;
  T even[R], odd[R];
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r) even[r] = odd[r] = F::zero();
  for (int64_t j = 0; j < nk; j += 2) {
    const T v0 = F::load(v + j * F::n), v1 = F::load(v + (j + 1) * F::n);
#pragma GCC unroll 32
    for (int r = 0; r < R; ++r) {
      even[r] = F::fmadd(F::set1(p[r * ps + j]), v0, even[r]);
      odd[r] = F::fmadd(F::set1(p[r * ps + j + 1]), v1, odd[r]);
    }
  }
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r) F::storeu(out + r * os, F::mul(F::add(even[r], odd[r]), F::set1(inv[r])));
}

template <int R, int C>
inline void row_block(const float* q, int64_t qs, float scale, const float* kp, const float* v, int64_t w,
                      int64_t gap, const float* const* bias, float* out, int64_t os, float* qbuf, float* s,
                      int64_t ss) {
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 32
    for (int d = 0; d < C; ++d) qbuf[r * C + d] = q[r * qs + d] * scale;
  float row_sum[R];
  scores_softmax<Wide, R, C>(qbuf, kp, w, gap, bias, s, ss, row_sum);
  float inv[R];
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r) inv[r] = 1.0f / row_sum[r];
  // out row r (stride os) = sum_j p[r, j] v[j, :] / row_sum[r]; v packed nk x C
  using FV = ValueVec<C>;
  if constexpr (C == FV::n)
    weighted_sum_one_vector<FV, R>(s, ss, v, w * w, out, os, inv);
  else
    gemm_tile<FV, R, C / FV::n>(s, ss, v, C, w * w, nullptr, out, os, inv);
}

// The most blocks of B::rows queries that leave a multiple of B::tail of a row's n queries, or -1
// where no number does
template <class B>
inline int64_t full_blocks(int64_t n) {
  for (int64_t full = n / B::rows; full >= 0; --full)
    if ((n - full * B::rows) % B::tail == 0) return full;
  return -1;
}

template <int C, class B>
void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& table,
         const std::vector<int64_t>& rows, const std::vector<int64_t>& cols, int64_t w, double scale, at::Tensor& out) {
  const int64_t batch = q.size(0), height = q.size(1), width = q.size(2), heads = q.size(3);
  const int64_t nh = static_cast<int64_t>(rows.size()) / w, nw = static_cast<int64_t>(cols.size()) / w;
  const int64_t nk = w * w, side = 2 * w - 1;
  const bool dense = table.size(1) == nk;  // a (heads, nk, nk) bias, else the (heads, side, side) table
  const int64_t gap = dense ? 0 : w - 1;
  const float* qp = q.data_ptr<float>();
  const float* kd = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const float* tp = table.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  const int64_t pairs = batch * nh * nw * heads;
  const int64_t ss = nk + 16;  // score rows padded off a multiple of 4 KiB (L1 set aliasing)
  // strides (elements) of (batch, row, column, head), read once: Tensor::stride() is a call
  const int64_t qb = q.stride(0), qr = q.stride(1), qc = q.stride(2), qh = q.stride(3);
  const int64_t kb = k.stride(0), kr = k.stride(1), kc = k.stride(2), kh = k.stride(3);
  const int64_t vb = v.stride(0), vr = v.stride(1), vc = v.stride(2), vh = v.stride(3);
  const int64_t ob = out.stride(0), orr = out.stride(1), oc = out.stride(2), oh = out.stride(3);
  auto work = [&](const auto& claim) {  // on one thread: pairs as claimed
    // vector-aligned scratch: key panels (nk x C), packed V (nk x C), scores, scaled q
    constexpr int64_t P = 2 * Wide::n;  // keys per panel
    std::vector<Wide::T> buf((2 * C * nk + B::rows * ss + B::rows * C) / Wide::n + 1);
    float* kpan = reinterpret_cast<float*>(buf.data());
    float* vbuf = kpan + C * nk;
    float* s = vbuf + C * nk;
    float* qbuf = s + B::rows * ss;
    for (int64_t pair; claim(pair);) {
      const int64_t h = pair % heads, wc = pair / heads % nw, wr = pair / heads / nw % nh, b = pair / heads / nw / nh;
      // keys: every pixel of the padded window, read where the padding maps it in the image
      const float* kg = kd + b * kb + h * kh;
      const float* vg = vp + b * vb + h * vh;
      for (int64_t i = 0, j = 0; i < w; ++i) {
        const float* krow = kg + rows[wr * w + i] * kr;
        const float* vrow = vg + rows[wr * w + i] * vr;
        for (int64_t x = 0; x < w; ++x, ++j) {
          const int64_t c = cols[wc * w + x];
          const float* kj = krow + c * kc;
          const float* vj = vrow + c * vc;
          float* panel = kpan + (j / P) * P * C + j % P;  // P a constant power of 2: shifts
#pragma GCC unroll 32
          for (int d = 0; d < C; ++d) {
            panel[d * P] = kj[d];
            vbuf[j * C + d] = vj[d];
          }
        }
      }
      // queries: the window's pixels inside the image
      const int64_t row0 = wr * w, col0 = wc * w;
      const int64_t q_rows = std::min(w, height - row0), q_cols = std::min(w, width - col0);
      const float* th = tp + h * (dense ? nk * nk : side * side);
      const float* bias[B::rows];
      for (int64_t i = 0; i < q_rows; ++i) {
        const float* qi = qp + b * qb + (row0 + i) * qr + col0 * qc + h * qh;
        float* oi = op + b * ob + (row0 + i) * orr + col0 * oc + h * oh;
        const float* bias_row = th + (w - 1 - i) * side + (w - 1);
        auto block = [&](int64_t j0, auto rows_tag) {  // queries j0 .. j0 + R - 1 of this row
          constexpr int R = decltype(rows_tag)::value;
          for (int r = 0; r < R; ++r) bias[r] = dense ? th + (i * w + j0 + r) * nk : bias_row - (j0 + r);
          row_block<R, C>(qi + j0 * qc, qc, sc, kpan, vbuf, w, gap, bias, oi + j0 * oc, oc, qbuf, s, ss);
        };
        const int64_t full = full_blocks<B>(q_cols);
        if (full >= 0) {  // full blocks of B::rows, then of B::tail
          int64_t j = 0;
          for (int64_t n = 0; n < full; ++n, j += B::rows) block(j, std::integral_constant<int, B::rows>());
          for (; j < q_cols; j += B::tail) block(j, std::integral_constant<int, B::tail>());
        } else if (q_cols >= B::tail) {  // a last partial block overlaps the one before it
          for (int64_t j = 0; j < q_cols; j += B::tail)
            block(std::min(j, q_cols - B::tail), std::integral_constant<int, B::tail>());
        } else {
          for (int64_t j = 0; j < q_cols; ++j) block(j, std::integral_constant<int, 1>());
        }
      }
    }
  };
  // Pairs handed out one at a time (dynamic_for: a thread slowed by another process on its core
  // does fewer; edge windows, with fewer queries, are short tasks), on PyTorch's own intra-op pool
  // (built with -fopenmp, this library shares torch's OpenMP runtime): no second set of threads
  // competing with the pool's spinning workers. ESC's layer at 180x320, 2 threads, AMD EPYC, medians
  // of 5 alternating: a static split at equal query counts 129.1-135.9 ms, this 128.2-130.2 ms; with
  // a busy loop on one of the two cores 225.4-228.8 vs 179.3-212.5 ms.
  dynamic_for(pairs, work);
}

std::vector<int64_t> padded_index(const at::Tensor& index, int64_t w, int64_t size, const char* name) {
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong && index.device().is_cpu(),
              "window_attention: ", name, " must be a 1-D int64 CPU tensor");
  const int64_t n = index.numel();
  TORCH_CHECK(n == (size + w - 1) / w * w, "window_attention: ", name, " must map the ", (size + w - 1) / w * w,
              " padded positions (", size, " rounded up to whole windows of ", w, "), got ", n);
  const at::Tensor flat = index.contiguous();
  std::vector<int64_t> out(flat.data_ptr<int64_t>(), flat.data_ptr<int64_t>() + n);
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(out[i] >= 0 && out[i] < size && (i >= size || out[i] == i), "window_attention: ", name, "[", i,
                "] = ", out[i], " is not a position of the image (size ", size, "; the first ", size,
                " map to themselves)");
  return out;
}

// The block shape: block_rows 0 picks the build's for this CPU, else one the build has (AVX2: 4 or
// 6, AVX-512: 8), e.g. for tests to check each
template <int C>
void run_blocks(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& table,
                const std::vector<int64_t>& rows, const std::vector<int64_t>& cols, int64_t w, double scale,
                at::Tensor& out, int64_t block_rows) {
#if defined(__AVX512F__)
  TORCH_CHECK(block_rows == 0 || block_rows == 8, "window_attention: block_rows must be 0 or 8 (AVX-512 build), got ",
              block_rows);
  run<C, Blocks8>(q, k, v, table, rows, cols, w, scale, out);
#else
  static const bool amd = __builtin_cpu_is("amd");
  TORCH_CHECK(block_rows == 0 || block_rows == 4 || block_rows == 6,
              "window_attention: block_rows must be 0, 4 or 6 (AVX2 build), got ", block_rows);
  if (block_rows == 4 || (block_rows == 0 && amd)) run<C, Blocks4>(q, k, v, table, rows, cols, w, scale, out);
  else run<C, Blocks6>(q, k, v, table, rows, cols, w, scale, out);
#endif
}

void window_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& table,
                      const at::Tensor& rows, const at::Tensor& cols, int64_t window_size, double scale,
                      at::Tensor out, int64_t block_rows) {
  TORCH_CHECK(q.dim() == 5 && k.dim() == 5 && v.dim() == 5 && out.dim() == 5,
              "window_attention: q, k, v and out must be (batch, height, width, heads, head_dim)");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&q, &k, &v, &table, &out}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat, "window_attention: float32 CPU tensors only");
    TORCH_CHECK(t->stride(-1) == 1, "window_attention: the last dim must be contiguous");
  }
  const int64_t w = window_size, c = q.size(-1), heads = q.size(-2);
  TORCH_CHECK(w > 0 && w % 8 == 0, "window_attention: the window size must be a multiple of 8, got ", w);
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "window_attention: q, k, v and out must have the same shape");
  const bool dense = table.dim() == 3 && table.size(1) == w * w && table.size(2) == w * w;
  TORCH_CHECK(table.dim() == 3 && table.size(0) == heads && table.is_contiguous()
                  && (dense || (table.size(1) == 2 * w - 1 && table.size(2) == 2 * w - 1)),
              "window_attention: table must be a contiguous (heads, 2w - 1, 2w - 1) table or (heads, w^2, w^2) "
              "dense bias");
  const auto row_index = padded_index(rows, w, q.size(1), "rows");
  const auto col_index = padded_index(cols, w, q.size(2), "cols");
  switch (c) {
    case 8: run_blocks<8>(q, k, v, table, row_index, col_index, w, scale, out, block_rows); break;
    case 16: run_blocks<16>(q, k, v, table, row_index, col_index, w, scale, out, block_rows); break;
    case 24: run_blocks<24>(q, k, v, table, row_index, col_index, w, scale, out, block_rows); break;
    case 32: run_blocks<32>(q, k, v, table, row_index, col_index, w, scale, out, block_rows); break;
    default: TORCH_CHECK(false, "window_attention: head dim must be 8, 16, 24 or 32, got ", c);
  }
}

}  // namespace

TORCH_LIBRARY(esc_arch, m) {
  m.def("window_attention(Tensor q, Tensor k, Tensor v, Tensor table, Tensor rows, Tensor cols, int window_size, "
        "float scale, Tensor(a!) out, int block_rows=0) -> ()");
}

TORCH_LIBRARY_IMPL(esc_arch, CPU, m) {
  m.impl("window_attention", &window_attention);
}
