"""Config is data: frozen dataclasses, named presets, JSON round trip.

A run is fully described by a `RunConfig`; it is written as `config.json` into every run
folder and read back by `evaluate`, `--resume` and friends. Unknown keys and wrong types
are errors, never silently ignored.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from lenet.errors import ConfigError

ACTIVATIONS = ("sigmoid", "tanh", "relu", "gelu")
POOLINGS = ("avg", "max")
INITS = ("xavier-uniform", "kaiming", "default")
OPTIMIZERS = ("sgd", "adam", "adamw")
DEVICES = ("auto", "cpu", "cuda")
SCHEDULES = ("constant", "cosine", "linear")
AUGMENTS = ("none", "flip", "flip+shift")


@dataclass(frozen=True)
class ConvSpec:
    channels: int  # output feature maps
    kernel: int = 5  # square kernel, pixels
    padding: int = 0  # zero padding on each side, pixels


@dataclass(frozen=True)
class ModelSpec:
    convs: tuple[ConvSpec, ...] = (ConvSpec(6, 5, 2), ConvSpec(16, 5, 0))  # 6@5x5 pad 2, 16@5x5
    dense: tuple[int, ...] = (120, 84)  # hidden dense widths; the output layer comes after
    activation: str = "sigmoid"  # the book's; ReLU had not been discovered for LeNet-5
    pooling: str = "avg"  # 2x2 stride 2 after every conv
    pool: int = 2  # pooling window and stride, pixels
    init: str = "xavier-uniform"  # the book's init_cnn; biases keep PyTorch's default
    batch_norm: bool = False  # BatchNorm after each conv and hidden dense layer (not in 1998)
    dropout: float = 0.0  # after each hidden dense activation; 0 = none, as in the book
    in_channels: int = 1  # grayscale
    image_size: int = 28  # Fashion-MNIST's 28x28
    num_classes: int = 10

    def __post_init__(self):
        _choice("model.activation", self.activation, ACTIVATIONS)
        _choice("model.pooling", self.pooling, POOLINGS)
        _choice("model.init", self.init, INITS)
        for name in ("pool", "in_channels", "image_size", "num_classes"):
            _positive(f"model.{name}", getattr(self, name))
        if not self.convs:
            raise ConfigError("model.convs: expected at least one conv layer")
        for i, c in enumerate(self.convs, 1):
            _positive(f"model.convs[{i}].channels", c.channels)
            _positive(f"model.convs[{i}].kernel", c.kernel)
            if c.padding < 0:
                raise ConfigError(f"model.convs[{i}].padding: expected >= 0, got {c.padding}")
        for i, w in enumerate(self.dense, 1):
            _positive(f"model.dense[{i}]", w)
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.dropout: expected 0 <= p < 1, got {self.dropout}")


@dataclass(frozen=True)
class DataSpec:
    name: str = "fashion-mnist"  # a registered data set or a folder of four IDX files
    resize: int | None = None  # scale images to resize x resize on the fly (the book's resize)
    # The class names, recorded by `lenet train` from the data set: predict, export and serve
    # name the classes even where the data set is not. None in runs made before it was kept.
    classes: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.resize is not None:
            _positive("data.resize", self.resize)


@dataclass(frozen=True)
class TrainSpec:
    epochs: int = 10  # the book's num_epochs
    batch_size: int = 128  # the book's
    lr: float = 0.9  # classic edition's train_ch6; the current edition uses 0.1 (preset book-1.0)
    optimizer: str = "sgd"  # plain minibatch SGD, as in the book; or adam, adamw
    momentum: float = 0.0  # SGD momentum; the book uses none
    nesterov: bool = False  # Nesterov's momentum (sgd with momentum > 0)
    weight_decay: float = 0.0  # L2 penalty (decoupled for adamw)
    schedule: str = "constant"  # the book's; cosine or linear decay to 0, set every step
    warmup: float = 0.0  # fraction of all steps spent ramping the lr up from 0 (then: schedule)
    label_smoothing: float = 0.0  # cross-entropy target smoothing; the book uses none
    augment: str = "none"  # training images as they are; flip: random left-right mirror;
    #                        flip+shift: and random shifts of up to 2 px
    seed: int = 0  # init, shuffling: same seed on the CPU, same metrics.csv
    device: str = "auto"  # cuda when available, else cpu
    # Without autograd; 500 keeps a batch's activations near the CPU's caches: evaluating
    # `best` takes 0.77 s at 500, 2.2 s at 2,000 (book on autograd 0.35 vs 0.70 s).
    eval_batch_size: int = 500

    def __post_init__(self):
        _positive("train.epochs", self.epochs)
        _positive("train.batch_size", self.batch_size)
        _positive("train.eval_batch_size", self.eval_batch_size)
        if not (self.lr > 0 and self.lr < float("inf")):
            raise ConfigError(f"train.lr: expected a positive number, got {self.lr}")
        _choice("train.optimizer", self.optimizer, OPTIMIZERS)
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"train.momentum: expected 0 <= m < 1, got {self.momentum}")
        if self.momentum and self.optimizer != "sgd":
            raise ConfigError(f"train.momentum: only for sgd ({self.optimizer} has its own)")
        if self.nesterov and not (self.optimizer == "sgd" and self.momentum > 0):
            raise ConfigError("train.nesterov: needs optimizer sgd with momentum > 0")
        _choice("train.schedule", self.schedule, SCHEDULES)
        _choice("train.augment", self.augment, AUGMENTS)
        for name in ("warmup", "label_smoothing"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"train.{name}: expected 0 <= x < 1, "
                                  f"got {getattr(self, name)}")
        if not 0 <= self.weight_decay < float("inf"):  # nan too
            raise ConfigError(f"train.weight_decay: expected a finite number >= 0, got "
                              f"{self.weight_decay}")
        _choice("train.device", self.device, DEVICES)
        if not 0 <= self.seed < 2**63:  # torch's generators take a signed 64-bit seed
            raise ConfigError(f"train.seed: expected 0 <= seed < 2**63, got {self.seed}")


@dataclass(frozen=True)
class RunConfig:
    preset: str = "book"
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    train: TrainSpec = field(default_factory=TrainSpec)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> RunConfig:
        return _from_dict(cls, d, where)

    @classmethod
    def from_json_file(cls, path: str | Path) -> RunConfig:
        path = Path(path)
        return _from_dict(cls, read_config_file(path), str(path))


def read_config_file(path: str | Path) -> dict:
    """The plain data of a JSON or TOML config file (by suffix; .json otherwise)."""
    path = Path(path)
    toml = path.suffix.lower() == ".toml"
    try:
        if toml:
            try:
                import tomllib
            except ImportError:  # Python 3.10: the same parser, as a package
                import tomli as tomllib

            return tomllib.loads(path.read_text(encoding="utf-8-sig"))
        return json.loads(path.read_text(encoding="utf-8-sig"),
                          object_pairs_hook=_no_repeated_keys)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, expected a config file") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        kind = "TOML" if toml else "JSON"
        raise ConfigError(f"{path}: not a readable {kind} config ({e})") from None


def _no_repeated_keys(pairs: list) -> dict:
    """JSON allows a key twice (the last wins); TOML does not, and neither do we: one of
    the two was meant."""
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"key '{key}' appears twice")
        seen[key] = value
    return seen


def merge_config(base: RunConfig, partial: dict, where: str) -> RunConfig:
    """`base` with the sections and keys given in `partial` replaced (a config file may
    name only what it changes); validated as strictly as a whole config."""
    if not isinstance(partial, dict):
        raise ConfigError(f"{where}: expected a table/object at the top")
    merged = base.to_dict()
    for key, value in partial.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    train = partial.get("train")
    if isinstance(train, dict) and isinstance(merged.get("train"), dict):
        merged["train"].update(inherited_momentum_off(train))
    return _from_dict(RunConfig, merged, where)


def inherited_momentum_off(given: dict) -> dict:
    """What a change in `given` (train settings a user names) turns off of the momentum
    settings a preset or file brought (`fast` and `best`: Nesterov momentum 0.9): switching
    to Adam or AdamW drops momentum and Nesterov, and momentum 0 drops Nesterov, unless
    `given` names them too (then they stay, and are refused as any inconsistent config)."""
    off = {}
    if given.get("optimizer") in ("adam", "adamw"):
        off = {"momentum": 0.0, "nesterov": False}
    elif given.get("momentum") == 0:
        off = {"nesterov": False}
    return {k: v for k, v in off.items() if k not in given}


def _choice(name, value, allowed):
    if value not in allowed:
        raise ConfigError(f"{name}: expected one of {', '.join(allowed)}, got '{value}'")


def _positive(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name}: expected a positive integer, got {value!r}")


def _from_dict(cls, d, where):
    """Build a (nested) frozen dataclass from plain JSON data, strictly."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected an object, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; "
                          f"expected some of {', '.join(sorted(names))}")
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}") for k, v in d.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


def _convert(tp, v, where):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if tp is ConvSpec and isinstance(v, (list, tuple)):  # compact [channels, kernel, padding]
            if not 2 <= len(v) <= 3:
                raise ConfigError(f"{where}: expected [channels, kernel] or [channels, kernel, "
                                  f"padding], got {list(v)!r}")
            v = dict(zip(("channels", "kernel", "padding"), v, strict=False))
        return _from_dict(tp, v, where)
    if origin is tuple:
        if not isinstance(v, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {v!r}")
        item = typing.get_args(tp)[0]
        return tuple(_convert(item, x, f"{where}[{i + 1}]") for i, x in enumerate(v))
    if origin in (typing.Union, types.UnionType):
        if v is None:
            return None
        return _convert(next(a for a in typing.get_args(tp) if a is not type(None)), v, where)
    if tp is float and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if tp in (int, float, str, bool) and not (isinstance(v, tp) and
                                              (tp is bool or not isinstance(v, bool))):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {v!r}")
    return v


PRESETS: dict[str, RunConfig] = {
    # The classic edition's recipe (train_ch6, lr 0.9): ~0.85 test accuracy after 10 epochs.
    "book": RunConfig(preset="book"),
    # The current edition's recipe (d2l 1.0, lr 0.1): sits at chance for ~2 epochs, ~0.73 after 10.
    "book-1.0": RunConfig(preset="book-1.0", train=TrainSpec(lr=0.1)),
    # Exercise 1: ReLU and max-pooling. Plain SGD at 0.9 kills the ReLUs (chance accuracy,
    # seed 0); 0.1 trains well.
    "modern": RunConfig(preset="modern",
                        model=ModelSpec(activation="relu", pooling="max"),
                        train=TrainSpec(lr=0.1)),
    # Beyond the book and quick: exercise 1's network (the book's shapes, ReLU, max-pooling,
    # 61,706 parameters), trained with Nesterov SGD, warm-up and cosine decay, weight decay
    # and label smoothing; ~0.91 in 10 epochs, all of it on the fused C++ kernel. (BatchNorm
    # reaches ~0.91 in 5 epochs, but on autograd: two times slower end to end.)
    "fast": RunConfig(preset="fast",
                      model=ModelSpec(activation="relu", pooling="max", init="kaiming"),
                      train=TrainSpec(epochs=10, lr=0.1, momentum=0.9, nesterov=True,
                                      weight_decay=5e-4, schedule="cosine", warmup=0.1,
                                      label_smoothing=0.1)),
    # The most accurate under 100k parameters (61k) in under two minutes on 2 cores: three
    # 3x3 conv layers (16, 32, 64 channels), one dense layer of 64, random flips, 9 epochs
    # (benchmarks/seeds.py: 9 epochs 0.9268 +- 0.0008 in 61 s; on a slow day, an earlier
    # release: 9 epochs 0.9266 in 116 s, 10 epochs 0.9279 in 135 s, 8 epochs 0.9260 in 104 s
    # but two seeds of five under 0.925).
    "best": RunConfig(preset="best",
                      model=ModelSpec(convs=(ConvSpec(16, 3, 1), ConvSpec(32, 3, 1),
                                             ConvSpec(64, 3, 1)),
                                      dense=(64,), activation="relu", pooling="max",
                                      batch_norm=True, init="kaiming"),
                      train=TrainSpec(epochs=9, lr=0.1, momentum=0.9, nesterov=True,
                                      weight_decay=5e-4, schedule="cosine", warmup=0.25,
                                      label_smoothing=0.1, augment="flip")),
}


def preset(name: str) -> RunConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown preset '{name}': expected one of {', '.join(PRESETS)}"
        ) from None


def override(cfg: RunConfig, section: str, **values) -> RunConfig:
    """A copy of cfg with the given fields of one section replaced (None means keep)."""
    values = {k: v for k, v in values.items() if v is not None}
    if not values:
        return cfg
    return replace(cfg, **{section: replace(getattr(cfg, section), **values)})
