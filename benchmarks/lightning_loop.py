"""The book's LeNet-5 recipe in PyTorch Lightning, as a speed and accuracy peer.

The same network and init as the book's loop (book_loop.py: Xavier-uniform weights, torch's
default biases), the same data (the IDX files, x / 255), batch 128, SGD lr 0.9,
cross-entropy, test accuracy after every epoch (Lightning's validation loop on the test
split): a LightningModule trained by `Trainer.fit`, as a Lightning user writes it, on
in-memory tensors (TensorDataset + DataLoader, no workers: the images are already tensors,
so workers would only add copies between processes), with Lightning's logger, checkpoints,
progress bar and model summary off. Needs lightning; run it with the interpreter that has it:

    python lightning_loop.py [--epochs 10] [--lr 0.9] [--batch-size 128] [--data DIR]

Prints one line per epoch and, last, a JSON line in the format of book_loop.py:
  {"peer": "lightning", "test_acc": .., "train_examples_per_s": .., "epoch_seconds": [..], ..}
train_examples_per_s is over the training loop (Lightning's train epoch, data included).
"""
import json
import time
import warnings

T0 = time.time()

import lightning as L  # noqa: E402 - after T0: the wall time counts imports, as book_loop.py
import peer_data  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils import data  # noqa: E402


def split(root, prefix):
    images, labels = peer_data.split(root, prefix)
    return data.TensorDataset(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels))


class LeNet(L.LightningModule):
    def __init__(self, lr):
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(
            nn.Conv2d(1, 6, kernel_size=5, padding=2), nn.Sigmoid(),
            nn.AvgPool2d(kernel_size=2, stride=2),
            nn.Conv2d(6, 16, kernel_size=5), nn.Sigmoid(),
            nn.AvgPool2d(kernel_size=2, stride=2),
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120), nn.Sigmoid(),
            nn.Linear(120, 84), nn.Sigmoid(),
            nn.Linear(84, 10))
        for m in self.net:
            if type(m) in (nn.Linear, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
        self.loss = nn.CrossEntropyLoss()

    def training_step(self, batch, _):
        x, y = batch
        y_hat = self.net(x)
        loss = self.loss(y_hat, y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        self.log("train_acc", (y_hat.argmax(1) == y).float().mean(), on_step=False,
                 on_epoch=True)
        return loss

    def validation_step(self, batch, _):
        x, y = batch
        self.log("test_acc", (self.net(x).argmax(1) == y).float().mean(), on_epoch=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class Clock(L.Callback):
    """Each epoch's training-loop seconds and whole seconds (validation included), and a
    line per epoch."""

    def __init__(self, examples):
        self.examples, self.loops, self.epochs = examples, [], []

    def on_train_epoch_start(self, trainer, module):
        self.t = time.time()

    def on_validation_epoch_start(self, trainer, module):  # no sanity check runs before fit
        self.loops.append(time.time() - self.t)

    def on_train_epoch_end(self, trainer, module):
        # Lightning validates before this hook: the epoch's whole time ends here.
        self.epochs.append(time.time() - self.t)
        m = trainer.callback_metrics
        print(f"epoch {len(self.epochs)}: loss {float(m['train_loss']):.3f}, train acc "
              f"{float(m['train_acc']):.3f}, test acc {float(m['test_acc']):.3f}, "
              f"{self.examples / self.loops[-1]:.0f} examples/s", flush=True)


def main():
    p = peer_data.parser()
    a = p.parse_args()
    # Lightning suggests workers for the loaders; with in-memory tensors they only cost.
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    L.seed_everything(a.seed, verbose=False)
    train, test = split(a.data, "train"), split(a.data, "t10k")
    clock = Clock(len(train))
    trainer = L.Trainer(max_epochs=a.epochs, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[clock])
    trainer.fit(LeNet(a.lr), data.DataLoader(train, a.batch_size, shuffle=True),
                data.DataLoader(test, a.batch_size))
    test_acc = float(trainer.callback_metrics["test_acc"])
    print(json.dumps({
        "peer": "lightning", "epochs": a.epochs, "lr": a.lr, "batch_size": a.batch_size,
        "test_acc": round(test_acc, 4),
        "train_examples_per_s": round(len(train) * a.epochs / sum(clock.loops), 1),
        "epoch_seconds": [round(s, 2) for s in clock.epochs],
        "wall_s": round(time.time() - T0, 2), "lightning": L.__version__,
        "torch": torch.__version__, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
