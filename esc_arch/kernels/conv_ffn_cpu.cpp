// ESC's ConvFFN fused for CPU inference (float32, channels-last):
//   h = GELU(x W1^T + b1);  d = GELU(depthwise3x3(h) + bd) + h;  out = d W2^T + b2
// PyTorch runs this as five passes over (H, W, hidden) maps that live in memory (1x1 conv,
// GELU, depthwise conv, GELU plus residual, 1x1 conv); here each thread walks a band of image
// rows and keeps three rows of h and one of d in cache: per output row it computes the next row
// of h (a small GEMM, then GELU), the depthwise conv of the three rows with GELU and the residual,
// and the output row (a second GEMM) written straight into out. The weights are repacked once per
// call into vector-aligned panels (hidden channels zero-padded to the vector width).
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <type_traits>
#include <vector>

#include "gemm.h"
#include "vec.h"

namespace {

using namespace esc_arch_vec;

// Vectors per step of the GELU passes (see gelu_n in vec.h); ESC's ConvFFN at 180x320, 2 threads, AMD
// EPYC (Zen 3), AVX2 build, medians of 9 alternating, 6-8 rounds: one at a time 9.6-10.6 ms (hidden 80)
// and 17.0-18.4 ms (hidden 128); 4 at a time 9.2-9.8 / 17.0-17.3 ms
constexpr int kGeluBlock = 4;

template <class F>
void gelu_inplace(float* p, int64_t count) {  // count a multiple of F::n, p vector-aligned
  using T = typename F::T;
  int64_t i = 0;
  for (; i + kGeluBlock * F::n <= count; i += kGeluBlock * F::n) {
    T v[kGeluBlock];
    for (int u = 0; u < kGeluBlock; ++u) v[u] = F::load(p + i + u * F::n);
    gelu_n<F, kGeluBlock>(v);
    for (int u = 0; u < kGeluBlock; ++u) F::store(p + i + u * F::n, v[u]);
  }
  for (; i < count; i += F::n) F::store(p + i, gelu<F>(F::load(p + i)));
}

// Weights repacked for the kernels; hidden channels padded to hp (a multiple of Wide::n) with zeros.
struct Packed {
  int64_t c_in, hidden, hp, c_out;
  std::vector<Wide::T> storage;
  float *w1, *b1, *wd, *bd, *w2, *b2;  // (c_in, hp), (hp), (9, hp), (hp), (hp, c_out), (c_out)

  Packed(const at::Tensor& w1_, const at::Tensor& b1_, const at::Tensor& wd_, const at::Tensor& bd_,
         const at::Tensor& w2_, const at::Tensor& b2_) {
    hidden = w1_.size(0);
    c_in = w1_.size(1);
    c_out = w2_.size(0);
    hp = (hidden + Wide::n - 1) / Wide::n * Wide::n;
    const int64_t sizes[6] = {c_in * hp, hp, 9 * hp, hp, hp * c_out, c_out};
    int64_t total = 0;
    for (int64_t s : sizes) total += (s + Wide::n - 1) / Wide::n * Wide::n;  // each part vector-aligned
    storage.assign(total / Wide::n, Wide::zero());
    float* parts[6];
    float* at = reinterpret_cast<float*>(storage.data());
    for (int i = 0; i < 6; ++i) {
      parts[i] = at;
      at += (sizes[i] + Wide::n - 1) / Wide::n * Wide::n;
    }
    w1 = parts[0], b1 = parts[1], wd = parts[2], bd = parts[3], w2 = parts[4], b2 = parts[5];
    const float* pw1 = w1_.data_ptr<float>();
    const float* pwd = wd_.data_ptr<float>();
    const float* pw2 = w2_.data_ptr<float>();
    for (int64_t j = 0; j < hidden; ++j) {
      for (int64_t k = 0; k < c_in; ++k) w1[k * hp + j] = pw1[j * c_in + k];
      for (int64_t t = 0; t < 9; ++t) wd[t * hp + j] = pwd[j * 9 + t];
      for (int64_t o = 0; o < c_out; ++o) w2[j * c_out + o] = pw2[o * hidden + j];
    }
    std::memcpy(b1, b1_.data_ptr<float>(), hidden * sizeof(float));
    std::memcpy(bd, bd_.data_ptr<float>(), hidden * sizeof(float));
    std::memcpy(b2, b2_.data_ptr<float>(), c_out * sizeof(float));
  }
};

// out rows [y0, y1) of image b. FO: the vector type of the output GEMM (c_out a multiple of it).
template <class FO>
void band(const Packed& p, const float* x, float* out, int64_t height, int64_t width, int64_t y0, int64_t y1) {
  using T = Wide::T;
  constexpr int N = Wide::n;
  const int64_t hp = p.hp, row = (width + 2) * hp;  // an h row with a zero pixel on both sides
  std::vector<T> buf((3 * row + width * hp) / N, Wide::zero());
  float* h_rows = reinterpret_cast<float*>(buf.data());
  float* d_row = h_rows + 3 * row;
  auto slot = [&](int64_t y) { return h_rows + ((y + 3) % 3) * row; };
  auto make_h = [&](int64_t y) {  // h row y (zeros outside the image) into its slot
    float* h = slot(y);
    if (y < 0 || y >= height) {
      std::fill(h, h + row, 0.0f);
      return;
    }
    gemm<Wide>(x + y * width * p.c_in, p.c_in, width, p.w1, hp, p.c_in, hp, p.b1, h + hp, hp);
    gelu_inplace<Wide>(h + hp, width * hp);
  };
  make_h(y0 - 1);
  make_h(y0);
  for (int64_t y = y0; y < y1; ++y) {
    make_h(y + 1);
    const float* above = slot(y - 1);
    const float* centre = slot(y);
    const float* below = slot(y + 1);
    for (int64_t t = 0; t < hp; t += N) {
      T wk[9];
#pragma GCC unroll 9
      for (int i = 0; i < 9; ++i) wk[i] = Wide::load(p.wd + i * hp + t);
      const T bias = Wide::load(p.bd + t);
      // K pixels from xx on (pixel x sits at x + 1 in the h rows), their GELUs side by side
      auto pixels = [&](int64_t xx, auto count_tag) {
        constexpr int K = decltype(count_tag)::value;
        T acc[K];
#pragma GCC unroll 8
        for (int u = 0; u < K; ++u) acc[u] = bias;
#pragma GCC unroll 3
        for (int i = 0; i < 3; ++i)
#pragma GCC unroll 8
          for (int u = 0; u < K; ++u) {
            const int64_t at = (xx + u + i) * hp + t;
            acc[u] = Wide::fmadd(Wide::load(above + at), wk[i], acc[u]);
            acc[u] = Wide::fmadd(Wide::load(centre + at), wk[3 + i], acc[u]);
            acc[u] = Wide::fmadd(Wide::load(below + at), wk[6 + i], acc[u]);
          }
        gelu_n<Wide, K>(acc);
#pragma GCC unroll 8
        for (int u = 0; u < K; ++u) {
          const int64_t at = (xx + u) * hp + t;
          Wide::store(d_row + at, Wide::add(acc[u], Wide::load(centre + at + hp)));
        }
      };
      int64_t xx = 0;
      for (; xx + kGeluBlock <= width; xx += kGeluBlock) pixels(xx, std::integral_constant<int, kGeluBlock>());
      for (; xx < width; ++xx) pixels(xx, std::integral_constant<int, 1>());
    }
    gemm<FO>(d_row, hp, width, p.w2, p.c_out, hp, p.c_out, p.b2, out + y * width * p.c_out, p.c_out);
  }
}

void conv_ffn(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& wd,
              const at::Tensor& bd, const at::Tensor& w2, const at::Tensor& b2, at::Tensor out) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&x, &w1, &b1, &wd, &bd, &w2, &b2, &out}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat, "conv_ffn: float32 CPU tensors only");
    TORCH_CHECK(t->is_contiguous(), "conv_ffn: contiguous tensors only");
  }
  TORCH_CHECK(x.dim() == 4 && out.dim() == 4, "conv_ffn: x and out must be (B, H, W, C)");
  const int64_t batch = x.size(0), height = x.size(1), width = x.size(2), c_in = x.size(3);
  const int64_t hidden = w1.size(0), c_out = w2.size(0);
  TORCH_CHECK(w1.dim() == 2 && w1.size(1) == c_in && b1.numel() == hidden && wd.dim() == 2 && wd.size(0) == hidden
                  && wd.size(1) == 9 && bd.numel() == hidden && w2.dim() == 2 && w2.size(1) == hidden
                  && b2.numel() == c_out,
              "conv_ffn: weights must be w1 (hidden, C), b1 (hidden), wd (hidden, 9), bd (hidden), w2 (C_out, hidden), "
              "b2 (C_out)");
  TORCH_CHECK(c_out % 8 == 0, "conv_ffn: output channels must be a multiple of 8, got ", c_out);
  TORCH_CHECK(out.size(0) == batch && out.size(1) == height && out.size(2) == width && out.size(3) == c_out,
              "conv_ffn: out must be (B, H, W, C_out)");
  if (out.numel() == 0) return;
  const Packed packed(w1, b1, wd, bd, w2, b2);
  // bands of rows: at least one per thread (each band recomputes the two h rows around it)
  const int64_t bands = std::max<int64_t>(1, std::min<int64_t>(height, at::get_num_threads()));
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, batch * bands, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / bands, k = i % bands;
      const int64_t y0 = height * k / bands, y1 = height * (k + 1) / bands;
      const float* xb = xp + b * height * width * c_in;
      float* ob = op + b * height * width * c_out;
      if (c_out % Wide::n == 0) band<Wide>(packed, xb, ob, height, width, y0, y1);
      else band<F8>(packed, xb, ob, height, width, y0, y1);
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(esc_arch, m) {
  m.def("conv_ffn(Tensor x, Tensor w1, Tensor b1, Tensor wd, Tensor bd, Tensor w2, Tensor b2, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(esc_arch, CPU, m) {
  m.impl("conv_ffn", &conv_ffn);
}
