"""`lenet serve`: the JSON API (happy paths and every hostile input), the CLI's errors, and
a real uvicorn on a free port."""
from __future__ import annotations

import base64
import io
import json
import logging
import socket
import struct
import threading
import time
import zlib

import httpx2
import numpy as np
import pytest
from PIL import Image, ImageDraw
from starlette.testclient import TestClient

from lenet import cli, serve
from lenet.data import sources
from test_report import FASHION, trained_tiny_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def models(run):
    return [serve.load_served(run)]


@pytest.fixture(scope="module")
def test_split(models):
    return sources.load(models[0].run.config.data.name, download=False).test


@pytest.fixture(scope="module")
def client(models, test_split):
    app = serve.create_app(models + models, test_split)  # two runs: the same one twice
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def drawing() -> bytes:
    """A dark stroke on white, as the page's canvas sends it."""
    im = Image.new("RGB", (280, 280), "white")
    ImageDraw.Draw(im).line((40, 60, 240, 60), fill="black", width=18)
    return png(im)


def bomb_png(width: int = 30_000, height: int = 30_000) -> bytes:
    """A PNG whose header declares width x height pixels, with almost no data behind it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1000)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))


def maps(answer: dict, name: str) -> np.ndarray:
    fm = answer["feature_maps"][name]
    q = np.frombuffer(base64.b64decode(fm["data"]), np.uint8).astype(np.float32)
    return (fm["min"] + q / 255 * (fm["max"] - fm["min"])).reshape(fm["shape"])


def test_info_lists_the_runs_their_specs_and_accuracy(client, run):
    info = client.get("/api/info").json()
    assert info["classes"] == list(FASHION)
    assert [m["run"] for m in info["models"]] == [run.name, run.name]
    m = info["models"][0]
    assert m["feature_maps"] == {"conv1": [6, 28, 28], "conv2": [16, 10, 10]}
    assert m["spec"]["activation"] == "sigmoid" and m["epoch"] == 1
    acc = float((run / "metrics.csv").read_text().splitlines()[-1].split(",")[4])
    assert m["test_accuracy"] == pytest.approx(acc)
    assert info["examples"] is True and info["test_images"] == 200


def test_predict_a_drawing_answers_probabilities_input_and_every_feature_map(client, models):
    r = client.post("/api/predict", content=drawing(), headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    a = r.json()
    assert a["classes"] == list(FASHION) and len(a["probabilities"]) == 10
    assert sum(a["probabilities"]) == pytest.approx(1, abs=1e-4)
    top = int(np.argmax(a["probabilities"]))
    assert a["top"] == {"class": FASHION[top], "index": top,
                        "probability": a["probabilities"][top]}
    seen = np.frombuffer(base64.b64decode(a["input"]["data"]), np.uint8).reshape(28, 28).copy()
    assert a["input"]["shape"] == [28, 28]
    assert seen[0].max() == 0 and seen.max() > 200  # inverted: light stroke on black
    # The same numbers as the library's own path (predict.py + inspect.capture).
    from lenet.inspect import capture
    from lenet.predict import probabilities, to_input

    model = models[0].run.model
    assert a["probabilities"] == pytest.approx(probabilities(model, seen[None])[0].tolist(),
                                               abs=1e-5)
    acts = capture(model, to_input(seen))
    for name, layer, shape in (("conv1", "act1", [6, 28, 28]), ("conv2", "act2", [16, 10, 10])):
        fm = a["feature_maps"][name]
        assert fm["shape"] == shape and fm["scale"] == [0.0, 1.0]  # sigmoid's fixed range
        assert fm["encoding"] == "uint8-minmax-base64"
        expected = acts[layer][0].numpy()
        assert fm["min"] == pytest.approx(expected.min()) and fm["max"] == pytest.approx(
            expected.max())
        assert np.abs(maps(a, name) - expected).max() <= (fm["max"] - fm["min"]) / 255 + 1e-6


def test_raw_bytes_and_the_second_model(client, test_split):
    raw = test_split.images[3].tobytes()
    for model in ("0", "1"):
        r = client.post(f"/api/predict?model={model}", content=raw,
                        headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == int(model)
        assert base64.b64decode(r.json()["input"]["data"]) == raw  # used as given
    # Every accepted image type decodes.
    im = Image.new("L", (60, 90), 255)
    ImageDraw.Draw(im).ellipse((10, 10, 50, 80), fill=0)
    for fmt, mime in (("JPEG", "image/jpeg"), ("GIF", "image/gif"), ("BMP", "image/bmp"),
                      ("WEBP", "image/webp")):
        r = client.post("/api/predict", content=png(im, fmt), headers={"Content-Type": mime})
        assert r.status_code == 200, (fmt, r.text)


def test_examples_by_class_index_and_at_random(client, test_split):
    r = client.get("/api/example", params={"class": "coat"})
    a = r.json()
    assert r.status_code == 200 and a["label"] == "Coat" and a["label_index"] == 4
    assert test_split.labels[a["index"]] == 4
    image = base64.b64decode(a["image"]["data"])
    assert image == test_split.images[a["index"]].tobytes()
    a = client.get("/api/example?index=7").json()
    assert a["index"] == 7 and a["label"] == FASHION[test_split.labels[7]]
    assert 0 <= client.get("/api/example").json()["index"] < 200


ERRORS = [
    ("get", "/api/example?class=hat", None, {}, 400, "class=hat: unknown class 'hat': "
     "expected one of T-shirt/top"),
    ("get", "/api/example?index=200", None, {}, 400, "index=200: expected 0 to 199"),
    ("get", "/api/example?index=-1", None, {}, 400, "index=-1: expected 0 to 199"),
    ("get", "/api/example?index=x", None, {}, 400, "index=x: expected 0 to 199"),
    ("get", "/api/example?class=coat&index=3", None, {}, 400,
     "give class=NAME or index=N, not both"),
    ("post", "/api/predict?model=2", b"\0" * 784, {"Content-Type": "application/octet-stream"},
     400, "model=2: expected 0 to 1 (2 runs served)"),
    ("post", "/api/predict?model=a", b"\0" * 784, {"Content-Type": "application/octet-stream"},
     400, "model=a: expected 0 to 1"),
    ("post", "/api/predict?model=%D9%A1", b"\0" * 784,  # an Arabic-Indic 1: not a 1 here
     {"Content-Type": "application/octet-stream"}, 400, "model=\u0661: expected 0 to 1"),
    ("post", "/api/predict?model=1&model=0", b"\0" * 784,
     {"Content-Type": "application/octet-stream"}, 400, "model= given 2 times: expected once"),
    ("get", "/api/example?index=%201", None, {}, 400, "index= 1: expected 0 to 199"),
    ("get", "/api/example?index=1&index=2", None, {}, 400, "index= given 2 times"),
    ("post", "/api/predict", b"\0" * 783, {"Content-Type": "application/octet-stream"},
     400, "a raw body must be exactly 784 bytes (28x28 uint8, 0 = background); got 783"),
    ("post", "/api/predict", b"hello", {"Content-Type": "text/plain"}, 415,
     "'text/plain': expected an image"),
    ("post", "/api/predict", b"\0" * 784, {}, 415, "no Content-Type: expected an image"),
    ("post", "/api/predict", b"a=1", {"Content-Type": "application/x-www-form-urlencoded"},
     415, "'application/x-www-form-urlencoded'"),
    ("post", "/api/predict", b"not an image at all", {"Content-Type": "image/png"}, 400,
     "the request body: not a PNG, JPEG, WebP, GIF or BMP image"),
    ("post", "/api/predict", b"", {"Content-Type": "image/png"}, 400,
     "the request body: is empty"),
    ("post", "/api/predict", b"x" * (serve.MAX_BODY + 1), {"Content-Type": "image/png"}, 413,
     "request body of 2,097,153 bytes: at most 2,097,152 (2 MB) accepted"),
    ("get", "/api/nothing", None, {}, 404, "/api/nothing: no such page"),
    ("get", "/api/predict", None, {}, 405, "/api/predict: GET is not allowed here"),
]


@pytest.mark.parametrize("method,path,body,headers,status,message", ERRORS,
                         ids=[f"{e[4]}-{e[5][:30]}" for e in ERRORS])
def test_bad_requests_get_a_one_line_json_error(client, caplog, method, path, body, headers,
                                                status, message):
    with caplog.at_level(logging.DEBUG):
        r = client.request(method.upper(), path, content=body, headers=headers)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert message in error and "\n" not in error
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR]


def test_hostile_images(client, caplog):
    def post(body, mime="image/png"):
        return client.post("/api/predict", content=body, headers={"Content-Type": mime})

    with caplog.at_level(logging.DEBUG):
        r = post(bomb_png())  # 900 MP declared in 80 bytes
        assert r.status_code == 413
        assert "declares 900 MP, more than the 17 MP allowed" in r.json()["error"]
        assert "refused without decoding" in r.json()["error"]
        whole = drawing()
        r = post(whole[: len(whole) // 2])
        assert r.status_code == 400 and "truncated or corrupt" in r.json()["error"]
        jpeg = png(Image.new("RGB", (64, 64), "white"), "JPEG")
        assert post(jpeg[:40], "image/jpeg").status_code == 400
        # Chunked, with no Content-Length: refused while it streams in.
        def chunks():
            for _ in range(40):
                yield b"\0" * 65536
        r = post(chunks())
        assert r.status_code == 413 and "request body of more than" in r.json()["error"]
        # An image type that lies about its format still decodes, or fails cleanly.
        assert post(drawing(), "image/jpeg").status_code == 200
        assert post(b"GIF89a" + b"\0" * 20, "image/gif").status_code == 400
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR]


def test_example_without_a_test_set_is_503(models):
    with TestClient(serve.create_app(models, None, "no test-set examples: X missing")) as c:
        r = c.get("/api/example")
        assert r.status_code == 503 and r.json() == {"error": "no test-set examples: X missing"}
        assert c.get("/api/info").json()["examples"] is False


def test_page_and_its_files_are_served_with_a_strict_policy(client):
    page = client.get("/")
    assert page.status_code == 200 and "<canvas id=\"pad\"" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "http" not in page.text.replace("http-equiv", "")  # nothing from outside
    js = client.get("/app.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert client.get("/style.css").status_code == 200


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_errors_are_one_line(run, tmp_path, capsys):
    assert cli.main(["serve", str(tmp_path / "nope")]) == 1
    assert capsys.readouterr().err == f"lenet: error: {tmp_path / 'nope'}: no such run folder\n"
    assert cli.main(["serve", str(run), str(run), str(run)]) == 1
    assert "3 runs given: expected 1 or 2" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["serve", str(run), "--port", str(port)]) == 1
        err = capsys.readouterr().err
        assert err == (f"lenet: error: 127.0.0.1:{port} is in use by another program; "
                       "choose another --port (0 picks a free one)\n")
    assert cli.main(["serve", str(run), "--port", "70000"]) == 1
    assert "--port 70000: expected 0 to 65535" in capsys.readouterr().err
    assert cli.main(["serve", str(run), "--host", "no.such.host.invalid"]) == 1
    assert "--host no.such.host.invalid: not an address" in capsys.readouterr().err


def test_real_uvicorn_refuses_chunked_and_oversized_bodies(models, test_split, capfd):
    sock = serve.bind("127.0.0.1", 0)
    server = serve.server(serve.create_app(models, test_split))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = serve.url(sock)
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        with httpx2.Client(base_url=base, timeout=10) as c:
            assert c.get("/api/info").status_code == 200
            r = c.post("/api/predict", content=iter([b"\0" * 65536] * 40),
                       headers={"Content-Type": "image/png"})
            assert r.status_code == 413 and "more than" in r.json()["error"]
            r = c.post("/api/predict", content=bomb_png(), headers={"Content-Type": "image/png"})
            assert r.status_code == 413
            r = c.post("/api/predict", content=test_split.images[0].tobytes(),
                       headers={"Content-Type": "application/octet-stream"})
            assert r.status_code == 200 and len(r.json()["probabilities"]) == 10
    finally:
        server.should_exit = True
        thread.join(10)
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "ERROR" not in out + err
    json.dumps(r.json())  # plain JSON all the way down


def test_the_sample_photos_are_served_and_predicted(client):
    from lenet import samples

    assert client.get("/api/info").json()["samples"] == ["cat", "cup", "rocket"]
    for name in samples.NAMES:
        r = client.get(f"/samples/{name}.jpg")
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        assert r.content == samples.path(name).read_bytes()
        assert "default-src 'self'" in r.headers["content-security-policy"]
        answer = client.post("/api/predict", content=r.content,
                             headers={"Content-Type": "image/jpeg"}).json()
        assert len(answer["probabilities"]) == 10 and answer["top"]["class"]
    missing = client.get("/samples/dog.jpg")
    assert missing.status_code == 404
    assert missing.json() == {"error": "/samples/dog.jpg: no such page"}
