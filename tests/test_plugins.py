"""``--import``: archs of the user's own modules are benchmarked, trained and tested like BasicSR's."""
import json
import re
import sys
import uuid
from pathlib import Path

import pytest
from test_train import basicsr, make_pairs, paired, train_options, write_yaml

from esc_arch.cli import main as cli_main
from esc_arch.plugins import PluginImportError, import_arch_modules

BLOCKS = '''
import torch.nn as nn


def conv3x3(cin, cout):
    return nn.Conv2d(cin, cout, 3, padding=1)
'''

ARCH = '''
import torch.nn as nn
from basicsr.utils.registry import ARCH_REGISTRY

from {blocks} import conv3x3  # a neighbour of this file


@ARCH_REGISTRY.register()
class {name}(nn.Module):
    def __init__(self, num_feat=8, upscale=2):
        super().__init__()
        self.body = conv3x3(3, num_feat)
        self.up = nn.Sequential(conv3x3(num_feat, 3 * upscale ** 2), nn.PixelShuffle(upscale))

    def forward(self, x):
        return self.up(self.body(x))
'''


def write_arch(folder: Path):
    """A user's arch file (and a module it imports) registering a new arch; ARCH_REGISTRY is
    global to the process, so every call names its arch afresh."""
    tag = uuid.uuid4().hex[:8]
    name, blocks = f'UserNet{tag}', f'user_blocks_{tag}'
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f'{blocks}.py').write_text(BLOCKS)
    path = folder / f'user{tag}_arch.py'
    path.write_text(ARCH.format(name=name, blocks=blocks))
    return path, name


def test_bench_measures_an_imported_arch(tmp_path, capsys):
    path, name = write_arch(tmp_path / 'mine')
    out = tmp_path / 'records'
    assert cli_main(['bench', '--arch', name, '--lr-size', '8x12']) == 2  # not registered without --import
    assert f"unknown arch '{name}'" in capsys.readouterr().err
    code = cli_main(['bench', '--import', str(path), '--arch', f'{name}:num_feat=8,upscale=2', '--lr-size', '8x12',
                     '--runs', '1', '--warmup', '0', '--out', str(out), '--no-progress', '--plot', ''])
    assert code == 0, capsys.readouterr().err
    [record] = [json.loads(p.read_text()) for p in out.glob('*.json')]  # measured in a child process
    assert record['type'] == name and record['imports'] == [str(path)]
    assert record['params'] == (3 * 8 * 9 + 8) + (8 * 12 * 9 + 12)
    assert record['flops'] == 2 * 8 * 12 * (3 * 8 * 9 + 8 * 12 * 9)  # the two convs at LR size
    assert record['output_size'] == [16, 24]


def test_train_then_test_an_imported_arch(tmp_path):
    data = make_pairs(tmp_path / 'data')
    path, name = write_arch(tmp_path / 'mine')
    opt = train_options(data, name='user', total_iter=2)
    opt['network_g'] = dict(type=name, num_feat=8, upscale=4)
    opt_file = write_yaml(tmp_path / 'train.yml', opt)
    result = basicsr('train', '-opt', opt_file, cwd=tmp_path)
    assert result.returncode == 2 and f"unknown arch '{name}'" in result.stderr
    result = basicsr('train', '--import', tmp_path / 'mine', '-opt', opt_file, cwd=tmp_path)  # the folder
    assert result.returncode == 0, result.stderr[-3000:]
    weights = tmp_path / 'experiments' / 'user' / 'models' / 'net_g_latest.pth'
    assert weights.is_file()
    test_opt = dict(name='user_test', model_type='ESCSRModel', scale=4, num_gpu=0,
                    datasets=dict(test_1=paired('usertest', data)), network_g=opt['network_g'],
                    path=dict(pretrain_network_g=str(weights), param_key_g='params_ema', strict_load_g=True),
                    val=dict(save_img=False, metrics=dict(psnr=dict(type='calculate_psnr', crop_border=4))))
    result = basicsr('test', '--import', path, '-opt', write_yaml(tmp_path / 'test.yml', test_opt), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r'# psnr: \d+\.\d+', result.stdout + result.stderr)


def test_import_errors_name_the_item(tmp_path, capsys):
    broken = tmp_path / 'broken_arch.py'
    broken.write_text('def f(:\n')
    taken = tmp_path / 'taken_arch.py'  # registers a name BasicSR already has
    taken.write_text('import torch.nn as nn\nfrom basicsr.utils.registry import ARCH_REGISTRY\n\n\n'
                     '@ARCH_REGISTRY.register()\nclass EDSR(nn.Module):\n    pass\n')
    (tmp_path / 'empty').mkdir()
    cases = {'no_such_module_xyz': "No module named 'no_such_module_xyz'",
             str(tmp_path / 'absent.py'): 'no such file or folder',
             str(broken): 'syntax error in', str(taken): "'EDSR'",
             str(tmp_path / 'empty'): 'no *_arch.py files'}
    for item, expected in cases.items():
        with pytest.raises(PluginImportError, match=re.escape(expected)) as info:
            import_arch_modules([item])
        assert str(info.value).startswith(f'--import {item}: ') and '\n' not in str(info.value)
    folder = tmp_path / 'folder'  # a folder: the failing one of its files is named
    folder.mkdir()
    (folder / 'a_arch.py').write_text('')
    (folder / 'bad_arch.py').write_text('import no_such_module_xyz\n')
    with pytest.raises(PluginImportError) as info:
        import_arch_modules([str(folder)])
    assert str(info.value) == (f"--import {folder} (bad_arch.py): ModuleNotFoundError: No module named "
                               "'no_such_module_xyz'")
    assert cli_main(['bench', '--import', 'no_such_module_xyz', '--preset', 'esc']) == 2
    err = capsys.readouterr().err.strip()
    assert err == "basicsr bench: error: --import no_such_module_xyz: ModuleNotFoundError: No module named " \
                  "'no_such_module_xyz'"
    assert cli_main(['train', '--import', str(broken), '-opt', str(tmp_path / 'x.yml')]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('basicsr train: error: --import') and 'line 1' in err[0]


def test_a_module_that_exits_on_import_is_one_line_naming_it(tmp_path):
    # e.g. arch code that quits where an optional package is missing: its message alone named nothing
    exiting = tmp_path / 'exiting_arch.py'
    exiting.write_text('import sys\nsys.exit("install mamba_ssm first")\n')
    for item, where in ((exiting, exiting), (tmp_path, f'{tmp_path} (exiting_arch.py)')):
        with pytest.raises(PluginImportError) as info:
            import_arch_modules([str(item)])
        assert str(info.value) == f'--import {where}: SystemExit: install mamba_ssm first'


def test_an_item_is_imported_once(tmp_path):
    path, name = write_arch(tmp_path / 'mine')
    first = import_arch_modules([str(path)])
    assert import_arch_modules([str(path), str(path)]) == first * 2  # registering twice would raise
    from basicsr.utils.registry import ARCH_REGISTRY
    assert name in ARCH_REGISTRY


def test_a_bare_package_name_is_a_module_not_a_folder(tmp_path, monkeypatch):
    tag = uuid.uuid4().hex[:8]
    package = tmp_path / f'userpkg{tag}'
    package.mkdir()
    (package / '__init__.py').write_text(f'from . import net{tag}_arch  # noqa: F401\n')
    (package / f'user_blocks_{tag}.py').write_text(BLOCKS)
    (package / f'net{tag}_arch.py').write_text(ARCH.format(name=f'PkgNet{tag}', blocks=f'.user_blocks_{tag}'))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, 'path', list(sys.path))  # the import puts the current folder on it
    assert import_arch_modules([package.name]) == [package.name]  # the package, with its relative imports
    from basicsr.utils.registry import ARCH_REGISTRY
    assert f'PkgNet{tag}' in ARCH_REGISTRY


def test_a_folder_and_a_file_in_it_import_the_file_once(tmp_path):
    path, name = write_arch(tmp_path / 'both')
    import_arch_modules([str(path.parent), str(path)])  # registering twice would raise
    from basicsr.utils.registry import ARCH_REGISTRY
    assert name in ARCH_REGISTRY


def test_a_folders_arch_files_may_import_one_another(tmp_path):
    # a neighbour imported by name (as a file's folder is on sys.path for) is the module the folder's
    # import runs, before and after its turn: it was a second copy, which registered its arch again
    tag = uuid.uuid4().hex[:8]
    folder = tmp_path / f'neighbours_{tag}'
    folder.mkdir()
    (folder / f'm{tag}_arch.py').write_text('import torch.nn as nn\nfrom basicsr.utils.registry import ARCH_REGISTRY\n'
                                            f'\n\n@ARCH_REGISTRY.register()\nclass MNet{tag}(nn.Module):\n    pass\n')
    for first in 'az':  # imported before m{tag}_arch.py, and after it
        (folder / f'{first}{tag}_arch.py').write_text(f'from m{tag}_arch import MNet{tag}  # noqa: F401\n')
    import_arch_modules([str(folder)])
    from basicsr.utils.registry import ARCH_REGISTRY
    assert f'MNet{tag}' in ARCH_REGISTRY


def test_a_bare_name_of_a_module_file_here_is_imported(tmp_path, monkeypatch):
    path, name = write_arch(tmp_path / 'here')
    monkeypatch.chdir(path.parent)
    monkeypatch.setattr(sys, 'path', list(sys.path))
    assert import_arch_modules([path.stem]) == [path.stem]  # `--import user..._arch`, as python -m finds it
    from basicsr.utils.registry import ARCH_REGISTRY
    assert name in ARCH_REGISTRY


def test_a_folders_arch_files_are_imported_in_name_order(tmp_path):
    # as BasicSR imports its own archs: the order is the files' names, not the folder listing's
    folder = tmp_path / f'order_{uuid.uuid4().hex[:8]}'
    folder.mkdir()
    log = tmp_path / 'order.txt'
    for name in ('b', 'a', 'd', 'c'):
        (folder / f'{name}_arch.py').write_text(f'with open({str(log)!r}, "a") as f:\n    f.write("{name}")\n')
    import os
    real = os.listdir
    try:
        os.listdir = lambda path='.': list(reversed(sorted(real(path))))  # what a file system may return
        import_arch_modules([str(folder)])
    finally:
        os.listdir = real
    assert log.read_text() == 'abcd'
