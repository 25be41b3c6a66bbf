"""Every option file parses with BasicSR's parser and builds its networks; generated files are current."""
import glob
import hashlib
import importlib.util
import os
import sys

import pytest
import torch
import yaml
from basicsr.data import DATASET_REGISTRY
from basicsr.utils.options import ordered_yaml, parse_options
from basicsr.utils.registry import ARCH_REGISTRY, MODEL_REGISTRY

import esc_arch  # noqa: F401  (before basicsr)
from esc_arch.data import demo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONS = os.path.join(REPO, 'options')
TRAIN_FILES = sorted(glob.glob(os.path.join(OPTIONS, '*.yml')))
TEST_FILES = sorted(glob.glob(os.path.join(OPTIONS, 'test', '*.yml')))
RELEASED = [f'{variant}_X{s}' for variant in ('ESC_light', 'ESC_DIV2K', 'ESC_DFLIP', 'ESC_XL_DF2K', 'ESC_FP')
            for s in (2, 3, 4)] + ['ESC_Real_X4']


def _parse(path, monkeypatch, is_train):
    monkeypatch.setattr(sys, 'argv', ['basicsr', '-opt', path])
    opt, _ = parse_options(REPO, is_train=is_train)
    return opt


def _load_generator():
    spec = importlib.util.spec_from_file_location('make_options', os.path.join(OPTIONS, 'make_options.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_expected_files_exist():
    names = {os.path.basename(p) for p in TRAIN_FILES}
    for run in ('ESC', 'ESC_light', 'ESC_XL', 'ESC_FP'):
        assert {f'train_{run}_SRx{s}.yml' for s in (2, 3, 4)} <= names
    assert {'train_ESC_Real_x4_MSE.yml', 'train_ESC_Real_x4_GAN.yml', 'train_ESC_demo.yml'} <= names
    assert 'train_ESC_FB_R48_SRx2.yml' in names  # the authors' FlashBias recipe
    assert {os.path.basename(p) for p in TEST_FILES} == {f'test_{n}.yml' for n in RELEASED} | {
        'test_ESC_DIV2K_FB_R48_X2.yml', 'test_ESC_Real_FB_R48_GAN_X4.yml'}


def test_generated_files_are_up_to_date():
    generated = _load_generator().all_options()
    on_disk = {os.path.relpath(p, OPTIONS): p for p in TRAIN_FILES + TEST_FILES}
    assert set(generated) == set(on_disk)
    for rel, opt in generated.items():
        with open(on_disk[rel]) as f:
            assert yaml.safe_load(f) == opt, f'{rel} is stale: run python options/make_options.py'


def test_no_value_is_shared_between_two_settings():
    # YAML aliases (kernel_list2: *id001) made an edit of the first degradation's kernels, or of the
    # generator's betas, change the second's / the discriminator's too
    for path in TRAIN_FILES + TEST_FILES:
        with open(path) as f:
            events = list(yaml.parse(f))
        assert not any(isinstance(e, yaml.AliasEvent) or getattr(e, 'anchor', None) for e in events), path


@pytest.mark.parametrize('path', TRAIN_FILES + TEST_FILES, ids=lambda p: os.path.relpath(p, OPTIONS))
def test_option_file_parses_and_builds(path, monkeypatch):
    is_train = os.path.basename(os.path.dirname(path)) != 'test'
    opt = _parse(path, monkeypatch, is_train)
    MODEL_REGISTRY.get(opt['model_type'])
    for name, dataset in opt['datasets'].items():
        DATASET_REGISTRY.get(dataset['type'])
        assert dataset['scale'] == opt['scale']
        assert name.startswith('train' if name == 'train' else ('val' if is_train else 'test'))
    net_opt = dict(opt['network_g'])
    net = ARCH_REGISTRY.get(net_opt.pop('type'))(**net_opt)
    assert net.upscaling_factor == opt['scale']
    if 'network_d' in opt:
        d_opt = dict(opt['network_d'])
        ARCH_REGISTRY.get(d_opt.pop('type'))(**d_opt)
    if is_train and 'val' in opt:
        for metric in opt['val']['metrics'].values():
            assert metric['crop_border'] == opt['scale'] and metric['test_y_channel'] is True
    if not is_train:
        assert opt['path']['pretrain_network_g'] == f'pretrained/{opt["name"][len("test_"):]}.pth'
        assert opt['path']['param_key_g'] == 'params_ema'
        # the released checkpoint's layout (what esc_arch.load_model infers) is what the file builds
        arch, config = esc_arch.infer_config(net.state_dict())
        assert arch == opt['network_g']['type']
        for key, value in config.items():
            assert opt['network_g'].get(key, value) == pytest.approx(value), key


def test_larger_scales_start_from_the_x2_run(monkeypatch):
    for run in ('ESC', 'ESC_light', 'ESC_XL', 'ESC_FP'):
        x2 = _parse(os.path.join(OPTIONS, f'train_{run}_SRx2.yml'), monkeypatch, True)
        assert x2['path']['pretrain_network_g'] is None
        for scale in (3, 4):
            opt = _parse(os.path.join(OPTIONS, f'train_{run}_SRx{scale}.yml'), monkeypatch, True)
            assert opt['path']['pretrain_network_g'] == f'experiments/{x2["name"]}/models/net_g_latest.pth'
            assert opt['path']['param_key_g'] == 'params_ema' and opt['path']['strict_load_g'] is True
            assert opt['network_g'] == dict(x2['network_g'], upscaling_factor=scale)
    mse = _parse(os.path.join(OPTIONS, 'train_ESC_Real_x4_MSE.yml'), monkeypatch, True)
    gan = _parse(os.path.join(OPTIONS, 'train_ESC_Real_x4_GAN.yml'), monkeypatch, True)
    assert gan['path']['pretrain_network_g'] == f'experiments/{mse["name"]}/models/net_g_latest.pth'


def test_demo_config_runs_a_forward_pass(monkeypatch):
    opt = _parse(os.path.join(OPTIONS, 'train_ESC_demo.yml'), monkeypatch, True)
    assert opt['num_gpu'] == 0
    assert opt['datasets']['train']['num_worker_per_gpu'] <= 2
    net_opt = dict(opt['network_g'])
    net = ARCH_REGISTRY.get(net_opt.pop('type'))(**net_opt).eval()
    scale = opt['scale']
    with torch.no_grad():
        out = net(torch.rand(1, 3, 12, 20))
    assert out.shape == (1, 3, 12 * scale, 20 * scale) and torch.isfinite(out).all()


def test_demo_config_validates_on_held_out_images(monkeypatch):
    opt = _parse(os.path.join(OPTIONS, 'train_ESC_demo.yml'), monkeypatch, True)
    paths = demo.demo_paths(opt['demo_root'])
    train, val = opt['datasets']['train'], opt['datasets']['val']
    scale = opt['scale']
    assert (train['dataroot_gt'], train['dataroot_lq']) == (paths['train']['HR'], paths['train'][f'X{scale}'])
    assert (val['dataroot_gt'], val['dataroot_lq']) == (paths['val']['HR'], paths['val'][f'X{scale}'])
    assert demo.ensure_demo_data_for_options.__module__ == demo.__name__
    # disjoint by name and by content (skimage has aliases, e.g. cat is chelsea)
    assert not set(demo.TRAIN_IMAGES) & set(demo.VAL_IMAGES)

    def digest(name):
        return hashlib.sha1(demo._load_sample(name).tobytes()).hexdigest()

    assert not {digest(n) for n in demo.TRAIN_IMAGES} & {digest(n) for n in demo.VAL_IMAGES}


def test_yaml_loads_with_basicsr_loader():
    for path in TRAIN_FILES + TEST_FILES:
        with open(path) as f:
            opt = yaml.load(f, Loader=ordered_yaml()[0])
        assert opt['name'] == os.path.splitext(os.path.basename(path))[0]


@pytest.mark.parametrize('path', TRAIN_FILES + TEST_FILES, ids=lambda p: os.path.relpath(p, OPTIONS))
def test_option_file_passes_the_pre_checks(path, capsys):
    # the checks basicsr train/test run before anything (scale, metrics, optimizers, losses, arch
    # argument types, unread train keys) accept every shipped file: no false alarms
    from esc_arch.commands import _pipeline
    opt = _pipeline.load_options(path)
    _pipeline._check_scale(opt, path)
    _pipeline._check_metrics(opt, path)
    _pipeline._check_networks(opt, path)
    _pipeline._check_path_keys(opt['path'], path)
    training = os.path.basename(os.path.dirname(path)) != 'test'
    for phase, dataset in opt['datasets'].items():
        _pipeline._data_checks.check_required_keys(phase, dataset, opt, path)
        if phase == 'train':
            _pipeline._data_checks.check_loader_settings(dataset, path)
    if training:
        _pipeline._check_train_section(opt, path)
        _pipeline._warn_unread_keys(opt, 'train', _pipeline.TRAIN_KEYS)
    _pipeline._warn_unread_keys(opt, 'val', _pipeline.VAL_KEYS)
    assert 'warning' not in capsys.readouterr().err


def test_arch_options_problem_names_what_does_not_bind():
    from esc_arch.arch_options import options_problem

    def net(scale, /, dim: int, ratio: float = 2.0, use_ln: bool = False, name: str = 'n'):
        pass

    def typed(*, dim: int, ratio: float = 2.0, use_ln: bool = False, name: str = 'n'):
        pass

    def open_net(dim: int, **kwargs):
        pass

    assert options_problem(net, {'dim': 8}) == 'missing option(s) scale; it takes: scale, dim, ratio, use_ln, name'
    assert options_problem(net, {'scale': 2, 'dim': 8}).startswith('unknown option(s) scale;')  # positional-only
    assert options_problem(net, {'dim': 8, 'foo': 1, 'bar': 2}).startswith('unknown option(s) bar, foo; missing')
    assert options_problem(typed, {'dim': 8, 'ratio': 3, 'use_ln': True, 'name': 'x'}) is None  # int for float
    for key, value in (('dim', '8'), ('dim', True), ('dim', 8.0), ('ratio', 'x'), ('use_ln', 1), ('name', 3)):
        assert options_problem(typed, {'dim': 8, key: value}) == \
            f'{key} must be {typed.__annotations__[key].__name__}, got {value!r}'
    assert options_problem(open_net, {'dim': 8, 'anything': 1}) is None  # **kwargs takes any name
    assert options_problem(open_net, {'dim': '8'}) == "dim must be int, got '8'"
    assert options_problem(open_net, {}).startswith('missing option(s) dim')


def test_suffixed_arch_names_are_found_without_basicsrs_alarm(capsys, monkeypatch):
    # the GAN file's network_d is UNetDiscriminatorSN, which BasicSR registers as
    # UNetDiscriminatorSN_basicsr: its lookup printed "Name UNetDiscriminatorSN is not found"
    from basicsr.utils.registry import Registry

    from esc_arch.commands import _pipeline
    original = Registry.get  # BasicSR's own, also after a run in this process installed the quiet one
    original = original.__wrapped__ if getattr(original, 'quiet_suffixed', False) else original
    assert original(ARCH_REGISTRY, 'UNetDiscriminatorSN').__name__ == 'UNetDiscriminatorSN'
    assert 'Name UNetDiscriminatorSN is not found' in capsys.readouterr().out
    monkeypatch.setattr(Registry, 'get', _pipeline._quiet_suffixed_get(original))
    path = os.path.join(OPTIONS, 'train_ESC_Real_x4_GAN.yml')
    _pipeline._check_networks(_pipeline.load_options(path), path)
    assert ARCH_REGISTRY.get('UNetDiscriminatorSN') is original(ARCH_REGISTRY, 'UNetDiscriminatorSN_basicsr')
    assert 'is not found' not in capsys.readouterr().out
    with pytest.raises(KeyError, match='NoSuchArch'):
        ARCH_REGISTRY.get('NoSuchArch')


def test_shipped_test_files_pair_the_benchmark_packs_naming(tmp_path, monkeypatch):
    # the benchmark packs (and the authors' option files) name LR files <name>x<s>.png in LR_bicubic/X<s>;
    # the shipped test files paired same names only ("4 file(s) in only one of ...")
    import argparse

    import cv2
    import numpy as np

    from esc_arch.commands._pipeline import OptionError, check_options, load_options
    monkeypatch.chdir(tmp_path)
    for folder in ('Set5', 'Set14', 'B100', 'Urban100', 'Manga109'):
        for side, name, size in (('HR', 'baby.png', 32), ('LR_bicubic/X4', 'babyx4.png', 8)):
            os.makedirs(f'datasets/Benchmarks/{folder}/{side}', exist_ok=True)
            cv2.imwrite(f'datasets/Benchmarks/{folder}/{side}/{name}', np.zeros((size, size, 3), np.uint8))
    opt = load_options(os.path.join(OPTIONS, 'test', 'test_ESC_DIV2K_X4.yml'))
    network = {k: v for k, v in opt['network_g'].items() if k != 'type'}
    os.makedirs('pretrained')
    torch.save({'params_ema': esc_arch.ESC(**network).state_dict()}, opt['path']['pretrain_network_g'])
    flags = argparse.Namespace(auto_resume=False, launcher='none', debug=False)
    check_options(opt, 'test_ESC_DIV2K_X4.yml', False, flags)
    opt['datasets']['test_1']['filename_tmpl'] = '{}'  # as the files were: the fitting template is named
    with pytest.raises(OptionError, match=r"in only one of .*; GT and LQ files pair by name; "
                                          r"filename_tmpl '\{\}x4' pairs them$"):
        check_options(opt, 'test_ESC_DIV2K_X4.yml', False, flags)
    os.rename('datasets/Benchmarks/Set14/LR_bicubic/X4/babyx4.png', 'datasets/Benchmarks/Set14/LR_bicubic/X4/baby.png')
    opt['datasets']['test_1']['filename_tmpl'] = '{}x4'  # same names (an LRbicx4 folder) with '{}x4'
    with pytest.raises(OptionError, match=r"cannot pair .*Set14.* with filename_tmpl '\{\}x4': .* "
                                          r"filename_tmpl '\{\}' pairs them$"):
        check_options(opt, 'test_ESC_DIV2K_X4.yml', False, flags)
