"""The `lenet` command, in process (fast) and as a real subprocess (one-line errors)."""
import csv
import json
import subprocess
import sys

import pytest

from conftest import make_idx_folder
from lenet import cli
from lenet.checkpoint import load

COLUMNS = ["epoch", "train_loss", "train_acc", "test_loss", "test_acc", "seconds",
           "examples_per_s"]


def run_cli(*args):
    """`lenet ARGS` as a subprocess: what a user sees, tracebacks included."""
    return subprocess.run([sys.executable, "-m", "lenet", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_summary_works_without_data(capsys, isolated_env):
    assert cli.main(["summary"]) == 0
    out = capsys.readouterr().out
    assert "61,706" in out and "0.42 M multiply-adds" in out
    for shape in ("6x28x28", "6x14x14", "16x10x10", "16x5x5", "400", "120", "84"):
        assert shape in out


def test_train_writes_a_complete_run_folder_then_resume_and_evaluate(tmp_path, capsys,
                                                                       isolated_env):
    data = make_idx_folder(tmp_path / "data", n_train=256, n_test=64)
    run = tmp_path / "run"
    assert cli.main(["train", "--data", str(data), "--epochs", "2", "--batch-size", "64",
                     "--out", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "epoch 1/2" in out and "epoch 2/2" in out
    assert "examples/sec on cpu" in out and "loss " in out and "test acc" in out
    for name in ("config.json", "metrics.csv", "curves.png", "summary.txt", "last.ckpt",
                 "best.ckpt", "log.txt"):
        assert (run / name).stat().st_size > 0, name
    rows = list(csv.reader((run / "metrics.csv").open()))
    assert rows[0] == COLUMNS and [r[0] for r in rows[1:]] == ["1", "2"]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["data"]["name"] == str(data) and cfg["train"]["epochs"] == 2
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "61,706" in (run / "summary.txt").read_text()
    assert "epoch 2/2" in (run / "log.txt").read_text()

    # resume to 3 epochs: appends one row, keeps the first two
    assert cli.main(["train", "--resume", str(run), "--epochs", "3", "--no-progress"]) == 0
    assert "resuming after epoch 2" in capsys.readouterr().out
    rows2 = list(csv.reader((run / "metrics.csv").open()))
    assert rows2[:3] == rows and [r[0] for r in rows2[1:]] == ["1", "2", "3"]
    assert load(run / "last.ckpt")["epoch"] == 3

    assert cli.main(["evaluate", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"test acc {float(rows2[-1][4]):.4f}" in out
    assert "accuracy" in out and (run / "confusion.png").is_file()
    assert (run / "misclassified.png").is_file()


def test_same_seed_same_metrics(tmp_path, isolated_env):
    data = make_idx_folder(tmp_path / "data", n_train=256, n_test=64)
    for name in ("a", "b"):
        assert cli.main(["train", "--data", str(data), "--epochs", "2", "--batch-size", "32",
                         "--out", str(tmp_path / name), "--no-progress"]) == 0

    def numbers(name):
        return [r[:5] for r in csv.reader((tmp_path / name / "metrics.csv").open())]

    assert numbers("a") == numbers("b")


def test_train_moves_the_set_up_out_of_the_garbage_collectors_way(tmp_path, isolated_env,
                                                                   monkeypatch):
    """By the first step, what set-up made (torch, the data) is frozen (gc.freeze), so the
    collector's full collections during training do not scan it."""
    import gc

    from lenet.train import Trainer

    frozen = []
    fit = Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self, *a: (frozen.append(gc.get_freeze_count()),
                                                          fit(self, *a))[1])
    gc.unfreeze()
    data = make_idx_folder(tmp_path / "data", n_train=64, n_test=32)
    try:
        assert cli.main(["train", "--data", str(data), "--epochs", "1", "--batch-size", "64",
                         "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    finally:
        gc.unfreeze()
    assert frozen and frozen[0] > 10_000


def test_second_train_into_an_existing_run_is_refused(tmp_path, capsys, isolated_env):
    data = make_idx_folder(tmp_path / "data", n_train=64, n_test=32)
    args = ["train", "--data", str(data), "--epochs", "1", "--out", str(tmp_path / "r"),
            "--no-progress"]
    assert cli.main(args) == 0
    capsys.readouterr()
    assert cli.main(args) == 1
    assert "already holds a run" in capsys.readouterr().err


@pytest.mark.parametrize("args, expect", [
    (["train", "--epochs", "abc"], "--epochs: invalid int value"),
    (["train", "--epochs", "0"], "train.epochs: expected a positive integer"),
    (["train", "--lr", "-1"], "train.lr"),
    (["train", "--preset", "nope"], "unknown preset 'nope'"),
    (["train", "--data", "/no/such/folder"], "/no/such/folder"),
    (["train", "--data", "imagenet"], "unknown data set 'imagenet'"),
    (["train", "--resume", "/no/such/run"], "/no/such/run: no such run folder"),
    (["evaluate", "/no/such/run"], "/no/such/run: no such run folder"),
    (["summary", "--preset", "x"], "unknown preset 'x'"),
    (["data", "fetch", "imagenet"], "unknown data set 'imagenet'"),
    (["frobnicate"], "invalid choice"),
    (["train", "extra"], "lenet train: error: unrecognized arguments: extra (see 'lenet train "
                         "--help')"),
    (["predict", "run", "a.png", "--json", "b.png"], "lenet predict: error: unrecognized "
     "arguments: b.png; give the files before the options (see 'lenet predict --help')"),
])
def test_bad_input_gives_one_line_and_nonzero_exit(args, expect, isolated_env):
    r = run_cli(*args)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert expect in lines[0] and "Traceback" not in r.stderr


def test_malformed_data_file_is_one_line(tmp_path, isolated_env):
    data = make_idx_folder(tmp_path / "data", n_train=64, n_test=32)
    (data / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    r = run_cli("train", "--data", data, "--out", tmp_path / "r")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "train-labels-idx1-ubyte.gz" in r.stderr and "Traceback" not in r.stderr


def test_unwritable_output_folder_is_one_line(tmp_path, isolated_env):
    data = make_idx_folder(tmp_path / "data", n_train=64, n_test=32)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run_cli("train", "--data", data, "--out", blocker / "run", "--epochs", "1")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert str(blocker / "run") in r.stderr and "Traceback" not in r.stderr


def test_two_trainings_in_one_folder_the_second_refuses(tmp_path, isolated_env):
    """A run folder is locked while its training lives: a second `lenet train --out` or
    `--resume` on it exits at once with one line, and the first goes on untouched (it runs
    long enough for both tries, then is stopped with Ctrl-C)."""
    import signal
    import time

    data = make_idx_folder(tmp_path / "data", n_train=2048, n_test=64)
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "lenet", "train", "--data", str(data),
                              "--epochs", "500", "--out", str(run), "--no-progress"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "last.ckpt").exists() and time.time() < deadline:
        time.sleep(0.05)
    for args, why in ((["--data", data, "--out", run], "already holds a run"),
                      (["--resume", run, "--epochs", "501"], "in use by another lenet train")):
        second = run_cli("train", *args)
        assert second.returncode == 1, second.stderr
        assert second.stderr.count("\n") == 1 and why in second.stderr, second.stderr
    assert first.poll() is None  # still training: the refusals above were the lock's
    first.send_signal(signal.SIGINT)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 130, err
    rows = (run / "metrics.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == list(range(1, len(rows)))


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_ctrl_c_checkpoints_prints_the_resume_command_and_exits_130(tmp_path, isolated_env,
                                                                    signame):
    """SIGINT (or SIGTERM: `kill`, a batch scheduler) during training: the step finishes,
    last.ckpt is written mid-epoch, the exact resume command is printed, exit status
    128 + the signal; the resumed run finishes that epoch."""
    import signal
    import time

    sig = getattr(signal, signame)
    data = make_idx_folder(tmp_path / "data", n_train=4096, n_test=64)
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "lenet", "train", "--data", str(data),
                             "--epochs", "500", "--batch-size", "16", "--out", str(run),
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    log, deadline = run / "log.txt", time.time() + 120
    while not (log.exists() and "step:" in log.read_text()):  # training is about to start
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    assert f"resume with: lenet train --resume {run}" in out
    assert (f"({signame}): saved" in out) == (signame == "SIGTERM")
    assert (run / "curves.png").exists()  # drawn on the way out, as at the end
    state = load(run / "last.ckpt")
    assert state["partial"] is not None and state["partial"]["step"] >= 1
    done = state["epoch"]
    r = run_cli("evaluate", run)
    assert f"last.ckpt (stopped during epoch {done + 1}) on data test set" in r.stdout
    if done:  # --epochs may not end the run before the epoch it stopped in
        r = run_cli("train", "--resume", run, "--epochs", done)
        assert r.returncode == 1 and (f"the run stopped during epoch {done + 1}, so it needs "
                                      f"at least {done + 1}") in r.stderr
    r = run_cli("train", "--resume", run, "--epochs", done + 1)  # finish the cut epoch
    assert r.returncode == 0, r.stderr
    step = state["partial"]["step"]
    assert f"resuming epoch {done + 1} of {done + 1} after its step {step}" in r.stdout
    rows = list(csv.reader((run / "metrics.csv").open()))
    assert [int(row[0]) for row in rows[1:]] == list(range(1, done + 2))
    assert load(run / "last.ckpt")["partial"] is None


def test_divergence_stops_at_once_with_epoch_step_and_advice(tmp_path, capsys, isolated_env):
    data = make_idx_folder(tmp_path / "data", n_train=256, n_test=64)
    bad = tmp_path / "bad"
    assert cli.main(["train", "--preset", "modern", "--lr", "100", "--data", str(data),
                     "--out", str(bad), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "(training diverged)" in err
    assert "lower learning rate than 100" in err
    epoch = int(err.split("epoch ")[1].split(",")[0])
    assert ", step " in err
    if epoch == 1:
        assert not (bad / "last.ckpt").exists()  # no checkpoint of a diverged state
    else:  # the last good epoch stays the resume point
        assert load(bad / "last.ckpt")["epoch"] == epoch - 1


def test_a_missing_optional_extra_is_one_line_naming_the_install(tmp_path, capsys, monkeypatch,
                                                                 isolated_env):
    for name in ("optuna", "starlette", "uvicorn"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    space = tmp_path / "space.toml"
    space.write_text('preset = "book"\n[space.train]\nlr = { low = 0.1, high = 1.0 }\n')
    code = cli.main(["sweep", "--space", str(space), "--n-trials", "1",
                     "--out", str(tmp_path / "sw")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err
    assert "pip install 'lenet[sweep]'" in err and "Traceback" not in err


@pytest.mark.parametrize("flag", [["--lr", "0.1"], ["--convs", "6:5"], ["--schedule", "cosine"],
                                  ["--augment", "flip"], ["--label-smoothing", "0.1"],
                                  ["--nesterov"], ["--preset", "fast"]])
def test_resume_refuses_every_flag_that_would_change_the_run(flag, capsys):
    assert cli.main(["train", "--resume", "any/run", *flag]) == 1
    err = capsys.readouterr().err
    assert f"{flag[0]} cannot change it" in err, err


def test_a_reader_that_leaves_does_not_stop_training(tmp_path, isolated_env):
    """`lenet train ... | head -1`: the pipe closes after the first line; the run still
    trains every epoch, writes its folder and exits 0 (its lines are all in log.txt)."""
    data = make_idx_folder(tmp_path / "data", n_train=600, n_test=64)
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "lenet", "train", "--data", str(data),
                             "--epochs", "3", "--batch-size", "32", "--out", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().startswith(b"lenet ")
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0 and err == ""
    assert load(run / "last.ckpt")["epoch"] == 3
    log = (run / "log.txt").read_text()
    assert "epoch 3/3" in log and log.endswith(f"run folder: {run}\n")


def test_output_outlives_reader_drops_output_after_a_broken_pipe(monkeypatch):
    from lenet.outliving_stdout import output_outlives_reader

    class Pipe:
        def __init__(self):
            self.lines, self.broken = [], False

        def write(self, text):
            if self.broken:
                raise BrokenPipeError(32, "Broken pipe")
            self.lines.append(text)
            return len(text)

        def flush(self):
            if self.broken:
                raise BrokenPipeError(32, "Broken pipe")

        def fileno(self):
            raise OSError("no descriptor")

    pipe = Pipe()
    monkeypatch.setattr(sys, "stdout", pipe)
    with output_outlives_reader():
        print("one", flush=True)
        pipe.broken = True
        print("two", flush=True)  # would raise BrokenPipeError without the guard
        pipe.broken = False
        print("three", flush=True)  # once the reader left, nothing more is written
    assert sys.stdout is pipe and pipe.lines == ["one", "\n"]


def test_a_run_that_stopped_before_its_first_checkpoint_is_replaced_a_file_is_refused(
        tmp_path, capsys, isolated_env):
    """A recipe that diverged at once (or a Ctrl-C while the kernel built) leaves only
    config.json and log.txt: nothing to resume or lose, so the next command may train
    there (it used to be refused until the folder was removed by hand)."""
    data = make_idx_folder(tmp_path / "data", n_train=256, n_test=64)
    div = tmp_path / "div"
    cli.main(["train", "--preset", "modern", "--lr", "100", "--data", str(data), "--epochs",
              "1", "--out", str(div), "--no-progress"])
    assert (div / "config.json").exists() and not (div / "last.ckpt").exists()
    assert "lr 100" in (div / "log.txt").read_text()
    capsys.readouterr()
    assert cli.main(["train", "--preset", "modern", "--data", str(data), "--epochs", "1",
                     "--out", str(div), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "(replacing a run that stopped before its first checkpoint)" in out
    assert (div / "last.ckpt").exists()
    log = (div / "log.txt").read_text()
    assert "lr 0.1," in log and "lr 100" not in log  # the new run's log alone
    assert json.loads((div / "config.json").read_text())["train"]["lr"] == 0.1
    # Only a lenet run's folder: a config.json of something else, and the user's files
    # beside it, are not replaced.
    theirs = tmp_path / "project"
    theirs.mkdir()
    (theirs / "config.json").write_text('{"my": "settings"}')
    (theirs / "log.txt").write_text("notes")
    assert cli.main(["train", "--data", str(data), "--epochs", "1", "--out", str(theirs),
                     "--no-progress"]) == 1
    assert capsys.readouterr().err == (f"lenet: error: {theirs}: holds a config.json that "
                                       "is not a lenet run's; choose another --out\n")
    assert (theirs / "log.txt").read_text() == "notes"
    (tmp_path / "f.png").write_bytes(b"x")
    assert cli.main(["train", "--data", str(data), "--out", str(tmp_path / "f.png")]) == 1
    assert "f.png: is a file, expected a folder for the run" in capsys.readouterr().err


def test_a_flag_preset_beats_the_files_and_the_label_says_so(tmp_path, capsys):
    wide = tmp_path / "wide.toml"
    wide.write_text('preset = "modern"\n[train]\nlr = 0.05\n')
    assert cli.main(["summary", "--config", str(wide), "--preset", "book"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("preset book\n") and "Sigmoid" in out
    assert cli.main(["summary", "--config", str(wide)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("preset modern\n") and "ReLU" in out


def test_a_run_records_its_class_names_and_resumes_from_moved_data(tmp_path, capsys,
                                                                  isolated_env):
    """The data folder (with classes.txt) moves away: predict still names the classes, and
    --resume --data points at the new place; data of another shape is refused."""
    from PIL import Image

    from lenet.config import RunConfig
    from lenet.report import class_names

    data = make_idx_folder(tmp_path / "data", n_train=120, n_test=40, classes=3)
    (data / "classes.txt").write_text("cat\ndog\nowl\n")
    run = tmp_path / "run"
    assert cli.main(["train", "--data", str(data), "--epochs", "1", "--out", str(run),
                     "--no-progress"]) == 0
    moved = data.rename(tmp_path / "elsewhere")
    assert class_names(RunConfig.from_json_file(run / "config.json")) == ("cat", "dog", "owl")
    Image.new("L", (28, 28), 0).save(tmp_path / "x.png")
    capsys.readouterr()
    assert cli.main(["predict", str(run), str(tmp_path / "x.png"), "--top", "3"]) == 0
    assert sorted(t.split()[0] for t in capsys.readouterr().out.split(": ")[1].split(", ")) \
        == ["cat", "dog", "owl"]
    assert cli.main(["train", "--resume", str(run), "--epochs", "2"]) == 1
    assert "no such folder" in capsys.readouterr().err
    assert cli.main(["train", "--resume", str(run), "--epochs", "2", "--data", str(moved),
                     "--no-progress"]) == 0
    assert load(run / "last.ckpt")["epoch"] == 2
    assert RunConfig.from_json_file(run / "config.json").data.name == str(moved)
    other = make_idx_folder(tmp_path / "other", n_train=60, n_test=20, classes=4)
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run), "--epochs", "3", "--data", str(other)]) == 1
    assert capsys.readouterr().err == (
        f"lenet: error: {other}: holds 4 classes of 28x28 images; the run was trained on 3 "
        "classes of 28x28\n")
    renamed = make_idx_folder(tmp_path / "renamed", n_train=60, n_test=20, classes=3)
    (renamed / "classes.txt").write_text("cat\ndog\nelk\n")
    assert cli.main(["train", "--resume", str(run), "--epochs", "3", "--data",
                     str(renamed)]) == 1
    assert capsys.readouterr().err == (
        f"lenet: error: {renamed}: names class 2 'elk', the run 'owl'; --resume --data is for "
        "the same data moved\n")
    moved.rename(tmp_path / "gone")  # evaluate and activations say where the data was named
    for verb in (["evaluate", str(run)], ["activations", str(run)]):
        assert cli.main(verb) == 1
        err = capsys.readouterr().err
        assert err.endswith(f"(the data set {run / 'config.json'} names; --data points at it "
                            "elsewhere)\n") and err.count("\n") == 1, err
    for verb in (["evaluate", str(run), "--data", str(tmp_path / "gone")],
                 ["activations", str(run), "--data", str(tmp_path / "gone"), "--out",
                  str(tmp_path / "a.png")]):
        assert cli.main(verb) == 0
    assert "test #" in capsys.readouterr().out


def test_resuming_a_scheduled_run_for_more_epochs_says_it_changes_the_schedule(
        tmp_path, capsys, isolated_env):
    data = make_idx_folder(tmp_path / "data", n_train=120, n_test=40)
    run = tmp_path / "run"
    assert cli.main(["train", "--data", str(data), "--epochs", "1", "--schedule", "cosine",
                     "--lr", "0.1", "--out", str(run), "--no-progress"]) == 0
    assert "note:" not in capsys.readouterr().out
    assert cli.main(["train", "--resume", str(run), "--epochs", "2", "--no-progress"]) == 0
    assert ("note: the cosine schedule was set over 1 epochs and now spans 2 from here on: "
            "the run will not equal a fresh 2-epoch run") in capsys.readouterr().out


def test_evaluate_on_data_of_another_size_resizes_and_keeps_the_runs_own_report(
        tmp_path, capsys, isolated_env, monkeypatch):
    small = make_idx_folder(tmp_path / "small", n_train=120, n_test=40)
    big = make_idx_folder(tmp_path / "big", n_train=60, n_test=30, size=32)
    run = tmp_path / "run"
    assert cli.main(["train", "--data", str(small), "--epochs", "1", "--out", str(run),
                     "--no-progress"]) == 0
    assert cli.main(["evaluate", str(run)]) == 0
    own = (run / "confusion.png").read_bytes()
    capsys.readouterr()
    for fused_off in ("0", "1"):  # the C++ kernel and autograd both got 32x32 images before
        monkeypatch.setenv("LENET_FUSED", fused_off)
        assert cli.main(["evaluate", str(run), "--data", str(big)]) == 0
        out = capsys.readouterr().out
        assert "on big test set, 30 images (resized from 32x32 to 28x28): test loss" in out
        assert f"figures: {run / 'confusion-big.png'}, {run / 'misclassified-big.png'}" in out
    assert (run / "confusion.png").read_bytes() == own


def test_a_resume_mends_metrics_and_best_left_behind_by_a_kill_between_writes(
        tmp_path, capsys, isolated_env):
    """The state a SIGKILL between the checkpoint renames of an older version could leave:
    last.ckpt of epoch 3, best.ckpt and metrics.csv of epoch 2. A resume (even with no epoch
    left to train) rewrites metrics.csv from last.ckpt's history and saves the best epoch."""
    import shutil

    data = make_idx_folder(tmp_path / "data", n_train=300, n_test=100)
    run, old = tmp_path / "run", tmp_path / "old"
    assert cli.main(["train", "--data", str(data), "--preset", "modern", "--epochs", "2",
                     "--out", str(run), "--no-progress"]) == 0
    shutil.copytree(run, old)
    assert cli.main(["train", "--resume", str(run), "--epochs", "3", "--no-progress"]) == 0
    history = load(run / "last.ckpt")["history"]
    for name in ("best.ckpt", "metrics.csv"):
        shutil.copy(old / name, run / name)
    assert cli.main(["train", "--resume", str(run), "--no-progress"]) == 0
    rows = list(csv.reader((run / "metrics.csv").open()))[1:]
    assert [float(r[4]) for r in rows] == pytest.approx([h["test_acc"] for h in history])
    best = max(range(3), key=lambda i: (history[i]["test_acc"], i))
    assert load(run / "best.ckpt")["epoch"] == best + 1


def test_a_folder_with_checkpoints_but_no_config_is_never_overwritten(tmp_path, capsys,
                                                                     isolated_env):
    data = make_idx_folder(tmp_path / "data", n_train=120, n_test=40)
    run = tmp_path / "run"
    assert cli.main(["train", "--data", str(data), "--epochs", "1", "--out", str(run),
                     "--no-progress"]) == 0
    (run / "config.json").unlink()
    before = (run / "last.ckpt").read_bytes()
    capsys.readouterr()
    assert cli.main(["train", "--data", str(data), "--epochs", "1", "--out", str(run)]) == 1
    assert capsys.readouterr().err == (
        f"lenet: error: {run}: holds a run's last.ckpt, best.ckpt, metrics.csv (its "
        "config.json is gone); choose another --out\n")
    assert (run / "last.ckpt").read_bytes() == before
    (run / "last.ckpt").unlink()
    assert cli.main(["train", "--data", str(data), "--out", str(run)]) == 1
    assert "holds a run's best.ckpt, metrics.csv but no last.ckpt to resume from" in \
        capsys.readouterr().err


def test_resume_refuses_a_hand_edited_config_or_another_runs_checkpoint(tmp_path, capsys,
                                                                       isolated_env):
    import json
    import shutil

    data = make_idx_folder(tmp_path / "data", n_train=120, n_test=40)
    run, other = tmp_path / "run", tmp_path / "other"
    for folder, preset in ((run, "book"), (other, "modern")):
        assert cli.main(["train", "--data", str(data), "--preset", preset, "--epochs", "1",
                         "--out", str(folder), "--no-progress"]) == 0
    config = json.loads((run / "config.json").read_text())
    config["train"]["lr"] = 0.01
    (run / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run), "--epochs", "2"]) == 1
    assert capsys.readouterr().err == (
        f"lenet: error: {run / 'config.json'}: says train.lr 0.01 but {run / 'last.ckpt'} was "
        "trained with 0.9; a run continues as it was trained: restore config.json, or start a "
        "new run with --config\n")
    shutil.copy(other / "config.json", run / "config.json")  # config.json back in step...
    assert cli.main(["train", "--resume", str(run), "--epochs", "2"]) == 1
    assert "says model.activation relu but" in capsys.readouterr().err  # ...not the checkpoint
    shutil.copy(other / "last.ckpt", run / "last.ckpt")  # both from the other run: its own
    assert cli.main(["train", "--resume", str(run), "--epochs", "2", "--no-progress"]) == 0


def test_batch_norm_with_a_batch_of_one_is_refused_before_the_run_folder(tmp_path, capsys,
                                                                         isolated_env):
    # 60 images in batches of 59 leave a last batch of one: batch norm cannot train on it
    # (it used to fail with a traceback after the epoch's other batches).
    data = make_idx_folder(tmp_path / "data", n_train=60, n_test=20)
    argv = ["train", "--preset", "best", "--epochs", "1", "--data", str(data), "--out",
            str(tmp_path / "run"), "--no-progress", "--batch-size"]
    assert cli.main([*argv, "59"]) == 1
    assert capsys.readouterr().err == (
        "lenet: error: --batch-size 59: the last batch of an epoch holds 1 of the 60 "
        "training images; batch norm needs at least 2 per process; choose another batch "
        "size\n")
    assert not (tmp_path / "run").exists()
    assert cli.main([*argv, "58"]) == 0  # a last batch of 2 trains


def test_batch_norm_shares_under_torchrun_are_checked_too():
    from lenet.config import preset
    from lenet.errors import ConfigError
    from lenet.models import init_model
    from lenet.train import check_batch_norm_batches

    best, book = init_model(preset("best").model, 0), init_model(preset("book").model, 0)
    check_batch_norm_batches(best, 128, 60_000)
    check_batch_norm_batches(book, 3, 60_001, world=2)  # no batch norm: anything goes
    with pytest.raises(ConfigError, match="a batch holds 3 of the 60,000 training images, 1 "
                                          "for some of the 2 processes"):
        check_batch_norm_batches(best, 3, 60_000, world=2)
    with pytest.raises(ConfigError, match="the last batch of an epoch holds 2 .* 1 for some"):
        check_batch_norm_batches(best, 128, 59_906, world=2)


def test_world_size_set_by_hand_without_master_addr_is_one_line(tmp_path, capsys,
                                                                 isolated_env, monkeypatch):
    for name in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    data = make_idx_folder(tmp_path / "data", n_train=60, n_test=20)
    assert cli.main(["train", "--epochs", "1", "--data", str(data), "--out",
                     str(tmp_path / "run")]) == 1
    assert capsys.readouterr().err == (
        "lenet: error: WORLD_SIZE=2 and RANK=0 are set but MASTER_ADDR is not: launch with "
        "torchrun (see the README), or unset WORLD_SIZE and RANK\n")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_second_signal_stops_at_once_with_its_own_exit_status(monkeypatch, capsys, signame):
    """The first Ctrl-C or SIGTERM asks for a gentle stop; a second stops at once, and the
    exit status is still 128 + that signal (143 for SIGTERM, as a scheduler expects)."""
    import signal
    import types

    sig = getattr(signal, signame)
    trainer, stopped = types.SimpleNamespace(stop_requested=False), []
    try:
        cli._stop_gently(trainer, stopped)
        handler = signal.getsignal(sig)
        handler(sig, None)
        assert trainer.stop_requested and stopped == [sig]

        def training(args):
            handler(sig, None)  # the second, during training
        monkeypatch.setattr(cli, "cmd_train", training)
        assert cli.main(["train", "--no-progress"]) == 128 + sig
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert capsys.readouterr().err == "lenet: interrupted\n"
