"""Every figure, saved as PNG (or SVG or PDF, by the file name a user gives). matplotlib is
imported lazily: `lenet summary` and the hot loop never pay for it."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

from lenet.errors import ConfigError
from lenet.files import atomic_write

# A figure's format, from its file name's suffix.
FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}


def figure_format(path: str | Path) -> str:
    """The format a figure at `path` is written in; a ConfigError for any other suffix (a
    PNG named .jpg would be garbage to whatever opens it)."""
    suffix = Path(path).suffix
    fmt = FORMATS.get(suffix.lower())
    if fmt is None:
        got = f"'{suffix}'" if suffix else "no suffix"
        raise ConfigError(f"{path}: a figure is written as .png, .svg or .pdf, not {got}")
    return fmt


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


class CurvePainter:
    """training_curves drawn by a helper process (lenet.plot_worker) that `lenet train`
    starts before it imports torch: matplotlib's import (~0.6 s, a fifth of a book epoch)
    then runs on the otherwise idle second core during set-up, and the trainer waits only
    for the drawing. If the helper cannot start, dies, or fails a drawing, the picture is
    drawn in this process instead, with the same result (or error)."""

    def __init__(self):
        package_root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "lenet.plot_worker"], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        except OSError:
            self._proc = None

    def training_curves(self, history, path: Path, title: str = "") -> None:
        if self._proc is not None:
            request = {"history": [[m.epoch, m.train_loss, m.train_acc, m.test_acc]
                                   for m in history],
                       "path": str(path), "title": title}
            try:
                self._proc.stdin.write(json.dumps(request) + "\n")
                self._proc.stdin.flush()
                if self._proc.stdout.readline().strip() == "ok":
                    return
            except (OSError, ValueError):  # it has gone
                pass
            self.close()
        training_curves(history, path, title)

    def close(self) -> None:
        """Ends the helper (it ends by itself, too, when this process exits)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError, ValueError):
            proc.stdin.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def training_curves(history, path: Path, title: str = "") -> None:
    """The book's plot: train loss, train acc and test acc against epoch, on one axes."""
    plt = pyplot()
    epochs = [m.epoch for m in history]
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    ax.plot(epochs, [m.train_loss for m in history], "-", label="train loss")
    ax.plot(epochs, [m.train_acc for m in history], "m--", label="train acc")
    ax.plot(epochs, [m.test_acc for m in history], "g-.", label="test acc")
    ax.set_xlabel("epoch")
    _whole_epochs(ax)
    ax.set_xlim(0.5 if len(epochs) == 1 else min(epochs) - 0.1, max(epochs) + 0.1)
    ax.grid(True, alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def _whole_epochs(ax) -> None:
    """Epoch ticks at whole numbers (a 2-epoch run would get 1.2, 1.4, ...)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def run_styles(n: int) -> list[tuple]:
    """A (colour, line style) per run, all different: matplotlib's ten colours alone repeat
    from the eleventh run (a sweep's trials compared at once), so then the line style
    changes with each round of the colours."""
    plt = pyplot()
    colours = plt.get_cmap("tab10").colors
    dashes = ("-", "--", ":", "-.")
    return [(colours[i % 10], dashes[i // 10 % len(dashes)]) for i in range(n)]


def compare_curves(runs: list[tuple[str, list]], path: Path) -> None:
    """Test accuracy and train loss of several runs, overlaid, one style per run."""
    plt = pyplot()
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    for (label, history), (colour, dash) in zip(runs, run_styles(len(runs)), strict=True):
        epochs = [m.epoch for m in history]
        for ax, values in ((acc_ax, [m.test_acc for m in history]),
                           (loss_ax, [m.train_loss for m in history])):
            ax.plot(epochs, values, dash, marker="o", ms=3, color=colour, label=label)
    acc_ax.set(title="test accuracy", xlabel="epoch")
    loss_ax.set(title="train loss", xlabel="epoch")
    for ax in (acc_ax, loss_ax):
        ax.grid(True, alpha=0.3)
        _whole_epochs(ax)
    acc_ax.legend(fontsize=8 if len(runs) <= 10 else 6, ncol=1 if len(runs) <= 12 else 2)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: str | Path) -> None:
    """Write `fig` in the format its file name says, atomically, and free it."""
    fmt = figure_format(path)
    atomic_write(Path(path), lambda f: fig.savefig(f, format=fmt))
    pyplot().close(fig)


def _framed(ax) -> None:
    """No ticks, a thin gray frame: a white object touching the edge stays visible."""
    ax.set_axis_on()
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_color("0.6")
        spine.set_linewidth(0.6)


def activations_figure(images, row_labels, maps: dict, path: Path, *, max_maps: int = 16,
                       title: str = "") -> None:
    """One row per input: the input as the network sees it (0 black .. 1 white), labelled
    on the left, then each layer's feature maps. `maps` is {layer title: array (N, C, h, w)};
    every layer has one colour scale shared by all its maps and rows (the colour bar under
    it), so maps can be compared across inputs. At most `max_maps` channels per layer."""
    import numpy as np

    plt = pyplot()
    n = len(images)
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    layers = []
    for name, a in maps.items():
        a = np.asarray(a, dtype=np.float32)
        shown = a[:, :max_maps]
        c, h, w = shown.shape[1:]
        gap = max(1, round(w * 0.08))  # white pixels between maps
        # A row's maps of one layer tiled into one image: one axes per layer, not per map,
        # keeps drawing fast.
        tiles = np.full((n, h, c * (w + gap) - gap), np.nan, np.float32)
        for k in range(c):
            tiles[:, :, k * (w + gap):k * (w + gap) + w] = shown[:, k]
        layers.append((name, tiles, a.shape[1], c, w, gap))
    cell, spacer, left, top, bottom = 0.62, 0.25, 1.55, 0.75, 0.75  # inches
    widths = [1.0]
    for _, tiles, *_, w, _ in layers:
        widths += [spacer / cell, tiles.shape[2] / w]
    width = left + cell * sum(widths) + 0.2
    height = top + bottom + n * cell * 1.08
    fig, axes = plt.subplots(n, len(widths), figsize=(width, height), dpi=100, squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    fig.subplots_adjust(left=left / width, right=1 - 0.2 / width, top=1 - top / height,
                        bottom=bottom / height, wspace=0.0, hspace=0.08)
    for ax in axes.flat:
        ax.set_axis_off()
    for r in range(n):
        ax = axes[r, 0]
        ax.imshow(np.asarray(images[r]) / 255.0, cmap="gray", vmin=0, vmax=1)
        _framed(ax)
        ax.text(-0.12, 0.5, row_labels[r], transform=ax.transAxes, ha="right", va="center",
                fontsize=8)
    axes[0, 0].set_title("input", fontsize=8)
    for i, (name, tiles, total, c, w, gap) in enumerate(layers):
        col = 2 + 2 * i
        finite = tiles[np.isfinite(tiles)]
        lo, hi = float(finite.min()), float(finite.max())
        hi = hi if hi > lo else lo + 1e-6
        for r in range(n):
            image = axes[r, col].imshow(np.ma.masked_invalid(tiles[r]), cmap=cmap, vmin=lo,
                                        vmax=hi, aspect="auto", interpolation="nearest")
        head = axes[0, col]
        head.set_axis_on()
        head.set_yticks([])
        head.xaxis.set_ticks_position("top")
        head.set_xticks([k * (w + gap) + (w - 1) / 2 for k in range(c)],
                        [str(k + 1) for k in range(c)], fontsize=7)
        head.tick_params(length=0, pad=2)
        for spine in head.spines.values():
            spine.set_visible(False)
        box = head.get_position()
        shown = f"{c} of {total}" if total > c else f"{total}"
        fig.text((box.x0 + box.x1) / 2, box.y1 + 0.3 / height,
                 f"{name}: {shown} maps, {tiles.shape[1]}x{w}", ha="center", va="bottom",
                 fontsize=9)
        low = axes[n - 1, col].get_position()
        bar = fig.add_axes((box.x0, low.y0 - 0.42 / height, box.x1 - box.x0, 0.12 / height))
        fig.colorbar(image, cax=bar, orientation="horizontal")
        bar.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 0.08 / height, va="top")
    _save(fig, path)


def confusion_figure(cm, classes, path: Path, title: str = "") -> None:
    """The confusion matrix: counts written in each cell (up to 50 classes), colour = the
    fraction of the true class (row-normalised), true class down, predicted class across."""
    import numpy as np

    plt = pyplot()
    cm = np.asarray(cm)
    k = len(classes)
    rows = cm.sum(axis=1, keepdims=True)
    frac = cm / np.maximum(rows, 1)
    # Cells of 0.62 inch up to 35 classes; beyond, the figure stays 24 inches (2,600 pixels)
    # at most and the cells shrink: EMNIST's 62 classes would otherwise be 4,500 pixels.
    cell = min(0.62, 22 / k)
    side = max(4.5, cell * k + 2.2)
    fig, ax = plt.subplots(figsize=(side + 0.9, side), dpi=110)
    image = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    label = max(3.0, min(8.0, 0.8 * cell * 72))  # points: no taller than a cell
    ax.set_xticks(range(k), classes, rotation=40 if k <= 35 else 90,
                  ha="right" if k <= 35 else "center", fontsize=label)
    ax.set_yticks(range(k), classes, fontsize=label)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    size = 7 if k <= 12 else 5
    for i, j in np.argwhere(cm) if k <= 50 else ():  # beyond 50 the counts stop fitting
        ax.text(j, i, f"{cm[i, j]:,}", ha="center", va="center", fontsize=size,
                color="white" if frac[i, j] > 0.55 else "black")
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03)
    bar.set_label("fraction of the true class", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    accuracy = np.trace(cm) / max(cm.sum(), 1)
    ax.set_title((f"{title}\n" if title else "") +
                 f"{int(cm.sum()):,} images, accuracy {accuracy:.4f}", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def misclassified_gallery(images, true, pred, probs, classes, path: Path, n: int = 32,
                          title: str = "") -> None:
    """Up to n misclassified images in a grid, in the order given (most confident mistakes
    first is the useful order), each titled with its true class and the prediction."""
    import numpy as np

    plt = pyplot()
    count = min(n, len(images))
    cols = 8
    rows = max(1, -(-count // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.45, rows * 1.75 + 0.5), dpi=100,
                             squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for i in range(count):
        ax = axes.flat[i]
        ax.imshow(np.asarray(images[i]) / 255.0, cmap="gray", vmin=0, vmax=1)
        _framed(ax)
        ax.set_title(f"{classes[int(true[i])]}\n→ {classes[int(pred[i])]} {float(probs[i]):.2f}",
                     fontsize=7, pad=2, color="black")
    if count == 0:
        axes[0, 0].text(0, 0.5, "no misclassified images", fontsize=10)
    fig.suptitle(title or f"misclassified: true class, then → prediction and its probability "
                 f"({count} shown)", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def sweep_figures(study, folder: Path) -> dict[str, str]:
    """Optuna's optimization history and parameter importances as PNGs in `folder`.
    Returns {file name: why it was not drawn} for a figure the study cannot give yet."""
    import warnings

    from optuna.visualization import matplotlib as ov

    plt = pyplot()
    if not any(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False)):
        return {name: "no complete trial yet" for name in ("history.png", "importances.png")}
    skipped = {}
    for name, draw in (("history.png", ov.plot_optimization_history),
                       ("importances.png", ov.plot_param_importances)):
        try:
            # Optuna's plots switch the global style to ggplot: keep that to these figures.
            with warnings.catch_warnings(), plt.style.context("default"):
                warnings.simplefilter("ignore")
                ax = draw(study, target_name="test accuracy")
        except (ValueError, RuntimeError) as e:  # e.g. importances need 2+ complete trials
            skipped[name] = " ".join(str(e).split())
            continue
        fig = ax.figure
        fig.set_size_inches(7, 4.5)
        # bbox "tight": Optuna puts the history's legend outside the axes
        atomic_write(folder / name, lambda f, fig=fig: fig.savefig(f, format="png",
                                                                  bbox_inches="tight"))
        plt.close(fig)
    return skipped
