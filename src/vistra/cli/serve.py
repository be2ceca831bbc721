"""`vistra serve MODEL`: classify images over HTTP, with a web page at `/`."""

from __future__ import annotations

import argparse

from vistra.accel.capabilities import DTYPES
from vistra.cli.inference import add_device_option, report_precision, runtime_device
from vistra.serve.settings import ServeSettings


def register(sub: argparse._SubParsersAction) -> None:
    d = ServeSettings()
    p = sub.add_parser(
        "serve", help="serve a model over HTTP, with a web page to drop images on",
        description="An HTTP classification service (FastAPI on uvicorn): POST an image to "
                    "/v1/predict, open / in a browser, scrape /metrics with Prometheus. The "
                    "API is described at /docs (offline) and /openapi.json. Requests that arrive "
                    "within --max-wait-ms of each other share one forward pass.")
    p.add_argument("model", help="a .safetensors written by `vistra train` (or an exported .onnx)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--max-batch", type=int, default=d.max_batch,
                   help=f"images per forward pass (default: {d.max_batch}; 1 turns batching off)")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                   help="how long a request waits for others to batch with "
                        f"(default: {d.max_wait_ms:g})")
    p.add_argument("--workers", type=int, default=1,
                   help="processes, each with its own copy of the model and its own "
                        "/metrics (default: 1)")
    p.add_argument("--threads", type=int,
                   help="torch threads per process (default: torch's choice)")
    p.add_argument("--max-upload-mb", type=float, default=d.max_upload_mb,
                   help=f"request body limit in MB (default: {d.max_upload_mb:g})")
    p.add_argument("--max-megapixels", type=float, default=d.max_megapixels,
                   help=f"decoded image size limit (default: {d.max_megapixels:g})")
    p.add_argument("--queue-size", type=int, default=d.queue_size,
                   help="predictions in progress at once; more are refused with 503. "
                        "Uploads held in memory stay under this times --max-upload-mb "
                        f"(default: {d.queue_size})")
    p.add_argument("--timeout-s", type=float, default=d.timeout_s,
                   help=f"per request; later answers 504 (default: {d.timeout_s:g})")
    p.add_argument("--read-timeout-s", type=float, default=d.read_timeout_s,
                   help="seconds a request body may stop arriving; longer answers 408 "
                        f"(default: {d.read_timeout_s:g})")
    p.add_argument("--max-in-flight-per-client", type=int, default=d.max_in_flight_per_client,
                   help="predictions in progress from one client address; more are refused "
                        f"with 429 (default: {d.max_in_flight_per_client})")
    add_device_option(p)
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="fp32, or the model cast once to bf16 (faster on GPUs of compute "
                        "capability 8.0 or later and CPUs with AVX512_BF16 or AMX; emulated "
                        "and slow on other CPUs) or fp16 (for older GPUs); auto (default) "
                        "picks by the device and says which. An .onnx file computes in what "
                        "it was exported in (fp32 or int8), on the CPU")
    p.add_argument("--explain", action="store_true",
                   help="offer heat maps (?explain=METHOD and on the page); they cost a "
                        "backward pass each, so they are off by default")
    p.add_argument("--explain-max-in-flight", type=int, default=d.explain_max_in_flight,
                   help="heat-map requests in progress at once; more are refused with 503 "
                        "and Retry-After. Maps are drawn one at a time on a model copy of "
                        "their own, so predictions go on meanwhile "
                        f"(default: {d.explain_max_in_flight})")
    p.add_argument("--explain-timeout-s", type=float, default=d.explain_timeout_s,
                   help="a heat-map request's time limit instead of --timeout-s; later "
                        f"answers 504 and the map stops (default: {d.explain_timeout_s:g})")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = ServeSettings(
        max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_upload_mb=args.max_upload_mb,
        queue_size=args.queue_size, timeout_s=args.timeout_s,
        read_timeout_s=args.read_timeout_s, max_in_flight_per_client=args.max_in_flight_per_client,
        preprocess_threads=max(2, args.threads or 2), max_megapixels=args.max_megapixels,
        explain=args.explain, explain_max_in_flight=args.explain_max_in_flight,
        explain_timeout_s=args.explain_timeout_s)
    from vistra.serve.server import run as run_server

    run_server(args.model, settings, host=args.host, port=args.port, workers=args.workers,
               threads=args.threads, dtype=args.dtype, device=runtime_device(args, args.model),
               on_load=lambda c: report_precision(c.dtype, c.amp, c.backend, args.dtype,
                                                  c.device))
    return 0
