"""Sweeps with real parallel workers: two worker processes sharing a journal file, and two
'machines' (separate commands) sharing a PostgreSQL study. In each, one worker is killed
(SIGKILL) in the middle of a trial; its trial must be failed and run again (by process
liveness for the journal, by heartbeat for PostgreSQL), and the study must end at exactly
--n-trials. PostgreSQL: $LENET_TEST_POSTGRES, else a throwaway server started with
scripts/pg-throwaway.sh when the server binaries are here; in CI a missing server fails."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from conftest import make_idx_folder
from lenet import sweep

optuna = pytest.importorskip("optuna")
pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

# relu: PyTorch autograd, slow enough (a second or more a trial) to be killed in the middle.
SPACE = """preset = "modern"
[space.model]
channels = { choices = [4, 6] }
[space.train]
lr = { low = 0.05, high = 0.2, log = true }
"""
N_TRIALS = 3


@pytest.fixture(scope="module")
def postgres_url():
    url = os.environ.get("LENET_TEST_POSTGRES")
    if url:
        yield url
        return
    script = ROOT / "scripts" / "pg-throwaway.sh"
    folder = Path(tempfile.mkdtemp(prefix="lenet-pg-"))
    folder.chmod(0o755)  # the server may run as the postgres user
    started = subprocess.run([str(script), "start", str(folder / "pg")], capture_output=True,
                             text=True)
    if started.returncode != 0:
        why = f"no PostgreSQL server: {started.stderr.strip()}"
        if os.environ.get("CI"):
            pytest.fail(f"CI needs PostgreSQL ($LENET_TEST_POSTGRES or server binaries): {why}")
        pytest.skip(why)
    try:
        yield (folder / "pg" / "url").read_text().strip()
    finally:
        subprocess.run([str(script), "stop", str(folder / "pg")], capture_output=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweepw")
    data = make_idx_folder(root / "data", n_train=800, n_test=100)
    space = root / "space.toml"
    space.write_text(SPACE)
    return root, data, space


def _sweep(space, data, out, *extra) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lenet", "sweep", "--space", str(space), "--n-trials",
         str(N_TRIALS), "--epochs", "2", "--pruner", "none", "--data", str(data),
         "--out", str(out), *extra],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)


def _kill_in_a_trial(open_study, procs, pids=None, timeout=90.0) -> int:
    """SIGKILL the worker of the first trial seen training (its config recorded, not yet
    finished); returns that trial's number."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            assert p.poll() is None, p.communicate()[0]
        try:
            study = open_study()
        except Exception:  # not created yet
            time.sleep(0.1)
            continue
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            pid = t.user_attrs.get("pid")
            if "config" in t.user_attrs and pid and (pids is None or pid in pids):
                os.kill(pid, signal.SIGKILL)
                return t.number
        time.sleep(0.05)
    raise AssertionError("no trial was seen running")


def _check_retried(study, killed: int) -> None:
    trials = study.get_trials(deepcopy=False)
    assert trials[killed].state.name == "FAIL"
    assert sweep.ERROR_ATTR not in trials[killed].user_attrs
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert [t.state.name for t in retries] == ["COMPLETE"]
    assert retries[0].params == trials[killed].params
    assert sweep.counts(study).done == N_TRIALS  # exactly the total, the retry included
    assert sum(t.state.name == "COMPLETE" for t in trials) == N_TRIALS


def test_two_local_workers_on_a_journal_file_retry_a_killed_workers_trial(setup):
    root, data, space = setup
    out = root / "journal"
    proc = _sweep(space, data, out, "--workers", "2")

    def open_study():
        from optuna.storages.journal import JournalFileBackend

        if not (out / "sweep.journal").exists():
            raise FileNotFoundError
        storage = optuna.storages.JournalStorage(JournalFileBackend(str(out / "sweep.journal")))
        return optuna.load_study(study_name="space", storage=storage)

    killed = _kill_in_a_trial(open_study, [proc])
    text = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, text
    assert "ended with signal 9" in text
    assert f"trial {killed}: its worker is gone; queued again" in text
    assert "storage journal file" in text and "2 workers" in text
    _check_retried(open_study(), killed)
    assert (out / "best.json").is_file()


def test_two_machines_on_postgresql_retry_a_killed_machines_trial_by_heartbeat(
        setup, postgres_url):
    root, data, space = setup
    study_name = f"t{uuid.uuid4().hex[:8]}"
    common = ("--storage", postgres_url, "--study", study_name, "--heartbeat", "1")
    # The tables and the study exist before the machines start, so they start together
    # (the first to create them would otherwise be done before the second is up).
    optuna.create_study(study_name=study_name, storage=postgres_url, direction="maximize")

    def open_study():
        return optuna.load_study(study_name=study_name, storage=postgres_url)

    first = _sweep(space, data, root / "machine-a", *common)
    second = _sweep(space, data, root / "machine-b", *common)
    killed = _kill_in_a_trial(open_study, [first, second], pids={second.pid})
    text = first.communicate(timeout=120)[0]
    second.wait(timeout=10)
    assert first.returncode == 0, text
    assert second.returncode == -signal.SIGKILL
    assert f"trial {killed}: its worker is gone; queued again" in text
    _check_retried(open_study(), killed)

    assert len(open_study().trials) == N_TRIALS + 1  # the killed one and its retry
