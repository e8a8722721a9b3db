"""plots.CurvePainter: curves.png drawn by a helper process, or here when it cannot be."""
import subprocess
import sys
from types import SimpleNamespace

import pytest

from lenet import plots

HISTORY = [SimpleNamespace(epoch=e, train_loss=1.5 / e, train_acc=0.5 + e / 40,
                           test_acc=0.5 + e / 45) for e in range(1, 6)]


@pytest.fixture
def painter():
    p = plots.CurvePainter()
    yield p
    p.close()


def reference(tmp_path):
    path = tmp_path / "here.png"
    plots.training_curves(HISTORY, path, title="run")
    return path.read_bytes()


def test_the_helper_draws_the_same_picture_and_stays_for_the_next(painter, tmp_path):
    for n in (1, 2):
        painter.training_curves(HISTORY, tmp_path / f"{n}.png", title="run")
    assert painter._proc is not None and painter._proc.poll() is None
    assert (tmp_path / "1.png").read_bytes() == (tmp_path / "2.png").read_bytes() \
        == reference(tmp_path)


def test_a_helper_that_died_is_replaced_by_drawing_here(painter, tmp_path):
    painter._proc.kill()
    painter._proc.wait()
    painter.training_curves(HISTORY, tmp_path / "a.png", title="run")
    assert painter._proc is None
    assert (tmp_path / "a.png").read_bytes() == reference(tmp_path)


def test_a_helper_that_cannot_start_leaves_the_drawing_here(monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise OSError("no processes left")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    painter = plots.CurvePainter()
    painter.training_curves(HISTORY, tmp_path / "a.png", title="run")
    assert (tmp_path / "a.png").read_bytes() == reference(tmp_path)


def test_a_drawing_that_fails_raises_here_as_it_would_have(painter, tmp_path):
    with pytest.raises(OSError):
        painter.training_curves(HISTORY, tmp_path / "missing" / "a.png", title="run")
    painter.training_curves(HISTORY, tmp_path / "a.png", title="run")  # and goes on
    assert (tmp_path / "a.png").read_bytes() == reference(tmp_path)


def test_the_helper_imports_neither_torch_nor_the_trainer():
    code = ("import sys, lenet.plot_worker, lenet.plots; "
            "print(sorted(m for m in ('torch', 'lenet.train') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_every_compared_run_gets_its_own_style():
    from lenet.plots import run_styles

    for n in (1, 10, 11, 25, 40):
        styles = run_styles(n)
        assert len(styles) == n == len(set(styles))
    assert run_styles(5) == [(c, "-") for c, _ in run_styles(5)]  # up to 10: colours only
