"""Data-parallel training with torchrun: two processes give the weights one process gives
(same global batch, uneven shares included), a two-agent c10d rendezvous on 127.0.0.1
stands in for two machines, and a data-parallel run resumes. In CI (env CI set) a missing
launcher is a failure, not a skip."""
from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import make_idx_folder
from lenet import cli

pytestmark = pytest.mark.slow

# 250 examples in batches of 63: shares of 31 and 32, and a last batch of 61 (30 and 31);
# augmented, so each rank must also take its share of the augmentation draws.
ARGS = ["--data", "{data}", "--batch-size", "63", "--augment", "flip+shift", "--no-progress"]


def _launcher_or_skip() -> None:
    import torch.distributed as td

    missing = None
    if importlib.util.find_spec("torch.distributed.run") is None:
        missing = "torch.distributed.run (torchrun) is not installed"
    elif not (td.is_available() and td.is_gloo_available()):
        missing = "this torch has no gloo backend"
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI needs the DDP launcher: {missing}")
        pytest.skip(missing)


def _env() -> dict:
    # Both paths on PyTorch autograd (the fused kernel is single-process only); one thread
    # per rank, as torchrun would set.
    return {**os.environ, "LENET_FUSED": "0", "OMP_NUM_THREADS": "1"}


def _torchrun(launch: list[str], argv: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launch,
                             "-m", "lenet", *argv], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(run) -> dict:
    return torch.load(run / "last.ckpt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    _launcher_or_skip()
    root = tmp_path_factory.mktemp("ddp")
    data = make_idx_folder(root / "data", n_train=250, n_test=50)
    args = [a.format(data=data) for a in ARGS]
    ref = root / "single"
    mp = pytest.MonkeyPatch()
    mp.setenv("LENET_FUSED", "0")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(["train", *args, "--epochs", "2", "--out", str(ref)]) == 0
    finally:
        torch.set_num_threads(threads)
        mp.undo()
    assert "step: PyTorch autograd" in (ref / "log.txt").read_text()
    return root, args, ref


def test_two_agent_c10d_then_standalone_resume_match_single_process(setup):
    """Epoch 1 on two 'machines' (two torchrun agents meeting at a c10d rendezvous on
    127.0.0.1), epoch 2 resumed with torchrun --standalone --nproc_per_node=2: every weight
    equals the single-process run's within 1e-5."""
    root, args, ref = setup
    run = root / "ddp"
    port = _free_port()
    agents = [_torchrun(["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
                         f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=lenet-test",
                         "--local_addr=127.0.0.1"],
                        ["train", *args, "--epochs", "1", "--out", str(run)])
              for _ in range(2)]
    outs = [a.communicate(timeout=120)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], outs
    printed = "".join(outs)
    assert printed.count("run folder:") == 1  # only rank 0 prints
    assert "data-parallel: 2 processes (gloo), each takes 31-32 of every global batch of 63" \
        in printed

    resumed = _torchrun(["--standalone", "--nproc_per_node=2"],
                        ["train", "--resume", str(run), "--epochs", "2", "--no-progress"])
    out = resumed.communicate(timeout=120)[0]
    assert resumed.returncode == 0, out
    assert "resuming after epoch 1 of 2" in out

    ddp, single = _weights(run), _weights(ref)
    assert ddp.keys() == single.keys()  # saved unwrapped: no DDP "module." prefix
    diff = max((ddp[k] - single[k]).abs().max().item() for k in ddp)
    for k in ddp:
        assert torch.allclose(ddp[k], single[k], rtol=0, atol=1e-5), (k, diff)
    print(f"DDP 2-process vs 1-process: max abs weight difference {diff:.2e}")
    rows = [(run / "metrics.csv").read_text().splitlines(),
            (ref / "metrics.csv").read_text().splitlines()]
    for a, b in zip(*rows, strict=True):  # summed metrics: the same losses and accuracies
        for x, y in list(zip(a.split(","), b.split(","), strict=True))[1:5]:
            if x.replace(".", "").isdigit():
                assert float(x) == pytest.approx(float(y), abs=1e-5)
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == [
        "best.ckpt", "config.json", "curves.png", "last.ckpt", "log.txt", "metrics.csv",
        "summary.txt"]
