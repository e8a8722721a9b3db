"""Hyperparameter sweeps: a search space file, Optuna studies, and the bookkeeping that lets
any number of workers on any number of machines share one study.

A space file (TOML or JSON) names a base recipe and the knobs to search:

    preset = "book"                       # base recipe (default book)
    [fixed.train]                         # any part of a config, as in `lenet train --config`
    batch_size = 128
    [space.train]
    lr = { low = 0.01, high = 1.0, log = true }   # float range (int range when both are ints)
    [space.model]
    activation = { choices = ["sigmoid", "relu"] }
    conv_layers = { low = 1, high = 3 }

Keys of `space.train` / `space.model` / `space.data` are the config's scalar fields, plus the
derived conv and dense knobs in DERIVED (a conv stack is a list, which Optuna cannot sample;
these knobs describe one). Every trial is an ordinary run folder; the study only records the
sampled values, the per-epoch test accuracy and the full config of each trial.
"""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

from lenet.config import (
    DataSpec,
    ModelSpec,
    RunConfig,
    TrainSpec,
    merge_config,
    preset,
    read_config_file,
)
from lenet.errors import ConfigError
from lenet.files import atomic_write
from lenet.train import Callback

SECTIONS = {"model": ModelSpec, "train": TrainSpec, "data": DataSpec}
# Knobs that describe the conv and dense stacks (ModelSpec.convs / .dense are lists).
DERIVED = {
    "conv_layers": "number of conv layers (each followed by its pooling)",
    "kernel": "kernel size of every conv layer",
    "channels": "channels of the first conv layer; each later layer doubles it",
    "padding": "first (the book's: 'same' on conv1, none after), same, or valid",
    "dense_layers": "number of hidden dense layers",
    "dense_width": "width of the first hidden dense layer; each later one is 0.7 of the last "
                   "(the book's 120 -> 84)",
}
CONV_KNOBS = ("conv_layers", "kernel", "channels", "padding")
DENSE_KNOBS = ("dense_layers", "dense_width")
PADDINGS = ("first", "same", "valid")
DENSE_SHRINK = 0.7
TOP_KEYS = ("preset", "fixed", "space")
NOT_KNOBS = ("convs", "dense", "name", "classes")  # lists, and what the data set decides
OBJECTIVE = "test_acc"  # final-epoch test accuracy: what `lenet train --config best.json` gives
# A failed trial with this user attribute failed for a reason of its own (an invalid config)
# and counts towards --n-trials; one without it lost its worker and is retried instead. On a
# pruned trial it says why the recipe diverged.
ERROR_ATTR = "error"
STOPPED_ATTR = "stopped"  # a trial stopped by Ctrl-C (queued again, as a lost worker's)


@dataclass(frozen=True)
class Param:
    name: str  # "section.field", also the Optuna parameter name
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None

    @property
    def is_int(self) -> bool:
        return all(isinstance(v, int) for v in (self.low, self.high, self.step or 1))

    def suggest(self, trial):
        if self.choices:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.is_int:
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1,
                                     log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def extremes(self) -> list:
        return list(self.choices) if self.choices else [self.low, self.high]

    def between(self) -> list:
        """A fractional value a float range can draw: an integer setting refuses it."""
        if self.choices or self.is_int:
            return []
        return [self.low + (self.step if self.step else (self.high - self.low) / 3)]


@dataclass(frozen=True)
class Space:
    path: Path
    preset: str
    fixed: dict
    params: tuple[Param, ...]
    fixed_values: dict  # "section.field" -> value, from `space` entries given as a plain value

    def base(self) -> RunConfig:
        return merge_config(preset(self.preset), self.fixed, f"{self.path}: fixed")

    def config(self, values: dict) -> RunConfig:
        """The run config for sampled `values` ("section.field" -> value); ConfigError when
        they make an invalid recipe."""
        base = self.base()
        values = {**self.fixed_values, **values}
        partial: dict = {}
        derived = {}
        for name, value in values.items():
            section, key = name.split(".", 1)
            if section == "model" and key in DERIVED:
                derived[key] = value
            else:
                partial.setdefault(section, {})[key] = value
        model = partial.setdefault("model", {})
        if any(k in derived for k in CONV_KNOBS):
            model["convs"] = _conv_stack(base.model, derived)
        if any(k in derived for k in DENSE_KNOBS):
            model["dense"] = _dense_stack(base.model, derived)
        return merge_config(base, partial, "sampled config")

    def without(self, name: str) -> Space:
        """The space with one knob no longer searched (a flag fixes it instead)."""
        return replace(self, params=tuple(p for p in self.params if p.name != name),
                       fixed_values={k: v for k, v in self.fixed_values.items() if k != name})

    def sample(self, trial) -> RunConfig:
        return self.config({p.name: p.suggest(trial) for p in self.params})

    def fingerprint(self) -> str:
        """What a study remembers of its space, to refuse a different one on resume."""
        return json.dumps({"preset": self.preset, "fixed": self.fixed,
                           "space": [p.__dict__ for p in self.params],
                           "fixed_values": self.fixed_values}, sort_keys=True, default=str)


def _conv_stack(base: ModelSpec, d: dict) -> list:
    n = d.get("conv_layers", len(base.convs))
    kernel = d.get("kernel", base.convs[0].kernel)
    padding = d.get("padding", "first")
    if padding not in PADDINGS:
        raise ConfigError(f"model.padding: expected one of {', '.join(PADDINGS)}, "
                          f"got {padding!r}")
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"model.conv_layers: expected a positive integer, got {n!r}")
    convs = []
    for i in range(n):
        if "channels" in d:
            channels = d["channels"] * 2 ** i
        elif i < len(base.convs):
            channels = base.convs[i].channels
        else:
            channels = base.convs[-1].channels * 2 ** (i - len(base.convs) + 1)
        same = padding == "same" or (padding == "first" and i == 0)
        convs.append({"channels": channels, "kernel": kernel,
                      "padding": kernel // 2 if same else 0})
    return convs


def _dense_stack(base: ModelSpec, d: dict) -> list:
    n = d.get("dense_layers", len(base.dense))
    if not isinstance(n, int) or n < 0:
        raise ConfigError(f"model.dense_layers: expected an integer >= 0, got {n!r}")
    width = d.get("dense_width", 1)
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ConfigError(f"model.dense_width: expected a positive integer, got {width!r}")
    widths = []
    for i in range(n):
        if "dense_width" in d:
            widths.append(round(d["dense_width"] * DENSE_SHRINK ** i))
        elif i < len(base.dense):
            widths.append(base.dense[i])
        else:
            last = base.dense[-1] if base.dense else 120
            widths.append(round(last * DENSE_SHRINK ** (i - len(base.dense) + 1)))
    return [max(1, w) for w in widths]


SPACES = Path(__file__).parent / "spaces"  # built-in space files, installed with the package


def space_file(given: str) -> Path:
    """GIVEN's path; a bare name that is no file here (`exercise2`) names a built-in space."""
    path = Path(given).expanduser()
    builtin = SPACES / f"{given}.toml"
    if path.is_file():
        return path
    if given.isidentifier() and builtin.is_file():  # e.g. beside a folder of that name
        return builtin
    if path.exists():
        return path  # a folder: load_space says so
    raise ConfigError(f"{given}: no such file (built-in spaces: "
                      f"{', '.join(builtin_spaces()) or 'none'})")


def builtin_spaces() -> list[str]:
    return sorted(p.stem for p in SPACES.glob("*.toml"))


def load_space(path: str | Path) -> Space:
    """Read and check a space file; every mistake is one line naming the file and key."""
    path = Path(path)
    data = read_config_file(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table/object at the top")
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key '{unknown[0]}'; expected some of "
                          f"{', '.join(TOP_KEYS)}")
    name = data.get("preset", "book")
    if not isinstance(name, str):
        raise ConfigError(f"{path}: preset: expected a preset name, got {name!r}")
    fixed = data.get("fixed", {})
    if not isinstance(fixed, dict):
        raise ConfigError(f"{path}: fixed: expected a table of config sections")
    try:
        preset(name)
    except ConfigError as e:
        raise ConfigError(f"{path}: preset: {e}") from None
    space = data.get("space")
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"{path}: space: expected a table of sections (model, train, data) "
                          f"with the knobs to search")
    params, fixed_values = [], {}
    for section, knobs in space.items():
        if section not in SECTIONS:
            raise ConfigError(f"{path}: space.{section}: unknown section; expected one of "
                              f"{', '.join(SECTIONS)}")
        if not isinstance(knobs, dict):
            raise ConfigError(f"{path}: space.{section}: expected a table of knobs")
        for key, spec in knobs.items():
            where = f"{path}: space.{section}.{key}"
            _check_knob(section, key, where)
            if isinstance(spec, dict):
                params.append(_param(f"{section}.{key}", spec, where))
            else:
                fixed_values[f"{section}.{key}"] = spec
    result = Space(path, name, fixed, tuple(params), fixed_values)
    try:
        result.base()
    except ConfigError as e:
        raise ConfigError(" ".join(str(e).split())) from None
    try:  # the plain values first, so that a bad one is not blamed on a searched knob
        result.config({})
    except ConfigError as e:
        raise ConfigError(f"{path}: space: {e}") from None
    for p in result.params:  # each knob's extremes alone must make a valid recipe
        for value in p.extremes() + p.between():
            try:
                result.config({p.name: value})
            except ConfigError as e:
                if value in p.extremes():
                    raise ConfigError(f"{path}: space.{p.name}: {value!r} is not allowed "
                                      f"({e})") from None
                raise ConfigError(f"{path}: space.{p.name}: draws values such as {value:g}, "
                                  f"which are not allowed ({e}); give low, high and step as "
                                  "whole numbers") from None
    return result


def _check_knob(section: str, key: str, where: str) -> None:
    names = {f.name for f in fields(SECTIONS[section])}
    if section == "model" and key in DERIVED:
        return
    if section == "model" and key in ("convs", "dense"):
        raise ConfigError(f"{where}: a list cannot be searched; use "
                          f"{', '.join(CONV_KNOBS if key == 'convs' else DENSE_KNOBS)}")
    if section == "data" and key in ("name", "classes"):
        raise ConfigError(f"{where}: every trial trains on the same data; "
                          + ("choose it with --data (or [fixed.data] name)" if key == "name"
                             else "the class names come from the data set"))
    if key not in names:
        extra = sorted(DERIVED) if section == "model" else []
        allowed = sorted(n for n in names if n not in NOT_KNOBS) + extra
        raise ConfigError(f"{where}: unknown knob; expected one of {', '.join(allowed)}")


def _param(name: str, spec: dict, where: str) -> Param:
    allowed = {"choices"} if "choices" in spec else {"low", "high", "log", "step"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}'; expected "
                          f"{{choices = [...]}} or {{low, high[, log][, step]}}")
    if "choices" in spec:
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: choices: expected a non-empty list")
        for c in choices:
            if not isinstance(c, (str, int, float, bool)):
                raise ConfigError(f"{where}: choices: {c!r} is not a number, string or bool")
        if len({json.dumps(c) for c in choices}) != len(choices):
            raise ConfigError(f"{where}: choices: a value is repeated")
        return Param(name, choices=tuple(choices))
    for key in ("low", "high"):
        v = spec.get(key)
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise ConfigError(f"{where}: {key}: expected a number, got {v!r}")
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: log: expected true or false, got {log!r}")
    if not low < high:
        raise ConfigError(f"{where}: expected low < high, got low {low}, high {high}")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log scale needs low > 0, got {low}")
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0:
            raise ConfigError(f"{where}: step: expected a positive number, got {step!r}")
        if log:
            raise ConfigError(f"{where}: step and log cannot be combined")
    return Param(name, low=low, high=high, log=log, step=step)


# -- storage and the study ------------------------------------------------------------------

@dataclass(frozen=True)
class Storage:
    kind: str  # "rdb" (sqlite, postgresql, mysql: heartbeats) or "journal" (a local file)
    url: str  # an SQLAlchemy URL, or the journal file's path

    def describe(self) -> str:
        if self.kind == "journal":
            return f"journal file {self.url}"
        return _hide_password(self.url)

    def identity(self) -> str:
        """The same for every spelling of the same storage (relative paths resolved), and
        without a password: what a sweep folder records of its study's storage."""
        if self.kind == "journal":
            return f"journal file {Path(self.url).resolve()}"
        url = self.url.split("?", 1)[0]  # connection options (connect_timeout=...) aside
        if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
            return f"sqlite:///{Path(url[len('sqlite:///'):]).resolve()}"
        return _hide_password(url)


DEFAULT_FILES = ("sweep.db", "sweep.journal")  # the default storages, one worker and several


def choose_storage(url: str | None, out: Path, workers: int) -> Storage:
    """The default is an SQLite file for one worker and a journal file for several on one
    machine (Optuna advises against SQLite with parallel writers); a URL with a scheme is an
    RDB, a path is a journal file. A sweep folder that already holds one goes on with it,
    whatever --workers says now: another would start a second study over the first's
    trials."""
    if url is None:
        held = [name for name in DEFAULT_FILES if (out / name).is_file()]
        if len(held) > 1:
            raise ConfigError(f"{out}: holds both sweep.db and sweep.journal, two studies; "
                              "choose one with --storage")
        if held == ["sweep.db"] and workers > 1:
            raise ConfigError(f"{out}: its study is in sweep.db (SQLite, made by one worker), "
                              "where Optuna advises against parallel writers: go on with "
                              "--workers 1, or start another --out")
        name = held[0] if held else "sweep.journal" if workers > 1 else "sweep.db"
        path = out / name
        return Storage("journal", str(path)) if name == "sweep.journal" else \
            Storage("rdb", f"sqlite:///{path}")
    if not url.strip():
        raise ConfigError("--storage '': expected a URL (sqlite:///FILE, "
                          "postgresql+psycopg://...) or a journal file's path")
    if "://" in url:
        userinfo = url.split("://", 1)[1].rpartition("@")[0]
        if "@" in userinfo:  # the driver would read part of the password as the host
            raise ConfigError(f"--storage {_hide_password(url)}: its user or password holds "
                              "'@', which a URL spells %40")
        return Storage("rdb", url)
    return Storage("journal", str(Path(url).expanduser()))


def check_folder_study(out: Path, storage: Storage, study: str, record: bool = False
                       ) -> None:
    """A sweep folder serves one study: its trials/NNNN folders are that study's trial
    numbers. A rerun naming another study or storage is refused; with `record`, a folder
    that names none yet is given this one."""
    path = out / "study.json"
    mine = {"study": study, "storage": storage.identity()}
    if not path.is_file():
        if record:
            text = json.dumps(mine, indent=2) + "\n"
            atomic_write(path, lambda f: f.write(text.encode()))
        return
    try:
        was = json.loads(path.read_text(encoding="utf-8-sig"))
        was = {k: str(was[k]) for k in mine}
    except (ValueError, KeyError, TypeError, OSError):
        raise ConfigError(f"{path}: not a sweep folder's study record (edited?); delete it "
                          "to let this study take the folder") from None
    if was["study"] != study:
        raise ConfigError(f"{out}: holds the trials of study '{was['study']}' ({was['storage']})"
                          f"; rerun with --study {was['study']}, or use another --out")
    if was["storage"] != mine["storage"]:
        raise ConfigError(f"{out}: holds the trials of study '{study}' in {was['storage']}, "
                          f"not {mine['storage']}; rerun with that --storage, or use another "
                          "--out")


def _hide_password(url: str) -> str:
    head, sep, tail = url.partition("://")
    # The last @ ends the user part: a password may hold an unescaped @ (or : or /).
    userinfo, at, rest = tail.rpartition("@")
    if at and ":" in userinfo:
        return f"{head}{sep}{userinfo.split(':', 1)[0]}:***@{rest}"
    return url


def open_storage(storage: Storage, heartbeat: int):
    """The Optuna storage. RDBs record a heartbeat every `heartbeat` seconds while a trial
    runs; a trial silent for 2x that is failed and queued again (same parameters) by the
    next worker that looks. Journal files have no heartbeat in Optuna: local workers instead
    check each other's process ids (see reap_dead_workers)."""
    import optuna

    if storage.kind == "journal":
        from optuna.storages.journal import JournalFileBackend

        try:
            Path(storage.url).parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(JournalFileBackend(storage.url))
        except OSError as e:
            raise ConfigError(f"--storage {storage.url}: cannot create or open the journal "
                              f"file ({e.strerror or e})") from None
    engine = None
    if not storage.url.startswith("sqlite"):
        engine = {"pool_pre_ping": True}
        if storage.url.startswith("postgresql") and "connect_timeout" not in storage.url:
            # A server that takes the connection but never answers: fail, don't hang.
            engine["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT}
    for attempt in range(3):
        try:
            return optuna.storages.RDBStorage(
                storage.url, heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
                heartbeat_stale_trial_callback=Retry(max_retry=MAX_RETRY),
                engine_kwargs=engine)
        except ImportError as e:
            raise ConfigError(f"--storage {storage.describe()}: its driver is missing ({e}); "
                              f"for PostgreSQL: pip install 'psycopg[binary]'") from None
        except Exception as e:  # sqlalchemy's OperationalError and friends: one line
            # Machines started together may race to create the tables: try again.
            if attempt < 2 and any(race in str(e) for race in TABLE_RACES):
                time.sleep(1 + attempt)
                continue
            detail = " ".join(str(e).split())[:300]
            raise ConfigError(f"--storage {storage.describe()}: cannot open it ({detail})"
                              ) from None


def quiet_optuna() -> None:
    """Optuna logs each trial and warns about experimental features; the CLI reports trials
    itself, one line each."""
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def make_pruner(name: str, epochs: int | None):
    import optuna

    if name == "median":  # prune below the median of earlier trials at the same epoch
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs or "auto",
                                              reduction_factor=3)
    return optuna.pruners.NopPruner()


def open_study(storage, name: str, space: Space, pruner, seed: int | None = None,
               setup: dict | None = None):
    """Create or load the study; refuse to resume it with another space, or another `setup`
    (what else decides a trial's score: the data set, the epochs). A seeded sampler resumed
    after N trials is seeded from (seed, N): the seed alone would draw the same first
    parameters again."""
    import numpy as np
    import optuna

    sampler = optuna.samplers.TPESampler(seed=seed)
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize",
                                sampler=sampler, pruner=pruner, load_if_exists=True)
    known = study.user_attrs.get("space")
    if known is None:
        study.set_user_attr("space", space.fingerprint())
    elif known != space.fingerprint():
        raise ConfigError(f"study '{name}' was started with another search space; use "
                          f"another --study name or --out folder")
    setup = dict(setup or {})
    was = study.user_attrs.get("setup")
    if was is None:
        study.set_user_attr("setup", setup)
    elif was != setup:
        key = next(k for k in sorted(set(was) | set(setup)) if was.get(k) != setup.get(k))
        raise ConfigError(f"study '{name}' ran its trials with --{key} {_shown(was.get(key))}, "
                          f"this run asks for {_shown(setup.get(key))}: trials would not be "
                          "comparable; use the same, or another --study name or --out folder")
    done = len(study.get_trials(deepcopy=False))
    if seed is not None and done:
        study.sampler = optuna.samplers.TPESampler(
            seed=int(np.random.SeedSequence([seed, done]).generate_state(1)[0]))
    return study


def _shown(value) -> str:
    return "(the space's)" if value is None else str(value)


@dataclass(frozen=True)
class Counts:
    done: int  # complete, pruned, or failed for a reason of its own: counts to --n-trials
    running: int
    waiting: int  # queued (a retry of a trial whose worker died)


def counts(study) -> Counts:
    from optuna.trial import TrialState

    done = running = waiting = 0
    for t in study.get_trials(deepcopy=False):
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
                t.state == TrialState.FAIL and ERROR_ATTR in t.user_attrs):
            done += 1
        elif t.state == TrialState.RUNNING:
            running += 1
        elif t.state == TrialState.WAITING:
            waiting += 1
    return Counts(done, running, waiting)


def reap_dead_workers(study, by_pid: bool) -> list[int]:
    """Fail and requeue the running trials whose worker is gone: by heartbeat (RDB
    storages), and with `by_pid` (journal files, which have no heartbeat in Optuna, and
    serve the workers of one machine) a trial started on this host by a process that no
    longer exists. Returns the numbers of the trials failed."""
    import optuna
    from optuna.trial import TrialState

    before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    optuna.storages.fail_stale_trials(study)
    host = socket.gethostname()
    retry = Retry(max_retry=MAX_RETRY)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if by_pid else ():
        pid = t.user_attrs.get("pid")
        if t.user_attrs.get("host") != host or not isinstance(pid, int) or _alive(pid):
            continue
        try:
            ok = study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker got there first
        if ok:
            retry(study, study._storage.get_trial(t._trial_id))
    after = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    return sorted(t.number for t in after
                  if t.number not in before and ERROR_ATTR not in t.user_attrs)


MAX_RETRY = 3  # a trial whose worker died this often is given up
CONNECT_TIMEOUT = 20  # seconds for a PostgreSQL server to answer a new connection
# What two processes creating a new storage's tables at once may see (the loser retries).
TABLE_RACES = ("already exists", "UNIQUE constraint failed", "duplicate key value")


def Retry(max_retry: int):  # noqa: N802 - a class made on first use: optuna imports lazily
    """Optuna's retry of a stale trial (a WAITING copy with the same parameters), minus
    the dead worker's host and pid: the copy must not look dead the moment it starts."""
    import copy

    from optuna.storages import RetryHeartbeatStaleTrialCallback

    class _Retry(RetryHeartbeatStaleTrialCallback):
        def __call__(self, study, trial):
            trial = copy.copy(trial)
            trial.user_attrs = {k: v for k, v in trial.user_attrs.items()
                                if k not in ("host", "pid")}
            super().__call__(study, trial)

    return _Retry(max_retry=max_retry)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name == "nt":  # there os.kill(pid, 0) would end the process: no check, assume alive
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child of a living parent stays a zombie until reaped: not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def work(study, n_trials: int, objective, *, by_pid: bool, on_trial=None, say=None,
         poll: float = 1.0) -> None:
    """Run trials until the study holds `n_trials` finished ones. Before each trial, dead
    workers' trials are requeued; when the rest are running elsewhere, wait for them (one
    of them may die and need a retry) rather than overshoot the total."""
    from lenet.errors import LenetError

    callbacks = [on_trial] if on_trial else []
    waiting_said = False
    started = []  # this process's trials, by id: the last is the one a Ctrl-C stops

    def tracked(trial):
        started.append(trial._trial_id)
        try:
            return objective(trial)
        except KeyboardInterrupt:
            trial.set_user_attr(STOPPED_ATTR, "stopped by Ctrl-C")  # its note in the table
            raise

    while True:
        for number in reap_dead_workers(study, by_pid):
            if say:
                say(f"trial {number}: its worker is gone; queued again")
        c = counts(study)
        if c.done >= n_trials:
            return
        if c.done + c.running >= n_trials:  # a waiting retry runs only if one of them dies
            if say and not waiting_said:
                say(f"waiting for {c.running} running trial(s) to finish or go stale")
                waiting_said = True
            time.sleep(poll)
            continue
        waiting_said = False
        started.clear()
        try:
            study.optimize(tracked, n_trials=1, catch=(LenetError,), callbacks=callbacks,
                           gc_after_trial=False)
        except KeyboardInterrupt:
            # Optuna fails the interrupted trial; queue it again, as for a lost worker, so
            # the same command run again runs these parameters rather than new ones.
            if started:
                _retry_interrupted(study, started[-1])
            raise


def _retry_interrupted(study, trial_id: int) -> None:
    from optuna.trial import TrialState

    trial = study._storage.get_trial(trial_id)
    if trial.state == TrialState.FAIL and ERROR_ATTR not in trial.user_attrs:
        Retry(max_retry=MAX_RETRY)(study, trial)


class PruneCallback(Callback):
    """Reports each epoch's test accuracy to the trial, and stops the run when the pruner
    says it is behind the other trials at that epoch."""

    def __init__(self, trial):
        self.trial = trial

    def on_epoch_end(self, trainer, metrics) -> None:
        import optuna

        self.trial.report(metrics.test_acc, metrics.epoch)
        last = trainer is not None and metrics.epoch >= trainer.spec.epochs
        if not last and self.trial.should_prune():  # after the last epoch: nothing to save
            raise optuna.TrialPruned(f"pruned after epoch {metrics.epoch} "
                                     f"(test acc {metrics.test_acc:.4f})")


def trial_rows(study) -> list[dict]:
    """One dict per trial for the table: number, state, value, epochs, seconds, params,
    note (why it failed or was pruned, or which trial it retries)."""
    return trial_rows_of(study.get_trials(deepcopy=False))


def trial_rows_of(trials) -> list[dict]:
    rows = []
    for t in trials:
        note = t.user_attrs.get(ERROR_ATTR, "")
        if not note and "failed_trial" in t.system_attrs:
            note = f"retry of #{t.system_attrs['failed_trial']}"
        if not note and t.state.name == "FAIL":
            note = f"{t.user_attrs.get(STOPPED_ATTR, 'worker lost')}; retried"
        if t.state.name == "PRUNED" and not note:  # a note here: why it diverged
            last = max(t.intermediate_values) if t.intermediate_values else 0
            note = f"pruned after epoch {last}"
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else None
        value = t.value if t.value is not None else (
            t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None)
        rows.append({"number": t.number, "state": t.state.name.lower(), "value": value,
                     "epochs": len(t.intermediate_values), "seconds": seconds,
                     "params": dict(t.params), "note": note})
    return rows


def best_config(study):
    """(trial, config) of the best complete trial, its config as `lenet train --config`
    reads it; None before any trial completed."""
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if "config" in t.user_attrs]
    if not done:
        return None
    best = max(done, key=lambda t: (t.value, -t.number))
    return best, RunConfig.from_dict(best.user_attrs["config"], f"trial {best.number}")
