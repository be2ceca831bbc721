"""`vistra serve` under load: latency and throughput against calling the model directly.

    python benchmarks/serving.py                 # ViT-S/16 and Swin-T, writes serving.md
    python benchmarks/serving.py --models vit_fmnist --clients 1,2 --requests 5 \\
        --memory-requests 50 --output /tmp/serving.md   # a quick check of the script

For each model (random weights, 1000 classes, saved as a vistra checkpoint):
1. Direct: the model as `vistra serve` loads it (load_classifier, so `vistra.optimize`d)
   called in a loop at batch 1 (the bare forward), and the whole path a request takes
   without HTTP (decode the JPEG, transform, forward).
2. Served: `vistra serve MODEL --threads T` in a process of its own, with batching
   (--max-batch 16) and without (--max-batch 1); 1, 4, 8, 16 clients each send `--requests`
   JPEGs as raw bodies, one after another. Latency per request (p50/p95/p99) as the client
   sees it, throughput over the whole run.
3. Memory: the server's RSS after warm-up and after 2,000 mixed requests (good images, text,
   truncated images, bodies over the limit, decompression bombs, extreme aspect ratios).
Clients run in this process, the server in another: on a small machine they share the
cores, which the table states.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from vistra import create_model
from vistra.data.images import decode_rgb
from vistra.runtime import load_classifier
from vistra.weights import save_checkpoint

ROOT = Path(__file__).resolve().parent.parent
MODELS = ["vit_small_patch16_224", "swin_tiny_patch4_window7_224"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated model names")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    p.add_argument("--clients", default="1,4,8,16", help="concurrent clients to try")
    p.add_argument("--requests", type=int, default=64, help="requests per client (default: 64)")
    p.add_argument("--direct-runs", type=int, default=100,
                   help="timed calls of the model in a loop (default: 100)")
    p.add_argument("--memory-requests", type=int, default=2000,
                   help="mixed good and bad requests for the memory check (default: 2000)")
    p.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "serving.md")
    return p.parse_args()


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {f"p{q}": float(np.percentile(ms, q)) for q in (50, 95, 99)}


def photo_jpeg(size: tuple[int, int] = (400, 300)) -> bytes:
    """A smooth colour picture (gradients and shapes) as a camera-quality JPEG."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    pixels = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (w + h)], -1)
    pixels[(x - w // 2) ** 2 + (y - h // 2) ** 2 < (h // 4) ** 2] = (200, 60, 40)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def bad_bodies(good: bytes, limit_bytes: int) -> list[bytes]:
    """One of each kind of bad request the service must refuse without harm."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 0,
                                                              0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 65536)) + chunk(b"IEND", b""))
    thin = io.BytesIO()
    Image.new("RGB", (4000, 10)).save(thin, format="PNG")
    return [b"this is not an image", good[: len(good) // 2], b"\0" * (limit_bytes + 1), bomb,
            thin.getvalue()]


def make_checkpoint(name: str, folder: Path) -> Path:
    torch.manual_seed(0)
    model = create_model(name, num_classes=1000)
    path = folder / f"{name}.safetensors"
    save_checkpoint(model, path, classes=[f"class_{i}" for i in range(1000)])
    return path


def direct(path: Path, image: bytes, runs: int) -> dict[str, dict[str, float]]:
    """The model called in a loop at batch 1: forward only, and decode + transform + forward."""
    classifier = load_classifier(path)
    x = classifier.transform(decode_rgb(image)).unsqueeze(0)
    for _ in range(5):
        classifier(x)
    forward, whole = [], []
    for _ in range(runs):
        start = time.perf_counter()
        classifier(x)
        forward.append(time.perf_counter() - start)
    for _ in range(runs):
        start = time.perf_counter()
        classifier(classifier.transform(decode_rgb(image)).unsqueeze(0))
        whole.append(time.perf_counter() - start)
    return {"forward": {**percentiles(forward), "rps": runs / sum(forward)},
            "decode + transform + forward": {**percentiles(whole), "rps": runs / sum(whole)}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`vistra serve` in a subprocess on 127.0.0.1."""

    def __init__(self, model: Path, threads: int, max_batch: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "vistra", "serve", str(model), "--port", str(self.port),
                   "--threads", str(threads), "--max-batch", str(max_batch),
                   "--queue-size", "256", "--max-upload-mb", "4"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start: {' '.join(command)}")
            time.sleep(0.2)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def load(url: str, body: bytes, clients: int, requests: int) -> dict[str, float]:
    """`clients` threads, each sending `requests` bodies one after another."""
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()

    def client() -> None:
        nonlocal errors
        with httpx.Client(timeout=120) as http:
            for _ in range(requests):
                start = time.perf_counter()
                response = http.post(f"{url}/v1/predict", content=body,
                                     headers={"content-type": "image/jpeg"})
                seconds = time.perf_counter() - start
                with lock:
                    latencies.append(seconds)
                    errors += response.status_code != 200

    with httpx.Client() as http:  # warm the connection path
        http.post(f"{url}/v1/predict", content=body)
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
    elapsed = time.perf_counter() - start
    return {**percentiles(latencies), "rps": len(latencies) / elapsed, "errors": errors}


def memory(server: Server, good: bytes, requests: int) -> tuple[float, float, dict[int, int]]:
    """RSS after warm-up and after `requests` mixed requests; the status codes seen."""
    bodies = [good, *bad_bodies(good, 4 * 1024 * 1024)]
    before = server.rss_mb()
    codes: dict[int, int] = {}
    with httpx.Client(timeout=120) as http:
        for i in range(requests):
            try:
                code = http.post(f"{server.url}/v1/predict", content=bodies[i % len(bodies)]
                                 ).status_code
            except httpx.TransportError:  # a 413 may close the connection mid-upload
                code = 0
            codes[code] = codes.get(code, 0) + 1
    return before, server.rss_mb(), codes


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    clients = [int(c) for c in args.clients.split(",")]
    image = photo_jpeg()
    lines = [
        "# Serving benchmark",
        "",
        f"`python benchmarks/serving.py` on {date.today()}, {platform.processor() or 'CPU'}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, {args.threads} torch threads in "
        "the server; clients in another process on the same machine (they share the cores).",
        f"A {len(image) // 1024} KB 400x300 JPEG sent as the raw body; {args.requests} "
        "requests per client; latency in ms as the client sees it, throughput in requests/s.",
        "",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            path = make_checkpoint(name, Path(tmp))
            print(f"== {name}", flush=True)
            lines += [f"## {name}", "", "| setting | clients | p50 | p95 | p99 | req/s | errors |",
                      "|---|---:|---:|---:|---:|---:|---:|"]
            for label, row in direct(path, image, args.direct_runs).items():
                lines.append(f"| direct: {label} | 1 | {row['p50']:.1f} | {row['p95']:.1f} | "
                             f"{row['p99']:.1f} | {row['rps']:.1f} | - |")
            memory_row = None
            for max_batch in (16, 1):
                server = Server(path, args.threads, max_batch)
                try:
                    for n in clients:
                        row = load(server.url, image, n, args.requests)
                        print(f"max-batch {max_batch}, {n} clients: {row}", flush=True)
                        lines.append(
                            f"| serve --max-batch {max_batch} | {n} | {row['p50']:.1f} | "
                            f"{row['p95']:.1f} | {row['p99']:.1f} | {row['rps']:.1f} | "
                            f"{row['errors']} |")
                    if max_batch == 16:
                        memory_row = memory(server, image, args.memory_requests)
                finally:
                    server.stop()
            before, after, codes = memory_row
            seen = ", ".join(f"{code}: {count}" for code, count in sorted(codes.items()))
            lines += ["", f"Server RSS after warm-up {before:.0f} MB; after "
                      f"{args.memory_requests} mixed good and bad requests {after:.0f} MB "
                      f"(+{after - before:.0f} MB). Status codes: {seen}.", ""]
    args.output.write_text("\n".join(lines) + "\n")
    print(f"written {args.output}")


if __name__ == "__main__":
    main()
