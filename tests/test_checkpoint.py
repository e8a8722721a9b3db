import os
import pickle

import pytest
import torch

from lenet import checkpoint
from lenet.config import PRESETS, ConvSpec, ModelSpec, override
from lenet.errors import CheckpointError
from lenet.files import atomic_write
from lenet.models import build, init_model
from lenet.train import make_optimizer


def _save(path, cfg=PRESETS["book"], epoch=3):
    model = init_model(cfg.model, seed=0)
    opt = make_optimizer(model, cfg.train)
    gen = torch.Generator().manual_seed(5)
    checkpoint.save(path, config=cfg, epoch=epoch, model=model, optimizer=opt, generator=gen,
                    history=[{"epoch": 1, "train_loss": 1.0}])
    return model, gen


def test_round_trip_keeps_weights_rng_epoch_config(tmp_path):
    cfg = override(PRESETS["book"], "train", epochs=7)
    model, gen = _save(tmp_path / "a.ckpt", cfg)
    state = checkpoint.load(tmp_path / "a.ckpt")
    assert state["config"] == cfg and state["epoch"] == 3
    assert state["history"] == [{"epoch": 1, "train_loss": 1.0}]
    assert torch.equal(state["rng"]["generator"], gen.get_state())
    fresh = build(cfg.model)
    checkpoint.restore_model(tmp_path / "a.ckpt", state, fresh)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(),
                                                  model.state_dict().values(), strict=True))


def test_no_temp_files_left_and_overwrite_is_atomic(tmp_path):
    _save(tmp_path / "a.ckpt", epoch=1)
    _save(tmp_path / "a.ckpt", epoch=2)
    assert os.listdir(tmp_path) == ["a.ckpt"]
    assert checkpoint.load(tmp_path / "a.ckpt")["epoch"] == 2


def test_written_files_get_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.txt", lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644


def test_failed_write_keeps_the_previous_file(tmp_path):
    _save(tmp_path / "a.ckpt", epoch=1)

    def boom(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(tmp_path / "a.ckpt", boom)
    assert os.listdir(tmp_path) == ["a.ckpt"]
    assert checkpoint.load(tmp_path / "a.ckpt")["epoch"] == 1


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = marker
    path = tmp_path / "evil.ckpt"
    torch.save({"format": "lenet-checkpoint", "x": payload}, path)
    marker.unlink(missing_ok=True)  # in case saving ran it (it does not)
    with pytest.raises(CheckpointError, match="evil.ckpt: refused"):
        checkpoint.load(path)
    assert not marker.exists()
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(payload))
    with pytest.raises(CheckpointError, match="raw.pt"):
        checkpoint.load(raw)
    assert not marker.exists()


def test_truncated_checkpoint_is_refused_wherever_it_is_cut(tmp_path):
    """Cut at 0, 1, every header byte, 200 points across the file, and its last byte."""
    _save(tmp_path / "a.ckpt")
    data = (tmp_path / "a.ckpt").read_bytes()
    cuts = sorted({*range(0, 64), *range(0, len(data), max(1, len(data) // 200)),
                   len(data) - 1})
    for n in cuts:
        (tmp_path / "t.ckpt").write_bytes(data[:n])
        with pytest.raises(CheckpointError, match="t.ckpt"):
            checkpoint.load(tmp_path / "t.ckpt")


def test_weights_from_another_spec_are_refused(tmp_path):
    _save(tmp_path / "a.ckpt")
    state = checkpoint.load(tmp_path / "a.ckpt")
    other = build(ModelSpec(convs=(ConvSpec(8, 5, 2), ConvSpec(16, 5))))
    with pytest.raises(CheckpointError, match="a.ckpt: weights do not fit"):
        checkpoint.restore_model(tmp_path / "a.ckpt", state, other)


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        checkpoint.load(tmp_path / "none.ckpt")
    torch.save({"a": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a lenet checkpoint"):
        checkpoint.load(tmp_path / "other.pt")
