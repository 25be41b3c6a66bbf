"""Make ``torchvision.transforms.functional_tensor`` importable again.

BasicSR 1.4.2 imports ``rgb_to_grayscale`` from that module, which torchvision removed in
0.17. This tiny module is imported at interpreter start-up by ``esc_arch_tv_alias.pth``
(installed with the package) and by ``esc_arch`` itself, so ``import basicsr`` works before
or after ``import esc_arch``. It adds a lazy import hook: nothing is imported until somebody
asks for the removed module, and a real module of that name, if one exists, always wins.
"""
import importlib.abc
import importlib.util
import sys

ALIASED = 'torchvision.transforms.functional_tensor'


class _Loader(importlib.abc.Loader):

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        from torchvision.transforms import functional

        module.rgb_to_grayscale = functional.rgb_to_grayscale


class _Finder(importlib.abc.MetaPathFinder):

    def find_spec(self, fullname, path, target=None):
        if fullname != ALIASED:
            return None
        for finder in sys.meta_path:  # a real module of that name wins
            if finder is self or not hasattr(finder, 'find_spec'):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                return spec
        return importlib.util.spec_from_loader(fullname, _Loader())


def install():
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


install()
