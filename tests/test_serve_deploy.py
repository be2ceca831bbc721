"""`vistra serve` for deployment: the dtype it computes in (bf16 answers as `vistra predict
--dtype bf16` does, heat maps still come from fp32), and what keeps slow or greedy clients
from holding the service: 408 for a body that stops arriving, 429 past the per-client limit.
(504 past --timeout-s, on every supported Python: test_serve.py.)"""

from __future__ import annotations

import asyncio
import json
import select
import socket
import time
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient
from serve_helpers import (
    count,
    fashion_images,
    running_server,
    scrape_metrics,
    slowed,
    tiny_checkpoint,
)

import vistra.accel.capabilities
import vistra.serve.service
from vistra.cli import main
from vistra.runtime import load_classifier
from vistra.serve import ServeSettings, create_app, server


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("deploy") / "tiny.safetensors")


@pytest.fixture(scope="module")
def fp32(checkpoint):
    return load_classifier(checkpoint, dtype="fp32")


@pytest.fixture(scope="module")
def bf16(checkpoint):
    return load_classifier(checkpoint, dtype="bf16")


def _client(classifier, **settings) -> TestClient:
    app = create_app(classifier, ServeSettings(**settings))
    assert app.state.service.ready.wait(30), "the model did not warm up"
    return TestClient(app)


# -- dtype ------------------------------------------------------------------------------------

def test_a_bf16_service_answers_as_vistra_predict_dtype_bf16_and_says_it_is_bf16(
        checkpoint, bf16, capsys):
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    paths = fashion_images(10)
    assert main(["predict", str(checkpoint), *map(str, paths), "--dtype", "bf16",
                 "--format", "json", "--topk", "1"]) == 0
    predicted = {Path(p["path"]).resolve(): p["topk"][0]["class"]
                 for p in json.loads(capsys.readouterr().out)}
    with _client(bf16) as client:
        served = {path.resolve(): client.post("/v1/predict?topk=1", content=path.read_bytes())
                  .json()["classes"][0]["class"] for path in paths}
        assert client.get("/v1/model").json()["dtype"] == "bf16"
        info = scrape_metrics(client)["vistra_model_info"]
    assert served == predicted
    assert count(info, "vistra_model_info", name="vit_fmnist", backend="torch",
                 dtype="bf16") == 1


def test_heat_maps_of_a_bf16_service_are_the_fp32_ones_from_a_copy_loaded_once_when_asked(
        fp32, bf16, monkeypatch):
    loads = []

    def counted_load(*args, **kwargs):
        loads.append(kwargs.get("dtype"))
        time.sleep(0.2)  # the requests below arrive while the first load is under way
        return load_classifier(*args, **kwargs)

    monkeypatch.setattr(vistra.serve.service, "load_classifier", counted_load)
    body = fashion_images(1)[0].read_bytes()
    with _client(fp32, explain=True) as client:
        method = client.get("/v1/model").json()["explain_methods"][0]
        url = f"/v1/predict?explain={method}"
        fp32_map = client.post(url, content=body).json()["explanation"]
    assert loads == []  # an fp32 service explains the model it serves

    app = create_app(bf16, ServeSettings(explain=True, explain_max_in_flight=3))
    assert app.state.service.ready.wait(30)
    assert loads == []  # nothing loaded before the first heat map is asked for

    async def three_at_once() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://serve") as client:
            return await asyncio.gather(*(client.post(url, content=body) for _ in range(3)))

    responses = asyncio.run(three_at_once())
    app.state.service.close()
    assert loads == ["fp32"]
    assert [r.json()["explanation"] for r in responses] == [fp32_map] * 3


@pytest.mark.parametrize("has_bf16", [True, False])
def test_cli_dtype_auto_takes_bf16_where_the_cpu_has_it_and_says_so(checkpoint, has_bf16,
                                                                     monkeypatch, capsys):
    monkeypatch.setattr(vistra.accel.capabilities, "cpu_has_bf16", lambda: has_bf16)
    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: apps.append(app))
    assert main(["serve", str(checkpoint), "--read-timeout-s", "2",
                 "--max-in-flight-per-client", "3"]) == 0
    [app] = apps
    service = app.state.service
    service.close()
    chosen = "bf16" if has_bf16 else "fp32"
    assert service.classifier.dtype == chosen
    assert service.settings.read_timeout_s == 2 and service.settings.max_in_flight_per_client == 3
    cpu = "has" if has_bf16 else "lacks"
    assert f"dtype: {chosen} (auto: this CPU {cpu} bf16 arithmetic)" in capsys.readouterr().err


def test_each_worker_process_loads_the_dtype_asked_for(checkpoint, monkeypatch):
    monkeypatch.setattr(uvicorn, "run", lambda *args, **options: None)
    monkeypatch.setenv("VISTRA_SERVE_CONFIG", "")  # restored after the test
    server.run(checkpoint, ServeSettings(read_timeout_s=2), workers=2, dtype="bf16")
    app = server.app_from_environment()  # what each worker process calls
    app.state.service.close()
    assert app.state.service.classifier.dtype == "bf16"
    assert app.state.service.settings.read_timeout_s == 2


def test_cli_refuses_bf16_for_an_onnx_file(tmp_path, capsys):
    model = tmp_path / "model.onnx"
    model.write_bytes(b"not read: the choice is refused first")
    assert main(["serve", str(model), "--dtype", "bf16"]) == 2
    assert "--dtype bf16 is for the torch backend" in capsys.readouterr().err


# -- slow and greedy clients ------------------------------------------------------------------

def _answer(sock: socket.socket) -> bytes:
    """The HTTP response on a raw socket: its head and the body its Content-Length gives."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536) or b"\r\n\r\n"
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def test_a_client_that_stops_sending_mid_body_gets_408_while_another_is_served(fp32):
    app = create_app(fp32, ServeSettings(read_timeout_s=1.5))
    body = fashion_images(1)[0].read_bytes()
    with running_server(app) as base:
        assert httpx.get(f"{base}/readyz", timeout=30).status_code == 200
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as stalled:
            stalled.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: serve\r\nContent-Type: "
                            b"image/png\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:100])
            sent = time.perf_counter()
            other = httpx.post(f"{base}/v1/predict", content=body, timeout=10)
            assert other.status_code == 200
            assert select.select([stalled], [], [], 0)[0] == []  # still waiting for its body
            answer = _answer(stalled)
            waited = time.perf_counter() - sent
        with httpx.Client(base_url=base) as http:
            metrics = scrape_metrics(http)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b"no part of the request body arrived for 1.5 s" in answer
    assert 1.4 < waited < 5
    assert count(metrics["vistra_upload_read_timeouts"], "vistra_upload_read_timeouts_total") == 1
    assert count(metrics["vistra_http_requests"], "vistra_http_requests_total",
                 path="/v1/predict", code="408") == 1


def test_a_client_past_max_in_flight_per_client_gets_429_while_others_are_served(fp32):
    app = create_app(slowed(fp32, 0.3), ServeSettings(max_in_flight_per_client=2, max_batch=1))
    assert app.state.service.ready.wait(30)
    body = fashion_images(1)[0].read_bytes()

    def client_at(address: str) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=app, client=(address, 50000))
        return httpx.AsyncClient(transport=transport, base_url="http://serve")

    async def greedy_and_polite() -> tuple[list[httpx.Response], list[httpx.Response]]:
        async with client_at("10.0.0.1") as greedy, client_at("10.0.0.2") as polite:
            return await asyncio.gather(
                asyncio.gather(*(greedy.post("/v1/predict", content=body) for _ in range(4))),
                asyncio.gather(*(polite.post("/v1/predict", content=body) for _ in range(2))))

    greedy, polite = asyncio.run(greedy_and_polite())
    with TestClient(app) as client:
        metrics = scrape_metrics(client)
    assert sorted(r.status_code for r in greedy) == [200, 200, 429, 429]
    assert [r.status_code for r in polite] == [200, 200]
    refused = next(r for r in greedy if r.status_code == 429)
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["detail"].startswith("2 requests from 10.0.0.1 are already in progress")
    assert count(metrics["vistra_client_limit_refusals"],
                 "vistra_client_limit_refusals_total") == 2
    assert app.state.service.in_flight_by_client == {}  # every place given back
