"""`lenet sweep`: search a space of recipes with Optuna, on one core, all cores, or many
machines sharing one study. Thin, like cli.py: parse, call lenet.sweep, train, print."""
from __future__ import annotations

import io
import os
import socket
import sys
from pathlib import Path

from lenet.config import DEVICES
from lenet.errors import ConfigError, DivergenceError, LenetError


def add_parser(verbs) -> None:
    s = verbs.add_parser(
        "sweep", help="search a space of recipes with Optuna (exercise 2)",
        description="Every machine runs the same command against the same --storage; "
                    "re-running it resumes the study up to --n-trials.")
    s.add_argument("--space", required=True, metavar="FILE",
                   help="TOML or JSON search space, or a built-in one by name: "
                        "exercise2 (the chapter's knobs)")
    s.add_argument("--n-trials", required=True, type=int, metavar="N",
                   help="trials in the whole study, all workers and machines together")
    s.add_argument("--workers", type=int, default=1, metavar="W",
                   help="worker processes on this machine (default 1), each with cores/W "
                        "torch threads")
    s.add_argument("--storage", metavar="URL|PATH", help="default sqlite:///OUT/sweep.db (one "
                   "worker) or the journal file OUT/sweep.journal (several); "
                   "postgresql+psycopg://... to share the study between machines; a path "
                   "without a scheme is a journal file")
    s.add_argument("--study", metavar="NAME", help="study name (default: the space file's)")
    s.add_argument("--epochs", type=int, metavar="E",
                   help="every trial trains E epochs (beats the space)")
    s.add_argument("--pruner", choices=("median", "hyperband", "none"), default="median",
                   help="stop trials behind the others after an epoch (default median)")
    s.add_argument("--data", help="fashion-mnist (default), mnist, or a folder of IDX files")
    s.add_argument("--device", choices=DEVICES, help="default: the space's (auto)")
    s.add_argument("--seed", type=int, help="sampler seed (default random; worker i adds i)")
    s.add_argument("--heartbeat", type=int, default=30, metavar="S", help="seconds between "
                   "a running trial's heartbeats; one silent for 2x this is retried "
                   "(default 30)")
    s.add_argument("--out", required=True, metavar="DIR",
                   help="sweep folder: trials/NNNN run folders, best.json, figures")


def cmd_sweep(a) -> int:
    from lenet import sweep
    from lenet.cli import _data_name
    from lenet.data import sources

    for flag, value, least in (("--n-trials", a.n_trials, 1), ("--workers", a.workers, 1),
                               ("--epochs", a.epochs, 1), ("--heartbeat", a.heartbeat, 1)):
        if value is not None and value < least:
            raise ConfigError(f"{flag} {value}: expected a positive integer")
    top = 2**32 - a.workers  # Optuna's sampler takes 0..2**32-1, and worker i adds i
    if a.seed is not None and not 0 <= a.seed <= top:
        raise ConfigError(f"--seed {a.seed}: expected 0 to {top:,}")
    a.space = sweep.space_file(a.space)
    space = _load_space(a.space, a.epochs)
    sweep.quiet_optuna()  # imports it: a missing extra is the first thing said
    out = Path(a.out)
    storage = sweep.choose_storage(a.storage, out, a.workers)
    if a.workers > 1 and storage.url.startswith("sqlite"):
        raise ConfigError("--workers with SQLite: Optuna advises against parallel SQLite "
                          "writers; leave out --storage (a journal file) or use PostgreSQL")
    study_name = a.study or Path(a.space).stem
    sweep.check_folder_study(out, storage, study_name)
    data = _data_name(a.data)
    # Read before the study records --data: a mistyped one must not pin the study to it.
    ds = sources.load(data or space.base().data.name, report=None)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    job = {"space": str(a.space), "out": str(out), "storage": storage,
           "study": study_name, "n_trials": a.n_trials,
           "epochs": a.epochs, "pruner": a.pruner, "data": data,
           "device": a.device, "seed": a.seed, "heartbeat": a.heartbeat,
           "threads": max(1, (cores or 1) // a.workers) if a.workers > 1 else None}
    try:
        study = _open_study(job, space)
    except BaseException:
        if created and not any(out.iterdir()):  # a storage that fails leaves no empty --out
            out.rmdir()
        raise
    sweep.check_folder_study(out, storage, study_name, record=True)
    done = sweep.counts(study).done
    knobs = len(space.params)
    print(f"sweep '{job['study']}': {knobs} knob{'s' if knobs != 1 else ''} from {a.space}; "
          f"storage {storage.describe()}; {_done(done, a.n_trials)}", flush=True)
    if a.workers == 1:
        _work(job, _say, ds=ds)
    else:
        _spawn(job, a.workers)
    return _report(study, out, a.n_trials)


def _load_space(path, epochs):
    from lenet import sweep

    space = sweep.load_space(path)
    return space.without("train.epochs") if epochs is not None else space


def _say(line: str) -> None:
    print(line, flush=True)


def _open_study(job: dict, space, worker: int = 0):
    from lenet import sweep

    storage = sweep.open_storage(job["storage"], job["heartbeat"])
    seed = None if job["seed"] is None else job["seed"] + worker
    return sweep.open_study(storage, job["study"], space,
                            sweep.make_pruner(job["pruner"], job["epochs"]), seed,
                            setup={"data": job["data"], "epochs": job["epochs"]})


def _spawn(job: dict, workers: int) -> None:
    """Worker processes (spawned: no forked torch or database state), each running trials
    until the study is full. One that dies leaves its trial to the others to retry."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker_main, args=(job, i), name=f"worker {i}")
             for i in range(1, workers + 1)]
    for p in procs:
        p.start()
    print(f"{workers} workers (pids {', '.join(str(p.pid) for p in procs)}), "
          f"{job['threads']} torch thread(s) each", flush=True)
    for p in procs:
        p.join()
        if p.exitcode:
            how = f"signal {-p.exitcode}" if p.exitcode < 0 else f"status {p.exitcode}"
            print(f"{p.name} (pid {p.pid}) ended with {how}", file=sys.stderr, flush=True)


def _worker_main(job: dict, worker: int) -> None:
    from lenet.outliving_stdout import output_outlives_reader

    try:
        with output_outlives_reader():
            _work(job, lambda line: _say(f"[w{worker}] {line}"), worker)
    except LenetError as e:
        print(f"lenet: error: [w{worker}] {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


def _work(job: dict, say, worker: int = 0, ds=None) -> None:
    """Load the data once (unless given), then run trials until the study holds
    --n-trials."""
    import torch

    from lenet import sweep
    from lenet.data import sources
    from lenet.train import resolve_device

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    sweep.quiet_optuna()
    space = _load_space(job["space"], job["epochs"])
    study = _open_study(job, space, worker)
    base = space.base()
    if ds is None:
        ds = sources.load(job["data"] or base.data.name, report=None)
    device = resolve_device(job["device"] or base.train.device)

    def objective(trial):
        return _objective(trial, space, ds, job, device)

    def on_trial(study, t):
        say(_trial_line(t))

    sweep.work(study, job["n_trials"], objective, by_pid=job["storage"].kind == "journal",
               on_trial=on_trial, say=say)


def _objective(trial, space, ds, job: dict, device) -> float:
    import optuna

    from lenet import sweep
    from lenet.cli import _fit_to_data, _one_line
    from lenet.config import override
    from lenet.runs import RunFolder

    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())
    folder = RunFolder(Path(job["out"]) / "trials" / f"{trial.number:04d}")
    trial.set_user_attr("run", str(folder.path))
    try:
        cfg = space.sample(trial)
        cfg = override(cfg, "train", epochs=job["epochs"], device=job["device"])
        cfg = override(cfg, "data", name=job["data"])
        cfg = _fit_to_data(cfg, ds)
        trial.set_user_attr("config", cfg.to_dict())
        return _train(trial, cfg, folder, ds, device)
    except optuna.TrialPruned:
        raise
    except DivergenceError as e:
        # Pruned, not failed: TPE learns from pruned trials (one with no epoch reported
        # ranks as the worst) and ignores failed ones, so it would keep sampling the
        # learning rates that blow up.
        trial.set_user_attr(sweep.ERROR_ATTR, _one_line(e))
        raise optuna.TrialPruned(_one_line(e)) from None
    except LenetError as e:  # an invalid recipe: the trial fails, with why
        trial.set_user_attr(sweep.ERROR_ATTR, _one_line(e))
        raise
    finally:
        folder.unlock()


def _train(trial, cfg, folder, ds, device) -> float:
    """One trial as an ordinary run folder (config, metrics, checkpoints, log), quietly."""
    from lenet import sweep
    from lenet.cli import _batches, _summary_table
    from lenet.console import ConsoleProgress
    from lenet.models import init_model
    from lenet.runs import RunWriter
    from lenet.train import Trainer, pick_engine

    folder.create(cfg)
    model = init_model(cfg.model, cfg.train.seed)
    table = _summary_table(cfg, model)
    log = ConsoleProgress(stream=io.StringIO(), log_path=folder.log, bar=False)
    engine, engine_text = pick_engine(cfg.model, cfg.train, device, say=log.say)
    log.say(f"sweep trial {trial.number}; step: {engine_text}")
    trainer = Trainer(cfg.train, device,
                      [log, RunWriter(folder, cfg, table), sweep.PruneCallback(trial)], engine)
    return trainer.fit(model, *_batches(ds, cfg, device))[-1].test_acc


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _params(params: dict) -> str:
    return " ".join(f"{k.split('.', 1)[1]}={_fmt(v)}" for k, v in sorted(params.items()))


def _trial_line(t) -> str:
    from lenet import sweep

    row = sweep.trial_rows_of([t])[0]
    words = [f"trial {t.number}: {row['state']}"]
    if row["value"] is not None:
        words.append(f"test acc {row['value']:.4f}")
    if row["note"]:
        words.append(f"({row['note']})")
    return " ".join(words) + f"  {_params(t.params)}"


def _report(study, out: Path, n_trials: int) -> int:
    """The table of trials, best.json and the figures; 0 when the study is full."""
    from lenet import plots, sweep
    from lenet.files import atomic_write

    rows = sweep.trial_rows(study)
    lines = [f"{'trial':>5}  {'state':<8} {'test acc':>8} {'epochs':>6} {'seconds':>7}  "
             f"params / note"]
    for r in rows:
        value = f"{r['value']:.4f}" if r["value"] is not None else "-"
        secs = f"{r['seconds']:.1f}" if r["seconds"] is not None else "-"
        note = f"  ({r['note']})" if r["note"] else ""
        lines.append(f"{r['number']:>5}  {r['state']:<8} {value:>8} {r['epochs']:>6} "
                     f"{secs:>7}  {_params(r['params'])}{note}")
    table = "\n".join(lines) + "\n"
    print(table, end="")
    atomic_write(out / "trials.txt", lambda f: f.write(table.encode()))
    found = sweep.best_config(study)
    if found is None:
        print("no trial completed: no best.json", file=sys.stderr)
    else:
        trial, best = found
        atomic_write(out / "best.json", lambda f: f.write(best.to_json().encode()))
        print(f"best: trial {trial.number}, test acc {trial.value:.4f}: {_params(trial.params)}")
        print(f"  {out / 'best.json'} (reproduce: lenet train --config {out / 'best.json'})")
    skipped = plots.sweep_figures(study, out)
    drawn = [n for n in ("history.png", "importances.png") if n not in skipped]
    if drawn:
        print(f"figures: {', '.join(str(out / n) for n in drawn)}")
    for name, why in skipped.items():
        print(f"{name}: not drawn ({why})")
    done = sweep.counts(study).done
    if done < n_trials:
        print(f"{done} of {n_trials} trials done; run the same command again to go on",
              file=sys.stderr)
        return 1
    return 0 if found is not None else 1  # every trial failed or was pruned: no answer


def _done(done: int, n_trials: int) -> str:
    if done > n_trials:
        return f"{done} trials done (more than --n-trials {n_trials}: nothing to run)"
    return f"{done} of {n_trials} trials done"


HANDLERS = {"sweep": cmd_sweep}
