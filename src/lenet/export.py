"""ONNX export, checked against onnxruntime.

Uses torch's own exporter (torch.onnx.export with dynamo=True, the default since torch
2.9), which needs the `onnx` and `onnxscript` packages; the check needs `onnxruntime`.
All three are optional: only `lenet export` imports them.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from lenet import __version__
from lenet.errors import LenetError
from lenet.files import atomic_write

OPSET = 18  # onnxruntime >= 1.14 runs it; the exporter's own default
INPUT, OUTPUT = "image", "logits"
PREPROCESSING = ("input 'image': float32 (N, 1, {s}, {s}), pixel / 255 in [0, 1], no "
                 "normalisation; a light object on a black background, centred, its longest "
                 "edge {s} pixels (Fashion-MNIST style). Output 'logits': float32 (N, classes); "
                 "softmax gives the probabilities.")


class ExportError(LenetError):
    """An export that cannot be written or does not match the PyTorch model."""


def _need(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise ExportError(f"ONNX export needs the '{module}' package; install it with: "
                          "pip install 'lenet[onnx]'") from None


def export_onnx(model: torch.nn.Module, path: str | Path, image_size: int = 28,
                classes: list[str] | tuple[str, ...] = (), metadata: dict | None = None) -> Path:
    """Write `model` as ONNX to `path` (atomically): input "image" float32 (N, 1, S, S) with
    a dynamic batch dimension, output "logits" (N, classes). The preprocessing and class
    names go into the model's doc string and metadata_props."""
    onnx = _need("onnx")
    _need("onnxscript")
    path = Path(path)
    if not path.parent.is_dir():  # before the exporter's seconds of work
        raise ExportError(f"{path}: no such folder {path.parent}")
    model = model.cpu().eval()
    in_channels = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).in_channels
    example = torch.zeros(2, in_channels, image_size, image_size)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    # The exporter logs progress, registry notes (e.g. that torchvision is absent) and
    # deprecation warnings; the library does not print, so they are held back here.
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (example,), dynamo=True, opset_version=OPSET,
                                         input_names=[INPUT], output_names=[OUTPUT],
                                         dynamic_shapes=({0: batch},), verbose=False,
                                         optimize=True)
    except Exception as e:  # the exporter raises many types; the one line names the step
        raise ExportError(f"{path}: torch.onnx.export failed ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:300]})") from None
    finally:
        quiet.setLevel(level)
    proto = program.model_proto
    doc = PREPROCESSING.format(s=image_size)
    proto.doc_string = doc
    props = {"preprocessing": doc, "classes": json.dumps(list(classes)),
             "image_size": str(image_size), "producer": f"lenet {__version__}",
             **{k: str(v) for k, v in (metadata or {}).items()}}
    del proto.metadata_props[:]
    for k, v in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.checker.check_model(proto)
    try:
        atomic_write(path, lambda f: f.write(proto.SerializeToString()))
    except OSError as e:
        raise ExportError(f"{path}: cannot write ({e.strerror or e})") from None
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata_props of an ONNX file, as a dict."""
    onnx = _need("onnx")
    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def check_onnx(path: str | Path, model: torch.nn.Module, images: np.ndarray,
               batch_size: int = 1000) -> tuple[float, float]:
    """Run uint8 `images` (N, H, W) through onnxruntime and through `model`; return the
    largest absolute difference between their logits and the fraction of images whose
    predicted class agrees."""
    ort = _need("onnxruntime")
    from lenet.predict import to_input

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: the library does not print
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ExportError(f"{path}: onnxruntime cannot load it ({' '.join(str(e).split())[:300]})"
                          ) from None
    model = model.cpu().eval()
    diff, agree = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = to_input(images[start:start + batch_size])
            ours = model(x).numpy()
            theirs = session.run([OUTPUT], {INPUT: x.numpy()})[0]
            diff = max(diff, float(np.abs(ours - theirs).max()))
            agree += int((ours.argmax(1) == theirs.argmax(1)).sum())
    return diff, agree / max(len(images), 1)
