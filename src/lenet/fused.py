"""The book's training step as one C++ call: forward, mean cross-entropy, backward and SGD for
LeNet-5 with the book's shapes, fp32 on an AVX2+FMA CPU: sigmoid or ReLU, average or max
pooling (exercise 1's "modern" LeNet), label smoothing, and torch.optim.SGD's momentum
(plain or Nesterov) and weight decay; the learning rate may change every step (schedules).

Why: on a few CPU cores PyTorch autograd spends most of a LeNet step on per-op overhead and
on full-size passes over the conv1 activations; the fused step (csrc/fused_lenet.cpp) keeps
each image in cache through conv1 and pool1, runs conv2 on 8 images at a time, one per vector
lane (so its three products are direct register-tiled AVX2 loops with no im2col copies), the
dense layers as MKL GEMMs on groups of 64 images in parallel, and is ~3.5x faster at batch 128
(benchmarks/step_speed.py).

    reason = supports(model_spec, train_spec, device)  # None: the kernel computes this recipe
    if reason is None and load() is not None:
        fused = FusedStep.for_recipe(model, train_spec)  # updates the parameters in place
        loss, right = fused.step(x, y, lr)             # one SGD step, metrics before it
        logits = fused.forward(x_test)

Numerics (benchmarks/fused_numerics.py: against nn.Sequential + F.cross_entropy + autograd
on the same weights, batches of 128, 37, 1 and 1,000 random images, three Xavier inits): max
abs deviation of the logits 3.6e-7, of the gradients 1.2e-7 (largest gradient 0.96, at batch
1; 6e-8 at batch 128), of the parameters after one SGD step at lr 0.9 1.2e-7, of the loss
2.4e-7; the count of right predictions is equal. Against a float64 reference the fused step
is as close as autograd's own fp32 (at batch 128: logits 3.8e-7 both, gradients 3.1e-8
fused, 4.9e-8 autograd): what differs is summation order (per-chunk and per-group gradient
sums, MKL blocking), not approximations; the sigmoid uses a ~1 ulp exp and a true division.
One epoch of Fashion-MNIST (book preset, seed 0, same batch order) gives train loss 2.035091
and test accuracy 0.5814 on both paths, equal to 6 decimals.
ReLU, max pooling, label smoothing, momentum and weight decay are checked the same way
(tests/test_fused.py); max pooling sends a window's gradient to its first maximum, as torch.

Determinism: the same weights and batch give bitwise the same result, on 1, 2 or 4 threads
(tests/test_fused.py). The conv gradients are summed per chunk of `block` images and the
chunks are added in order, the dense ones per group of 64 images and the groups added in
order, so thread scheduling never matters; each group's GEMMs run on one thread. With no
more threads than groups, each thread takes whole groups through the step in one parallel
region; with more, the step runs layer by layer; the sums are the same either way. (The
forward alone, for evaluation, runs its dense layers as MKL GEMMs on the whole batch.)

The compiled extension is cached by torch ($TORCH_EXTENSIONS_DIR, else
~/.cache/torch_extensions) under a name holding a hash of the source, the flags and the
torch version, so an edit or a torch upgrade builds afresh and never reuses a stale build.
LENET_FUSED=0 in the environment turns the kernel off.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from lenet import sgd
from lenet.config import ConvSpec, ModelSpec, TrainSpec
from lenet.errors import ConfigError, LenetError

_CSRC = Path(__file__).resolve().parent / "csrc"
# One extension, one build: the book's whole step, and BatchNorm-ReLU-max-pool blocks for
# the autograd path (lenet.blocks).
SOURCES = (_CSRC / "fused_lenet.cpp", _CSRC / "blocks.cpp")
# Not -march=native: a cached build must stay valid when the cache moves between CPUs of the
# same family; AVX2+FMA is what the kernels use.
# -fopenmp: at::parallel_for is a header template; without it the pragma compiles away and
# the chunks run one after another while MKL's own threads spin (2 threads were slower than 1).
CFLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp")
# Images per chunk (two lane groups of 8): batch 128 gives eight chunks, which two threads split
# evenly, and a chunk's conv2 operands stay in L2.
BLOCK = 16

_BOOK_CONVS = (ConvSpec(6, 5, 2), ConvSpec(16, 5, 0))
_BOOK_DENSE = (120, 84)


def supports(model_spec: ModelSpec, train_spec: TrainSpec,
             device: torch.device | str) -> str | None:
    """None when the fused kernel computes exactly this recipe, else why not (every reason,
    comma-separated). A pure check: never builds anything. Any number of classes works."""
    m, t = model_spec, train_spec
    kind = device_kind(device)
    checks = [
        (kind != "cpu", f"device {kind}"),
        (t.optimizer != "sgd", f"optimizer {t.optimizer}"),
        (m.activation not in ("sigmoid", "relu"), f"activation {m.activation}"),
        *book_shape_checks(m),
    ]
    reasons = [why for bad, why in checks if bad]
    return ", ".join(reasons) or None


def book_shape_checks(m: ModelSpec) -> list[tuple[bool, str]]:
    """(fails, why) for each way a spec can differ from the book's LeNet-5 in shape (its
    activation and pooling kind aside): what the fused kernel and lenet.triton_book share."""
    return [
        (m.pool != 2, f"pool size {m.pool}"),
        (m.batch_norm, "batch norm"),
        (m.dropout != 0, "dropout"),
        (tuple(m.convs) != _BOOK_CONVS, "convs differ from the book's"),
        (tuple(m.dense) != _BOOK_DENSE, "dense widths differ"),
        (m.in_channels != 1, f"{m.in_channels} input channels"),
        (m.image_size != 28, f"image size {m.image_size}"),
    ]


# ---------------------------------------------------------------------------------------------
# Building and loading the extension. The result is remembered for the process (building
# again after a failure would only fail again, a minute later); tests reset it.

@dataclass
class _Loaded:
    ext: object | None
    reason: str | None


_loaded: _Loaded | None = None
_lock = threading.Lock()


def load() -> object | None:
    """The compiled extension (built on first use: ~1 min; then cached on disk), or None when
    it cannot be built or loaded here, with the reason in `why_unavailable()`. Raises only
    for a LENET_FUSED that is neither on nor off (`disabled`)."""
    global _loaded
    if disabled():
        return None
    with _lock:
        if _loaded is None:
            _loaded = _build_and_load()
        return _loaded.ext


def needs_build() -> bool:
    """Whether `load()` would compile the kernel now (about a minute) rather than load a
    build from torch's extension cache: for a caller that wants to say why it waits."""
    if disabled() or _loaded is not None or _machine_problem() or _source_problem():
        return False
    if _cached_build() is not None or _compiler_problem():
        return False
    try:
        from torch.utils import cpp_extension

        folder = Path(cpp_extension._get_build_directory(_build_name(), verbose=False))
    except Exception:  # a private helper of torch's: if it moved, say nothing
        return False
    return not (folder / f"{_build_name()}.so").is_file()


def why_unavailable() -> str | None:
    """Why `load()` gives None (None if it has not failed, or has not been called)."""
    if disabled():
        return f"turned off by LENET_FUSED={os.environ['LENET_FUSED'].strip()}"
    return _loaded.reason if _loaded is not None else None


def _reset_for_tests() -> None:
    """Forget the remembered load() result, so the next load() looks again (for tests that
    change the environment; a build already on disk is reused, not rebuilt)."""
    global _loaded
    with _lock:
        _loaded = None


_OFF, _ON = ("0", "false", "off", "no"), ("", "1", "true", "on", "yes")


def disabled() -> bool:
    """Whether LENET_FUSED=0 (or false, off, no) turns the fast paths off: the C++ kernel and
    blocks on a CPU, the CUDA graph and the Triton kernels on a GPU (train.pick_engine).
    Any other value than those or 1, true, on, yes is a ConfigError, not silently "on"."""
    value = os.environ.get("LENET_FUSED", "").strip().lower()
    if value not in _OFF + _ON:
        raise ConfigError(f"LENET_FUSED={os.environ['LENET_FUSED']!r}: expected 0 (or false, "
                          "off, no) to turn the fast kernels off, 1 (or true, on, yes) for on")
    return value in _OFF


def _build_and_load() -> _Loaded:
    problem = _machine_problem() or _source_problem()
    if problem:
        return _Loaded(None, problem)
    cached = _cached_build()
    if cached is not None:
        try:
            spec = importlib.util.spec_from_file_location(cached.stem, cached)
            ext = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(ext)
            return _Loaded(ext, None)
        except Exception:  # a damaged build: torch's loader below builds it again
            pass
    problem = _compiler_problem()
    if problem:
        return _Loaded(None, problem)
    try:
        from torch.utils import cpp_extension

        # torch prints nothing unless verbose, but warns and logs (e.g. about the compiler's
        # ABI); the library stays quiet and reports through why_unavailable() instead.
        with warnings.catch_warnings(), _tools_on_path(), _quiet("torch.utils.cpp_extension"):
            warnings.simplefilter("ignore")
            cpp_extension.verify_ninja_availability()
            ext = cpp_extension.load(name=_build_name(), sources=[str(s) for s in SOURCES],
                                     extra_cflags=list(CFLAGS),
                                     extra_ldflags=["-fopenmp"], verbose=False)
        return _Loaded(ext, None)
    except Exception as e:  # a missing compiler or ninja, a build or link error: all mean "no"
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [""]
        # A build error's message starts with the ninja command; the compiler's words are
        # what a user can act on.
        said = next((line for line in lines if "error:" in line.lower()), lines[0])
        return _Loaded(None, f"could not build it ({type(e).__name__}: {said[:200]})")


def _compiler_problem() -> str | None:
    """The compiler torch's builder runs on Linux, when it is missing: said plainly, rather
    than as the build command that failed."""
    program = os.environ.get("CXX") or "c++"  # torch runs CXX as one program
    if shutil.which(program) is None:
        return f"no C++ compiler to build it ({program} not found; install g++ or set CXX)"
    return None


def _cached_build() -> Path | None:
    """The built extension in torch's extension cache, found where
    torch.utils.cpp_extension.load puts it, without importing that module (~0.15 s of every
    run; its load then also asks ninja whether the build is current, which the source hash in
    the name already answers). None when it is not there, when a build holds the folder's
    lock, or when torch's layout is not the one known here (then torch's loader decides)."""
    try:
        root = os.environ.get("TORCH_EXTENSIONS_DIR")
        if root is None:
            if torch.version.hip is not None:
                accelerator = f"rocm{torch.version.hip.replace('.', '')}"
            elif torch.version.cuda is not None:
                accelerator = f"cu{torch.version.cuda.replace('.', '')}"
            else:
                accelerator = "cpu"
            py = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
            # A submodule `import torch` leaves unloaded (cpp_extension imports it): without
            # this import the attribute is missing in a plain run and every run fell back to
            # importing cpp_extension (~0.2 s).
            from torch import _appdirs

            root = os.path.join(
                os.path.realpath(_appdirs.user_cache_dir(appname="torch_extensions")),
                f"{py}_{accelerator}")
        name = _build_name()
        folder = Path(root) / name
        so = folder / f"{name}.so"
        return so if so.is_file() and not (folder / "lock").exists() else None
    except Exception:
        return None


def _machine_problem() -> str | None:
    """Why this machine cannot run the kernel at all: its OS or its CPU."""
    if os.name == "nt":  # torch builds with MSVC there; the kernel's flags are GCC's
        return "needs Linux or macOS with GCC or Clang (on Windows: WSL2)"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"needs an x86-64 CPU with AVX2 and FMA, this is {platform.machine()}"
    flags = _cpuinfo_flags()
    if flags is None:  # no /proc/cpuinfo: trust what torch detected at start-up
        ok = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    else:
        ok = {"avx2", "fma"} <= flags
    return None if ok else "needs a CPU with AVX2 and FMA"


def _cpuinfo_flags() -> set[str] | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return None


def _source_problem() -> str | None:
    for source in SOURCES:
        if not source.is_file():
            return f"its source {source} is missing from this installation"
    return None


def _build_name() -> str:
    """One build folder per source, flags and torch version: an edited source never meets a
    stale build, and processes building different versions never share a folder (torch
    locks the folder while building, so processes building the same version wait in turn).
    The source's path is part of the key: ninja rebuilds whenever the path in its build file
    changes, so two checkouts sharing one folder would rebuild each other's build forever."""
    key = b"".join(s.read_bytes() + str(s.resolve()).encode() for s in SOURCES)
    key += repr(CFLAGS).encode() + torch.__version__.encode()
    return f"lenet_fused_{hashlib.sha256(key).hexdigest()[:12]}"


@contextlib.contextmanager
def _quiet(logger_name: str):
    """The named logger's warnings off for a while (torch's builder logs its own)."""
    logger = logging.getLogger(logger_name)
    old = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)


@contextlib.contextmanager
def _tools_on_path():
    """A virtual environment's own bin folder (where `pip install ninja` puts ninja) on PATH
    while building, even when the environment is not activated; PATH is restored after."""
    bindir = os.path.dirname(sys.executable)
    old = os.environ.get("PATH", "")
    if bindir in old.split(os.pathsep):
        yield
        return
    os.environ["PATH"] = bindir + os.pathsep + old
    try:
        yield
    finally:
        os.environ["PATH"] = old


# ---------------------------------------------------------------------------------------------
# The step

class FusedStep:
    """SGD training steps of a LeNet-5 with the book's shapes built by `lenet.models.build`
    (sigmoid or ReLU, average or max pooling: read from the model), one C++ call each. The
    model's parameters are read afresh every call and updated in place (so `load_state_dict`
    between steps is seen); their `.grad` is left untouched.

    The update is torch.optim.SGD's (dampening 0) and `state_dict`/`load_state_dict` use its
    format, so a checkpoint resumes on either engine.

    `block` (images per chunk) changes only the speed and the last bits of the gradients'
    summation order, never the result's meaning."""

    def __init__(self, model: torch.nn.Sequential, lr: float, *, momentum: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0,
                 label_smoothing: float = 0.0, block: int = BLOCK):
        problem = layout_problem(model)
        if problem:
            raise ConfigError(f"fused step: the model is not the book's LeNet-5 ({problem})")
        ext = load()
        if ext is None:
            raise LenetError(f"fused step: the C++ kernel is not available: {why_unavailable()}")
        if not 1 <= block <= 4096:
            raise ConfigError(f"fused step: block: expected 1..4096 images, got {block}")
        if nesterov and momentum <= 0:
            raise ConfigError("fused step: Nesterov momentum needs momentum > 0")
        self.model = model
        self.relu, self.max_pool = _kinds(model)
        self.lr = float(lr)
        self.momentum, self.nesterov = float(momentum), bool(nesterov)
        self.weight_decay = float(weight_decay)
        self.label_smoothing = float(label_smoothing)
        self.block = int(block)
        self._ext = ext
        # (layer, parameter) names in model.parameters() order (the book's layers are the
        # Sequential's children), so every call reads the live tensors without walking the
        # module tree, ~30 us a step.
        self._slots = [tuple(name.split(".")) for name, _ in model.named_parameters()]
        # Buffers the kernel grows to the largest batch seen and reuses: activations kept
        # for the backward, the gradients (read by tests through `_gradients`) and the
        # momentum buffers (empty until the first update with momentum: torch.optim.SGD
        # starts them there, and the kernel grows this one then).
        self._workspace = torch.empty(0)
        self._grads = torch.empty(0)
        self._momentum_buf = torch.empty(0)

    @classmethod
    def for_recipe(cls, model: torch.nn.Sequential, spec: TrainSpec) -> FusedStep:
        """The step for a TrainSpec that `supports` accepted."""
        return cls(model, spec.lr, momentum=spec.momentum, nesterov=spec.nesterov,
                   weight_decay=spec.weight_decay, label_smoothing=spec.label_smoothing)

    def step(self, x: torch.Tensor, y: torch.Tensor,
             lr: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One SGD step on images x (B, 1, 28, 28), float32 or uint8 (then scaled x / 255
        as the book's ToTensor, inside the kernel), and int64 labels y (B,), B >= 1, at
        learning rate `lr` (default: the one given at construction). Returns (mean loss,
        number of right argmax predictions) as 0-d tensors, both from the forward pass
        before the update, as an autograd step would report them."""
        return self._call(x, y, update=True, lr=self.lr if lr is None else float(lr))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, classes) of the current parameters; no autograd graph."""
        return self._ext.forward(x.contiguous(), self._params(), self.relu, self.max_pool,
                                 self.block)

    def state_dict(self) -> dict:
        """The optimizer state in torch.optim.SGD's format (momentum buffers per parameter)."""
        params = self._params()
        state = {}
        if self._momentum_buf.numel():
            for i, buf in enumerate(self._split(self._momentum_buf, params)):
                state[i] = {"momentum_buffer": buf.clone()}
        return {"state": state, "param_groups": [{
            **sgd.hyperparameters(self.lr, self.momentum, self.nesterov, self.weight_decay),
            "params": list(range(len(params)))}]}

    def load_state_dict(self, saved: dict) -> None:
        """Momentum buffers from a state_dict of this class or of torch.optim.SGD."""
        params = self._params()
        bufs = sgd.saved_momentum_buffers(saved, params, "fused step")
        if self.momentum == 0 or not bufs:
            self._momentum_buf = torch.empty(0)
            return
        if len(bufs) != len(params):  # the kernel keeps all of them or none
            raise ConfigError("fused step: the saved optimizer state does not fit this model "
                              f"(momentum buffers for {len(bufs)} of {len(params)} parameters)")
        self._momentum_buf = torch.cat([bufs[i].reshape(-1) for i in range(len(params))])

    def _call(self, x, y, *, update: bool, lr: float):
        # Positional: pybind11 matches 16 keywords in ~15 us, a few percent of a small step.
        # In train_step's order: x, y, params, grads, workspace, momentum_buf, relu,
        # max_pool, smoothing, update, lr, momentum, nesterov, weight_decay, first, block.
        return self._ext.train_step(
            x.contiguous(), y.contiguous(), self._params(), self._grads, self._workspace,
            self._momentum_buf, self.relu, self.max_pool, self.label_smoothing, update, lr,
            self.momentum, self.nesterov, self.weight_decay, self._momentum_buf.numel() == 0,
            self.block)

    def _params(self) -> list[torch.Tensor]:
        # The live tensors every call: a replaced parameter is seen. The kernel reads and
        # updates their storage through raw pointers, which autograd does not track (as
        # torch.optim's update under no_grad), so no detach() is needed.
        layers = self.model._modules
        return [layers[layer]._parameters[name] for layer, name in self._slots]

    @staticmethod
    def _split(flat: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
        sizes = [p.numel() for p in params]
        return [t.view_as(p) for t, p in
                zip(flat[:sum(sizes)].split(sizes), params, strict=True)]

    def _gradients(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """The gradients of the mean loss at (x, y), parameters unchanged (for tests)."""
        self._call(x, y, update=False, lr=0.0)
        return [g.clone() for g in self._split(self._grads, self._params())]


def inference_forward(model: torch.nn.Module, device: torch.device | str):
    """A faster forward for evaluation on the CPU, or None to use model(x): the fused
    kernel's for a book LeNet-5 (5x autograd's), else lenet.blocks' for a model with
    BatchNorm-ReLU-max-pool blocks."""
    from lenet import blocks

    kind = device_kind(device)
    if kind != "cpu" or load() is None:
        return None
    if layout_problem(model) is None:
        return FusedStep(model, 0.0).forward
    return blocks.BlockForward(model) if blocks.has_blocks(model) else None


def _layout(act: type, pool: type) -> tuple[type, ...]:
    conv, flat, fc = torch.nn.Conv2d, torch.nn.Flatten, torch.nn.Linear
    return (conv, act, pool, conv, act, pool, flat, fc, act, fc, act, fc)


# (relu, max pooling) for each layer sequence the kernel computes.
_LAYOUTS = {_layout(act, pool): (act is torch.nn.ReLU, pool is torch.nn.MaxPool2d)
            for act in (torch.nn.Sigmoid, torch.nn.ReLU)
            for pool in (torch.nn.AvgPool2d, torch.nn.MaxPool2d)}


def _kinds(model: torch.nn.Module) -> tuple[bool, bool]:
    return _LAYOUTS[tuple(type(m) for m in model.children())]


def layout_problem(model: torch.nn.Module) -> str | None:
    """None when `model` is laid out as the book's LeNet-5, with sigmoid or ReLU and average
    or max pooling (what `lenet.models.build` makes for such a spec), else what differs."""
    layers = list(model.children())
    kinds = tuple(type(m) for m in layers)
    if kinds not in _LAYOUTS:
        return "layers " + ", ".join(k.__name__ for k in kinds)
    conv1, _, pool1, conv2, _, pool2, _, fc1, _, fc2, _, fc3 = layers
    for conv, (cin, cout, pad) in ((conv1, (1, 6, 2)), (conv2, (6, 16, 0))):
        if ((conv.in_channels, conv.out_channels, conv.kernel_size, conv.padding) !=
                (cin, cout, (5, 5), (pad, pad)) or conv.stride != (1, 1)
                or conv.dilation != (1, 1) or conv.groups != 1 or conv.bias is None
                or conv.padding_mode != "zeros"):
            return f"a conv is not {cin}->{cout} 5x5 pad {pad} with bias"
    for pool in (pool1, pool2):
        if (pair(pool.kernel_size), pair(pool.stride), pair(pool.padding)) != \
                ((2, 2), (2, 2), (0, 0)) or pool.ceil_mode or \
                getattr(pool, "divisor_override", None) or \
                pair(getattr(pool, "dilation", 1)) != (1, 1) or \
                getattr(pool, "return_indices", False):
            return "a pooling layer is not 2x2 stride 2"
    widths = [(fc.in_features, fc.out_features) for fc in (fc1, fc2, fc3)]
    if widths[:2] != [(400, 120), (120, 84)] or widths[2][0] != 84:
        return f"dense layers {widths}"
    if any(fc.bias is None for fc in (fc1, fc2, fc3)):
        return "a dense layer has no bias"
    for p in model.parameters():
        if p.dtype != torch.float32 or p.device.type != "cpu" or not p.is_contiguous():
            return f"a parameter is {p.dtype} on {p.device}, expected contiguous float32 on cpu"
    return None


def device_kind(device: torch.device | str) -> str:
    """"cpu", "cuda", ... of a device or its name."""
    return device.type if isinstance(device, torch.device) else str(device).partition(":")[0]


def pair(v) -> tuple:
    """A layer's int-or-pair argument (kernel size, stride, ...) as a pair."""
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)
