// Dynamic scheduling for the CPU kernels, on PyTorch's intra-op threads: at::parallel_for cuts a
// range into one fixed run per thread, so on a shared machine a thread whose core is busy with
// another process holds every other thread at the end. Here each thread claims the next task
// from a shared counter whenever it is done with its last one: a slowed core simply does fewer.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace esc_arch_vec {

// Calls body(claim) once on each of up to at::get_num_threads() threads (scratch memory belongs
// there); claim(task) sets the next of the n tasks and returns false when none is left. Every task
// is claimed exactly once.
template <class Body>
void dynamic_for(int64_t n, const Body& body) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  auto claim = [&](int64_t& task) {
    task = next.fetch_add(1, std::memory_order_relaxed);
    return task < n;
  };
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, threads, 1, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) body(claim);
  });
}

}  // namespace esc_arch_vec
