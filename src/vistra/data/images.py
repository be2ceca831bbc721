"""Open any common image file as an RGB PIL image, and vet files before training sees them.

Real image folders hold grayscale scans, palette GIFs, RGBA screenshots, CMYK JPEGs from
print workflows, 16-bit PNGs, rotated phone photos and the odd broken download. Every one of
them must reach the model as the 8-bit RGB picture a person would see, and a broken file must
be reported by name when the folder is scanned, not crash an epoch half-way through.
"""

from __future__ import annotations

import io
import math
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})

# Pillow's own hard limit (twice its warning threshold): larger files are far more likely to
# be decompression bombs than photos, and decoding one could exhaust memory.
MAX_PIXELS = 178_956_970
# Decoding and converting to RGB holds up to ~16 bytes per pixel at its peak (16-bit data:
# the decoded plane, its numpy copy, 32-bit working values, the RGB result), and the folder
# scan decodes in many threads: one process decodes at most this many such bytes at once
# (a single larger image still decodes, alone).
DECODE_MEMORY = 2 << 30
_PEAK_BYTES_PER_PIXEL = 16

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_WHITE = (255, 255, 255)


class ImageLoadError(OSError):
    """A file that cannot be used as an image; `reason` is short enough for a report line."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(f"cannot load image {path}: {reason}")
        self.path = Path(path)
        self.reason = reason


def is_image_file(path: str | os.PathLike) -> bool:
    """True when the file name has one of IMAGE_EXTENSIONS (any letter case)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def load_rgb(path: str | os.PathLike, min_side: int | None = None) -> Image.Image:
    """Decode `path` into an 8-bit RGB image as displayed (EXIF orientation applied).

    With `min_side`, a JPEG whose shorter side is at least twice that is decoded at a reduced
    DCT scale (Pillow's draft mode: 1/2, 1/4 or 1/8) that keeps the shorter side >= min_side:
    several times faster for photos far larger than a model's input, which is then resized
    down from it. Raises ImageLoadError (naming the file) for anything that is not a complete
    image.
    """
    return _decode(Path(path), quick=False, min_side=min_side)


def decode_rgb(data: bytes, name: str = "upload", max_pixels: int | None = None) -> Image.Image:
    """`load_rgb` for an image held in memory (an HTTP upload): nothing touches the disk.

    `name` stands for the file in errors; images over `max_pixels` (default MAX_PIXELS) are
    refused before any pixel is decoded, so a small file that expands to gigabytes costs
    nothing.
    """
    return _decode(Path(name), quick=False, data=data, max_pixels=max_pixels)


def check_image(path: str | os.PathLike) -> str | None:
    """Return None if `path` decodes completely, else a short reason such as "truncated".

    Every pixel is decoded, because truncated files open fine and only fail on load. JPEGs
    are decoded at 1/8 scale, which still reads the whole entropy-coded stream (so damage is
    caught) but skips most of the inverse DCT work.
    """
    try:
        _decode(Path(path), quick=True)
    except ImageLoadError as error:
        return error.reason
    return None


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB the way a viewer shows it.

    Transparent areas become white (the usual page background), and wide-range modes are
    scaled into 0-255 instead of being clipped, which would turn most 16-bit images white.
    """
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        gray = _scale_to_uint8(np.asarray(image), image.mode)
        return Image.fromarray(gray).convert("RGB")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, _WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def _scale_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Map a single-channel wide-range array to uint8, guessing the range from the mode.

    In place where it can: a 179-megapixel 16-bit scan must not need 8 bytes per pixel.
    """
    low, high = float(values.min()), float(values.max())
    if mode.startswith("I;16") or (mode == "I" and low >= 0 and high <= 65535):
        # 16-bit data: round(value / 257), 65535 -> 255; exact in integers (no value of
        # 0..65535 is half-way between two multiples of 257).
        scaled = values.astype(np.int32)
        scaled += 128
        scaled //= 257
        return scaled.astype(np.uint8)
    scaled = values.astype(np.float64)
    if mode == "F" and low >= 0 and high <= 1:
        scaled *= 255.0
    elif not (mode == "F" and low >= 0 and high <= 255):  # an unknown range: stretch it
        scaled -= low
        scaled *= 255.0 / max(high - low, 1e-12)
    np.rint(scaled, out=scaled)
    np.clip(scaled, 0, 255, out=scaled)
    return scaled.astype(np.uint8)


class _MemoryBudget:
    """Bytes that threads reserve before decoding and give back after: a reservation waits
    until it fits, except the first, so an image larger than the whole budget runs alone."""

    def __init__(self) -> None:
        self._in_use = 0
        self._changed = threading.Condition()

    @contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        with self._changed:
            self._changed.wait_for(lambda: self._in_use == 0
                                   or self._in_use + nbytes <= DECODE_MEMORY)
            self._in_use += nbytes
        try:
            yield
        finally:
            with self._changed:
                self._in_use -= nbytes
                self._changed.notify_all()


_DECODING = _MemoryBudget()


def _decode(path: Path, quick: bool, data: bytes | None = None,
            max_pixels: int | None = None, min_side: int | None = None) -> Image.Image:
    max_pixels = MAX_PIXELS if max_pixels is None else max_pixels
    try:
        with Image.open(path if data is None else io.BytesIO(data)) as image:  # header only
            width, height = image.size
            if width * height > max_pixels:
                raise ImageLoadError(path, _too_large(f"{width}x{height} pixels"))
            if quick and image.format == "JPEG":
                image.draft(None, (1, 1))
            elif min_side and image.format == "JPEG" and min(width, height) >= 2 * min_side:
                scale = min_side / min(width, height)  # draft keeps both sides >= these
                image.draft(None, (math.ceil(width * scale), math.ceil(height * scale)))
            need = image.width * image.height * _PEAK_BYTES_PER_PIXEL
            # Small images skip the lock (a few microseconds that would show on 28x28 ones);
            # what they hold uncounted, at most 1/256 of the budget per thread, stays small.
            with _DECODING.reserve(need) if need * 256 > DECODE_MEMORY else nullcontext():
                image.load()
                return to_rgb(ImageOps.exif_transpose(image))
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageLoadError(path, _too_large("its header's size")) from error
    except UnidentifiedImageError as error:
        raise ImageLoadError(path, "not an image") from error
    except MemoryError as error:
        raise ImageLoadError(path, "out of memory while decoding it") from error
    except OSError as error:
        if error.errno is not None:  # the file system, not the image data
            raise ImageLoadError(path, f"unreadable: {error.strerror}") from error
        reason = "truncated" if "truncated" in str(error).lower() else _corrupt(error)
        raise ImageLoadError(path, reason) from error
    except Exception as error:  # Pillow's plugins raise many types on malformed data
        raise ImageLoadError(path, _corrupt(error)) from error


def _too_large(size: str) -> str:
    return f"too large: {size}, over the {MAX_PIXELS:,}-pixel limit against decompression bombs"


def _corrupt(error: Exception) -> str:
    detail = str(error) or type(error).__name__
    return f"corrupt: {detail[:80]}"
