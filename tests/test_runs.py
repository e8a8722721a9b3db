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


def test_taking_the_lock_removes_temp_files_a_killed_writer_left(tmp_path):
    run = runs.RunFolder(tmp_path)
    left = [tmp_path / ".best.ckpt.x4hl984a.tmp", tmp_path / ".metrics.csv.abc.tmp"]
    mine = tmp_path / ".notes.tmp"  # not a run file's: kept
    for p in [*left, mine]:
        p.write_bytes(b"half")
    run.lock()
    try:
        assert [p.exists() for p in left] == [False, False] and mine.exists()
    finally:
        run.unlock()


def test_a_failed_write_names_the_file_not_its_temp_file(tmp_path, monkeypatch):
    import tempfile

    import pytest

    from lenet.files import atomic_write

    def refuse(**kwargs):
        raise OSError(30, "Read-only file system", str(tmp_path / ".confusion.png.mlanlu5d.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(OSError) as err:
        atomic_write(tmp_path / "confusion.png", lambda f: None)
    assert (err.value.filename, err.value.strerror) == (str(tmp_path / "confusion.png"),
                                                        "Read-only file system")
