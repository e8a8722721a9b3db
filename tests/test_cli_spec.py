"""Exercise 2 from the command line: every part of the spec is a flag, a config file can
hold it, flags beat the file, bad specs fail before training, runs can be compared."""
import json

import pytest
from PIL import Image

from conftest import make_idx_folder
from lenet import cli


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_idx_folder(tmp_path_factory.mktemp("d") / "data", n_train=128, n_test=64)


def _train(data, out, *flags):
    return cli.main(["train", "--data", str(data), "--epochs", "1", "--batch-size", "64",
                     "--out", str(out), "--no-progress", *map(str, flags)])


def test_summary_shows_any_spec(capsys):
    assert cli.main(["summary", "--convs", "8:3:1,16:3,32:3:1", "--dense", "64",
                     "--batch-norm", "--activation", "relu", "--pooling", "max",
                     "--dropout", "0.2"]) == 0
    out = capsys.readouterr().out
    for text in ("conv3", "BatchNorm2d", "BatchNorm1d", "ReLU", "MaxPool2d", "Dropout",
                 "8x28x28", "32x3x3"):
        assert text in out
    assert cli.main(["summary", "--dense", "none"]) == 0
    assert "fc2" not in capsys.readouterr().out


def test_every_flag_lands_in_config_json(data, tmp_path, isolated_env):
    assert _train(data, tmp_path / "r", "--activation", "tanh", "--pooling", "max",
                  "--convs", "4:3:1,8:3", "--dense", "32,16,8", "--batch-norm",
                  "--dropout", "0.1", "--init", "kaiming", "--lr", "0.01",
                  "--optimizer", "sgd", "--momentum", "0.9", "--weight-decay", "0.0001",
                  "--seed", "3", "--resize", "32") == 0
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    m, t = cfg["model"], cfg["train"]
    assert (m["activation"], m["pooling"], m["init"], m["batch_norm"], m["dropout"]) == \
        ("tanh", "max", "kaiming", True, 0.1)
    assert m["convs"] == [{"channels": 4, "kernel": 3, "padding": 1},
                          {"channels": 8, "kernel": 3, "padding": 0}]
    assert m["dense"] == [32, 16, 8] and m["image_size"] == 32
    assert (t["lr"], t["momentum"], t["weight_decay"], t["seed"], t["epochs"]) == \
        (0.01, 0.9, 0.0001, 3, 1)
    assert cfg["data"]["resize"] == 32


@pytest.mark.parametrize("suffix, text", [
    (".toml", 'preset = "modern"\n[model]\ndense = [60]\n[train]\nlr = 0.05\nepochs = 2\n'),
    (".json", json.dumps({"preset": "modern", "model": {"dense": [60]},
                          "train": {"lr": 0.05, "epochs": 2}})),
])
def test_config_file_and_flags_override_it(data, tmp_path, isolated_env, suffix, text):
    path = tmp_path / f"exp{suffix}"
    path.write_text(text)
    assert cli.main(["train", "--config", str(path), "--lr", "0.02", "--data", str(data),
                     "--out", str(tmp_path / "r"), "--no-progress"]) == 0
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["preset"] == "modern" and cfg["model"]["activation"] == "relu"
    assert cfg["model"]["dense"] == [60] and cfg["train"]["epochs"] == 2
    assert cfg["train"]["lr"] == 0.02  # the flag beats the file


def test_run_config_json_reproduces_the_run(data, tmp_path, isolated_env, capsys):
    assert _train(data, tmp_path / "a", "--activation", "relu", "--lr", "0.05") == 0
    assert f"data data from {data} (--data): " in capsys.readouterr().out
    config = tmp_path / "a" / "config.json"
    assert cli.main(["train", "--config", str(config), "--out", str(tmp_path / "b"),
                     "--no-progress"]) == 0
    # the folder came from the file: the train line says so, not "--data"
    assert f"data data from {data} (--config {config}): " in capsys.readouterr().out
    a, b = ((tmp_path / x / "metrics.csv").read_text().splitlines() for x in "ab")
    assert [r.split(",")[:5] for r in a] == [r.split(",")[:5] for r in b]
    assert cli.main(["train", "--resume", str(tmp_path / "b"), "--epochs", "2",
                     "--no-progress"]) == 0
    assert f"data data from {data} (the run's config.json): " in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--convs", "6:5:2,16:5,32:5"], "pool3: a 2x2 pool does not fit its 32x1x1 input"),
    (["--convs", "6:31"], "conv1: a 31x31 kernel"),
    (["--optimizer", "adam", "--momentum", "0.9"], "train.momentum: only for sgd"),
    (["--dropout", "1.5"], "model.dropout"),
    (["--convs", "6:five"], "--convs: '6:five'"),
    (["--convs", "6"], "--convs: '6': expected channels:kernel[:padding]"),  # no kernel
    (["--convs", "6:5:2,"], "--convs: '6:5:2,'"),
    (["--dense", ","], "--dense: ',': expected integers like 120,84, or 'none'"),
    (["--dense", ""], "--dense: '': expected"),
    (["--convs", "-3:5:2"], "model.convs[1].channels: expected a positive integer, got -3"),
    (["--dense", "-5,3"], "model.dense[1]: expected a positive integer, got -5"),
    (["--weight-decay", "nan"], "train.weight_decay: expected a finite number >= 0, got nan"),
    (["--weight-decay", "inf"], "train.weight_decay: expected a finite number >= 0, got inf"),
])
def test_bad_specs_fail_before_training_with_one_line(data, tmp_path, capsys, isolated_env,
                                                      flags, message):
    parser_error = flags[1] in ("6:five", "6", "6:5:2,", ",", "")
    with pytest.raises(SystemExit) if parser_error else _no_raise():
        assert _train(data, tmp_path / "r", *flags) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r" / "last.ckpt").exists()


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_bad_config_files_are_one_line(data, tmp_path, capsys, isolated_env):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nactivation = 'relu'")
    assert cli.main(["train", "--config", str(bad), "--data", str(data)]) == 1
    assert "bad.toml: not a readable TOML config" in capsys.readouterr().err
    unknown = tmp_path / "unknown.json"
    unknown.write_text('{"model": {"activaton": "relu"}}')
    assert cli.main(["train", "--config", str(unknown), "--data", str(data)]) == 1
    assert "unknown key(s) activaton" in capsys.readouterr().err


def test_compare_prints_a_table_and_overlays_curves(data, tmp_path, capsys, isolated_env):
    assert _train(data, tmp_path / "sig", "--epochs", "2") == 0
    assert _train(data, tmp_path / "relu", "--epochs", "2", "--activation", "relu",
                  "--lr", "0.05", "--convs", "6:5:2,16:5,32:3") == 0
    capsys.readouterr()
    png = tmp_path / "cmp.png"
    assert cli.main(["compare", str(tmp_path / "sig"), str(tmp_path / "relu"),
                     "--out", str(png)]) == 0
    out = capsys.readouterr().out
    assert "model.activation=sigmoid" in out and "model.activation=relu" in out
    assert "train.lr=0.9" in out and "61,706" in out
    assert "model.convs=6:5:2,16:5:0" in out and "model.convs=6:5:2,16:5:0,32:3:0" in out
    assert "data.classes" not in out
    with Image.open(png) as im:
        assert im.size[0] > 600 and im.convert("L").getextrema()[0] < 200  # not blank
    assert cli.main(["compare", str(tmp_path / "nope")]) == 1
    # The format follows the name: SVG and PDF too; any other suffix is refused at once.
    heads = {".svg": b"<?xml", ".pdf": b"%PDF-", ".PNG": b"\x89PNG"}
    for suffix, head in heads.items():
        out = tmp_path / f"cmp{suffix}"
        assert cli.main(["compare", str(tmp_path / "sig"), "--out", str(out)]) == 0
        assert out.read_bytes().startswith(head), suffix
    capsys.readouterr()
    jpg = tmp_path / "cmp.jpg"
    assert cli.main(["compare", str(tmp_path / "sig"), "--out", str(jpg)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and not jpg.exists()  # before the table
    assert err == f"lenet: error: {jpg}: a figure is written as .png, .svg or .pdf, not '.jpg'\n"


@pytest.mark.parametrize("text, message", [
    ("[model]\nin_channels = 3\n", "model.in_channels 3: IDX images are grayscale"),
    ("[model]\nactivation = 'Relu'\n", "{file}: model.activation: expected one of"),
])
def test_a_config_file_that_cannot_train_is_refused_naming_it(data, tmp_path, capsys,
                                                              isolated_env, text, message):
    """A channel count no IDX data set has (it was a traceback) and a bad value (now
    named with its file): one line, no run folder."""
    path = tmp_path / "c.toml"
    path.write_text(text)
    assert cli.main(["train", "--config", str(path), "--data", str(data), "--out",
                     str(tmp_path / "r"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert message.format(file=path) in err and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()


def test_what_a_config_file_says_otherwise_is_adapted_and_said(data, tmp_path, capsys,
                                                               isolated_env):
    """Another run's config.json on other data (another size, other classes), and momentum
    a file names beside --optimizer adam: the run goes on, and its train line says what
    changed (these used to change silently)."""
    path = tmp_path / "c.toml"
    path.write_text("[model]\nimage_size = 32\nnum_classes = 5\n"
                    "[train]\nmomentum = 0.9\nnesterov = true\n")
    assert cli.main(["train", "--config", str(path), "--optimizer", "adam", "--data",
                     str(data), "--epochs", "1", "--out", str(tmp_path / "r"),
                     "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert (f"note: --optimizer adam drops momentum 0.9, nesterov True of the config file "
            f"{path}") in out
    assert "note: model.image_size 32 of the config becomes 28 (" in out
    assert "--resize 32 scales them)" in out
    assert "note: model.num_classes 5 of the config becomes 10 (" in out
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert (cfg["model"]["image_size"], cfg["model"]["num_classes"]) == (28, 10)
    assert (cfg["train"]["momentum"], cfg["train"]["nesterov"]) == (0.0, False)


def test_a_json_config_with_a_key_twice_is_refused(data, tmp_path, capsys, isolated_env):
    path = tmp_path / "c.json"
    path.write_text('{"model": {"activation": "relu", "activation": "tanh"}}')
    assert cli.main(["train", "--config", str(path), "--data", str(data)]) == 1
    assert "c.json: not a readable JSON config (key 'activation' appears twice)" in \
        capsys.readouterr().err
