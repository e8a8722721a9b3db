"""The `lenet` command. Thin: parse flags, call the library, print.

Every error the library raises on purpose (LenetError) and every OS error becomes one line
on stderr and a non-zero exit; `--debug` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

from lenet import __version__
from lenet.config import DEVICES, PRESETS, RunConfig, override, preset
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

    t = verbs.add_parser("train", help="train a network and write a run folder")
    t.add_argument("--preset", help=f"one of {', '.join(PRESETS)} (default book)")
    t.add_argument("--epochs", type=int, help="epochs to train (default 10)")
    t.add_argument("--batch-size", type=int, help="minibatch size (default 128)")
    t.add_argument("--lr", type=float, help="learning rate (default: the preset's)")
    t.add_argument("--seed", type=int, help="seed for init and shuffling (default 0)")
    t.add_argument("--device", choices=DEVICES, help="default auto: cuda if available")
    t.add_argument("--data", help="fashion-mnist (default), mnist, or a folder of IDX files")
    t.add_argument("--out", help="run folder to write (default runs/<time>-<preset>)")
    t.add_argument("--runs-dir", default="runs", help="where new run folders go (default runs)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last.ckpt")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    e = verbs.add_parser("evaluate", help="test loss and accuracy of a trained run")
    e.add_argument("run", metavar="RUN_DIR")
    e.add_argument("--checkpoint", choices=("last", "best"), default="last")
    e.add_argument("--data", help="evaluate on another data set or folder")
    e.add_argument("--device", choices=DEVICES, default="auto")

    s = verbs.add_parser("summary", help="layer table: output shapes, parameters, mult-adds")
    s.add_argument("--preset", default="book", help=f"one of {', '.join(PRESETS)}")

    d = verbs.add_parser("data", help="where each data set is; 'data fetch NAME' downloads")
    d.add_argument("action", nargs="?", choices=("fetch",))
    d.add_argument("name", nargs="?", help="data set to fetch (fashion-mnist, mnist)")
    d.add_argument("--dest", help="folder to download into (default: the user cache)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"train": cmd_train, "evaluate": cmd_evaluate, "summary": cmd_summary,
                "data": cmd_data}[args.verb](args)
    except KeyboardInterrupt:
        print("lenet: interrupted", file=sys.stderr)
        return 130
    except (LenetError, OSError) as e:
        if args.debug:
            raise
        print(f"lenet: error: {_one_line(e)}", file=sys.stderr)
        return 1


def _one_line(e: Exception) -> str:
    if isinstance(e, OSError) and e.filename:
        return f"{e.filename}: {e.strerror or e}"
    return " ".join(str(e).split())


def _info(line: str) -> None:
    print(line, flush=True)


def _load_data(name: str):
    from lenet.data import sources

    return sources.load(name, report=_info)


def _data_name(value: str | None) -> str | None:
    """A data set name stays a name; a folder becomes an absolute path for config.json."""
    if value is None:
        return None
    from lenet.data import sources

    path = Path(value).expanduser()
    if value in sources.DATASETS or not (os.sep in value or path.is_dir()):
        return value  # a name (unknown ones are reported by sources.load)
    return str(path.resolve())


def _fit_to_data(cfg: RunConfig, ds) -> RunConfig:
    """The model's input size and class count come from the data."""
    _, rows, cols = ds.train.images.shape
    if rows != cols:
        raise ConfigError(f"{ds.folder}: images are {rows}x{cols}; expected square images")
    return replace(cfg, model=replace(cfg.model, image_size=rows,
                                      num_classes=len(ds.classes)))


def cmd_train(a) -> int:
    import torch

    from lenet import checkpoint
    from lenet.console import ConsoleProgress
    from lenet.data.batches import Batches
    from lenet.models import format_summary, init_model, summary
    from lenet.runs import RunFolder, RunWriter
    from lenet.train import Trainer, resolve_device

    state = None
    if a.resume:
        changed = [f for f in ("preset", "batch_size", "lr", "seed", "data", "out")
                   if getattr(a, f) is not None]
        if changed:
            raise ConfigError(f"--resume continues a run as configured; --{changed[0]} "
                              f"cannot change it (only --epochs and --device can)")
        folder = RunFolder(a.resume)
        folder.read_config()
        ckpt = folder.checkpoint_for_resume()
        state = checkpoint.load(ckpt)
        cfg = override(state["config"], "train", epochs=a.epochs, device=a.device)
        if cfg.train.epochs < state["epoch"]:
            raise ConfigError(f"--epochs {cfg.train.epochs}: the run already has "
                              f"{state['epoch']} epochs")
    else:
        cfg = preset(a.preset or "book")
        cfg = override(cfg, "train", epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
                       seed=a.seed, device=a.device)
        cfg = override(cfg, "data", name=_data_name(a.data))
        folder = RunFolder(a.out) if a.out else RunFolder.new(a.runs_dir, cfg.preset)
        if folder.config.exists():
            folder.create(cfg)  # raises: the folder already holds a run

    device = resolve_device(cfg.train.device)
    ds = _load_data(cfg.data.name)
    cfg = _fit_to_data(cfg, ds)
    model = init_model(cfg.model, cfg.train.seed)
    if state is not None:
        checkpoint.restore_model(ckpt, state, model)
        folder.write_text(folder.config, cfg.to_json())  # records a changed --epochs
    else:
        folder.create(cfg)
    input_shape = (cfg.model.in_channels, cfg.model.image_size, cfg.model.image_size)
    table = format_summary(summary(model, input_shape), input_shape)

    progress = ConsoleProgress(log_path=folder.log, bar=False if a.no_progress else None)
    progress.say(f"lenet {__version__}, torch {torch.__version__}, device {device}"
                 + (f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else
                    f" ({torch.cuda.get_device_name(device)})"))
    progress.say(f"data {ds.name} from {ds.folder} ({ds.found_in}): "
                 f"{len(ds.train.labels):,} train, {len(ds.test.labels):,} test images")
    progress.say(f"preset {cfg.preset}: lr {cfg.train.lr}, batch {cfg.train.batch_size}, "
                 f"{cfg.train.epochs} epochs, seed {cfg.train.seed}; run folder {folder.path}")

    trainer = Trainer(cfg.train, device, [progress, RunWriter(folder, cfg, table)])
    if state is not None:
        trainer.restore(state)
    train = Batches(ds.train.images, ds.train.labels, cfg.train.batch_size, device)
    test = Batches(ds.test.images, ds.test.labels, cfg.train.eval_batch_size, device)
    trainer.fit(model, train, test)
    progress.say(f"run folder: {folder.path}")
    return 0


def cmd_evaluate(a) -> int:
    from lenet import checkpoint
    from lenet.data.batches import Batches
    from lenet.evaluate import evaluate
    from lenet.models import build
    from lenet.runs import RunFolder
    from lenet.train import resolve_device

    folder = RunFolder(a.run)
    cfg = folder.read_config()
    path = folder.best if a.checkpoint == "best" else folder.last
    state = checkpoint.load(path)
    model = build(state["config"].model)
    checkpoint.restore_model(path, state, model)
    device = resolve_device(a.device)
    ds = _load_data(_data_name(a.data) or cfg.data.name)
    if len(ds.classes) != cfg.model.num_classes:
        raise ConfigError(f"{ds.folder}: has {len(ds.classes)} classes; the model in "
                          f"{path} predicts {cfg.model.num_classes}")
    test = Batches(ds.test.images, ds.test.labels, cfg.train.eval_batch_size, device)
    loss, acc = evaluate(model.to(device), test)
    print(f"{path} (epoch {state['epoch']}) on {ds.name} test set, "
          f"{test.num_examples:,} images: test loss {loss:.4f}, test acc {acc:.4f}")
    return 0


def cmd_summary(a) -> int:
    from lenet.models import build, format_summary, summary

    cfg = preset(a.preset)
    model = build(cfg.model)
    shape = (cfg.model.in_channels, cfg.model.image_size, cfg.model.image_size)
    print(f"preset {cfg.preset}")
    print(format_summary(summary(model, shape), shape))
    return 0


def cmd_data(a) -> int:
    from lenet.data import sources

    if a.action == "fetch":
        if not a.name:
            raise ConfigError("lenet data fetch: expected a data set name "
                              f"({', '.join(sources.DATASETS)})")
        if a.name not in sources.DATASETS:
            raise ConfigError(f"unknown data set '{a.name}': expected one of "
                              f"{', '.join(sources.DATASETS)}")
        dest = Path(a.dest) if a.dest else None
        folder = sources.fetch(sources.DATASETS[a.name], dest, report=_info)
        print(f"{a.name}: ready in {folder}")
        return 0
    if a.name:
        raise ConfigError(f"lenet data: unexpected '{a.name}' (did you mean "
                          f"'lenet data fetch {a.name}'?)")
    for row in sources.status():
        where = f"{row['found'][1]} ({row['found'][0]})" if row["found"] else "missing"
        print(f"{row['name']:<14} {where}")
        if not row["found"]:
            looked = ", ".join(str(p) for _, p in row["candidates"])
            print(f"{'':<14} looked in {looked}; 'lenet data fetch {row['name']}' downloads it")
    print(f"cache: {sources.cache_root()}" + (f"; $LENET_DATA={os.environ['LENET_DATA']}"
                                              if os.environ.get("LENET_DATA") else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
