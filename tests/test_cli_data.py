"""Exercise 3 from the command line: original MNIST (download only) and any IDX folder."""
import dataclasses
import json

import pytest

from conftest import make_idx_folder, md5
from lenet import cli
from lenet.data import sources
from lenet.data.sources import STANDARD_FILES


def test_train_on_mnist_downloads_it_with_checksums(isolated_env, server, monkeypatch,
                                                    tmp_path, capsys):
    """`--data mnist` with nothing on disk: fetched from the (local) mirror, md5-checked,
    cached, trained on, with class names 0-9; the second run finds it in the cache."""
    folder = make_idx_folder(server.root / "mnist", n_train=128, n_test=64)
    real = sources.DATASETS["mnist"]
    monkeypatch.setitem(sources.DATASETS, "mnist", dataclasses.replace(
        real, md5={n: md5(folder / n) for n in STANDARD_FILES.values()},
        mirrors=(server.url + "mnist/",)))
    assert cli.main(["train", "--data", "mnist", "--epochs", "1", "--out",
                     str(tmp_path / "r"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "downloading train-images-idx3-ubyte.gz" in out and "verified" in out
    assert "data mnist from" in out and "(downloaded)" in out
    assert (isolated_env.cache / "mnist" / "t10k-labels-idx1-ubyte.gz").is_file()
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["data"]["name"] == "mnist"
    assert real.classes == tuple(str(i) for i in range(10))

    assert cli.main(["data"]) == 0
    assert f"mnist          {isolated_env.cache / 'mnist'} (cache)" in capsys.readouterr().out


def test_data_fetch_verb(isolated_env, server, monkeypatch, tmp_path, capsys):
    folder = make_idx_folder(server.root / "mnist", n_train=32, n_test=16)
    monkeypatch.setitem(sources.DATASETS, "mnist", dataclasses.replace(
        sources.DATASETS["mnist"], md5={n: md5(folder / n) for n in STANDARD_FILES.values()},
        mirrors=(server.url + "mnist/",)))
    assert cli.main(["data", "fetch", "mnist", "--dest", str(tmp_path / "m")]) == 0
    assert "mnist: ready in" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == sorted(STANDARD_FILES.values())
    monkeypatch.setenv("LENET_DATA", str(tmp_path / "m"))
    assert cli.main(["data", "fetch", "mnist"]) == 0  # found: no download
    assert capsys.readouterr().out == (f"mnist: already here, in {tmp_path / 'm'} "
                                       "($LENET_DATA); nothing to fetch (--dest DIR downloads "
                                       "a copy)\n")


def test_any_idx_folder_with_class_names(isolated_env, tmp_path, capsys):
    data = make_idx_folder(tmp_path / "letters", n_train=64, n_test=32, classes=4)
    (data / "classes.txt").write_text("a\nb\nc\nd\n")
    assert cli.main(["train", "--data", str(data), "--epochs", "1", "--out",
                     str(tmp_path / "r"), "--no-progress"]) == 0
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["model"]["num_classes"] == 4
    assert "64 train, 32 test" in capsys.readouterr().out


def test_data_show_describes_each_set_of_an_emnist_style_folder(isolated_env, tmp_path, capsys,
                                                                monkeypatch):
    from test_layout import emnist_like

    folder = tmp_path / "gzip"
    folder.mkdir()
    emnist_like(folder, "emnist-letters")
    emnist_like(folder, "emnist-digits", classes=4, first_label=0, seed=1)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["data", "show", "gzip"]) == 0
    shown = capsys.readouterr().out
    digits, letters = shown.split("\n\n")
    assert digits.startswith(f"emnist-digits from {folder} (--data)\n")
    assert letters.splitlines()[:2] == [
        f"emnist-letters from {folder} (--data)",
        "files: emnist-letters-train-images-idx3-ubyte.gz, emnist-letters-train-labels-idx1-"
        "ubyte.gz, emnist-letters-test-images-idx3-ubyte.gz, emnist-letters-test-labels-idx1-"
        "ubyte.gz (0.1 MB)"]
    assert ("images: 150 train, 50 test, 28x28 pixels, uint8; stored transposed (EMNIST), "
            "turned upright") in letters
    assert f"6 classes, names from {folder / 'emnist-letters-mapping.txt'}:" in letters
    rows = letters.splitlines()[-6:]
    assert rows[0].split() == ["0", "(unused)", "0", "0"]
    assert rows[1].split() == ["1", "A/a", "30", "10"]
    assert cli.main(["data", "gzip/emnist-letters"]) == 0  # `show` may be left out
    assert capsys.readouterr().out == letters


def test_data_show_of_a_plain_folder_counts_its_classes(isolated_env, tmp_path, capsys):
    data = make_idx_folder(tmp_path / "plain", n_train=60, n_test=20, classes=3)
    assert cli.main(["data", "show", str(data)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == "images: 60 train, 20 test, 28x28 pixels, uint8"
    assert lines[4] == "3 classes, names from one more than the largest training label:"
    assert [r.split() for r in lines[6:]] == [["0", "0", "20", "7"], ["1", "1", "20", "7"],
                                              ["2", "2", "20", "6"]]


@pytest.mark.parametrize("args, expect", [
    (["data", "fecth", "mnist"], "lenet data: unknown action 'fecth', expected fetch or show"),
    (["data", "show"], "lenet data show: expected a data set name (fashion-mnist, mnist) "
                       "or a folder"),
    (["data", "show", "mnist", "--dest", "x"], "lenet data show: --dest is for fetch"),
    (["data", "nowhere"], "unknown data set 'nowhere'"),
])
def test_data_verb_mistakes_are_one_line(args, expect, isolated_env, capsys):
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("lenet: error: ") and expect in err and err.count("\n") == 1


def test_pixel_stats_match_numpys_over_chunks():
    import numpy as np

    from lenet.cli_data import _pixel_stats

    images = np.random.default_rng(0).integers(0, 256, (9000, 7, 5), dtype=np.uint8)
    mean, std = _pixel_stats(images)  # 4096 + 4096 + 808 images
    assert mean == pytest.approx(images.mean() / 255, rel=1e-12)
    assert std == pytest.approx(images.std() / 255, rel=1e-9)
    assert _pixel_stats(np.full((3, 2, 2), 255, np.uint8)) == (1.0, 0.0)


def test_data_show_of_a_folder_with_both_layouts_shows_both_and_of_a_file_says_so(
        isolated_env, tmp_path, capsys):
    from test_layout import emnist_like

    mixed = make_idx_folder(tmp_path / "mixed", n_train=60, n_test=20, classes=3)
    emnist_like(mixed, "emnist-letters")
    assert cli.main(["data", str(mixed)]) == 0
    first, second = capsys.readouterr().out.split("\n\n")
    assert first.startswith(f"mixed from {mixed} (--data)")
    assert second.startswith(f"emnist-letters from {mixed} (--data)")
    assert cli.main(["data", "show", str(mixed / "train-images-idx3-ubyte.gz")]) == 1
    assert capsys.readouterr().err == (
        f"lenet: error: {mixed / 'train-images-idx3-ubyte.gz'}: is a file, expected a folder "
        "holding the four IDX files, or FOLDER/PREFIX of a set in one\n")
