import json

import pytest

from lenet.config import PRESETS, RunConfig, override, preset
from lenet.errors import ConfigError


def test_book_presets_and_their_learning_rates():
    assert preset("book").train.lr == 0.9
    assert preset("book-1.0").train.lr == 0.1
    assert preset("book").model == preset("book-1.0").model
    assert (preset("book").train.batch_size, preset("book").train.epochs) == (128, 10)


def test_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match="unknown preset 'x'.*book"):
        preset("x")


@pytest.mark.parametrize("name", list(PRESETS))
def test_json_round_trip(name):
    cfg = PRESETS[name]
    assert RunConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_override_keeps_unset_values():
    cfg = override(preset("book"), "train", epochs=3, lr=None)
    assert cfg.train.epochs == 3 and cfg.train.lr == 0.9


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(extra=1), "unknown key"),
    (lambda d: d["train"].update(epochs="ten"), "train.epochs"),
    (lambda d: d["train"].update(epochs=0), "train.epochs"),
    (lambda d: d["train"].update(lr=-1), "train.lr"),
    (lambda d: d["train"].update(device="tpu"), "train.device"),
    (lambda d: d["train"].update(seed=-1), r"train.seed: expected 0 <= seed < 2\*\*63"),
    (lambda d: d["train"].update(seed=2**63), r"train.seed: expected 0 <= seed < 2\*\*63"),
    (lambda d: d["model"].update(dense="120"), "model.dense"),
    (lambda d: d["model"].update(convs=[[6, 5, 2], [16, "5"]]), r"model.convs\[2\].kernel"),
    (lambda d: d["model"].update(convs=[[6, 5, 2, 7]]), r"model.convs\[1\]: expected "
     r"\[channels, kernel\] or \[channels, kernel, padding\], got \[6, 5, 2, 7\]"),
    (lambda d: d["model"].update(convs=[[6]]), r"model.convs\[1\]: expected \[channels"),
])
def test_bad_config_values_are_named(mutate, message):
    d = json.loads(preset("book").to_json())
    mutate(d)
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_dict(d)


def test_config_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        RunConfig.from_json_file(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json"):
        RunConfig.from_json_file(bad)


def test_toml_configs_read_on_python_3_10_through_tomli(tmp_path, monkeypatch):
    """Python 3.10 has no tomllib; pyproject.toml requires tomli there instead."""
    import sys
    import types

    from lenet.config import read_config_file

    tomllib = pytest.importorskip("tomllib")
    monkeypatch.setitem(sys.modules, "tomllib", None)  # as on 3.10
    monkeypatch.setitem(sys.modules, "tomli", types.SimpleNamespace(loads=tomllib.loads))
    path = tmp_path / "c.toml"
    path.write_text('preset = "modern"\n[train]\nlr = 0.05\n')
    assert read_config_file(path) == {"preset": "modern", "train": {"lr": 0.05}}


def test_configs_are_utf8_with_or_without_a_byte_order_mark(tmp_path):
    """Windows editors save UTF-8 with a BOM and CRLF line ends."""
    from lenet.config import read_config_file

    expected = {"preset": "modern", "note": "é 字", "train": {"lr": 0.05}}
    for name, text in (("c.json", json.dumps(expected, ensure_ascii=False)),
                       ("c.toml", 'preset = "modern"\nnote = "é 字"\n[train]\nlr = 0.05\n')):
        for bom in (b"", b"\xef\xbb\xbf"):
            (tmp_path / name).write_bytes(bom + text.replace("\n", "\r\n").encode())
            assert read_config_file(tmp_path / name) == expected, (name, bom)


def test_switching_a_momentum_preset_to_adam_drops_sgds_settings_unless_given():
    from lenet.config import merge_config

    for name in ("fast", "best"):  # both use Nesterov momentum 0.9
        cfg = merge_config(preset(name), {"train": {"optimizer": "adamw"}}, "f.toml")
        assert (cfg.train.optimizer, cfg.train.momentum, cfg.train.nesterov) == ("adamw", 0, False)
        with pytest.raises(ConfigError, match="train.momentum: only for sgd"):
            merge_config(preset(name), {"train": {"optimizer": "adam", "momentum": 0.9}}, "f")
    kept = merge_config(preset("fast"), {"train": {"lr": 0.05}}, "f")  # no switch: kept
    assert (kept.train.momentum, kept.train.nesterov) == (0.9, True)
    plain = merge_config(preset("fast"), {"train": {"momentum": 0}}, "f")  # plain SGD now
    assert (plain.train.optimizer, plain.train.momentum, plain.train.nesterov) == ("sgd", 0,
                                                                                   False)


def test_the_same_from_flags():
    from lenet import cli

    parser = cli._parser()
    cfg = cli.build_config(parser.parse_args(["train", "--preset", "best", "--optimizer",
                                              "adam"]))
    assert (cfg.train.optimizer, cfg.train.momentum, cfg.train.nesterov) == ("adam", 0, False)
    with pytest.raises(ConfigError, match="train.momentum: only for sgd"):
        cli.build_config(parser.parse_args(["train", "--preset", "best", "--optimizer", "adam",
                                            "--momentum", "0.9"]))
    sgd = cli.build_config(parser.parse_args(["train", "--preset", "best", "--optimizer",
                                              "sgd"]))
    assert (sgd.train.momentum, sgd.train.nesterov) == (0.9, True)
    plain = cli.build_config(parser.parse_args(["train", "--preset", "fast", "--momentum",
                                                "0"]))
    assert (plain.train.momentum, plain.train.nesterov) == (0, False)
    with pytest.raises(ConfigError, match="train.nesterov: needs optimizer sgd with momentum"):
        cli.build_config(parser.parse_args(["train", "--preset", "fast", "--momentum", "0",
                                            "--nesterov"]))
