"""What a trained run gets right and wrong: confusion matrix, per-class accuracy, the most
confused pairs, the misclassified examples. Also `load_run`, the one way the inspection
verbs (evaluate's report, predict, activations, export) load a trained network."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lenet import checkpoint
from lenet.config import RunConfig
from lenet.data import layout, sources
from lenet.data.batches import Batches
from lenet.errors import ConfigError, DataError
from lenet.models import build
from lenet.runs import RunFolder


@dataclass(frozen=True, eq=False)
class LoadedRun:
    folder: Path
    config: RunConfig  # the checkpoint's own config, which built `model`
    model: torch.nn.Sequential  # on the CPU, in eval mode
    checkpoint: Path
    epoch: int  # epochs completed when the checkpoint was written
    partial: bool = False  # written mid-epoch (Ctrl-C): the weights are from epoch + 1

    @property
    def epoch_words(self) -> str:
        """"epoch 3", or for a checkpoint written mid-epoch (Ctrl-C) "stopped during
        epoch 4"."""
        if self.partial or not self.epoch:
            return f"stopped during epoch {self.epoch + 1}"
        return f"epoch {self.epoch}"


def load_run(run_dir: str | Path, which: str = "last") -> LoadedRun:
    """The network of a run folder, from its last.ckpt or best.ckpt; raises RunFolderError
    or CheckpointError naming the file."""
    if which not in ("last", "best"):
        raise ConfigError(f"--checkpoint {which}: expected last or best")
    folder = RunFolder(run_dir)
    folder.read_config()  # a clear error for a folder that is not a run
    path = folder.best if which == "best" else folder.last
    state = checkpoint.load(path)
    cfg = state["config"]
    model = build(cfg.model)
    checkpoint.restore_model(path, state, model)
    return LoadedRun(folder.path, cfg, model.eval(), path, int(state["epoch"]),
                     partial=state.get("partial") is not None)


def class_names(cfg: RunConfig) -> tuple[str, ...]:
    """The run's class names without loading (or downloading) its data: those it recorded,
    else (an older run) the registry's, the data folder's (layout.class_names), else "0", "1",
    ... as `sources.load` names them."""
    n = cfg.model.num_classes
    if cfg.data.classes is not None and len(cfg.data.classes) == n:
        return cfg.data.classes
    name = cfg.data.name
    if name in sources.DATASETS and len(sources.DATASETS[name].classes) == n:
        return sources.DATASETS[name].classes
    folder, prefix = Path(name), None
    try:
        folder, prefix = layout.resolve(folder) or (folder, None)
    except DataError:  # a folder of several sets now: the names are not this run's to guess
        pass
    listed = layout.class_names(folder, prefix) if folder.is_dir() else None
    if listed is not None and len(listed[0]) == n:
        return listed[0]
    registered = sources.DATASETS.get(folder.name) if prefix is None else None
    if registered is not None and len(registered.classes) == n:
        return registered.classes
    return tuple(str(k) for k in range(n))


@dataclass(frozen=True, eq=False)
class Predictions:
    labels: np.ndarray  # int64 (N,), the true classes
    pred: np.ndarray  # int64 (N,), the predicted classes
    prob: np.ndarray  # float32 (N,), the probability given to the predicted class
    loss: float = float("nan")  # mean cross-entropy over the N examples

    @property
    def accuracy(self) -> float:
        return float((self.labels == self.pred).mean()) if len(self.labels) else float("nan")


def classify(model: torch.nn.Module, batches: Batches, forward=None) -> Predictions:
    """Predicted class, its probability and the mean loss for every example, in the
    batches' order (give Batches without a generator to keep the split's order); one pass.
    `forward` may replace model(x), e.g. the fused kernel's equivalent."""
    forward = forward or model
    was_training = model.training
    model.eval()
    preds, probs = [], []
    loss_sum = torch.zeros((), dtype=torch.float64, device=batches.labels.device)
    with torch.inference_mode():
        for x, y in batches:
            logits = forward(x).float()
            loss_sum += torch.nn.functional.cross_entropy(logits, y, reduction="sum")
            p, k = torch.softmax(logits, dim=1).max(dim=1)
            preds.append(k)
            probs.append(p)
    model.train(was_training)
    labels = batches.labels.cpu().numpy().astype(np.int64)
    if not preds:
        return Predictions(labels, np.zeros(0, np.int64), np.zeros(0, np.float32))
    return Predictions(labels, torch.cat(preds).cpu().numpy().astype(np.int64),  # one sync
                       torch.cat(probs).cpu().numpy().astype(np.float32),
                       loss_sum.item() / len(labels))


def confusion_matrix(labels: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 (num_classes, num_classes): row = true class, column = predicted class."""
    labels, pred = np.asarray(labels, np.int64), np.asarray(pred, np.int64)
    if labels.shape != pred.shape:
        raise ValueError(f"labels {labels.shape} and predictions {pred.shape} differ in shape")
    for what, a in (("label", labels), ("prediction", pred)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise DataError(f"a {what} lies outside 0..{num_classes - 1}")
    cm = np.bincount(labels * num_classes + pred, minlength=num_classes * num_classes)
    return cm.reshape(num_classes, num_classes).astype(np.int64)


def per_class_accuracy(cm: np.ndarray) -> np.ndarray:
    """float64 (classes,): the fraction of each true class predicted right (nan when the
    class has no examples)."""
    totals = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, np.diag(cm) / np.maximum(totals, 1), np.nan)


def most_confused(cm: np.ndarray, classes, k: int = 5) -> list[tuple[str, str, int]]:
    """The k largest off-diagonal counts as (true class, predicted class, count), largest
    first; ties keep the matrix's row-major order; pairs never confused are left out."""
    off = cm.astype(np.int64).copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(-off, axis=None, kind="stable")[:k]
    n = cm.shape[1]
    return [(classes[i // n], classes[i % n], int(off.flat[i])) for i in flat if off.flat[i] > 0]


def misclassified(p: Predictions) -> np.ndarray:
    """Indices of the wrong predictions, the most confident mistakes first."""
    wrong = np.flatnonzero(p.labels != p.pred)
    return wrong[np.argsort(-p.prob[wrong], kind="stable")]
