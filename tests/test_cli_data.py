"""Exercise 3 from the command line: original MNIST (download only) and any IDX folder."""
import dataclasses
import json

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


def test_any_idx_folder_with_class_names(isolated_env, tmp_path, capsys):
    data = make_idx_folder(tmp_path / "letters", n_train=64, n_test=32, classes=4)
    (data / "classes.txt").write_text("a\nb\nc\nd\n")
    assert cli.main(["train", "--data", str(data), "--epochs", "1", "--out",
                     str(tmp_path / "r"), "--no-progress"]) == 0
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["model"]["num_classes"] == 4
    assert "64 train, 32 test" in capsys.readouterr().out
