// 1x1 convolution of a channels-last map for CPU inference (float32): each pixel's channels times
// the weight, plus the bias (and a residual, which may be the output itself: the sum is written in
// place), out[p, :] = x[p, :] W^T + b (+ residual[p, :]), as register-blocked GEMMs (gemm.h) over
// runs of pixels. Used by the AVX2 build, where oneDNN's 1x1 convolutions run well below the FMA
// peak: ESC's attention qkv (64 -> 192) and 64 -> 64 convs at 180x320, 2 threads, AMD EPYC (Zen 3),
// medians of 9 alternating, 6 rounds: oneDNN 11.3-12.5 / 4.2-4.6 ms, this 9.8-11.1 / 3.4-3.7 ms.
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

// pixels per task: their rows of x (64 channels: 64 KB) stay in L2 while every column block of the
// weight passes over them (64 -> 192 at 180x320 on the EPYC: 64 pixels 10.3-11.5 ms, 256 9.8-11.1 ms,
// 1024 9.8-10.9 ms)
constexpr int64_t kPixels = 256;

void conv1x1(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
             const std::optional<at::Tensor>& residual, at::Tensor out) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&x, &weight, &bias, &out}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "conv1x1: contiguous float32 CPU tensors only");
  }
  const char* shapes = "conv1x1: x (B, H, W, C), weight (O, C), bias (O), out (B, H, W, O)";
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 2 && out.dim() == 4, shapes);
  const int64_t pixels = x.size(0) * x.size(1) * x.size(2), in = x.size(3), outs = weight.size(0);
  TORCH_CHECK(weight.size(1) == in && bias.numel() == outs && out.size(0) == x.size(0) && out.size(1) == x.size(1)
                  && out.size(2) == x.size(2) && out.size(3) == outs,
              shapes);
  TORCH_CHECK(outs % 8 == 0, "conv1x1: output channels must be a multiple of 8, got ", outs);
  TORCH_CHECK(!x.is_alias_of(out), "conv1x1: out must not share x's storage");
  const float* rp = nullptr;
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == out.sizes() && residual->is_contiguous() && residual->device().is_cpu()
                    && residual->scalar_type() == at::kFloat,
                "conv1x1: residual must be a contiguous float32 CPU tensor shaped as out");
    TORCH_CHECK(residual->data_ptr() == out.data_ptr() || !residual->is_alias_of(out),
                "conv1x1: residual must be out itself or not share its storage");
    rp = residual->data_ptr<float>();
  }
  if (out.numel() == 0) return;
  // W^T (in x outs), vector-aligned: the GEMMs load its rows with aligned loads
  const int64_t ld = (outs + Wide::n - 1) / Wide::n * Wide::n;
  std::vector<Wide::T> storage(in * ld / Wide::n + 1);
  float* wt = reinterpret_cast<float*>(storage.data());
  const float* wp = weight.data_ptr<float>();
  for (int64_t o = 0; o < outs; ++o)
    for (int64_t c = 0; c < in; ++c) wt[c * ld + o] = wp[o * in + c];
  const float* xp = x.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  float* op = out.data_ptr<float>();
  dynamic_for((pixels + kPixels - 1) / kPixels, [&](const auto& claim) {
    for (int64_t task; claim(task);) {
      const int64_t p0 = task * kPixels, count = std::min(kPixels, pixels - p0);
      const float* add = rp ? rp + p0 * outs : nullptr;
      if (outs % Wide::n == 0) gemm<Wide>(xp + p0 * in, in, count, wt, ld, in, outs, bp, op + p0 * outs, outs, add);
      else gemm<F8>(xp + p0 * in, in, count, wt, ld, in, outs, bp, op + p0 * outs, outs, add);
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(esc_arch, m) {
  m.def("conv1x1(Tensor x, Tensor weight, Tensor bias, Tensor? residual, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(esc_arch, CPU, m) {
  m.impl("conv1x1", &conv1x1);
}
