"""Look inside the network (the chapter's exercises 4 and 5): what the conv layers' feature
maps show for chosen inputs, test images, your own images, the photographs shipped with the
package (lenet.samples), noise or a blank picture."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lenet.errors import ConfigError
from lenet.samples import path as sample_path

# A unit counts as active above its activation's midpoint: sigmoid outputs 0.5 for a zero
# input, so only > 0.5 means the weighted sum was positive; tanh, ReLU and GELU are > 0.
ACTIVE_ABOVE = {"sigmoid": 0.5, "tanh": 0.0, "relu": 0.0, "gelu": 0.0}
NOISES = ("uniform", "gaussian")


@dataclass(frozen=True, eq=False)
class Probe:
    """One input to look at: uint8 pixels (H, W) as the network sees them (light on black)."""

    name: str  # what the row is called, e.g. "test #17" or "shoe.jpg"
    image: np.ndarray
    label: str | None = None  # the true class, when known


@dataclass(frozen=True)
class LayerStats:
    mean: float
    max: float
    active: float  # fraction of units above ACTIVE_ABOVE[activation]


def conv_activations(model: torch.nn.Module) -> list[str]:
    """The activation after each conv layer (act1, act2, ... for conv1, conv2, ...)."""
    names = dict(model.named_children())
    return [f"act{i}" for i in range(1, len(names) + 1)
            if f"conv{i}" in names and f"act{i}" in names]


def capture(model: torch.nn.Module, x: torch.Tensor,
            layers: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """The outputs of the named layers (default: every conv layer's activation,
    `conv_activations`) for input `x` (N, C, H, W), in eval mode without autograd; on the
    CPU, in the order of `layers` (`trace`, with the mode switched)."""
    was_training = model.training
    model.eval()
    try:
        return trace(model, x, layers)[1]
    finally:
        model.train(was_training)


def trace(model: torch.nn.Sequential, x: torch.Tensor, layers: Sequence[str] | None = None
          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and the named layers' outputs (default: `conv_activations`) from one forward
    pass, layer by layer (what nn.Sequential does), without hooks: safe to call from several
    threads at once. The model must already be in eval mode (a server's is; `capture`
    switches it)."""
    if layers is None:
        layers = conv_activations(model)
    modules = dict(model.named_children())
    unknown = [n for n in layers if n not in modules]
    if unknown:
        raise ConfigError(f"unknown layer '{unknown[0]}': expected one of {', '.join(modules)}")
    wanted = set(layers)
    out: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        x = x.to(next(model.parameters()).device)
        for name, module in modules.items():
            x = module(x)
            if name in wanted:
                out[name] = x.cpu()
    return x.cpu(), {n: out[n] for n in layers}


def active_threshold(activation: str) -> float:
    try:
        return ACTIVE_ABOVE[activation]
    except KeyError:
        raise ConfigError(f"activation '{activation}': expected one of "
                          f"{', '.join(ACTIVE_ABOVE)}") from None


def stats(acts: dict[str, torch.Tensor], activation: str = "sigmoid"
          ) -> list[dict[str, LayerStats]]:
    """Per input, per layer: mean and max activation and the fraction of active units.
    A unit is active above its activation's midpoint: > 0.5 for sigmoid, > 0 for tanh,
    ReLU and GELU (see ACTIVE_ABOVE)."""
    above = active_threshold(activation)
    n = len(next(iter(acts.values()))) if acts else 0
    rows: list[dict[str, LayerStats]] = [{} for _ in range(n)]
    for name, a in acts.items():
        flat = a.reshape(len(a), -1).float()
        means, maxes = flat.mean(1).tolist(), flat.amax(1).tolist()
        active = (flat > above).float().mean(1).tolist()
        for i in range(n):
            rows[i][name] = LayerStats(means[i], maxes[i], active[i])
    return rows


def class_indices(names: Sequence[str], classes: Sequence[str]) -> list[int]:
    """Class numbers for names, ignoring surrounding spaces: the exact name first, else the
    one name equal to it case-insensitively (EMNIST's balanced split has both "A" and "a").
    An unknown name is a ConfigError listing the valid ones."""
    exact = {c.strip(): k for k, c in enumerate(classes)}
    found = []
    for name in names:
        name = name.strip()
        k = exact.get(name)
        if k is None:
            alike = [k for k, c in enumerate(classes) if c.strip().lower() == name.lower()]
            if len(alike) != 1:
                expected = (" or ".join(repr(classes[k]) for k in alike) if alike
                            else f"one of {', '.join(classes)}")
                raise ConfigError(f"unknown class '{name}': expected {expected}")
            k = alike[0]
        found.append(k)
    return found


def first_of_class(labels: np.ndarray, k: int, count: int) -> list[int]:
    """The first `count` indices whose label is k (fewer if the split has fewer)."""
    return np.flatnonzero(labels == k)[:count].tolist()


def noise(kind: str, rng: np.random.Generator, size: int = 28) -> np.ndarray:
    """uint8 (size, size): uniform over 0..255, or gaussian around mid-gray (sd 64)."""
    if kind == "uniform":
        return rng.integers(0, 256, (size, size), dtype=np.uint8)
    if kind == "gaussian":
        return np.clip(rng.normal(128, 64, (size, size)).round(), 0, 255).astype(np.uint8)
    raise ConfigError(f"--noise {kind}: expected one of {', '.join(NOISES)}")


def choose(split=None, classes: Sequence[str] = (), *, class_names: Sequence[str] = (),
           per_class: int = 2, indices: Sequence[int] = (), images: Sequence[Path] = (),
           samples: Sequence[str] = (), noises: Sequence[str] = (), seed: int = 0,
           blank: bool = False, size: int = 28) -> list[Probe]:
    """The inputs to look at, in this order: test images of the named classes (`per_class`
    each), test images by index, image files, the package's sample photographs, noise, a
    blank image. With no selector: `per_class` Pullovers and Coats when the classes exist
    (the pair the network confuses most), else of the first two classes present. `split` (images,
    labels) is needed for class names, indices and the default."""
    from lenet.predict import fit_size, load_image

    def from_test(i: int, name: str) -> Probe:  # at the network's size (a --resize run's)
        return Probe(name, fit_size(split.images[i:i + 1], size)[0],
                     classes[int(split.labels[i])])

    nothing = not (class_names or indices or images or samples or noises or blank)
    if nothing:
        # The chapter's sweaters and coats; on other data, the first two classes present.
        wanted = [c for c in ("pullover", "coat") if c in {x.lower() for x in classes}]
        if len(wanted) < 2 and split is not None:
            wanted = [classes[k] for k in np.unique(split.labels)[:2]]
        class_names = wanted
    if (class_names or indices) and split is None:
        raise ConfigError("choosing test images needs the run's data set")
    if per_class < 1:
        raise ConfigError(f"--per-class {per_class}: expected a positive integer")
    if seed < 0:
        raise ConfigError(f"--seed {seed}: expected a non-negative integer")
    probes = []
    for k in class_indices(class_names, classes):
        found = first_of_class(split.labels, k, per_class)
        if not found:
            raise ConfigError(f"class '{classes[k]}': the test set holds no such image")
        probes += [from_test(i, f"test #{i}") for i in found]
    n = len(split.labels) if split is not None else 0
    for i in indices:
        if not 0 <= i < n:
            raise ConfigError(f"--index {i}: expected 0 to {n - 1} (the test set's size)")
        probes.append(from_test(i, f"test #{i}"))
    for p in images:  # an image with nothing in it is named so: it reads as the blank input
        x = load_image(p, size)
        probes.append(Probe(Path(p).name + ("" if x.any() else " (blank)"), x))
    probes += [Probe(f"{name} (sample)", load_image(sample_path(name), size)) for name in samples]
    rng = np.random.default_rng(seed)
    probes += [Probe(f"{kind} noise", noise(kind, rng, size)) for kind in noises]
    if blank:
        probes.append(Probe("blank", np.zeros((size, size), np.uint8)))
    return probes
