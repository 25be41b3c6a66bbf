"""`basicsr prepare` (sub-images, bicubic LR, LMDB) and the embedded demo data set."""
import io
import os
import shutil
import warnings

import cv2
import numpy as np
import pytest
import torch
from basicsr.data.paired_image_dataset import PairedImageDataset
from basicsr.utils.matlab_functions import imresize
from conftest import file_size_limit

import esc_arch  # noqa: F401  (before basicsr)
from esc_arch.cli import main as cli_main
from esc_arch.data import demo, image_files
from esc_arch.data.prepare import build_lmdb, output_folders, patch_origins, prepare_dataset

CROP, STEP, THRESH = 48, 24, 8
# (h, w) -> patches, counted by hand with BasicSR's rule (origins range(0, L - crop + 1, step), plus
# L - crop when the remainder exceeds thresh), origins aligned to lcm(2, 3, 4) = 12:
#   108: 0 24 48, remainder 12 > 8 -> +60          132: 0 24 48 72, remainder 12 > 8 -> +84
#    96: 0 24 48, remainder 0                       100: 0 24 48, remainder 4 > 8? no
#   130: 0 24 48 72, remainder 10 > 8 -> 82, aligned down to 72 = last origin -> dropped
SIZES = {'a': ((108, 132), 4 * 5), 'b': ((96, 96), 3 * 3), 'c': ((100, 130), 3 * 4)}


def test_patch_origins_follow_basicsr_rule():
    assert patch_origins(108, 48, 24, 8) == [0, 24, 48, 60]
    assert patch_origins(108, 48, 24, 12) == [0, 24, 48]  # remainder 12 is not above thresh 12
    assert patch_origins(100, 48, 24, 2) == [0, 24, 48, 52]  # unaligned: BasicSR's last patch
    assert patch_origins(100, 48, 24, 2, align=12) == [0, 24, 48]  # 52 -> 48, already there
    assert patch_origins(40, 48, 24, 8) == []


def _make_hr(folder):
    rng = np.random.default_rng(0)
    os.makedirs(folder)
    for name, ((h, w), _) in SIZES.items():
        # smooth random images: bicubic of noise would be dominated by the clipping
        small = rng.integers(0, 256, (h // 4 + 2, w // 4 + 2, 3), dtype=np.uint8)
        cv2.imwrite(os.path.join(folder, f'{name}.png'), cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC))
    return folder


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp('prep')
    hr = _make_hr(str(root / 'Tiny_HR'))
    out = str(root / 'out')
    result = prepare_dataset(hr, out, scales=(2, 3, 4), crop=CROP, step=STEP, thresh=THRESH, workers=1,
                             progress=False)
    return hr, out, result


def test_prepare_counts_sizes_and_names(prepared):
    hr, out, result = prepared
    hr_sub, lr_subs = output_folders(hr, out, (2, 3, 4))
    assert hr_sub == os.path.join(out, 'Tiny_HR_sub')
    assert lr_subs[4] == os.path.join(out, 'Tiny_LR_bicubic', 'X4_sub')
    expected = sum(n for _, n in SIZES.values())
    assert result.num_sub_images == expected and not result.failed
    names = sorted(os.listdir(hr_sub))
    assert len(names) == expected
    assert names[:2] == ['a_s001.png', 'a_s002.png'] and f'a_s{SIZES["a"][1]:03d}.png' in names
    for scale, folder in lr_subs.items():
        assert sorted(os.listdir(folder)) == names
        for name in names[::7]:
            assert cv2.imread(os.path.join(folder, name)).shape == (CROP // scale, CROP // scale, 3)
    assert cv2.imread(os.path.join(hr_sub, names[0])).shape == (CROP, CROP, 3)


def test_lr_is_cut_from_the_whole_image_at_the_right_place(prepared):
    hr, out, _ = prepared
    hr_sub, lr_subs = output_folders(hr, out, (2, 3, 4))
    # Away from its border, an LR patch must equal the bicubic of its own HR patch: true only when
    # the LR crop sits exactly at origin / scale in the whole-image LR.
    for scale in (2, 3, 4):
        for name in ('a_s007.png', 'c_s012.png'):
            sub_hr = cv2.imread(os.path.join(hr_sub, name)).astype(np.float32) / 255
            own = np.clip(np.round(imresize(sub_hr, 1 / scale) * 255), 0, 255)
            lr = cv2.imread(os.path.join(lr_subs[scale], name)).astype(np.float32)
            border = 3
            diff = np.abs(own - lr)[border:-border, border:-border]
            assert diff.max() <= 1, (scale, name, diff.max())


def test_lmdb_reads_with_basicsr_paired_dataset(prepared):
    hr, out, result = prepared
    hr_sub, lr_subs = output_folders(hr, out, (4,))
    assert hr_sub + '.lmdb' in result.lmdb_folders
    opt = {'dataroot_gt': hr_sub + '.lmdb', 'dataroot_lq': lr_subs[4] + '.lmdb', 'io_backend': {'type': 'lmdb'},
           'phase': 'val', 'scale': 4, 'filename_tmpl': '{}'}
    dataset = PairedImageDataset(opt)
    assert len(dataset) == result.num_sub_images
    item = dataset[5]
    assert tuple(item['gt'].shape) == (3, CROP, CROP) and tuple(item['lq'].shape) == (3, CROP // 4, CROP // 4)
    png = cv2.imread(os.path.join(lr_subs[4], item['lq_path'] + '.png'))[:, :, ::-1].astype(np.float32) / 255
    np.testing.assert_allclose(item['lq'].numpy().transpose(1, 2, 0), png, atol=1e-6)


def test_rerun_is_a_no_op_and_repairs_missing_or_truncated_files(prepared):
    hr, out, _ = prepared
    hr_sub, lr_subs = output_folders(hr, out, (2, 3, 4))
    mdb = os.path.join(hr_sub + '.lmdb', 'data.mdb')
    stamp = os.stat(mdb).st_mtime_ns
    again = prepare_dataset(hr, out, scales=(2, 3, 4), crop=CROP, step=STEP, thresh=THRESH, progress=False)
    assert again.num_written == 0 and os.stat(mdb).st_mtime_ns == stamp
    os.remove(os.path.join(lr_subs[3], 'b_s004.png'))
    truncated = os.path.join(hr_sub, 'c_s002.png')
    data = open(truncated, 'rb').read()
    with open(truncated, 'wb') as f:
        f.write(data[:len(data) // 2])
    repaired = prepare_dataset(hr, out, scales=(2, 3, 4), crop=CROP, step=STEP, thresh=THRESH, progress=False)
    assert repaired.num_written == 2
    assert cv2.imread(truncated).shape == (CROP, CROP, 3)
    assert not [n for n in os.listdir(hr_sub) if n.startswith('.')]  # no temporary files left


def test_corrupt_image_is_named_skipped_and_fails_the_command(tmp_path, capsys):
    hr = _make_hr(str(tmp_path / 'Bad_HR'))
    with open(os.path.join(hr, 'broken.png'), 'wb') as f:
        f.write(b'\x89PNG\r\n\x1a\n not really a png')
    rc = cli_main(['prepare', '-i', hr, '-o', str(tmp_path / 'out'), '--scales', '2', '3', '4', '--crop', '48',
                   '--step', '24', '--thresh', '8', '--workers', '1', '--no-lmdb'])
    err = capsys.readouterr().err
    assert rc == 1
    assert 'broken.png' in err and 'cannot read image' in err
    assert len(os.listdir(tmp_path / 'out' / 'Bad_LR_bicubic' / 'X4_sub')) == sum(n for _, n in SIZES.values())


def test_bad_settings_give_one_clear_error(tmp_path, capsys):
    hr = _make_hr(str(tmp_path / 'X_HR'))
    rc = cli_main(['prepare', '-i', hr, '--scales', '3', '--crop', '64', '--step', '32'])
    assert rc == 2 and 'scale 3 does not divide' in capsys.readouterr().err
    rc = cli_main(['prepare', '-i', str(tmp_path / 'missing')])
    assert rc == 2 and 'does not exist' in capsys.readouterr().err


def test_images_whose_sub_images_share_names_are_refused_before_writing(tmp_path, capsys):
    # x.png / x.jpg and y.b.png / y_b.png gave the same sub-image names: the patches of one were
    # written over the other's, and the HR of one was paired with the LR of the other (exit 0)
    hr = _make_hr(str(tmp_path / 'Clash_HR'))
    for name in ('a.jpg', 'y.b.png', 'y_b.png'):
        cv2.imwrite(os.path.join(hr, name), np.zeros((96, 96, 3), np.uint8))
    out = tmp_path / 'out'
    rc = cli_main(['prepare', '-i', hr, '-o', str(out), '--scales', '2', '--crop', '48', '--step', '24'])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count('\n') == 0
    assert 'the same names: a.jpg and a.png; y.b.png and y_b.png' in err
    assert not out.exists()


def test_images_all_smaller_than_the_crop_fail_the_command(tmp_path, capsys):
    hr = _make_hr(str(tmp_path / 'Small_HR'))
    rc = cli_main(['prepare', '-i', hr, '-o', str(tmp_path / 'out'), '--scales', '2', '--crop', '480', '--step', '240'])
    captured = capsys.readouterr()
    assert rc == 1 and '0 sub-images' in captured.out
    assert 'no image in' in captured.err and 'as large as the crop (480 px)' in captured.err


@pytest.fixture(scope='module')
def demo_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('demo') / 'demo')
    demo.ensure_demo_data(root, verbose=False)
    return root


def test_demo_builds_train_and_val_with_exact_lr_sizes(demo_root):
    paths = demo.demo_paths(demo_root)
    for split, names in demo.SPLITS.items():
        assert sorted(os.listdir(paths[split]['HR'])) == sorted(n + '.png' for n in names)
        for name in names:
            hr = cv2.imread(os.path.join(paths[split]['HR'], name + '.png'))
            assert hr.shape[0] % 12 == 0 and hr.shape[1] % 12 == 0 and hr.shape[2] == 3
            for scale in demo.SCALES:
                lr = cv2.imread(os.path.join(paths[split][f'X{scale}'], name + '.png'))
                assert lr.shape == (hr.shape[0] // scale, hr.shape[1] // scale, 3)
    assert not set(os.listdir(paths['train']['HR'])) & set(os.listdir(paths['val']['HR']))
    import skimage.data  # the photographs as they are, in OpenCV's channel order on disk (not red for blue)
    for split, name in (('val', 'chelsea'), ('train', 'astronaut')):
        hr = cv2.imread(os.path.join(paths[split]['HR'], name + '.png'))
        photo = getattr(skimage.data, name)()[:, :, :3]
        assert np.array_equal(hr[:, :, ::-1], photo[:hr.shape[0], :hr.shape[1]]), name


def test_demo_second_call_writes_nothing(demo_root, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError('ensure_demo_data wrote a file on a complete data set')

    monkeypatch.setattr(demo, 'write_png_atomic', fail)
    monkeypatch.setattr(demo, '_load_sample', fail)
    assert demo.ensure_demo_data(demo_root, verbose=False) == demo.demo_paths(demo_root)


def test_demo_rebuilds_only_what_is_missing(demo_root, monkeypatch):
    victim = os.path.join(demo.demo_paths(demo_root)['val']['X3'], demo.VAL_IMAGES[0] + '.png')
    before = open(victim, 'rb').read()
    os.remove(victim)
    written = []
    real_write = image_files.write_png_atomic
    monkeypatch.setattr(demo, 'write_png_atomic', lambda path, img: (written.append(path), real_write(path, img)))
    demo.ensure_demo_data(demo_root, verbose=False)
    assert written == [victim] and open(victim, 'rb').read() == before


def test_demo_is_found_from_option_paths(demo_root):
    opt = {'datasets': {'train': {'dataroot_gt': os.path.join(demo_root, 'train', 'HR'),
                                  'dataroot_lq': os.path.join(demo_root, 'train', 'LR_bicubic', 'X2')},
                        'val': {'dataroot_gt': 'datasets/Benchmarks/Set5/HR'}}}
    assert demo.ensure_demo_data_for_options(opt) == [demo_root]
    assert demo.ensure_demo_data_for_options({'demo_root': demo_root, 'datasets': {}}) == [demo_root]
    assert demo.ensure_demo_data_for_options({'datasets': {'val': {'dataroot_gt': 'elsewhere/train/HR'}}}) == []


def test_bicubic_baseline_matches_a_direct_computation(demo_root):
    from basicsr.metrics.psnr_ssim import calculate_psnr

    scores = demo.bicubic_baseline(demo_root, scale=4)
    name = demo.VAL_IMAGES[1]
    paths = demo.demo_paths(demo_root)['val']
    hr = cv2.imread(os.path.join(paths['HR'], name + '.png'))
    lr = cv2.imread(os.path.join(paths['X4'], name + '.png'))
    up = cv2.resize(lr, (hr.shape[1], hr.shape[0]), interpolation=cv2.INTER_CUBIC)
    # OpenCV's bicubic (a = -0.75) differs from MATLAB's (a = -0.5) but must land within ~1 dB.
    direct = calculate_psnr(up, hr, crop_border=4, test_y_channel=True)
    assert set(scores) == set(demo.VAL_IMAGES)
    assert abs(scores[name] - direct) < 1.0 and 20 < scores[name] < 45


def test_model_report_matches_a_direct_computation(demo_root, tmp_path, capsys):
    from basicsr.metrics.psnr_ssim import calculate_psnr

    from esc_arch import ESC

    # With a zero `to_img`, ESC's output is exactly its nearest-neighbour image skip.
    net = ESC(dim=16, pdim=4, kernel_size=7, n_blocks=1, conv_blocks=1, window_size=8, num_heads=2,
              upscaling_factor=2)
    torch.nn.init.zeros_(net.to_img.weight)
    torch.nn.init.zeros_(net.to_img.bias)
    checkpoint = str(tmp_path / 'nearest.pth')
    torch.save({'params_ema': net.state_dict()}, checkpoint)
    scale, scores = demo.model_psnr(checkpoint, demo_root)
    assert scale == 2 and set(scores) == set(demo.VAL_IMAGES)
    paths = demo.demo_paths(demo_root)['val']
    for name in demo.VAL_IMAGES:
        hr = cv2.imread(os.path.join(paths['HR'], name + '.png'))
        lr = cv2.imread(os.path.join(paths['X2'], name + '.png'))
        nearest = cv2.resize(lr, (hr.shape[1], hr.shape[0]), interpolation=cv2.INTER_NEAREST)
        assert scores[name] == pytest.approx(calculate_psnr(nearest, hr, crop_border=2, test_y_channel=True),
                                             abs=1e-6)
    rc = cli_main(['prepare', '--demo', '-o', demo_root, '--report-model', checkpoint])
    out = capsys.readouterr().out
    assert rc == 0 and 'bicubic x2 PSNR-Y' in out and f'{demo.VAL_IMAGES[0]} {scores[demo.VAL_IMAGES[0]]:.2f}' in out
    assert cli_main(['prepare', '--demo', '-o', demo_root, '--report-model', str(tmp_path / 'none.pth')]) == 2


def _tiny_hr(folder, name='t.png', size=(48, 72)):
    """One small smooth image: cheap enough to prepare several times in one test."""
    os.makedirs(folder, exist_ok=True)
    h, w = size
    small = np.random.default_rng(1).integers(0, 256, (h // 8 + 2, w // 8 + 2, 3), dtype=np.uint8)
    cv2.imwrite(os.path.join(folder, name), cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC))
    return folder


def _prepare_cli(*args):
    return cli_main(['prepare', *args, '--scales', '2', '--workers', '1'])


def _tree(root):
    return sorted(os.path.relpath(os.path.join(d, n), root) for d, _, names in os.walk(root) for n in names)


def test_rerun_with_other_settings_stops_and_same_settings_resume(tmp_path, capsys):
    hr, out = _tiny_hr(str(tmp_path / 'R_HR')), str(tmp_path / 'out')
    assert _prepare_cli('-i', hr, '-o', out, '--crop', '24', '--step', '24') == 0  # 2 x 3 patches
    before = _tree(out)
    capsys.readouterr()
    assert _prepare_cli('-i', hr, '-o', out, '--crop', '12', '--step', '12') == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'crop 24 before, 12 now' in err and 'step 24 before, 12 now' in err
    assert os.path.join(out, 'R_HR_sub') in err and 'another -o' in err and 'delete' in err
    assert _tree(out) == before  # nothing written, nothing mixed
    # same folder name, other input folder: its sub-images would be mixed in just the same
    other = _tiny_hr(str(tmp_path / 'elsewhere' / 'R_HR'), name='u.png')
    assert _prepare_cli('-i', other, '-o', out, '--crop', '24', '--step', '24') == 2
    assert 'input ' in capsys.readouterr().err and _tree(out) == before
    os.remove(os.path.join(out, 'R_LR_bicubic', 'X2_sub', 't_s003.png'))
    assert _prepare_cli('-i', hr, '-o', out, '--crop', '24', '--step', '24') == 0
    assert '6 sub-images (1 files written)' in capsys.readouterr().out and _tree(out) == before


def test_outputs_without_a_settings_record_are_not_reused(tmp_path, capsys):
    hr, out = _tiny_hr(str(tmp_path / 'L_HR')), tmp_path / 'out'
    (out / 'L_HR_sub').mkdir(parents=True)
    cv2.imwrite(str(out / 'L_HR_sub' / 't_s001.png'), np.zeros((8, 8, 3), np.uint8))  # e.g. an older esc-arch
    assert _prepare_cli('-i', hr, '-o', str(out), '--crop', '24', '--step', '24', '--no-lmdb') == 2
    assert 'unrecorded settings' in capsys.readouterr().err
    assert cv2.imread(str(out / 'L_HR_sub' / 't_s001.png')).shape == (8, 8, 3)


def test_stale_temp_files_are_removed_on_a_rerun(tmp_path, capsys):
    hr, out = _tiny_hr(str(tmp_path / 'T_HR')), tmp_path / 'out'
    assert _prepare_cli('-i', hr, '-o', str(out), '--crop', '24', '--step', '24', '--no-lmdb') == 0
    stale = [out / 'T_HR_sub' / '.t_s001.w41xvrmf.tmp.png', out / 'T_LR_bicubic' / 'X2_sub' / '.t_s002.ab.tmp.png',
             out / '.T_HR_sub.prepare.x1.tmp.json']  # the settings record's
    foreign = out / '.notes.x2.tmp.txt'  # another program's write in progress, next to the outputs
    for path in (*stale, foreign):
        path.write_bytes(b'half a file')  # what a kill -9 during an atomic write leaves
    assert _prepare_cli('-i', hr, '-o', str(out), '--crop', '24', '--step', '24', '--no-lmdb') == 0
    assert 'removed 3 temporary file(s)' in capsys.readouterr().out
    assert not any(path.exists() for path in stale) and foreign.exists()


def test_input_dot_writes_next_to_the_folder(tmp_path, monkeypatch, capsys):
    hr = _tiny_hr(str(tmp_path / 'imgs'))
    monkeypatch.chdir(hr)
    assert _prepare_cli('-i', '.', '--crop', '24', '--step', '24') == 0
    assert os.listdir(hr) == ['t.png']  # no hidden '._sub' folders inside the input
    assert len(os.listdir(tmp_path / 'imgs_sub')) == 6 and (tmp_path / 'imgs_sub.lmdb' / 'data.mdb').is_file()
    assert len(os.listdir(tmp_path / 'imgs_LR_bicubic' / 'X2_sub')) == 6
    assert 'HR: ../imgs_sub' in capsys.readouterr().out


def test_input_file_and_demo_option_conflicts_give_one_error_line(tmp_path, capsys):
    hr = _tiny_hr(str(tmp_path / 'F_HR'))
    for argv, expected in (
            (['-i', os.path.join(hr, 't.png')], 't.png is a file; give -i the folder'),
            (['--demo', '-o', str(tmp_path / 'd'), '-i', hr], '--demo builds the embedded demo set and takes no -i'),
            (['--demo', '-o', str(tmp_path / 'd'), '--scales', '5', '--report-bicubic'],
             'the demo set has scales 2, 3, 4, not 5'),
            (['--demo', '-o', str(tmp_path / 'd'), '--crop', '96'], 'takes no --crop'),
            (['--demo', '-o', str(tmp_path / 'd'), '--scales', '3', '--report-model', 'x2.pth'],
             '--scales only picks the scales of --report-bicubic'),
            (['-i', hr, '--report-bicubic'], '--report-bicubic: only with --demo')):
        assert cli_main(['prepare', *argv]) == 2, argv
        err = capsys.readouterr().err
        assert expected in err and err.count('\n') == 1, (argv, err)
    assert not (tmp_path / 'd').exists()  # refused before building anything


def test_float_tiff_is_read_as_8_bit_and_out_of_range_floats_are_named(tmp_path):
    rng = np.random.default_rng(2)
    pixels = rng.random((6, 5, 3)).astype(np.float32)
    path = str(tmp_path / 'f.tif')
    assert cv2.imwrite(path, pixels)
    img = image_files.read_image_bgr(path)
    assert img.dtype == np.uint8 and img.shape == (6, 5, 3)
    np.testing.assert_array_equal(img, np.round(pixels * 255).astype(np.uint8))
    gray = str(tmp_path / 'g.tif')
    assert cv2.imwrite(gray, pixels[:, :, 0])
    np.testing.assert_array_equal(image_files.read_image_bgr(gray), np.repeat(img[:, :, :1], 3, axis=2))
    assert cv2.imwrite(path, pixels * 255)
    with pytest.raises(image_files.ImageReadError, match=r'f.tif: float pixels span \[.*\]; the models take \[0, 1\]'):
        image_files.read_image_bgr(path)
    assert cv2.imwrite(path, np.ones((6, 5, 3), np.int32))
    with pytest.raises(image_files.ImageReadError, match='unsupported pixel type int32'):
        image_files.read_image_bgr(path)
    # planar and compressed TIFFs, which OpenCV reads as wrong pixels, are read as stored
    import tifffile
    rgb16 = rng.integers(0, 65536, (6, 5, 3), dtype=np.uint16)
    tifffile.imwrite(path, np.moveaxis(rgb16, -1, 0), photometric='rgb', planarconfig='separate', compression='lzw')
    np.testing.assert_array_equal(image_files.read_image_bgr(path), (rgb16 >> 8).astype(np.uint8)[:, :, ::-1])
    rgba = rng.integers(0, 256, (6, 5, 4), dtype=np.uint8)
    tifffile.imwrite(path, rgba, photometric='rgb', extrasamples=['unassalpha'], compression='lzw')
    np.testing.assert_array_equal(image_files.read_image_bgr(path), rgba[:, :, 2::-1])  # not premultiplied
    tifffile.imwrite(path, rgb16[:, :, :2], photometric='minisblack', extrasamples=['unassalpha'], compression='lzw')
    np.testing.assert_array_equal(image_files.read_image_bgr(path),
                                  np.repeat((rgb16[:, :, :1] >> 8).astype(np.uint8), 3, axis=2))


def test_an_lmdb_on_a_full_disk_is_one_line(tmp_path, capsys):
    folder = tmp_path / 'HR_sub'
    folder.mkdir()
    rng = np.random.default_rng(3)
    for index in range(3):
        cv2.imwrite(str(folder / f'{index}.png'), rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))  # 12 kB each
    with file_size_limit(20_000), pytest.raises(OSError, match=r'HR_sub.tmp.lmdb failed .*; is the disk full\?'):
        build_lmdb(str(folder), ['0', '1', '2'])  # lmdb.Error: a traceback from prepare
    assert not (tmp_path / 'HR_sub.lmdb').exists()


def test_basicsr_data_sets_read_tiffs_as_stored(tmp_path, monkeypatch):
    # BasicSR decodes every file with OpenCV, which reads planar and some compressed TIFFs as wrong
    # pixels with no error (8-bit RGBA premultiplied by its alpha, planar LZW samples mixed up): a
    # TIFF now reads as the same pixels stored as a PNG read
    import tifffile
    from basicsr.data import paired_image_dataset
    from basicsr.utils import imfrombytes

    from esc_arch.commands._pipeline import ImageDecodeError, _patch_image_datasets
    _patch_image_datasets()
    rng = np.random.default_rng(8)
    rgb16 = rng.integers(0, 65536, (8, 6, 3), dtype=np.uint16)
    rgba8 = np.concatenate([rgb16 >> 8, rng.integers(0, 256, (8, 6, 1))], axis=2).astype(np.uint8)
    layouts = {'rgba8_lzw': (rgba8, dict(extrasamples=['unassalpha'], compression='lzw')),
               'rgb16_planar_lzw': (rgb16, dict(planarconfig='separate', compression='lzw')),
               'rgb16_planar_zstd': (rgb16, dict(planarconfig='separate', compression='zstd')),
               'rgb8_deflate': ((rgb16 >> 8).astype(np.uint8), dict(compression='deflate'))}
    misread = []
    for name, (stored, extra) in layouts.items():
        buffer = io.BytesIO()
        planar = extra.get('planarconfig') == 'separate'
        tifffile.imwrite(buffer, np.moveaxis(stored, -1, 0) if planar else stored, photometric='rgb', **extra)
        tiff = buffer.getvalue()
        png = cv2.imencode('.png', stored[:, :, [2, 1, 0, 3][:stored.shape[2]]])[1].tobytes()
        for flag in ('color', 'grayscale', 'unchanged'):
            expected = imfrombytes(png, flag=flag, float32=True)
            got = paired_image_dataset.imfrombytes(tiff, flag=flag, float32=True)
            assert got.dtype == expected.dtype and np.array_equal(got, expected), (name, flag)
        opencv = cv2.imdecode(np.frombuffer(tiff, np.uint8), cv2.IMREAD_COLOR)  # BasicSR's decoder alone
        if opencv is None or not np.array_equal(opencv, imfrombytes(png)):
            misread.append((name, 'unreadable' if opencv is None else 'wrong'))
    assert misread == [('rgba8_lzw', 'wrong'), ('rgb16_planar_lzw', 'wrong'), ('rgb16_planar_zstd', 'unreadable')]
    # gray + alpha, and floats: as OpenCV reads the PNG of the same image; floats out of [0, 1] named
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, rgb16[:, :, :2], photometric='minisblack', extrasamples=['unassalpha'],
                     compression='lzw')
    png = cv2.imencode('.png', rgb16[:, :, [0, 0, 0, 1]])[1].tobytes()
    assert np.array_equal(paired_image_dataset.imfrombytes(buffer.getvalue()), imfrombytes(png))
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, (rgb16 / 65535).astype(np.float32), photometric='rgb', compression='zstd')
    png = cv2.imencode('.png', rgb16[:, :, ::-1])[1].tobytes()
    assert np.array_equal(paired_image_dataset.imfrombytes(buffer.getvalue()), imfrombytes(png))
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, (rgb16 / 255).astype(np.float32), photometric='rgb')
    with pytest.raises(ImageDecodeError, match=r'its float pixels span \[.*\]; BasicSR takes \[0, 1\]'):
        paired_image_dataset.imfrombytes(buffer.getvalue())
    for stored, expected in ((rgb16[:, :, 0] > 30000, (rgb16[:, :, 0] > 30000).astype(np.uint8) * 255),  # 1-bit
                             ((rgb16 / 65535).astype(np.float16), None)):  # 65535 overflowed float16: all black
        buffer = io.BytesIO()
        tifffile.imwrite(buffer, stored, photometric='minisblack' if stored.ndim == 2 else 'rgb')
        if expected is None:
            expected = np.round(stored.astype(np.float32) * 65535).astype(np.uint16)[:, :, ::-1]
        png = cv2.imencode('.png', expected)[1].tobytes()
        assert np.array_equal(paired_image_dataset.imfrombytes(buffer.getvalue()), imfrombytes(png)), stored.dtype
    for stored in (rgb16.astype(np.uint32) * 70000, rgb16.astype(np.int16)):  # PNG would saturate them
        buffer = io.BytesIO()
        tifffile.imwrite(buffer, stored, photometric='rgb')
        with pytest.raises(ImageDecodeError, match=f'its {stored.dtype} samples are not an image type BasicSR reads'):
            paired_image_dataset.imfrombytes(buffer.getvalue())
    # and inside BasicSR's data set, from files
    for side, stored in (('gt', rgba8), ('lq', rgba8[::2, ::2])):
        (tmp_path / side).mkdir()
        tifffile.imwrite(tmp_path / side / 'a.tif', stored, photometric='rgb', extrasamples=['unassalpha'],
                         compression='lzw')
    dataset = PairedImageDataset({'dataroot_gt': str(tmp_path / 'gt'), 'dataroot_lq': str(tmp_path / 'lq'),
                                  'io_backend': {'type': 'disk'}, 'phase': 'val', 'scale': 2, 'filename_tmpl': '{}'})
    np.testing.assert_array_equal(dataset[0]['gt'].numpy().transpose(1, 2, 0), rgba8[:, :, :3] / np.float32(255))
    monkeypatch.setattr(tifffile.TiffPage, 'asarray', lambda *a, **k: (_ for _ in ()).throw(
        ValueError("<COMPRESSION.LZW: 5> requires the 'imagecodecs' package")))
    with pytest.raises(ImageDecodeError, match=r'lq/a.tif, .*gt/a.tif: its LZW compression needs the imagecodecs'):
        dataset[0]


def test_niqe_needs_two_of_its_blocks_in_every_output(tmp_path):
    # measured on BasicSR's calculate_niqe: 96x192 and 192x96 outputs score; 96x96 and 191x191 (one block)
    # fail with "SVD did not converge", 95x200 (none) with "min(): Expected reduction dim"
    from esc_arch.commands._data_checks import check_images
    from esc_arch.messages import OptionError
    for name, (h, w) in {'wide': (24, 48), 'tall': (48, 24)}.items():
        cv2.imwrite(str(tmp_path / f'{name}.png'), np.zeros((h, w, 3), np.uint8))
    dataset = {'name': 'lq', 'type': 'SingleImageDataset', 'dataroot_lq': str(tmp_path), 'io_backend': {'type': 'disk'}}

    def check(crop):
        opt = {'scale': 4, 'val': {'metrics': {'niqe': {'type': 'calculate_niqe', 'crop_border': crop}}}}
        check_images(opt, 'val', dataset, 'x.yml')
    check(0)  # 96x192 and 192x96
    with pytest.raises(OptionError, match=r'calculate_niqe\) needs outputs with two 96x96 blocks or more after '
                                          r'crop_border 1; .*tall.png gives 190x94'):
        check(1)
    cv2.imwrite(str(tmp_path / 'tall.png'), np.zeros((47, 47, 3), np.uint8))
    with pytest.raises(OptionError, match=r'tall.png gives 188x188'):
        check(0)



def test_psnr_and_ssim_need_an_output_left_after_crop_border(tmp_path):
    # BasicSR's calculate_psnr of an output cropped to nothing, and calculate_ssim of one smaller than
    # its 11x11 window, are nan without a word: the validation's mean too ('Best: -inf @ -1 iter')
    from basicsr.metrics import calculate_psnr, calculate_ssim

    from esc_arch.commands._data_checks import check_images
    from esc_arch.messages import OptionError
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        image = np.full((10, 12, 3), 7, np.uint8)
        assert np.isnan(calculate_psnr(image, image + 1, crop_border=5))
        assert np.isnan(calculate_ssim(image, image + 1, crop_border=0))
    for side, scale in (('gt', 4), ('lq', 1)):
        (tmp_path / side).mkdir()
        cv2.imwrite(str(tmp_path / side / 'a.png'), np.zeros((3 * scale, 5 * scale, 3), np.uint8))
    dataset = {'name': 'pairs', 'type': 'PairedImageDataset', 'dataroot_gt': str(tmp_path / 'gt'),
               'dataroot_lq': str(tmp_path / 'lq'), 'io_backend': {'type': 'disk'}}

    def check(kind, crop):
        opt = {'scale': 4, 'val': {'metrics': {'m': {'type': kind, 'crop_border': crop}}}}
        check_images(opt, 'val', dataset, 'x.yml')
    check('calculate_psnr', 5)  # 2x10 left
    with pytest.raises(OptionError, match=r'val.metrics.m \(calculate_psnr\) needs outputs of 1x1 pixels or more '
                                          r'\(a smaller one scores nan\) after crop_border 6; .*a.png gives 0x8'):
        check('calculate_psnr', 6)
    check('calculate_ssim', 0)  # 12x20
    with pytest.raises(OptionError, match=r'calculate_ssim\) needs outputs of 11x11 pixels or more .* after '
                                          r'crop_border 1; .*a.png gives 10x18'):
        check('calculate_ssim', 1)

def test_prepare_records_thresh_and_step_and_skips_hidden_files(tmp_path, capsys):
    hr, out = _tiny_hr(str(tmp_path / 'H_HR')), str(tmp_path / 'out')
    _tiny_hr(hr, name='.t.tmp.png')  # a hidden file (an editor's, a temporary one): not an image of the set
    assert _prepare_cli('-i', hr, '-o', out, '--crop', '24', '--step', '24') == 0
    assert sorted(os.listdir(os.path.join(out, 'H_HR_sub'))) == [f't_s{i:03d}.png' for i in range(1, 7)]
    capsys.readouterr()
    assert _prepare_cli('-i', hr, '-o', out, '--crop', '24', '--step', '24', '--thresh', '1') == 2  # mixed before
    assert 'thresh 48 before, 1 now' in capsys.readouterr().err
    assert _prepare_cli('-i', hr, '-o', str(tmp_path / 'o2'), '--crop', '24', '--step', '13') == 2  # misaligned LR
    assert 'must be multiples of every scale' in capsys.readouterr().err


def test_an_interrupted_prepare_resumes_and_an_lmdb_of_other_images_is_not_reused(tmp_path, capsys, monkeypatch):
    from esc_arch.data import prepare as prepare_module
    hr, out = _tiny_hr(str(tmp_path / 'I_HR')), str(tmp_path / 'out')
    _tiny_hr(hr, name='u.png')
    real, calls = prepare_module._process_image, []

    def interrupted(task):
        calls.append(task)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(task)
    monkeypatch.setattr(prepare_module, '_process_image', interrupted)
    assert _prepare_cli('-i', hr, '-o', out, '--crop', '24', '--step', '24') == 130
    monkeypatch.setattr(prepare_module, '_process_image', real)
    capsys.readouterr()
    assert _prepare_cli('-i', hr, '-o', out, '--crop', '24', '--step', '24') == 0  # its settings were recorded first
    assert '12 sub-images' in capsys.readouterr().out
    # the sub-image folders gone, their LMDBs kept: another input of the same names must not reuse them
    for folder in ('I_HR_sub', os.path.join('I_LR_bicubic', 'X2_sub')):
        shutil.rmtree(os.path.join(out, folder))
        os.remove(os.path.join(out, folder + '.prepare.json'))
    other = _tiny_hr(str(tmp_path / 'elsewhere' / 'I_HR'))
    _tiny_hr(other, name='u.png', size=(48, 72))
    assert _prepare_cli('-i', other, '-o', out, '--crop', '24', '--step', '24') == 2
    assert 'I_HR_sub.lmdb holds outputs of an earlier run with other settings' in capsys.readouterr().err
