"""What the peer scripts (keras_loop.py, lightning_loop.py) share: their command line (that
of book_loop.py) and the IDX files as numpy arrays. They run under interpreters of their own
without lenet: numpy only."""
import argparse
import gzip
import os

import numpy as np


def read_idx(path):
    with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def split(root, prefix):
    """(images (N, 28, 28) float32 in [0, 1] as x / 255, labels (N,) int64) of the split
    whose files start with `prefix` (train, t10k)."""
    images = read_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte.gz"))
    labels = read_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz"))
    return images.astype(np.float32) / 255, labels.astype(np.int64)


def parser():
    """book_loop.py's options: --epochs, --lr, --batch-size, --seed, --data."""
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.9)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=os.environ.get(
        "LENET_DATA", "/usr/share/datasets/fashion-mnist"))
    return p
