import subprocess
import sys

import pytest

SCRIPT = '''
import resource, sys, torch
import esc_arch
if sys.argv[1] == 'tuned':
    assert esc_arch.tune_cpu_allocator()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
with torch.inference_mode():
    for _ in range(20):
        # 64 MiB temporaries, as a forward pass at 720p makes them (above glibc's dynamic mmap
        # threshold cap of 32 MiB, so a plain process maps and faults them in every time)
        torch.ones(1 << 24) + 1
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
'''


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc allocator settings are Linux-only')
def test_tuned_allocator_reuses_memory_instead_of_faulting_it_in():
    faults = {}
    for mode in ('plain', 'tuned'):
        out = subprocess.run([sys.executable, '-c', SCRIPT, mode], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        faults[mode] = int(out.stdout.split()[-1])
    assert faults['tuned'] * 3 < faults['plain'], faults
