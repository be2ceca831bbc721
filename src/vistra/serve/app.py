"""The HTTP service: `create_app(classifier, settings)` returns a FastAPI app that classifies
uploaded images, batches concurrent requests, reports health and Prometheus metrics, and
serves a small offline web page at `/`.

What a request may cost is bounded at every step: the body is counted while it arrives
(never buffered past `max_upload_mb`, never written to disk) and must not pause for longer
than `read_timeout_s` (else 408), the image size is checked from its header before any pixel
is decoded, decoding runs on a fixed pool of threads, at most `queue_size` predictions are in
the service at once (more get 503 and Retry-After) and `max_in_flight_per_client` from one
client address (more get 429 and Retry-After), and each one has `timeout_s` to finish (else
504). A heat map (?explain=) also needs one of `explain_max_in_flight` places (else 503 and
Retry-After) and has `explain_timeout_s` instead; heat maps are drawn on a thread and a model
copy of their own, so predictions are served while they are drawn.

Every prediction's answer carries a Server-Timing header: `forward`, the forward pass it
rode in (and that pass's batch size), beside `total`, the app's time for the request, which
`vistra.serve.metrics.CountRequests` adds to every response.

This module is the web side only: the routes, plain functions that find the `Service` at
`request.app.state.service`. Reading and checking uploads is `vistra.serve.uploads`, the
model thread, limits and explanations `vistra.serve.service`, the answers' shapes
`vistra.serve.schemas`, and the Prometheus metrics `vistra.serve.metrics`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Annotated

from fastapi import APIRouter, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.requests import ClientDisconnect

from vistra import __version__
from vistra.runtime import Classifier
from vistra.serve.batcher import BatchPass
from vistra.serve.metrics import CountRequests
from vistra.serve.reference import render_reference
from vistra.serve.schemas import (
    ERRORS,
    FILES_BODY,
    IMAGE_BODY,
    BatchItem,
    ModelInfo,
    Prediction,
    Status,
)
from vistra.serve.service import Service, ServiceError
from vistra.serve.settings import ServeSettings
from vistra.serve.uploads import Upload, UploadError, UploadTimedOut, read_uploads

MAX_BATCH_FILES = 64  # files in one /v1/predict/batch request
PAGE_FILES = {"index.html": "text/html; charset=utf-8",
              "app.js": "text/javascript; charset=utf-8",
              "style.css": "text/css; charset=utf-8"}

TopK = Annotated[int, Query(ge=1, description="how many classes to return")]
ExplainMethod = Annotated[str | None, Query(description="heat map method, see GET /v1/model; "
                                                       "empty or 'default': the model's default")]

router = APIRouter()


def create_app(classifier: Classifier, settings: ServeSettings | None = None) -> FastAPI:
    """The service for one classifier. The model thread starts here and warms the model up;
    /readyz answers 200 once that is done. Stop it with the app's shutdown (lifespan)."""
    settings = settings or ServeSettings()
    service = Service(classifier, settings)
    app = FastAPI(title=f"vistra serve: {classifier.name}", version=__version__,
                  lifespan=_lifespan, docs_url=None, redoc_url=None,
                  description="Image classification with a vistra model. Send an image, get "
                  "the top classes with probabilities. Limits: body "
                  f"{settings.max_upload_mb:g} MB, {settings.max_megapixels:g} megapixels, "
                  f"aspect ratio {settings.max_aspect_ratio:g}:1, {settings.timeout_s:g} s, "
                  f"{settings.read_timeout_s:g} s of silence while the body arrives.")
    app.state.service = service
    app.state.page = _page_files()
    app.include_router(router)
    app.add_exception_handler(UploadError, _upload_refused)
    app.add_exception_handler(ServiceError, _service_refused)
    # The paths metrics may name: the routes and FastAPI's /openapi.json; the rest is "other".
    paths = frozenset({route.path for route in router.routes} | {app.openapi_url})
    app.add_middleware(CountRequests, metrics=service.metrics, paths=paths)
    return app


# -- predictions ------------------------------------------------------------------------------

@router.post("/v1/predict", response_model=Prediction, response_model_exclude_none=True,
             openapi_extra={"requestBody": IMAGE_BODY}, responses=ERRORS,
             summary="Classify one image")
async def predict(request: Request, response: Response, topk: TopK = 5,
                  explain: ExplainMethod = None) -> dict:
    start = time.perf_counter()
    service = _service(request)
    method = service.explain_method(explain)
    async with service.admitted(_client(request), method is not None):
        result, done = await service.within_time(
            _predict_one(request, service, topk, start, method), method)
    response.headers["Server-Timing"] = _forward_timing(done)
    return result


@router.post("/v1/predict/batch", response_model=list[BatchItem],
             response_model_exclude_none=True, openapi_extra={"requestBody": FILES_BODY},
             responses=ERRORS, summary="Classify several images (multipart fields named 'file')")
async def predict_batch(request: Request, topk: TopK = 5) -> list[dict]:
    start = time.perf_counter()
    service = _service(request)
    async with service.admitted(_client(request)):
        return await service.within_time(_predict_each(request, service, topk, start))


async def _predict_one(request: Request, service: Service, topk: int, start: float,
                       explain: str | None) -> tuple[dict, BatchPass]:
    files = await _receive(request, service)
    if len(files) > 1:
        raise HTTPException(400, f"{len(files)} files sent; /v1/predict takes one, "
                            "/v1/predict/batch several")
    return await service.predict(files[0], topk, start, explain)


async def _predict_each(request: Request, service: Service, topk: int,
                        start: float) -> list[dict]:
    files = await _receive(request, service)
    if len(files) > MAX_BATCH_FILES:
        raise HTTPException(413, f"{len(files)} files sent; the limit is {MAX_BATCH_FILES} "
                            "a request")
    return list(await asyncio.gather(*(_batch_item(service, f, topk, start) for f in files)))


async def _batch_item(service: Service, upload: Upload, topk: int, start: float) -> dict:
    """One file's answer, or the status and reason it alone would have got."""
    try:
        result, _ = await service.predict(upload, topk, start)
        return {"file": upload.name, **result}
    except (UploadError, ServiceError) as error:
        return {"file": upload.name, "status": error.status, "detail": error.detail}


async def _receive(request: Request, service: Service) -> list[Upload]:
    try:
        with service.receiving():
            return await read_uploads(request.stream(), request.headers.get("content-type", ""),
                                      service.settings, request.headers.get("content-length"))
    except ClientDisconnect as error:  # nobody to answer; keep it out of the error log
        raise UploadError(400, "the client went away during the upload") from error
    except UploadTimedOut:  # answered 408 by _upload_refused
        service.metrics.read_timeouts.inc()
        raise


# -- the model, health, metrics ---------------------------------------------------------------

@router.get("/v1/model", response_model=ModelInfo, summary="The model and what it offers")
async def model(request: Request) -> dict:
    return _service(request).model_info()


@router.get("/healthz", response_model=Status, summary="Alive (the process answers)")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", response_model=Status, summary="Ready (model loaded and warmed up)",
            responses={503: {"description": "still warming up"}})
async def readyz(request: Request) -> Response:
    if _service(request).ready.is_set():
        return JSONResponse({"status": "ready"})
    return JSONResponse({"status": "warming up"}, status_code=503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    recorded = _service(request).metrics
    return Response(recorded.exposition(), media_type=recorded.content_type)


# -- the API reference and the web page -------------------------------------------------------

@router.get("/docs", include_in_schema=False)
async def docs(request: Request) -> HTMLResponse:
    return HTMLResponse(render_reference(request.app.openapi()))


@router.get("/", include_in_schema=False)
async def index(request: Request) -> Response:
    return _page_file(request, "index.html")


@router.get("/app.js", include_in_schema=False)
async def script(request: Request) -> Response:
    return _page_file(request, "app.js")


@router.get("/style.css", include_in_schema=False)
async def style(request: Request) -> Response:
    return _page_file(request, "style.css")


def _page_file(request: Request, name: str) -> Response:
    return Response(request.app.state.page[name], media_type=PAGE_FILES[name])


def _page_files() -> dict[str, bytes]:
    folder = resources.files("vistra") / "assets" / "serve"
    return {name: (folder / name).read_bytes() for name in PAGE_FILES}


# -- plumbing ---------------------------------------------------------------------------------

def _service(request: Request) -> Service:
    return request.app.state.service


def _forward_timing(done: BatchPass) -> str:
    """The Server-Timing entry of the forward pass a prediction rode in."""
    return f'forward;dur={done.seconds * 1000:.3f};desc="batch {done.size}"'


def _client(request: Request) -> str:
    """The client's address, which the per-client limit counts by (behind a proxy, the one
    in X-Forwarded-For, which uvicorn reads from the addresses in FORWARDED_ALLOW_IPS)."""
    return request.client.host if request.client else "unknown"


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    app.state.service.close()


async def _upload_refused(request: Request, error: UploadError) -> JSONResponse:
    return JSONResponse({"detail": error.detail}, error.status)


async def _service_refused(request: Request, error: ServiceError) -> JSONResponse:
    return JSONResponse({"detail": error.detail}, error.status, headers=error.headers)
