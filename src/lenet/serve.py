"""`lenet serve`: one page and a small JSON API to draw or upload an image and watch the
network's prediction and conv feature maps change (the chapter's exercises 4 and 5, live).

A Starlette app under a single uvicorn process. Inference is the same code as `lenet
predict` and `lenet activations`: `predict.decode_image` prepares the input and
`inspect.trace` runs the network once for the probabilities and the feature maps.
"""
from __future__ import annotations

import base64
import errno
import socket
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from lenet import inspect, samples
from lenet.errors import ConfigError, LenetError
from lenet.predict import ImageError, ImageTooLarge, decode_image, fit_size, to_input
from lenet.report import LoadedRun, class_names, load_run
from lenet.runs import RunFolder, read_history

MAX_BODY = 2 * 1024 * 1024  # bytes; a phone photo as JPEG fits, a raw 28x28 input is 784
MAX_PIXELS = 4096 * 4096  # declared in the header; refused before decoding (~64 MB at most)
RAW_SIDE = 28  # a raw body is 28x28 uint8, Fashion-MNIST's own format
IMAGE_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP",
               "image/gif": "GIF", "image/bmp": "BMP", "image/x-ms-bmp": "BMP"}
RAW_TYPE = "application/octet-stream"
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
MAX_MODELS = 2  # side by side; more stops fitting on a screen
# Display range per activation: bounded ones keep one colour scale for every input, so
# pictures of different inputs compare; unbounded ones use the layer's own range.
SCALES = {"sigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0)}
STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
          "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/style.css": ("style.css", "text/css; charset=utf-8")}
# Nothing is fetched from anywhere but this server; no inline script runs.
HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
           "object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
           "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-store"}


class ServeError(LenetError):
    """A server that cannot start: address in use, bad host or port, too many runs."""


class Rejected(Exception):
    """A request answered with an HTTP error status and a one-line JSON message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True, eq=False)
class Served:
    """One run as the server holds it: the network in eval mode, loaded once."""

    run: LoadedRun
    classes: tuple[str, ...]
    layers: tuple[str, ...]  # act1, act2, ...: each conv layer after its activation
    test_accuracy: float | None  # of the checkpoint's epoch, from metrics.csv

    @property
    def name(self) -> str:
        return self.run.folder.name

    def describe(self, index: int) -> dict:
        cfg = self.run.config
        size = cfg.model.image_size
        return {"index": index, "run": self.name, "checkpoint": self.run.checkpoint.name,
                "epoch": self.run.epoch, "preset": cfg.preset, "data": cfg.data.name,
                "test_accuracy": self.test_accuracy, "classes": list(self.classes),
                "image_size": size, "activation": cfg.model.activation,
                "spec": asdict(cfg.model), "feature_maps": self.map_shapes()}

    def map_shapes(self) -> dict[str, list[int]]:
        from lenet.models import feature_shapes

        shapes = dict(feature_shapes(self.run.config.model))
        return {_conv(n): list(shapes[_conv(n)]) for n in self.layers}


def _conv(layer: str) -> str:
    return f"conv{layer[3:]}"  # act2 -> conv2


def load_served(run_dir: str | Path, which: str = "last") -> Served:
    """A run folder's network, ready to serve; raises RunFolderError or CheckpointError."""
    run = load_run(run_dir, which)
    layers = tuple(inspect.conv_activations(run.model))
    history = read_history(RunFolder(run.folder))
    rows = [m for m in history if m.epoch == run.epoch] or history[-1:]
    accuracy = round(rows[-1].test_acc, 6) if rows else None
    return Served(run, class_names(run.config), layers, accuracy)


def encode(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, np.uint8).tobytes()).decode("ascii")


def encode_maps(a: np.ndarray, activation: str) -> dict:
    """float maps (C, H, W) as uint8 steps between their min and max, base64:
    value = min + byte / 255 * (max - min). Within 0.2% of the range, a sixth of float32's
    size, which is plenty for a picture."""
    lo, hi = float(a.min()), float(a.max())
    span = hi - lo
    q = np.zeros(a.shape, np.uint8) if span <= 0 else np.rint((a - lo) * (255 / span))
    scale = SCALES.get(activation, (min(lo, 0.0), max(hi, 0.0)))
    return {"shape": list(a.shape), "min": lo, "max": hi, "scale": list(scale),
            "encoding": "uint8-minmax-base64", "data": encode(q)}


def analyse(served: Served, image: np.ndarray, index: int = 0) -> dict:
    """Everything the page shows for one input image, uint8 (size, size), as JSON data."""
    logits, acts = inspect.trace(served.run.model, to_input(image), served.layers)
    probs = torch.softmax(logits.float(), dim=1)[0].numpy()
    top = int(probs.argmax())
    activation = served.run.config.model.activation
    return {"model": index, "run": served.name, "classes": list(served.classes),
            "probabilities": [round(float(p), 6) for p in probs],
            "top": {"class": served.classes[top], "index": top,
                    "probability": round(float(probs[top]), 6)},
            "input": {"shape": list(image.shape), "encoding": "uint8-base64",
                      "data": encode(image)},
            "feature_maps": {_conv(n): encode_maps(acts[n][0].numpy(), activation)
                             for n in served.layers}}


def input_image(body: bytes, media_type: str, size: int) -> np.ndarray:
    """The request body as the network's input, uint8 (size, size); raises Rejected."""
    if media_type == RAW_TYPE:
        if len(body) != RAW_SIDE * RAW_SIDE:
            raise Rejected(400, f"a raw body must be exactly {RAW_SIDE * RAW_SIDE} bytes "
                           f"({RAW_SIDE}x{RAW_SIDE} uint8, 0 = background); got {len(body):,}")
        image = np.frombuffer(body, np.uint8).reshape(1, RAW_SIDE, RAW_SIDE)
        return fit_size(image, size)[0]  # resized for a run trained with --resize
    try:
        return decode_image(body, "the request body", size, FORMATS, MAX_PIXELS)
    except ImageTooLarge as e:
        raise Rejected(413, str(e)) from None
    except ImageError as e:
        raise Rejected(400, str(e)) from None


def create_app(models: list[Served], test=None, test_note: str = ""):
    """The Starlette app serving `models` (1 or 2). `test` (a data set Split) backs
    /api/example; without it that endpoint says `test_note`."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    if not 1 <= len(models) <= MAX_MODELS:
        raise ServeError(f"{len(models)} runs given: expected 1 or {MAX_MODELS}")
    classes = list(models[0].classes)
    if test is not None and len(test.labels):
        hi = int(test.labels.max())
        if hi >= len(classes):
            raise ServeError(f"the test set has label {hi}; the model knows "
                             f"{len(classes)} classes")
    pages = {path: (resources.files("lenet") / "static" / name).read_bytes()
             for path, (name, _) in STATIC.items()}
    # The photographs `lenet activations --sample` takes, for the page's photo buttons.
    photos = {f"/samples/{name}.jpg": samples.path(name).read_bytes() for name in samples.NAMES}
    info = {"classes": classes, "models": [m.describe(i) for i, m in enumerate(models)],
            "examples": test is not None, "test_images": len(test.labels) if test else 0,
            "limits": {"max_body_bytes": MAX_BODY, "max_pixels": MAX_PIXELS},
            "accepts": sorted(IMAGE_TYPES) + [RAW_TYPE], "samples": list(samples.NAMES)}
    rng = np.random.default_rng()

    def answer(data: dict, status: int = 200) -> JSONResponse:
        return JSONResponse(data, status, headers=HEADERS)

    def error(status: int, message: str) -> JSONResponse:
        return answer({"error": " ".join(message.split())}, status)

    async def page(request):
        _, media_type = STATIC[request.url.path]
        return Response(pages[request.url.path], media_type=media_type, headers=HEADERS)

    async def photo(request):
        return Response(photos[request.url.path], media_type="image/jpeg", headers=HEADERS)

    async def api_info(request):
        return answer(info)

    def whole(text: str) -> int:
        """A non-negative integer in ASCII digits, else -1 (int() would take '١' or ' 1')."""
        return int(text) if text.isascii() and text.isdigit() else -1

    def once(request) -> None:
        """A parameter given twice is refused: which of the two was meant?"""
        q = request.query_params
        twice = next((k for k in q if len(q.getlist(k)) > 1), None)
        if twice is not None:
            raise Rejected(400, f"{twice}= given {len(q.getlist(twice))} times: expected once")

    async def api_predict(request):
        once(request)
        served, index = pick(request.query_params.get("model"))
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type not in IMAGE_TYPES and media_type != RAW_TYPE:
            got = f"'{media_type}'" if media_type else "no Content-Type"
            raise Rejected(415, f"{got}: expected an image ({', '.join(sorted(IMAGE_TYPES))}) "
                           f"or {RAW_TYPE} ({RAW_SIDE}x{RAW_SIDE} raw bytes)")
        body = await read_body(request)
        size = served.run.config.model.image_size
        # Decoding and the forward pass run in Starlette's thread pool, off the event loop.
        return answer(await run_in_threadpool(
            lambda: analyse(served, input_image(body, media_type, size), index)))

    def pick(value: str | None) -> tuple[Served, int]:
        if value is None:
            return models[0], 0
        index = whole(value)
        if not 0 <= index < len(models):
            raise Rejected(400, f"model={value}: expected 0 to {len(models) - 1} "
                           f"({len(models)} run{'s' if len(models) > 1 else ''} served)")
        return models[index], index

    async def read_body(request) -> bytes:
        """The body, refused with 413 as soon as it passes MAX_BODY: by Content-Length
        when given, else while it streams in (chunked uploads declare no length)."""
        declared = request.headers.get("content-length")
        if declared is not None:
            length = whole(declared)
            if length < 0:
                raise Rejected(400, f"Content-Length '{declared}': expected a number")
            if length > MAX_BODY:
                raise Rejected(413, too_big(length))
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY:
                raise Rejected(413, too_big(size, "more than "))
            chunks.append(chunk)
        return b"".join(chunks)

    def too_big(size: int, more: str = "") -> str:
        return (f"request body of {more}{size:,} bytes: at most {MAX_BODY:,} "
                f"({MAX_BODY // 2**20} MB) accepted")

    async def api_example(request):
        if test is None:
            raise Rejected(503, test_note or "no test set is loaded")
        once(request)
        q = request.query_params
        n = len(test.labels)
        if "index" in q and "class" in q:
            raise Rejected(400, "give class=NAME or index=N, not both")
        if "index" in q:
            text = q["index"]
            i = whole(text)
            if not 0 <= i < n:
                raise Rejected(400, f"index={text}: expected 0 to {n - 1} (the test set's "
                               "size)")
        elif "class" in q:
            try:
                (k,) = inspect.class_indices([q["class"]], classes)
            except ConfigError as e:
                raise Rejected(400, f"class={q['class']}: {e}") from None
            found = np.flatnonzero(test.labels == k)
            if not len(found):
                raise Rejected(400, f"class={classes[k]}: the test set holds no such image")
            i = int(rng.choice(found))
        else:
            i = int(rng.integers(n))
        label = int(test.labels[i])
        image = test.images[i]
        return answer({"index": i, "label": classes[label], "label_index": label,
                       "image": {"shape": list(image.shape), "encoding": "uint8-base64",
                                 "data": encode(image)}})

    async def rejected(request, exc: Rejected):
        return error(exc.status, exc.message)

    async def http_error(request, exc: HTTPException):
        what = {404: "no such page", 405: f"{request.method} is not allowed here"}
        return error(exc.status_code, f"{request.url.path}: "
                     f"{what.get(exc.status_code, exc.detail)}")

    async def disconnected(request, exc: ClientDisconnect):
        return Response(status_code=400)  # nobody is left to read it

    routes = [Route(path, page) for path in STATIC] + [Route(path, photo) for path in photos]
    routes += [Route("/api/info", api_info), Route("/api/example", api_example),
               Route("/api/predict", api_predict, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={
        Rejected: rejected, HTTPException: http_error, ClientDisconnect: disconnected})


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free one); ServeError in one line
    when the address is taken, unknown or not allowed."""
    if not 0 <= port <= 65535:
        raise ServeError(f"--port {port}: expected 0 to 65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise ServeError(f"--host {host}: not an address of this machine "
                         f"({getattr(e, 'strerror', None) or e})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ServeError(f"{host}:{port} is in use by another program; choose another "
                             "--port (0 picks a free one)") from None
        if e.errno == errno.EACCES:
            raise ServeError(f"{host}:{port}: permission denied (ports below 1024 need "
                             "root); choose another --port") from None
        raise ServeError(f"{host}:{port}: cannot listen ({e.strerror or e})") from None
    return sock


def url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", "::"):
        host = socket.gethostname()
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def server(app, log_level: str = "warning"):
    """A uvicorn server for `app`: one process, no access log (a line per request would
    cost more than the request). Start it with `.run(sockets=[bind(...)])`."""
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False,
                                         lifespan="off", timeout_graceful_shutdown=2,
                                         server_header=False))
