"""`vistra serve`: an HTTP classification service with batching, limits, health checks,
Prometheus metrics and an offline web page.

`create_app(classifier, settings)` builds the FastAPI app; `run(model_path, settings, ...)`
serves a model file under uvicorn. Both import FastAPI, so they load on first use: the rest
of vistra (and `vistra --help`) does not pay for the web stack.
"""

from typing import Any

from vistra.serve.settings import ServeSettings

__all__ = ["ServeSettings", "create_app", "load_app", "run"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from vistra.serve.app import create_app

        return create_app
    if name in ("load_app", "run"):
        from vistra.serve import server

        return getattr(server, name)
    raise AttributeError(f"module 'vistra.serve' has no attribute {name!r}")
