"""Accuracy and loss over a whole split, in large batches without autograd."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lenet.data.batches import Batches


def evaluate(model: torch.nn.Module, batches: Batches, forward=None,
             reduce=None, as_bytes: bool = False) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of `model` on every example of `batches`
    (`forward` may replace model(x), e.g. the fused kernel's equivalent, which with
    `as_bytes` is handed the uint8 images as stored; `reduce` sums the totals over
    data-parallel ranks, each of which saw its share of `batches`)."""
    forward = forward or model
    was_training, was_bytes = model.training, batches.as_bytes
    model.eval()
    batches.as_bytes = as_bytes
    loss_sum = torch.zeros((), device=batches.labels.device)
    correct = torch.zeros((), dtype=torch.int64, device=batches.labels.device)
    try:
        with torch.inference_mode():
            for x, y in batches:
                logits = forward(x)
                loss_sum += F.cross_entropy(logits, y, reduction="sum")
                correct += (logits.argmax(1) == y).sum()
    finally:
        model.train(was_training)
        batches.as_bytes = was_bytes
    if reduce is not None:
        reduce(loss_sum, correct)
    n = batches.num_examples
    return loss_sum.item() / n, correct.item() / n  # one host sync per call
