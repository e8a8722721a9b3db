"""The run folder: everything a user needs to resume, compare or report a run.

runs/<YYYYmmdd-HHMMSS>-<preset>/  config.json  metrics.csv  curves.png  summary.txt
                                  last.ckpt  best.ckpt  log.txt
"""
from __future__ import annotations

import contextlib
import csv
import io
import os
import time
from pathlib import Path

from lenet import checkpoint, plots
from lenet.config import RunConfig
from lenet.errors import LenetError, RunFolderError
from lenet.files import atomic_write
from lenet.train import METRIC_COLUMNS, Callback, EpochMetrics, Trainer, mean_examples_per_s


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = self.path / "config.json"
        self.metrics = self.path / "metrics.csv"
        self.curves = self.path / "curves.png"
        self.summary = self.path / "summary.txt"
        self.last = self.path / "last.ckpt"
        self.best = self.path / "best.ckpt"
        self.log = self.path / "log.txt"
        self._lock_fd: int | None = None  # held open while this process trains here

    @staticmethod
    def new(root: str | Path, preset: str) -> RunFolder:
        """A fresh, not yet existing folder under `root` named by time and preset."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = Path(root) / f"{stamp}-{preset}"
        n = 2
        while path.exists():
            path, n = Path(root) / f"{stamp}-{preset}-{n}", n + 1
        return RunFolder(path)

    def create(self, cfg: RunConfig) -> bool:
        """Make the folder, take its lock and write config.json; fail early, naming the
        folder, when it already holds a run or cannot be written. True when it replaced a
        run that had stopped before its first checkpoint."""
        self.check_new()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.lock()
            self.check_new()  # another process may have created it meanwhile
            replaced = self.config.exists()
            if replaced:  # the stopped run's own files (check_new: it wrote config.json)
                self.log.unlink(missing_ok=True)
            self.write_text(self.config, cfg.to_json())
        except OSError as e:
            raise RunFolderError(f"{self.path}: cannot write the run folder "
                                 f"({e.strerror or e})") from None
        return replaced

    def lock(self) -> None:
        """Hold an exclusive lock on the folder for as long as this process lives, so two
        trainings never interleave their files in one folder."""
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd):
            os.close(fd)
            holder = (self.path / ".lock").read_text(errors="replace").strip() or "another process"
            raise RunFolderError(f"{self.path}: in use by another lenet train ({holder}); "
                                 f"wait for it to finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}\n".encode())
        self._lock_fd = fd  # closing it releases the lock
        # Temp files of a writer killed mid-write (files.atomic_write): with the lock held,
        # nobody else is writing them.
        for target in (self.config, self.metrics, self.curves, self.summary, self.last,
                       self.best):
            for stale in self.path.glob(f".{target.name}.*.tmp"):
                stale.unlink(missing_ok=True)

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def check_new(self) -> None:
        """Refuse a folder that already holds a run (or a file in the folder's place)."""
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"{self.path}: is a file, expected a folder for the run "
                                 "(--out names the run folder)")
        files = [p.name for p in (self.last, self.best, self.metrics) if p.exists()]
        if files and not self.last.exists():
            raise RunFolderError(f"{self.path}: holds a run's {', '.join(files)} but no "
                                 "last.ckpt to resume from; choose another --out")
        if files and not self.config.exists():
            raise RunFolderError(f"{self.path}: holds a run's {', '.join(files)} (its "
                                 "config.json is gone); choose another --out")
        if self.config.exists() and not self.last.exists():
            # Stopped before its first checkpoint (Ctrl-C while the kernel built, a recipe
            # that diverged at once): nothing to resume or lose, so the same command, run
            # again, trains here (create replaces its config.json and log.txt). Only a
            # lenet run's: a config.json of something else is not ours to replace.
            try:
                RunConfig.from_json_file(self.config)
            except (LenetError, OSError):
                raise RunFolderError(f"{self.path}: holds a config.json that is not a lenet "
                                     "run's; choose another --out") from None
            return
        if self.config.exists():
            raise RunFolderError(f"{self.path}: already holds a run; continue it with "
                                 f"'lenet train --resume {self.path}' or choose another --out")

    def read_config(self) -> RunConfig:
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"{self.path}: is a file, expected a run folder")
        if not self.path.is_dir():
            raise RunFolderError(f"{self.path}: no such run folder")
        if not self.config.is_file():
            raise RunFolderError(f"{self.path}: not a run folder (no config.json)")
        return RunConfig.from_json_file(self.config)

    def checkpoint_for_resume(self) -> Path:
        if not self.last.is_file() and self.best.is_file():
            raise RunFolderError(f"{self.path}: has no last.ckpt to resume from, but a "
                                 "best.ckpt: copy it to last.ckpt to resume from the best epoch")
        if not self.last.is_file():
            raise RunFolderError(f"{self.path}: has no last.ckpt to resume from "
                                 f"(the run stopped before its first epoch ended)")
        return self.last

    def write_text(self, path: Path, text: str) -> None:
        atomic_write(path, lambda f: f.write(text.encode()))

    def write_metrics(self, history: list[EpochMetrics]) -> None:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(METRIC_COLUMNS)
        for m in history:
            w.writerow([m.epoch, f"{m.train_loss:.6f}", f"{m.train_acc:.6f}",
                        f"{m.test_loss:.6f}", f"{m.test_acc:.6f}", f"{m.seconds:.3f}",
                        f"{m.examples_per_s:.1f}"])
        self.write_text(self.metrics, buf.getvalue())


def read_history(folder: RunFolder) -> list[EpochMetrics]:
    """metrics.csv back as EpochMetrics (empty when the run has no finished epoch)."""
    if not folder.metrics.is_file():
        return []
    try:
        with open(folder.metrics, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        return [EpochMetrics(int(r["epoch"]), *(float(r[c]) for c in METRIC_COLUMNS[1:]))
                for r in rows]
    except (KeyError, ValueError, TypeError) as e:
        raise RunFolderError(f"{folder.metrics}: not a metrics.csv with columns "
                             f"{','.join(METRIC_COLUMNS)} ({e})") from None


class RunWriter(Callback):
    """Writes the run folder as training goes: after every epoch last.ckpt, best.ckpt (when
    test accuracy improves), metrics.csv and curves.png; at the end summary.txt. last.ckpt is
    written first, so a full disk still leaves the epoch's checkpoint; a process killed after
    it and before the others is mended by the resume, which first rewrites metrics.csv from
    the checkpoint's own history, and best.ckpt when the resumed epoch is the best and
    best.ckpt missed it."""

    # Drawing curves.png costs ~0.25 s, 10% of a book epoch here (the first one ~0.7 s, with
    # matplotlib's import): drawn after an epoch only when training started, or the last
    # drawing was made, this long ago; and always at the end (or on Ctrl-C). A 30 s book run
    # draws it once; a long run still shows its curves every half minute.
    PLOT_EVERY_S = 30.0

    def __init__(self, folder: RunFolder, cfg: RunConfig, model_summary: str,
                 painter: plots.CurvePainter | None = None):
        self.folder, self.cfg, self.model_summary = folder, cfg, model_summary
        self.painter = painter  # draws curves.png; None: in this process
        self._plotted = (0, time.monotonic())  # (epochs drawn, when); reset at fit start

    def on_fit_start(self, trainer: Trainer) -> None:
        self._plotted = (0, time.monotonic())
        if trainer.history:  # resuming: make the folder agree with last.ckpt
            with self._writing():
                self.folder.write_metrics(trainer.history)
                if trainer.partial is None and self._best_missed(trainer):
                    self._save(self.folder.best, trainer)

    def _best_missed(self, trainer: Trainer) -> bool:
        """Whether the resumed epoch is the best so far but best.ckpt does not hold it."""
        if trainer.history[-1].test_acc < max(m.test_acc for m in trainer.history):
            return False
        try:
            return checkpoint.load(self.folder.best)["epoch"] != trainer.epoch
        except LenetError:  # missing or unreadable
            return True

    def on_epoch_end(self, trainer: Trainer, metrics: EpochMetrics) -> None:
        f = self.folder
        with self._writing():
            self._save(f.last, trainer)
            if metrics.test_acc >= max(m.test_acc for m in trainer.history):
                self._save(f.best, trainer)
            f.write_metrics(trainer.history)
            if (trainer.epoch == trainer.spec.epochs
                    or time.monotonic() - self._plotted[1] >= self.PLOT_EVERY_S):
                self._plot(trainer)

    def on_interrupt(self, trainer: Trainer) -> None:
        with self._writing():
            self._save(self.folder.last, trainer)  # with the epoch's progress in it
            self._plot(trainer)

    def _plot(self, trainer: Trainer) -> None:
        if trainer.history and self._plotted[0] != len(trainer.history):
            (self.painter or plots).training_curves(trainer.history, self.folder.curves,
                                                    title=self.folder.path.name)
            self._plotted = (len(trainer.history), time.monotonic())

    def _save(self, path: Path, trainer: Trainer) -> None:
        checkpoint.save(path, config=self.cfg, epoch=trainer.epoch, model=trainer.model,
                        optimizer=trainer.optimizer, generator=trainer.generator,
                        history=[m.as_dict() for m in trainer.history],
                        partial=trainer.partial)

    @contextlib.contextmanager
    def _writing(self):
        try:
            yield
        except OSError as e:
            raise RunFolderError(f"{self.folder.path}: cannot write the run folder "
                                 f"({e.strerror or e})") from None

    def on_fit_end(self, trainer: Trainer) -> None:
        last = trainer.history[-1]
        best = max(trainer.history, key=lambda m: m.test_acc)
        total = sum(m.seconds for m in trainer.history)
        text = (f"run {self.folder.path.name}: preset {self.cfg.preset}, data "
                f"{self.cfg.data.name}, device {trainer.device}\n\n{self.model_summary}\n\n"
                f"epochs {last.epoch}, lr {self.cfg.train.lr}, batch {self.cfg.train.batch_size}"
                f", seed {self.cfg.train.seed}\n"
                f"final: loss {last.train_loss:.3f}, train acc {last.train_acc:.3f}, "
                f"test acc {last.test_acc:.3f}\n"
                f"best test acc {best.test_acc:.3f} at epoch {best.epoch}\n"
                f"{total:.1f} s in epochs; "
                f"{mean_examples_per_s(trainer.history):,.0f} examples/s in the training loop\n")
        self.folder.write_text(self.folder.summary, text)


# Windows locks byte ranges, and a locked range cannot be read by others: the lock takes a
# byte far past the file's text (the holder's pid, which a refused process reads).
_WINDOWS_LOCK_BYTE = 1 << 30


def _try_lock(fd: int) -> bool:
    """An exclusive lock on the open file `fd`, without waiting, released when `fd` closes:
    flock on POSIX, msvcrt.locking on Windows. False when another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        os.lseek(fd, _WINDOWS_LOCK_BYTE, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        finally:
            os.lseek(fd, 0, os.SEEK_SET)
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
