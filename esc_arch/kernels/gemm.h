// Register-blocked float32 GEMM for the CPU kernels (vector types from vec.h): a tile of MR rows x
// NB vectors of accumulators, each step one rank-1 update (NB vector loads of b, MR broadcasts of
// a), and a row-strip driver that splits the columns into tiles sized to the register file.
#pragma once

#include <cstdint>

#include "vec.h"

namespace esc_arch_vec {

// GEMM tiles: MR rows x NB vectors of accumulators, plus NB weight vectors and one broadcast,
// within the register file (32 zmm / 16 ymm)
template <class F>
constexpr int max_vectors() { return F::n == 16 ? 5 : 3; }

template <class F>
constexpr int tile_rows(int nb) {
  if (F::n == 16) return nb >= 5 ? 5 : nb == 4 ? 6 : nb == 3 ? 8 : 12;
  return nb >= 3 ? 4 : nb == 2 ? 6 : 8;
}

// c[m, 0:NB n] = (bias + add[m, 0:NB n] + sum_k a[m * lda + k] b[k * ldb + 0:NB n]) * row_scale[m]
// for m < MR (b vector-aligned; bias, add nullptr: none, add with c's stride and read before c is
// written, so it may be c itself; row_scale nullptr: 1)
template <class F, int MR, int NB>
inline void gemm_tile(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t k_dim, const float* bias,
                      float* c, int64_t ldc, const float* row_scale = nullptr, const float* add = nullptr) {
  using T = typename F::T;
  T acc[MR][NB];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int t = 0; t < NB; ++t) {
      acc[m][t] = bias ? F::loadu(bias + t * F::n) : F::zero();
      if (add) acc[m][t] = F::add(acc[m][t], F::loadu(add + m * ldc + t * F::n));
    }
  for (int64_t k = 0; k < k_dim; ++k) {
    T bk[NB];
#pragma GCC unroll 8
    for (int t = 0; t < NB; ++t) bk[t] = F::load(b + k * ldb + t * F::n);
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      const T am = F::set1(a[m * lda + k]);
#pragma GCC unroll 8
      for (int t = 0; t < NB; ++t) acc[m][t] = F::fmadd(am, bk[t], acc[m][t]);
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m) {
    const T scale = F::set1(row_scale ? row_scale[m] : 1.0f);
#pragma GCC unroll 8
    for (int t = 0; t < NB; ++t) F::storeu(c + m * ldc + t * F::n, row_scale ? F::mul(acc[m][t], scale) : acc[m][t]);
  }
}

template <class F, int NB>
void gemm_columns(const float* a, int64_t lda, int64_t rows, const float* b, int64_t ldb, int64_t k_dim,
                  const float* bias, float* c, int64_t ldc, const float* add) {
  constexpr int MR = tile_rows<F>(NB);
  int64_t m = 0;
  for (; m + MR <= rows; m += MR)
    gemm_tile<F, MR, NB>(a + m * lda, lda, b, ldb, k_dim, bias, c + m * ldc, ldc, nullptr, add ? add + m * ldc : nullptr);
  for (; m < rows; ++m)
    gemm_tile<F, 1, NB>(a + m * lda, lda, b, ldb, k_dim, bias, c + m * ldc, ldc, nullptr, add ? add + m * ldc : nullptr);
}

// c (rows x n_dim, stride ldc) = a (rows x k_dim, stride lda) b (k_dim x n_dim, stride ldb) + bias
// (+ add, with c's stride; may be c itself); bias, add nullptr: none; n_dim a multiple of F::n,
// split into column blocks of at most max_vectors<F>() vectors
template <class F>
void gemm(const float* a, int64_t lda, int64_t rows, const float* b, int64_t ldb, int64_t k_dim, int64_t n_dim,
          const float* bias, float* c, int64_t ldc, const float* add = nullptr) {
  const int64_t vectors = n_dim / F::n;
  const int64_t blocks = (vectors + max_vectors<F>() - 1) / max_vectors<F>();
  int64_t col = 0;
  for (int64_t i = 0; i < blocks; ++i) {
    const int nb = static_cast<int>(vectors / blocks + (i < vectors % blocks ? 1 : 0));
    const float* bb = b + col;
    const float* bc = bias ? bias + col : nullptr;
    float* cc = c + col;
    const float* ac = add ? add + col : nullptr;
    switch (nb) {
      case 1: gemm_columns<F, 1>(a, lda, rows, bb, ldb, k_dim, bc, cc, ldc, ac); break;
      case 2: gemm_columns<F, 2>(a, lda, rows, bb, ldb, k_dim, bc, cc, ldc, ac); break;
      case 3: gemm_columns<F, 3>(a, lda, rows, bb, ldb, k_dim, bc, cc, ldc, ac); break;
      default:
        if constexpr (max_vectors<F>() >= 5) {
          if (nb == 4) gemm_columns<F, 4>(a, lda, rows, bb, ldb, k_dim, bc, cc, ldc, ac);
          else gemm_columns<F, 5>(a, lda, rows, bb, ldb, k_dim, bc, cc, ldc, ac);
        }
    }
    col += nb * F::n;
  }
}

}  // namespace esc_arch_vec
