import contextlib
import json
import os
from pathlib import Path

import pytest
import torch

import esc_arch  # noqa: F401  (registers the archs, makes basicsr importable)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get('ESC_SHARED', REPO.parent / 'shared'))
REFERENCE = SHARED / 'reference'


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """A full disk, as far as this process's writes go: files cannot grow past ``nbytes`` (Python
    ignores SIGXFSZ, so a write past it fails with EFBIG). Capture output with capsys, not capfd."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def tiny_config(**overrides):
    config = dict(dim=16, pdim=4, kernel_size=7, n_blocks=1, conv_blocks=2, window_size=4, num_heads=2,
                  upscaling_factor=2, exp_ratio=1.25)
    config.update(overrides)
    return config


def run_in_threads(work, count: int) -> None:
    """work(0), ..., work(count - 1), each in a thread of its own, started together; returns when all end."""
    import threading
    threads = [threading.Thread(target=work, args=(index, )) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Give every parameter non-trivial values (e.g. the zero-initialised dynamic-kernel head)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * scale)
    return model


@pytest.fixture(scope='session')
def layouts():
    path = REFERENCE / 'checkpoint_layouts.json'
    if not path.exists():
        pytest.fail(f'reference layouts not found at {path} (set ESC_SHARED to the shared/ folder)')
    return json.loads(path.read_text())


def load_fixture(name):
    path = REFERENCE / name
    if not path.exists():
        pytest.fail(f'parity fixture not found at {path} (set ESC_SHARED to the shared/ folder)')
    return torch.load(path, map_location='cpu', weights_only=False)


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(2)
    yield
