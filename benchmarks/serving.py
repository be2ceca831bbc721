"""`vistra serve` under load: the server's own time per request against the model's, and
what dynamic batching gains.

    python benchmarks/serving.py            # vit_fmnist (28x28) and ViT-S/16 (224x224), ~3 min
    python benchmarks/serving.py --smoke    # a handful of requests: checks the script works

Paths, all in the dtype `--dtype` resolves to on this machine (printed):
- direct: the checkpoint as `vistra serve` loads it (`load_classifier`, `vistra.optimize`d),
  called in a loop in this process at batch 1 and at batch 16 (per image), and decode +
  transform + forward at batch 1.
- served: `vistra serve MODEL --dtype D --threads T --max-batch 16` (batching) and
  `--max-batch 1` (none), in a process of its own; the clients are threads of this process
  (another process than the server), each with one keep-alive connection (http.client, the
  lightest client at hand), sending the model's JPEG as the raw body, one request after
  another.

Server overhead = server-side time minus the model's own time at the same batch, per
request: the service answers every prediction with a Server-Timing header that holds
`total` (the app's time, from the request to its answer's head: routing, upload, decode,
transform, queueing and batching, forward, JSON, metrics) and `forward` (the forward pass the
request rode in, and that pass's batch size); overhead = total - forward. Uvicorn's HTTP
parsing is outside the app and so outside `total`; the client's latency beside it includes
it. Targets (issue 33): overhead p50 <= 10 ms at 1 client for the 28x28 and the 224x224
JPEG, and batching (req/s with --max-batch 16 over --max-batch 1) >= 1.5x at 8 clients on a
model whose batch 16 is faster per image than its batch 1 (the direct rows say which).

Memory: the server's RSS after warm-up and after `--memory-requests` mixed requests (good
images, text, truncated images, bodies over the limit, decompression bombs, extreme aspect
ratios), on the first model.
"""

from __future__ import annotations

import argparse
import http.client
import io
import os
import platform
import re
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

import numpy as np
import torch
from PIL import Image

from vistra import create_model
from vistra.accel import resolve_dtype
from vistra.accel.capabilities import probe
from vistra.data.images import decode_rgb
from vistra.runtime import load_classifier
from vistra.weights import save_checkpoint

ROOT = Path(__file__).resolve().parent.parent
# name: (image side of its JPEG, classes). vit_fmnist: the Fashion-MNIST recipe ViT, a model
# so small that a call's fixed cost dominates batch 1, so batch 16 is several times faster
# per image: the model batching can show itself on. ViT-S/16: a 224x224 model, whose batch 16
# gains little per image on a few cores.
MODELS = {"vit_fmnist": (28, 10), "swin_fmnist": (28, 10), "vit_small_patch16_224": (224, 1000),
          "swin_tiny_patch4_window7_224": (224, 1000)}
DEFAULT_MODELS = "vit_fmnist,vit_small_patch16_224"
SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16",
              "amx_int8")
TIMING = re.compile(r"(\w+);dur=([0-9.]+)(?:;desc=\"batch (\d+)\")?")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=DEFAULT_MODELS,
                   help=f"comma-separated, of {', '.join(MODELS)} (default: {DEFAULT_MODELS})")
    p.add_argument("--dtype", default="auto", help="the server's and the direct path's "
                   "--dtype (default: auto, as `vistra serve`)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads in the server and the direct path (default: the cores)")
    p.add_argument("--clients", default="1,8", help="concurrent clients to try (default: 1,8)")
    p.add_argument("--requests", type=int, default=24,
                   help="requests per client (default: 24)")
    p.add_argument("--direct-runs", type=int, default=30,
                   help="timed calls of the model per direct row (default: 30)")
    p.add_argument("--memory-requests", type=int, default=600,
                   help="mixed good and bad requests for the memory check (default: 600)")
    p.add_argument("--smoke", action="store_true", help="a handful of requests of each kind "
                   "on vit_fmnist: checks the script, measures nothing")
    p.add_argument("--output", type=Path, help="the report (default: benchmarks/serving.md; "
                   "with --smoke, none)")
    args = p.parse_args()
    if args.smoke:
        args.models, args.clients, args.requests = "vit_fmnist", "1,2", 4
        args.direct_runs, args.memory_requests = 3, 12
    elif args.output is None:
        args.output = ROOT / "benchmarks" / "serving.md"
    return args


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def photo_jpeg(side: int) -> bytes:
    """A smooth colour picture (gradients and a disc), side x side, as a camera-quality
    JPEG."""
    y, x = np.mgrid[0:side, 0:side]
    pixels = np.stack([x * 255 // side, y * 255 // side, (x + y) * 127 // (2 * side)], -1)
    pixels[(x - side // 2) ** 2 + (y - side // 2) ** 2 < (side // 4) ** 2] = (200, 60, 40)
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
    classes = MODELS[name][1]
    path = folder / f"{name}.safetensors"
    save_checkpoint(create_model(name, num_classes=classes), path,
                    classes=[f"class_{i}" for i in range(classes)])
    return path


def timed_ms(call, runs: int) -> list[float]:
    for _ in range(3):
        call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return times


def direct(path: Path, image: bytes, dtype: str, runs: int) -> dict[str, float]:
    """The model called in this process: forward at batch 1 and at batch 16 (per image), and
    decode + transform + forward at batch 1; p50 in ms."""
    classifier = load_classifier(path, dtype=dtype)
    x = classifier.transform(decode_rgb(image)).unsqueeze(0)
    x16 = x.expand(16, *x.shape[1:]).contiguous()
    return {"b1": pct(timed_ms(lambda: classifier(x), runs), 50),
            "b16 per image": pct(timed_ms(lambda: classifier(x16), max(3, runs // 4)), 50) / 16,
            "whole b1": pct(timed_ms(lambda: classifier(classifier.transform(
                decode_rgb(image)).unsqueeze(0)), runs), 50)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`vistra serve` in a subprocess on 127.0.0.1."""

    def __init__(self, model: Path, dtype: str, threads: int, max_batch: int) -> None:
        self.port = free_port()
        self.command = [sys.executable, "-m", "vistra", "serve", str(model), "--port",
                        str(self.port), "--dtype", dtype, "--threads", str(threads),
                        "--max-batch", str(max_batch), "--queue-size", "256",
                        "--max-upload-mb", "4"]
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while get_status(self.port, "/readyz") != 200:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start: {' '.join(self.command)}")
            time.sleep(0.2)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def get_status(port: int, path: str) -> int:
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        connection.request("GET", path)
        return connection.getresponse().status
    except OSError:
        return 0


def post(connection: http.client.HTTPConnection, body: bytes) -> tuple[int, str]:
    """One prediction on a keep-alive connection: its status and Server-Timing header."""
    connection.request("POST", "/v1/predict", body=body,
                       headers={"Content-Type": "image/jpeg"})
    response = connection.getresponse()
    response.read()
    return response.status, response.getheader("server-timing", "")


def load(port: int, body: bytes, clients: int, requests: int) -> dict[str, float]:
    """`clients` threads, each sending `requests` bodies one after another on its own
    connection: the client's latency, the server's total and forward times, overhead
    (total - forward, per request), the mean batch, req/s."""
    rows: list[tuple[float, float, float, int]] = []  # latency, total, forward, batch
    errors = 0
    lock = threading.Lock()

    def client() -> None:
        nonlocal errors
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        post(connection, body)  # the connection's first request is not timed
        for _ in range(requests):
            start = time.perf_counter()
            status, timing = post(connection, body)
            latency = (time.perf_counter() - start) * 1000
            entries = {name: (float(ms), batch) for name, ms, batch in TIMING.findall(timing)}
            with lock:
                if status != 200 or "forward" not in entries:
                    errors += 1
                    continue
                total, (forward, batch) = entries["total"][0], entries["forward"]
                rows.append((latency, total, forward, int(batch)))
        connection.close()

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
    elapsed = time.perf_counter() - start
    latency, total, forward, batch = (list(column) for column in zip(*rows, strict=True)) \
        if rows else ([], [], [], [])
    overhead = [t - f for t, f in zip(total, forward, strict=True)]
    return {"latency p50": pct(latency, 50), "latency p95": pct(latency, 95),
            "total p50": pct(total, 50), "forward p50": pct(forward, 50),
            "overhead p50": pct(overhead, 50), "overhead p95": pct(overhead, 95),
            "batch": float(np.mean(batch)) if batch else float("nan"),
            "rps": len(rows) / elapsed, "errors": errors}


def memory(server: Server, good: bytes, requests: int) -> tuple[float, float, dict[int, int]]:
    """RSS after warm-up and after `requests` mixed requests; the status codes seen."""
    bodies = [good, *bad_bodies(good, 4 * 1024 * 1024)]
    before = server.rss_mb()
    codes: dict[int, int] = {}
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    for i in range(requests):
        try:
            code, _ = post(connection, bodies[i % len(bodies)])
        except (OSError, http.client.HTTPException):  # a 413 may close the connection
            code = 0
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        codes[code] = codes.get(code, 0) + 1
    connection.close()
    return before, server.rss_mb(), codes


def machine(dtype: str, threads: int) -> list[str]:
    cpu = probe()
    flags = [flag for flag in SIMD_FLAGS if flag in cpu.flags]
    return [f"Machine: {cpu.cpu_model or platform.processor() or 'unknown CPU'}, {cpu.cores} "
            f"cores; flags: {', '.join(flags) or 'none of ' + ', '.join(SIMD_FLAGS)}; "
            f"torch {torch.__version__}; Python {platform.python_version()}.",
            f"Paths: the server and the direct calls compute in {dtype} with {threads} torch "
            "threads; clients are threads of the benchmark's process (the server runs in "
            "another), on the same machine, sharing its cores."]


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    dtype = resolve_dtype(args.dtype, "torch", "cpu")
    clients = [int(c) for c in args.clients.split(",")]
    names = args.models.split(",")
    lines = ["# Serving benchmark", "",
             f"`python benchmarks/serving.py{' --smoke' if args.smoke else ''}` on "
             f"{date.today()}.", *machine(dtype, args.threads),
             f"{args.requests} requests per client, one after another; times in ms, p50 unless "
             "named; overhead = the server's total time for a request minus the forward pass "
             "it rode in (Server-Timing).", ""]
    print("\n".join(lines), flush=True)
    targets = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, name in enumerate(names):
            side = MODELS[name][0]
            image = photo_jpeg(side)
            path = make_checkpoint(name, Path(tmp))
            d = direct(path, image, dtype, args.direct_runs)
            gain = d["b1"] / d["b16 per image"]
            print(f"== {name}: direct {d}", flush=True)
            lines += [f"## {name}, a {side}x{side} JPEG ({len(image) / 1024:.1f} KB)", "",
                      f"Direct: forward batch 1 {d['b1']:.2f} ms; batch 16 {d['b16 per image']:.2f}"
                      f" ms per image ({gain:.2f}x faster per image); decode + transform + "
                      f"forward batch 1 {d['whole b1']:.2f} ms.", "",
                      "| server | clients | client latency | p95 | server total | forward | "
                      "overhead | overhead p95 | mean batch | req/s | errors |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            served: dict[tuple[int, int], dict[str, float]] = {}
            memory_row = None
            for max_batch in (16, 1):
                server = Server(path, dtype, args.threads, max_batch)
                try:
                    for n in clients:
                        row = served[max_batch, n] = load(server.port, image, n, args.requests)
                        print(f"max-batch {max_batch}, {n} clients: "
                              + ", ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)
                        lines.append(
                            f"| --max-batch {max_batch} | {n} | {row['latency p50']:.1f} | "
                            f"{row['latency p95']:.1f} | {row['total p50']:.1f} | "
                            f"{row['forward p50']:.1f} | {row['overhead p50']:.1f} | "
                            f"{row['overhead p95']:.1f} | {row['batch']:.1f} | "
                            f"{row['rps']:.1f} | {row['errors']} |")
                    if max_batch == 16 and index == 0:
                        memory_row = memory(server, image, args.memory_requests)
                finally:
                    server.stop()
            lines.append("")
            if memory_row:
                before, after, codes = memory_row
                seen = ", ".join(f"{code}: {count}" for code, count in sorted(codes.items()))
                lines += [f"Server RSS after warm-up {before:.0f} MB; after "
                          f"{args.memory_requests} mixed good and bad requests {after:.0f} MB "
                          f"(+{after - before:.0f} MB). Status codes: {seen}.", ""]
            if (16, 1) in served:
                overhead = served[16, 1]["overhead p50"]
                targets.append(f"| server overhead p50, 1 client, {side}x{side} JPEG | {name} | "
                               f"{overhead:.1f} ms | {'yes' if overhead <= 10 else 'no'} |")
            if (16, 8) in served and (1, 8) in served:
                ratio = served[16, 8]["rps"] / served[1, 8]["rps"]
                met = "yes" if ratio >= 1.5 else "no"
                targets.append(f"| batching at 8 clients (batch 16 is {gain:.2f}x faster per "
                               f"image than batch 1 here) | {name} | {ratio:.2f}x | "
                               f"{met if gain > 1 else 'not a batching model here'} |")
    lines += ["## Against the targets", "",
              "| target: overhead <= 10 ms, batching >= 1.5x | model | this run | met |",
              "|---|---|---:|---|", *targets, ""]
    print("\n".join(["", "## Against the targets", *targets]), flush=True)
    if args.output:
        args.output.write_text("\n".join(lines) + "\n")
        print(f"written {args.output}")


if __name__ == "__main__":
    main()
