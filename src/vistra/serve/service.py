"""The service behind the routes: one classifier on its model thread, a pool of preprocessing
threads, admission (per service and per client address) and time limits, explanations,
readiness and metrics.

It knows nothing of the web framework: what it refuses raises `ServiceError` (an HTTP status,
a one-line reason, headers), and `vistra.serve.app` turns that into a response.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import torch
from PIL import Image

from vistra import __version__
from vistra.runtime import Classifier, load_classifier
from vistra.serve.batcher import Batcher
from vistra.serve.metrics import Metrics
from vistra.serve.settings import ServeSettings
from vistra.serve.uploads import Upload, decode_upload

log = logging.getLogger("vistra.serve")

EXPLAIN_MAX_SIDE = 1024  # heat maps are drawn on the upload shrunk to fit this many pixels

T = TypeVar("T")


class ServiceError(Exception):
    """A request the service refuses or fails: the HTTP status, why, and headers to send."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers


class Service:
    """The state behind the routes: model thread, preprocessing pool, limits, metrics.

    The model thread starts here and warms the model up; `ready` is set once that is done.
    `close()` stops both thread pools.
    """

    def __init__(self, classifier: Classifier, settings: ServeSettings) -> None:
        self.classifier, self.settings = classifier, settings
        self.metrics = Metrics()
        self.pool = ThreadPoolExecutor(settings.preprocess_threads,
                                       thread_name_prefix="vistra-preprocess")
        self.batcher = Batcher(classifier, settings.max_batch, settings.max_wait_ms / 1000,
                               on_batch=self.metrics.batch)
        self.metrics.queue_depth.set_function(self.batcher.depth)
        self.in_flight = 0  # changed on the event loop only
        self.in_flight_by_client: Counter[str] = Counter()  # likewise; absent when none
        self.ready = threading.Event()
        self.explain_methods, self.explain_unavailable = _explain_support(classifier, settings)
        self._explain_model: torch.nn.Module | None = None  # loaded on the first heat map
        self._explain_model_lock = threading.Lock()
        self.input_size = list(classifier.transform(Image.new("RGB", (32, 32))).shape)
        self.checkpoint_hash: str | None = None
        self.num_classes = len(classifier.classes or [])
        self.metrics.model.info({"name": classifier.name, "backend": classifier.backend,
                                 "dtype": classifier.dtype})
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
        return dict(name=c.name, backend=c.backend, dtype=c.dtype, classes=classes,
                    input_size=self.input_size, checkpoint_hash=self.checkpoint_hash,
                    max_batch=self.settings.max_batch, max_upload_mb=self.settings.max_upload_mb,
                    explain_methods=self.explain_methods,
                    explain_unavailable=self.explain_unavailable, version=__version__)

    def label(self, index: int) -> str:
        classes = self.classifier.classes
        return classes[index] if classes and index < len(classes) else str(index)

    # -- admission and time ----------------------------------------------------------------

    @asynccontextmanager
    async def admitted(self, client: str) -> AsyncIterator[None]:
        """A place among the `queue_size` predictions in the service, or 503 at once; and
        among the `max_in_flight_per_client` of the client's address, or 429 at once."""
        limit = self.settings.max_in_flight_per_client
        if self.in_flight_by_client[client] >= limit:
            self.metrics.client_limit_refusals.inc()
            raise ServiceError(429, f"{limit} requests from {client} are already in progress; "
                               "wait for their answers", headers={"Retry-After": "1"})
        if self.in_flight >= self.settings.queue_size:
            raise ServiceError(503, f"the service is full ({self.settings.queue_size} "
                               "requests in progress); retry shortly",
                               headers={"Retry-After": "1"})
        self.in_flight += 1
        self.in_flight_by_client[client] += 1
        self.metrics.in_flight.inc()
        try:
            yield
        finally:
            self.in_flight -= 1
            self.in_flight_by_client[client] -= 1
            if not self.in_flight_by_client[client]:  # the table holds active clients only
                del self.in_flight_by_client[client]
            self.metrics.in_flight.dec()

    async def within_time(self, work: Awaitable[T]) -> T:
        """The request's answer, or 504 when it takes longer than `timeout_s`."""
        try:
            return await asyncio.wait_for(work, self.settings.timeout_s)
        except asyncio.TimeoutError as error:  # Python 3.10's is not the builtin TimeoutError
            raise ServiceError(504, f"no answer within {self.settings.timeout_s:g} s; "
                               "the service is overloaded or the model is slow") from error

    # -- prediction ------------------------------------------------------------------------

    async def prepare(self, upload: Upload, keep_image: bool
                      ) -> tuple[torch.Tensor, Image.Image | None]:
        """Decode and transform on the preprocessing threads (never on the event loop)."""
        return await asyncio.get_running_loop().run_in_executor(
            self.pool, self._prepare, upload, keep_image)

    def _prepare(self, upload: Upload, keep_image: bool
                 ) -> tuple[torch.Tensor, Image.Image | None]:
        image = decode_upload(upload, self.settings)
        return self.classifier.transform(image), image if keep_image else None

    async def predict(self, upload: Upload, topk: int, start: float,
                      explain_method: str | None = None) -> dict:
        """The top `topk` classes of one upload (and its heat map, if asked for); `ms` counts
        from `start`, the request's arrival on `time.perf_counter()`."""
        tensor, image = await self.prepare(upload, keep_image=explain_method is not None)
        try:
            logits = await asyncio.wrap_future(self.batcher.submit(tensor))
        except Exception as error:
            log.exception("model failed on %s", upload.name)
            raise ServiceError(500, f"the model failed: {error}") from error
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

    # -- explanations ----------------------------------------------------------------------

    def check_explain(self, method: str | None) -> None:
        """Refuse (400) an explain method this service does not offer; None asks for none."""
        if method is None:
            return
        if self.explain_unavailable:
            raise ServiceError(400, f"explain is unavailable: {self.explain_unavailable}")
        if method not in self.explain_methods:
            raise ServiceError(400, f"unknown explain method {method!r}; this model offers "
                               f"{', '.join(self.explain_methods)}")

    async def explain(self, image: Image.Image, method: str, target: int | None = None) -> dict:
        from vistra.explain import explain, overlay

        model = await asyncio.get_running_loop().run_in_executor(self.pool, self.explain_model)
        # On the model thread: explanations hook into the model, which must not overlap a batch.
        job = self.batcher.call(lambda: explain(model, image, method=method, target=target))
        heat = await asyncio.wrap_future(job)
        # No caption: the page shows the class, and on a small image it would be unreadable.
        png = await asyncio.get_running_loop().run_in_executor(
            self.pool, _png_base64, lambda: overlay(image, heat, caption=False))
        return {"method": heat.method, "target": int(heat.target),
                "label": heat.label if heat.label is not None else self.label(int(heat.target)),
                "probability": float(heat.probability), "overlay_png": png}

    def explain_model(self) -> torch.nn.Module:
        """The module heat maps are drawn with: the served one, or for a bf16 or fp16
        service an fp32 copy loaded from the same file on the first heat map (once, whichever
        thread asks first), so the maps are the fp32 service's, not half-precision
        gradients'."""
        if self.classifier.dtype == "fp32":
            return self.classifier.model
        with self._explain_model_lock:
            if self._explain_model is None:
                log.info("loading an fp32 copy of %s for heat maps", self.classifier.name)
                self._explain_model = load_classifier(
                    self.classifier.source, self.classifier.device, backend="torch",
                    dtype="fp32").model
            return self._explain_model

    def close(self) -> None:
        self.batcher.stop()
        self.pool.shutdown(wait=False, cancel_futures=True)


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
