"""predict.py: image files of any format, size and mode -> Fashion-MNIST-style input;
every kind of bad file -> one ImageError naming it; class probabilities."""
from __future__ import annotations

import os
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFile, features

from lenet import predict as P
from lenet.errors import DataError
from lenet.report import load_run
from test_report import FASHION, trained_real_run, trained_tiny_run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return trained_tiny_run(tmp_path_factory)


def _figure(size=(80, 120), dark_on_light=True):
    """A filled ellipse (the object) on a plain background, L mode."""
    bg, fg = (255, 30) if dark_on_light else (0, 230)
    im = Image.new("L", size, bg)
    w, h = size
    ImageDraw.Draw(im).ellipse((w // 4, h // 8, 3 * w // 4, 7 * h // 8), fill=fg)
    return im


def _check_fashion_style(x, tall=False):
    """Light object on black, centred, its longest edge filling the canvas."""
    assert x.shape == (28, 28) and x.dtype == np.uint8
    assert x[0, 0] == x[0, -1] == x[-1, 0] == x[-1, -1] == 0
    assert x[14, 14] > 150
    rows, cols = np.nonzero(x > 40)
    extent = (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1)
    assert max(extent) >= 26  # the longest edge is scaled to 28
    if tall:
        assert extent[0] > extent[1]


def test_a_fashion_mnist_image_comes_back_unchanged(tmp_path):
    rng = np.random.default_rng(0)
    x = np.zeros((28, 28), np.uint8)
    x[:, 5:24] = rng.integers(90, 256, (28, 19))  # spans all rows; odd margins: 5 left, 4 right
    Image.fromarray(x).save(tmp_path / "x.png")
    assert np.array_equal(P.load_image(tmp_path / "x.png"), x)


def test_dark_object_on_white_photo_is_inverted_trimmed_and_centred(tmp_path):
    im = Image.new("RGB", (400, 300), (250, 248, 245))
    ImageDraw.Draw(im).rectangle((40, 100, 119, 259), fill=(20, 25, 30))  # 80 x 160, left
    im.save(tmp_path / "photo.jpg", quality=90)
    x = P.load_image(tmp_path / "photo.jpg")
    rows, cols = np.nonzero(x > 128)
    assert (rows.min(), rows.max()) == (0, 27)  # the long edge fills the canvas
    assert 12 <= cols.max() - cols.min() + 1 <= 16 and abs(cols.mean() - 13.5) < 1  # centred
    assert x[:, :5].max() == 0 and x[:, -5:].max() == 0


def _save(im, path, **kw):
    im.save(path, **kw)
    return path


def _rgba(dark):
    fig = _figure(dark_on_light=False)  # object = 230 inside, 0 outside
    alpha = fig.point(lambda v: 255 if v else 0)
    colour = (20, 20, 60) if dark else (240, 230, 200)
    # Transparent pixels hold the object's own colour, so only alpha tells them apart.
    im = Image.new("RGBA", fig.size, colour + (0,))
    im.putalpha(alpha)
    return im


def _palette(transparent):
    im = _figure().convert("P")
    if transparent:
        im.info["transparency"] = im.getpixel((0, 0))
    return im


CASES = {
    "L.png": lambda: _figure(),
    "RGB.png": lambda: _figure().convert("RGB"),
    "RGBA-dark-object.png": lambda: _rgba(dark=True),
    "RGBA-light-object.png": lambda: _rgba(dark=False),
    "LA.png": lambda: _rgba(dark=True).convert("LA"),
    "P.gif": lambda: _palette(False),
    "P-transparent.png": lambda: _palette(True),
    "1.png": lambda: _figure().convert("1"),
    "I16.png": lambda: Image.fromarray(np.asarray(_figure(), np.uint16) * 257),
    "I.tiff": lambda: Image.fromarray(np.asarray(_figure(), np.int32) * 100),
    "F.tiff": lambda: Image.fromarray(np.asarray(_figure(), np.float32) / 255),
    "RGB.bmp": lambda: _figure().convert("RGB"),
    "RGB.tiff": lambda: _figure().convert("RGB"),
    "CMYK.jpg": lambda: _figure().convert("CMYK"),
    "RGB.jpg": lambda: _figure().convert("RGB"),
    "L-light-on-black.png": lambda: _figure(dark_on_light=False),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_mode_and_format_becomes_the_same_kind_of_input(tmp_path, name):
    path = _save(CASES[name](), tmp_path / name)
    _check_fashion_style(P.load_image(path), tall=True)


@pytest.mark.skipif(not features.check("webp"), reason="Pillow built without WebP")
@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_webp(tmp_path, mode):
    im = _figure().convert(mode) if mode == "RGB" else _rgba(dark=True)
    _check_fashion_style(P.load_image(_save(im, tmp_path / "x.webp", lossless=True)), tall=True)


def test_animated_gif_uses_its_first_frame(tmp_path):
    frames = [_figure().convert("P"), Image.new("P", (80, 120), 0)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    _check_fashion_style(P.load_image(tmp_path / "a.gif"), tall=True)


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".tiff", ".webp"])
def test_exif_orientation_is_applied_once(tmp_path, suffix):
    # Pillow's TIFF reader turns the image upright itself while loading; turning it again
    # would leave it lying on its side.
    if suffix == ".webp" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    im = _figure(size=(80, 120)).rotate(90, expand=True).convert("RGB")  # stored lying down
    exif = Image.Exif()
    exif[0x0112] = 8  # "rotate 90 clockwise to view"... as cameras write it
    im.save(tmp_path / f"turned{suffix}", exif=exif)
    x = P.load_image(tmp_path / f"turned{suffix}")
    rows, cols = np.nonzero(x > 40)
    assert rows.max() - rows.min() > cols.max() - cols.min()  # upright again: tall


@pytest.mark.parametrize("name,scale,dtype,suffix", [
    ("12 bits in a 16-bit PNG", 16, np.uint16, ".png"),
    ("16 bits", 257, np.uint16, ".png"),
    ("8 bits in a 32-bit TIFF", 1, np.int32, ".tiff"),
    ("10 bits in a 32-bit TIFF", 4, np.int32, ".tiff")])
def test_deep_integer_images_are_read_at_the_depth_they_use(tmp_path, name, scale, dtype,
                                                            suffix):
    figure = _figure()
    expected = P.load_image(_save(figure, tmp_path / "8bit.png"))
    deep = Image.fromarray(np.asarray(figure).astype(dtype) * scale)
    x = P.load_image(_save(deep, tmp_path / f"deep{suffix}"))
    assert np.abs(x.astype(int) - expected).max() <= 2, name


# The turn that stores an upright image under each EXIF orientation (its inverse undoes it).
_STORED_AS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
              6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_270}


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("suffix,options", [(".png", {}), (".tiff", {}),
                                            (".tiff", {"compression": "tiff_lzw"})])
def test_every_orientation_comes_out_upright(tmp_path, orientation, suffix, options):
    # An asymmetric figure, so any wrong turn or flip shows. The uncompressed TIFF case:
    # Pillow 13 memory-maps such files when opened by name and then reads 5-8 as garbage.
    if options and not features.check("libtiff"):
        pytest.skip("Pillow built without libtiff")
    upright = Image.new("L", (90, 60), 255)
    draw = ImageDraw.Draw(upright)
    draw.rectangle((10, 5, 80, 20), fill=0)
    draw.rectangle((10, 5, 25, 55), fill=0)
    expected = P.load_image(_save(upright, tmp_path / "upright.png"))
    stored = upright.transpose(_STORED_AS[orientation]) if orientation > 1 else upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"stored{suffix}"
    stored.save(path, exif=exif, **options)
    assert np.array_equal(P.load_image(path), expected)


@pytest.mark.parametrize("value", [0, 128, 255])
@pytest.mark.parametrize("mode", ["L", "RGBA", "1"])
def test_one_pixel_images_work(tmp_path, value, mode):
    colour = value if mode != "RGBA" else (value, value, value, 255)
    path = _save(Image.new(mode, (1, 1), colour), tmp_path / "one.png")
    x = P.load_image(path)
    assert x.shape == (28, 28) and x.dtype == np.uint8


def test_a_fully_transparent_image_is_blank(tmp_path):
    path = _save(Image.new("RGBA", (50, 50), (255, 0, 0, 0)), tmp_path / "clear.png")
    assert P.load_image(path).max() == 0


def _png_header(width, height):
    """A valid PNG signature and IHDR declaring width x height, with a tiny IDAT."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data +
                struct.pack(">I", zlib.crc32(kind + data)))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height,
                                                             8, 0, 0, 0, 0)) +
            chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("side, shown", [(50_000, "2,500 MP"), (20_000, "400 MP"),
                                         (10_000, "10,000x10,000 pixels")])
def test_decompression_bombs_are_refused_from_the_header(tmp_path, side, shown):
    (tmp_path / "bomb.png").write_bytes(_png_header(side, side))
    t0 = time.perf_counter()
    with pytest.raises(P.ImageError) as e:
        P.load_image(tmp_path / "bomb.png")
    assert time.perf_counter() - t0 < 2  # nothing was decoded
    assert str(e.value) == (f"{tmp_path / 'bomb.png'}: declares {shown}, more than the 67 MP "
                            "allowed; refused without decoding it")


def _truncated(tmp_path, fmt):
    im = Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200), np.uint8))
    path = tmp_path / f"cut.{fmt.lower()}"
    im.save(path, fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("setup, why", [
    (lambda t: t / "missing.png", "no such file"),
    (lambda t: t, "is a folder, expected an image file"),
    (lambda t: (t / "empty.png").write_bytes(b"") and None or t / "empty.png",
     "is empty (0 bytes)"),
    (lambda t: (t / "notes.png").write_text("just text\n") and None or t / "notes.png",
     "not a PNG, JPEG, GIF, BMP, TIFF or WebP image"),
    (lambda t: (t / "x.eps").write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 9 9\n")
     and None or t / "x.eps", "not a PNG, JPEG, GIF, BMP, TIFF or WebP image"),
    (lambda t: _truncated(t, "PNG"), "cannot decode the image: truncated or corrupt"),
    (lambda t: _truncated(t, "JPEG"), "cannot decode the image: truncated or corrupt"),
    (lambda t: _truncated(t, "GIF"), "cannot decode the image: truncated or corrupt"),
    (lambda t: os.mkfifo(t / "pipe.png") or t / "pipe.png",  # never opened: it would block
     "is not a regular file, expected an image file"),
])
def test_bad_files_give_one_line_naming_the_file(tmp_path, setup, why):
    path = setup(tmp_path)
    with pytest.raises(P.ImageError) as e:
        P.load_image(path)
    message = str(e.value)
    assert isinstance(e.value, DataError)
    assert message.startswith(f"{path}: {why}") and "\n" not in message
    assert e.value.path == str(path) and message == f"{path}: {e.value.reason}"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_to_input_matches_training_conversion():
    x = P.to_input(np.array([[[0, 255], [51, 102]]], np.uint8))
    assert x.shape == (1, 1, 2, 2) and x.dtype.is_floating_point
    assert x.flatten().tolist() == pytest.approx([0, 1, 0.2, 0.4])
    assert P.to_input(np.zeros((28, 28), np.uint8)).shape == (1, 1, 28, 28)


def test_predict_returns_top_classes_most_likely_first(tiny_run):
    model = load_run(tiny_run).model
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    result = P.predict(model, images, FASHION, top=3)
    assert len(result) == 5
    for row in result:
        assert len(row) == 3 and all(name in FASHION for name, _ in row)
        probs = [p for _, p in row]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    full = P.predict(model, images[:1], FASHION, top=50)[0]
    assert len(full) == 10 and sum(p for _, p in full) == pytest.approx(1, abs=1e-5)
    assert P.predict(model, images[:0], FASHION) == []
    with pytest.raises(DataError, match="predicts 10 classes but 3 class names"):
        P.predict(model, images, FASHION[:3])
    assert not model.training


def test_probabilities_are_the_same_in_batches(tiny_run, monkeypatch):
    model = load_run(tiny_run).model
    images = np.random.default_rng(1).integers(0, 256, (10, 28, 28), dtype=np.uint8)
    whole = P.probabilities(model, images)
    monkeypatch.setattr(P, "BATCH", 3)  # 3 + 3 + 3 + 1
    assert np.allclose(P.probabilities(model, images), whole, atol=1e-6)


@pytest.mark.slow
def test_an_8000_pixel_square_image_works(tmp_path):
    big = _figure(size=(8000, 8000))
    big.save(tmp_path / "big.png", compress_level=1)
    big.convert("RGB").save(tmp_path / "big.jpg", quality=85)
    for name in ("big.png", "big.jpg"):
        x = P.load_image(tmp_path / name)
        assert x[14, 14] > 150 and x[0, 0] == 0


@pytest.mark.slow
def test_real_test_images_as_files_get_the_models_predictions(tmp_path_factory, tmp_path):
    """Saved as PNG, or as a 4x larger dark-on-white JPEG, a test image is predicted as the
    model predicts its raw pixels."""
    from lenet.data import sources

    run = load_run(trained_real_run(tmp_path_factory))
    ds = sources.load("fashion-mnist")
    images = ds.test.images[:100]
    direct = P.probabilities(run.model, images).argmax(1)
    loaded_png, loaded_jpg = [], []
    for i, x in enumerate(images):
        Image.fromarray(x).save(tmp_path / f"{i}.png")
        Image.fromarray(255 - x).resize((112, 112), Image.Resampling.BICUBIC).save(
            tmp_path / f"{i}.jpg", quality=95)
        loaded_png.append(P.load_image(tmp_path / f"{i}.png"))
        loaded_jpg.append(P.load_image(tmp_path / f"{i}.jpg"))
    png = P.probabilities(run.model, np.stack(loaded_png)).argmax(1)
    jpg = P.probabilities(run.model, np.stack(loaded_jpg)).argmax(1)
    assert (png == direct).mean() >= 0.95
    assert (jpg == direct).mean() >= 0.85
