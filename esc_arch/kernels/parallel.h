// Dynamic scheduling for the CPU kernels, on PyTorch's intra-op threads: at::parallel_for cuts a
// range into one fixed run per thread, so on a shared machine a thread whose core is busy with
// another process holds every other thread at the end. Here each thread claims the next few tasks
// from a shared counter whenever it is done with its last ones: a slowed core simply does fewer.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace esc_arch_vec {

// Calls body(claim) once on each of up to at::get_num_threads() threads (scratch memory belongs
// there); claim(begin, end) sets the next run of at most `grain` of the n tasks and returns false
// when none is left. Every task is claimed exactly once.
template <class Body>
void dynamic_for(int64_t n, int64_t grain, const Body& body) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  auto claim = [&](int64_t& begin, int64_t& end) {
    begin = next.fetch_add(grain, std::memory_order_relaxed);
    end = std::min(begin + grain, n);
    return begin < n;
  };
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (n + grain - 1) / grain));
  at::parallel_for(0, threads, 1, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) body(claim);
  });
}

}  // namespace esc_arch_vec
