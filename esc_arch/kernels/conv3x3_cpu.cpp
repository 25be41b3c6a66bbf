// 3x3 convolution (stride 1, zero padding 1) by Winograd's F(2x2, 3x3) or F(4x4, 3x3), for CPU
// inference (float32, channels-last), optionally adding a residual: out = conv(x) + bias (+ residual).
// Each M x M block of output pixels (a tile) is A^T [U . (B^T d B)] A of its (M + 2)^2 input patch d,
// U = G g G^T the transformed filter: the 9 M^2 C O multiply-adds of a tile become (M + 2)^2 C O
// (F(2x2): 16 instead of 36, 2.25x fewer; F(4x4): 36 instead of 144, 4x), as (M + 2)^2 GEMMs
// (tiles x C) x (C x O), one per point of the transform; the transforms themselves are additions
// and scalings. A task is a run of tiles along one row of tiles, short enough for its transformed
// input and GEMM results to stay in L2 (kBlockBytes). F(2x2)'s points are 0 and +-1, so its rounding
// stays that of a direct convolution (ESC's 64 -> 64 conv at 180x320: 2.7e-6 max error against
// float64 where oneDNN's direct one has 6.4e-6), at 8.0 ms against oneDNN's 13.2 ms (2 threads,
// Xeon; AVX2 builds, oneDNN held to AVX2: 16.5-16.9 vs 26.0-26.4 ms with whole rows of tiles per
// task). F(4x4) (points 0, +-1, +-2) rounds ~10x more; on the EPYC it was slower at 64x64 and
// 16-25% faster from 96x96 on; esc_arch/archs/layers.py (conv_plus) picks the tile.
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <vector>

#include "gemm.h"
#include "parallel.h"
#include "vec.h"

namespace {

using namespace esc_arch_vec;

// The two tile sizes: F(2x2, 3x3) (M = 2: 4x4 input patches, points 0 and +-1) and F(4x4, 3x3)
// (M = 4: 6x6 patches, points 0, +-1, +-2: 4x fewer products than direct instead of 2.25x, at a
// larger rounding error from the transforms' scalings and cancellations)
template <int M>
struct Winograd;

template <>
struct Winograd<2> {
  static constexpr int A = 4;  // patch side
  static constexpr double G[4][3] = {{1, 0, 0}, {0.5, 0.5, 0.5}, {0.5, -0.5, 0.5}, {0, 0, 1}};
  // B^T d along one axis, in place: (d0 - d2, d1 + d2, d2 - d1, d1 - d3)
  template <class F>
  static void input(typename F::T* d) {
    const auto t0 = F::sub(d[0], d[2]), t1 = F::add(d[1], d[2]), t2 = F::sub(d[2], d[1]), t3 = F::sub(d[1], d[3]);
    d[0] = t0, d[1] = t1, d[2] = t2, d[3] = t3;
  }
  // A^T m along one axis: (m0 + m1 + m2, m1 - m2 - m3)
  template <class F>
  static void output(const typename F::T* m, typename F::T* y) {
    y[0] = F::add(F::add(m[0], m[1]), m[2]);
    y[1] = F::sub(F::sub(m[1], m[2]), m[3]);
  }
};

template <>
struct Winograd<4> {
  static constexpr int A = 6;
  static constexpr double G[6][3] = {{1.0 / 4, 0, 0},
                                     {-1.0 / 6, -1.0 / 6, -1.0 / 6},
                                     {-1.0 / 6, 1.0 / 6, -1.0 / 6},
                                     {1.0 / 24, 1.0 / 12, 1.0 / 6},
                                     {1.0 / 24, -1.0 / 12, 1.0 / 6},
                                     {0, 0, 1}};
  // B^T d: (4 d0 - 5 d2 + d4, -4 (d1 + d2) + d3 + d4, 4 (d1 - d2) - d3 + d4, 2 (d3 - d1) - d2 + d4,
  //         2 (d1 - d3) - d2 + d4, 4 d1 - 5 d3 + d5)
  template <class F>
  static void input(typename F::T* d) {
    const auto four = F::set1(4.0f), minus4 = F::set1(-4.0f), minus5 = F::set1(-5.0f), two = F::set1(2.0f);
    const auto a = F::fmadd(minus4, d[2], d[4]), b = F::fmadd(minus4, d[1], d[3]);  // d4 - 4 d2, d3 - 4 d1
    const auto c = F::sub(d[4], d[2]), e = F::mul(two, F::sub(d[3], d[1]));
    const auto t0 = F::fmadd(four, d[0], F::fmadd(minus5, d[2], d[4]));
    const auto t5 = F::fmadd(four, d[1], F::fmadd(minus5, d[3], d[5]));
    d[0] = t0, d[1] = F::add(a, b), d[2] = F::sub(a, b), d[3] = F::add(c, e), d[4] = F::sub(c, e), d[5] = t5;
  }
  // A^T m: (m0 + m1 + m2 + m3 + m4, m1 - m2 + 2 (m3 - m4), m1 + m2 + 4 (m3 + m4), m1 - m2 + 8 (m3 - m4) + m5)
  template <class F>
  static void output(const typename F::T* m, typename F::T* y) {
    const auto s12 = F::add(m[1], m[2]), d12 = F::sub(m[1], m[2]), s34 = F::add(m[3], m[4]), d34 = F::sub(m[3], m[4]);
    y[0] = F::add(F::add(m[0], s12), s34);
    y[1] = F::fmadd(F::set1(2.0f), d34, d12);
    y[2] = F::fmadd(F::set1(4.0f), s34, s12);
    y[3] = F::add(F::fmadd(F::set1(8.0f), d34, d12), m[5]);
  }
};

// U[xi][c][o] = (G g[o, c] G^T)[xi], in float64 then rounded (vector-aligned storage: the GEMMs
// load it with aligned loads)
template <int M>
std::vector<Wide::T> filter_transform(const float* w, int64_t outs, int64_t in) {
  using W = Winograd<M>;
  constexpr int A = W::A;
  std::vector<Wide::T> storage((A * A * in * outs) / Wide::n + 1);
  float* u = reinterpret_cast<float*>(storage.data());
  // on the threads too: 64 -> 64, F(4x4), 0.54 ms on one thread of the EPYC, a fixed cost of every call
  at::parallel_for(0, outs, 8, [&](int64_t first, int64_t last) {
    for (int64_t o = first; o < last; ++o)
      for (int64_t c = 0; c < in; ++c) {
        const float* g = w + (o * in + c) * 9;
        double t[A][3];  // G g
        for (int i = 0; i < A; ++i)
          for (int j = 0; j < 3; ++j) t[i][j] = W::G[i][0] * g[j] + W::G[i][1] * g[3 + j] + W::G[i][2] * g[6 + j];
        for (int i = 0; i < A; ++i)
          for (int j = 0; j < A; ++j)
            u[((i * A + j) * in + c) * outs + o] =
                static_cast<float>(t[i][0] * W::G[j][0] + t[i][1] * W::G[j][1] + t[i][2] * W::G[j][2]);
      }
  });
  return storage;
}

// the transformed input and GEMM results of a task: 1 MB (F(2x2): 64 -> 64 convs, 2 threads, Xeon:
// 8.0 ms at 180x320 and 130 ms at 720x1280 against 9.1 / 155 ms with whole rows of tiles per task;
// 0.5 MB or 2 MB were slower)
constexpr int64_t kBlockBytes = 1 << 20;

// tiles tx0 .. tx0 + tiles - 1 of tile row ty; v, m: (A^2, tiles, in) and (A^2, tiles, outs) scratch
template <int M, class FI, class FO>
void tiles_run(const float* x, const float* u, const float* bias, const float* residual, float* out, int64_t height,
               int64_t width, int64_t in, int64_t outs, int64_t ty, int64_t tx0, int64_t tiles, float* v, float* m) {
  using W = Winograd<M>;
  constexpr int A = W::A, P = A * A;
  using TI = typename FI::T;
  using TO = typename FO::T;
  // input transform: v[xi][tile][c]
  for (int64_t tx = 0; tx < tiles; ++tx) {
    const int64_t y0 = M * ty - 1, x0 = M * (tx0 + tx) - 1;
    for (int64_t c = 0; c < in; c += FI::n) {
      TI d[A][A], col[A];
#pragma GCC unroll 6
      for (int i = 0; i < A; ++i) {
        const int64_t y = y0 + i;
#pragma GCC unroll 6
        for (int j = 0; j < A; ++j) {
          const int64_t xx = x0 + j;
          const bool inside = y >= 0 && y < height && xx >= 0 && xx < width;
          d[i][j] = inside ? FI::loadu(x + (y * width + xx) * in + c) : FI::zero();
        }
      }
#pragma GCC unroll 6
      for (int j = 0; j < A; ++j) {
#pragma GCC unroll 6
        for (int i = 0; i < A; ++i) col[i] = d[i][j];
        W::template input<FI>(col);
#pragma GCC unroll 6
        for (int i = 0; i < A; ++i) d[i][j] = col[i];
      }
#pragma GCC unroll 6
      for (int i = 0; i < A; ++i) W::template input<FI>(d[i]);
#pragma GCC unroll 6
      for (int i = 0; i < A; ++i)
#pragma GCC unroll 6
        for (int j = 0; j < A; ++j) FI::storeu(v + ((i * A + j) * tiles + tx) * in + c, d[i][j]);
    }
  }
  for (int xi = 0; xi < P; ++xi)
    gemm<FO>(v + xi * tiles * in, in, tiles, u + xi * in * outs, outs, in, outs, nullptr, m + xi * tiles * outs, outs);
  // output transform: A^T m A, plus bias (and residual)
  for (int64_t tx = 0; tx < tiles; ++tx) {
    for (int64_t o = 0; o < outs; o += FO::n) {
      TO r[A][M];
#pragma GCC unroll 6
      for (int i = 0; i < A; ++i) {
        TO row[A];
#pragma GCC unroll 6
        for (int j = 0; j < A; ++j) row[j] = FO::loadu(m + ((i * A + j) * tiles + tx) * outs + o);
        W::template output<FO>(row, r[i]);
      }
      const TO b = FO::loadu(bias + o);
#pragma GCC unroll 4
      for (int j = 0; j < M; ++j) {
        const int64_t xx = M * (tx0 + tx) + j;
        if (xx >= width) break;
        TO col[A], y[M];
#pragma GCC unroll 6
        for (int i = 0; i < A; ++i) col[i] = r[i][j];
        W::template output<FO>(col, y);
#pragma GCC unroll 4
        for (int i = 0; i < M; ++i) {
          const int64_t yy = M * ty + i;
          if (yy >= height) break;
          const int64_t p = (yy * width + xx) * outs + o;
          const TO value = FO::add(y[i], b);
          FO::storeu(out + p, residual ? FO::add(value, FO::loadu(residual + p)) : value);
        }
      }
    }
  }
}

template <int M>
void run(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const float* rp, at::Tensor& out) {
  constexpr int64_t P = Winograd<M>::A * Winograd<M>::A;
  const int64_t batch = x.size(0), height = x.size(1), width = x.size(2), in = x.size(3), outs = weight.size(0);
  const std::vector<Wide::T> storage = filter_transform<M>(weight.data_ptr<float>(), outs, in);
  const float* u = reinterpret_cast<const float*>(storage.data());
  const int64_t rows = (height + M - 1) / M, tiles = (width + M - 1) / M;
  const int64_t per_block = std::max<int64_t>(1, kBlockBytes / (P * (in + outs) * int64_t(sizeof(float))));
  const int64_t blocks = (tiles + per_block - 1) / per_block, block = (tiles + blocks - 1) / blocks;
  const float* xp = x.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const bool wide_in = in % Wide::n == 0, wide_out = outs % Wide::n == 0;  // else vectors of 8
  dynamic_for(batch * rows * blocks, [&](const auto& claim) {
    std::vector<Wide::T> buf((P * block * (in + outs)) / Wide::n + 1);
    float* v = reinterpret_cast<float*>(buf.data());
    float* m = v + P * block * in;
    for (int64_t task; claim(task);) {
      const int64_t b = task / (rows * blocks), ty = task / blocks % rows, tx0 = task % blocks * block;
      const int64_t count = std::min(block, tiles - tx0);
      if (count <= 0) continue;  // blocks x block may pass the row's end
      const int64_t image = b * height * width;
      const float* xb = xp + image * in;
      float* ob = op + image * outs;
      const float* rb = rp ? rp + image * outs : nullptr;
      if (wide_in && wide_out) tiles_run<M, Wide, Wide>(xb, u, bp, rb, ob, height, width, in, outs, ty, tx0, count, v, m);
      else if (wide_in) tiles_run<M, Wide, F8>(xb, u, bp, rb, ob, height, width, in, outs, ty, tx0, count, v, m);
      else if (wide_out) tiles_run<M, F8, Wide>(xb, u, bp, rb, ob, height, width, in, outs, ty, tx0, count, v, m);
      else tiles_run<M, F8, F8>(xb, u, bp, rb, ob, height, width, in, outs, ty, tx0, count, v, m);
    }
  });
}

void conv3x3(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
             const std::optional<at::Tensor>& residual, at::Tensor out, int64_t tile) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&x, &weight, &bias, &out}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "conv3x3: contiguous float32 CPU tensors only");
  }
  const char* shapes = "conv3x3: x (B, H, W, C), weight (O, C, 3, 3), bias (O), out (B, H, W, O)";
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4 && out.dim() == 4, shapes);
  const int64_t batch = x.size(0), height = x.size(1), width = x.size(2), in = x.size(3), outs = weight.size(0);
  TORCH_CHECK(weight.size(1) == in && weight.size(2) == 3 && weight.size(3) == 3 && bias.numel() == outs
                  && out.size(0) == batch && out.size(1) == height && out.size(2) == width && out.size(3) == outs,
              shapes);
  TORCH_CHECK(in % 8 == 0 && outs % 8 == 0, "conv3x3: channels must be multiples of 8");
  const float* rp = nullptr;
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == out.sizes() && residual->is_contiguous() && residual->device().is_cpu()
                    && residual->scalar_type() == at::kFloat,
                "conv3x3: residual must be a contiguous float32 CPU tensor shaped as out");
    rp = residual->data_ptr<float>();
  }
  TORCH_CHECK(tile == 0 || tile == 2 || tile == 4, "conv3x3: tile must be 0 (the default, 2), 2 or 4, got ", tile);
  if (out.numel() == 0) return;
  if (tile == 4) run<4>(x, weight, bias, rp, out);
  else run<2>(x, weight, bias, rp, out);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(esc_arch, m) {
  m.def("conv3x3(Tensor x, Tensor weight, Tensor bias, Tensor? residual, Tensor(a!) out, int tile=0) -> ()");
}

TORCH_LIBRARY_IMPL(esc_arch, CPU, m) {
  m.impl("conv3x3", &conv3x3);
}
