"""`lenet predict`, `lenet activations` and `lenet export`, in process."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from lenet import cli
from test_report import FASHION, assert_picture, trained_real_run, trained_tiny_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_tiny_run(tmp_path_factory)


@pytest.fixture
def pictures(tmp_path):
    """A good photo-like JPEG, a good PNG, a text file named .png, and a missing file."""
    photo = Image.new("RGB", (300, 400), "white")
    ImageDraw.Draw(photo).rectangle((60, 40, 240, 360), fill=(40, 40, 90))
    photo.save(tmp_path / "coat.jpg")
    Image.fromarray(np.eye(28, dtype=np.uint8) * 255).save(tmp_path / "line.png")
    (tmp_path / "notes.png").write_text("not an image")
    return [tmp_path / n for n in ("coat.jpg", "notes.png", "line.png", "gone.gif")]


LINE = re.compile(r"^(.+): ([^,]+) (\d\.\d\d), ([^,]+) (\d\.\d\d), ([^,]+) (\d\.\d\d)$")


def test_predict_prints_top3_per_file_and_one_error_line_per_bad_file(run, pictures, capsys,
                                                                        isolated_env):
    assert cli.main(["predict", str(run), *map(str, pictures)]) == 1
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert [LINE.match(line)[1] for line in lines] == [str(pictures[0]), str(pictures[2])]
    for line in lines:
        m = LINE.match(line)
        assert {m[2], m[4], m[6]} <= set(FASHION) and m[3] >= m[5] >= m[7]
    assert err.splitlines() == [
        f"lenet: error: {pictures[1]}: not a PNG, JPEG, GIF, BMP, TIFF or WebP image",
        f"lenet: error: {pictures[3]}: no such file"]


def test_predict_good_files_exit_0(run, pictures, capsys, isolated_env):
    assert cli.main(["predict", str(run), str(pictures[0]), "--checkpoint", "best"]) == 0
    assert capsys.readouterr().err == ""


def test_predict_json_is_one_document_in_input_order(run, pictures, capsys, isolated_env):
    assert cli.main(["predict", str(run), *map(str, pictures), "--json", "--top", "2"]) == 1
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert [d["file"] for d in doc] == list(map(str, pictures))
    assert doc[1] == {"file": str(pictures[1]),
                      "error": "not a PNG, JPEG, GIF, BMP, TIFF or WebP image"}
    assert doc[3]["error"] == "no such file"
    for d in (doc[0], doc[2]):
        assert len(d["top"]) == 2 and set(d["top"][0]) == {"class", "probability"}
        assert d["top"][0]["probability"] >= d["top"][1]["probability"]
    assert len(err.splitlines()) == 2


def test_predict_says_when_an_image_has_nothing_in_it(run, tmp_path, capsys, isolated_env):
    # An all-white photo and a fully transparent PNG: the network still answers
    # confidently, so the answer carries a note (and "blank" in JSON).
    Image.new("RGB", (200, 300), "white").save(tmp_path / "white.jpg")
    Image.new("RGBA", (40, 40), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    Image.fromarray(np.eye(28, dtype=np.uint8) * 255).save(tmp_path / "line.png")
    files = [str(tmp_path / n) for n in ("white.jpg", "clear.png", "line.png")]
    assert cli.main(["predict", str(run), *files, "--top", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.endswith("(blank: nothing in it stands out from its background)")
            for line in lines] == [True, True, False]
    assert cli.main(["predict", str(run), *files, "--json"]) == 0
    assert [d["blank"] for d in json.loads(capsys.readouterr().out)] == [True, True, False]


def test_predict_takes_a_folder_as_its_image_files_in_name_order(run, pictures, tmp_path,
                                                                 capsys, isolated_env):
    """pictures' folder: coat.jpg, line.png and notes.png (not an image, reported); a text
    file, a hidden image and a sub-folder are skipped; an empty folder is one error line."""
    folder = pictures[0].parent
    (folder / "readme.txt").write_text("skipped: not an image suffix")
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(folder / ".hidden.png")
    (folder / "sub.png").mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "gone.png").symlink_to(tmp_path / "nowhere.png")  # reported
    args = ["predict", str(run), str(folder), str(tmp_path / "empty"), str(tmp_path / "links"),
            "--json"]
    assert cli.main(args) == 1
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert [d["file"] for d in doc] == [str(folder / "coat.jpg"), str(folder / "line.png"),
                                        str(folder / "notes.png"), str(tmp_path / "empty"),
                                        str(tmp_path / "links" / "gone.png")]
    assert doc[4]["error"] == "no such file"
    assert "top" in doc[0] and "top" in doc[1] and doc[2]["error"].startswith("not a PNG")
    assert doc[3]["error"] == ("holds no image files, expected .png, .jpg, .jpeg, .gif, .bmp, "
                               ".tif, .tiff, .webp")
    assert err.splitlines()[-2] == f"lenet: error: {tmp_path / 'empty'}: {doc[3]['error']}"
    assert cli.main(["predict", str(run), str(folder / "coat.jpg")]) == 0
    alone = capsys.readouterr().out
    assert cli.main(["predict", str(run), str(folder)]) == 1
    assert capsys.readouterr().out.splitlines()[0] == alone.strip()


@pytest.mark.parametrize("args, message", [
    (["predict", "{tmp}/nowhere", "x.png"], "{tmp}/nowhere: no such run folder"),
    (["evaluate", "{run}/config.json"], "{run}/config.json: is a file, expected a run folder"),
    (["predict", "{run}", "x.png", "--top", "0"], "--top 0: expected a positive integer"),
    (["activations", "{run}", "--classes", "jumper"], "unknown class 'jumper': expected one "
     "of T-shirt/top, Trouser, Pullover"),
    (["activations", "{run}", "--index", "200"], "--index 200: expected 0 to 199"),
    (["activations", "{run}", "--noise", "uniform", "--out", "{tmp}/no/a.png"],
     "--out {tmp}/no/a.png: no such folder"),
    (["activations", "{run}", "--classes", "coat,bag", "--per-class", "15"],
     "30 inputs chosen: at most 24 fit the figure"),
    (["activations", "{run}", "--image", "{tmp}/gone.png"], "{tmp}/gone.png: no such file"),
    (["activations", "{run}", "--sample", "cat", "--out", "{tmp}/a.jpg"],
     "{tmp}/a.jpg: a figure is written as .png, .svg or .pdf, not '.jpg'"),
    (["activations", "{run}", "--noise", "uniform", "--seed", "-1"],
     "--seed -1: expected a non-negative integer"),
    (["activations", "{run}", "--sample", "cat", "--per-class", "0"],
     "--per-class 0: expected a positive integer"),
    (["export", "{run}", "--out", "{tmp}/no/m.onnx"], "--out {tmp}/no/m.onnx: no such folder"),
    (["export", "{run}", "--out", "{tmp}/m.txt"], "--out {tmp}/m.txt: expected a file name "
     "ending in .onnx"),
    (["activations", "{run}", "--image", "{tmp}"], "{tmp}: holds no image files, expected .png"),
    (["export", "{run}", "--out", ""], "--out '': expected a file name ending in .onnx"),
])
def test_bad_requests_are_one_line_and_exit_1(run, tmp_path, capsys, isolated_env, args,
                                              message):
    fill = {"run": run, "tmp": tmp_path}
    assert cli.main([a.format(**fill) for a in args]) == 1
    out, err = capsys.readouterr()
    assert err.startswith("lenet: error: " + message.format(**fill)), err
    assert len(err.splitlines()) == 1


def test_activations_default_writes_the_figure_and_prints_the_table(run, capsys,
                                                                     isolated_env):
    assert cli.main(["activations", str(run)]) == 0
    out = capsys.readouterr().out.splitlines()
    head = out[0].split()
    assert head[:3] == ["input", "true", "predicted"]
    assert head[3:] == ["act1", "mean", "act1", "max", "act1", ">0.5",
                        "act2", "mean", "act2", "max", "act2", ">0.5"]
    assert [line.split()[2] for line in out[1:5]] == ["Pullover", "Pullover", "Coat", "Coat"]
    assert all(re.search(r"\d+%$", line) for line in out[1:5])
    assert out[5].startswith(">0.5: share of a layer's units above 0.5, what sigmoid gives "
                              "an input of 0")
    assert out[6] == f"figure: {run / 'activations.png'}"
    assert_picture(run / "activations.png", (1200, 300), (2200, 800))


def test_activations_selectors(run, tmp_path, capsys, isolated_env):
    white = Image.new("L", (50, 60), 255)
    ImageDraw.Draw(white).rectangle((15, 10, 35, 50), fill=30)  # a dark object on white
    white.save(tmp_path / "white.png")
    out_png = tmp_path / "act.png"
    args = ["activations", str(run), "--classes", "Bag,sandal", "--per-class", "1",
            "--index", "17", "--image", str(tmp_path / "white.png"), "--noise", "uniform",
            "--noise", "gaussian", "--blank", "--seed", "5", "--out", str(out_png)]
    assert cli.main(args) == 0
    out = capsys.readouterr().out.splitlines()
    names = [line[:16].strip() for line in out[1:8]]
    assert names == ["test #" + names[0].split("#")[1], "test #" + names[1].split("#")[1],
                     "test #17", "white.png", "uniform noise", "gaussian noise", "blank"]
    assert [line.split()[2] for line in out[1:3]] == ["Bag", "Sandal"]
    assert [line[16:].split()[0] for line in out[4:8]] == ["-"] * 4
    assert out[-1] == f"figure: {out_png}"
    assert_picture(out_png, (1200, 500), (2200, 1200))
    assert cli.main(args) == 0  # the same seed gives the same table
    assert capsys.readouterr().out.splitlines() == out


def test_activations_without_data_for_files_noise_and_blank(run, tmp_path, capsys,
                                                            isolated_env, monkeypatch):
    from lenet.data import sources

    def no_data(*a, **k):
        raise AssertionError("the data set was loaded")

    monkeypatch.setattr(sources, "load", no_data)
    assert cli.main(["activations", str(run), "--sample", "cat", "--sample", "cup", "--noise",
                     "uniform", "--blank", "--out", str(tmp_path / "a.png")]) == 0
    rows = capsys.readouterr().out.splitlines()[1:5]
    assert [r.split("  ")[0] for r in rows] == ["cat (sample)", "cup (sample)", "uniform noise",
                                              "blank"]
    assert_picture(tmp_path / "a.png", (1200, 300), (2200, 1000))


def test_export_checks_and_writes(run, tmp_path, capsys, isolated_env):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = tmp_path / "m.onnx"
    assert cli.main(["export", str(run), "--format", "onnx", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    m = re.search(r"checked on 200 test images of \S+: max abs diff (\S+), argmax agreement "
                  r"100\.00%", text)
    assert m and float(m[1]) <= 1e-4, text
    assert f"wrote {out}: ONNX opset 18" in text
    assert out.stat().st_size > 200_000  # 61,706 float32 weights
    assert not list(tmp_path.glob(".*"))  # the unchecked file is gone


def test_export_names_its_out_when_it_cannot_write_there_before_any_work(run, tmp_path, capsys,
                                                                         isolated_env):
    (tmp_path / "d.onnx").mkdir()
    places = [(tmp_path / "d.onnx", "is a folder, expected a file name ending in .onnx")]
    if sys.platform == "linux":  # /proc takes no new files, even from root
        places.append((Path("/proc/m.onnx"), "cannot write ("))
    for out, why in places:
        assert cli.main(["export", str(run), "--out", str(out)]) == 1
        captured = capsys.readouterr()
        assert captured.err.startswith(f"lenet: error: --out {out}: {why}"), captured.err
        assert "checked on" not in captured.out  # refused before the export's work


def test_export_without_the_data_checks_on_random_images(run, tmp_path, capsys,
                                                         isolated_env, monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from lenet.data import sources
    from lenet.errors import DataError

    def missing(*a, **k):
        raise DataError("gone")

    monkeypatch.setattr(sources, "load", missing)
    assert cli.main(["export", str(run), "--out", str(tmp_path / "m.onnx")]) == 0
    assert "checked on 1,000 random images" in capsys.readouterr().out


@pytest.mark.slow
def test_real_run_predict_activations_export(tmp_path_factory, tmp_path, capsys):
    from lenet.data import sources

    real = trained_real_run(tmp_path_factory)
    ds = sources.load("fashion-mnist")
    trouser = int(np.flatnonzero(ds.test.labels == 1)[0])
    Image.fromarray(255 - ds.test.images[trouser]).resize((280, 280)).save(tmp_path / "t.png")
    capsys.readouterr()  # the shared run may have just been trained, printing its epochs
    assert cli.main(["predict", str(real), str(tmp_path / "t.png")]) == 0
    assert capsys.readouterr().out.startswith(f"{tmp_path / 't.png'}: Trouser ")
    assert cli.main(["activations", str(real), "--out", str(tmp_path / "a.png")]) == 0
    assert_picture(tmp_path / "a.png", (1200, 300), (2200, 800))
    assert cli.main(["export", str(real), "--out", str(tmp_path / "m.onnx")]) == 0
    assert "checked on 1,000 test images of fashion-mnist" in capsys.readouterr().out


def test_activations_takes_a_folder_of_images_like_predict(run, tmp_path, capsys, isolated_env):
    for name, value in (("b.png", 255), ("a.png", 128)):
        im = Image.new("L", (40, 40), 0)
        im.paste(value, (10, 5, 30, 35))
        im.save(tmp_path / name)
    assert cli.main(["activations", str(run), "--image", str(tmp_path), "--out",
                     str(tmp_path / "acts.png")]) == 0
    rows = capsys.readouterr().out.splitlines()[1:3]
    assert [r.split()[0] for r in rows] == ["a.png", "b.png"]
    Image.new("L", (40, 40), 255).save(tmp_path / "white.png")  # nothing in it: said so
    assert cli.main(["activations", str(run), "--image", str(tmp_path / "white.png"),
                     "--out", str(tmp_path / "acts.png")]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("white.png (blank)")
