"""The `lenet` command. Thin: parse flags, call the library, print.

Every error the library raises on purpose (LenetError) and every OS error becomes one line
on stderr and a non-zero exit; `--debug` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import shlex
import signal
import sys
from dataclasses import replace
from pathlib import Path

from lenet import __version__
from lenet.config import (
    ACTIVATIONS,
    AUGMENTS,
    DEVICES,
    INITS,
    OPTIMIZERS,
    POOLINGS,
    PRESETS,
    SCHEDULES,
    ConvSpec,
    ModelSpec,
    RunConfig,
    inherited_momentum_off,
    merge_config,
    override,
    preset,
    read_config_file,
)
from lenet.errors import ConfigError, LenetError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + error
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lenet", description="The LeNet chapter of Dive into Deep Learning: "
                "train LeNet-5 on Fashion-MNIST, watch it learn, look inside it.")
    p.add_argument("--version", action="version", version=f"lenet {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    verbs.required = True
    p.set_defaults(_verbs=verbs)

    t = verbs.add_parser("train", help="train a network and write a run folder",
                         description="Flags beat --config FILE, which beats the preset.")
    t.add_argument("--preset", help=f"one of {', '.join(PRESETS)} (default book)")
    t.add_argument("--config", metavar="FILE", help="JSON or TOML file with any of the "
                   "sections model, data, train (as in a run's config.json)")
    _spec_flags(t)
    t.add_argument("--epochs", type=int, help="epochs to train (default: the preset's; book 10)")
    t.add_argument("--batch-size", type=int, help="minibatch size (default: the preset's; 128)")
    t.add_argument("--lr", type=float, help="learning rate (default: the preset's)")
    t.add_argument("--optimizer", choices=OPTIMIZERS, help="default: the preset's (book sgd)")
    t.add_argument("--momentum", type=float, help="SGD momentum (default: the preset's; book 0)")
    t.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None,
                   help="Nesterov momentum (sgd, momentum > 0)")
    t.add_argument("--weight-decay", type=float, help="default: the preset's (book 0)")
    t.add_argument("--schedule", choices=SCHEDULES, help="lr schedule, per step: constant "
                   "(the book's), cosine or linear decay to 0 (default: the preset's)")
    t.add_argument("--warmup", type=float, help="fraction of steps to ramp the lr up from 0 "
                   "(default: the preset's; book 0)")
    t.add_argument("--label-smoothing", type=float, help="cross-entropy smoothing (default: the "
                   "preset's; book 0)")
    t.add_argument("--augment", choices=AUGMENTS, help="random flips (and shifts) of the "
                   "training images (default: the preset's; book none)")
    t.add_argument("--seed", type=int, help="seed for init and shuffling (default: the "
                   "preset's; 0)")
    t.add_argument("--device", choices=DEVICES, help="default auto: cuda if available")
    t.add_argument("--data", help="fashion-mnist (default), mnist, a folder of IDX files, or "
                   "FOLDER/PREFIX of a set in one (EMNIST's layout)")
    t.add_argument("--resize", type=int, metavar="N", help="scale images to N x N on the fly, "
                   "as the book's resize (default: the data's size)")
    t.add_argument("--out", help="run folder to write (default runs/<time>-<preset>)")
    t.add_argument("--runs-dir", default="runs", help="where new run folders go (default runs)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last.ckpt")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    e = verbs.add_parser("evaluate", help="test loss and accuracy of a trained run")
    e.add_argument("run", metavar="RUN_DIR")
    e.add_argument("--checkpoint", choices=("last", "best"), default="last",
                   help="the latest epoch's weights, or the best test accuracy's (default "
                   "last)")
    e.add_argument("--data", help="evaluate on another data set or folder (default: the run's)")
    e.add_argument("--device", choices=DEVICES, default="auto",
                   help="default auto: cuda if available")

    s = verbs.add_parser("summary", help="layer table: output shapes, parameters, mult-adds")
    s.add_argument("--preset", help=f"one of {', '.join(PRESETS)} (default book)")
    s.add_argument("--config", metavar="FILE", help="JSON or TOML config (as for train)")
    _spec_flags(s)
    s.add_argument("--resize", type=int, metavar="N", help="input size N x N (default 28)")

    c = verbs.add_parser("compare", help="table and curves of several runs side by side")
    c.add_argument("runs", metavar="RUN_DIR", nargs="+")
    c.add_argument("--out", metavar="FILE", help="the overlaid curves as .png, .svg or .pdf "
                   "(default compare.png)")

    from lenet import cli_data, cli_more

    cli_data.add_parser(verbs)

    cli_more.add_parsers(verbs)
    from lenet import cli_sweep

    cli_sweep.add_parser(verbs)
    return p


def _spec_flags(p: argparse.ArgumentParser) -> None:
    """Flags for every part of the model spec (the chapter's exercise 2)."""
    p.add_argument("--activation", choices=ACTIVATIONS, help="default: the preset's")
    p.add_argument("--pooling", choices=POOLINGS, help="default: the preset's")
    p.add_argument("--convs", metavar="C:K[:P],...", type=_convs, help="conv layers as "
                   "channels:kernel[:padding], e.g. 6:5:2,16:5 (the book's)")
    p.add_argument("--dense", metavar="W,...", type=_ints, help="hidden dense widths, "
                   "e.g. 120,84 (the book's); 'none' for no hidden layer")
    p.add_argument("--batch-norm", action=argparse.BooleanOptionalAction, default=None,
                   help="BatchNorm after each conv and hidden dense layer")
    p.add_argument("--dropout", type=float, help="dropout after hidden dense layers (default: the "
                   "preset's; book 0)")
    p.add_argument("--init", choices=INITS, help="default: the preset's (book "
                   "xavier-uniform)")


def _convs(text: str) -> tuple[ConvSpec, ...]:
    # Every layer names its kernel: `--convs 6` must not quietly mean 6:5:0.
    try:
        items = [[int(v) for v in item.split(":")] for item in text.split(",")]
        if all(2 <= len(item) <= 3 for item in items):
            return tuple(ConvSpec(*item) for item in items)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(
        f"'{text}': expected channels:kernel[:padding],... e.g. 6:5:2,16:5")


def _ints(text: str) -> tuple[int, ...]:
    if text.strip().lower() == "none":
        return ()
    try:  # an empty item is a typo, not "no layer": that is spelled 'none'
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}': expected integers like 120,84, or "
                                         "'none'") from None


def _glue_list_values(argv: list[str]) -> list[str]:
    """`--convs -3:5:2` as `--convs=-3:5:2`: argparse would take the value for an option
    and say only 'expected one argument'; glued, the value's own error names it."""
    out, it = [], iter(argv)
    for arg in it:
        if arg in ("--convs", "--dense"):
            value = next(it, None)
            if value is not None and value.startswith("-") and not value.startswith("--"):
                out.append(f"{arg}={value}")
                continue
            out.append(arg)
            if value is not None:
                out.append(value)
            continue
        out.append(arg)
    return out


def build_config(a, notes: list | None = None) -> RunConfig:
    """Preset, then --config FILE, then flags: an explicit flag wins. What a flag drops of
    the file's settings is added to `notes` (for the train line)."""
    base_name = a.preset
    partial = {}
    if a.config:
        partial = read_config_file(a.config)
        if isinstance(partial, dict) and base_name is None:
            base_name = partial.get("preset")
    cfg = preset(base_name or "book")
    if a.config:
        # The label is the base actually used: --preset beats the file's "preset".
        try:
            cfg = replace(merge_config(cfg, partial, a.config), preset=cfg.preset)
        except ConfigError as e:  # a bad value's check does not know the file: name it
            text = str(e)
            raise ConfigError(text if text.startswith(str(a.config))
                              else f"{a.config}: {text}") from None
    cfg = override(cfg, "model", activation=a.activation, pooling=a.pooling, convs=a.convs,
                   dense=a.dense, batch_norm=a.batch_norm, init=a.init,
                   dropout=getattr(a, "dropout", None))
    cfg = override(cfg, "data", name=_data_name(getattr(a, "data", None)), resize=a.resize)
    if hasattr(a, "epochs"):
        given = {k: getattr(a, k) for k in ("optimizer", "momentum", "nesterov")
                 if getattr(a, k) is not None}
        dropped = {k: v for k, v in inherited_momentum_off(given).items()
                   if getattr(cfg.train, k) != v}
        if dropped and notes is not None:  # said, not silent: a file may have named them
            was = ", ".join(f"{k} {getattr(cfg.train, k)}" for k in dropped)
            flag = f"--optimizer {a.optimizer}" if "momentum" in dropped else "--momentum 0"
            notes.append(f"note: {flag} drops {was} of the "
                         + (f"config file {a.config}" if a.config else f"preset {cfg.preset}"))
        cfg = override(cfg, "train", **dropped)
        cfg = override(cfg, "train", epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
                       optimizer=a.optimizer, momentum=a.momentum, nesterov=a.nesterov,
                       weight_decay=a.weight_decay, schedule=a.schedule, warmup=a.warmup,
                       label_smoothing=a.label_smoothing, augment=a.augment, seed=a.seed,
                       device=a.device)
    if cfg.data.resize is not None:
        cfg = override(cfg, "model", image_size=cfg.data.resize)
    return cfg


def main(argv: list[str] | None = None) -> int:
    argv = _glue_list_values(sys.argv[1:] if argv is None else list(argv))
    args, extra = _parser().parse_known_args(argv)
    if extra:  # said by the verb's own parser, which names the verb and its --help
        # A list of files ends at the first option: `predict RUN a.png --json b.png`.
        hint = ("; give the files before the options" if args.verb in ("predict", "compare")
                and any(not e.startswith("-") for e in extra) else "")
        args._verbs.choices[args.verb].error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    del args._verbs
    try:
        from lenet import cli_data, cli_more, cli_sweep
        from lenet.outliving_stdout import output_outlives_reader

        handler = {"train": cmd_train, "evaluate": cmd_evaluate, "summary": cmd_summary,
                   "compare": cmd_compare, **cli_data.HANDLERS, **cli_more.HANDLERS,
                   **cli_sweep.HANDLERS}[args.verb]
        if args.verb in ("train", "sweep"):  # `lenet train | head` must not lose the run
            with output_outlives_reader():
                return handler(args)
        return handler(args)
    except KeyboardInterrupt as e:
        again = ("; run the same command again to go on (the trial in flight is run again)"
                 if args.verb == "sweep" else "")
        print(f"lenet: interrupted{again}", file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)
    except BrokenPipeError:  # `lenet evaluate ... | head`: the reader left; nothing to report
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps the exit flush quiet
        return 0
    except (LenetError, OSError) as e:
        if args.debug:
            raise
        print(f"lenet: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except ImportError as e:  # an optional extra (serve, sweep, onnx) is not installed
        if args.debug:
            raise
        extra = _EXTRAS.get(args.verb)
        hint = f"; install it with: pip install 'lenet[{extra}]'" if extra else ""
        print(f"lenet {args.verb}: error: {_one_line(e)}{hint}", file=sys.stderr)
        return 1


def run() -> None:
    """The `lenet` command (and `python -m lenet`): main(), then a quick exit. With torch
    loaded, the interpreter's own teardown (freeing every module) takes ~0.5 s after the
    work is done; lenet has closed and fsync'd all it writes by then, and the atexit
    handlers (logging, multiprocessing, temporary folders) still run here."""
    code = main()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a reader that left (BrokenPipeError)
            stream.flush()
    os._exit(code)


# The verbs that need an optional extra (pyproject.toml's optional-dependencies).
_EXTRAS = {"serve": "serve", "sweep": "sweep", "export": "onnx"}


def _one_line(e: Exception) -> str:
    if isinstance(e, OSError) and e.filename:
        return f"{e.filename}: {e.strerror or e}"
    return " ".join(str(e).split())


def _info(line: str) -> None:
    print(line, flush=True)


def _load_data(name: str, download: bool = True, quiet: bool = False):
    from lenet.data import sources

    return sources.load(name, download=download, report=None if quiet else _info)


def run_data(run, given: str | None):
    """The data set a verb shows a trained run: GIVEN (--data, as `_data_name` records it),
    else the one it was trained on (an error then says where that was recorded, and that
    --data points elsewhere); its class count must be the model's."""
    from lenet.errors import DataError

    if given:
        ds = _load_data(given)
    else:
        try:
            ds = _load_data(run.config.data.name)
        except DataError as e:
            raise DataError(f"{e} (the data set {run.folder / 'config.json'} names; --data "
                            "points at it elsewhere)") from None
    if len(ds.classes) != run.config.model.num_classes:
        raise ConfigError(f"{ds.location}: has {len(ds.classes)} classes; the model in "
                          f"{run.checkpoint} predicts {run.config.model.num_classes}")
    return ds


def _data_name(value: str | None) -> str | None:
    """A data set name stays a name; a folder becomes an absolute path for config.json."""
    if value is None:
        return None
    from lenet.data import sources
    from lenet.data.layout import names_prefixed_set, resolve
    from lenet.errors import DataError

    path = Path(value).expanduser()
    if value in sources.DATASETS or not (os.sep in value or path.is_dir()
                                         or names_prefixed_set(path)):
        return value  # a name (unknown ones are reported by sources.load)
    # A folder holding one prefixed set is recorded as that set: a second set unpacked
    # beside it later must not make the run's data ambiguous.
    try:
        where = resolve(path)
    except DataError:  # a folder of several sets: sources.load says so where it matters
        where = None
    if where is not None and where[1] is not None:
        return str(where[0].resolve() / where[1])
    return str(path.resolve())


def _fit_to_data(cfg: RunConfig, ds, notes: list | None = None) -> RunConfig:
    """The model's input size and class count come from the data; a config that said
    otherwise (another run's config.json on other data, say) is adapted, and `notes` says
    so. (A resumed run's were fitted to its data when it started: no notes;
    `_check_same_data` compares them.)"""
    from lenet.models import feature_shapes

    _, rows, cols = ds.train.images.shape
    if rows != cols:
        raise ConfigError(f"{ds.location}: images are {rows}x{cols}; expected square images")
    size, classes = cfg.data.resize or rows, len(ds.classes)
    if cfg.model.in_channels != 1:  # no IDX data set could feed it
        raise ConfigError(f"model.in_channels {cfg.model.in_channels}: IDX images are "
                          "grayscale (1 channel); leave it out")
    default, asked = ModelSpec(), cfg.model.image_size
    for key, value, want, how in (
            ("image_size", asked, size, f"{ds.name}'s images are {size}x{size}"
             + ("" if cfg.data.resize else f"; --resize {asked} scales them")),
            ("num_classes", cfg.model.num_classes, classes, f"{ds.name} has {classes}")):
        # The default means "unset"; another value from a config is adapted, and said.
        if value != want and value != getattr(default, key) and notes is not None:
            notes.append(f"note: model.{key} {value} of the config becomes {want} ({how})")
    model = replace(cfg.model, image_size=size, num_classes=classes)
    feature_shapes(model)  # a spec that does not fit this data fails now, naming the layer
    return replace(cfg, model=model, data=replace(cfg.data, classes=tuple(ds.classes)))


def _check_config_unedited(folder, recorded: RunConfig, trained: RunConfig, ckpt) -> None:
    """A run continues as it was trained (its checkpoint's config): a config.json edited by
    hand, or a checkpoint copied in from another run, is refused rather than ignored."""
    free = {"train.epochs", "train.device", "data.name", "data.classes"}  # resume sets these
    mine, theirs = _flatten(recorded.to_dict()), _flatten(trained.to_dict())
    key = next((k for k in sorted(set(mine) | set(theirs))
                if k not in free and mine.get(k) != theirs.get(k)), None)
    if key is not None:
        raise ConfigError(f"{folder.config}: says {key} {_short(mine.get(key))} but {ckpt} was "
                          f"trained with {_short(theirs.get(key))}; a run continues as it was "
                          "trained: restore config.json, or start a new run with --config")


def _check_same_data(was: RunConfig, now: RunConfig, ds) -> None:
    """A resumed run's data (moved, perhaps: --data) must be what it was trained on: the
    same input size and class count, and the same class names where the run recorded them."""
    if now.model != was.model:
        m = was.model
        raise ConfigError(f"{ds.location}: holds {len(ds.classes)} classes of "
                          f"{ds.train.images.shape[1]}x{ds.train.images.shape[2]} images; "
                          f"the run was trained on {m.num_classes} classes of "
                          f"{m.image_size}x{m.image_size}")
    named, found = was.data.classes, now.data.classes
    if named is not None and named != found:
        k = next(k for k, (a, b) in enumerate(zip(named, found, strict=True)) if a != b)
        raise ConfigError(f"{ds.location}: names class {k} {found[k]!r}, the run "
                          f"{named[k]!r}; --resume --data is for the same data moved")


def cmd_train(a) -> int:
    from lenet import plots

    # Started before torch's import: see CurvePainter. Data-parallel ranks other than the
    # first write no pictures.
    painter = plots.CurvePainter() if os.environ.get("RANK", "0") == "0" else None
    from lenet.runs import RunFolder

    folders: list[RunFolder] = []
    try:
        return _train(a, folders, painter)
    finally:
        for folder in folders:  # in-process callers (tests, notebooks) get the folder back
            folder.unlock()
        if painter is not None:
            painter.close()


def _train(a, folders: list, painter=None) -> int:
    import torch

    from lenet import checkpoint, distributed, fused
    from lenet.console import ConsoleProgress
    from lenet.models import init_model
    from lenet.runs import RunFolder, RunWriter
    from lenet.train import (
        Trainer,
        TrainingInterrupted,
        check_batch_norm_batches,
        pick_engine,
        resolve_device,
    )

    fused.disabled()  # a LENET_FUSED that is neither on nor off fails before any folder exists
    dist = distributed.from_env()  # launched by torchrun with 2+ processes
    main_rank = dist is None or dist.is_main
    state = None
    notes: list[str] = []  # what was adapted or dropped, said after the preset line
    if a.resume:
        changed = [f for f, v in vars(a).items()
                   if v is not None and f not in _RESUME_MAY_SET]
        if changed:
            flag = "--" + changed[0].replace("_", "-")
            raise ConfigError(f"--resume continues a run as configured; {flag} "
                              f"cannot change it (only --epochs, --device and --data can)")
        folder = RunFolder(a.resume)
        recorded = folder.read_config()
        folders.append(folder)
        if main_rank:
            folder.lock()
        ckpt = folder.checkpoint_for_resume()
        state = checkpoint.load(ckpt)
        _check_config_unedited(folder, recorded, state["config"], ckpt)
        cfg = override(state["config"], "train", epochs=a.epochs, device=a.device)
        cfg = override(cfg, "data", name=_data_name(a.data))  # the same data, moved
        if cfg.train.epochs < state["epoch"]:
            raise ConfigError(f"--epochs {cfg.train.epochs}: the run already has "
                              f"{state['epoch']} epochs")
        if state.get("partial") is not None and cfg.train.epochs == state["epoch"]:
            raise ConfigError(f"--epochs {cfg.train.epochs}: the run stopped during epoch "
                              f"{state['epoch'] + 1}, so it needs at least "
                              f"{state['epoch'] + 1}")
    else:
        cfg = build_config(a, notes)
        folder = RunFolder(a.out) if a.out else RunFolder.new(a.runs_dir, cfg.preset)
        folders.append(folder)
        if main_rank:
            folder.check_new()  # before loading data: a taken folder fails at once

    device = resolve_device(cfg.train.device)
    if dist is not None:
        where = distributed.waits_unannounced()
        if where:
            print(f"lenet: rank {dist.rank} of {dist.world} (WORLD_SIZE and RANK set without "
                  f"torchrun): waiting for the others at {where}", file=sys.stderr, flush=True)
        dist, device = distributed.init(dist, device)
    ds = _load_data(cfg.data.name, quiet=not main_rank)
    cfg = _fit_to_data(cfg, ds, notes=notes if state is None else None)
    if state is not None:
        _check_same_data(state["config"], cfg, ds)
    model = init_model(cfg.model, cfg.train.seed)
    check_batch_norm_batches(model, cfg.train.batch_size, len(ds.train.labels),
                             dist.world if dist is not None else 1)  # before the folder
    if state is not None:
        checkpoint.restore_model(ckpt, state, model)
        if main_rank:
            folder.write_text(folder.config, cfg.to_json())  # records a changed --epochs
    replaced = False
    if state is None and main_rank:
        replaced = folder.create(cfg)
    table = _summary_table(cfg, model)

    if not main_rank:  # rank 0 prints and writes the run folder; the others only train
        return _train_rank(cfg, state, model, ds, device, dist)
    progress = ConsoleProgress(log_path=folder.log, bar=False if a.no_progress else None)
    progress.say(f"lenet {__version__}, torch {torch.__version__}, device {device}"
                 + (f" ({_threads()})" if device.type == "cpu" else
                    f" ({torch.cuda.get_device_name(device)})"))
    found_in = ds.found_in
    if found_in == "--data" and not a.data:  # a folder named by a file, not the command line
        found_in = "the run's config.json" if state is not None else f"--config {a.config}"
    progress.say(f"data {ds.name} from {ds.folder} ({found_in}): "
                 f"{len(ds.train.labels):,} train, {len(ds.test.labels):,} test images"
                 + ("; stored transposed, turned upright" if ds.transposed else ""))
    epochs = f"{cfg.train.epochs} epoch" + ("s" if cfg.train.epochs != 1 else "")
    progress.say(f"preset {cfg.preset}: lr {cfg.train.lr:g}, batch {cfg.train.batch_size}, "
                 f"{epochs}, seed {cfg.train.seed}; run folder {folder.path}"
                 + (" (replacing a run that stopped before its first checkpoint)"
                    if replaced else ""))
    for note in notes:
        progress.say(note)
    was = state["config"].train.epochs if state is not None else cfg.train.epochs
    if was != cfg.train.epochs and (cfg.train.schedule != "constant" or cfg.train.warmup):
        progress.say(f"note: the {cfg.train.schedule} schedule"
                     + (" with warm-up" if cfg.train.warmup else "")
                     + f" was set over {was} epochs and now spans {cfg.train.epochs} from "
                     f"here on: the run will not equal a fresh {cfg.train.epochs}-epoch run")

    if dist is None:
        engine, engine_text = pick_engine(cfg.model, cfg.train, device, say=progress.say)
    else:  # the fused kernel is one process's whole step; DDP needs autograd's gradients
        engine, engine_text = "autograd", "PyTorch autograd (data-parallel)"
        low, extra = divmod(cfg.train.batch_size, dist.world)
        share = f"{low}" if not extra else f"{low}-{low + 1}"
        progress.say(f"data-parallel: {dist.world} processes ({dist.backend}), each takes "
                     f"{share} of every global batch of {cfg.train.batch_size}")
    progress.say(f"step: {engine_text}")
    trainer = Trainer(cfg.train, device, [progress, RunWriter(folder, cfg, table, painter)],
                      engine, dist)
    if state is not None:
        trainer.restore(state)
    train, test = _batches(ds, cfg, device)
    stopped_by = []  # the signal that asked for a gentle stop
    if dist is None:  # under torchrun the ranks could stop at different steps: no gentle stop
        _stop_gently(trainer, stopped_by)
    _freeze_set_up()
    try:
        trainer.fit(model, train, test)
    except TrainingInterrupted as e:
        by = stopped_by[0] if stopped_by else signal.SIGINT
        how = "" if by == signal.SIGINT else f" ({signal.Signals(by).name})"
        progress.say(f"{e}{how}: saved {folder.last}")
        progress.say(f"resume with: lenet train --resume {shlex.quote(str(folder.path))}")
        return 128 + by
    except KeyboardInterrupt:  # under torchrun: no gentle stop, the last epoch's checkpoint
        if trainer.epoch:
            progress.say(f"interrupted: epoch {trainer.epoch} is saved in {folder.last}; "
                         f"resume with: lenet train --resume {shlex.quote(str(folder.path))} "
                         "(under torchrun or not)")
        raise
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        distributed.close()
    progress.say(f"run folder: {folder.path}")
    return 0


def _train_rank(cfg, state, model, ds, device, dist) -> int:
    """A data-parallel rank other than 0: the same training, nothing written or printed."""
    from lenet import distributed
    from lenet.train import Trainer

    trainer = Trainer(cfg.train, device, [], "autograd", dist)
    if state is not None:
        trainer.restore(state)
    train, test = _batches(ds, cfg, device)
    _freeze_set_up()
    try:
        trainer.fit(model, train, test)
    finally:
        distributed.close()
    return 0


def _freeze_set_up() -> None:
    """Set-up is done. What it made (torch's modules, the data: ~200k objects) lives until
    exit, so the garbage collector's full collections need not scan it again (gc.callbacks
    over 10 epochs of `book`: one full collection of 0.08 s; none once frozen)."""
    import gc

    gc.freeze()


# What `--resume` accepts besides the run folder; any other flag would change the run.
_RESUME_MAY_SET = {"verb", "debug", "resume", "epochs", "device", "no_progress", "runs_dir",
                   "data"}


def _summary_table(cfg: RunConfig, model) -> str:
    """The layer table written into a run's summary.txt."""
    from lenet.models import format_summary, summary

    shape = (cfg.model.in_channels, cfg.model.image_size, cfg.model.image_size)
    return format_summary(summary(model, shape), shape)


def _batches(ds, cfg: RunConfig, device):
    """The training and test Batches of a run, as every training process needs them."""
    from lenet.data.batches import Batches

    train = Batches(ds.train.images, ds.train.labels, cfg.train.batch_size, device,
                    resize=cfg.data.resize, augment=cfg.train.augment)
    test = Batches(ds.test.images, ds.test.labels, cfg.train.eval_batch_size, device,
                   resize=cfg.data.resize)
    return train, test


def _threads() -> str:
    import torch

    n = torch.get_num_threads()
    return f"{n} thread" + ("s" if n != 1 else "")


class StopNow(KeyboardInterrupt):
    """A second Ctrl-C or SIGTERM during training: stop at once, exit 128 + the signal."""

    def __init__(self, signum: int):
        super().__init__()
        self.signum = signum


def _stop_gently(trainer, stopped_by: list) -> None:
    """First Ctrl-C, or SIGTERM (`kill`, a batch scheduler's notice before it kills): finish
    the current step, checkpoint, exit 128 + the signal. A second: stop now."""
    def handler(signum, frame):
        if trainer.stop_requested:
            raise StopNow(signum)
        stopped_by.append(signum)
        trainer.stop_requested = True

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def cmd_evaluate(a) -> int:
    from lenet import fused
    from lenet.cli_more import print_report
    from lenet.data.batches import Batches
    from lenet.report import classify, load_run
    from lenet.train import resolve_device

    run = load_run(a.run, a.checkpoint)
    cfg = run.config
    device = resolve_device(a.device)
    given = _data_name(a.data)
    ds = run_data(run, given)
    size, (rows, cols) = cfg.model.image_size, ds.test.images.shape[1:]
    # Another data set's images of another size are resized as --resize does in training.
    resize = size if (rows, cols) != (size, size) else None
    test = Batches(ds.test.images, ds.test.labels, cfg.train.eval_batch_size, device,
                   resize=resize)
    model = run.model.to(device)
    p = classify(model, test, forward=fused.inference_forward(model, device))
    resized = (f" (resized from {rows}x{cols} to {size}x{size})"
               if resize is not None and cfg.data.resize is None else "")
    print(f"{run.checkpoint} ({run.epoch_words}) on {ds.name} test set, "
          f"{test.num_examples:,} images{resized}: test loss {p.loss:.4f}, "
          f"test acc {p.accuracy:.4f}")
    # The run's own report stays; another data set's gets figures of its own.
    print_report(p, ds, run.folder,
                 suffix="" if given in (None, cfg.data.name) else f"-{ds.name}")
    return 0


def cmd_summary(a) -> int:
    from lenet.models import build, format_summary, summary

    cfg = build_config(a)
    model = build(cfg.model)
    shape = (cfg.model.in_channels, cfg.model.image_size, cfg.model.image_size)
    print(f"preset {cfg.preset}")
    print(format_summary(summary(model, shape), shape))
    return 0


def cmd_compare(a) -> int:
    from lenet import plots
    from lenet.models import build, num_params
    from lenet.runs import RunFolder, read_history

    out = Path(a.out or "compare.png")
    plots.figure_format(out)  # a wrong suffix fails before the table
    runs = []
    for path in a.runs:
        folder = RunFolder(path)
        runs.append((folder, folder.read_config(), read_history(folder)))
    # data.classes follows data.name, which already says the data differ.
    flat = [{k: v for k, v in _flatten(cfg.to_dict()).items() if k != "data.classes"}
            for _, cfg, _ in runs]
    differ = [k for k in flat[0] if len({json.dumps(f.get(k)) for f in flat}) > 1]
    differ += [k for k in {k for f in flat for k in f} - set(flat[0])]
    print(f"{'run':<28} {'params':>8} {'final acc':>9} {'best acc':>8} {'seconds':>8}  differs in")
    for (folder, cfg, history), f in zip(runs, flat, strict=True):
        diff = ", ".join(f"{k}={_short(f.get(k))}" for k in differ) or "-"
        final = f"{history[-1].test_acc:.4f}" if history else "-"
        best = f"{max(m.test_acc for m in history):.4f}" if history else "-"
        secs = f"{sum(m.seconds for m in history):.1f}"
        print(f"{folder.path.name[:28]:<28} {num_params(build(cfg.model)):>8,} {final:>9} "
              f"{best:>8} {secs:>8}  {diff}")
    plots.compare_curves([(folder.path.name, history) for folder, _, history in runs], out)
    print(f"curves: {out}")
    return 0


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _short(v) -> str:
    if isinstance(v, (list, tuple)) and v and isinstance(v[0], dict):  # convs
        return ",".join(":".join(str(x) for x in c.values()) for c in v)
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v)) or "none"
    return str(v)


if __name__ == "__main__":
    raise SystemExit(main())
