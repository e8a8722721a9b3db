"""lenet.sgd.SGD: torch.optim.SGD's update bit for bit, its state format both ways, and no
torch._dynamo import."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lenet import models
from lenet.config import PRESETS, ModelSpec
from lenet.errors import ConfigError
from lenet.sgd import SGD

RECIPES = [dict(momentum=0.0), dict(momentum=0.9), dict(momentum=0.9, nesterov=True),
           dict(momentum=0.9, nesterov=True, weight_decay=5e-4), dict(weight_decay=1e-3)]


def _model(seed=0):
    return models.init_model(ModelSpec(activation="relu", pooling="max"), seed)


def _steps(model, opt, n, first=0, lrs=(0.1, 0.05, 0.2, 0.01, 0.1, 0.3)):
    g = torch.Generator().manual_seed(1)
    batches = [(torch.rand(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g))
               for _ in range(first + n)]
    for k in range(first, first + n):
        x, y = batches[k]
        opt.param_groups[0]["lr"] = lrs[k % len(lrs)]  # as the trainer's schedule does
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _same(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("recipe", RECIPES, ids=str)
def test_updates_are_torch_sgds_bit_for_bit(recipe):
    ours, theirs = _model(), _model()
    _steps(ours, SGD(ours.parameters(), lr=0.1, **recipe), 6)
    _steps(theirs, torch.optim.SGD(theirs.parameters(), lr=0.1, **recipe), 6)
    assert _same(ours, theirs)
    assert not _same(ours, _model())  # it did train


@pytest.mark.parametrize("recipe", RECIPES[1:4], ids=str)
def test_state_moves_between_torch_sgd_and_ours_both_ways(recipe):
    """Three steps on one optimizer, its state_dict into the other, three more: the same
    weights as six steps on torch.optim.SGD alone."""
    reference = _model()
    _steps(reference, torch.optim.SGD(reference.parameters(), lr=0.1, **recipe), 6)
    for first, second in [(SGD, torch.optim.SGD), (torch.optim.SGD, SGD)]:
        model = _model()
        a = first(model.parameters(), lr=0.1, **recipe)
        _steps(model, a, 3)
        b = second(model.parameters(), lr=0.1, **recipe)
        b.load_state_dict(a.state_dict())
        _steps(model, b, 3, first=3)
        assert _same(model, reference), (first.__name__, second.__name__)


def test_state_dict_has_torch_sgds_keys():
    model = _model()
    ours = SGD(model.parameters(), lr=0.1, momentum=0.9)
    theirs = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _steps(model, ours, 1)
    _steps(model, theirs, 1)
    a, b = ours.state_dict(), theirs.state_dict()
    assert a["param_groups"][0].keys() == b["param_groups"][0].keys()
    assert a["state"].keys() == b["state"].keys()
    assert {k: v for k, v in a["param_groups"][0].items() if k != "lr"} == \
        {k: v for k, v in b["param_groups"][0].items() if k != "lr"}


def test_a_parameter_without_a_gradient_is_left_alone():
    model = _model()
    opt = SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    before = model[0].weight.detach().clone()
    model[-1].weight.grad = torch.ones_like(model[-1].weight)
    opt.step()
    assert torch.equal(model[0].weight, before)
    assert 0 not in opt.momentum_buffers and len(opt.momentum_buffers) == 1


def test_zero_grad_keeps_zeroed_tensors_or_drops_them():
    model = _model()
    opt = SGD(model.parameters(), lr=0.1)
    _steps(model, opt, 1)
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_a_state_for_another_model_is_one_clear_error():
    model = _model()
    opt = SGD(model.parameters(), lr=0.1, momentum=0.9)
    other = models.init_model(PRESETS["best"].model, 0)
    theirs = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ConfigError, match="does not fit this model"):
        opt.load_state_dict(theirs.state_dict())
    wrong = opt.state_dict()
    wrong["state"] = {0: {"momentum_buffer": torch.zeros(3)}}
    with pytest.raises(ConfigError, match="momentum buffer 0"):
        opt.load_state_dict(wrong)


def test_the_cpu_trainer_never_imports_dynamo(tmp_path):
    """The point of the class: a CPU training step on autograd (here `best`'s network) does
    not import torch._dynamo."""
    code = (
        "import sys, torch, torch.nn.functional as F\n"
        "from lenet import models\n"
        "from lenet.config import PRESETS\n"
        "from lenet.train import make_optimizer\n"
        "cfg = PRESETS['best']\n"
        "m = models.init_model(cfg.model, 0)\n"
        "opt = make_optimizer(m, cfg.train)\n"
        "opt.zero_grad(); F.cross_entropy(m(torch.rand(4, 1, 28, 28)), torch.tensor([0, 1, 2, 3]))"
        ".backward(); opt.step(); opt.state_dict()\n"
        "print(type(opt).__module__, 'torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["lenet.sgd", "False"]
