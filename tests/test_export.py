"""export.py: ONNX with a dynamic batch, named input and output, metadata, and the same
numbers as PyTorch under onnxruntime."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from lenet.report import class_names, load_run
from test_report import FASHION, trained_real_run, trained_tiny_run

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from lenet.export import ExportError, check_onnx, export_onnx, read_metadata  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    run = load_run(trained_tiny_run(tmp_path_factory))
    path = tmp_path_factory.mktemp("export") / "tiny.onnx"
    export_onnx(run.model, path, 28, class_names(run.config), metadata={"run": "tiny"})
    return run, path


def test_onnx_matches_pytorch_on_1000_images(exported):
    run, path = exported
    images = np.random.default_rng(0).integers(0, 256, (1000, 28, 28), dtype=np.uint8)
    diff, agreement = check_onnx(path, run.model, images)
    assert diff <= 1e-4 and agreement == 1.0


def test_the_model_has_a_dynamic_batch_and_named_input_and_output(exported):
    run, path = exported
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert inp.name == "image" and out.name == "logits"
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 28, 28]
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 7, 300):
        x = np.random.default_rng(n).random((n, 1, 28, 28), dtype=np.float32)
        assert session.run(["logits"], {"image": x})[0].shape == (n, 10)


def test_metadata_holds_preprocessing_and_classes(exported):
    _, path = exported
    meta = read_metadata(path)
    assert json.loads(meta["classes"]) == list(FASHION)
    assert "pixel / 255" in meta["preprocessing"] and "black background" in meta["preprocessing"]
    assert meta["image_size"] == "28" and meta["run"] == "tiny"
    assert meta["producer"].startswith("lenet ")
    assert "pixel / 255" in onnx.load(str(path)).doc_string
    assert not list(path.parent.glob(".*tmp"))  # written atomically, nothing left over


def test_unwritable_destination_is_one_line(exported, tmp_path):
    run, _ = exported
    with pytest.raises(ExportError) as e:
        export_onnx(run.model, tmp_path / "missing" / "x.onnx")
    assert str(e.value).startswith(f"{tmp_path / 'missing' / 'x.onnx'}: ")
    assert "\n" not in str(e.value)


def test_a_missing_onnx_package_is_one_line_naming_the_extra(exported, tmp_path, capsys,
                                                              monkeypatch):
    from lenet import cli

    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed
    code = cli.main(["export", str(exported[0].folder), "--out", str(tmp_path / "x.onnx")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err
    assert "'onnxscript'" in err and "pip install 'lenet[onnx]'" in err
    assert not (tmp_path / "x.onnx").exists()


def test_check_reports_a_model_that_differs(exported):
    run, path = exported
    import copy

    import torch

    other = copy.deepcopy(run.model)
    with torch.no_grad():
        other.fc3.bias += 1.0
    diff, _ = check_onnx(path, other, np.zeros((4, 28, 28), np.uint8))
    assert diff == pytest.approx(1.0, abs=1e-4)


@pytest.mark.slow
def test_onnx_matches_pytorch_on_1000_real_test_images(tmp_path_factory, tmp_path):
    from lenet.data import sources

    run = load_run(trained_real_run(tmp_path_factory))
    path = export_onnx(run.model, tmp_path / "real.onnx", 28, FASHION)
    diff, agreement = check_onnx(path, run.model, sources.load("fashion-mnist").test.images[:1000])
    assert diff <= 1e-4 and agreement == 1.0
