import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

# Installed at the top of site-packages: makes `import basicsr` work even before `import esc_arch`
# (torchvision >= 0.17 removed a module basicsr imports). A wheel's top level is site-packages on
# every Python and platform; data_files, with a path worked out when the wheel is built, are not.
PTH_FILE = 'esc_arch_tv_alias.pth'


class BuildPyWithAlias(build_py):
    """Put the .pth at the top of the build, i.e. of the wheel's purelib (site-packages)."""

    def run(self):
        super().run()
        self.copy_file(PTH_FILE, os.path.join(self.build_lib, PTH_FILE))

    def get_outputs(self, *args, **kwargs):
        return [*super().get_outputs(*args, **kwargs), os.path.join(self.build_lib, PTH_FILE)]


def _editable_wheel_with_alias():
    """PEP 660 editable wheels do not run build_py into the wheel; add the .pth to them ourselves."""
    try:
        from setuptools.command.editable_wheel import editable_wheel
    except ImportError:  # pragma: no cover - very old setuptools
        return {}

    class EditableWheel(editable_wheel):

        def _select_strategy(self, *args, **kwargs):
            strategy = super()._select_strategy(*args, **kwargs)

            class WithAlias:

                def __call__(self, wheel, files, mapping):
                    strategy(wheel, files, mapping)
                    with open(PTH_FILE, 'rb') as pth:
                        wheel.writestr(PTH_FILE, pth.read())

                def __enter__(self):
                    strategy.__enter__()
                    return self

                def __exit__(self, *exc):
                    return strategy.__exit__(*exc)

            return WithAlias()

    return {'editable_wheel': EditableWheel}


def _commands():
    return {'build_py': BuildPyWithAlias, **_editable_wheel_with_alias()}


setup(
    cmdclass=_commands(),
    name='esc-arch',
    version='0.1.0',
    description='ESC (ICCV 2025) super-resolution archs as a BasicSR plugin',
    long_description=open('README.md').read() if os.path.exists('README.md') else '',
    long_description_content_type='text/markdown',
    packages=find_packages(include=['esc_arch', 'esc_arch.*']),
    py_modules=['_esc_arch_tv_alias'],
    package_data={'esc_arch.kernels': ['*.cpp', '*.h']},  # compiled on first use (esc_arch/kernels)
    python_requires='>=3.10',
    install_requires=[
        'torch==2.14.1',
        'torchvision==0.29.1',
        'basicsr==1.4.2',
        'opencv-python',
        'numpy',
        'lmdb',
        'pyyaml',
        'tqdm',
        'safetensors',
        'scikit-image',
        'Pillow',  # image metadata: EXIF orientation, gray + alpha, truncated JPEGs
        'tifffile',  # TIFFs OpenCV cannot read (sideways-oriented ones): 16-bit colour and float kept
        'imagecodecs',  # tifffile's decoders of compressed TIFFs (LZW, Zstd, ...), which OpenCV misreads
        'ninja',  # builds the fused CPU attention kernel (torch.utils.cpp_extension)
    ],
    extras_require={
        'dev': ['pytest', 'ruff', 'matplotlib'],
        'bench': ['matplotlib'],
        'export': ['onnx', 'onnxruntime'],
    },
    entry_points={'console_scripts': ['basicsr = esc_arch.cli:main']},
)
