"""What a person watching `lenet train` sees: a progress bar within each epoch (only on a
terminal, so CI logs stay readable), one line per epoch, the book's two closing lines.
Every line also goes to the run folder's log.txt."""
from __future__ import annotations

import sys
from pathlib import Path

from lenet.train import Callback, EpochMetrics, Trainer, mean_examples_per_s


class ConsoleProgress(Callback):
    def __init__(self, stream=None, log_path: Path | None = None, bar: bool | None = None):
        self.stream = stream or sys.stdout
        self.log_path = log_path
        self.bar_enabled = self.stream.isatty() if bar is None else bar
        self.bar = None

    def say(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)
        if self.log_path is not None:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(line + "\n")

    def on_fit_start(self, trainer: Trainer) -> None:
        if trainer.partial is not None:  # stopped mid-epoch: that epoch goes on
            self.say(f"resuming epoch {trainer.epoch + 1} of {trainer.spec.epochs} after its "
                     f"step {trainer.partial['step']}")
        elif trainer.epoch:
            self.say(f"resuming after epoch {trainer.epoch} of {trainer.spec.epochs}")

    def on_epoch_start(self, trainer: Trainer, epoch: int, steps: int) -> None:
        if self.bar_enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=steps, desc=f"epoch {epoch}/{trainer.spec.epochs}",
                            unit="batch", leave=False, file=self.stream, dynamic_ncols=True,
                            mininterval=0.2)

    def on_step(self, trainer: Trainer, step: int) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_epoch_end(self, trainer: Trainer, m: EpochMetrics) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        width = len(str(trainer.spec.epochs))
        self.say(f"epoch {m.epoch:>{width}}/{trainer.spec.epochs}  "
                 f"train loss {m.train_loss:.4f}  train acc {m.train_acc:.4f}  "
                 f"test loss {m.test_loss:.4f}  test acc {m.test_acc:.4f}  "
                 f"{m.seconds:5.1f} s  {m.examples_per_s:,.0f} examples/s")

    def on_fit_end(self, trainer: Trainer) -> None:
        last = trainer.history[-1]
        rate = mean_examples_per_s(trainer.history)
        self.say(f"loss {last.train_loss:.3f}, train acc {last.train_acc:.3f}, "
                 f"test acc {last.test_acc:.3f}")
        self.say(f"{rate:.1f} examples/sec on {trainer.device}")
