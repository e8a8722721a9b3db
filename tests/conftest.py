"""Shared fixtures: synthetic IDX data sets, and an environment blind to the machine's data."""

from __future__ import annotations

import hashlib
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from lenet.data import sources
from lenet.data.idx import write_idx
from lenet.data.sources import STANDARD_FILES, DatasetInfo


def make_idx_folder(
    folder: str | Path,
    n_train: int = 600,
    n_test: int = 200,
    size: int = 28,
    classes: int = 10,
    seed: int = 0,
    gz: bool = True,
) -> Path:
    """Write the four standard IDX files of a small, learnable data set into `folder`.

    Class k is a bright two-row horizontal bar at its own height over dim noise, so a small
    convnet separates the classes within an epoch. Labels are balanced and shuffled.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    suffix = ".gz" if gz else ""
    for prefix, count in (("train", n_train), ("t10k", n_test)):
        labels = rng.permutation(np.arange(count) % classes).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", _draw(labels, size, classes, rng))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    return folder


def _draw(labels: np.ndarray, size: int, classes: int, rng: np.random.Generator) -> np.ndarray:
    images = rng.integers(0, 64, size=(len(labels), size, size), dtype=np.uint8)
    rows = np.linspace(1, size - 3, classes).round().astype(int)
    margin = size // 4 + 1
    for image, label in zip(images, labels, strict=True):
        start, stop = rng.integers(0, margin), size - rng.integers(0, margin)
        image[rows[label] : rows[label] + 2, start:stop] = rng.integers(192, 256)
    return images


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    """A folder with 600 train and 200 test 28x28 images of 10 synthetic classes (.gz files)."""
    return make_idx_folder(tmp_path / "tiny-data")


@pytest.fixture
def isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> SimpleNamespace:
    """An empty cache and an empty system folder, and no $LENET_DATA or $LENET_MIRROR.

    Returns a namespace with `cache` (the $LENET_CACHE folder, not yet created) and `system`
    (what sources.SYSTEM_DATASETS now points at, created empty).
    """
    cache = tmp_path / "lenet-cache"
    system = tmp_path / "system-datasets"
    system.mkdir()
    monkeypatch.setenv("LENET_CACHE", str(cache))
    monkeypatch.delenv("LENET_DATA", raising=False)
    monkeypatch.delenv("LENET_MIRROR", raising=False)
    monkeypatch.setattr(sources, "SYSTEM_DATASETS", system)
    return SimpleNamespace(cache=cache, system=system)


def md5(path: Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/www; `requests` lists the paths asked for."""
    root = tmp_path / "www"
    root.mkdir()
    requests: list[str] = []

    class Handler(QuietHandler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02})
    thread.start()
    url = f"http://127.0.0.1:{httpd.server_port}/"
    yield SimpleNamespace(root=root, url=url, requests=requests)
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture
def published(server):
    """A toy data set on the server at <url>toy/, and a DatasetInfo with its real md5s."""
    folder = make_idx_folder(server.root / "toy", n_train=60, n_test=20)
    info = DatasetInfo(
        name="toy",
        classes=tuple("0123456789"),
        files=STANDARD_FILES,
        md5={name: md5(folder / name) for name in STANDARD_FILES.values()},
        mirrors=(server.url + "toy/",),
    )
    return SimpleNamespace(info=info, folder=folder, server=server)


def stop_and_save(saved: dict, epoch: int = 1, step: int = 2):
    """A trainer callback as Ctrl-C acts: asks to stop after `step` in the epoch that follows
    `epoch` finished ones, and puts into `saved` what the run's checkpoint would hold."""
    import torch

    from lenet.train import Callback

    class StopAt(Callback):
        def on_step(self, trainer, at):
            if trainer.epoch == epoch and at == step:
                trainer.stop_requested = True

        def on_interrupt(self, trainer):
            saved.update(model={k: v.clone() for k, v in trainer.model.state_dict().items()},
                         optimizer=trainer.optimizer.state_dict(),
                         rng={"torch": torch.get_rng_state(),
                              "generator": trainer.generator.get_state()},
                         epoch=trainer.epoch, partial=trainer.partial,
                         history=[m.as_dict() for m in trainer.history])

    return StopAt()


def interrupt_and_resume(spec, model_spec, engine: str, data, device: str = "cpu"):
    """Trains to the end, then again stopped mid-epoch 2 (as Ctrl-C does) and resumed from
    what the checkpoint would hold: (uninterrupted trainer, resumed trainer, saved state).
    `data()` gives fresh (train, test) Batches."""
    import pytest
    import torch

    from lenet import models
    from lenet.train import Trainer, TrainingInterrupted

    def run(callbacks=(), resume=None):
        trainer = Trainer(spec, torch.device(device), callbacks, engine=engine)
        if resume is not None:
            trainer.restore(resume)
        trainer.fit(models.init_model(model_spec, 0), *data())
        return trainer

    saved: dict = {}
    full = run()
    with pytest.raises(TrainingInterrupted):
        run([stop_and_save(saved)])
    return full, run(resume=saved), saved


def assert_same_run(a, b) -> None:
    """The same losses every epoch and bit-identical weights and buffers."""
    import torch

    assert [m.train_loss for m in a.history] == [m.train_loss for m in b.history]
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(),
                                                 b.model.state_dict().values(), strict=True))
