"""The service's untrusted input boundary, without a web server: a body arrives as chunks
and is counted as it comes, multipart parts are parsed in memory, and an image is checked
from its header before a pixel is decoded. Every refusal carries its HTTP status and a reason.

The bodies defined here are also sent through the app by test_serve.py, which checks that
the answers over HTTP are the same.
"""

from __future__ import annotations

import asyncio
import io
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
from PIL import Image
from serve_helpers import asyncio_of_python_310

import vistra.serve.uploads
from vistra.serve.settings import ServeSettings
from vistra.serve.uploads import Upload, UploadError, UploadTimedOut, decode_upload, read_uploads

LIMITS = ServeSettings(max_upload_mb=1, max_megapixels=4)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def noise_png(width: int, height: int) -> bytes:
    """A PNG that does not compress (random pixels): its size is about 3 * width * height."""
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return png(Image.fromarray(pixels))


def png_claiming(width: int, height: int) -> bytes:
    """A few hundred bytes whose header claims width x height pixels: a decompression bomb
    (decoding it would allocate width * height bytes at least)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b""))


BAD_UPLOADS = {
    # name: (body, expected status, words in the reason), under LIMITS
    "not an image": (b"%PDF-1.4 hello", 415, "not an image"),
    "truncated": (noise_png(64, 64)[:6000], 400, "truncated"),
    "corrupt": (noise_png(64, 64)[:100] + b"\0" * 5000, 400, "cannot be used"),
    "bomb over the service limit": (png_claiming(3000, 3000), 413, "too large"),
    "bomb over Pillow's limit": (png_claiming(100_000, 100_000), 413, "too large"),
    "extreme aspect ratio": (png(Image.new("L", (3000, 20))), 400, "aspect ratio 150:1"),
    "empty": (b"", 400, "empty"),
}


def multipart(*parts: tuple[str, str | None, bytes], boundary: str = "b0undary"
              ) -> tuple[bytes, str]:
    """A multipart/form-data body of (field, file name or None, data) parts, and its type."""
    body = b""
    for field, filename, data in parts:
        disposition = f'form-data; name="{field}"' + (f'; filename="{filename}"'
                                                      if filename else "")
        body += (f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
                 "Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class Sender:
    """A body sent in chunks of `size` bytes; `sent` counts the chunks the reader took.
    `pause_s` is the silence before each chunk after the first; `stall_after` chunks, the
    sender falls silent for good (a client that stops sending mid-body)."""

    def __init__(self, body: bytes, size: int = 64 * 1024, pause_s: float = 0.0,
                 stall_after: int | None = None) -> None:
        self.chunks = [body[i:i + size] for i in range(0, len(body), size)]
        self.sent = 0
        self.pause_s, self.stall_after = pause_s, stall_after

    async def __aiter__(self):
        for chunk in self.chunks:
            if self.sent == self.stall_after:
                await asyncio.Event().wait()  # nothing ever comes
            if self.sent and self.pause_s:
                await asyncio.sleep(self.pause_s)
            self.sent += 1
            yield chunk


def read(body: bytes | Sender, content_type: str = "application/octet-stream",
         content_length: str | None = None, limits: ServeSettings = LIMITS) -> list[Upload]:
    sender = body if isinstance(body, Sender) else Sender(body)
    return asyncio.run(read_uploads(sender, content_type, limits, content_length))


def refusal(body: bytes | Sender, content_type: str = "application/octet-stream",
            content_length: str | None = None, limits: ServeSettings = LIMITS) -> UploadError:
    with pytest.raises(UploadError) as refused:
        read(body, content_type, content_length, limits)
    return refused.value


# -- reading the body -------------------------------------------------------------------------

def test_a_raw_body_is_one_upload_and_decodes_to_rgb():
    image = Image.new("L", (40, 30), 128)
    [upload] = read(png(image), "image/png")
    assert upload == Upload("body", png(image))
    decoded = decode_upload(upload, LIMITS)
    assert decoded.mode == "RGB" and decoded.size == (40, 30)
    assert decoded.getpixel((0, 0)) == (128, 128, 128)


def test_multipart_keeps_the_file_parts_in_order_however_the_body_is_cut():
    first, second = png(Image.new("RGB", (8, 8), "red")), png(Image.new("RGB", (9, 9), "blue"))
    body, content_type = multipart(("file", "a.png", first), ("note", None, b"ignored"),
                                   ("files", "b.png", second), ("file", None, first))
    for size in (7, 64 * 1024):  # part headers and boundaries split across chunks, or not
        uploads = read(Sender(body, size), content_type)
        assert uploads == [Upload("a.png", first), Upload("b.png", second),
                           Upload("file", first)]
    assert decode_upload(uploads[1], LIMITS).getpixel((0, 0)) == (0, 0, 255)


def test_a_body_over_the_limit_is_refused_from_its_length_before_a_byte_is_read():
    sender = Sender(noise_png(700, 700))  # ~1.4 MB against a 1 MB limit
    error = refusal(sender, content_length=str(2 * 2**20))
    assert error.status == 413 and error.detail == "request body 2.0 MB; the limit is 1 MB"
    assert sender.sent == 0


@pytest.mark.parametrize("multipart_body", [False, True])
def test_a_body_over_the_limit_is_refused_as_soon_as_the_bytes_counted_pass_it(multipart_body):
    big = noise_png(700, 700)
    body, content_type = (multipart(("file", "big.png", big)) if multipart_body
                          else (big, "image/png"))
    sender = Sender(body)
    error = refusal(sender, content_type)  # no Content-Length: the reader must count
    assert error.status == 413 and error.detail.startswith("request body over ")
    assert error.detail.endswith("the limit is 1 MB")
    assert sender.sent == 2**20 // (64 * 1024) + 1 < len(sender.chunks)


@pytest.mark.parametrize("python", ["3.11+", "3.10"])
@pytest.mark.parametrize("multipart_body", [False, True])
def test_a_body_that_stops_arriving_is_refused_with_408_after_read_timeout_s(
        multipart_body, python, monkeypatch):
    if python == "3.10":
        monkeypatch.setattr(vistra.serve.uploads, "asyncio", asyncio_of_python_310())
    image = noise_png(64, 64)
    body, content_type = multipart(("file", "a.png", image)) if multipart_body else (image, "")
    sender = Sender(body, size=1024, stall_after=3)
    start = time.perf_counter()
    error = refusal(sender, content_type, limits=ServeSettings(read_timeout_s=0.2))
    waited = time.perf_counter() - start
    assert isinstance(error, UploadTimedOut) and error.status == 408
    assert error.detail.startswith("no part of the request body arrived for 0.2 s")
    assert sender.sent == 3 and 0.2 <= waited < 2


def test_the_read_time_out_is_for_each_pause_not_for_the_whole_body():
    image = noise_png(64, 64)
    sender = Sender(image, size=len(image) // 6 + 1, pause_s=0.1)  # ~0.5 s in all
    [upload] = read(sender, limits=ServeSettings(read_timeout_s=0.3))
    assert upload.data == image and sender.sent == 6


@pytest.mark.parametrize("body, content_type, words", [
    (b"--x\r\nbroken", "multipart/form-data", "without a boundary"),
    (b"garbage", "multipart/form-data; boundary=x", "malformed multipart body"),
    (*multipart(("image", "a.png", b"\x89PNG")), "no part named 'file'"),
    (b"", "image/png", "empty request body"),
])
def test_a_body_without_an_upload_in_it_is_refused_with_400(body, content_type, words):
    error = refusal(body, content_type)
    assert error.status == 400 and words in error.detail


# -- checking and decoding the image ----------------------------------------------------------

@pytest.mark.parametrize("name", BAD_UPLOADS)
def test_bad_images_are_refused_with_their_status_and_a_reason(name):
    body, status, words = BAD_UPLOADS[name]
    with pytest.raises(UploadError) as refused:
        decode_upload(Upload("x.png", body), LIMITS)
    assert refused.value.status == status and words in refused.value.detail
    assert refused.value.detail.startswith("x.png ")  # the file is named


def test_a_decompression_bomb_is_refused_from_its_header_under_any_service_limit():
    bomb = png_claiming(100_000, 100_000)  # 10 gigapixels in a few hundred bytes
    with pytest.raises(UploadError, match="too large.*--max-megapixels") as refused:
        decode_upload(Upload("bomb.png", bomb), ServeSettings(max_megapixels=1e6))
    assert refused.value.status == 413  # Pillow's own limit holds under a lax service limit


def test_the_boundary_loads_without_a_web_framework():
    code = ("import sys, vistra.serve.uploads, vistra.serve.service; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'fastapi', 'starlette'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"
