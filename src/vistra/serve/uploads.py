"""The untrusted input boundary: an HTTP body in, checked images out.

The body is counted while it arrives (never buffered past `max_upload_mb`, never written to
disk), and an image's size and shape are checked from its header before any pixel is
decoded. Nothing here knows the web framework: `read_uploads` takes the body as an async
iterable of byte chunks with its Content-Type (and Content-Length, when declared), and
everything refused raises `UploadError`, which carries the HTTP status to answer and a
one-line reason. A body that stops arriving for `read_timeout_s` raises `UploadTimedOut`
(408), so a slow or stalled client frees its place.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass

from PIL import Image
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from vistra.data.images import ImageLoadError, decode_rgb
from vistra.serve.settings import ServeSettings

FILE_FIELDS = (b"file", b"files")  # multipart fields that hold images; others are ignored


@dataclass
class Upload:
    name: str  # the part's file name, or "body" for an image sent as the whole body
    data: bytes


class UploadError(Exception):
    """An upload refused: `status` is the HTTP status to answer, `detail` says why."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


class UploadTimedOut(UploadError):
    """No byte of the body arrived for `read_timeout_s` (408): the client is too slow or gone."""

    def __init__(self, seconds: float) -> None:
        super().__init__(408, f"no part of the request body arrived for {seconds:g} s; "
                         "send the whole body without pausing")


async def read_uploads(chunks: AsyncIterable[bytes], content_type: str,
                       settings: ServeSettings, content_length: str | None = None
                       ) -> list[Upload]:
    """The uploaded files: the parts named `file` (or `files`) of a multipart body, or the
    whole body as one image. Past `settings.max_upload_mb` -> 413: from the declared
    Content-Length before a byte is read, else as soon as the bytes counted pass it. No
    chunk for `settings.read_timeout_s` -> 408 (`UploadTimedOut`)."""
    limit = settings.max_upload_bytes
    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        raise _too_large(int(content_length), settings)
    kind, options = parse_options_header(content_type)
    if kind == b"multipart/form-data":
        if b"boundary" not in options:
            raise UploadError(400, "multipart body without a boundary")
        collector = _MultipartFiles(options[b"boundary"])
        feed, finish = collector.write, collector.finish
    else:  # image/*, application/octet-stream, or whatever curl --data-binary sends
        raw = bytearray()
        feed, finish = raw.extend, lambda: [Upload("body", bytes(raw))] if raw else []
    received = 0
    try:
        async for chunk in _within_silence(chunks, settings.read_timeout_s):
            received += len(chunk)
            if received > limit:
                raise _too_large(received, settings, more=True)
            feed(chunk)
        files = finish()
    except MultipartParseError as error:
        raise UploadError(400, f"malformed multipart body: {error}") from error
    if not files:
        raise UploadError(400, "no part named 'file' in the multipart body"
                          if kind == b"multipart/form-data" else
                          "empty request body: send an image as multipart field 'file' "
                          "or as the body")
    return files


async def _within_silence(chunks: AsyncIterable[bytes], seconds: float
                          ) -> AsyncIterator[bytes]:
    """The chunks as they come, or `UploadTimedOut` once none has come for `seconds`: a time
    per chunk, not for the body, so a large upload on a slow but steady line still passes."""
    stream = aiter(chunks)
    while True:
        try:
            chunk = await asyncio.wait_for(anext(stream), seconds)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError as error:  # Python 3.10's is not the builtin TimeoutError
            raise UploadTimedOut(seconds) from error
        yield chunk


def decode_upload(upload: Upload, settings: ServeSettings) -> Image.Image:
    """The upload as an 8-bit RGB image, decoded like `vistra predict` does. Its header is
    checked first (aspect ratio, `max_megapixels`), so a decompression bomb costs nothing.
    Blocking: run it off the event loop."""
    if not upload.data:
        raise UploadError(400, f"{upload.name} is empty")
    _check_shape(upload, settings.max_aspect_ratio)
    try:
        return decode_rgb(upload.data, upload.name,
                          max_pixels=int(settings.max_megapixels * 1e6))
    except ImageLoadError as error:
        raise _image_error(upload.name, error.reason) from error


def _check_shape(upload: Upload, max_aspect_ratio: float) -> None:
    """Refuse extreme aspect ratios from the header, before decoding anything."""
    try:
        with Image.open(io.BytesIO(upload.data)) as header:
            width, height = header.size
    except Exception:  # not an image at all: decode_rgb says which way
        return
    ratio = max(width, height) / max(1, min(width, height))
    if ratio > max_aspect_ratio:
        raise UploadError(400, f"{upload.name} cannot be used: aspect ratio {ratio:.0f}:1 "
                          f"({width}x{height}) is beyond {max_aspect_ratio:g}:1")


def _image_error(name: str, reason: str) -> UploadError:
    if reason == "not an image":
        return UploadError(415, f"{name} is not an image (JPEG, PNG, WebP, BMP, TIFF, GIF)")
    if reason.startswith("too large"):
        return UploadError(413, f"{name} is {reason}: the limit is the service's "
                           "--max-megapixels")
    return UploadError(400, f"{name} cannot be used: {reason}")


def _too_large(size: int, settings: ServeSettings, more: bool = False) -> UploadError:
    return UploadError(413, f"request body {'over ' if more else ''}{size / 2**20:.1f} MB; "
                       f"the limit is {settings.max_upload_mb:g} MB")


class _MultipartFiles:
    """A streaming multipart/form-data parser that keeps the `file`/`files` parts in memory
    (python-multipart's form parser would spool large parts to temporary files)."""

    def __init__(self, boundary: bytes) -> None:
        self.files: list[Upload] = []
        self._field, self._value = bytearray(), bytearray()
        self._disposition: bytes = b""
        self._data = bytearray()
        self.parser = MultipartParser(boundary, {
            "on_part_begin": self._begin,
            "on_header_field": lambda d, s, e: self._field.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._value.extend(d[s:e]),
            "on_header_end": self._header_end,
            "on_part_data": lambda d, s, e: self._data.extend(d[s:e]),
            "on_part_end": self._end,
        })

    def write(self, chunk: bytes) -> None:
        self.parser.write(chunk)

    def finish(self) -> list[Upload]:
        self.parser.finalize()
        return self.files

    def _begin(self) -> None:
        self._disposition, self._data = b"", bytearray()

    def _header_end(self) -> None:
        if bytes(self._field).lower() == b"content-disposition":
            self._disposition = bytes(self._value)
        self._field.clear()
        self._value.clear()

    def _end(self) -> None:
        _, options = parse_options_header(self._disposition)
        if options.get(b"name") in FILE_FIELDS:
            name = options.get(b"filename", b"").decode("utf-8", "replace") or "file"
            self.files.append(Upload(name, bytes(self._data)))
        self._data = bytearray()
