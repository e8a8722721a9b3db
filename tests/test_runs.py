"""The run folder writer: what it writes after each epoch."""
from lenet import cli, runs


def test_curves_are_redrawn_at_most_every_few_seconds_and_always_at_the_end(
        tmp_path, isolated_env, monkeypatch):
    from conftest import make_idx_folder

    drawn = []
    draw = runs.plots.CurvePainter.training_curves  # `lenet train` draws through its helper
    monkeypatch.setattr(runs.plots.CurvePainter, "training_curves",
                        lambda self, history, path, title: (drawn.append(len(history)),
                                                            draw(self, history, path, title)))
    monkeypatch.setattr(runs.RunWriter, "PLOT_EVERY_S", 3600.0)
    data = make_idx_folder(tmp_path / "data", n_train=64, n_test=32)
    run = tmp_path / "run"
    assert cli.main(["train", "--data", str(data), "--epochs", "4", "--out", str(run),
                     "--no-progress"]) == 0
    assert drawn == [4] and (run / "curves.png").stat().st_size > 10_000  # only at the end
    monkeypatch.setattr(runs.RunWriter, "PLOT_EVERY_S", 0.0)
    assert cli.main(["train", "--resume", str(run), "--epochs", "6", "--no-progress"]) == 0
    assert drawn == [4, 5, 6]
