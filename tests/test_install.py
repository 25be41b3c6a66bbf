"""The package as installed: the import hook that lets PyPI's basicsr import with current
torchvision, and the wheel that carries it."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_basicsr_imports_first_in_a_fresh_interpreter():
    # the installed esc_arch_tv_alias.pth loads the hook at start-up: no esc_arch import needed
    code = ('import sys; assert "_esc_arch_tv_alias" in sys.modules, "the .pth did not run"; '
            'import basicsr; from basicsr.data import degradations; '
            'assert "esc_arch" not in sys.modules; print(degradations.rgb_to_grayscale.__module__)')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd='/')
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().startswith('torchvision.transforms')


def test_the_wheel_puts_the_hook_at_the_top_of_site_packages(tmp_path):
    # a wheel's top level is site-packages on any Python; a data_files path computed at build time
    # (lib/python3.11/site-packages) lands outside sys.path on another version or platform
    source = tmp_path / 'src'
    shutil.copytree(ROOT / 'esc_arch', source / 'esc_arch', ignore=shutil.ignore_patterns('__pycache__'))
    for name in ('setup.py', 'README.md', '_esc_arch_tv_alias.py', 'esc_arch_tv_alias.pth'):
        shutil.copy(ROOT / name, source / name)
    result = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', '--no-build-isolation',
                             '-w', str(tmp_path / 'wheel'), str(source)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel, ) = (tmp_path / 'wheel').glob('esc_arch-*.whl')
    names = zipfile.ZipFile(wheel).namelist()
    assert {'esc_arch_tv_alias.pth', '_esc_arch_tv_alias.py', 'esc_arch/kernels/window_attention_cpu.cpp'} <= set(names)
    assert not [name for name in names if '.data/' in name]
    assert zipfile.ZipFile(wheel).read('esc_arch_tv_alias.pth').decode().strip() == 'import _esc_arch_tv_alias'
