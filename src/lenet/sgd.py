"""torch.optim.SGD's update for the CPU trainer, without torch.optim's cost at start-up.

Why: the first call of any torch.optim optimizer's methods imports torch._dynamo (they are
wrapped in torch._disable_dynamo, which imports it then): 1-2 s and ~140 MB of resident
memory in a process that never compiles anything. That put a `best` run over 600 MB.

    opt = SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    opt.zero_grad(set_to_none=True); loss.backward(); opt.step()

The update is torch.optim.SGD's per-tensor one on the CPU (dampening 0), op for op, so the
parameters come out bit-identical (tests/test_sgd.py); `param_groups[0]["lr"]` is read at
every step; `state_dict`/`load_state_dict` use torch.optim.SGD's format, so a checkpoint
resumes with either, or on the fused kernel (lenet.fused.FusedStep, which keeps the same).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from lenet.errors import ConfigError


class SGD:
    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, *,
                 momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0):
        params = list(params)
        if not params:
            raise ConfigError("sgd: the model has no parameters to train")
        if nesterov and momentum <= 0:
            raise ConfigError("sgd: Nesterov momentum needs momentum > 0")
        # One group in torch.optim.SGD's shape: the trainer sets "lr" before each step.
        self.param_groups = [{"params": params, **hyperparameters(lr, momentum, nesterov,
                                                                  weight_decay)}]
        # parameter index -> momentum buffer, created at a parameter's first update (as in
        # torch.optim.SGD, whose first step copies the gradient into it)
        self.momentum_buffers: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def step(self) -> None:
        group = self.param_groups[0]
        lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
        for i, p in enumerate(group["params"]):
            if p.grad is None:  # torch.optim skips it too
                continue
            grad = p.grad
            if wd != 0:
                grad = grad.add(p, alpha=wd)
            if momentum != 0:
                buf = self.momentum_buffers.get(i)
                if buf is None:
                    buf = self.momentum_buffers[i] = grad.detach().clone()
                else:
                    buf.mul_(momentum).add_(grad)
                grad = grad.add(buf, alpha=momentum) if group["nesterov"] else buf
            p.add_(grad, alpha=-lr)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.param_groups[0]["params"]:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_().zero_()

    def state_dict(self) -> dict:
        """torch.optim.SGD's format: momentum buffers by parameter index, one group."""
        group = self.param_groups[0]
        hyper = {k: v for k, v in group.items() if k != "params"}
        return {"state": {i: {"momentum_buffer": buf.clone()}
                          for i, buf in sorted(self.momentum_buffers.items())},
                "param_groups": [{**hyper, "params": list(range(len(group["params"])))}]}

    def load_state_dict(self, saved: dict) -> None:
        """Momentum buffers from a state_dict of this class, torch.optim.SGD or FusedStep.
        The hyperparameters stay this optimizer's (the run's config sets them)."""
        buffers = saved_momentum_buffers(saved, self.param_groups[0]["params"], "sgd")
        self.momentum_buffers = buffers if self.param_groups[0]["momentum"] != 0 else {}


def hyperparameters(lr: float, momentum: float, nesterov: bool, weight_decay: float) -> dict:
    """A param group's settings as torch.optim.SGD's state_dict holds them (dampening 0)."""
    return {"lr": float(lr), "momentum": float(momentum), "dampening": 0,
            "weight_decay": float(weight_decay), "nesterov": bool(nesterov), "maximize": False,
            "foreach": None, "differentiable": False, "fused": None}


def saved_momentum_buffers(saved: dict, params: list[torch.Tensor],
                           who: str) -> dict[int, torch.Tensor]:
    """The momentum buffers, by parameter index, of a state_dict in torch.optim.SGD's format
    (saved by it, SGD or FusedStep), each checked against `params` and copied onto its device
    and dtype; `who` starts the error line."""
    unfit = f"{who}: the saved optimizer state does not fit this model"
    groups = saved.get("param_groups", [])
    if len(groups) != 1 or len(groups[0].get("params", ())) != len(params):
        raise ConfigError(f"{unfit} (expected one group of {len(params)} parameters)")
    buffers = {}
    for key, entry in saved.get("state", {}).items():
        buf, i = entry.get("momentum_buffer"), int(key)
        if buf is None:
            continue
        if not 0 <= i < len(params) or buf.shape != params[i].shape:
            raise ConfigError(f"{unfit} (momentum buffer {i})")
        buffers[i] = buf.detach().to(params[i].device, params[i].dtype).clone()
    return buffers
