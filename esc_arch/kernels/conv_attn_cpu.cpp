// The two layout changes around ESC's convolutional attention at CPU inference, each one pass:
// the activations are channels-last (B, H, W, C) while the FFT convolution of the first P
// channels wants zero-padded planes.
//   pad_planes(x, out):          out[b, c, y, x] = x[b, y, x, c] inside H x W, 0 in the rest of
//                                out's (B, P, Hf, Wf) (the FFT's zero padding)
//   conv_attn_merge(lk, x1, k, out): out[b, y, x, c] = lk[b, c, y, x] + sum_{i,j} k[b, c, 3i + j]
//                                x1[b, c, y + i - 1, x + j - 1] (a per-sample depthwise 3x3, zero
//                                outside), written back into the channels-last activations.
// Replaces a chunked transpose, a zero fill, a padded copy, the depthwise convolution, an add
// and a strided write per ConvAttn. Rows of the image are split across threads; within a row the
// channels-last pixels and the planes meet in 8 x 8 register transposes (AVX, both builds), the
// merge's 3x3 running along a plane-major row buffer.
#include <immintrin.h>
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <vector>

namespace {

void check_float(std::initializer_list<const at::Tensor*> tensors, const char* op) {
  for (const at::Tensor* t : tensors) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat, op, ": float32 CPU tensors only");
    TORCH_CHECK(t->dim() == 4 && t->stride(-1) == 1, op, ": 4-D tensors with a contiguous last dim only");
  }
}

// dst[c * ds + i] = src[i * ss + c] for i, c < 8 (AVX: unpack, shuffle, swap 128-bit halves)
inline void transpose8x8(const float* src, int64_t ss, float* dst, int64_t ds) {
  __m256 r[8], t[8];
  for (int k = 0; k < 8; ++k) r[k] = _mm256_loadu_ps(src + k * ss);
  for (int k = 0; k < 8; k += 2) {
    t[k] = _mm256_unpacklo_ps(r[k], r[k + 1]);
    t[k + 1] = _mm256_unpackhi_ps(r[k], r[k + 1]);
  }
  for (int k = 0; k < 8; k += 4) {
    r[k] = _mm256_shuffle_ps(t[k], t[k + 2], 0x44);
    r[k + 1] = _mm256_shuffle_ps(t[k], t[k + 2], 0xEE);
    r[k + 2] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0x44);
    r[k + 3] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0xEE);
  }
  for (int k = 0; k < 4; ++k) {
    _mm256_storeu_ps(dst + k * ds, _mm256_permute2f128_ps(r[k], r[k + 4], 0x20));
    _mm256_storeu_ps(dst + (k + 4) * ds, _mm256_permute2f128_ps(r[k], r[k + 4], 0x31));
  }
}

// dst[c * dst_stride + i] = src[i * src_stride + c] for i < n, c < planes: 8 x 8 blocks in
// registers, the ragged edges one by one
inline void transpose(const float* src, int64_t src_stride, float* dst, int64_t dst_stride, int64_t n,
                      int64_t planes) {
  const int64_t n8 = n / 8 * 8, p8 = planes / 8 * 8;
  for (int64_t i = 0; i < n8; i += 8)
    for (int64_t c = 0; c < p8; c += 8)
      transpose8x8(src + i * src_stride + c, src_stride, dst + c * dst_stride + i, dst_stride);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = (i < n8 ? p8 : 0); c < planes; ++c) dst[c * dst_stride + i] = src[i * src_stride + c];
}

void pad_planes(const at::Tensor& x, at::Tensor out) {
  check_float({&x, &out}, "pad_planes");
  const int64_t batch = x.size(0), h = x.size(1), w = x.size(2), planes = x.size(3);
  const int64_t hf = out.size(2), wf = out.size(3);
  TORCH_CHECK(out.is_contiguous() && out.size(0) == batch && out.size(1) == planes && hf >= h && wf >= w,
              "pad_planes: out must be a contiguous (B, P, Hf >= H, Wf >= W) tensor for x (B, H, W, P)");
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t xb = x.stride(0), xr = x.stride(1), xc = x.stride(2);
  at::parallel_for(0, batch * hf, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / hf, y = task % hf;
      float* row = op + b * planes * hf * wf + y * wf;  // plane 0's row y
      if (y >= h) {
        for (int64_t c = 0; c < planes; ++c) std::fill(row + c * hf * wf, row + c * hf * wf + wf, 0.0f);
        continue;
      }
      const float* src = xp + b * xb + y * xr;
      transpose(src, xc, row, hf * wf, w, planes);
      for (int64_t c = 0; c < planes; ++c) std::fill(row + c * hf * wf + w, row + c * hf * wf + wf, 0.0f);
    }
  });
}

void conv_attn_merge(const at::Tensor& lk, const at::Tensor& x1, const at::Tensor& kernel, at::Tensor out) {
  check_float({&lk, &x1, &out}, "conv_attn_merge");
  const int64_t batch = lk.size(0), planes = lk.size(1), h = lk.size(2), w = lk.size(3);
  TORCH_CHECK(x1.sizes() == lk.sizes(), "conv_attn_merge: lk and x1 must have the same (B, P, H, W) shape");
  TORCH_CHECK(out.size(0) == batch && out.size(1) == h && out.size(2) == w && out.size(3) == planes,
              "conv_attn_merge: out must be (B, H, W, P) for planes (B, P, H, W)");
  TORCH_CHECK(kernel.device().is_cpu() && kernel.scalar_type() == at::kFloat && kernel.is_contiguous()
                  && kernel.dim() == 3 && kernel.size(0) == batch && kernel.size(1) == planes && kernel.size(2) == 9,
              "conv_attn_merge: kernel must be a contiguous float32 (B, P, 9) tensor (a 3x3 per sample and plane)");
  const float* lp = lk.data_ptr<float>();
  const float* xp = x1.data_ptr<float>();
  const float* kp = kernel.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t lb = lk.stride(0), lc = lk.stride(1), lr = lk.stride(2);
  const int64_t xb = x1.stride(0), xc = x1.stride(1), xr = x1.stride(2);
  const int64_t ob = out.stride(0), orow = out.stride(1), oc = out.stride(2);
  at::parallel_for(0, batch * h, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(planes * w);  // the row, plane-major
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / h, y = task % h;
      for (int64_t c = 0; c < planes; ++c) {
        float* a = acc.data() + c * w;
        const float* k = kp + (b * planes + c) * 9;
        std::copy(lp + b * lb + c * lc + y * lr, lp + b * lb + c * lc + y * lr + w, a);
        for (int64_t i = 0; i < 3; ++i) {
          const int64_t yy = y + i - 1;
          if (yy < 0 || yy >= h) continue;
          const float* r = xp + b * xb + c * xc + yy * xr;
          const float k0 = k[3 * i], k1 = k[3 * i + 1], k2 = k[3 * i + 2];
          if (w == 1) {
            a[0] += k1 * r[0];
            continue;
          }
          a[0] += k1 * r[0] + k2 * r[1];
          for (int64_t x = 1; x < w - 1; ++x) a[x] += k0 * r[x - 1] + k1 * r[x] + k2 * r[x + 1];
          a[w - 1] += k0 * r[w - 2] + k1 * r[w - 1];
        }
      }
      float* dst = op + b * ob + y * orow;
      transpose(acc.data(), w, dst, oc, planes, w);  // dst[x * oc + c] = acc[c * w + x]
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(esc_arch, m) {
  m.def("pad_planes(Tensor x, Tensor(a!) out) -> ()");
  m.def("conv_attn_merge(Tensor lk, Tensor x1, Tensor kernel, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(esc_arch, CPU, m) {
  m.impl("pad_planes", &pad_planes);
  m.impl("conv_attn_merge", &conv_attn_merge);
}
