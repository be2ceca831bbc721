"""The HTTP service: `create_app(classifier, settings)` returns a FastAPI app that classifies
uploaded images, batches concurrent requests, reports health and Prometheus metrics, and
serves a small offline web page at `/`.

What a request may cost is bounded at every step: the body is counted while it arrives
(never buffered past `max_upload_mb`, never written to disk), the image size is checked from
its header before any pixel is decoded, decoding runs on a fixed pool of threads, at most
`queue_size` predictions are in the service at once (more get 503 and Retry-After), and each
one has `timeout_s` to finish (else 504).
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from vistra import __version__
from vistra.data.images import ImageLoadError, decode_rgb
from vistra.runtime import Classifier
from vistra.serve.batcher import Batcher
from vistra.serve.reference import render_reference
from vistra.serve.settings import ServeSettings

log = logging.getLogger("vistra.serve")

MAX_BATCH_FILES = 64  # files in one /v1/predict/batch request
EXPLAIN_MAX_SIDE = 1024  # heat maps are drawn on the upload shrunk to fit this many pixels
PAGE_FILES = {"index.html": "text/html; charset=utf-8",
              "app.js": "text/javascript; charset=utf-8",
              "style.css": "text/css; charset=utf-8"}


# Response shapes: they document the API at /docs and /openapi.json.

class ClassProbability(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    class_: str = Field(alias="class", description="class name")
    probability: float


class HeatMap(BaseModel):
    method: str
    target: int = Field(description="index of the class explained")
    label: str | None = Field(description="name of the class explained")
    probability: float = Field(description="the model's probability for that class")
    overlay_png: str = Field(description="the image with the heat map over it, PNG in base64")


class Prediction(BaseModel):
    model: str
    classes: list[ClassProbability] = Field(description="top-k, most probable first")
    ms: float = Field(description="time in the server, from arrival to answer")
    explanation: HeatMap | None = None


class BatchItem(BaseModel):
    file: str = Field(description="the part's file name")
    model: str | None = None
    classes: list[ClassProbability] | None = None
    ms: float | None = None
    status: int = Field(200, description="HTTP status this file alone would have got")
    detail: str | None = Field(None, description="why it failed, when status is not 200")


class ModelInfo(BaseModel):
    name: str
    backend: str
    classes: list[str]
    input_size: list[int] = Field(description="[channels, height, width] the model sees")
    checkpoint_hash: str | None = Field(description="SHA-256 of the model file")
    max_batch: int
    max_upload_mb: float
    explain_methods: list[str] = Field(description="methods for ?explain=, empty if none")
    explain_unavailable: str | None = Field(description="why heat maps are off, if they are")
    version: str


class Status(BaseModel):
    status: str


_IMAGE_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {"schema": {
            "type": "object", "required": ["file"],
            "properties": {"file": {"type": "string", "format": "binary"}}}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "image/*": {"schema": {"type": "string", "format": "binary"}},
    },
}
_FILES_BODY = {
    "required": True,
    "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file"],
        "properties": {"file": {"type": "array",
                                "items": {"type": "string", "format": "binary"}}}}}},
}
_ERRORS = {code: {"description": text, "content": {"application/json": {"example": {
    "detail": "a one-line reason"}}}} for code, text in [
    (400, "corrupt or truncated image, extreme aspect ratio, malformed request"),
    (413, "body over --max-upload-mb, or an image over the pixel limit"),
    (415, "the upload is not an image"),
    (503, "too many requests in the service (see Retry-After)"),
    (504, "not answered within --timeout-s")]}


@dataclass
class Upload:
    name: str
    data: bytes


class Metrics:
    """Prometheus metrics in a registry of the app's own (so one process can hold several)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("vistra_http_requests", "HTTP requests by path, method and "
                                "status code", ["path", "method", "code"], registry=r)
        self.latency = Histogram(
            "vistra_http_request_duration_seconds", "Time from request to response", ["path"],
            buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30), registry=r)
        self.batch_size = Histogram("vistra_batch_size", "Images per forward pass",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.inference = Histogram(
            "vistra_batch_inference_seconds", "Time of one forward pass",
            buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5), registry=r)
        self.queue_depth = Gauge("vistra_queue_depth", "Images waiting for the model thread",
                                 registry=r)
        self.in_flight = Gauge("vistra_predictions_in_flight", "Prediction requests being "
                               "received, decoded, queued or run", registry=r)

    def batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.inference.observe(seconds)


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class _CountRequests:
    """ASGI middleware: every response counted by path (known routes only, so scanners
    cannot grow the label set), method and status code, and timed."""

    def __init__(self, app: Callable, metrics: Metrics, paths: Callable[[], set[str]]) -> None:
        self.app, self.metrics, self.paths = app, metrics, paths

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def send_and_note(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            path = scope["path"] if scope["path"] in self.paths() else "other"
            method = scope["method"] if scope["method"] in _METHODS else "other"
            self.metrics.requests.labels(path, method, str(status)).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - start)


class _Service:
    """The state behind the routes: model thread, preprocessing pool, limits, metrics."""

    def __init__(self, classifier: Classifier, settings: ServeSettings) -> None:
        self.classifier, self.settings = classifier, settings
        self.metrics = Metrics()
        self.pool = ThreadPoolExecutor(settings.preprocess_threads,
                                       thread_name_prefix="vistra-preprocess")
        self.batcher = Batcher(classifier, settings.max_batch, settings.max_wait_ms / 1000,
                               on_batch=self.metrics.batch)
        self.metrics.queue_depth.set_function(self.batcher.depth)
        self.in_flight = 0  # changed on the event loop only
        self.ready = threading.Event()
        self.explain_methods, self.explain_unavailable = _explain_support(classifier, settings)
        self.input_size = list(classifier.transform(Image.new("RGB", (32, 32))).shape)
        self.checkpoint_hash: str | None = None
        self.num_classes = len(classifier.classes or [])
        self.batcher.call(self._warm_up)

    def _warm_up(self) -> None:
        """First passes allocate and pick kernels; do them before /readyz says yes."""
        try:
            for size in sorted({1, self.settings.max_batch}):
                logits = self.classifier(torch.zeros([size, *self.input_size]))
        except Exception:  # /readyz stays 503; the log says why
            log.exception("warm-up of %s failed", self.classifier.name)
            raise
        self.num_classes = int(logits.shape[-1])
        self.checkpoint_hash = self.classifier.checkpoint_hash
        self.ready.set()
        log.info("model %s ready", self.classifier.name)

    def model_info(self) -> dict:
        c = self.classifier
        classes = list(c.classes) if c.classes else [str(i) for i in range(self.num_classes)]
        return dict(name=c.name, backend=c.backend, classes=classes, input_size=self.input_size,
                    checkpoint_hash=self.checkpoint_hash, max_batch=self.settings.max_batch,
                    max_upload_mb=self.settings.max_upload_mb,
                    explain_methods=self.explain_methods,
                    explain_unavailable=self.explain_unavailable, version=__version__)

    def label(self, index: int) -> str:
        classes = self.classifier.classes
        return classes[index] if classes and index < len(classes) else str(index)

    # -- admission, reading, decoding ------------------------------------------------------

    @asynccontextmanager
    async def admitted(self) -> AsyncIterator[None]:
        """A place among the `queue_size` predictions in the service, or 503 at once."""
        if self.in_flight >= self.settings.queue_size:
            raise HTTPException(503, f"the service is full ({self.settings.queue_size} "
                                "requests in progress); retry shortly",
                                headers={"Retry-After": "1"})
        self.in_flight += 1
        self.metrics.in_flight.inc()
        try:
            yield
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.dec()

    async def receive(self, request: Request) -> list[Upload]:
        """The uploaded files: the parts named `file` (or `files`) of a multipart body, or
        the whole body as one image. Counted while read; over the limit -> 413."""
        limit = self.settings.max_upload_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise self._too_large(int(declared))
        kind, options = parse_options_header(request.headers.get("content-type", ""))
        if kind == b"multipart/form-data":
            if b"boundary" not in options:
                raise HTTPException(400, "multipart body without a boundary")
            collector = _MultipartFiles(options[b"boundary"])
            feed, finish = collector.write, collector.finish
        else:  # image/*, application/octet-stream, or whatever curl --data-binary sends
            raw = bytearray()
            feed, finish = raw.extend, lambda: [Upload("body", bytes(raw))] if raw else []
        received = 0
        try:
            async for chunk in request.stream():
                received += len(chunk)
                if received > limit:
                    raise self._too_large(received, more=True)
                feed(chunk)
            files = finish()
        except MultipartParseError as error:
            raise HTTPException(400, f"malformed multipart body: {error}") from error
        except ClientDisconnect as error:  # nobody to answer; keep it out of the error log
            raise HTTPException(400, "the client went away during the upload") from error
        if not files:
            raise HTTPException(400, "no part named 'file' in the multipart body"
                                if kind == b"multipart/form-data" else
                                "empty request body: send an image as multipart field 'file' "
                                "or as the body")
        return files

    def _too_large(self, size: int, more: bool = False) -> HTTPException:
        return HTTPException(413, f"request body {'over ' if more else ''}{size / 2**20:.1f} "
                             f"MB; the limit is {self.settings.max_upload_mb:g} MB")

    async def prepare(self, upload: Upload, keep_image: bool
                      ) -> tuple[torch.Tensor, Image.Image | None]:
        """Decode and transform on the preprocessing threads (never on the event loop)."""
        if not upload.data:
            raise HTTPException(400, f"{upload.name} is empty")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.pool, self._prepare, upload, keep_image)
        except ImageLoadError as error:
            raise _image_error(upload.name, error.reason) from error

    def _prepare(self, upload: Upload, keep_image: bool
                 ) -> tuple[torch.Tensor, Image.Image | None]:
        self._check_shape(upload)
        image = decode_rgb(upload.data, upload.name,
                           max_pixels=int(self.settings.max_megapixels * 1e6))
        return self.classifier.transform(image), image if keep_image else None

    def _check_shape(self, upload: Upload) -> None:
        """Refuse extreme aspect ratios from the header, before decoding anything."""
        try:
            with Image.open(io.BytesIO(upload.data)) as header:
                width, height = header.size
        except Exception:  # not an image at all: decode_rgb says which way
            return
        ratio = max(width, height) / max(1, min(width, height))
        if ratio > self.settings.max_aspect_ratio:
            raise ImageLoadError(upload.name, f"aspect ratio {ratio:.0f}:1 ({width}x{height}) "
                                 f"is beyond {self.settings.max_aspect_ratio:g}:1")

    # -- prediction ------------------------------------------------------------------------

    async def predict(self, upload: Upload, topk: int, start: float,
                      explain_method: str | None = None) -> dict:
        tensor, image = await self.prepare(upload, keep_image=explain_method is not None)
        try:
            logits = await asyncio.wrap_future(self.batcher.submit(tensor))
        except Exception as error:
            log.exception("model failed on %s", upload.name)
            raise HTTPException(500, f"the model failed: {error}") from error
        probabilities = torch.softmax(logits.float(), dim=-1)
        values, indices = probabilities.topk(min(topk, probabilities.numel()))
        result: dict[str, Any] = {
            "model": self.classifier.name,
            "classes": [{"class": self.label(i), "probability": p}
                        for p, i in zip(values.tolist(), indices.tolist(), strict=True)]}
        if explain_method is not None:
            # The map is drawn at the image's size: cap it, so a 40-megapixel upload does not
            # cost gigabytes of float maps and colour layers (the model sees its crop anyway).
            image.thumbnail((EXPLAIN_MAX_SIDE, EXPLAIN_MAX_SIDE))
            result["explanation"] = await self.explain(image, explain_method,
                                                       target=int(indices[0]))
        result["ms"] = round((time.perf_counter() - start) * 1000, 3)
        return result

    async def explain(self, image: Image.Image, method: str, target: int | None = None) -> dict:
        from vistra.explain import explain, overlay

        model = self.classifier.model
        # On the model thread: explanations hook into the model, which must not overlap a batch.
        job = self.batcher.call(lambda: explain(model, image, method=method, target=target))
        heat = await asyncio.wrap_future(job)
        # No caption: the page shows the class, and on a small image it would be unreadable.
        png = await asyncio.get_running_loop().run_in_executor(
            self.pool, _png_base64, lambda: overlay(image, heat, caption=False))
        return {"method": heat.method, "target": int(heat.target),
                "label": heat.label if heat.label is not None else self.label(int(heat.target)),
                "probability": float(heat.probability), "overlay_png": png}

    def check_explain(self, method: str | None) -> None:
        if method is None:
            return
        if self.explain_unavailable:
            raise HTTPException(400, f"explain is unavailable: {self.explain_unavailable}")
        if method not in self.explain_methods:
            raise HTTPException(400, f"unknown explain method {method!r}; this model offers "
                                f"{', '.join(self.explain_methods)}")

    async def within_time(self, work: Any) -> Any:
        """The request's answer, or 504 when it takes longer than `timeout_s`."""
        try:
            return await asyncio.wait_for(work, self.settings.timeout_s)
        except TimeoutError as error:
            raise HTTPException(504, f"no answer within {self.settings.timeout_s:g} s; "
                                "the service is overloaded or the model is slow") from error

    def close(self) -> None:
        self.batcher.stop()
        self.pool.shutdown(wait=False, cancel_futures=True)


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
        if options.get(b"name") in (b"file", b"files"):
            name = options.get(b"filename", b"").decode("utf-8", "replace") or "file"
            self.files.append(Upload(name, bytes(self._data)))
        self._data = bytearray()


def _image_error(name: str, reason: str) -> HTTPException:
    if reason == "not an image":
        return HTTPException(415, f"{name} is not an image (JPEG, PNG, WebP, BMP, TIFF, GIF)")
    if reason.startswith("too large"):
        return HTTPException(413, f"{name} is {reason}: the limit is the service's "
                             "--max-megapixels")
    return HTTPException(400, f"{name} cannot be used: {reason}")


def _png_base64(draw: Callable[[], Image.Image]) -> str:
    buffer = io.BytesIO()
    draw().save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _explain_support(classifier: Classifier, settings: ServeSettings
                     ) -> tuple[list[str], str | None]:
    """The explain methods on offer, or why there are none."""
    if not settings.explain:
        return [], "the service was started without --explain"
    if classifier.model is None:
        return [], (f"the {classifier.backend} backend has no PyTorch module to explain; "
                    "serve the .safetensors checkpoint instead")
    try:
        from vistra.explain import default_method, methods_for
    except ImportError as error:
        return [], f"vistra.explain cannot be imported ({error})"
    # The family's default first: the page offers the first one.
    methods = sorted(methods_for(classifier.model),
                     key=lambda m: m != default_method(classifier.model))
    return methods, None if methods else f"no explain method supports {classifier.name}"


def _page_files() -> dict[str, bytes]:
    folder = resources.files("vistra") / "assets" / "serve"
    return {name: (folder / name).read_bytes() for name in PAGE_FILES}


def create_app(classifier: Classifier, settings: ServeSettings | None = None) -> FastAPI:
    """The service for one classifier. The model thread starts here and warms the model up;
    /readyz answers 200 once that is done. Stop it with the app's shutdown (lifespan)."""
    settings = settings or ServeSettings()
    service = _Service(classifier, settings)
    page = _page_files()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        service.close()

    app = FastAPI(title=f"vistra serve: {classifier.name}", version=__version__,
                  lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Image classification with a vistra model. Send an image, get "
                  "the top classes with probabilities. Limits: body "
                  f"{settings.max_upload_mb:g} MB, {settings.max_megapixels:g} megapixels, "
                  f"aspect ratio {settings.max_aspect_ratio:g}:1, {settings.timeout_s:g} s.")
    app.state.service = service
    topk_query = Query(5, ge=1, description="how many classes to return")

    @app.post("/v1/predict", response_model=Prediction, response_model_exclude_none=True,
              openapi_extra={"requestBody": _IMAGE_BODY}, responses=_ERRORS,
              summary="Classify one image")
    async def predict(request: Request, topk: int = topk_query,
                      explain: str | None = Query(None, description="heat map method, "
                                                  "see GET /v1/model")) -> dict:
        start = time.perf_counter()
        service.check_explain(explain)
        async with service.admitted():
            async def work() -> dict:
                files = await service.receive(request)
                if len(files) > 1:
                    raise HTTPException(400, f"{len(files)} files sent; /v1/predict takes one, "
                                        "/v1/predict/batch several")
                return await service.predict(files[0], topk, start, explain)
            return await service.within_time(work())

    @app.post("/v1/predict/batch", response_model=list[BatchItem], response_model_exclude_none=True,
              openapi_extra={"requestBody": _FILES_BODY}, responses=_ERRORS,
              summary="Classify several images (multipart fields named 'file')")
    async def predict_batch(request: Request, topk: int = topk_query) -> list[dict]:
        start = time.perf_counter()
        async with service.admitted():
            async def work() -> list[dict]:
                files = await service.receive(request)
                if len(files) > MAX_BATCH_FILES:
                    raise HTTPException(413, f"{len(files)} files sent; the limit is "
                                        f"{MAX_BATCH_FILES} a request")
                return list(await asyncio.gather(*(one(f) for f in files)))

            async def one(upload: Upload) -> dict:
                try:
                    return {"file": upload.name, **await service.predict(upload, topk, start)}
                except HTTPException as error:
                    return {"file": upload.name, "status": error.status_code,
                            "detail": error.detail}
            return await service.within_time(work())

    @app.get("/v1/model", response_model=ModelInfo, summary="The model and what it offers")
    async def model() -> dict:
        return service.model_info()

    @app.get("/healthz", response_model=Status, summary="Alive (the process answers)")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", response_model=Status, summary="Ready (model loaded and warmed up)",
             responses={503: {"description": "still warming up"}})
    async def readyz() -> Response:
        if service.ready.is_set():
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "warming up"}, status_code=503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry),
                        media_type=CONTENT_TYPE_LATEST)

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(render_reference(app.openapi()))

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page["index.html"])

    def page_file(name: str) -> Callable[[], Any]:
        async def serve_file() -> Response:
            return Response(page[name], media_type=PAGE_FILES[name])
        return serve_file

    for name in ("app.js", "style.css"):
        app.add_api_route(f"/{name}", page_file(name), methods=["GET"], include_in_schema=False)

    paths = {route.path for route in app.routes}
    app.add_middleware(_CountRequests, metrics=service.metrics, paths=lambda: paths)
    return app
