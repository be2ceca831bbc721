"""Shared by the serve tests: a small Fashion-MNIST checkpoint, real images, a real
uvicorn server on 127.0.0.1 in a thread, a slowed classifier, the metrics as numbers, and
asyncio as Python 3.10 has it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path

import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from vistra import create_model
from vistra.data import bundled_demo_dir
from vistra.weights import save_checkpoint

FASHION = bundled_demo_dir()
CLASSES = sorted(p.name for p in (FASHION / "test").iterdir())


def tiny_checkpoint(path: Path) -> Path:
    """A freshly built small ViT for 28x28 grey images with the ten Fashion-MNIST classes.
    Untrained, but with a sharpened head so each image gets its own clear probabilities
    (a mix-up between two requests shows)."""
    torch.manual_seed(0)
    model = create_model("vit_fmnist", conv_stem=(), patch_size=7, embed_dim=32, depth=1,
                         num_heads=2, num_classes=len(CLASSES))
    with torch.no_grad():
        model.head.weight.mul_(30)
    save_checkpoint(model, path, classes=CLASSES)
    return path


def fashion_images(count: int) -> list[Path]:
    """`count` test images, spread over the classes."""
    per_class = [sorted((FASHION / "test" / name).iterdir()) for name in CLASSES]
    return [per_class[i % len(CLASSES)][i // len(CLASSES)] for i in range(count)]


@contextlib.contextmanager
def running_server(app) -> Iterator[str]:
    """Serve `app` with uvicorn on 127.0.0.1 and a free port; yields the base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def slowed(classifier, seconds: float):
    """The classifier, taking `seconds` longer for each forward pass."""
    def run(batch):
        time.sleep(seconds)
        return classifier.run(batch)
    return dataclasses.replace(classifier, run=run)


def scrape_metrics(client) -> dict[str, list]:
    """GET /metrics through an httpx or test client: each family's samples by its name."""
    families = text_string_to_metric_families(client.get("/metrics").text)
    return {family.name: family.samples for family in families}


def count(samples, sample: str, /, **labels) -> float:
    """The sum of the samples called `sample` that carry `labels`."""
    return sum(s.value for s in samples if s.name == sample
               and all(s.labels.get(k) == v for k, v in labels.items()))


class Python310TimeoutError(Exception):
    """What `asyncio.wait_for` raises on Python 3.10: asyncio's own TimeoutError, which is
    not the builtin one there (it is from 3.11 on)."""


def asyncio_of_python_310() -> types.SimpleNamespace:
    """The asyncio module as Python 3.10 has it, for a module's time-outs (monkeypatch its
    `asyncio`): `TimeoutError` its own class, and `wait_for` raising it."""
    async def wait_for(awaitable, timeout):
        try:
            return await asyncio.wait_for(awaitable, timeout)
        except TimeoutError as error:
            raise Python310TimeoutError() from error

    return types.SimpleNamespace(**{**vars(asyncio), "wait_for": wait_for,
                                    "TimeoutError": Python310TimeoutError})
