"""The figures of lenet/fused.py's "Numerics" paragraph: the fused step against PyTorch
autograd (fp32) on the same weights, batches of 128, 37, 1 and 1,000 random images, three
Xavier inits; and both against a float64 reference at batch 128. Max abs deviations.

    python benchmarks/fused_numerics.py
"""
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from lenet import fused, models  # noqa: E402
from lenet.config import ModelSpec  # noqa: E402


def gap(a, b) -> float:
    """Max abs deviation between two tensors or two lists of tensors (in float64)."""
    if isinstance(a, torch.Tensor):
        return (a.double() - b.double()).abs().max().item()
    return max(gap(x, y) for x, y in zip(a, b, strict=True))


def main() -> None:
    worst: dict[str, float] = {}

    def note(name, value):
        worst[name] = max(worst.get(name, 0.0), value)

    for seed in (0, 1, 2):
        for n in (128, 37, 1, 1000):
            g = torch.Generator().manual_seed(seed * 10 + n)
            x = torch.rand(n, 1, 28, 28, generator=g)
            y = torch.randint(0, 10, (n,), generator=g)
            model = models.init_model(ModelSpec(), seed)
            exact = copy.deepcopy(model).double()
            grads_fused = fused.FusedStep(model, 0.9)._gradients(x, y)
            logits = model(x)
            F.cross_entropy(logits, y).backward()
            grads = [p.grad for p in model.parameters()]
            note("logits vs autograd", gap(fused.FusedStep(model, 0.9).forward(x), logits))
            note("gradients vs autograd", gap(grads_fused, grads))
            note("largest gradient", max(p.abs().max().item() for p in grads))
            if n == 128:
                note("gradients vs autograd, batch 128", gap(grads_fused, grads))
                logits64 = exact(x.double())
                F.cross_entropy(logits64, y).backward()
                grads64 = [p.grad for p in exact.parameters()]
                note("batch 128: fused gradients vs float64", gap(grads_fused, grads64))
                note("batch 128: autograd gradients vs float64", gap(grads, grads64))
                note("batch 128: fused logits vs float64",
                     gap(fused.FusedStep(model, 0.9).forward(x), logits64))
                note("batch 128: autograd logits vs float64", gap(logits, logits64))
            # One SGD step at lr 0.9 on each path.
            a, b = models.init_model(ModelSpec(), seed), models.init_model(ModelSpec(), seed)
            loss_fused, right = fused.FusedStep(a, 0.9).step(x, y)
            opt = torch.optim.SGD(b.parameters(), lr=0.9)
            out = b(x)
            loss = F.cross_entropy(out, y)
            loss.backward()
            opt.step()
            assert right.item() == (out.argmax(1) == y).sum().item(), "right counts differ"
            note("parameters after one step", gap(list(a.parameters()), list(b.parameters())))
            note("loss", abs(loss_fused.item() - loss.item()))
    for name, value in worst.items():
        print(f"{name:42s} {value:.2e}")


if __name__ == "__main__":
    main()
