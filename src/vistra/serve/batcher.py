"""Dynamic batching: requests that arrive close together share one forward pass.

One model thread owns the model. It takes the first waiting input, then takes what else is
queued and, while more inputs are on their way (announced with `expect`: being received or
preprocessed), waits for them for at most `max_wait_s` (or until `max_batch` inputs); it
stacks them and
runs them as one batch, and each request's future receives its own row of the logits and
the pass it rode in. Under load, requests share the cost of a pass; a lone request does not
wait for company that is not coming. What that gains on a given machine is measured in
benchmarks/serving.md. Other work that must not overlap a forward pass is queued as a job
and runs alone on the same thread.
"""

from __future__ import annotations

import atexit
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch


class BatchPass(NamedTuple):
    """The forward pass a request rode in: how many images it held and how long it took."""

    size: int
    seconds: float


@dataclass
class _Item:
    future: Future
    input: torch.Tensor | None = None  # one image [C, H, W] to batch, or
    job: Callable[[], Any] | None = None  # work to run alone on the model thread


class Batcher:
    """Runs `model(batch [B, C, H, W]) -> logits [B, K]` on a thread of its own.

    `on_batch(size, seconds)` is told about every forward pass (for metrics). A batch waits
    for company only while some is announced (`expect`): a lone request does not wait.
    """

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor], max_batch: int,
                 max_wait_s: float,
                 on_batch: Callable[[int, float], None] = lambda size, seconds: None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be 1 or more, got {max_batch}")
        self.model = model
        self.max_batch = max_batch
        self.max_wait_s = max(0.0, max_wait_s)
        self.on_batch = on_batch
        self._expected = 0  # inputs announced and not yet queued (or withdrawn)
        self._expected_lock = threading.Lock()
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="vistra-model", daemon=True)
        self._thread.start()
        # A daemon thread killed inside a forward pass aborts the interpreter at exit.
        atexit.register(self.stop)

    def expect(self, count: int = 1) -> None:
        """Announce `count` inputs on their way (a negative count withdraws them): while any
        are, a batch waits up to `max_wait_s` for them. Any thread."""
        with self._expected_lock:
            self._expected += count

    def submit(self, image: torch.Tensor, expected: bool = False) -> Future:
        """Queue one preprocessed image (`expected`: one announced, which this withdraws);
        the future resolves to its logits [K] and the `BatchPass` that computed them."""
        item = _Item(Future(), input=image)
        self._queue.put(item)
        if expected:  # after the put: who reads no more expected finds it queued
            self.expect(-1)
        return item.future

    def call(self, job: Callable[[], Any]) -> Future:
        """Run `job()` on the model thread, between batches; the future holds its result."""
        item = _Item(Future(), job=job)
        self._queue.put(item)
        return item.future

    def depth(self) -> int:
        """Items waiting for the model thread (approximate, as any queue size)."""
        return self._queue.qsize()

    def stop(self, timeout: float = 5.0) -> None:
        """Finish what is queued, then end the thread."""
        atexit.unregister(self.stop)
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)

    def _serve(self) -> None:
        carried: _Item | None = None  # a job met while collecting a batch runs right after it
        while True:
            item = carried if carried is not None else self._queue.get()
            carried = None
            if item is None:
                return
            if item.job is not None:
                _run_job(item)
                continue
            batch = [item]
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch:
                # Read before the queue: what was expected then is queued by now.
                wait = self._expected > 0
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic())
                                          if wait else None, block=wait)
                except queue.Empty:
                    break
                if nxt is None or nxt.job is not None:
                    carried = nxt
                    break
                batch.append(nxt)
            self._run_batch(batch)

    def _run_batch(self, batch: list[_Item]) -> None:
        # Requests that timed out while waiting were cancelled: skip their work.
        live = [item for item in batch if item.future.set_running_or_notify_cancel()]
        if not live:
            return
        start = time.perf_counter()
        try:
            logits = self.model(torch.stack([item.input for item in live]))
        except Exception as error:  # the model failed: every request in the batch hears why
            for item in live:
                item.future.set_exception(error)
            return
        done = BatchPass(len(live), time.perf_counter() - start)
        self.on_batch(*done)
        for row, item in zip(logits, live, strict=True):
            item.future.set_result((row, done))


def _run_job(item: _Item) -> None:
    if not item.future.set_running_or_notify_cancel():
        return
    try:
        item.future.set_result(item.job())
    except Exception as error:
        item.future.set_exception(error)
