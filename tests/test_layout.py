"""Folders laid out like EMNIST: several sets side by side, named by a prefix, with test-*
files, a mapping file for class names, and images stored transposed."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import make_idx_folder
from lenet import cli
from lenet.config import RunConfig
from lenet.data import layout, read_idx, sources, write_idx
from lenet.errors import DataError
from lenet.report import class_names

LETTERS = 5  # labels 1..5, as EMNIST letters' are 1..26


def emnist_like(folder, prefix, classes=LETTERS, first_label=1, seed=0, transposed=True):
    """Write a set named `prefix` into `folder` the way EMNIST ships one; returns its upright
    training images (the ones stored are their transposes when `transposed`)."""
    plain = make_idx_folder(folder / f".{prefix}-plain", n_train=150, n_test=50, classes=classes,
                            seed=seed)
    upright = {}
    for split, stored in (("train", "train"), ("t10k", "test")):
        images = read_idx(plain / f"{split}-images-idx3-ubyte.gz")
        labels = read_idx(plain / f"{split}-labels-idx1-ubyte.gz") + first_label
        upright[stored] = images
        write_idx(folder / f"{prefix}-{stored}-images-idx3-ubyte.gz",
                  images.transpose(0, 2, 1).copy() if transposed else images)
        write_idx(folder / f"{prefix}-{stored}-labels-idx1-ubyte.gz", labels.astype(np.uint8))
    lines = [f"{k} {65 + k - first_label} {97 + k - first_label}"
             for k in range(first_label, first_label + classes)]
    (folder / f"{prefix}-mapping.txt").write_text("\n".join(lines) + "\n")
    return upright


@pytest.fixture
def emnist(tmp_path):
    folder = tmp_path / "gzip"
    folder.mkdir()
    upright = emnist_like(folder, "emnist-letters")
    emnist_like(folder, "emnist-digits", classes=4, first_label=0, seed=1)
    return folder, upright


def test_a_prefixed_set_loads_upright_with_its_mapping_names(emnist):
    folder, upright = emnist
    ds = sources.load(str(folder / "emnist-letters"))
    assert (ds.name, ds.folder, ds.found_in, ds.transposed) == (
        "emnist-letters", folder, "--data", True)
    assert ds.classes == ("(unused)", "A/a", "B/b", "C/c", "D/d", "E/e")
    assert np.array_equal(ds.train.images, upright["train"])
    assert np.array_equal(ds.test.images, upright["test"])
    assert ds.train.images.flags.c_contiguous
    assert set(np.unique(ds.train.labels)) == {1, 2, 3, 4, 5}
    digits = sources.load(folder / "emnist-digits")
    assert digits.classes == ("A/a", "B/b", "C/c", "D/d") and len(digits.train) == 150


def test_a_folder_of_several_sets_asks_for_one(emnist):
    folder, _ = emnist
    with pytest.raises(DataError) as err:
        sources.load(str(folder))
    assert str(err.value) == (f"{folder}: holds 2 data sets (emnist-digits, emnist-letters), "
                              f"expected one; name one as {folder / 'emnist-digits'}")
    with pytest.raises(DataError) as err:
        sources.load(str(folder / "emnist-mnist"))
    assert str(err.value) == (f"{folder / 'emnist-mnist'}: no such folder, and {folder} holds "
                              "no set named 'emnist-mnist': expected one of emnist-digits, "
                              "emnist-letters")


def test_a_folder_of_one_prefixed_set_is_that_set_and_only_emnist_is_transposed(tmp_path):
    upright = emnist_like(tmp_path, "kuzushiji", transposed=False)
    ds = sources.load(tmp_path)
    assert (ds.name, ds.transposed) == ("kuzushiji", False)
    assert np.array_equal(ds.train.images, upright["train"])
    assert layout.stored_transposed("EMNIST-byclass") and not layout.stored_transposed(None)


def test_test_files_may_be_named_test_or_t10k(tmp_path):
    data = make_idx_folder(tmp_path / "d", n_train=60, n_test=20)
    for role in ("images-idx3-ubyte.gz", "labels-idx1-ubyte.gz"):
        (data / f"t10k-{role}").rename(data / f"test-{role}")
    assert len(sources.load(data).test) == 20
    assert layout.scan(data, layout.prefixed_files("x"))[1] == [
        f"x-{n}" for n in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                           "test-images-idx3-ubyte.gz", "test-labels-idx1-ubyte.gz")]


def test_a_sets_own_class_list_comes_before_its_mapping_and_the_folders(tmp_path):
    emnist_like(tmp_path, "emnist-letters")
    (tmp_path / "classes.txt").write_text("\n".join("abcdef") + "\n")
    assert sources.load(tmp_path).classes == ("(unused)", "A/a", "B/b", "C/c", "D/d", "E/e")
    (tmp_path / "emnist-letters-classes.txt").write_text("\n".join("uvwxyz") + "\n")
    assert sources.load(tmp_path).classes == tuple("uvwxyz")


def test_class_files_may_have_a_bom_and_crlf_line_ends(tmp_path):
    emnist_like(tmp_path, "emnist-letters")
    mapping = tmp_path / "emnist-letters-mapping.txt"
    mapping.write_bytes(b"\xef\xbb\xbf" + mapping.read_bytes().replace(b"\n", b"\r\n"))
    assert sources.load(tmp_path).classes[:2] == ("(unused)", "A/a")
    (tmp_path / "emnist-letters-classes.txt").write_bytes(
        "\ufeffお\r\nき\r\nす\r\nつ\r\nな\r\nは\r\n".encode())
    assert sources.load(tmp_path).classes == tuple("おきすつなは")


@pytest.mark.parametrize(("text", "message"), [
    ("1 65 97\nA 66\n", "line 2 is 'A 66', expected a label 0-255 and one or more Unicode"),
    ("1\n", "line 1 is '1', expected"),
    ("300 65\n", "line 1 is '300 65'"),
    ("1 10\n", "line 1 is '1 10'"),  # a control character is no class name
    ("1 99999999999\n", "line 1 is '1 99999999999'"),
    ("1 65\n1 66\n", "label 1 appears twice, expected each once"),
    ("\n\n", "holds no labels, expected lines like '1 65 97'"),
])
def test_a_bad_mapping_is_one_line_naming_it(tmp_path, text, message):
    path = tmp_path / "x-mapping.txt"
    path.write_text(text)
    with pytest.raises(DataError) as err:
        layout.read_mapping(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


def test_labels_beyond_the_mapping_are_refused(tmp_path):
    emnist_like(tmp_path, "emnist-letters")
    (tmp_path / "emnist-letters-mapping.txt").write_text("1 65\n2 66\n")
    with pytest.raises(DataError, match=r"label \d at index [\d,]+ is out of range: 3 classes "
                       r"\(.*emnist-letters-mapping.txt\), expected 0 to 2"):
        sources.load(tmp_path)


def test_train_evaluate_predict_on_an_emnist_split(emnist, tmp_path, capsys, monkeypatch):
    folder, _ = emnist
    run = tmp_path / "run"
    monkeypatch.chdir(folder)  # a prefix in the working folder, no slash
    assert cli.main(["train", "--data", "emnist-letters", "--epochs", "1", "--batch-size", "50",
                     "--out", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert (f"data emnist-letters from {folder} (--data): 150 train, 50 test images; "
            "stored transposed, turned upright") in out
    saved = json.loads((run / "config.json").read_text())["data"]["name"]
    assert saved == str(folder / "emnist-letters")
    monkeypatch.chdir(tmp_path)
    cfg = RunConfig.from_json_file(run / "config.json")
    assert class_names(cfg) == ("(unused)", "A/a", "B/b", "C/c", "D/d", "E/e")
    assert cli.main(["evaluate", str(run)]) == 0
    report = capsys.readouterr().out
    assert "on emnist-letters test set, 50 images" in report and "\nE/e " in report
    assert cli.main(["data"]) == 0  # the registry listing is unchanged by such folders
    capsys.readouterr()
    assert cli.main(["train", "--data", str(folder), "--epochs", "1", "--no-progress"]) == 1
    assert "holds 2 data sets (emnist-digits, emnist-letters)" in capsys.readouterr().err


def test_a_folder_of_one_prefixed_set_is_recorded_as_that_set(tmp_path, capsys, isolated_env):
    """A second set unpacked beside it later must not make the run's data ambiguous."""
    folder = tmp_path / "em"
    folder.mkdir()
    emnist_like(folder, "emnist-letters")
    run = tmp_path / "run"
    assert cli.main(["train", "--data", str(folder), "--epochs", "1", "--batch-size", "50",
                     "--out", str(run), "--no-progress"]) == 0
    assert RunConfig.from_json_file(run / "config.json").data.name == str(
        folder / "emnist-letters")
    emnist_like(folder, "emnist-digits", classes=4, first_label=0, seed=1)
    capsys.readouterr()
    assert cli.main(["evaluate", str(run)]) == 0
    assert "on emnist-letters test set, 50 images" in capsys.readouterr().out


def test_a_mapping_names_each_label_in_use_once(tmp_path):
    emnist_like(tmp_path, "emnist-letters")
    mapping = tmp_path / "emnist-letters-mapping.txt"
    mapping.write_text("1 65\n2 65\n3 67\n4 68\n5 69\n")
    with pytest.raises(DataError) as err:
        sources.load(tmp_path)
    assert str(err.value) == (f"{mapping}: line 2 names label 2 'A', as another label is "
                              "named; expected unique names")
    mapping.write_text("1 65\n3 67\n5 69\n")  # labels 2 and 4 carry images
    with pytest.raises(DataError) as err:
        sources.load(tmp_path)
    assert str(err.value) == (
        f"{tmp_path / 'emnist-letters-train-labels-idx1-ubyte.gz'}: 30 images have label 2, "
        f"which {mapping} does not name; expected a line for every label in use")
