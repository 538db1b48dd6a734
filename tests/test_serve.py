"""The HTTP API: predictions, every kind of bad input, size and concurrency limits, bind safety."""

from __future__ import annotations

import io
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from _server import running_server
from conftest import CLASS_COLOURS, make_image, make_image_folder
from fastapi.testclient import TestClient
from PIL import Image

import imgclf
from imgclf.cli import main
from imgclf.errors import ConfigError
from imgclf.serve import ServeSettings, create_app
from imgclf.serve.server import check_bind, is_loopback

LIMIT = 200_000  # bytes; small so oversized bodies are cheap to send


def png_bytes(class_index: int, seed: int = 1, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    make_image(CLASS_COLOURS[class_index], np.random.default_rng(seed)).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def model(tiny_bundle: Path) -> imgclf.Model:
    return imgclf.load(tiny_bundle)


@pytest.fixture(scope="module")
def client(model: imgclf.Model):
    app = create_app(model, settings=ServeSettings(runtime="torch", max_body_bytes=LIMIT, max_files=4))
    with TestClient(app) as test_client:
        deadline = time.monotonic() + 60
        while test_client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, "warm-up did not finish"
            time.sleep(0.05)
        yield test_client


def assert_still_serving(client: TestClient) -> None:
    assert client.get("/health").json()["status"] == "ok"
    response = client.post("/predict", content=png_bytes(1), headers={"content-type": "image/png"})
    assert response.status_code == 200
    assert response.json()["predictions"][0]["label"] == "class_1"


def test_info_endpoints(client: TestClient) -> None:
    assert client.get("/health").status_code == 200
    ready = client.get("/ready").json()
    assert ready == {"ready": True, "runtime": "torch"}
    assert client.get("/labels").json() == {"labels": ["class_0", "class_1", "class_2"]}
    meta = client.get("/metadata").json()
    assert meta["num_classes"] == 3 and meta["preprocessing"]["image_size"] == 32
    assert meta["limits"]["max_body_bytes"] == LIMIT
    assert "/predict" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200


def test_predict_multipart_many_files(client: TestClient, tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "imgs", per_class=1, seed=7)
    files = [("file", (p.name, p.read_bytes(), "image/png")) for p in sorted(folder.rglob("*.png"))]
    response = client.post("/predict", files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert [p["label"] for p in body["predictions"]] == ["class_0", "class_1", "class_2"]
    top = body["predictions"][0]["top_k"]
    assert len(top) == 3 and abs(sum(t["probability"] for t in top) - 1) < 1e-4
    assert body["model_ms"] >= 0 and body["total_ms"] >= body["model_ms"]


def test_predict_raw_body_matches_library(client: TestClient, model: imgclf.Model) -> None:
    data = png_bytes(2, seed=3)
    response = client.post("/predict", content=data, headers={"content-type": "application/octet-stream"})
    assert response.status_code == 200
    served = response.json()["predictions"][0]
    local = model.predict(Image.open(io.BytesIO(data)), runtime="torch")[0]
    assert served["label"] == local.label == "class_2"
    assert served["probability"] == pytest.approx(local.probability, abs=1e-5)


def _truncated_jpeg() -> bytes:
    data = png_bytes(0, fmt="JPEG")
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        (b"\x00garbage bytes, not an image" * 10, "image/png", 415),
        (b"", "image/jpeg", 422),
        (png_bytes(0), "text/plain", 415),
        (png_bytes(0), None, 415),
        (b'{"url": "http://127.0.0.1/x.png"}', "application/json", 415),
        (_truncated_jpeg(), "image/jpeg", 422),
        (b"\xff\xd8\xff\xe0" + b"\x13" * 400, "image/jpeg", 422),  # JPEG magic, then junk
    ],
    ids=["garbage", "empty", "text-plain", "no-content-type", "json-url", "truncated-jpeg", "corrupt-jpeg-header"],
)
def test_bad_input_gets_json_4xx(client: TestClient, body: bytes, content_type: str | None, status: int) -> None:
    headers = {"content-type": content_type} if content_type else {}
    response = client.post("/predict", content=body, headers=headers)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["status"] == status and response.json()["error"]
    assert_still_serving(client)


def test_multipart_without_files_or_with_too_many(client: TestClient) -> None:
    response = client.post("/predict", files={"note": (None, "no file here")})  # multipart, no file part
    assert response.status_code == 422 and "no files" in response.json()["error"]
    files = [("file", (f"{i}.png", png_bytes(0), "image/png")) for i in range(5)]  # max_files is 4
    response = client.post("/predict", files=files)
    assert response.status_code == 400 and response.json()["error"]
    assert_still_serving(client)


def test_corrupt_file_among_good_ones_names_it(client: TestClient) -> None:
    files = [("file", ("good.png", png_bytes(0), "image/png")), ("file", ("bad.jpg", _truncated_jpeg(), "image/jpeg"))]
    response = client.post("/predict", files=files)
    assert response.status_code == 422 and response.json()["error"].startswith("bad.jpg:")


def test_oversized_body_is_413(client: TestClient) -> None:
    response = client.post("/predict", content=b"\xff" * (LIMIT + 1), headers={"content-type": "image/jpeg"})
    assert response.status_code == 413 and response.json()["limit_bytes"] == LIMIT
    assert_still_serving(client)


def test_oversized_chunked_body_is_413(client: TestClient) -> None:
    sent = []

    def chunks():
        for _ in range(100):  # 100 x 10 kB = 5x the limit, if it were all read
            sent.append(1)
            yield b"\xff" * 10_000

    response = client.post("/predict", content=chunks(), headers={"content-type": "image/jpeg"})
    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert response.status_code == 413 and response.json()["status"] == 413
    assert_still_serving(client)


def test_overload_gets_fast_503_while_health_answers(client: TestClient) -> None:
    gate = client.app.state.gate
    held = 0
    while gate.try_enter():  # take every slot, as long-running requests would
        held += 1
    try:
        start = time.perf_counter()
        response = client.post("/predict", content=png_bytes(0), headers={"content-type": "image/png"})
        seconds = time.perf_counter() - start
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert seconds < 0.5, f"a refusal should be immediate, took {seconds:.2f} s"
        assert client.get("/health").status_code == 200
    finally:
        for _ in range(held):
            gate.leave()
    assert_still_serving(client)


def test_not_ready_before_warm_up(model: imgclf.Model) -> None:
    app = create_app(model, settings=ServeSettings(runtime="torch"))
    test_client = TestClient(app)  # no `with`: the lifespan (and so the warm-up) never runs
    assert test_client.get("/health").status_code == 200
    ready = test_client.get("/ready")
    assert ready.status_code == 503 and ready.json() == {"ready": False} and "retry-after" in ready.headers
    response = test_client.post("/predict", content=png_bytes(0), headers={"content-type": "image/png"})
    assert response.status_code == 503


def test_page_is_served_with_a_strict_policy(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "<title>imgclf</title>" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200


def test_real_server_refuses_a_chunked_flood_and_keeps_serving(model: imgclf.Model) -> None:
    app = create_app(model, settings=ServeSettings(runtime="torch", max_body_bytes=LIMIT))
    with running_server(app) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            chunk = b"\xff" * 65_536
            sent = 0
            try:
                while sent < 20 * LIMIT:  # stop early only if the server cuts us off
                    conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    sent += len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass
            reply = b""
            try:
                while b"\r\n\r\n" not in reply:
                    data = conn.recv(65_536)
                    if not data:
                        break
                    reply += data
            except ConnectionResetError:
                pass
        assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
        assert httpx.get(f"{url}/health").status_code == 200
        response = httpx.post(f"{url}/predict", content=png_bytes(2), headers={"content-type": "image/png"})
        assert response.status_code == 200 and response.json()["predictions"][0]["label"] == "class_2"


def test_bind_is_loopback_unless_allowed(capsys: pytest.CaptureFixture[str]) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0")
    check_bind("127.0.0.1", allow_remote=False)
    with pytest.raises(ConfigError, match="--allow-remote"):
        check_bind("0.0.0.0", allow_remote=False)
    check_bind("0.0.0.0", allow_remote=True)
    assert "warning" in capsys.readouterr().err


def test_cli_serve_refuses_remote_bind_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The bundle folder does not exist: the bind check must fail first, with exit code 2.
    assert main(["serve", str(tmp_path / "missing"), "--host", "0.0.0.0"]) == 2
    assert "--allow-remote" in capsys.readouterr().err


def test_micro_batcher_merges_queued_requests() -> None:
    import asyncio
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from imgclf.serve.batching import MicroBatcher

    release = threading.Event()
    calls: list[int] = []

    def predict(batch: torch.Tensor) -> np.ndarray:
        release.wait(5)  # the first call blocks until every request is queued
        calls.append(len(batch))
        return batch[:, 0, 0, 0].float().numpy()[:, None]  # echo a per-image id

    async def run() -> list[np.ndarray]:
        batcher = MicroBatcher(predict, ThreadPoolExecutor(1), max_images=3)
        batches = [torch.full((n, 3, 2, 2), i, dtype=torch.uint8) for i, n in enumerate([1, 1, 2, 1, 1])]
        tasks = [asyncio.create_task(batcher.submit(b)) for b in batches]
        await asyncio.sleep(0.05)
        release.set()
        return await asyncio.gather(*tasks)

    results = asyncio.run(run())
    # All five are queued before the first pass starts; they go in order, at most 3 images a pass.
    assert calls == [2, 3, 1]
    assert [r[:, 0].tolist() for r in results] == [[0], [1], [2, 2], [3], [4]]


# --------------------------------------------------------------------------------------------
# POST /explain (issue 18) and refused bodies every client can read


def test_explain_answers_a_png_for_a_raw_body(client: TestClient) -> None:
    response = client.post("/explain", content=png_bytes(1), headers={"content-type": "image/png"})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.headers["x-imgclf-predicted"] == "class_1" == response.headers["x-imgclf-target"]
    assert response.headers["x-imgclf-runtime"] == "torch"
    with Image.open(io.BytesIO(response.content)) as png:
        assert png.format == "PNG" and png.width == 512  # the image and its overlay, 256 px each


def test_explain_json_for_several_files_matches_predict(client: TestClient) -> None:
    import base64

    files = [("file", (f"{c}.png", png_bytes(c), "image/png")) for c in (0, 2)]
    body = client.post("/explain?format=json&method=gradcam%2B%2B", files=files).json()
    labels = [p["label"] for p in client.post("/predict", files=files).json()["predictions"]]
    assert [e["predicted"] for e in body["explanations"]] == labels == ["class_0", "class_2"]
    assert body["runtime"] == "torch" and body["note"] is None
    for item in body["explanations"]:
        assert item["method"] == "gradcam++" and item["layer"] == "bn2"
        with Image.open(io.BytesIO(base64.b64decode(item["png_base64"]))) as png:
            assert png.format == "PNG"
    chosen = client.post("/explain?format=json&class=class_2", files=files[:1]).json()["explanations"][0]
    assert chosen["target"] == "class_2" and chosen["predicted"] == "class_0"


@pytest.mark.parametrize(("query", "files", "status", "message"), [
    ("?class=class_9", 1, 422, "unknown class 'class_9'"),
    ("?method=lime", 1, 422, "unknown method"),
    ("?format=gif", 1, 422, "unknown format"),
    ("", 2, 422, "format=png answers one image"),
])
def test_explain_bad_requests(client: TestClient, query: str, files: int, status: int, message: str) -> None:
    sent = [("file", (f"{c}.png", png_bytes(c), "image/png")) for c in range(files)]
    response = client.post("/explain" + query, files=sent)
    assert response.status_code == status and message in response.json()["error"]


def test_explain_has_the_limits_of_predict(client: TestClient) -> None:
    corrupt = client.post("/explain", content=_truncated_jpeg(), headers={"content-type": "image/jpeg"})
    assert corrupt.status_code == 422 and corrupt.json()["error"].startswith("body:")
    big = client.post("/explain", content=b"\xff" * (LIMIT + 1), headers={"content-type": "image/jpeg"})
    assert big.status_code == 413 and big.json()["limit_bytes"] == LIMIT
    gate = client.app.state.gate
    held = 0
    while gate.try_enter():
        held += 1
    try:
        busy = client.post("/explain", content=png_bytes(0), headers={"content-type": "image/png"})
        assert busy.status_code == 503
    finally:
        for _ in range(held):
            gate.leave()
    assert_still_serving(client)


def test_explain_says_when_the_server_predicts_without_gradients(model: imgclf.Model) -> None:
    pytest.importorskip("openvino")
    app = create_app(model, settings=ServeSettings(runtime="openvino"))
    with running_server(app) as url:
        body = httpx.post(f"{url}/explain?format=json", content=png_bytes(2), headers={"content-type": "image/png"},
                          timeout=60).json()
    assert body["runtime"] == "torch" and "openvino, which cannot backpropagate" in body["note"]
    assert body["explanations"][0]["predicted"] == "class_2"


@pytest.mark.parametrize("path", ["/predict", "/explain"])
@pytest.mark.parametrize("chunked", [False, True])
def test_urllib_reads_the_413_of_a_large_body(model: imgclf.Model, path: str, chunked: bool) -> None:
    """Python's urllib sends the whole body before it reads a byte of the answer: the server must
    read (and drop) the refused body instead of closing on it, or urllib sees the connection reset."""
    import json
    import urllib.error
    import urllib.request

    app = create_app(model, settings=ServeSettings(runtime="torch", max_body_bytes=LIMIT))
    size = 32 * 2**20  # far beyond the socket buffers, so a close mid-body would reset the connection
    body: Any = (b"\xff" * 2**20 for _ in range(size // 2**20)) if chunked else b"\xff" * size
    with running_server(app) as url:
        request = urllib.request.Request(url + path, data=body, method="POST",
                                         headers={"Content-Type": "image/jpeg"})
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=60)
        assert caught.value.code == 413
        assert json.loads(caught.value.read())["limit_bytes"] == LIMIT
        assert httpx.get(f"{url}/health").status_code == 200
