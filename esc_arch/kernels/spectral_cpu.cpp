// The channel-mixing product of an FFT convolution whose filter is mirror-symmetric in both axes
// (ESC's symmetrised 13x13), for CPU inference:
//   out[b, o, u, v] = sum_i signal[b, i, u, v] K[i, o, u, v],  K[i, o, u, v] = sum_t rows[u, i, o, t] cols[t, v]
// signal and out complex (float (re, im) pairs) on the rfft2 grid (H x W), K real. About its centre
// such a filter's spectrum is a sum over its taps (a, t >= 0) of cos(2 pi u a / Hf) cos(2 pi v t / Wf)
// terms, so it factors as above with T = K // 2 + 1 terms (rows: the sums over a, cols: the cosines
// along v; esc_arch/archs/layers.py builds both). Building K on the fly costs T FMAs per real,
// where a stored spectrum (I x O x H x W floats, 33 MB for ESC at 180x320) streams from memory on
// every call: per call inside ESC's forward at 180x320 (profiler, 2 threads, Xeon), stored spectrum
// 1.97 ms, factored 0.80 ms; AVX2 builds (PyTorch held to AVX2 too) 3.04 vs 1.35 ms.
// Rows of the grid per task; a vector of positions keeps its T cosines in registers for every
// (o, i); each real of K is spread over its (re, im) pair in registers.
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <vector>

#include "parallel.h"
#include "vec.h"

namespace {

using namespace esc_arch_vec;

using F = Wide;
using V = F::T;

// one vector of F::n positions of row u for output channel o: s points at signal[b, 0, u, v0]
// (complex; stride sp floats per input channel), g at rows[u, 0, o, 0] (stride gs per input
// channel), c the cols of these positions
template <int TAPS>
inline void positions(const V (&c)[TAPS], const float* s, int64_t sp, const float* g, int64_t gs, int64_t in,
                      float* out) {
  V lo = F::zero(), hi = F::zero();  // the (re, im) pairs of the first / second half of the positions
  for (int64_t i = 0; i < in; ++i, s += sp, g += gs) {
    V k = F::mul(F::set1(g[0]), c[0]);
#pragma GCC unroll 16
    for (int t = 1; t < TAPS; ++t) k = F::fmadd(F::set1(g[t]), c[t], k);
    lo = F::fmadd(F::loadu(s), F::pairs_low(k), lo);
    hi = F::fmadd(F::loadu(s + F::n), F::pairs_high(k), hi);
  }
  F::storeu(out, lo);
  F::storeu(out + F::n, hi);
}

template <int TAPS>
void mix(const at::Tensor& signal, const at::Tensor& rows, const at::Tensor& cols, at::Tensor& out) {
  constexpr int64_t N = F::n;
  const int64_t batch = signal.size(0), in = signal.size(1), height = signal.size(2), width = signal.size(3);
  const int64_t outs = out.size(1);
  const int64_t full = width / N, rest = width - full * N, padded = (full + 1) * N;
  const int64_t plane = height * width * 2;  // floats per (b, channel) plane
  const float* sp = signal.data_ptr<float>();
  const float* gp = rows.data_ptr<float>();
  const float* cp = cols.data_ptr<float>();
  float* op = out.data_ptr<float>();
  dynamic_for(batch * height, [&](const auto& claim) {
    // cols zero-padded to whole vectors; a row's last, partial vector of signal (all channels) and output
    std::vector<float> cpad(TAPS * padded, 0.0f), tail_in(in * 2 * N, 0.0f), tail_out(2 * N);
    for (int t = 0; t < TAPS; ++t) std::copy(cp + t * width, cp + (t + 1) * width, cpad.begin() + t * padded);
    for (int64_t task; claim(task);) {
      const int64_t b = task / height, u = task % height;
      const float* s = sp + (b * in * height + u) * width * 2;  // signal[b, 0, u, 0]
      float* o = op + (b * outs * height + u) * width * 2;      // out[b, 0, u, 0]
      const float* g = gp + u * in * outs * TAPS;               // rows[u, 0, 0, 0]
      for (int64_t i = 0; rest && i < in; ++i)
        std::copy(s + i * plane + full * N * 2, s + i * plane + width * 2, tail_in.begin() + i * 2 * N);
      for (int64_t k = 0; k < full + (rest ? 1 : 0); ++k) {
        V c[TAPS];
#pragma GCC unroll 16
        for (int t = 0; t < TAPS; ++t) c[t] = F::loadu(cpad.data() + t * padded + k * N);
        for (int64_t oc = 0; oc < outs; ++oc) {
          float* dst = o + oc * plane + k * N * 2;
          if (k < full) {
            positions<TAPS>(c, s + k * N * 2, plane, g + oc * TAPS, outs * TAPS, in, dst);
          } else {
            positions<TAPS>(c, tail_in.data(), 2 * N, g + oc * TAPS, outs * TAPS, in, tail_out.data());
            std::copy(tail_out.begin(), tail_out.begin() + 2 * rest, dst);
          }
        }
      }
    }
  });
}

void spectral_mix(const at::Tensor& signal, const at::Tensor& rows, const at::Tensor& cols, at::Tensor out) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&signal, &rows, &cols, &out}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "spectral_mix: contiguous float32 CPU tensors only");
  }
  TORCH_CHECK(signal.dim() == 5 && signal.size(4) == 2 && out.dim() == 5 && out.size(4) == 2 && rows.dim() == 4
                  && cols.dim() == 2,
              "spectral_mix: signal (B, I, H, W, 2), rows (H, I, O, T), cols (T, W) and out (B, O, H, W, 2)");
  const int64_t batch = signal.size(0), in = signal.size(1), height = signal.size(2), width = signal.size(3);
  const int64_t outs = rows.size(2), taps = rows.size(3);
  TORCH_CHECK(rows.size(0) == height && rows.size(1) == in && cols.size(0) == taps && cols.size(1) == width
                  && out.size(0) == batch && out.size(1) == outs && out.size(2) == height && out.size(3) == width,
              "spectral_mix: signal (B, I, H, W, 2), rows (H, I, O, T), cols (T, W) and out (B, O, H, W, 2) "
              "must agree");
  if (out.numel() == 0) return;
  switch (taps) {
    case 2: mix<2>(signal, rows, cols, out); break;
    case 3: mix<3>(signal, rows, cols, out); break;
    case 4: mix<4>(signal, rows, cols, out); break;
    case 5: mix<5>(signal, rows, cols, out); break;
    case 6: mix<6>(signal, rows, cols, out); break;
    case 7: mix<7>(signal, rows, cols, out); break;
    case 8: mix<8>(signal, rows, cols, out); break;
    default: TORCH_CHECK(false, "spectral_mix: 2 to 8 terms (filters of 3 to 15 taps), got ", taps);
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(esc_arch, m) {
  m.def("spectral_mix(Tensor signal, Tensor rows, Tensor cols, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(esc_arch, CPU, m) {
  m.impl("spectral_mix", &spectral_mix);
}
