"""Networks built from a `ModelSpec`; the book's LeNet-5 is the `book` preset, not a class."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from lenet.config import ModelSpec
from lenet.errors import ConfigError

_ACTIVATIONS = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}
_POOLS = {"avg": nn.AvgPool2d, "max": nn.MaxPool2d}


# Far beyond any LeNet-sized network (the book's: 61,706 parameters, 6,304 conv outputs per
# image), and still within a laptop's memory for a batch of 128: a spec past these is a typo
# (an extra zero or two) that would otherwise end in an allocation error or the OOM killer.
MAX_PARAMS = 100_000_000
MAX_CONV_VALUES = 4_000_000  # conv outputs per image, summed over the conv layers


def feature_shapes(spec: ModelSpec) -> list[tuple[str, tuple[int, ...]]]:
    """Output shape after each conv and pool, computed before any layer exists, so a spec
    whose feature maps vanish, or that is far too large to train, is rejected with the
    reason instead of a torch error."""
    c, s = spec.in_channels, spec.image_size
    shapes = []
    values = 0
    for i, conv in enumerate(spec.convs, 1):
        out = s + 2 * conv.padding - conv.kernel + 1
        if out < 1:
            raise ConfigError(
                f"conv{i}: a {conv.kernel}x{conv.kernel} kernel with padding {conv.padding} "
                f"does not fit its {c}x{s}x{s} input (expected a kernel of at most "
                f"{s + 2 * conv.padding} with that padding)")
        c, s = conv.channels, out
        values += c * s * s
        shapes.append((f"conv{i}", (c, s, s)))
        if s // spec.pool < 1:
            raise ConfigError(f"pool{i}: a {spec.pool}x{spec.pool} pool does not fit its "
                              f"{c}x{s}x{s} input (output would be 0x0)")
        s //= spec.pool
        shapes.append((f"pool{i}", (c, s, s)))
    if values > MAX_CONV_VALUES:
        raise ConfigError(f"model: its conv layers output {values:,} values per image, at "
                          f"most {MAX_CONV_VALUES:,} (the book's: 6,304); fewer channels "
                          "or a smaller --resize")
    params = spec_params(spec, c * s * s)
    if params > MAX_PARAMS:
        raise ConfigError(f"model: {params:,} parameters, at most {MAX_PARAMS:,} (the "
                          "book's: 61,706); narrower layers, or more pooling before the "
                          "dense ones")
    return shapes


def spec_params(spec: ModelSpec, flat: int) -> int:
    """The parameters `build(spec)` will have, counted without building it; `flat` is the
    width of the flattened conv output."""
    c, params = spec.in_channels, 0
    norm = 2 if spec.batch_norm else 0  # BatchNorm's weight and bias per channel
    for conv in spec.convs:
        params += c * conv.channels * conv.kernel**2 + conv.channels * (1 + norm)
        c = conv.channels
    for hidden in spec.dense:
        params += flat * hidden + hidden * (1 + norm)
        flat = hidden
    return params + flat * spec.num_classes + spec.num_classes


def build(spec: ModelSpec) -> nn.Sequential:
    """The network for `spec`, initialised as the spec says. Layers are named (conv1, [bn1,]
    act1, pool1, ..., fc1, ...) so activations can be captured by name."""
    c, s = spec.in_channels, spec.image_size
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    shapes = dict(feature_shapes(spec))
    for i, conv in enumerate(spec.convs, 1):
        layers[f"conv{i}"] = nn.Conv2d(c, conv.channels, conv.kernel, padding=conv.padding)
        if spec.batch_norm:
            layers[f"bn{i}"] = nn.BatchNorm2d(conv.channels)
        layers[f"act{i}"] = _ACTIVATIONS[spec.activation]()
        layers[f"pool{i}"] = _POOLS[spec.pooling](kernel_size=spec.pool, stride=spec.pool)
        c, s, _ = shapes[f"pool{i}"]
    layers["flatten"] = nn.Flatten()
    width = c * s * s
    n_conv = len(spec.convs)
    for j, hidden in enumerate(spec.dense, 1):
        layers[f"fc{j}"] = nn.Linear(width, hidden)
        if spec.batch_norm:
            layers[f"bn{n_conv + j}"] = nn.BatchNorm1d(hidden)
        layers[f"act{n_conv + j}"] = _ACTIVATIONS[spec.activation]()
        if spec.dropout:
            layers[f"drop{j}"] = nn.Dropout(spec.dropout)
        width = hidden
    layers[f"fc{len(spec.dense) + 1}"] = nn.Linear(width, spec.num_classes)
    model = nn.Sequential(layers)
    init_weights(model, spec.init)
    return model


def init_model(spec: ModelSpec, seed: int) -> nn.Sequential:
    """`build(spec)` with its initial weights fixed by `seed` (global RNG left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build(spec)


def init_weights(model: nn.Module, scheme: str) -> None:
    """Re-initialise every conv and linear weight; biases keep PyTorch's default init
    (as the book's init_cnn does)."""
    if scheme == "default":
        return
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if scheme == "xavier-uniform":
                nn.init.xavier_uniform_(m.weight)
            elif scheme == "kaiming":
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class LayerRow:
    name: str
    kind: str
    output_shape: tuple[int, ...]  # per example, batch dimension left out
    params: int
    mult_adds: int  # per example


def summary(model: nn.Sequential, input_shape: tuple[int, ...]) -> list[LayerRow]:
    """One row per layer, as the book's layer_summary prints it, plus parameters and
    multiply-adds per example (conv and linear only: pooling and activations do no
    multiply-adds)."""
    x = torch.zeros(1, *input_shape)
    rows = []
    was_training = model.training
    model.eval()  # batch norm cannot run training-mode statistics on one example
    with torch.inference_mode():
        for name, layer in model.named_children():
            x = layer(x)
            out = tuple(x.shape[1:])
            macs = 0
            if isinstance(layer, nn.Conv2d):
                k = layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]
                macs = x[0].numel() * k
            elif isinstance(layer, nn.Linear):
                macs = layer.in_features * layer.out_features
            rows.append(LayerRow(name, type(layer).__name__, out, num_params(layer), macs))
    model.train(was_training)
    return rows


def format_summary(rows: list[LayerRow], input_shape: tuple[int, ...]) -> str:
    """The summary as a fixed-width table, totals at the bottom."""
    def shape(s):
        return "x".join(str(d) for d in s)

    lines = [f"{'layer':<9} {'type':<12} {'output shape':>14} {'params':>9} {'mult-adds':>11}",
             f"{'input':<9} {'':<12} {shape(input_shape):>14} {'':>9} {'':>11}"]
    for r in rows:
        lines.append(f"{r.name:<9} {r.kind:<12} {shape(r.output_shape):>14} "
                     f"{r.params:>9,} {r.mult_adds:>11,}")
    params = sum(r.params for r in rows)
    macs = sum(r.mult_adds for r in rows)
    lines.append("-" * len(lines[0]))
    lines.append(f"{'total':<9} {'':<12} {'':>14} {params:>9,} {macs:>11,}")
    lines.append(f"{params:,} parameters; {macs / 1e6:.2f} M multiply-adds per image (forward)")
    return "\n".join(lines)
