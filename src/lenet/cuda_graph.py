"""The training step on a GPU, recorded once as a CUDA graph and replayed (engines "graph"
and "triton": the latter with the book's network as lenet.triton_book's kernels).

LeNet's step is some 60 small kernels. Eager PyTorch pays a Python dispatch and a launch for
each (several microseconds apiece), more than the kernels' arithmetic at batch 128. Recorded
once, the step is one graph launch.

What the graph records is forward, loss and gradients, and the epoch's running sums of the
loss and of the right answers. The optimizer stays torch.optim and runs eagerly on the
gradients the graph writes (one foreach launch for SGD), so learning-rate schedules,
momentum, Adam and checkpoints work as they do on autograd. One exception: plain SGD at a
constant rate (the book's recipe), whose update is torch.optim's own foreach call recorded
in the graph (`sgd_lr`). When the GPU's step is short (the Triton kernels: ~110 µs on an
H100), the host's work per step sets the pace, and torch.optim's step alone costs the host
~70 µs there.

A graph replays fixed shapes at fixed addresses. Each batch is copied into static input
tensors, or, with `gather`, only its indices, the graph itself taking the images from the
split resident on the GPU (two launches and ~60 µs of host time fewer per step). The
gradients land in the same tensors every step (`param.grad`). A batch of another size (the
last, partial batch of a pass) runs the same function eagerly.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F


def numerics(device: torch.device):
    """Training on CUDA computes what the book's recipe says: fp32 convolutions (PyTorch lets
    cuDNN use TF32 by default, a 10-bit mantissa) with deterministic algorithms, so a seed
    gives the same run every time (some of cuDNN's fastest weight-gradient algorithms add in
    a varying order). A no-op elsewhere; the settings are put back on exit."""
    if device.type != "cuda":
        return nullcontext()
    return torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, benchmark=False,
                                      deterministic=True, allow_tf32=False)


def triton_reason(model_spec, device: torch.device | None = None,
                  batch_size: int = 128) -> str | None:
    """None when lenet.triton_book computes this network (the book's LeNet-5: its shapes,
    sigmoid, average pooling, 10 classes) on `device`, else why not. With a GPU at hand it
    also runs the kernels once on a batch of zeros (lenet.triton_book.self_check), so that a
    GPU or machine they cannot be built for falls back to cuDNN, with the reason, instead of
    failing in the first training step."""
    from lenet.fused import book_shape_checks

    m = model_spec
    checks = [
        (m.activation != "sigmoid", f"activation {m.activation}"),
        (m.pooling != "avg", f"pooling {m.pooling}"),
        *book_shape_checks(m),
        (m.num_classes != 10, f"{m.num_classes} classes (the kernels need 10 classes)"),
    ]
    if device is not None and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(device)
        checks.append(((major, minor) < (7, 5),
                       f"GPU compute capability {major}.{minor} (the kernels need 7.5+)"))
    reasons = [why for bad, why in checks if bad]
    if reasons:
        return ", ".join(reasons)
    try:
        from lenet import triton_book
    except Exception as e:  # not installed, or a broken install: the cuDNN graph still runs
        return f"triton cannot be imported ({type(e).__name__})"
    if device is not None and torch.cuda.is_available():
        return triton_book.self_check(device, batch_size)
    return None


WARMUP = 3  # eager runs before recording: cuBLAS/cuDNN handles and workspaces get allocated


class CudaGraph:
    """torch.cuda.CUDAGraph around `run`: recording executes nothing, replay executes it."""

    def __init__(self, run: Callable[[], tuple]):
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = run()

    def replay(self) -> tuple:
        self.graph.replay()
        return self.outputs


class Rerun:
    """Stands in for CudaGraph where there is no GPU (tests): replay calls `run` again. It
    keeps CudaGraph's contract (recording computes nothing), so the bookkeeping around the
    graph can be checked on a CPU."""

    def __init__(self, run: Callable[[], tuple]):
        self.run = run

    def replay(self) -> tuple:
        return self.run()


class GraphStep:
    """Forward, summed cross-entropy and the gradients of the batch's mean loss, for one
    batch of uint8 images (`prepare` makes them the network's input, inside the graph).

    `step(x, y)` leaves the gradients in each parameter's `.grad` (the same tensors every
    step), adds the batch's summed loss and correct count to `sums` and returns them (as
    device tensors). A `forward` with a `fused_loss` (lenet.triton_book's split kernels)
    computes the loss and the count itself, in its own kernels.

    With `gather` (indices -> (uint8 images, labels)), `step(indices)` takes the batch's
    indices instead and the gathering happens in the graph. With `sgd_lr`, the step also
    updates the weights as torch.optim.SGD(lr=sgd_lr, weight_decay=sgd_weight_decay)'s
    foreach step does (no momentum), with the same calls, so the same bits: the caller then
    runs no optimizer."""

    def __init__(self, model: torch.nn.Module, forward: Callable, prepare: Callable,
                 label_smoothing: float = 0.0, recorder: type | None = None, *,
                 gather: Callable | None = None, sgd_lr: float | None = None,
                 sgd_weight_decay: float = 0.0, batch_size: int | None = None):
        self.model = model
        self.forward = forward
        self.prepare = prepare
        self.label_smoothing = label_smoothing
        self.recorder = recorder
        self.gather = gather
        self.sgd_lr = sgd_lr
        self.sgd_weight_decay = sgd_weight_decay
        # Record on a batch of this size only (a run resumed just before a pass's last,
        # smaller batch must not record that one and run every full batch eagerly).
        self.batch_size = batch_size
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.grads = [torch.zeros_like(p) for p in self.params]
        device = self.params[0].device
        # The running sums of a pass (`reset_sums` zeroes them): summed in the graph, so
        # the host launches nothing for them.
        self.sums = (torch.zeros((), device=device),
                     torch.zeros((), dtype=torch.int64, device=device))
        self.graph = None
        self.static = None  # the recorded batch (x, y; or its indices): shapes and addresses
        self.replays = 0  # steps the graph ran (the rest ran eagerly): for tests and benches

    def reset_sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero the running sums (at a pass's start) and return them: (loss, right)."""
        for t in self.sums:
            t.zero_()
        return self.sums

    def step(self, x: torch.Tensor, y: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """The step for batch (x, y), or with `gather`, for the batch of indices x."""
        batch = (x,) if self.gather is not None else (x, y)
        if self.sgd_lr is None:  # an optimizer reads .grad
            for p, g in zip(self.params, self.grads, strict=True):
                p.grad = g  # cheap; and a caller's zero_grad(set_to_none=True) cannot unhook it
        if self.graph is None and self.batch_size in (None, len(x)):
            self._record(batch)
        if self.graph is None or any(t.shape != s.shape
                                     for t, s in zip(batch, self.static, strict=True)):
            return self._run(*batch)
        for s, t in zip(self.static, batch, strict=True):
            s.copy_(t)
        self.replays += 1
        return self.graph.replay()

    def _run(self, *batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The step itself: a pure function of the batch and the weights that writes the
        gradients into the static `self.grads` (and updates BatchNorm's running stats, the
        running sums and, with `sgd_lr`, the weights)."""
        x, y = self.gather(*batch) if self.gather is not None else batch
        fused_loss = getattr(self.forward, "fused_loss", None)
        if fused_loss is not None:  # kernels that compute the loss with the network
            total, right = fused_loss(self.prepare(x), y, self.label_smoothing)
        else:
            logits = self.forward(self.prepare(x))
            total = F.cross_entropy(logits, y, reduction="sum",
                                    label_smoothing=self.label_smoothing)
            right = (logits.argmax(1) == y).sum()
        grads = torch.autograd.grad(total / len(y), self.params)
        torch._foreach_copy_(self.grads, grads)
        total = total.detach()
        self.sums[0].add_(total)
        self.sums[1].add_(right)
        if self.sgd_lr is not None:
            with torch.no_grad():  # torch.optim.SGD's foreach update, call for call
                grads = self.grads
                if self.sgd_weight_decay != 0:
                    grads = torch._foreach_add(grads, self.params, alpha=self.sgd_weight_decay)
                torch._foreach_add_(self.params, grads, alpha=-self.sgd_lr)
        return total, right

    def _record(self, batch: tuple[torch.Tensor, ...]) -> None:
        self.static = tuple(t.clone() for t in batch)
        # The warm-up runs are real steps on the first batch: put back what they changed
        # (BatchNorm's running stats and batch count, the running sums, the weights the
        # step may update, the RNG that dropout draws from), so that the run is the same as
        # one that never warmed up.
        changed = [*self.model.buffers(), *self.sums, *self.params]
        saved = [t.detach().clone() for t in changed]
        x = self.static[0]
        side = torch.cuda.Stream() if x.is_cuda else None
        if side is not None:  # warm-up on a side stream, as torch.cuda.graph asks
            side.wait_stream(torch.cuda.current_stream())
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []), \
                torch.cuda.stream(side) if side is not None else nullcontext():
            for _ in range(WARMUP):
                self._run(*self.static)
        if side is not None:
            torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():
            for t, before in zip(changed, saved, strict=True):
                t.copy_(before)
        recorder = self.recorder or (CudaGraph if x.is_cuda else Rerun)
        self.graph = recorder(lambda: self._run(*self.static))
