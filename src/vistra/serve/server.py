"""Run the service under uvicorn: in this process, or in `workers` processes that each load
the model (uvicorn starts them from an import string, so the settings travel by environment)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from fastapi import FastAPI

from vistra.serve.app import create_app
from vistra.serve.settings import ServeSettings

_ENV = "VISTRA_SERVE_CONFIG"


def load_app(model: str | os.PathLike, settings: ServeSettings,
             threads: int | None = None) -> FastAPI:
    """Load the model file and build its service; `threads` sets torch's intra-op threads."""
    import torch

    from vistra.runtime import load_classifier

    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be 1 or more, got {threads}")
        torch.set_num_threads(threads)
    if not Path(model).is_file():
        raise FileNotFoundError(f"model file {model} not found; pass a .safetensors checkpoint "
                                "written by `vistra train` (or an exported .onnx)")
    return create_app(load_classifier(model), settings)


def app_from_environment() -> FastAPI:
    """The factory each uvicorn worker process calls."""
    config = json.loads(os.environ[_ENV])
    return load_app(config["model"], ServeSettings(**config["settings"]), config["threads"])


def run(model: str | os.PathLike, settings: ServeSettings, host: str = "127.0.0.1",
        port: int = 8000, workers: int = 1, threads: int | None = None) -> None:
    """Serve until interrupted."""
    import uvicorn

    if workers < 1:
        raise ValueError(f"--workers must be 1 or more, got {workers}")
    if workers == 1:
        uvicorn.run(load_app(model, settings, threads), host=host, port=port)
        return
    if not Path(model).is_file():
        raise FileNotFoundError(f"model file {model} not found")
    os.environ[_ENV] = json.dumps({"model": str(Path(model).resolve()), "threads": threads,
                                   "settings": dataclasses.asdict(settings)})
    uvicorn.run("vistra.serve.server:app_from_environment", factory=True, host=host, port=port,
                workers=workers)
