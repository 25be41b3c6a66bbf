// 3x3 convolution (stride 1, zero padding 1) by Winograd's F(2x2, 3x3), for CPU inference
// (float32, channels-last), optionally adding a residual: out = conv(x) + bias (+ residual).
// Each 2x2 block of output pixels (a tile) is A^T [U . (B^T d B)] A of its 4x4 input patch d,
// U = G g G^T the transformed filter: the 3x3 x C x O multiply-adds of 4 pixels become 16 x C x O
// (2.25x fewer), as 16 GEMMs (tiles x C) x (C x O), one per point of the 4x4 transform; the
// transforms themselves are additions. A task is a run of tiles along one row of tiles, short
// enough for its transformed input and GEMM results to stay in L2 (kBlockBytes). The transform
// points are 0 and +-1, so the rounding stays that of a direct convolution (ESC's 64 -> 64 conv
// at 180x320: 2.7e-6 max error against float64 where oneDNN's direct one has 6.4e-6), at 8.0 ms
// against oneDNN's 13.2 ms (2 threads, Xeon; AVX2 builds, oneDNN held to AVX2: 16.5-16.9 vs
// 26.0-26.4 ms with whole rows of tiles per task).
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

// U[xi][c][o] = (G g[o, c] G^T)[xi], G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]
// (vector-aligned storage: the GEMMs load it with aligned loads)
std::vector<Wide::T> filter_transform(const float* w, int64_t outs, int64_t in) {
  static const double G[4][3] = {{1, 0, 0}, {0.5, 0.5, 0.5}, {0.5, -0.5, 0.5}, {0, 0, 1}};
  std::vector<Wide::T> storage((16 * in * outs) / Wide::n + 1);
  float* u = reinterpret_cast<float*>(storage.data());
  for (int64_t o = 0; o < outs; ++o)
    for (int64_t c = 0; c < in; ++c) {
      const float* g = w + (o * in + c) * 9;
      double t[4][3];  // G g
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 3; ++j) t[i][j] = G[i][0] * g[j] + G[i][1] * g[3 + j] + G[i][2] * g[6 + j];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j)
          u[((i * 4 + j) * in + c) * outs + o] =
              static_cast<float>(t[i][0] * G[j][0] + t[i][1] * G[j][1] + t[i][2] * G[j][2]);
    }
  return storage;
}

// B^T d B along one axis: (d0 - d2, d1 + d2, d2 - d1, d1 - d3)
template <class F>
inline void input_1d(typename F::T& a, typename F::T& b, typename F::T& c, typename F::T& d) {
  const auto t0 = F::sub(a, c), t1 = F::add(b, c), t2 = F::sub(c, b), t3 = F::sub(b, d);
  a = t0, b = t1, c = t2, d = t3;
}

// the transformed input and GEMM results of a task: 1 MB (64 -> 64 convs, 2 threads, Xeon: 8.0 ms at
// 180x320 and 130 ms at 720x1280 against 9.1 / 155 ms with whole rows of tiles per task; 0.5 MB or
// 2 MB were slower)
constexpr int64_t kBlockBytes = 1 << 20;

// tiles tx0 .. tx0 + tiles - 1 of tile row ty; v, m: (16, tiles, in) and (16, tiles, outs) scratch
template <class FI, class FO>
void tiles_run(const float* x, const float* u, const float* bias, const float* residual, float* out, int64_t height,
               int64_t width, int64_t in, int64_t outs, int64_t ty, int64_t tx0, int64_t tiles, float* v, float* m) {
  using TI = typename FI::T;
  using TO = typename FO::T;
  // input transform: v[xi][tile][c]
  for (int64_t tx = 0; tx < tiles; ++tx) {
    const int64_t y0 = 2 * ty - 1, x0 = 2 * (tx0 + tx) - 1;
    for (int64_t c = 0; c < in; c += FI::n) {
      TI d[4][4];
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) {
        const int64_t y = y0 + i;
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) {
          const int64_t xx = x0 + j;
          const bool inside = y >= 0 && y < height && xx >= 0 && xx < width;
          d[i][j] = inside ? FI::loadu(x + (y * width + xx) * in + c) : FI::zero();
        }
      }
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) input_1d<FI>(d[0][j], d[1][j], d[2][j], d[3][j]);
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) input_1d<FI>(d[i][0], d[i][1], d[i][2], d[i][3]);
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i)
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) FI::storeu(v + ((i * 4 + j) * tiles + tx) * in + c, d[i][j]);
    }
  }
  for (int xi = 0; xi < 16; ++xi)
    gemm<FO>(v + xi * tiles * in, in, tiles, u + xi * in * outs, outs, in, outs, nullptr, m + xi * tiles * outs, outs);
  // output transform: A^T m A, A^T = [[1, 1, 1, 0], [0, 1, -1, -1]], plus bias (and residual)
  for (int64_t tx = 0; tx < tiles; ++tx) {
    for (int64_t o = 0; o < outs; o += FO::n) {
      TO r[4][2];
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) {
        const TO m0 = FO::loadu(m + ((i * 4 + 0) * tiles + tx) * outs + o);
        const TO m1 = FO::loadu(m + ((i * 4 + 1) * tiles + tx) * outs + o);
        const TO m2 = FO::loadu(m + ((i * 4 + 2) * tiles + tx) * outs + o);
        const TO m3 = FO::loadu(m + ((i * 4 + 3) * tiles + tx) * outs + o);
        r[i][0] = FO::add(FO::add(m0, m1), m2);
        r[i][1] = FO::sub(FO::sub(m1, m2), m3);
      }
      const TO b = FO::loadu(bias + o);
#pragma GCC unroll 2
      for (int j = 0; j < 2; ++j) {
        const TO y0 = FO::add(FO::add(FO::add(r[0][j], r[1][j]), r[2][j]), b);
        const TO y1 = FO::add(FO::sub(FO::sub(r[1][j], r[2][j]), r[3][j]), b);
        const int64_t xx = 2 * (tx0 + tx) + j;
        if (xx >= width) continue;
        const int64_t p0 = (2 * ty * width + xx) * outs + o, p1 = p0 + width * outs;
        FO::storeu(out + p0, residual ? FO::add(y0, FO::loadu(residual + p0)) : y0);
        if (2 * ty + 1 < height) FO::storeu(out + p1, residual ? FO::add(y1, FO::loadu(residual + p1)) : y1);
      }
    }
  }
}

void conv3x3(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
             const std::optional<at::Tensor>& residual, at::Tensor out) {
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
  if (out.numel() == 0) return;
  const std::vector<Wide::T> storage = filter_transform(weight.data_ptr<float>(), outs, in);
  const float* u = reinterpret_cast<const float*>(storage.data());
  const int64_t rows = (height + 1) / 2, tiles = (width + 1) / 2;
  const int64_t per_block = std::max<int64_t>(1, kBlockBytes / (16 * (in + outs) * int64_t(sizeof(float))));
  const int64_t blocks = (tiles + per_block - 1) / per_block, block = (tiles + blocks - 1) / blocks;
  const float* xp = x.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const bool wide_in = in % Wide::n == 0, wide_out = outs % Wide::n == 0;  // else vectors of 8
  dynamic_for(batch * rows * blocks, [&](const auto& claim) {
    std::vector<Wide::T> buf((16 * block * (in + outs)) / Wide::n + 1);
    float* v = reinterpret_cast<float*>(buf.data());
    float* m = v + 16 * block * in;
    for (int64_t task; claim(task);) {
      const int64_t b = task / (rows * blocks), ty = task / blocks % rows, tx0 = task % blocks * block;
      const int64_t count = std::min(block, tiles - tx0);
      if (count <= 0) continue;  // blocks x block may pass the row's end
      const int64_t image = b * height * width;
      const float* xb = xp + image * in;
      float* ob = op + image * outs;
      const float* rb = rp ? rp + image * outs : nullptr;
      if (wide_in && wide_out) tiles_run<Wide, Wide>(xb, u, bp, rb, ob, height, width, in, outs, ty, tx0, count, v, m);
      else if (wide_in) tiles_run<Wide, F8>(xb, u, bp, rb, ob, height, width, in, outs, ty, tx0, count, v, m);
      else if (wide_out) tiles_run<F8, Wide>(xb, u, bp, rb, ob, height, width, in, outs, ty, tx0, count, v, m);
      else tiles_run<F8, F8>(xb, u, bp, rb, ob, height, width, in, outs, ty, tx0, count, v, m);
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(esc_arch, m) {
  m.def("conv3x3(Tensor x, Tensor weight, Tensor bias, Tensor? residual, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(esc_arch, CPU, m) {
  m.impl("conv3x3", &conv3x3);
}
