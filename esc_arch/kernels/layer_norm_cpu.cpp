// LayerNorm over the last dim for CPU inference (float32): out = (x - mean) / sqrt(var + eps) *
// weight + bias per row (a pixel of a channels-last map), var the biased variance, as PyTorch's
// layer_norm. A row (ESC's: 64 floats, four 16-float vectors) stays in L1 for its three passes
// (mean, centred sum of squares, output), so memory sees one read and one write of the map.
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>

#include "vec.h"

namespace {

using namespace esc_arch_vec;
using F = Wide;

void layer_norm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps, at::Tensor out) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&x, &weight, &bias, &out})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat, "layer_norm: float32 CPU tensors only");
  const int64_t c = x.size(-1);
  TORCH_CHECK(x.is_contiguous() && out.is_contiguous() && out.sizes() == x.sizes(),
              "layer_norm: x and out must be contiguous and of the same shape");
  TORCH_CHECK(weight.is_contiguous() && bias.is_contiguous() && weight.numel() == c && bias.numel() == c,
              "layer_norm: weight and bias must have the last dim's size (", c, ")");
  const int64_t rows = c == 0 ? 0 : x.numel() / c, cv = c / F::n * F::n;
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float e = static_cast<float>(eps), inv_c = 1.0f / static_cast<float>(c);
  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = xp + r * c;
      float* orow = op + r * c;
      F::T acc = F::zero();
      float tail = 0.0f;
      for (int64_t i = 0; i < cv; i += F::n) acc = F::add(acc, F::loadu(xr + i));
      for (int64_t i = cv; i < c; ++i) tail += xr[i];
      const float mean = (F::hsum(acc) + tail) * inv_c;
      const F::T m = F::set1(mean);
      acc = F::zero();
      tail = 0.0f;
      for (int64_t i = 0; i < cv; i += F::n) {
        const F::T d = F::sub(F::loadu(xr + i), m);
        acc = F::fmadd(d, d, acc);
      }
      for (int64_t i = cv; i < c; ++i) tail += (xr[i] - mean) * (xr[i] - mean);
      const float rstd = 1.0f / std::sqrt((F::hsum(acc) + tail) * inv_c + e);
      const F::T s = F::set1(rstd);
      for (int64_t i = 0; i < cv; i += F::n) {
        const F::T d = F::mul(F::sub(F::loadu(xr + i), m), s);
        F::storeu(orow + i, F::fmadd(d, F::loadu(wp + i), F::loadu(bp + i)));
      }
      for (int64_t i = cv; i < c; ++i) orow[i] = (xr[i] - mean) * rstd * wp[i] + bp[i];
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(esc_arch, m) {
  m.def("layer_norm(Tensor x, Tensor weight, Tensor bias, float eps, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(esc_arch, CPU, m) {
  m.impl("layer_norm", &layer_norm);
}
