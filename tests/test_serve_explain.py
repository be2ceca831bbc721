"""Heat maps in `vistra serve` cannot starve prediction: they are drawn one at a time on a
thread and a model copy of their own, at most --explain-max-in-flight are admitted (more get
503), and each has --explain-timeout-s (504, and the map stops at its next model call).
`?explain=` (empty) and `?explain=default` use the model's default method. An .onnx model
offers the methods that only run it (occlusion, RISE), under the same limits, and defaults
to the one recorded for it if it is one of those."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import logging
import threading
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from serve_helpers import (
    asyncio_of_python_310,
    count,
    fashion_images,
    running_server,
    scrape_metrics,
    tiny_checkpoint,
)
from test_explain_choose import a_choice

import vistra.serve.service
from vistra.data.images import load_rgb
from vistra.explain import explain, overlay
from vistra.onnx import export_checkpoint, quantize_int8
from vistra.runtime import load_classifier
from vistra.serve import ServeSettings, create_app
from vistra.weights import save_explain_choice

BODY = fashion_images(1)[0].read_bytes()


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return load_classifier(tiny_checkpoint(tmp_path_factory.mktemp("explain") / "tiny.safetensors"))


def _app(classifier, **settings):
    app = create_app(classifier, ServeSettings(explain=True, **settings))
    assert app.state.service.ready.wait(30), "the model did not warm up"
    return app


def test_explain_empty_or_default_uses_the_models_default_and_v1_model_names_it(classifier,
                                                                                monkeypatch):
    # Whatever vistra.explain.default_method answers (a choice recorded in the card, or the
    # family's), not a default of the service's own.
    monkeypatch.setattr(vistra.serve.service, "default_method", lambda model: "gradient")
    with TestClient(_app(classifier)) as client:
        info = client.get("/v1/model").json()
        assert info["explain_default"] == "gradient"
        assert info["explain_methods"][0] == "gradient"  # the page preselects it
        assert info["explain_max_in_flight"] == 2 and info["explain_timeout_s"] == 30
        for query in ("explain=", "explain=default"):
            response = client.post(f"/v1/predict?{query}", content=BODY)
            assert response.status_code == 200, response.text
            assert response.json()["explanation"]["method"] == "gradient"
        response = client.post("/v1/predict?explain=nonsense", content=BODY)
        assert response.status_code == 400 and "(or default)" in response.json()["detail"]


def test_while_a_heat_map_holds_the_limit_predictions_are_served_and_another_map_gets_503(
        classifier):
    app = _app(classifier, explain_max_in_flight=1)
    service = app.state.service
    drawing, release = threading.Event(), threading.Event()

    def held(module, inputs):  # the heat map's model call waits until released
        drawing.set()
        release.wait(30)

    service.explain_model().register_forward_pre_hook(held)

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://serve",
                                     timeout=30) as client:
            first = asyncio.create_task(client.post("/v1/predict?explain=", content=BODY))
            while not drawing.is_set():
                await asyncio.sleep(0.01)
            started = time.perf_counter()
            plain = await client.post("/v1/predict", content=BODY)
            plain_seconds = time.perf_counter() - started
            second = await client.post("/v1/predict?explain=default", content=BODY)
            still_drawing = not first.done()
            release.set()
            return await first, plain, plain_seconds, second, still_drawing

    try:
        first, plain, plain_seconds, second, still_drawing = asyncio.run(scenario())
    finally:
        release.set()
    # well under the 30 s the held map would take: it did not wait behind it
    assert still_drawing and plain.status_code == 200 and plain_seconds < 10
    assert second.status_code == 503 and second.headers["retry-after"] == "1"
    assert "1 heat maps are already being drawn" in second.json()["detail"]
    assert first.status_code == 200 and "explanation" in first.json()
    with TestClient(app) as client:
        metrics = scrape_metrics(client)
    assert count(metrics["vistra_explain_refusals"], "vistra_explain_refusals_total") == 1
    assert metrics["vistra_explains_in_flight"][0].value == 0
    assert service.explains_in_flight == 0 and service.in_flight == 0


@pytest.mark.parametrize("python", ["3.11+", "3.10"])
def test_a_heat_map_past_its_time_gets_504_stops_and_the_service_lives_on(classifier, python,
                                                                          monkeypatch):
    if python == "3.10":  # asyncio.wait_for raises asyncio's TimeoutError, not the builtin
        monkeypatch.setattr(vistra.serve.service, "asyncio", asyncio_of_python_310())
    app = _app(classifier, explain_timeout_s=0.3)
    service = app.state.service
    calls = []

    def slow(module, inputs):  # every model call of the heat map takes 0.4 s
        calls.append(time.perf_counter())
        time.sleep(0.4)

    service.explain_model().register_forward_pre_hook(slow)
    with TestClient(app) as client:
        started = time.perf_counter()
        response = client.post("/v1/predict?explain=occlusion", content=BODY)
        waited = time.perf_counter() - started
        assert response.status_code == 504, response.text
        assert response.json()["detail"] == (
            "no heat map by occlusion within 0.3 s (the service's --explain-timeout-s); ask "
            "?explain=lrp (one backward pass), or without ?explain for the classes alone")
        assert waited < 5  # the limit is 0.3 s; the map would run on for seconds
        # Occlusion calls the model again and again: past its time it stops at the next
        # call, freeing the explain thread.
        service.explainer.submit(lambda: None).result(5)
        calls_then = len(calls)
        time.sleep(0.5)
        assert len(calls) == calls_then <= 2
        assert client.post("/v1/predict", content=BODY).status_code == 200
        assert client.get("/healthz").status_code == 200
        metrics = scrape_metrics(client)
    assert count(metrics["vistra_explain_timeouts"], "vistra_explain_timeouts_total") == 1
    assert count(metrics["vistra_http_requests"], "vistra_http_requests_total",
                 path="/v1/predict", code="504") == 1


# -- an exported .onnx model ------------------------------------------------------------------

@pytest.fixture(scope="module")
def onnx_file(classifier, tmp_path_factory):
    path = tmp_path_factory.mktemp("explain-onnx") / "tiny.onnx"
    export_checkpoint(classifier.source, path)
    return path


@pytest.fixture(scope="module")
def int8_file(onnx_file):
    return quantize_int8(onnx_file, onnx_file.with_name("tiny.int8.onnx"))


def _pixels(png: Image.Image) -> np.ndarray:
    return np.asarray(png.convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("kind", ["fp32", "int8"])
def test_an_onnx_model_offers_occlusion_and_rise_and_draws_vistra_explains_map(kind, request):
    onnx_file = request.getfixturevalue("onnx_file" if kind == "fp32" else "int8_file")
    served = load_classifier(onnx_file)
    assert served.dtype == kind and served.model is None
    with running_server(_app(served)) as url, \
            httpx.Client(base_url=url, timeout=60) as client:
        info = client.get("/v1/model").json()
        answers = {query: client.post(f"/v1/predict?explain={query}", content=BODY)
                   for query in ("occlusion", "", "gradcam")}
    assert info["backend"] == "onnx" and info["explain_unavailable"] is None
    assert info["explain_methods"] == ["occlusion", "rise"]
    assert info["explain_default"] == "occlusion"
    refused = answers["gradcam"]
    assert refused.status_code == 400, refused.text
    assert "'gradcam' does not apply" in refused.json()["detail"]
    assert "offers occlusion, rise" in refused.json()["detail"]
    # The same map as the library draws for the file and the image, on the same overlay.
    image = load_rgb(fashion_images(1)[0])
    expected = explain(load_classifier(onnx_file), image, method="occlusion")
    drawn = _pixels(overlay(image, expected, caption=False))
    for query in ("occlusion", ""):
        assert answers[query].status_code == 200, answers[query].text
        got = answers[query].json()["explanation"]
        assert got["method"] == "occlusion" and got["target"] == expected.target
        assert got["label"] == expected.label
        assert got["probability"] == pytest.approx(expected.probability, abs=1e-5)
        served = Image.open(io.BytesIO(base64.b64decode(got["overlay_png"])))
        assert np.abs(_pixels(served) - drawn).max() <= 1


def test_an_onnx_heat_map_past_its_time_gets_504_and_stops(onnx_file):
    onnx = load_classifier(onnx_file)
    calls = []

    def slow_heat_maps(batch):  # each model call of a heat map takes 0.4 s, predictions not
        if threading.current_thread().name.startswith("vistra-explain"):
            calls.append(time.perf_counter())
            time.sleep(0.4)
        return onnx.run(batch)

    app = _app(dataclasses.replace(onnx, run=slow_heat_maps), explain_timeout_s=0.3)
    with running_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        started = time.perf_counter()
        response = client.post("/v1/predict?explain=rise", content=BODY)
        waited = time.perf_counter() - started
        assert response.status_code == 504, response.text
        assert response.json()["detail"] == (
            "no heat map by rise within 0.3 s (the service's --explain-timeout-s); ask "
            "?explain=occlusion (169 forwards, RISE's 1000), or without ?explain for the "
            "classes alone")
        assert waited < 5  # the limit is 0.3 s; the map would run on for seconds
        app.state.service.explainer.submit(lambda: None).result(5)
        calls_then = len(calls)
        time.sleep(0.5)
        assert len(calls) == calls_then <= 2
        assert client.post("/v1/predict", content=BODY).status_code == 200


@pytest.mark.parametrize("recorded, default, why", [
    ("rise", "rise", "recorded by vistra train on 4 images of somewhere"),
    ("lrp", "occlusion", "the checkpoint's recorded choice lrp needs the PyTorch model"),
])
def test_an_onnx_model_defaults_to_the_recorded_method_it_can_run(classifier, tmp_path, caplog,
                                                                   recorded, default, why):
    chosen = save_explain_choice(classifier.source, a_choice(recorded, by="vistra train"),
                                 tmp_path / "chosen.safetensors")
    onnx_file = export_checkpoint(chosen, tmp_path / "chosen.onnx").path
    with caplog.at_level(logging.INFO, "vistra.serve"), \
            TestClient(_app(load_classifier(onnx_file))) as client:
        info = client.get("/v1/model").json()
        response = client.post("/v1/predict?explain=default", content=BODY)
    assert info["explain_default"] == default and info["explain_methods"][0] == default
    assert response.status_code == 200, response.text
    assert response.json()["explanation"]["method"] == default
    assert f"heat maps: method {default} by default, " in caplog.text and why in caplog.text
