"""basicsr upscale / esc_arch.inference: every image kind, tiling, batching, precision, errors."""
import itertools
import re

import cv2
import numpy as np
import pytest
import torch
from conftest import file_size_limit, randomize_, tiny_config

from esc_arch import ESC, ESCFP
from esc_arch.cli import main
from esc_arch.inference import InferenceError, Upscaler, image_to_tensor, read_image, write_image


def save_checkpoint(model, path):
    torch.save({'params_ema': model.state_dict()}, path)
    return str(path)


@pytest.fixture
def esc_pth(tmp_path):
    return save_checkpoint(ESC(**tiny_config(window_size=4)), tmp_path / 'esc_x2.pth')


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / 'in'
    folder.mkdir()
    rgba = rng.integers(0, 256, (12, 10, 4), dtype=np.uint8)
    rgba[..., 3] = 200
    written = {
        'rgb.png': rng.integers(0, 256, (20, 30, 3), dtype=np.uint8),
        'photo.jpg': rng.integers(0, 256, (17, 13, 3), dtype=np.uint8),
        'gray.png': rng.integers(0, 256, (9, 11), dtype=np.uint8),
        'rgba.png': rgba,
        'deep.png': rng.integers(0, 65536, (10, 12, 3), dtype=np.uint16),
        'deep_gray.tif': rng.integers(0, 65536, (7, 10), dtype=np.uint16),
        'tiny.png': rng.integers(0, 256, (3, 3, 3), dtype=np.uint8),
        'small.bmp': rng.integers(0, 256, (2, 3, 3), dtype=np.uint8),
    }
    for name, img in written.items():
        assert cv2.imwrite(str(folder / name), img)
    (folder / 'corrupt.png').write_bytes(b'\x89PNG this is not an image')
    (folder / 'notes.txt').write_text('not an image')
    return folder, {name: read_image(folder / name) for name in written}


def summary(out):
    return [line for line in out.splitlines() if line.startswith('done:')][-1]


def test_folder_of_every_kind(tmp_path, esc_pth, images, capsys):
    folder, inputs = images
    out_dir = tmp_path / 'out'
    rc = main(['upscale', '-i', str(folder), '-o', str(out_dir), '-m', esc_pth, '--device', 'cpu'])
    captured = capsys.readouterr()
    assert rc == 1  # the corrupt image failed
    assert summary(captured.out).startswith('done: 8, skipped: 1, failed: 1')
    assert 'corrupt.png' in captured.err and 'notes.txt' in captured.err
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(inputs)  # no temp files left behind
    for name, src in inputs.items():
        out = read_image(out_dir / name)
        assert out.dtype == src.dtype, name
        assert out.shape[:2] == (2 * src.shape[0], 2 * src.shape[1]), name
        assert out.shape[2:] == src.shape[2:], name  # gray stays 2-D, BGR 3, BGRA 4
    assert np.all(read_image(out_dir / 'rgba.png')[..., 3] == 200)
    assert read_image(out_dir / 'deep.png').max() > 255  # really 16-bit, not 8-bit values


def test_no_overwrite_without_flag(tmp_path, esc_pth, images, capsys):
    folder, _ = images
    out_dir = tmp_path / 'out'
    src = folder / 'rgb.png'
    main(['upscale', '-i', str(src), '-o', str(out_dir), '-m', esc_pth])
    target = out_dir / 'rgb.png'
    target.write_bytes(b'keep me')
    capsys.readouterr()
    assert main(['upscale', '-i', str(src), '-o', str(out_dir), '-m', esc_pth]) == 0
    captured = capsys.readouterr()
    assert target.read_bytes() == b'keep me' and '--overwrite' in captured.err
    assert summary(captured.out).startswith('done: 0, skipped: 1, failed: 0')
    assert main(['upscale', '-i', str(src), '-o', str(out_dir), '-m', esc_pth, '--overwrite']) == 0
    assert read_image(target).shape == (40, 60, 3)


def test_tiled_matches_untiled():
    torch.manual_seed(0)
    model = ESC(**tiny_config(window_size=4, kernel_size=3, conv_blocks=1))  # receptive field ~9 px
    x = torch.nn.functional.interpolate(torch.rand(2, 3, 12, 16), size=(48, 64), mode='bilinear')
    whole = Upscaler(model).upscale_tensor(x).clamp(0, 1)
    tiler = Upscaler(model, tile=32, tile_overlap=24, batch=3)
    assert len(tiler.tiles(48, 64)) > 1
    steps = []
    tiled = tiler.upscale_tensor(x, progress=steps.append).clamp(0, 1)
    assert sum(steps) == 2 * len(tiler.tiles(48, 64))
    assert tiled.shape == whole.shape == (2, 3, 96, 128)
    assert (tiled - whole).abs().max().item() <= 1 / 255


def test_tiles_overlap_at_least_as_asked():
    # tiles start on multiples of the window: a tile less than a window longer than the overlap
    # grows (it used to step by one window anyway and share less, or nothing at all)
    model = ESC(**tiny_config(window_size=8, kernel_size=3, conv_blocks=1))
    for tile in (8, 16, 20, 32, 64):
        for overlap in range(0, tile + 41, 2):  # an overlap as large as the tile, or larger, grows it too
            tiler = Upscaler(model, tile=tile, tile_overlap=overlap)
            assert tiler.step > 0 and tiler.step % 8 == 0 and tiler.tile % 8 == 0
            assert tiler.tile_overlap == tiler.tile - tiler.step >= overlap, (tile, overlap)
            assert tiler.tile >= tile
    torch.manual_seed(0)
    x = torch.nn.functional.interpolate(torch.rand(1, 3, 12, 16), size=(48, 64), mode='bilinear')
    whole = Upscaler(model).upscale_tensor(x).clamp(0, 1)
    tiler = Upscaler(model, tile=16, tile_overlap=12)  # was: 16-pixel tiles sharing 8 (9.3/255 off)
    assert (tiler.tile, tiler.tile_overlap) == (24, 16)
    assert (tiler.upscale_tensor(x).clamp(0, 1) - whole).abs().max().item() <= 4 / 255  # measured 2.8/255


@pytest.mark.parametrize('size', [(1, 1), (2, 3), (5, 5)])
def test_images_smaller_than_a_window(size):
    model = randomize_(ESCFP(**tiny_config(window_size=8, upscaling_factor=3)), scale=0.05)
    img = np.random.default_rng(1).integers(0, 256, (*size, 3), dtype=np.uint8)
    out = Upscaler(model).upscale_image(img)
    assert out.shape == (3 * size[0], 3 * size[1], 3) and out.dtype == np.uint8


def test_same_size_images_batched_like_single():
    model = randomize_(ESC(**tiny_config(window_size=4)), scale=0.05)
    rng = np.random.default_rng(2)
    imgs = [rng.integers(0, 256, (10, 14, 3), dtype=np.uint8) for _ in range(3)]
    batched = Upscaler(model, batch=3).upscale_images(imgs)
    single = [Upscaler(model).upscale_image(img) for img in imgs]
    for a, b in zip(batched, single):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_bf16_on_cpu_close_to_fp32():
    model = randomize_(ESC(**tiny_config(window_size=4)), scale=0.05)
    x, _ = image_to_tensor(np.random.default_rng(3).integers(0, 256, (12, 12, 3), dtype=np.uint8))
    ref = Upscaler(model).upscale_tensor(x)
    low = Upscaler(model, precision='bf16').upscale_tensor(x)
    assert low.dtype == torch.float32 and low.shape == ref.shape
    assert 0 < (low - ref).abs().max().item() < 0.05  # bf16 really ran (not exact) and stays close


def test_upscale_tensor_takes_any_float_type_and_names_other_inputs():
    """A float64 or half tensor ran into the convolutions' 'Input type (double) and bias type (float)'
    RuntimeError, a uint8 one too (its 0-255 values would be garbage), a (3, H, W) one a tuple unpack."""
    import copy
    model = randomize_(ESC(**tiny_config(window_size=4)), scale=0.1).eval()
    x = torch.rand(1, 3, 10, 12, dtype=torch.float64)
    ref = Upscaler(copy.deepcopy(model)).upscale_tensor(x.float())
    for given in (x, x.half()):
        out = Upscaler(copy.deepcopy(model)).upscale_tensor(given)
        assert out.dtype == torch.float32 and (out - ref).abs().max().item() < (1e-6 if given is x else 2e-3)
    exact = Upscaler(copy.deepcopy(model).double()).upscale_tensor(x)  # a float64 model takes float32 too
    assert (exact - ref).abs().max().item() < 1e-5
    for bad, named in (((x * 255).to(torch.uint8), 'torch.uint8'), (x[0], '(3, 10, 12)'), (x.numpy(), 'ndarray')):
        with pytest.raises(InferenceError, match=r'takes a float \(N, 3, H, W\) tensor in \[0, 1\], got .*'
                                                 + re.escape(named)):
            Upscaler(model).upscale_tensor(bad)


def test_cli_errors(tmp_path, esc_pth, images, capsys, monkeypatch):
    folder, _ = images
    out = str(tmp_path / 'out')
    assert main(['upscale', '-i', str(folder), '-o', out, '-m', esc_pth, '--precision', 'fp16', '--device', 'cpu']) == 2
    assert 'fp16 needs CUDA' in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert main(['upscale', '-i', str(folder), '-o', out, '-m', esc_pth, '--device', 'cuda']) == 2
    assert 'CUDA is not available' in capsys.readouterr().err
    foreign = tmp_path / 'foreign.pth'
    torch.save({'params_ema': {'conv.weight': torch.zeros(3, 3, 3, 3)}}, foreign)
    assert main(['upscale', '-i', str(folder), '-o', out, '-m', str(foreign)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('basicsr upscale: error: ') and 'not an ESC checkpoint' in err[0]
    assert main(['upscale', '-i', str(folder), '-o', str(folder), '-m', esc_pth]) == 2
    assert 'input folder' in capsys.readouterr().err
    monkeypatch.setattr(torch.ops.mkldnn, '_is_mkldnn_bf16_supported', lambda: False)
    assert main(['upscale', '-i', str(folder), '-o', out, '-m', esc_pth, '--precision', 'bf16',
                 '--device', 'cpu', '--overwrite']) == 1  # 1: the folder's corrupt image
    assert 'warning: bf16 on this CPU is ~100x slower than fp32' in capsys.readouterr().err


def test_escfp_checkpoint_with_tiles(tmp_path, images, capsys):
    folder, inputs = images
    pth = save_checkpoint(randomize_(ESCFP(**tiny_config(window_size=4, upscaling_factor=3)), scale=0.05),
                          tmp_path / 'fp.pth')
    rc = main(['upscale', '-i', str(folder / 'rgb.png'), '-o', str(tmp_path / 'o'), '-m', pth, '--tile', '12',
               '--tile-overlap', '4', '--batch', '2', '--precision', 'bf16'])
    assert rc == 0 and summary(capsys.readouterr().out).startswith('done: 1, skipped: 0, failed: 0')
    assert read_image(tmp_path / 'o' / 'rgb.png').shape == (60, 90, 3)
    assert 'seams' not in capsys.readouterr().err
    rc = main(['upscale', '-i', str(folder / 'rgb.png'), '-o', str(tmp_path / 'o0'), '-m', pth, '--tile', '12',
               '--tile-overlap', '0'])
    assert rc == 0 and 'warning: --tile-overlap 0' in capsys.readouterr().err


def _exif_image(path, pixels, orientation, **save):
    from PIL import Image
    im = Image.fromarray(pixels)
    exif = im.getexif()
    exif[0x0112] = orientation
    im.save(path, exif=exif.tobytes(), **save)


@pytest.mark.parametrize('ext', ['.png', '.jpg', '.tif', '.webp'])
def test_exif_orientation_is_applied(tmp_path, ext):
    # phone photos store the pixels sideways plus an EXIF orientation; OpenCV's IMREAD_UNCHANGED
    # ignores it for JPEG/PNG/WebP (turns TIFFs itself, and fails on transposed TIFFs)
    from PIL import Image, ImageOps
    rgb = np.random.default_rng(1).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    save = {'.jpg': dict(quality=100), '.webp': dict(lossless=True)}.get(ext, {})
    for orientation in range(1, 9):
        path = tmp_path / f'o{orientation}{ext}'
        _exif_image(path, rgb, orientation, **save)
        with Image.open(path) as im:
            upright = np.asarray(ImageOps.exif_transpose(im).convert('RGB'))[:, :, ::-1]
        got = read_image(path)
        assert got.shape == upright.shape, (ext, orientation)
        assert np.abs(got.astype(int) - upright).max() <= (3 if ext == '.jpg' else 0), (ext, orientation)


def test_sideways_and_planar_tiffs_keep_their_type_and_turn_upright(tmp_path):
    # OpenCV 5 cannot read a TIFF whose orientation transposes it (PIL, the old fallback, read
    # 16-bit colour as 8-bit, left 16-bit gray sideways and could not open float colour), and reads
    # samples stored in separate planes as wrong pixels, even upright
    import tifffile
    rng = np.random.default_rng(5)
    rgb16 = rng.integers(0, 65536, (6, 10, 3), dtype=np.uint16)
    kinds = {'rgb16': (rgb16, 'rgb'), 'gray16': (rgb16[:, :, 0], 'minisblack'),
             'float': ((rgb16 / 65535).astype(np.float32), 'rgb'),
             'rgba16': (np.concatenate([rgb16, rgb16[:, :, :1]], axis=2), 'rgb'),
             'gray_alpha16': (rgb16[:, :, :2], 'minisblack')}
    for orientation, planar, (name, (stored, photometric)) in itertools.product(range(1, 9), (False, True),
                                                                                kinds.items()):
        if stored.ndim == 2 and planar:
            continue
        path = tmp_path / f'{name}_o{orientation}{"_planar" * planar}.tif'
        extra = dict(extrasamples=['unassalpha']) if stored.ndim == 3 and stored.shape[2] in (2, 4) else {}
        if planar:
            extra.update(planarconfig='separate')
        tifffile.imwrite(path, np.moveaxis(stored, -1, 0) if planar else stored, photometric=photometric,
                         extratags=[(0x0112, 'H', 1, orientation, True)], **extra)
        bgr = stored if stored.ndim == 2 or stored.shape[2] == 2 else stored[:, :, [2, 1, 0, 3][:stored.shape[2]]]
        # upright by the TIFF convention, written out: where the stored row 0 / column 0 lie
        upright = {1: bgr, 2: bgr[:, ::-1], 3: bgr[::-1, ::-1], 4: bgr[::-1], 5: bgr.swapaxes(0, 1),
                   6: bgr.swapaxes(0, 1)[:, ::-1], 7: bgr.swapaxes(0, 1)[::-1, ::-1],
                   8: bgr.swapaxes(0, 1)[::-1]}[orientation]
        got = read_image(path)
        assert got.dtype == stored.dtype and np.array_equal(got, upright), (name, orientation, planar)


def test_a_half_float_tiff_reads_as_float32_and_upscales(tmp_path, esc_pth):
    """Was 'unsupported pixel type float16 (8-bit, 16-bit or float only)'."""
    import tifffile
    stored = np.random.default_rng(6).random((6, 7, 3)).astype(np.float16)
    (tmp_path / 'in16').mkdir()
    tifffile.imwrite(tmp_path / 'in16' / 'half.tif', stored, photometric='rgb')
    got = read_image(tmp_path / 'in16' / 'half.tif')
    assert got.dtype == np.float32 and np.array_equal(got, stored[:, :, ::-1].astype(np.float32))
    assert main(['upscale', '-i', str(tmp_path / 'in16'), '-o', str(tmp_path / 'out16'), '-m', esc_pth]) == 0
    out = read_image(tmp_path / 'out16' / 'half.tif')
    assert out.dtype == np.float32 and out.shape == (12, 14, 3)


def test_compressed_tiffs_read_as_stored(tmp_path, monkeypatch):
    # OpenCV 5 reads an LZW 8-bit RGBA TIFF premultiplied by its alpha, LZW 16-bit gray + alpha and
    # Zstd 16-bit RGB as 8-bit, planar LZW/Zstd samples as wrong pixels: tifffile + imagecodecs reads them
    import tifffile
    rng = np.random.default_rng(6)
    rgb16 = rng.integers(0, 65536, (6, 10, 3), dtype=np.uint16)
    kinds = {'rgba8': (np.concatenate([rgb16 >> 8, rng.integers(0, 256, (6, 10, 1))], axis=2).astype(np.uint8), 'rgb'),
             'gray_alpha16': (rgb16[:, :, :2], 'minisblack'), 'rgb16': (rgb16, 'rgb'),
             'float': ((rgb16 / 65535).astype(np.float32), 'rgb')}
    for compression, planar, (name, (stored, photometric)) in itertools.product(('lzw', 'zstd', 'deflate'),
                                                                                (False, True), kinds.items()):
        path = tmp_path / f'{name}_{compression}{"_planar" * planar}.tif'
        extra = dict(extrasamples=['unassalpha']) if stored.shape[2] in (2, 4) else {}
        tifffile.imwrite(path, np.moveaxis(stored, -1, 0) if planar else stored, photometric=photometric,
                         compression=compression, planarconfig='separate' if planar else 'contig', **extra)
        bgr = stored if stored.shape[2] == 2 else stored[:, :, [2, 1, 0, 3][:stored.shape[2]]]
        got = read_image(path)
        assert got.dtype == stored.dtype and np.array_equal(got, bgr), (name, compression, planar)
    ramp = np.arange(16) * 12
    jpeg = np.stack([np.add.outer(ramp, ramp) // 2, np.add.outer(ramp, ramp[::-1]) // 2,
                     np.broadcast_to(ramp, (16, 16))], axis=2).astype(np.uint8)
    tifffile.imwrite(tmp_path / 'jpeg.tif', jpeg, photometric='rgb', compression='jpeg')
    assert np.abs(read_image(tmp_path / 'jpeg.tif').astype(int) - jpeg[:, :, ::-1]).max() <= 12  # lossy
    # without imagecodecs, one line saying so (not OpenCV's wrong pixels)
    monkeypatch.setattr(tifffile.TiffPage, 'asarray', lambda *a, **k: (_ for _ in ()).throw(
        ValueError("<COMPRESSION.LZW: 5> requires the 'imagecodecs' package")))
    with pytest.raises(InferenceError, match=r'rgba8_lzw.tif: its LZW compression needs the imagecodecs package'):
        read_image(tmp_path / 'rgba8_lzw.tif')


def test_gray_with_a_transparent_level_keeps_it_as_alpha(tmp_path):
    # a gray PNG's tRNS chunk names one transparent level; OpenCV reads the gray alone
    import struct
    import zlib

    from PIL import Image
    gray = np.where(np.add.outer(np.arange(8), np.arange(12)) % 3 == 0, 0, 200).astype(np.uint8)
    Image.fromarray(gray, 'L').save(tmp_path / 'g8.png', transparency=0)
    got = read_image(tmp_path / 'g8.png')
    assert got.shape == (8, 12, 2) and np.array_equal(got[:, :, 0], gray)
    assert np.array_equal(got[:, :, 1], np.where(gray == 0, 0, 255))
    deep = gray.astype(np.uint16) * 257
    assert cv2.imwrite(str(tmp_path / 'g16.png'), deep)
    data = (tmp_path / 'g16.png').read_bytes()
    trns = struct.pack('>I', 2) + b'tRNS' + struct.pack('>H', 200 * 257)
    trns += struct.pack('>I', zlib.crc32(trns[4:]))
    (tmp_path / 'g16.png').write_bytes(data[:33] + trns + data[33:])  # after the signature and IHDR
    got = read_image(tmp_path / 'g16.png')
    assert got.dtype == np.uint16 and got.shape == (8, 12, 2) and np.array_equal(got[:, :, 0], deep)
    assert np.array_equal(got[:, :, 1], np.where(deep == 200 * 257, 0, 65535))
    Image.fromarray(gray, 'L').save(tmp_path / 'opaque.png')
    assert read_image(tmp_path / 'opaque.png').shape == (8, 12)


def test_subfolders_and_non_images_are_named(tmp_path, esc_pth, images, capsys):
    folder, _ = images
    (folder / 'more').mkdir()
    cv2.imwrite(str(folder / 'more' / 'x.png'), np.zeros((4, 4, 3), np.uint8))
    assert main(['upscale', '-i', str(folder), '-o', str(tmp_path / 'o'), '-m', esc_pth]) == 1  # its corrupt.png
    captured = capsys.readouterr()
    assert f'warning: skipping folder {folder / "more"}: subfolders are not searched' in captured.err
    assert summary(captured.out).startswith('done: 8, skipped: 2, failed: 1')  # notes.txt and more/
    for done in (8, 0):  # the output folder inside the input one is this run's own, not a folder left out
        assert main(['upscale', '-i', str(folder), '-o', str(folder / 'x4'), '-m', esc_pth]) == 1
        captured = capsys.readouterr()  # run again: the 8 written are skipped, and only they
        assert summary(captured.out).startswith(f'done: {done}, skipped: {10 - done}, failed: 1'), captured.out
        assert 'x4:' not in captured.err
    nested = tmp_path / 'nested'
    (nested / 'a').mkdir(parents=True)
    assert main(['upscale', '-i', str(nested), '-o', str(tmp_path / 'o2'), '-m', esc_pth]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count('\n') == 0 and f'no files in {nested} (its 1 subfolder(s) are not searched' in err
    assert main(['upscale', '-i', str(folder / 'notes.txt'), '-o', str(tmp_path / 'o3'), '-m', esc_pth]) == 2
    assert 'notes.txt is not an image by its extension' in capsys.readouterr().err


def test_gray_with_alpha_stays_gray_with_alpha(tmp_path, esc_pth, capsys):
    from PIL import Image
    rng = np.random.default_rng(2)
    la = np.stack([rng.integers(0, 256, (10, 12)), np.full((10, 12), 180)], axis=2).astype(np.uint8)
    folder = tmp_path / 'la'
    folder.mkdir()
    for ext in ('.png', '.tif'):
        Image.fromarray(la, 'LA').save(folder / f'la{ext}')
        assert read_image(folder / f'la{ext}').shape == (10, 12, 2)  # OpenCV alone: BGRA, or the alpha dropped
        assert np.array_equal(read_image(folder / f'la{ext}'), la)
    assert main(['upscale', '-i', str(folder), '-o', str(tmp_path / 'o'), '-m', esc_pth]) == 0
    for ext in ('.png', '.tif'):
        with Image.open(tmp_path / 'o' / f'la{ext}') as im:
            assert im.mode == 'LA' and im.size == (24, 20)
            assert (np.asarray(im)[:, :, 1] == 180).all()  # constant alpha stays constant


def test_16_bit_gray_with_alpha_png_stays_so(tmp_path, esc_pth, capsys):
    # PIL reports a 16-bit gray + alpha PNG as RGBA, and neither PIL nor OpenCV writes one
    from esc_arch.inference import _write_png_gray_alpha16
    rng = np.random.default_rng(4)
    la = np.stack([rng.integers(0, 65536, (10, 12)), np.full((10, 12), 40000)], axis=2).astype(np.uint16)
    folder = tmp_path / 'la16'
    folder.mkdir()
    _write_png_gray_alpha16(str(folder / 'la.png'), la)
    decoded = cv2.imread(str(folder / 'la.png'), cv2.IMREAD_UNCHANGED)  # OpenCV's decoder: BGRA, gray thrice
    assert decoded.dtype == np.uint16 and np.array_equal(decoded[:, :, [0, 3]], la)
    assert np.array_equal(decoded[:, :, 0], decoded[:, :, 2])
    assert np.array_equal(read_image(folder / 'la.png'), la)
    assert main(['upscale', '-i', str(folder), '-o', str(tmp_path / 'o'), '-m', esc_pth]) == 0
    out = tmp_path / 'o' / 'la.png'
    assert out.read_bytes()[24:26] == bytes([16, 4])  # IHDR: 16-bit, colour type 4 (gray + alpha)
    decoded = cv2.imread(str(out), cv2.IMREAD_UNCHANGED)
    assert decoded.shape == (20, 24, 4) and decoded.dtype == np.uint16
    assert np.array_equal(decoded[:, :, 0], decoded[:, :, 1]) and (decoded[:, :, 3] == 40000).all()


def test_float_images(tmp_path, esc_pth, capsys):
    rng = np.random.default_rng(3)
    folder = tmp_path / 'f'
    folder.mkdir()
    assert cv2.imwrite(str(folder / 'f64.tif'), rng.random((8, 9, 3)))
    assert cv2.imwrite(str(folder / 'by255.tif'), (rng.random((8, 9, 3)) * 255).astype(np.float32))
    assert read_image(folder / 'f64.tif').dtype == np.float64
    with pytest.raises(InferenceError, match=r'float pixels span \[.*, 25\d\.?\d*\]; the models take \[0, 1\]'):
        read_image(folder / 'by255.tif')
    assert main(['upscale', '-i', str(folder), '-o', str(tmp_path / 'o'), '-m', esc_pth]) == 1
    captured = capsys.readouterr()
    assert 'by255.tif: float pixels span' in captured.err and summary(captured.out).startswith('done: 1,')
    out = cv2.imread(str(tmp_path / 'o' / 'f64.tif'), cv2.IMREAD_UNCHANGED)
    assert out.dtype == np.float64 and out.shape == (16, 18, 3)  # the input's type, not float32


def test_truncated_jpeg_fails_instead_of_gray_fill(tmp_path):
    path = tmp_path / 'cut.jpg'
    assert cv2.imwrite(str(path), np.random.default_rng(4).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = path.read_bytes()
    path.write_bytes(data[:len(data) * 2 // 3])
    assert cv2.imread(str(path)) is not None  # OpenCV decodes it, the missing part gray
    with pytest.raises(InferenceError, match='cut.jpg: image file is truncated'):
        read_image(path)


def test_output_format_chosen_with_ext(tmp_path, esc_pth, images, capsys):
    folder, inputs = images
    rc = main(['upscale', '-i', str(folder), '-o', str(tmp_path / 'png'), '-m', esc_pth, '--ext', 'png'])
    assert rc == 1  # the corrupt image
    outputs = {p.name: read_image(p) for p in (tmp_path / 'png').iterdir()}
    assert sorted(outputs) == sorted(name.rsplit('.', 1)[0] + '.png' for name in inputs)
    for name, src in inputs.items():
        out = outputs[name.rsplit('.', 1)[0] + '.png']
        assert out.dtype == src.dtype and out.shape[2:] == src.shape[2:], name  # 16-bit and alpha kept
    capsys.readouterr()
    rc = main(['upscale', '-i', str(folder), '-o', str(tmp_path / 'jpg'), '-m', esc_pth, '--ext', 'jpg'])
    err = capsys.readouterr().err
    # 16-bit rounded to 8-bit (not saturated by OpenCV), the alpha dropped, each said once
    assert err.count('stores uint8: the pixels are rounded to uint8') == 1
    assert err.count('has no alpha: the alpha is dropped') == 1
    deep = read_image(tmp_path / 'png' / 'deep.png')
    jpeg = read_image(tmp_path / 'jpg' / 'deep.jpg')
    assert (jpeg == 255).mean() < 0.2 and abs(jpeg.mean() - (deep / 257).mean()) < 3  # OpenCV: nearly all 255
    assert read_image(tmp_path / 'jpg' / 'rgba.jpg').shape[2] == 3
    # two inputs with one output name: the second is refused, not written over the first
    cv2.imwrite(str(folder / 'rgb.bmp'), np.zeros((5, 5, 3), np.uint8))
    rc = main(['upscale', '-i', str(folder), '-o', str(tmp_path / 'clash'), '-m', esc_pth, '--ext', 'png'])
    err = capsys.readouterr().err
    assert rc == 1 and 'rgb.png: its output' in err and 'is also that of' in err and 'rgb.bmp' in err
    assert read_image(tmp_path / 'clash' / 'rgb.png').shape == (10, 10, 3)  # rgb.bmp's (sorted first), kept


def test_write_image_refuses_what_the_format_cannot_store(tmp_path):
    from esc_arch.inference import fit_to_format, write_image
    float_img = np.random.default_rng(6).random((4, 5, 3))
    with pytest.raises(InferenceError, match=r'\.png stores uint8 or uint16 pixels, not float64'):
        write_image(tmp_path / 'f.png', float_img)  # OpenCV writes it black
    fitted, changes = fit_to_format(float_img, '.png')
    assert fitted.dtype == np.uint16 and np.abs(fitted / 65535 - float_img).max() <= 0.5 / 65535 + 1e-12
    assert changes == ['.png stores uint8 or uint16: the pixels are rounded to uint16']
    assert fit_to_format(float_img, '.tif') == (float_img, [])


def test_the_readme_python_api(tmp_path):
    import esc_arch
    model = randomize_(ESC(**tiny_config(window_size=8))).eval()
    cv2.imwrite(str(tmp_path / 'photo.png'), np.random.default_rng(7).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    up = esc_arch.Upscaler(model, device='cpu', tile=16, tile_overlap=8)
    sr = up.upscale_image(esc_arch.read_image(tmp_path / 'photo.png'))
    esc_arch.write_image(tmp_path / 'photo_x2.png', sr)
    assert sr.shape == (40, 60, 3) and sr.dtype == np.uint8
    assert np.array_equal(cv2.imread(str(tmp_path / 'photo_x2.png')), sr)
    torch.save({'params': model.state_dict()}, tmp_path / 'model.pth')  # or a checkpoint's path
    from_path = esc_arch.Upscaler(tmp_path / 'model.pth', tile=16, tile_overlap=8)
    assert np.array_equal(from_path.upscale_image(esc_arch.read_image(tmp_path / 'photo.png')), sr)
    with pytest.raises(TypeError, match='Upscaler takes an ESC-family model or a checkpoint path, got OrderedDict'):
        esc_arch.Upscaler(model.state_dict())  # was AttributeError: ... has no attribute 'deploy'


def test_an_output_on_a_full_disk_says_so(tmp_path):
    from esc_arch.inference import write_image
    noise = np.random.default_rng(8).integers(0, 256, (64, 64, 3), dtype=np.uint8)  # ~12 kB as PNG
    with file_size_limit(4_000), pytest.raises(InferenceError, match=r'out.png .*is the disk full\?'):
        write_image(tmp_path / 'out.png', noise)
    assert list(tmp_path.iterdir()) == []  # no partial file


def test_colours_gray_and_alpha_come_out_as_the_model_makes_them():
    # what the model computes on the RGB image, in the input's channel order (a lost BGR -> RGB flip
    # swapped red and blue); gray as the luminance of the colour result; alpha by BasicSR's bicubic
    from basicsr.utils.matlab_functions import imresize
    model = randomize_(ESC(**tiny_config(window_size=4)), scale=0.2).eval()
    rng = np.random.default_rng(11)
    bgr = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    up = Upscaler(model)
    with torch.no_grad():
        rgb_out = model(torch.from_numpy(bgr[:, :, ::-1].transpose(2, 0, 1).copy()).float().unsqueeze(0) / 255)
    expected = np.round(rgb_out[0].clamp(0, 1).permute(1, 2, 0).numpy()[:, :, ::-1] * 255)
    got = up.upscale_image(bgr)
    assert np.abs(got.astype(int) - expected).max() <= 1
    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    as_colour = up.upscale_image(np.repeat(gray[:, :, None], 3, axis=2))
    assert np.abs(up.upscale_image(gray).astype(int) - cv2.cvtColor(as_colour, cv2.COLOR_BGR2GRAY)).max() <= 1
    ramp = np.broadcast_to(np.linspace(0, 255, 16).astype(np.uint8), (12, 16))
    bgra = np.concatenate([bgr, ramp[:, :, None]], axis=2)
    alpha = np.round(np.clip(imresize(ramp.astype(np.float32) / 255, 2), 0, 1) * 255)
    assert np.abs(up.upscale_image(bgra)[:, :, 3].astype(int) - alpha).max() <= 1


def test_tiles_that_end_at_the_border_take_no_extra_row():
    up = Upscaler(ESC(**tiny_config(window_size=4)).eval(), tile=32, tile_overlap=16)
    tiles = up.tiles(64, 64)
    assert sorted({t[0] for t in tiles}) == [0, 16, 32] and len(tiles) == 9  # 32 + 32 = 64: no start at 48
    assert up.count_steps([np.zeros((64, 64, 3), np.uint8)]) == 9


def test_written_files_follow_the_umask_like_any_other(tmp_path):
    # a temporary file is created 0600; the renamed output must get 0666 less the umask
    import os

    from esc_arch.fileio import atomic_write_bytes
    from esc_arch.inference import write_image
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / 'record.json', b'{}')
        write_image(tmp_path / 'out.png', np.zeros((4, 4, 3), np.uint8))
    finally:
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {'record.json': 0o644, 'out.png': 0o644}


@pytest.mark.parametrize('dtype', [np.uint16, np.float32])
def test_deep_gray_with_alpha_tiff_stays_gray_with_alpha(tmp_path, esc_pth, dtype):
    # OpenCV writes 1, 3 or 4 channels: a 16-bit / float gray + alpha TIFF came out as RGBA
    import tifffile
    rng = np.random.default_rng(9)
    gray = rng.random((6, 10))
    la = np.stack([gray, np.full((6, 10), 0.75)], axis=2)
    la = (la * 65535).round().astype(np.uint16) if dtype == np.uint16 else la.astype(np.float32)
    folder = tmp_path / 'in'
    folder.mkdir()
    tifffile.imwrite(folder / 'la.tif', la, photometric='minisblack', extrasamples=['unassalpha'])
    assert main(['upscale', '-i', str(folder), '-o', str(tmp_path / 'o'), '-m', esc_pth]) == 0
    out = read_image(tmp_path / 'o' / 'la.tif')
    assert out.dtype == dtype and out.shape == (12, 20, 2)
    assert np.abs(out[:, :, 1].astype(float) - la[0, 0, 1]).max() <= (1 if dtype == np.uint16 else 1e-6)
    write_image(tmp_path / 'back.tif', la)
    assert np.array_equal(read_image(tmp_path / 'back.tif'), la)


def test_devices_are_resolved_or_refused_in_one_line(monkeypatch):
    from esc_arch.inference import resolve_device
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert resolve_device(None) == resolve_device('auto') == resolve_device('cpu') == torch.device('cpu')
    with pytest.raises(InferenceError, match=r"^unsupported device 'meta' \(use cpu or cuda\)$"):
        resolve_device('meta')
    with pytest.raises(InferenceError, match=r"^unknown device 'gpu0' \(use cpu or cuda\)$"):
        resolve_device('gpu0')


def test_batch_below_one_is_refused(tmp_path, esc_pth, images, capsys):
    with pytest.raises(InferenceError, match=r'^batch must be >= 1, got 0$'):
        Upscaler(ESC(**tiny_config()), batch=0)
    with pytest.raises(InferenceError, match=r'^tile must be >= 0, got -1; tile overlap must be >= 0, got -2$'):
        Upscaler(ESC(**tiny_config()), tile=-1, tile_overlap=-2)
    folder, _ = images
    assert main(['upscale', '-i', str(folder / 'rgb.png'), '-o', str(tmp_path / 'o'), '-m', esc_pth,
                 '--batch', '0']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ['basicsr upscale: error: batch must be >= 1, got 0']


def test_a_long_narrow_image_is_tiled_along_its_length():
    up = Upscaler(ESC(**tiny_config(window_size=4)).eval(), tile=16, tile_overlap=8)
    for height, width in ((64, 8), (8, 64)):
        tiles = up.tiles(height, width)
        assert len(tiles) == 7  # starts 0, 8, ..., 48 along the long side; 48 + 16 = 64
        assert all(y1 - y0 <= 16 and x1 - x0 <= 16 for y0, y1, x0, x1 in tiles)


def test_neighbouring_tiles_weights_sum_to_one():
    from esc_arch.inference import ramp_weights
    for overlap, scale in ((8, 1), (8, 2), (16, 3), (4, 4)):
        # tiles [0, 32) and [32 - overlap, 64): they share `overlap` input pixels
        left = ramp_weights(0, 32, None, 32 - overlap, scale)
        right = ramp_weights(32 - overlap, 64, 32, None, scale)
        n = overlap * scale
        assert torch.allclose(left[-n:] + right[:n], torch.ones(n)), (overlap, scale)
        assert (right[:n // 4] == 0).all() and (right[n - n // 4:] == 1).all() and (left[:-n] == 1).all()
        assert torch.equal(left[-n:], right[:n].flip(0))


def test_an_alpha_edge_stays_within_range():
    # bicubic overshoots next to a hard 0 / 1 edge; alpha outside [0, 1] wrapped around as uint8
    from esc_arch.inference import tensor_to_image, upscale_alpha
    edge = np.zeros((8, 8), np.float32)
    edge[:, 4:] = 1
    up = upscale_alpha(edge, 2)
    assert up.shape == (16, 16) and up.min() >= 0 and up.max() <= 1
    like = np.zeros((8, 8, 4), np.uint8)
    out = tensor_to_image(torch.zeros(1, 3, 16, 16), np.full((16, 16), 1.2, np.float32), like)
    assert (out[:, :, 3] == 255).all()


def test_gray_with_alpha_to_jpeg_keeps_the_gray():
    from esc_arch.inference import fit_to_format
    la = np.stack([np.full((4, 5), 30), np.full((4, 5), 220)], axis=2).astype(np.uint8)
    fitted, changes = fit_to_format(la, '.jpg')
    assert fitted.shape == (4, 5) and (fitted == 30).all()
    assert changes == ['.jpg has no alpha: the alpha is dropped']


def test_an_unsupported_pixel_type_is_one_line(tmp_path, esc_pth, capsys):
    import tifffile
    folder = tmp_path / 'in'
    folder.mkdir()
    tifffile.imwrite(folder / 'int32.tif', np.arange(24, dtype=np.int32).reshape(4, 6))
    cv2.imwrite(str(folder / 'ok.png'), np.zeros((4, 6, 3), np.uint8))
    with pytest.raises(InferenceError, match=r'int32.tif: unsupported pixel type int32 \(8-bit, 16-bit or float'):
        read_image(folder / 'int32.tif')
    assert main(['upscale', '-i', str(folder), '-o', str(tmp_path / 'o'), '-m', esc_pth]) == 1
    captured = capsys.readouterr()
    assert summary(captured.out).startswith('done: 1, skipped: 0, failed: 1')
    assert [line for line in captured.err.splitlines() if 'error' in line] == [
        f'basicsr upscale: error: {folder / "int32.tif"}: unsupported pixel type int32 (8-bit, 16-bit or float only)']


@pytest.mark.parametrize('ext', ['.png', '.jpg'])
def test_an_exif_orientation_out_of_range_reads_as_stored(tmp_path, ext):
    from PIL import Image
    rgb = np.random.default_rng(2).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    for orientation in (0, 9):
        path = tmp_path / f'o{orientation}{ext}'
        _exif_image(path, rgb, orientation, **({'quality': 100} if ext == '.jpg' else {}))
        with Image.open(path) as im:
            stored = np.asarray(im.convert('RGB'))[:, :, ::-1]  # the pixels as stored, not turned
        assert stored.shape == (6, 10, 3)
        got = read_image(path)
        assert got.shape == stored.shape and np.abs(got.astype(int) - stored).max() <= (3 if ext == '.jpg' else 0)


def test_batches_take_same_size_images_up_to_batch(tmp_path, esc_pth, monkeypatch, capsys):
    sizes = []
    real = Upscaler.upscale_images

    def spy(self, imgs, progress=None):
        sizes.append([img.shape for img in imgs])
        return real(self, imgs, progress)
    monkeypatch.setattr(Upscaler, 'upscale_images', spy)
    folder = tmp_path / 'in'
    folder.mkdir()
    for name, shape in (('a', (6, 8, 3)), ('b', (6, 8, 3)), ('c', (6, 8, 3)), ('d', (7, 8, 3)), ('e', (6, 8))):
        cv2.imwrite(str(folder / f'{name}.png'), np.zeros(shape, np.uint8))
    assert main(['upscale', '-i', str(folder), '-o', str(tmp_path / 'o'), '-m', esc_pth, '--batch', '2']) == 0
    assert summary(capsys.readouterr().out).startswith('done: 5, skipped: 0, failed: 0')
    assert sizes == [[(6, 8, 3)] * 2, [(6, 8, 3)], [(7, 8, 3)], [(6, 8)]]
    sizes.clear()
    assert main(['upscale', '-i', str(folder), '-o', str(tmp_path / 'o1'), '-m', esc_pth]) == 0
    assert [len(s) for s in sizes] == [1] * 5


def test_a_failed_forward_pass_is_one_line_per_image_and_the_run_goes_on(tmp_path, esc_pth, monkeypatch, capsys):
    real = Upscaler.upscale_images

    def oom(self, imgs, progress=None):
        if imgs[0].shape[0] == 7:
            raise RuntimeError('CUDA out of memory. Tried to allocate 2.00 GiB\nmore details')
        return real(self, imgs, progress)
    monkeypatch.setattr(Upscaler, 'upscale_images', oom)
    folder = tmp_path / 'in'
    folder.mkdir()
    for name, rows in (('a', 7), ('b', 7), ('c', 6)):
        cv2.imwrite(str(folder / f'{name}.png'), np.zeros((rows, 8, 3), np.uint8))
    assert main(['upscale', '-i', str(folder), '-o', str(tmp_path / 'o'), '-m', esc_pth, '--batch', '2']) == 1
    captured = capsys.readouterr()
    assert summary(captured.out).startswith('done: 1, skipped: 0, failed: 2')
    assert [line for line in captured.err.splitlines() if 'error' in line] == [
        f'basicsr upscale: error: {folder / name}.png: CUDA out of memory. Tried to allocate 2.00 GiB' for name in 'ab']
    assert 'more details' not in captured.err  # the first line of the error only
    assert [p.name for p in (tmp_path / 'o').iterdir()] == ['c.png']


def test_no_seam_warning_without_tiles(tmp_path, esc_pth, images, capsys):
    folder, _ = images
    assert main(['upscale', '-i', str(folder / 'rgb.png'), '-o', str(tmp_path / 'o'), '-m', esc_pth,
                 '--tile', '0', '--tile-overlap', '0']) == 0
    assert 'seams' not in capsys.readouterr().err


def test_a_missing_input_is_one_line(tmp_path, esc_pth, capsys):
    assert main(['upscale', '-i', str(tmp_path / 'nope.png'), '-o', str(tmp_path / 'o'), '-m', esc_pth]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f'basicsr upscale: error: input not found: {tmp_path / "nope.png"}']
    assert not (tmp_path / 'o').exists()


def test_an_output_that_cannot_be_written_fails_that_image_only(tmp_path, esc_pth, images, capsys):
    folder, _ = images
    out = tmp_path / 'o'
    (out / 'rgb.png').mkdir(parents=True)  # a folder where rgb.png's output goes
    (tmp_path / 'two').mkdir()
    for name in ('rgb.png', 'gray.png'):
        (tmp_path / 'two' / name).write_bytes((folder / name).read_bytes())
    assert main(['upscale', '-i', str(tmp_path / 'two'), '-o', str(out), '-m', esc_pth, '--overwrite']) == 1
    captured = capsys.readouterr()
    assert summary(captured.out).startswith('done: 1, skipped: 0, failed: 1')
    errors = [line for line in captured.err.splitlines() if 'error' in line]
    assert len(errors) == 1 and errors[0].startswith(f'basicsr upscale: error: cannot write {out / "rgb.png"}: ')
    assert read_image(out / 'gray.png').shape == (18, 22)
    assert sorted(p.name for p in out.iterdir()) == ['gray.png', 'rgb.png']  # no temp file left


@pytest.mark.parametrize('name, dtype, patch', [
    ('la.png', np.uint8, 'PIL.Image.Image.save'),
    ('la.tif', np.uint8, 'PIL.Image.Image.save'),
    ('la16.png', np.uint16, 'esc_arch.inference._write_png_gray_alpha16'),
    ('la16.tif', np.uint16, 'tifffile.imwrite'),
    ('laf.tif', np.float32, 'tifffile.imwrite'),
])
def test_a_failed_gray_alpha_write_names_the_output_and_leaves_nothing(tmp_path, monkeypatch, name, dtype, patch):
    def disk_full(*args, **kwargs):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(patch, disk_full)
    img = np.zeros((5, 6, 2), dtype)
    with pytest.raises(OSError) as caught:
        write_image(tmp_path / name, img)
    message = str(caught.value)
    assert message.startswith(f'cannot write {tmp_path / name}: ') and 'No space left on device' in message
    assert '.tmp' not in message and list(tmp_path.iterdir()) == []


def test_an_hxwx1_array_is_gray_and_other_arrays_are_named():
    # a caller's own (H, W, 1) array was taken for colour: "ESC takes a (N >= 1, 3, H, W) batch"
    up = Upscaler(randomize_(ESC(**tiny_config(window_size=8)), scale=0.05).eval())
    gray = np.random.default_rng(0).integers(0, 256, (9, 7), dtype=np.uint8)
    out = up.upscale_image(gray[:, :, None])
    assert out.shape == (18, 14, 1) and out.dtype == np.uint8
    assert np.array_equal(out[:, :, 0], up.upscale_image(gray))
    for bad, said in ((np.zeros((4, 4, 5), np.uint8), r'got \(4, 4, 5\) uint8'), (np.zeros(4), r'got \(4,\) float64'),
                      (np.zeros((4, 4), np.int32), r'got \(4, 4\) int32'), ([[1]], 'got list')):
        with pytest.raises(ValueError, match=r'^an image must be an HxW or HxWxC array with C = 1 \(gray\), 2 .*, of '
                                             rf'uint8, uint16, float32, float64; {said}$'):
            up.upscale_image(bad)


def test_an_output_larger_than_its_format_stores_is_one_line_before_the_forward(tmp_path, esc_pth, monkeypatch,
                                                                                capsys):
    # WebP stores at most 16383 pixels a side, JPEG 65500: a 8200-wide WebP went through the whole
    # forward, then failed with "is the disk full?" (and an OpenCV log line)
    with pytest.raises(InferenceError, match=r'^cannot write .*wide\.webp: \.webp stores images of at most 16383 '
                                             r'pixels a side, not 16384x8$'):
        write_image(tmp_path / 'wide.webp', np.zeros((8, 16384, 3), np.uint8))
    with pytest.raises(InferenceError, match=r'\.jpg stores images of at most 65500 pixels a side, not 8x65501$'):
        write_image(tmp_path / 'tall.jpg', np.zeros((65501, 8, 3), np.uint8))
    assert list(tmp_path.iterdir()) == [tmp_path / 'esc_x2.pth']
    folder = tmp_path / 'in'
    folder.mkdir()
    assert cv2.imwrite(str(folder / 'pano.webp'), np.zeros((4, 8200, 3), np.uint8))
    assert cv2.imwrite(str(folder / 'small.webp'), np.zeros((4, 6, 3), np.uint8))
    calls = []
    real = Upscaler.upscale_images
    monkeypatch.setattr(Upscaler, 'upscale_images', lambda self, images, **kw: calls.append(images) or
                        real(self, images, **kw))
    assert main(['upscale', '-i', str(folder), '-o', str(tmp_path / 'out'), '-m', esc_pth]) == 1
    captured = capsys.readouterr()
    assert summary(captured.out).startswith('done: 1, skipped: 0, failed: 1')
    assert [line for line in captured.err.splitlines() if 'error' in line] == [
        f'basicsr upscale: error: {folder / "pano.webp"}: its x2 output cannot be written: .webp stores images of '
        'at most 16383 pixels a side, not 16400x8 (use --ext png)']
    assert [img.shape for batch in calls for img in batch] == [(4, 6, 3)]  # pano.webp was not upscaled
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['small.webp']


def test_the_upscaler_resolves_its_device_as_the_command_does(monkeypatch):
    # Upscaler(device='auto') was a RuntimeError ("Expected one of cpu, cuda, ..."), and 'cuda'
    # without CUDA the driver's error from the model's .to()
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    model = ESC(**tiny_config())
    assert Upscaler(model, device='auto').device == Upscaler(model, device=None).device == torch.device('cpu')
    with pytest.raises(InferenceError, match=r'^device cuda requested but CUDA is not available here'):
        Upscaler(model, device='cuda')


def test_temp_files_an_interrupted_write_left_are_not_inputs(tmp_path, esc_pth, capsys):
    # a run killed while writing leaves '.<stem>.<random>.tmp<suffix>' in its -o folder; given that
    # folder as -i, a partial one failed the run ("cannot read image"), a whole one was upscaled
    folder = tmp_path / 'x2'
    folder.mkdir()
    assert cv2.imwrite(str(folder / 'a.png'), np.zeros((6, 7, 3), np.uint8))
    whole = (folder / 'a.png').read_bytes()
    (folder / '.a.k2j3h4qz.tmp.png').write_bytes(whole[:len(whole) // 2])
    (folder / '.b.x9y8z7wv.tmp.png').write_bytes(whole)
    assert main(['upscale', '-i', str(folder), '-o', str(tmp_path / 'x4'), '-m', esc_pth]) == 0
    captured = capsys.readouterr()
    assert summary(captured.out).startswith('done: 1, skipped: 0, failed: 0') and '.tmp' not in captured.err
    assert sorted(p.name for p in (tmp_path / 'x4').iterdir()) == ['a.png']
