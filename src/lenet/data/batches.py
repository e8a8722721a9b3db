"""Minibatches from a split held on the device as one uint8 tensor.

No DataLoader and no worker processes: the whole of Fashion-MNIST is 47 MB of bytes, so
each batch is an index into resident memory plus one fused uint8 -> float conversion
(the book's ToTensor: x / 255, no normalisation).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


class Batches:
    """Iterate a split in batches; with a generator, a fresh permutation every pass.

    The permutation comes from the explicit `generator`, whose state is all that a
    checkpoint needs to replay the same order after a resume.
    """

    def __init__(self, images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
                 batch_size: int, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None, resize: int | None = None,
                 augment: str = "none"):
        if isinstance(images, np.ndarray) and not images.flags.writeable:
            images = images.copy()  # torch refuses read-only numpy memory (e.g. frombuffer)
        images = torch.as_tensor(images)
        if images.ndim == 3:  # (N, rows, cols) -> (N, 1, rows, cols)
            images = images.unsqueeze(1)
        self.images = images.to(device).contiguous()
        self.labels = torch.as_tensor(labels, dtype=torch.int64).to(device)
        self.batch_size = batch_size
        self.generator = generator
        self.resize = None if resize == self.images.shape[-1] else resize
        self.augment = augment  # applied to shuffled passes only (training), see `epoch`
        # (rank, world) under data-parallel training: this process takes its share of every
        # batch (torch.tensor_split: shares differ by at most one example); len() and
        # num_examples stay those of the whole split.
        self.shard: tuple[int, int] | None = None
        # Yield the uint8 pixels as they are, for a consumer that scales them itself (the
        # fused kernel: a quarter of the memory traffic, and no conversion pass per step).
        self.as_bytes = False

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    @property
    def num_examples(self) -> int:
        return len(self.labels)

    def __iter__(self):
        return self.epoch()

    def epoch(self, skip: int = 0, indices: bool = False):
        """One pass; `skip` leaves out the first batches of the pass (the permutation is
        drawn all the same), which is how an interrupted epoch is resumed exactly. With
        `indices`, each batch is (its indices, None) and the consumer gathers it (`gather`):
        the CUDA graph step does, inside its graph (lenet.cuda_graph.GraphStep). Whole
        passes only: no augmentation, no shard."""
        n, bs = self.num_examples, self.batch_size
        order = draws = None
        if self.generator is not None:
            order = torch.randperm(n, generator=self.generator, device=self.generator.device)
            order = order.to(self.images.device)
            if self.augment != "none":  # the whole pass's draws, so `skip` replays exactly
                draws = augment_draws(n, self.generator).to(self.images.device)
        if indices:
            if draws is not None or self.shard is not None:
                raise ValueError("Batches.epoch(indices=True): whole passes without "
                                 "augmentation only")
            if order is None:
                order = torch.arange(n, device=self.images.device)
            for start in range(skip * bs, n, bs):
                yield order[start:start + bs], None
            return
        for start in range(skip * bs, n, bs):  # the last, partial batch is kept
            if order is None:
                x, y = self.images[start:start + bs], self.labels[start:start + bs]
                if self.shard is not None:
                    rank, world = self.shard
                    x, y = x.tensor_split(world)[rank], y.tensor_split(world)[rank]
            else:
                idx, drawn = order[start:start + bs], None
                if draws is not None:
                    drawn = draws[:, start:start + bs]
                if self.shard is not None:  # this rank's share of the images and their draws
                    rank, world = self.shard
                    idx = idx.tensor_split(world)[rank]
                    if drawn is not None:
                        drawn = drawn.tensor_split(world, dim=1)[rank]
                x, y = self.gather(idx)
                if drawn is not None:
                    x = augment(x, self.augment, drawn)
            yield (x if self.as_bytes else self.prepare(x)), y

    def batch_len(self, step: int) -> int:
        """Examples in the whole (all ranks') batch number `step` (1-based): the last one
        of a pass holds the remainder."""
        return min(self.batch_size, self.num_examples - (step - 1) * self.batch_size)

    def gather(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The uint8 images and the labels at `idx` (what `epoch(indices=True)` leaves to
        do)."""
        # index_select copies whole rows: ~8x faster than images[idx] for bytes.
        return self.images.index_select(0, idx), self.labels.index_select(0, idx)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 batch -> the network's float input (resized when asked)."""
        x = to_float(x)
        if self.resize is not None:  # per batch, on the device: no resized copy of the split
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear",
                              antialias=True, align_corners=False)
        return x


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [0, 1], exactly as torchvision's ToTensor computes it."""
    return x.to(torch.float32).div_(255)


SHIFT = 2  # pixels, at most, each way


def augment_draws(n: int, generator: torch.Generator) -> torch.Tensor:
    """(3, n) int64: per image a flip bit and a row and column shift in -SHIFT..SHIFT."""
    dev = generator.device
    flip = torch.randint(0, 2, (1, n), generator=generator, device=dev)
    shift = torch.randint(-SHIFT, SHIFT + 1, (2, n), generator=generator, device=dev)
    return torch.cat([flip, shift])


def augment(x: torch.Tensor, kind: str, draws: torch.Tensor) -> torch.Tensor:
    """Random left-right flips ("flip"), and shifts with zero fill ("flip+shift"), of a
    uint8 batch (N, C, H, W), as `draws` (from augment_draws) say, image by image."""
    x = torch.where(draws[0].bool()[:, None, None, None], x.flip(-1), x)
    if kind == "flip+shift":
        n, c, h, w = x.shape
        padded = F.pad(x, (SHIFT,) * 4)
        rows = (torch.arange(h, device=x.device) + SHIFT - draws[1][:, None])  # (N, H)
        cols = (torch.arange(w, device=x.device) + SHIFT - draws[2][:, None])  # (N, W)
        padded = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * SHIFT))
        x = padded.gather(3, cols[:, None, None, :].expand(n, c, h, w))
    return x
