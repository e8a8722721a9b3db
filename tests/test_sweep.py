"""`lenet sweep`: the space file, its mapping onto RunConfig, the study's bookkeeping, and a
small sweep in process (SQLite), resumed, whose best.json `lenet train` reproduces."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_idx_folder
from lenet import cli, sweep
from lenet.config import ConvSpec, RunConfig
from lenet.errors import ConfigError

optuna = pytest.importorskip("optuna")
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
ROOT = Path(__file__).resolve().parents[1]
EXERCISE2 = ROOT / "src" / "lenet" / "spaces" / "exercise2.toml"


def write(tmp_path: Path, text: str, name: str = "space.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_exercise2_covers_the_chapter_knobs():
    space = sweep.load_space(EXERCISE2)
    names = {p.name for p in space.params}
    assert names == {"model.conv_layers", "model.kernel", "model.channels", "model.padding",
                     "model.dense_layers", "model.dense_width", "model.activation",
                     "model.pooling", "model.init", "train.lr", "train.epochs"}
    lr = next(p for p in space.params if p.name == "train.lr")
    assert lr.log and not lr.is_int
    assert next(p for p in space.params if p.name == "train.epochs").is_int


def test_derived_knobs_build_the_conv_and_dense_stacks(tmp_path):
    space = sweep.load_space(write(tmp_path, '[space.model]\nkernel = {choices = [3, 7]}\n'))
    book = space.config({"model.kernel": 7}).model  # the book's stack, kernel changed
    assert book.convs == (ConvSpec(6, 7, 3), ConvSpec(16, 7, 0)) and book.dense == (120, 84)
    cfg = space.config({"model.conv_layers": 3, "model.kernel": 3, "model.channels": 8,
                        "model.padding": "same", "model.dense_layers": 2,
                        "model.dense_width": 100})
    assert cfg.model.convs == (ConvSpec(8, 3, 1), ConvSpec(16, 3, 1), ConvSpec(32, 3, 1))
    assert cfg.model.dense == (100, 70)
    assert space.config({"model.dense_layers": 0}).model.dense == ()
    deeper = space.config({"model.conv_layers": 3}).model.convs  # book's two, then doubled
    assert [c.channels for c in deeper] == [6, 16, 32] and deeper[2].padding == 0


def test_fixed_section_and_plain_values_and_flags(tmp_path):
    path = write(tmp_path, 'preset = "modern"\n[fixed.train]\nbatch_size = 32\n'
                           '[space.train]\nlr = {low = 0.01, high = 0.5, log = true}\n'
                           'epochs = 3\n')
    space = sweep.load_space(path)
    cfg = space.config({"train.lr": 0.1})
    assert (cfg.preset, cfg.model.activation, cfg.train.batch_size, cfg.train.epochs,
            cfg.train.lr) == ("modern", "relu", 32, 3, 0.1)
    assert space.without("train.epochs").config({}).train.epochs == 10


@pytest.mark.parametrize("text, message", [
    ('colour = 1\n[space.train]\nlr = {low = 0.1, high = 1.0}\n',
     "unknown key 'colour'; expected some of preset, fixed, space"),
    ('[space.train]\nspeed = {low = 1, high = 2}\n', "space.train.speed: unknown knob"),
    ('[space.model]\nkernal = {choices = [3]}\n', "space.model.kernal: unknown knob"),
    ('[space.optim]\nlr = {low = 0.1, high = 1.0}\n', "space.optim: unknown section"),
    ('[space.train]\nlr = {low = 1.0, high = 0.1}\n',
     "space.train.lr: expected low < high, got low 1.0, high 0.1"),
    ('[space.train]\nlr = {low = 0.0, high = 1.0, log = true}\n',
     "space.train.lr: a log scale needs low > 0"),
    ('[space.train]\nlr = {low = 0.1, high = 1.0, scale = "log"}\n',
     "space.train.lr: unknown key 'scale'"),
    ('[space.model]\nactivation = {choices = []}\n',
     "space.model.activation: choices: expected a non-empty list"),
    ('[space.model]\nactivation = {choices = ["relu", "swish"]}\n',
     "space.model.activation: 'swish' is not allowed"),
    ('[space.model]\nconvs = {choices = [1]}\n', "space.model.convs: a list cannot be "
     "searched; use conv_layers, kernel, channels, padding"),
    ('[space.model]\npadding = {choices = ["full"]}\n', "space.model.padding: 'full'"),
    ('[space.train]\nepochs = {low = 0, high = 3}\n', "space.train.epochs: 0 is not allowed"),
    ('preset = "vintage"\n[space.train]\nlr = {low = 0.1, high = 1.0}\n',
     "preset: unknown preset 'vintage'"),
    ('[fixed.train]\nbatch = 3\n[space.train]\nlr = {low = 0.1, high = 1.0}\n',
     "unknown key(s) batch"),
    ('preset = "book"\n', "space: expected a table of sections"),
    ('[space.train\n', "not a readable TOML config"),
    ('[space.data]\nname = {choices = ["mnist"]}\n', "space.data.name: every trial trains on "
     "the same data; choose it with --data"),
    ('[space.data]\nname = "mnist"\n[space.train]\nlr = {low = 0.1, high = 1.0}\n',
     "space.data.name: every trial trains on the same data"),
    ('[space.model]\nactivation = "swish"\n[space.train]\nlr = {low = 0.1, high = 1.0}\n',
     "space: model.activation: expected one of"),  # the bad plain value, not lr, is named
    ('[space.train]\nbatch_size = {low = 16, high = 256, step = 0.5}\n',
     "space.train.batch_size: draws values such as 16.5, which are not allowed"),
    ('[space.model]\nkernel = {low = 3, high = 5.0}\n', "space.model.kernel: 5.0 is not allowed"),
    ('[space.model]\ndense_width = {low = 10, high = 100.5}\n',
     "space.model.dense_width: 100.5 is not allowed"),
])
def test_bad_space_files_are_one_line_naming_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        sweep.load_space(path)
    line = str(e.value)
    assert "\n" not in line and line.startswith(str(path)) and message in line, line


def test_bad_space_via_the_cli_is_one_line(tmp_path, capsys):
    path = write(tmp_path, '[space.train]\nlr = {low = 1.0, high = 0.1}\n')
    assert cli.main(["sweep", "--space", str(path), "--n-trials", "2",
                     "--out", str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"lenet: error: {path}: space.train.lr:") and err.count("\n") == 1
    assert cli.main(["sweep", "--space", str(path), "--n-trials", "0",
                     "--out", str(tmp_path / "s")]) == 1
    assert "--n-trials 0: expected a positive integer" in capsys.readouterr().err
    for seed, workers, top in (("-1", "1", "4,294,967,295"), ("4294967295", "2", "4,294,967,294")):
        assert cli.main(["sweep", "--space", str(path), "--n-trials", "2", "--seed", seed,
                         "--workers", workers, "--out", str(tmp_path / "s")]) == 1
        err = capsys.readouterr().err
        assert err == f"lenet: error: --seed {seed}: expected 0 to {top}\n", err


def test_storage_choice():
    out = Path("/x")
    assert sweep.choose_storage(None, out, 1) == sweep.Storage("rdb", "sqlite:////x/sweep.db")
    assert sweep.choose_storage(None, out, 3) == sweep.Storage("journal", "/x/sweep.journal")
    pg = sweep.choose_storage("postgresql+psycopg://u:secret@h/db", out, 1)
    assert pg.kind == "rdb" and "secret" not in pg.describe()
    with pytest.raises(ConfigError, match=r"^--storage postgresql\+psycopg://u:\*\*\*@h:5432/db: "
                                          r"its user or password holds '@', which a URL "
                                          r"spells %40$"):
        sweep.choose_storage("postgresql+psycopg://u:p@ss/w:rd@h:5432/db", out, 1)
    with pytest.raises(ConfigError, match="--storage '': expected a URL"):
        sweep.choose_storage("", out, 1)


def test_a_sweep_folder_goes_on_with_the_storage_it_holds(tmp_path):
    """Whatever --workers says on the rerun: another default would start a second study
    over the first one's trial folders."""
    (tmp_path / "sweep.journal").write_text("")
    assert sweep.choose_storage(None, tmp_path, 1) == sweep.Storage(
        "journal", str(tmp_path / "sweep.journal"))
    (tmp_path / "sweep.journal").unlink()
    (tmp_path / "sweep.db").write_text("")
    with pytest.raises(ConfigError, match="its study is in sweep.db .* go on with --workers 1"):
        sweep.choose_storage(None, tmp_path, 2)
    (tmp_path / "sweep.journal").write_text("")
    with pytest.raises(ConfigError, match="holds both sweep.db and sweep.journal"):
        sweep.choose_storage(None, tmp_path, 1)


def test_a_sweep_folder_refuses_another_study_or_storage(tmp_path):
    db = sweep.choose_storage(None, tmp_path, 1)
    sweep.check_folder_study(tmp_path, db, "ex2")  # checks only: nothing recorded yet
    assert not (tmp_path / "study.json").exists()
    sweep.check_folder_study(tmp_path, db, "ex2", record=True)
    same = sweep.choose_storage(f"sqlite:///{tmp_path}/../{tmp_path.name}/sweep.db", tmp_path, 1)
    sweep.check_folder_study(tmp_path, same, "ex2")  # another spelling of the same file
    pg = sweep.Storage("rdb", "postgresql+psycopg://u:pw@h/db")
    (tmp_path / "pg").mkdir()
    sweep.check_folder_study(tmp_path / "pg", pg, "ex2", record=True)
    timeout = sweep.Storage("rdb", "postgresql+psycopg://u:other@h/db?connect_timeout=5")
    sweep.check_folder_study(tmp_path / "pg", timeout, "ex2")  # options and password aside
    with pytest.raises(ConfigError, match=r"holds the trials of study 'ex2' .*--study ex2"):
        sweep.check_folder_study(tmp_path, db, "other")
    with pytest.raises(ConfigError, match=r"in sqlite:///.*sweep.db, not journal file "):
        sweep.check_folder_study(tmp_path, sweep.choose_storage(str(tmp_path / "j"), tmp_path, 1),
                                 "ex2")


def test_prune_callback_reports_each_epoch_and_raises_when_told():
    class FakeTrial:
        def __init__(self, prune):
            self.reports, self.prune = [], prune

        def report(self, value, step):
            self.reports.append((step, value))

        def should_prune(self):
            return self.prune

    class M:
        epoch, test_acc = 2, 0.25

    keep = FakeTrial(False)
    sweep.PruneCallback(keep).on_epoch_end(None, M)
    assert keep.reports == [(2, 0.25)]
    with pytest.raises(optuna.TrialPruned, match="after epoch 2"):
        sweep.PruneCallback(FakeTrial(True)).on_epoch_end(None, M)


def test_a_dead_local_worker_trial_is_failed_and_queued_again(tmp_path):
    """Journal files have no heartbeat: a running trial whose process (on this host) is gone
    is failed and requeued with the same parameters, without the dead pid."""
    import socket

    from optuna.storages.journal import JournalFileBackend

    space = sweep.load_space(write(tmp_path, '[space.train]\nlr = {low = 0.1, high = 1.0}\n'))
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(tmp_path / "j.log")))
    study = sweep.open_study(storage, "s", space, sweep.make_pruner("none", None))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    trial = study.ask()
    trial.suggest_float("train.lr", 0.1, 1.0)
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", gone.pid)
    alive = study.ask()
    alive.set_user_attr("host", socket.gethostname())
    alive.set_user_attr("pid", os.getpid())
    assert sweep.counts(study) == sweep.Counts(done=0, running=2, waiting=0)
    assert sweep.reap_dead_workers(study, by_pid=False) == []  # RDB-style: heartbeat only
    assert sweep.reap_dead_workers(study, by_pid=True) == [trial.number]
    trials = study.get_trials()
    assert trials[trial.number].state.name == "FAIL"
    retry = trials[-1]
    assert retry.state.name == "WAITING" and retry.params == trials[trial.number].params
    assert retry.system_attrs["failed_trial"] == trial.number and "pid" not in retry.user_attrs
    assert sweep.counts(study) == sweep.Counts(done=0, running=1, waiting=1)
    with pytest.raises(ConfigError, match="another search space"):
        other = sweep.load_space(write(tmp_path, '[space.train]\nlr = {low = 0.2, high = 1.0}\n',
                                       "other.toml"))
        sweep.open_study(storage, "s", other, sweep.make_pruner("none", None))


SMALL = """# tiny nets, so a trial takes a fraction of a second
preset = "modern"
[fixed.train]
batch_size = 64
[space.model]
channels = { choices = [2, 4] }
dense_width = { choices = [16, 32] }
activation = { choices = ["relu", "tanh"] }
[space.train]
lr = { low = 0.05, high = 0.3, log = true }
"""


def test_sweep_writes_trials_best_json_and_figures_and_resumes_to_the_total(
        tmp_path, capsys, isolated_env):
    data = make_idx_folder(tmp_path / "data", n_train=300, n_test=100)
    space = write(tmp_path, SMALL)
    out = tmp_path / "sweep"
    argv = ["sweep", "--space", str(space), "--n-trials", "3", "--epochs", "2",
            "--data", str(data), "--out", str(out), "--seed", "0", "--pruner", "none"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "storage sqlite:///" in text and "0 of 3 trials done" in text
    assert text.count("complete") >= 3 and "best: trial" in text
    for name in ("best.json", "history.png", "importances.png", "trials.txt", "sweep.db"):
        assert (out / name).is_file(), name
    for n in range(3):
        run = out / "trials" / f"{n:04d}"
        assert {"config.json", "metrics.csv", "last.ckpt", "log.txt"} <= {
            p.name for p in run.iterdir()}
        assert len((run / "metrics.csv").read_text().splitlines()) == 3  # header + 2 epochs

    study = optuna.load_study(study_name="space", storage=f"sqlite:///{out / 'sweep.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    assert all(sorted(t.intermediate_values) == [1, 2] for t in study.trials)
    best = study.best_trial

    assert cli.main(argv) == 0  # the same command again: the study is full
    text = capsys.readouterr().out
    assert "3 of 3 trials done" in text and "trial 3" not in text
    assert cli.main([*argv[:argv.index("--n-trials") + 1], "2",
                     *argv[argv.index("--n-trials") + 2:]]) == 0
    assert "3 trials done (more than --n-trials 2: nothing to run)" in capsys.readouterr().out
    assert len(optuna.load_study(study_name="space",
                                 storage=f"sqlite:///{out / 'sweep.db'}").trials) == 3

    cfg = RunConfig.from_json_file(out / "best.json")
    assert cfg.train.epochs == 2 and cfg.train.lr == best.params["train.lr"]
    assert cfg.model.activation == best.params["model.activation"]
    run = tmp_path / "again"
    assert cli.main(["train", "--config", str(out / "best.json"), "--out", str(run),
                     "--no-progress"]) == 0
    last = (run / "metrics.csv").read_text().splitlines()[-1].split(",")
    assert float(last[4]) == pytest.approx(best.value, abs=1e-6)


def test_an_invalid_sampled_config_fails_its_trial_with_the_reason(tmp_path, capsys,
                                                                     isolated_env):
    data = make_idx_folder(tmp_path / "data", n_train=60, n_test=20)
    space = write(tmp_path, '[space.model]\nconv_layers = {choices = [5]}\n'
                            'padding = {choices = ["valid"]}\n')
    out = tmp_path / "sweep"
    assert cli.main(["sweep", "--space", str(space), "--n-trials", "1", "--data", str(data),
                     "--out", str(out)]) == 1  # the sweep found no answer
    text, err = capsys.readouterr()
    assert "sweep 'space': 2 knobs from" in text
    assert "trial 0: fail (conv3: a 5x5 kernel with padding 0 does not fit" in text
    assert "no trial completed: no best.json" in err and not (out / "best.json").exists()


def test_a_diverging_recipe_is_pruned_with_the_reason_so_the_sampler_learns(tmp_path, capsys,
                                                                            isolated_env):
    data = make_idx_folder(tmp_path / "data", n_train=300, n_test=60)
    space = write(tmp_path, 'preset = "modern"\n[space.train]\nlr = {choices = [100.0]}\n')
    out = tmp_path / "sweep"
    assert cli.main(["sweep", "--space", str(space), "--n-trials", "1", "--epochs", "2",
                     "--data", str(data), "--out", str(out)]) == 1
    text = capsys.readouterr().out
    assert "sweep 'space': 1 knob from" in text
    assert re.search(r"trial 0: pruned \(epoch 1, step \d+: the training loss (reached "
                     r"\S+ per example|is not finite) \(training diverged\)", text), text
    study = optuna.load_study(study_name="space", storage=f"sqlite:///{out / 'sweep.db'}")
    assert [t.state.name for t in study.trials] == ["PRUNED"]  # TPE ignores failed trials


def test_workers_refuse_sqlite(tmp_path, capsys):
    assert cli.main(["sweep", "--space", str(EXERCISE2), "--n-trials", "2", "--workers", "2",
                     "--storage", f"sqlite:///{tmp_path}/s.db", "--out", str(tmp_path)]) == 1
    assert "Optuna advises against parallel SQLite" in capsys.readouterr().err


def test_best_json_is_a_whole_config(tmp_path):
    cfg = RunConfig()
    path = tmp_path / "best.json"
    path.write_text(cfg.to_json())
    assert RunConfig.from_dict(json.loads(path.read_text())) == cfg


def test_a_storage_that_fails_to_open_leaves_no_empty_out_folder(tmp_path, capsys):
    out = tmp_path / "new" / "sweep"
    assert cli.main(["sweep", "--space", str(EXERCISE2), "--n-trials", "1", "--storage",
                     "foo://bar", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lenet: error: ") and err.count("\n") == 1, err
    assert not out.exists()


def test_a_seeded_rerun_draws_new_parameters_and_a_changed_setup_is_refused(
        tmp_path, capsys, isolated_env):
    """Rerunning the same seeded command goes on sampling (the seed alone redrew trial 0's
    parameters); another --data or --epochs would rank incomparable trials together."""
    data = make_idx_folder(tmp_path / "data", n_train=60, n_test=20)
    space = write(tmp_path, '[space.train]\nlr = { low = 0.01, high = 0.5, log = true }\n')
    out = tmp_path / "sweep"
    argv = ["sweep", "--space", str(space), "--epochs", "1", "--data", str(data), "--out",
            str(out), "--seed", "0", "--pruner", "none", "--n-trials"]
    assert cli.main([*argv, "2"]) == 0
    assert cli.main([*argv, "4"]) == 0
    study = optuna.load_study(study_name="space", storage=f"sqlite:///{out / 'sweep.db'}")
    lrs = [t.params["train.lr"] for t in study.trials]
    assert len(lrs) == 4 and len(set(lrs)) == 4, lrs
    capsys.readouterr()
    assert cli.main([*argv[:4], "2", *argv[5:], "5"]) == 1
    assert capsys.readouterr().err == (
        "lenet: error: study 'space' ran its trials with --epochs 1, this run asks for 2: "
        "trials would not be comparable; use the same, or another --study name or --out "
        "folder\n")
    other = make_idx_folder(tmp_path / "other", n_train=60, n_test=20)
    assert cli.main([*argv[:6], str(other), *argv[7:], "5"]) == 1
    assert f"ran its trials with --data {data}, this run asks for {other}" in \
        capsys.readouterr().err


def test_ctrl_c_in_a_sweep_says_how_to_go_on(tmp_path, capsys, monkeypatch):
    from lenet import cli_sweep

    def interrupted(a):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli_sweep.HANDLERS, "sweep", interrupted)
    assert cli.main(["sweep", "--space", str(EXERCISE2), "--n-trials", "1", "--out",
                     str(tmp_path / "sw")]) == 130
    assert capsys.readouterr().err == ("lenet: interrupted; run the same command again to go "
                                       "on (the trial in flight is run again)\n")


def test_a_trial_stopped_by_ctrl_c_is_queued_again_with_its_parameters(tmp_path):
    space = sweep.load_space(write(tmp_path, '[space.train]\nlr = {low = 0.1, high = 1.0}\n'))
    study = sweep.open_study(f"sqlite:///{tmp_path / 's.db'}", "s", space,
                             sweep.make_pruner("none", None), seed=0)

    def interrupted(trial):
        trial.suggest_float("train.lr", 0.1, 1.0)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sweep.work(study, 3, interrupted, by_pid=False)
    failed, queued = study.get_trials()
    assert (failed.state.name, queued.state.name) == ("FAIL", "WAITING")
    assert sweep.trial_rows(study)[0]["note"] == "stopped by Ctrl-C; retried"
    assert queued.params == failed.params and queued.system_attrs["failed_trial"] == 0
    assert sweep.counts(study) == sweep.Counts(done=0, running=0, waiting=1)

    drawn = []

    def objective(trial):
        drawn.append(trial.suggest_float("train.lr", 0.1, 1.0))
        return 0.5

    sweep.work(study, 1, objective, by_pid=False)
    assert drawn == [failed.params["train.lr"]]  # the same command again runs it first


def test_a_mistyped_data_is_refused_before_the_study_records_it(tmp_path, capsys,
                                                                 isolated_env):
    data = make_idx_folder(tmp_path / "data", n_train=60, n_test=20)
    space = write(tmp_path, SMALL)
    argv = ["sweep", "--space", str(space), "--n-trials", "1", "--epochs", "1",
            "--out", str(tmp_path / "sw"), "--seed", "0", "--pruner", "none", "--data"]
    assert cli.main([*argv, str(tmp_path / "dat")]) == 1
    assert "no such" in capsys.readouterr().err
    assert not (tmp_path / "sw").exists()
    assert cli.main([*argv, str(data)]) == 0  # not "ran its trials with --data .../dat"
    capsys.readouterr()
    assert cli.main([*argv, str(data), "--study", "other"]) == 1
    assert "holds the trials of study 'space'" in capsys.readouterr().err


def test_a_postgresql_server_that_never_answers_is_an_error_not_a_hang(monkeypatch):
    pytest.importorskip("psycopg")
    import socket
    import time

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)  # takes connections (the kernel does) and never says a word
    port = listener.getsockname()[1]
    monkeypatch.setattr(sweep, "CONNECT_TIMEOUT", 1)
    storage = sweep.Storage("rdb", f"postgresql+psycopg://u:secret@127.0.0.1:{port}/db")
    start = time.monotonic()
    try:
        with pytest.raises(ConfigError, match="cannot open it") as e:
            sweep.open_storage(storage, 30)
    finally:
        listener.close()
    assert time.monotonic() - start < 30 and "secret" not in str(e.value)


@pytest.mark.parametrize("race", ["(sqlite3.IntegrityError) UNIQUE constraint failed: "
                                  "alembic_version.version_num",
                                  'relation "studies" already exists'])
def test_two_machines_creating_the_tables_at_once_retry(monkeypatch, tmp_path, race):
    real, calls = optuna.storages.RDBStorage, []

    def racing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError(race)  # what the slower process sees
        return real(*args, **kwargs)

    monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
    monkeypatch.setattr(sweep.time, "sleep", lambda s: None)
    sweep.open_storage(sweep.Storage("rdb", f"sqlite:///{tmp_path / 's.db'}"), 30)
    assert len(calls) == 2


def test_a_journal_file_that_cannot_be_made_is_one_line_naming_storage(tmp_path):
    (tmp_path / "file").write_text("")
    where = tmp_path / "file" / "sub" / "sweep.journal"  # under a file: no folder can be made
    with pytest.raises(ConfigError, match=f"--storage {where}: cannot create or open"):
        sweep.open_storage(sweep.choose_storage(str(where), tmp_path, 1), 30)


def test_the_chapter_space_is_built_in_by_name(tmp_path, monkeypatch):
    """Installed from a wheel there is no examples/ folder: `--space exercise2` finds the
    copy shipped in the package; a file of that name in the working folder wins."""
    monkeypatch.chdir(tmp_path)
    assert sweep.space_file("exercise2") == EXERCISE2
    assert sweep.load_space(sweep.space_file("exercise2")).params
    (tmp_path / "exercise2").mkdir()  # e.g. the sweep's own --out
    assert sweep.space_file("exercise2") == EXERCISE2
    (tmp_path / "exercise2").rmdir()
    (tmp_path / "exercise2").write_text("")
    assert sweep.space_file("exercise2") == Path("exercise2")
    with pytest.raises(ConfigError, match=r"^nope.toml: no such file \(built-in spaces: "
                                          r"exercise2\)$"):
        sweep.space_file("nope.toml")
