"""The service behind the routes: one classifier on its model thread, a pool of preprocessing
threads, admission (per service, per client address and for heat maps) and time limits,
explanations on a thread and a model copy of their own (for an .onnx graph, the served
session itself: occlusion and RISE only run it), readiness and metrics.

It knows nothing of the web framework: what it refuses raises `ServiceError` (an HTTP status,
a one-line reason, headers), and `vistra.serve.app` turns that into a response.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import dataclasses
import io
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from typing import Any, TypeVar

import torch
from PIL import Image

from vistra import __version__
from vistra.explain import METHODS, default_method, default_reason, explain, methods_for, overlay
from vistra.explain.perturbation import Model
from vistra.runtime import Classifier, load_classifier
from vistra.serve.batcher import Batcher, BatchPass
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


class HeatMapAbandoned(Exception):
    """Raised inside a heat map's model call once its request is past explain_timeout_s."""


class Service:
    """The state behind the routes: model thread, preprocessing pool, limits, metrics.

    The model thread starts here and warms the model up; `ready` is set once that is done.
    `close()` stops the threads.
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
        self.explains_in_flight = 0  # likewise
        self.ready = threading.Event()
        self.explain_methods, self.explain_default, self.explain_unavailable = \
            _explain_support(classifier, settings)
        # Heat maps are drawn one at a time here, never on the model thread: however long
        # one takes, predictions do not wait for it.
        self.explainer = ThreadPoolExecutor(1, thread_name_prefix="vistra-explain")
        self._explain_model: Model | None = None  # made on the first heat map
        self._explain_model_lock = threading.Lock()
        self._explain_deadline = math.inf  # of the heat map being drawn, on perf_counter()
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
                    explain_methods=self.explain_methods, explain_default=self.explain_default,
                    explain_unavailable=self.explain_unavailable,
                    explain_max_in_flight=self.settings.explain_max_in_flight,
                    explain_timeout_s=self.settings.explain_timeout_s, version=__version__)

    def label(self, index: int) -> str:
        classes = self.classifier.classes
        return classes[index] if classes and index < len(classes) else str(index)

    # -- admission and time ----------------------------------------------------------------

    @asynccontextmanager
    async def admitted(self, client: str, explaining: bool = False) -> AsyncIterator[None]:
        """A place among the `max_in_flight_per_client` of the client's address, or 429 at
        once; among the `queue_size` predictions in the service, or 503 at once; and for a
        heat map among the `explain_max_in_flight`, or 503 at once. 503, not 429, for heat
        maps: the service's capacity is taken, by whichever clients, and the same request
        succeeds once a map is done (Retry-After), or at once without ?explain."""
        limit = self.settings.max_in_flight_per_client
        if self.in_flight_by_client[client] >= limit:
            self.metrics.client_limit_refusals.inc()
            raise ServiceError(429, f"{limit} requests from {client} are already in progress; "
                               "wait for their answers", headers={"Retry-After": "1"})
        if self.in_flight >= self.settings.queue_size:
            raise ServiceError(503, f"the service is full ({self.settings.queue_size} "
                               "requests in progress); retry shortly",
                               headers={"Retry-After": "1"})
        explain_limit = self.settings.explain_max_in_flight
        if explaining and self.explains_in_flight >= explain_limit:
            self.metrics.explain_refusals.inc()
            raise ServiceError(503, f"{explain_limit} heat maps are already being drawn; retry "
                               "shortly, or ask without ?explain for the classes alone",
                               headers={"Retry-After": "1"})
        self.in_flight += 1
        self.in_flight_by_client[client] += 1
        self.explains_in_flight += explaining
        self.metrics.in_flight.inc()
        self.metrics.explains_in_flight.inc(explaining)
        try:
            yield
        finally:
            self.in_flight -= 1
            self.in_flight_by_client[client] -= 1
            if not self.in_flight_by_client[client]:  # the table holds active clients only
                del self.in_flight_by_client[client]
            self.explains_in_flight -= explaining
            self.metrics.in_flight.dec()
            self.metrics.explains_in_flight.dec(explaining)

    async def within_time(self, work: Awaitable[T], explain_method: str | None = None) -> T:
        """The request's answer, or 504 when it takes longer than `timeout_s` (with a heat
        map by `explain_method`, `explain_timeout_s`)."""
        seconds = self.settings.timeout_s if explain_method is None else \
            self.settings.explain_timeout_s
        try:
            return await asyncio.wait_for(work, seconds)
        except asyncio.TimeoutError as error:  # Python 3.10's is not the builtin TimeoutError
            if explain_method is not None:
                raise self._heat_map_too_slow(explain_method) from error
            raise ServiceError(504, f"no answer within {seconds:g} s; "
                               "the service is overloaded or the model is slow") from error

    def _heat_map_too_slow(self, method: str) -> ServiceError:
        """504 for a heat map past its time, naming a much cheaper method the model offers
        (RISE's 1000 forwards take minutes for ViT-B on a CPU)."""
        self.metrics.explain_timeouts.inc()
        faster = _faster_method(method, self.explain_methods)
        instead = f"ask ?explain={faster[0]} ({faster[1]}), or " if faster else "ask "
        return ServiceError(504, f"no heat map by {method} within "
                            f"{self.settings.explain_timeout_s:g} s (the service's "
                            f"--explain-timeout-s); {instead}without ?explain for the classes "
                            "alone")

    @contextmanager
    def receiving(self) -> Iterator[None]:
        """Announces a body being received to the model thread, which waits for it (up to
        max_wait_ms) before it runs a batch without it."""
        self.batcher.expect()
        try:
            yield
        finally:
            self.batcher.expect(-1)

    # -- prediction ------------------------------------------------------------------------

    async def prepare(self, upload: Upload, keep_image: bool
                      ) -> tuple[Future, Image.Image | None]:
        """Decode, transform and queue for the model on a preprocessing thread (never on the
        event loop, and without a trip back to it before the model thread can start); the
        image is announced to the batcher until it is queued."""
        self.batcher.expect()
        job = self.pool.submit(self._prepare, upload, keep_image)
        try:
            return await asyncio.wrap_future(job)
        finally:
            if job.cancelled():  # never ran, so never withdrawn
                self.batcher.expect(-1)

    def _prepare(self, upload: Upload, keep_image: bool) -> tuple[Future, Image.Image | None]:
        try:
            image = decode_upload(upload, self.settings)
            tensor = self.classifier.transform(image)
        except BaseException:
            self.batcher.expect(-1)
            raise
        return self.batcher.submit(tensor, expected=True), image if keep_image else None

    async def predict(self, upload: Upload, topk: int, start: float,
                      explain_method: str | None = None) -> tuple[dict, BatchPass]:
        """The top `topk` classes of one upload (and its heat map, if asked for), and the
        forward pass that computed them; `ms` counts from `start`, the request's arrival on
        `time.perf_counter()`."""
        queued, image = await self.prepare(upload, keep_image=explain_method is not None)
        try:
            logits, done = await asyncio.wrap_future(queued)
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
            result["explanation"] = await self.explain(
                image, explain_method, int(indices[0]),
                deadline=start + self.settings.explain_timeout_s)
        result["ms"] = round((time.perf_counter() - start) * 1000, 3)
        return result, done

    # -- explanations ----------------------------------------------------------------------

    def explain_method(self, asked: str | None) -> str | None:
        """The method `?explain=` names: empty or "default" is the model's default, None asks
        for no heat map; one this service does not offer is refused (400)."""
        if asked is None:
            return None
        if self.explain_unavailable:
            raise ServiceError(400, f"explain is unavailable: {self.explain_unavailable}")
        method = self.explain_default if asked in ("", "default") else asked
        if method not in self.explain_methods:
            what = ("does not apply to " + self.classifier.name if method in METHODS
                    else "is unknown")
            raise ServiceError(400, f"explain method {asked!r} {what}; this model offers "
                               f"{', '.join(self.explain_methods)} (or default)")
        return method

    async def explain(self, image: Image.Image, method: str, target: int,
                      deadline: float) -> dict:
        """The heat map of `target` with its overlay, drawn on the explain thread; one still
        drawing at `deadline` (on `time.perf_counter()`) stops at its next model call, so an
        abandoned map does not hold the thread."""
        job = self.explainer.submit(self._draw_heat_map, image, method, target, deadline)
        try:
            return await asyncio.wrap_future(job)
        except HeatMapAbandoned as error:
            raise self._heat_map_too_slow(method) from error

    def _draw_heat_map(self, image: Image.Image, method: str, target: int,
                       deadline: float) -> dict:
        started = time.perf_counter()
        model = self.explain_model()
        self._explain_deadline = deadline
        try:
            heat = explain(model, image, method=method, target=target)
        finally:
            self._explain_deadline = math.inf
        # No caption: the page shows the class, and on a small image it would be unreadable.
        png = _png_base64(overlay(image, heat, caption=False))
        self.metrics.explain_seconds.observe(time.perf_counter() - started)
        return {"method": heat.method, "target": int(heat.target),
                "label": heat.label if heat.label is not None else self.label(int(heat.target)),
                "probability": float(heat.probability), "overlay_png": png}

    def explain_model(self) -> Model:
        """The model heat maps are drawn with, made on the first heat map (once, whichever
        thread asks first): a copy of the served one, never the served one itself, which the
        model thread runs meanwhile (explanations hook into the model); for a bf16 or fp16
        service an fp32 copy loaded from the same file, so the maps are the fp32 service's,
        not half-precision gradients'. A graph without a module (an .onnx file, int8 or not)
        is the served Classifier itself, checking the deadline before each run: occlusion
        and RISE only run it, and an onnxruntime session may run on several threads at once,
        so a second session would only double the memory."""
        with self._explain_model_lock:
            if self._explain_model is None and self.classifier.model is None:
                self._explain_model = dataclasses.replace(self.classifier,
                                                          run=self._run_unless_abandoned)
            elif self._explain_model is None:
                if self.classifier.dtype == "fp32":
                    model = copy.deepcopy(self.classifier.model)
                else:
                    log.info("loading an fp32 copy of %s for heat maps", self.classifier.name)
                    model = load_classifier(self.classifier.source, self.classifier.device,
                                            backend="torch", dtype="fp32").model
                model.register_forward_pre_hook(self._stop_if_abandoned)
                self._explain_model = model
            return self._explain_model

    def _stop_if_abandoned(self, module: torch.nn.Module, inputs: tuple) -> None:
        self._check_deadline()

    def _run_unless_abandoned(self, batch: torch.Tensor) -> torch.Tensor:
        self._check_deadline()
        return self.classifier.run(batch)

    def _check_deadline(self) -> None:
        if time.perf_counter() > self._explain_deadline:
            raise HeatMapAbandoned()

    def close(self) -> None:
        self.batcher.stop()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.explainer.shutdown(wait=False, cancel_futures=True)


def _png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _explain_support(classifier: Classifier, settings: ServeSettings
                     ) -> tuple[list[str], str | None, str | None]:
    """The explain methods on offer and the model's default among them, or why there are
    none."""
    if not settings.explain:
        return [], None, "the service was started without --explain"
    # A graph without a module (an .onnx file) is explained by the methods that only run it.
    model = classifier if classifier.model is None else classifier.model
    default = default_method(model)
    log.info("heat maps: method %s by default, %s", default, default_reason(model))
    # The default first: the page offers the first one.
    methods = sorted(methods_for(model), key=lambda m: m != default)
    if not methods:
        return [], None, f"no explain method supports {classifier.name}"
    return methods, default, None


def _faster_method(slow: str, offered: list[str]) -> tuple[str, str] | None:
    """A method the service offers that costs far fewer model calls than `slow`, and what it
    costs: lrp's one backward for the methods that run the model again and again (RISE,
    occlusion, Score-CAM), occlusion's 169 forwards for RISE's 1000 (an .onnx model offers
    only those two); None if there is none."""
    cheaper = (("lrp", "one backward pass", ("rise", "occlusion", "scorecam")),
               ("occlusion", "169 forwards, RISE's 1000", ("rise",)))
    for method, cost, instead_of in cheaper:
        if method in offered and slow in instead_of:
            return method, cost
    return None
