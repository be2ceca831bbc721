"""Run the service under uvicorn: in this process, or in `workers` processes that each load
the model (uvicorn starts them from an import string, so the settings travel by environment)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI

from vistra.accel import resolve_device, resolve_dtype
from vistra.runtime import Classifier, load_classifier, resolve_backend
from vistra.serve.app import create_app
from vistra.serve.settings import ServeSettings

_ENV = "VISTRA_SERVE_CONFIG"


def load_app(model: str | os.PathLike, settings: ServeSettings, threads: int | None = None,
             dtype: str = "fp32", on_load: Callable[[Classifier], None] | None = None,
             device: str | None = "cpu") -> FastAPI:
    """Load the model file and build its service; `threads` sets torch's intra-op threads.
    dtype: fp32, bf16, fp16 or auto, as `vistra.runtime.load_classifier` takes it (an .onnx
    file computes in what it was exported in); `on_load` is called with the classifier
    loaded. device: where a torch model runs (None: cuda if there is one, else cpu)."""
    import torch

    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be 1 or more, got {threads}")
        torch.set_num_threads(threads)
    if not Path(model).is_file():
        raise FileNotFoundError(f"model file {model} not found; pass a .safetensors checkpoint "
                                "written by `vistra train` (or an exported .onnx)")
    classifier = load_classifier(model, str(resolve_device(device)), dtype=dtype)
    if on_load is not None:
        on_load(classifier)
    return create_app(classifier, settings)


def app_from_environment() -> FastAPI:
    """The factory each uvicorn worker process calls."""
    config = json.loads(os.environ[_ENV])
    return load_app(config["model"], ServeSettings(**config["settings"]), config["threads"],
                    config["dtype"], device=config["device"])


def run(model: str | os.PathLike, settings: ServeSettings, host: str = "127.0.0.1",
        port: int = 8000, workers: int = 1, threads: int | None = None, dtype: str = "fp32",
        on_load: Callable[[Classifier], None] | None = None, device: str | None = "cpu"
        ) -> None:
    """Serve until interrupted. dtype, on_load and device: see `load_app`; with several
    workers each loads its own copy (on the same device) and `on_load` is not called (it
    cannot travel to their processes)."""
    import uvicorn

    if workers < 1:
        raise ValueError(f"--workers must be 1 or more, got {workers}")
    if workers == 1:
        uvicorn.run(load_app(model, settings, threads, dtype, on_load, device), host=host,
                    port=port)
        return
    if not Path(model).is_file():
        raise FileNotFoundError(f"model file {model} not found")
    # Refused here (bf16 for an .onnx file, a device not there) rather than once per worker.
    device = str(resolve_device(device))
    resolve_dtype(dtype, resolve_backend(model), device)
    os.environ[_ENV] = json.dumps({"model": str(Path(model).resolve()), "threads": threads,
                                   "dtype": dtype, "device": device,
                                   "settings": dataclasses.asdict(settings)})
    uvicorn.run("vistra.serve.server:app_from_environment", factory=True, host=host, port=port,
                workers=workers)
