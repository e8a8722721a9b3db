"""A full or read-only disk is detected with one clear line, and never leaves a half-written
checkpoint as the one to resume from. Uses small tmpfs mounts (root only)."""
import os
import subprocess

import pytest

from conftest import make_idx_folder
from lenet import cli
from lenet.checkpoint import load


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a small tmpfs; `remount_ro()` makes it read-only."""
    mounted = []

    def mount(size: str, read_only: bool = False):
        point = tmp_path / f"fs{len(mounted)}"
        point.mkdir()
        opts = f"size={size}" + (",ro" if read_only else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(point)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); needs root")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=False)


def test_read_only_disk_is_one_line_at_the_start(tmp_path, tmpfs, capsys, isolated_env):
    data = make_idx_folder(tmp_path / "data", n_train=64, n_test=32)
    ro = tmpfs("1m", read_only=True)
    assert cli.main(["train", "--data", str(data), "--out", str(ro / "run"),
                     "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(ro / "run") in err and "Read-only file system" in err


def test_full_disk_keeps_the_last_good_checkpoint(tmp_path, tmpfs, capsys, isolated_env):
    """Room for config.json and one checkpoint (~250 KB), not for the second: training
    stops with one line; last.ckpt is the whole epoch-1 checkpoint; no temp files remain."""
    data = make_idx_folder(tmp_path / "data", n_train=64, n_test=32)
    disk = tmpfs("400k")
    run = disk / "run"
    assert cli.main(["train", "--data", str(data), "--epochs", "3", "--out", str(run),
                     "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(run) in err and "No space left on device" in err
    assert load(run / "last.ckpt")["epoch"] >= 1  # loads: nothing half-written
    assert not [n for n in os.listdir(run) if n.endswith(".tmp")]
