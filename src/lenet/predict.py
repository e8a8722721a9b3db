"""User image files -> the network's input -> class probabilities.

`load_image` turns a photo or drawing of any size and mode into what Fashion-MNIST looks
like, following the data set's own recipe: trim to the object, scale the longest edge to 28
keeping the aspect ratio, centre it, light object on a black background.
"""
from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from lenet.errors import DataError

FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")  # never EPS & co: they run helpers
# A folder given for prediction contributes its files with these suffixes (any case).
SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp")
BATCH = 1024  # images per forward pass: a large folder's activations at once would not fit
# 8,192 x 8,192 pixels: an 8,000 x 8,000 scan passes, a 20,000 x 20,000 one is refused.
# Checked on the header before decoding. Peak memory is then the decode (4 bytes a pixel at
# worst, ~270 MB) plus, for transparent images, Pillow's premultiplied copy: ~0.55 GB at most.
# A JPEG is decoded at 1/8 scale (draft), a few MB.
MAX_PIXELS = 8192 * 8192
WORK_SIZE = 512  # large images are box-reduced to about this before any float work
# The depths integer pixels come in: the smallest one that holds an image's largest value.
_SENSOR_BITS = (8, 10, 12, 14, 16)
TRIM = 0.1  # Fashion-MNIST trims pixels within 5% of the background; 10% also skips JPEG noise
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
              6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}  # EXIF orientation -> the turn that undoes it


class ImageError(DataError):
    """An image file that is missing, unreadable, too large or not an image."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


class ImageTooLarge(ImageError):
    """An image whose header declares more than MAX_PIXELS pixels (refused undecoded)."""


def image_files(folder: str | Path) -> list[Path]:
    """The image files directly in `folder` (by suffix, hidden ones skipped), sorted by name.
    Raises ImageError when it holds none or cannot be listed."""
    folder = Path(folder)
    try:
        # A link to a missing file is kept, to be reported like any missing file.
        found = sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES
                       and not p.name.startswith(".") and (p.is_file() or p.is_symlink()
                                                          and not p.exists()))
    except OSError as exc:
        raise ImageError(folder, f"cannot list the folder ({exc.strerror or exc})") from None
    if not found:
        raise ImageError(folder, f"holds no image files, expected {', '.join(SUFFIXES)}")
    return found


def image_paths(args) -> list[tuple[str, ImageError | None]]:
    """Each path given, with None; a folder is replaced by its image files (`image_files`),
    or, holding none or unreadable, stays with its ImageError to report in its place."""
    out: list[tuple[str, ImageError | None]] = []
    for f in args:
        if not Path(f).is_dir():
            out.append((str(f), None))
            continue
        try:
            out += [(str(p), None) for p in image_files(f)]
        except ImageError as e:
            out.append((str(f), e))
    return out


def load_image(path: str | Path, size: int = 28) -> np.ndarray:
    """The image at `path` as the network's input pixels: uint8 (size, size), light object
    on black. Grayscale; the border's median is the background, and the image is inverted
    when the object is darker than it (the usual dark-on-light photo or drawing); the
    background is mapped to black; trimmed to the object (pixels more than TRIM above the
    background); longest edge scaled to `size`; centred. A transparent background becomes
    background. Raises ImageError naming the file."""
    gray, alpha = _read(Path(path))
    return _fashion_mnist_style(gray, alpha, size)


def decode_image(data: bytes, name: str = "upload", size: int = 28,
                 formats: tuple[str, ...] = FORMATS, max_pixels: int = MAX_PIXELS
                 ) -> np.ndarray:
    """`load_image` for an image held in memory (e.g. an HTTP request body); `name` is
    what errors call it. Only `formats` are tried; an image declaring more than
    `max_pixels` is refused (ImageTooLarge) before decoding."""
    if not data:
        raise ImageError(name, "is empty (0 bytes), expected an image file")
    gray, alpha = _open(io.BytesIO(data), name, formats, max_pixels)
    return _fashion_mnist_style(gray, alpha, size)


def _read(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode `path` fully (a truncated file is an error) into float32 gray in [0, 1] and
    alpha (or None), reduced to about WORK_SIZE pixels on the longest edge."""
    if not path.exists():
        raise ImageError(path, "no such file")
    if path.is_dir():
        raise ImageError(path, "is a folder, expected an image file")
    try:
        if not path.is_file():  # a pipe or a device: reading it could block, or is one-shot
            raise ImageError(path, "is not a regular file, expected an image file")
        if path.stat().st_size == 0:
            raise ImageError(path, "is empty (0 bytes), expected an image file")
        # Read through a file object, never by name: given a name Pillow memory-maps an
        # uncompressed TIFF, and Pillow 13 then maps one turned by its orientation tag
        # (5-8) at the turned size and reads garbage.
        with open(path, "rb") as f:
            return _open(f, path, FORMATS, MAX_PIXELS)
    except PermissionError:
        raise ImageError(path, "permission denied") from None


def _open(source, name: str | Path, formats: tuple[str, ...], max_pixels: int
          ) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        with warnings.catch_warnings():
            # Pillow warns above ~89 MP and refuses above ~179 MP; our own, lower limit is
            # checked below, so its warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source, formats=formats) as im:
                return _decode(name, im, max_pixels)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        found = re.search(r"\((\d+) pixels\)", str(e))
        declared = f"{int(found[1]) / 1e6:,.0f} MP" if found else "far too many pixels"
        raise ImageTooLarge(name, _too_large(declared, max_pixels)) from None
    except UnidentifiedImageError:
        kinds = [{"WEBP": "WebP"}.get(f, f) for f in formats]
        raise ImageError(name, f"not a {', '.join(kinds[:-1])} or {kinds[-1]} image") from None
    except PermissionError:
        raise ImageError(name, "permission denied") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        # Pillow reports truncated or corrupt data with any of these.
        raise ImageError(name, f"cannot decode the image: truncated or corrupt "
                         f"({' '.join(str(e).split()) or type(e).__name__})") from None


def _too_large(declared: str, max_pixels: int) -> str:
    return (f"declares {declared}, more than the {max_pixels / 1e6:.0f} MP allowed; "
            "refused without decoding it")


def _decode(path: str | Path, im: Image.Image, max_pixels: int
            ) -> tuple[np.ndarray, np.ndarray | None]:
    w, h = im.size
    if w * h > max_pixels:
        raise ImageTooLarge(path, _too_large(f"{w:,}x{h:,} pixels", max_pixels))
    if w < 1 or h < 1:
        raise ImageError(path, f"has no pixels ({w}x{h})")
    if im.format == "JPEG":
        im.draft("L", (WORK_SIZE, WORK_SIZE))  # DCT-domain downscale: decodes 1/8 the pixels
    im.load()  # the full decode; raises on truncated data (ImageFile.LOAD_TRUNCATED_IMAGES
    # is left False on purpose: a padded half-image would be classified as if whole)
    # Read after loading: Pillow's TIFF reader turns the image upright as it loads and then
    # drops the tag; read before, it would be turned twice.
    orientation = im.getexif().get(0x0112)
    im = _canonical_mode(im)
    factor = max(im.size) // WORK_SIZE
    if factor > 1:
        im = im.reduce(factor)  # box average: bounded memory, antialiased
    if orientation in _TRANSPOSE:
        im = im.transpose(_TRANSPOSE[orientation])
    return _to_float(im)


def _canonical_mode(im: Image.Image) -> Image.Image:
    """One of L, LA, RGB, RGBA, I, F: the modes `reduce` and `_to_float` handle."""
    mode = im.mode
    transparent = "transparency" in im.info
    if mode in ("P", "PA"):
        return im.convert("RGBA" if transparent or mode == "PA" else "RGB")
    if mode in ("L", "RGB") and transparent:
        return im.convert("RGBA")
    if mode == "1":
        return im.convert("L")
    if mode == "La":
        return im.convert("LA")
    if mode == "RGBa":
        return im.convert("RGBA")
    if mode.startswith("I;16"):
        return im.convert("I")
    if mode in ("L", "LA", "RGB", "RGBA", "I", "F"):
        return im
    return im.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX


def _to_float(im: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    a = np.asarray(im)
    alpha = None
    if im.mode in ("LA", "RGBA"):
        alpha = a[..., -1].astype(np.float32) / 255
        a = a[..., :-1]
    if im.mode in ("RGB", "RGBA"):
        # ITU-R 601 luma, as Pillow's own convert("L") weighs the channels.
        gray = a.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32) / 255
    elif im.mode in ("L", "LA"):
        gray = a.reshape(a.shape[:2]).astype(np.float32) / 255
    else:  # I (16- and 32-bit PNG/TIFF land here) or F
        gray = a.astype(np.float32)
        lo, hi = float(gray.min()), float(gray.max())
        depth = next((b for b in _SENSOR_BITS if hi < 2 ** b), None)
        if im.mode == "I" and lo >= 0 and depth:
            # The file says 16 or 32 bits, not how many the camera or scanner used: 12-bit
            # data in a 16-bit PNG divided by 65535 would be a black image.
            gray /= 2 ** depth - 1
        elif not (lo >= 0 and hi <= 1):
            gray = (gray - lo) / (hi - lo) if hi > lo else np.zeros_like(gray)
    return gray, alpha


def _fashion_mnist_style(gray: np.ndarray, alpha: np.ndarray | None, size: int) -> np.ndarray:
    if alpha is not None and alpha.min() < 1:
        # Fill transparent areas with the colour opposite the object's, so the object
        # stands out whichever way round it is drawn and the border rule below sees a
        # background.
        opaque = alpha > 0.5
        dark_object = opaque.any() and float(np.median(gray[opaque])) < 0.5
        gray = alpha * gray + (1 - alpha) * (1.0 if dark_object else 0.0)
    # The border shows the background; the object is what differs from it. An object
    # darker than its background (ink on paper, a photo on a white table) is inverted:
    # Fashion-MNIST's are light on black. Then the background is mapped to black.
    background = float(np.median(np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])))
    differs = np.abs(gray - background) > TRIM
    if differs.any() and float(gray[differs].mean()) < background:
        gray, background = 1 - gray, 1 - background
    gray = np.clip((gray - background) / max(1 - background, 1e-6), 0, 1)
    canvas = np.zeros((size, size), np.uint8)
    rows, cols = np.nonzero(gray > TRIM)
    if rows.size == 0:
        return canvas  # nothing stands out from the background
    crop = gray[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    h, w = crop.shape
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    small = Image.fromarray(crop.astype(np.float32), "F").resize(
        (nw, nh), Image.Resampling.LANCZOS)
    pixels = np.clip(np.asarray(small) * 255 + 0.5, 0, 255).astype(np.uint8)
    # An odd margin puts its extra pixel above and to the left, as Fashion-MNIST's do.
    top, left = (size - nh + 1) // 2, (size - nw + 1) // 2
    canvas[top:top + nh, left:left + nw] = pixels
    return canvas


def fit_size(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 images (N, H, W) at a network's input size: resized as `--resize` resizes the
    training batches (bilinear, antialiased), rounded back to bytes; as they are when they
    already fit. For a run trained with --resize, shown the data set's own images."""
    if images.shape[-2:] == (size, size):
        return images
    from torch.nn import functional as F

    x = torch.from_numpy(np.array(images, np.float32))[:, None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                      align_corners=False)
    return x[:, 0].round_().clamp_(0, 255).to(torch.uint8).numpy()


def to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) or (H, W) -> float32 (N, 1, H, W) in [0, 1], as training sees them."""
    if not images.flags.writeable:  # e.g. an HTTP body's bytes: torch warns on those
        images = images.copy()
    x = torch.as_tensor(np.ascontiguousarray(images))
    if x.ndim == 2:
        x = x.unsqueeze(0)
    return x.unsqueeze(1).to(torch.float32).div_(255)


def probabilities(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    """Softmax class probabilities, float32 (N, classes), for uint8 images (N, H, W)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            return np.concatenate([
                torch.softmax(model(to_input(images[i:i + BATCH]).to(device)).float(), dim=1)
                .cpu().numpy() for i in range(0, len(images), BATCH)])
    finally:
        model.train(was_training)


def predict(model: torch.nn.Module, images: np.ndarray, classes: tuple[str, ...] | list[str],
            top: int = 3) -> list[list[tuple[str, float]]]:
    """For each uint8 image (N, H, W): its `top` classes as (name, probability), most
    likely first."""
    if len(images) == 0:
        return []
    probs = probabilities(model, images)
    if probs.shape[1] != len(classes):
        raise DataError(f"the model predicts {probs.shape[1]} classes but {len(classes)} "
                        "class names were given")
    k = max(1, min(top, len(classes)))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[(classes[j], float(p[j])) for j in row] for p, row in zip(probs, order, strict=True)]
