// The channel-mixing product of an FFT convolution with a real spectrum, for CPU inference:
//   out[b, o, p] = sum_i signal[b, i, p] * kernel[i, o, p]
// signal and out complex (float (re, im) pairs), kernel real. A filter symmetric under rotation by
// 180 degrees (ESC's symmetrised 13x13) has a real spectrum about its centre: half the memory of
// a complex one, and the kernel spectrum (in x out x positions) is the big operand here, read
// once per call. Blocks of positions per task; the signal block stays in L1 while every (i, o)
// pair streams its kernel values, each real spread over its (re, im) pair in registers.
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

#include "vec.h"

namespace {

using namespace esc_arch_vec;

using F = Wide;
using T = F::T;
constexpr int kVectors = 4;  // a block: 4 vectors of positions, 8 accumulators ((re, im) pairs)
constexpr int64_t kBlock = kVectors * F::n;

// out[o, 0:kBlock] for one image; s: its signal at the block's first position (stride sp per
// input channel, in floats), k: the kernel at (0, o, first position) (stride ks per input channel)
inline void full_block(const float* s, int64_t sp, const float* k, int64_t ks, int64_t in, float* out) {
  T acc[2 * kVectors];
#pragma GCC unroll 8
  for (int t = 0; t < 2 * kVectors; ++t) acc[t] = F::zero();
  for (int64_t i = 0; i < in; ++i, s += sp, k += ks) {
#pragma GCC unroll 4
    for (int v = 0; v < kVectors; ++v) {
      const T kv = F::loadu(k + v * F::n);
      acc[2 * v] = F::fmadd(F::loadu(s + 2 * v * F::n), F::pairs_low(kv), acc[2 * v]);
      acc[2 * v + 1] = F::fmadd(F::loadu(s + 2 * v * F::n + F::n), F::pairs_high(kv), acc[2 * v + 1]);
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < 2 * kVectors; ++t) F::storeu(out + t * F::n, acc[t]);
}

void spectral_mac(const at::Tensor& signal, const at::Tensor& kernel, at::Tensor out) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&signal, &kernel, &out}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "spectral_mac: contiguous float32 CPU tensors only");
  }
  TORCH_CHECK(signal.dim() == 4 && signal.size(3) == 2 && kernel.dim() == 3 && out.dim() == 4 && out.size(3) == 2,
              "spectral_mac: signal (B, I, P, 2), kernel (I, O, P) and out (B, O, P, 2)");
  const int64_t batch = signal.size(0), in = signal.size(1), positions = signal.size(2), outs = kernel.size(1);
  TORCH_CHECK(kernel.size(0) == in && kernel.size(2) == positions && out.size(0) == batch && out.size(1) == outs
                  && out.size(2) == positions,
              "spectral_mac: signal (B, I, P, 2), kernel (I, O, P) and out (B, O, P, 2) must agree");
  const float* sp = signal.data_ptr<float>();
  const float* kp = kernel.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t blocks = (positions + kBlock - 1) / kBlock;
  // each block reads its kernel values once for the whole batch; the signal block stays in L1
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t p0 = blk * kBlock, count = std::min(kBlock, positions - p0);
      for (int64_t o = 0; o < outs; ++o) {
        const float* k = kp + o * positions + p0;
        for (int64_t b = 0; b < batch; ++b) {
          const float* s = sp + (b * in * positions + p0) * 2;
          float* ob = op + ((b * outs + o) * positions + p0) * 2;
          if (count == kBlock) {
            full_block(s, positions * 2, k, outs * positions, in, ob);
            continue;
          }
          for (int64_t j = 0; j < count; ++j) {  // the last, partial block
            float re = 0.0f, im = 0.0f;
            for (int64_t i = 0; i < in; ++i) {
              const float kv = k[i * outs * positions + j];
              re += s[i * positions * 2 + 2 * j] * kv;
              im += s[i * positions * 2 + 2 * j + 1] * kv;
            }
            ob[2 * j] = re;
            ob[2 * j + 1] = im;
          }
        }
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(esc_arch, m) {
  m.def("spectral_mac(Tensor signal, Tensor kernel, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(esc_arch, CPU, m) {
  m.impl("spectral_mac", &spectral_mac);
}
