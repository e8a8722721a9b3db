"""Every figure, saved as PNG. matplotlib is imported lazily: `lenet summary` and the
hot loop never pay for it."""
from __future__ import annotations

from pathlib import Path

from lenet.checkpoint import atomic_write


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def training_curves(history, path: Path, title: str = "") -> None:
    """The book's plot: train loss, train acc and test acc against epoch, on one axes."""
    plt = _pyplot()
    epochs = [m.epoch for m in history]
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    ax.plot(epochs, [m.train_loss for m in history], "-", label="train loss")
    ax.plot(epochs, [m.train_acc for m in history], "m--", label="train acc")
    ax.plot(epochs, [m.test_acc for m in history], "g-.", label="test acc")
    ax.set_xlabel("epoch")
    ax.set_xlim(0.5 if len(epochs) == 1 else min(epochs) - 0.1, max(epochs) + 0.1)
    ax.grid(True, alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


def compare_curves(runs: list[tuple[str, list]], path: Path) -> None:
    """Test accuracy and train loss of several runs, overlaid, one colour per run."""
    plt = _pyplot()
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    for label, history in runs:
        epochs = [m.epoch for m in history]
        line, = acc_ax.plot(epochs, [m.test_acc for m in history], "-o", ms=3, label=label)
        loss_ax.plot(epochs, [m.train_loss for m in history], "-o", ms=3,
                     color=line.get_color(), label=label)
    acc_ax.set(title="test accuracy", xlabel="epoch")
    loss_ax.set(title="train loss", xlabel="epoch")
    for ax in (acc_ax, loss_ax):
        ax.grid(True, alpha=0.3)
    acc_ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
