"""The trainer: minibatch SGD with cross-entropy, the book's recipe, fast.

`Trainer(spec, device, callbacks).fit(model, train, test)` runs the hot loop; callbacks
(progress bar, run folder writer) observe it. The library never prints.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from lenet import cuda_graph, distributed
from lenet.config import TrainSpec
from lenet.data.batches import Batches
from lenet.errors import ConfigError, DivergenceError, LenetError
from lenet.evaluate import evaluate
from lenet.sgd import SGD

METRIC_COLUMNS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "seconds",
                  "examples_per_s")
# Mean training loss (nats per example) past which the weights have blown up, even while the
# loss is still a finite number: chance is ln(classes), 2.3 for ten, and a network that is
# merely bad stays within tens (ReLU at --lr 100 reached ~5e17 over an epoch, at chance,
# before this bound existed).
DIVERGED_LOSS = 1e4


@dataclass(frozen=True)
class EpochMetrics:
    epoch: int
    train_loss: float
    train_acc: float
    test_loss: float
    test_acc: float
    seconds: float  # the whole epoch, evaluation included
    examples_per_s: float  # training loop only (data included), as the book counts it

    def as_dict(self) -> dict:
        return asdict(self)


class TrainingInterrupted(LenetError):
    """Training stopped on request (Ctrl-C) after a whole step; the state was saved."""

    def __init__(self, epoch: int, step: int):
        super().__init__(f"interrupted in epoch {epoch} after step {step}")
        self.epoch, self.step = epoch, step


def mean_examples_per_s(history: list[EpochMetrics]) -> float:
    """Examples per second over the whole training loop: total examples / total seconds
    (every epoch sees the same number of examples)."""
    return len(history) / sum(1 / m.examples_per_s for m in history)


class Callback:
    """Hooks the trainer calls; override what you need."""

    def on_fit_start(self, trainer: Trainer) -> None: ...
    def on_epoch_start(self, trainer: Trainer, epoch: int, steps: int) -> None: ...
    def on_step(self, trainer: Trainer, step: int) -> None: ...
    def on_epoch_end(self, trainer: Trainer, metrics: EpochMetrics) -> None: ...
    def on_interrupt(self, trainer: Trainer) -> None: ...
    def on_fit_end(self, trainer: Trainer) -> None: ...


def pick_engine(model_spec, spec: TrainSpec, device: torch.device,
                say=None) -> tuple[str, str]:
    """The fused kernel when it computes exactly this recipe here; else autograd, with the
    BatchNorm blocks in C++ where lenet.blocks computes them; with a few words on why, for
    the run's header. `say` hears why it waits when the kernel must be built first (about
    a minute, once)."""
    from lenet import blocks, fused

    if fused.device_kind(device) == "cuda":
        if fused.disabled():
            return "autograd", ("PyTorch autograd, eager (CUDA graph and Triton kernels: "
                                "turned off by LENET_FUSED=0)")
        why_not = cuda_graph.triton_reason(model_spec, device, spec.batch_size)
        if why_not is None:
            return "triton", ("the network as Triton kernels, forward and backward replayed "
                              "as one CUDA graph per step (LENET_FUSED=0 for eager PyTorch)")
        return "graph", ("PyTorch autograd, forward and backward replayed as one CUDA graph "
                         f"per step (Triton kernels: {why_not}; LENET_FUSED=0 for eager)")
    reason = fused.supports(model_spec, spec, device)
    block_reason = blocks.supports(model_spec, device)
    if (reason is None or block_reason is None) and say is not None and fused.needs_build():
        say("building the fused C++ kernel (once, about a minute)")
    if reason is None and fused.load() is not None:
        return "fused", "fused C++ kernel (LENET_FUSED=0 for PyTorch autograd)"
    if reason is not None and block_reason is None and fused.load() is not None:
        return "blocks", ("PyTorch autograd, BatchNorm-ReLU-max-pool blocks in C++ "
                          f"(whole-step kernel: {reason}; LENET_FUSED=0 for plain autograd)")
    if reason is not None and block_reason is None:  # the kernel could not be loaded
        return "autograd", f"PyTorch autograd (C++ blocks: {fused.why_unavailable()})"
    return "autograd", f"PyTorch autograd (fused kernel: {reason or fused.why_unavailable()})"


def check_batch_norm_batches(model: torch.nn.Module, batch_size: int, examples: int,
                             world: int = 1) -> None:
    """Batch norm cannot train on a single example (nor on none): refuse, before training,
    a batch size that leaves some process such a batch (the last one holds the remainder;
    under torchrun each process takes its share of every batch)."""
    if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return
    last = examples % batch_size or min(batch_size, examples)  # no batch is smaller
    smallest = last // world
    if smallest >= 2:
        return
    which = (f"the last batch of an epoch holds {last}" if last < batch_size else
             f"a batch holds {last}")
    share = f", {smallest} for some of the {world} processes" if world > 1 else ""
    raise ConfigError(f"--batch-size {batch_size}: {which} of the {examples:,} training "
                      f"images{share}; batch norm needs at least 2 per process; choose "
                      "another batch size")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here (use cpu or auto)")
    return torch.device(name)


def make_optimizer(model: torch.nn.Module, spec: TrainSpec) -> torch.optim.Optimizer | SGD:
    """torch.optim's optimizer for the recipe; for SGD on the CPU, lenet.sgd's copy of its
    update, which spares torch.optim's import of torch._dynamo (1-2 s, ~140 MB). On a GPU
    torch.optim.SGD updates every tensor in one foreach launch."""
    params, lr, wd = list(model.parameters()), spec.lr, spec.weight_decay
    if spec.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    cls = SGD if all(p.device.type == "cpu" for p in params) else torch.optim.SGD
    return cls(params, lr=lr, momentum=spec.momentum, nesterov=spec.nesterov,
               weight_decay=wd)


def channels_last_pays(model: torch.nn.Module) -> bool:
    """Whether autograd steps on the CPU are faster with `model` in channels-last layout
    (oneDNN's convolutions). benchmarks/layout_speed.py, 2 threads: book 1.39x, modern
    1.31x, best 1.53x; but BatchNorm over few channels is slower that way (modern +
    BatchNorm, 6 and 16 channels: 0.74x). A fixed rule, not a timing at start-up: the
    layout changes the last bits of the results, and the same seed must give the same run."""
    return not any(isinstance(m, torch.nn.BatchNorm2d) and m.num_features < 16
                   for m in model.modules())


def sgd_at_constant_rate(spec: TrainSpec) -> bool:
    """Plain SGD (no momentum) at one learning rate all run long: the book's recipe, whose
    update the CUDA graph step can record too (lenet.cuda_graph.GraphStep's sgd_lr)."""
    return (spec.optimizer == "sgd" and spec.momentum == 0 and spec.schedule == "constant"
            and spec.warmup == 0)


def lr_at(spec: TrainSpec, step: int, total: int) -> float:
    """The learning rate for global step `step` (0-based) of `total`: a linear warm-up over
    the first `warmup` fraction, then constant, cosine or linear decay to 0. A pure function
    of the step, so a resumed run needs no scheduler state."""
    warm = round(spec.warmup * total)
    if step < warm:
        return spec.lr * (step + 1) / warm
    if spec.schedule == "constant":
        return spec.lr
    done = (step - warm) / max(1, total - warm)
    if spec.schedule == "cosine":
        return spec.lr * 0.5 * (1 + math.cos(math.pi * done))
    return spec.lr * (1 - done)


class Trainer:
    """Holds what a checkpoint needs (model, optimizer, generator, epoch, history) as plain
    attributes, so callbacks can save it and `restore` can put it back."""

    def __init__(self, spec: TrainSpec, device: torch.device, callbacks=(),
                 engine: str = "autograd", dist=None):
        self.spec = spec
        self.device = device
        self.callbacks = list(callbacks)
        # "autograd"; "fused" (lenet.fused: the same math in one call); "blocks"
        # (autograd with BatchNorm-ReLU-max-pool blocks in C++, lenet.blocks); "graph"
        # (autograd's forward and backward replayed as a CUDA graph, lenet.cuda_graph); or
        # "triton" (the same, with the book's network as Triton kernels, lenet.triton_book)
        self.engine = engine
        self.fused = None
        self.graph = None  # lenet.cuda_graph.GraphStep, for the "graph" and "triton" engines
        # Data-parallel (lenet.distributed.Dist, under torchrun): the step runs through a
        # DistributedDataParallel wrapper; self.model stays the plain network, for
        # checkpoints that load with or without torchrun.
        self.dist = dist
        if dist is not None and engine != "autograd":
            raise ConfigError("data-parallel training runs on PyTorch autograd, not the "
                              f"{engine} engine")
        self.model: torch.nn.Module | None = None
        # torch.optim, lenet.sgd.SGD, or the FusedStep (both keep torch.optim.SGD's state,
        # in its format)
        self.optimizer: torch.optim.Optimizer | SGD | None = None
        # Shuffling has its own generator: its state alone replays the batch order.
        self.generator = torch.Generator(device=device).manual_seed(spec.seed)
        self.epoch = 0  # epochs completed
        self.history: list[EpochMetrics] = []
        self._resume_state: dict | None = None
        # An epoch in progress, kept so an interrupt (Ctrl-C) can checkpoint mid-epoch and a
        # resume replays the rest of it exactly: the shuffling state from before the epoch's
        # permutation, the batches done, the running sums and the seconds spent.
        self.partial: dict | None = None
        self.stop_requested = False  # set from a signal handler; honoured after a step
        # The divergence guard reads the loss every step on the CPU (a few microseconds);
        # on a GPU that read would stall the queue, so it looks every 50 steps.
        self.guard_every = 1 if device.type == "cpu" else 50
        if dist is not None:  # each rank sees only its loss: all look together at epoch end
            self.guard_every = 0

    def restore(self, state: dict) -> None:
        """Continue from a checkpoint's state (see checkpoint.load) at the next fit()."""
        self._resume_state = state

    def fit(self, model: torch.nn.Module, train: Batches, test: Batches) -> list[EpochMetrics]:
        check_batch_norm_batches(model, train.batch_size, train.num_examples,
                                 self.dist.world if self.dist is not None else 1)
        self.model = model.to(self.device)
        # Whether the batches are bytes is this engine's to say (the same Batches may have
        # served another engine's fit before).
        train.as_bytes = False
        if self.engine == "fused":
            from lenet.fused import FusedStep

            # The kernel does torch.optim.SGD's update itself (and saves its state in the
            # same format); building a torch.optim optimizer anyway would cost ~2 s of
            # torch._dynamo import.
            self.fused = self.optimizer = FusedStep.for_recipe(model, self.spec)
            train.as_bytes = train.resize is None  # the kernel scales the bytes itself
        else:
            # The blocks work on channels-last tensors; so do the convolutions around them.
            if self.device.type == "cpu" and (self.engine == "blocks"
                                              or channels_last_pays(model)):
                model.to(memory_format=torch.channels_last)
            self.optimizer = make_optimizer(model, self.spec)
        self.step_model = model
        if self.engine == "blocks":
            from lenet.blocks import BlockForward

            self.step_model = BlockForward(model)
        if self.engine == "triton":
            from lenet.triton_book import BookForward

            self.step_model = BookForward(model)
        if self.engine in ("graph", "triton"):
            # The graph converts the uint8 batch itself (two launches fewer per step), and
            # where it can, gathers it from the resident split and updates the weights too
            # (lenet.cuda_graph: the host's work per step is what limits a short step).
            train.as_bytes = True
            self.graph = cuda_graph.GraphStep(
                model, self.step_model, train.prepare, self.spec.label_smoothing,
                gather=train.gather if train.augment == "none" else None,
                sgd_lr=self.spec.lr if sgd_at_constant_rate(self.spec) else None,
                sgd_weight_decay=self.spec.weight_decay, batch_size=train.batch_size)
        if self.dist is not None:
            from torch.nn.parallel import DistributedDataParallel

            # DDP broadcasts rank 0's weights now; every rank built the same ones anyway.
            self.step_model = DistributedDataParallel(
                model, device_ids=[self.device] if self.device.type == "cuda" else None)
            train.shard = test.shard = (self.dist.rank, self.dist.world)
        train.generator = self.generator
        if self._resume_state is not None:
            self._apply_resume(self._resume_state)
        self._call("on_fit_start")
        try:
            with cuda_graph.numerics(self.device):
                for epoch in range(self.epoch + 1, self.spec.epochs + 1):
                    self.history.append(self._run_epoch(epoch, model, train, test))
                    self.epoch = epoch
                    self._call("on_epoch_end", self.history[-1])
        finally:  # the batches yield floats again, for whatever uses them next
            train.as_bytes = False
        self._call("on_fit_end")
        return self.history

    def _run_epoch(self, epoch, model, train, test) -> EpochMetrics:
        self._call("on_epoch_start", epoch, len(train))
        resume, self.partial = self.partial, None
        if resume is not None:
            self.generator.set_state(resume["generator"])
        gen_state = self.generator.get_state()  # before this epoch's permutation
        skip = resume["step"] if resume else 0
        spent = resume["seconds"] if resume else 0.0
        t0 = time.perf_counter()
        model.train()
        if self.graph is not None:  # summed in the graph
            loss_sum, correct = self.graph.reset_sums()
        else:
            loss_sum = torch.zeros((), device=self.device)
            correct = torch.zeros((), dtype=torch.int64, device=self.device)
        if resume is not None and (self.dist is None or self.dist.is_main):  # counted once
            loss_sum += resume["loss_sum"].to(self.device)
            correct += resume["correct"].to(self.device)
        world = self.dist.world if self.dist is not None else 1
        steps = len(train)
        indices = self.graph is not None and self.graph.gather is not None
        for step, (x, y) in enumerate(train.epoch(skip, indices), skip + 1):
            if self.graph is not None:  # it sums the loss and the right answers itself
                if self.graph.sgd_lr is None:  # else the graph updates the weights itself
                    self._set_lr(epoch, step, steps)
                self.graph.step(x, y)  # (with y None, x is the batch's indices)
                if self.graph.sgd_lr is None:  # on the gradients left in each .grad
                    self.optimizer.step()
            elif self.fused is not None:  # forward, loss, backward and update in one call
                loss, right = self.fused.step(x, y, self._lr(epoch, step, steps))
                loss_sum += loss * y.shape[0]
                correct += right
            else:
                self._set_lr(epoch, step, steps)
                logits = self.step_model(x)
                total = F.cross_entropy(logits, y, reduction="sum",
                                        label_smoothing=self.spec.label_smoothing)
                self.optimizer.zero_grad(set_to_none=True)
                # Over the whole batch's size (all ranks' examples), times the world size
                # that DDP's gradient average divides by: exactly the gradient of the batch's
                # mean loss, whatever the ranks' shares (the last batch's may differ).
                (total * (world / train.batch_len(step))).backward()
                self.optimizer.step()
                # Metrics stay on the device; host syncs are only the guard's and the epoch's.
                loss_sum += total.detach()
                correct += (logits.argmax(1) == y).sum()
            if self.guard_every and step % self.guard_every == 0:
                seen = min(step * train.batch_size, train.num_examples)  # in loss_sum
                total_now = loss_sum.item()  # sync
                if not total_now < DIVERGED_LOSS * seen:  # a NaN fails this test too
                    self._diverged(epoch, step, total_now / seen)
            self._call("on_step", step)
            if self.stop_requested and step < steps:
                self.partial = {"step": step, "generator": gen_state,
                                "loss_sum": loss_sum.cpu(), "correct": correct.cpu(),
                                "seconds": spent + time.perf_counter() - t0}
                self._call("on_interrupt")
                raise TrainingInterrupted(epoch, step)
        if self.dist is not None:
            distributed.sum_(loss_sum, correct)
        train_loss = loss_sum.item() / train.num_examples  # sync
        if not train_loss < DIVERGED_LOSS:
            self._diverged(epoch, len(train), train_loss)
        train_acc = correct.item() / train.num_examples
        loop_s = spent + time.perf_counter() - t0
        forward = self.fused.forward if self.fused else None
        if self.engine in ("blocks", "triton"):
            forward = self.step_model
        # The kernel scales bytes itself, as in training: no float copy of the test split.
        test_loss, test_acc = evaluate(model, test, forward=forward,
                                       reduce=distributed.sum_ if self.dist else None,
                                       as_bytes=self.fused is not None and test.resize is None)
        return EpochMetrics(epoch, train_loss, train_acc, test_loss, test_acc,
                            spent + time.perf_counter() - t0, train.num_examples / loop_s)

    def _lr(self, epoch: int, step: int, steps: int) -> float:
        return lr_at(self.spec, (epoch - 1) * steps + step - 1, self.spec.epochs * steps)

    def _set_lr(self, epoch: int, step: int, steps: int) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr(epoch, step, steps)

    def _diverged(self, epoch: int, step: int, loss: float) -> None:
        where = f"step {step}" if self.guard_every == 1 else f"by step {step}"
        what = (f"reached {loss:.3g} per example" if math.isfinite(loss) else
                "is not finite")
        raise DivergenceError(
            f"epoch {epoch}, {where}: the training loss {what} (training diverged); "
            f"try a lower learning rate than {self.spec.lr:g}")

    def _apply_resume(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if self.optimizer is not None and state["optimizer"]:  # {}: an older fused run
            self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        self.generator.set_state(state["rng"]["generator"])
        self.epoch = int(state["epoch"])
        self.history = [EpochMetrics(**row) for row in state["history"]]
        self.partial = state.get("partial")

    def _call(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)
