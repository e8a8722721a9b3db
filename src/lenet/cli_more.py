"""The `lenet` verbs that look at a trained run: predict, activations, export, and the
report `lenet evaluate` prints. Thin, like cli.py: parse, call the library, print."""
from __future__ import annotations

import os
import sys
from pathlib import Path

MAX_INPUTS = 24  # rows in the activations figure; beyond this it stops being readable
CHECK_IMAGES = 1000  # images an export is checked on
MAX_DIFF = 1e-4  # largest logit difference an export may show against PyTorch
BLANK = "blank: nothing in it stands out from its background"


def add_parsers(verbs) -> None:
    """Add predict, activations and export to cli.py's subparsers object."""
    from lenet import samples

    ckpt = {"choices": ("last", "best"), "default": "last",
            "help": "which checkpoint of the run (default last)"}

    p = verbs.add_parser("predict", help="classify your own image files with a trained run")
    p.add_argument("run", metavar="RUN_DIR")
    p.add_argument("files", metavar="FILE", nargs="+",
                   help="PNG, JPEG, GIF, BMP, TIFF or WebP, any size; a folder: its image files")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--top", type=int, default=3, metavar="K",
                   help="classes shown per file (default 3)")
    p.add_argument("--checkpoint", **ckpt)

    a = verbs.add_parser("activations", help="conv feature maps for chosen inputs")
    a.add_argument("run", metavar="RUN_DIR")
    a.add_argument("--classes", action="append", metavar="A,B",
                   help="test images of these classes (names, case-insensitive)")
    a.add_argument("--per-class", type=int, default=2, metavar="N",
                   help="images per class (default 2)")
    a.add_argument("--index", type=int, action="append", metavar="N",
                   help="a test image by index (repeatable)")
    a.add_argument("--data", help="take --classes and --index from another data set or "
                   "folder (default: the run's)")
    a.add_argument("--image", action="append", metavar="FILE",
                   help="an image file of yours, or a folder of them (repeatable)")
    a.add_argument("--sample", action="append", choices=samples.NAMES,
                   help="a photograph shipped with lenet, nothing like its training data "
                        "(repeatable)")
    a.add_argument("--noise", action="append", choices=("uniform", "gaussian"),
                   help="a noise image (repeatable)")
    a.add_argument("--seed", type=int, default=0, metavar="N", help="seed for --noise (default 0)")
    a.add_argument("--blank", action="store_true", help="a blank (black) image")
    a.add_argument("--out", metavar="FILE", help="the figure as .png, .svg or .pdf (default "
                   "RUN_DIR/activations.png)")
    a.add_argument("--checkpoint", **ckpt)

    e = verbs.add_parser("export", help="export a trained run (ONNX), checked against "
                         "onnxruntime")
    e.add_argument("run", metavar="RUN_DIR")
    e.add_argument("--format", choices=("onnx",), default="onnx", help="onnx (default)")
    e.add_argument("--out", metavar="FILE", help="where to write (default RUN_DIR/model.onnx)")
    e.add_argument("--checkpoint", **ckpt)

    s = verbs.add_parser("serve", help="a web page to draw or upload an image and watch the "
                         "prediction and feature maps (one or two runs side by side)")
    s.add_argument("runs", metavar="RUN_DIR", nargs="+", help="one run, or two to compare")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="default 8000; 0 picks a free one")
    s.add_argument("--checkpoint", **ckpt)


def _err(line: str) -> None:
    print(f"lenet: error: {line}", file=sys.stderr)


def cmd_predict(a) -> int:
    import json

    import numpy as np

    from lenet.errors import ConfigError
    from lenet.predict import ImageError, image_paths, load_image, predict
    from lenet.report import class_names, load_run

    if a.top < 1:
        raise ConfigError(f"--top {a.top}: expected a positive integer")
    run = load_run(a.run, a.checkpoint)
    classes = class_names(run.config)
    images, results = [], []
    for f, error in image_paths(a.files):
        if error is None:
            try:
                images.append(load_image(f, run.config.model.image_size))
                # The network still answers, confidently, for an empty input: say so.
                results.append({"file": f, "blank": not images[-1].any()})
                continue
            except ImageError as e:
                error = e
        _err(str(error))  # the others are still predicted
        results.append({"file": f, "error": error.reason})
    good = [r for r in results if "error" not in r]
    if images:
        for r, top in zip(good, predict(run.model, np.stack(images), classes, a.top),
                          strict=True):
            r["top"] = [{"class": c, "probability": round(p, 6)} for c, p in top]
    if a.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
    else:
        for r in good:
            print(f"{r['file']}: " + ", ".join(f"{t['class']} {t['probability']:.2f}"
                                               for t in r["top"])
                  + (f"  ({BLANK})" if r["blank"] else ""))
    return 1 if len(good) < len(results) else 0


def cmd_activations(a) -> int:
    import numpy as np

    from lenet import inspect, plots
    from lenet.cli import _data_name, run_data
    from lenet.errors import ConfigError
    from lenet.predict import image_paths, probabilities, to_input
    from lenet.report import class_names, load_run

    run = load_run(a.run, a.checkpoint)
    cfg = run.config
    images = []
    for f, error in image_paths(a.image or ()):  # a folder: its image files, as for predict
        if error is not None:
            raise error
        images.append(f)
    names = [n for group in a.classes or () for n in group.split(",") if n.strip()]
    if a.classes and not names:
        raise ConfigError("--classes: expected class names separated by commas")
    chosen = names or a.index or a.image or a.sample or a.noise or a.blank
    split, classes = None, class_names(cfg)
    if names or a.index or not chosen:  # only these need the test set
        ds = run_data(run, _data_name(a.data))
        split, classes = ds.test, ds.classes
    probes = inspect.choose(split, classes, class_names=names, per_class=a.per_class,
                            indices=a.index or (), images=images,
                            samples=a.sample or (), noises=a.noise or (), seed=a.seed,
                            blank=a.blank, size=cfg.model.image_size)
    if not probes:
        raise ConfigError("no inputs chosen: give --classes, --index, --image, --sample, "
                          "--noise or --blank")
    if len(probes) > MAX_INPUTS:
        raise ConfigError(f"{len(probes)} inputs chosen: at most {MAX_INPUTS} fit the figure")
    out = Path(a.out) if a.out else run.folder / "activations.png"
    if not out.parent.is_dir():
        raise ConfigError(f"--out {out}: no such folder {out.parent}")
    plots.figure_format(out)

    images = np.stack([p.image for p in probes])
    layers = inspect.conv_activations(run.model)
    acts = inspect.capture(run.model, to_input(images), layers)
    probs = probabilities(run.model, images)
    pred = probs.argmax(1)
    rows = inspect.stats(acts, cfg.model.activation)

    labels = [f"{p.name}\ntrue {p.label or '-'}\n→ {classes[k]} {probs[i, k]:.2f}"
              for i, (p, k) in enumerate(zip(probes, pred, strict=True))]
    maps = {f"conv{n[3:]} → {cfg.model.activation}": acts[n].numpy() for n in layers}
    plots.activations_figure(images, labels, maps, out,
                             title=f"{run.folder.name} ({run.checkpoint.name}, {run.epoch_words})")

    above = inspect.active_threshold(cfg.model.activation)
    table = [["input", "true", "predicted"] + [f"{n} {s}" for n in layers
                                               for s in ("mean", "max", f">{above:g}")]]
    for i, (p, k) in enumerate(zip(probes, pred, strict=True)):
        table.append([p.name, p.label or "-", f"{classes[k]} {probs[i, k]:.2f}"] +
                     [v for n in layers for v in (f"{rows[i][n].mean:.3f}",
                                                  f"{rows[i][n].max:.3f}",
                                                  f"{rows[i][n].active:.0%}")])
    widths = [max(len(r[c]) for r in table) for c in range(len(table[0]))]
    for r in table:
        print("  ".join(v.ljust(w) if c < 3 else v.rjust(w)
                        for c, (v, w) in enumerate(zip(r, widths, strict=True))).rstrip())
    print(f">{above:g}: share of a layer's units above {above:g}, what "
          f"{cfg.model.activation} gives an input of 0 (active); mean and max over all its "
          "units")
    print(f"figure: {out}")
    return 0


def cmd_export(a) -> int:
    import numpy as np

    from lenet.cli import _load_data
    from lenet.errors import DataError
    from lenet.export import OPSET, ExportError, check_onnx, export_onnx
    from lenet.predict import fit_size
    from lenet.report import class_names, load_run

    run = load_run(a.run, a.checkpoint)
    cfg = run.config
    if a.out == "":
        raise ExportError("--out '': expected a file name ending in .onnx")
    out = Path(a.out) if a.out is not None else run.folder / "model.onnx"
    if out.suffix.lower() != ".onnx":
        raise ExportError(f"--out {out}: expected a file name ending in .onnx")
    if not out.parent.is_dir():
        raise ExportError(f"--out {out}: no such folder {out.parent}")
    if out.is_dir():
        raise ExportError(f"--out {out}: is a folder, expected a file name ending in .onnx")
    classes = class_names(cfg)
    size = cfg.model.image_size
    # Written beside the target, checked, and only then renamed into place: a file that
    # disagrees with PyTorch is never left looking like a good export.
    tmp = out.with_name(f".{out.name}.unchecked")
    try:  # before the work: a folder we cannot write in is found now, and named as --out
        tmp.touch()
    except OSError as e:
        raise ExportError(f"--out {out}: cannot write ({e.strerror or e})") from None
    try:
        try:  # the export is checked on real test images when they are at hand
            ds = _load_data(cfg.data.name, download=False)
            images = fit_size(ds.test.images[:CHECK_IMAGES], size)  # a --resize run's size
            what = f"test images of {ds.name}"
        except DataError:
            rng = np.random.default_rng(0)
            images = rng.integers(0, 256, (CHECK_IMAGES, size, size), dtype=np.uint8)
            what = f"random images ({cfg.data.name} is not available here)"
        export_onnx(run.model, tmp, size, classes,
                    metadata={"run": run.folder.name, "checkpoint": run.checkpoint.name,
                              "epoch": run.epoch, "preset": cfg.preset})
        diff, agree = check_onnx(tmp, run.model, images)
        print(f"checked on {len(images):,} {what}: max abs diff {diff:.2e}, argmax "
              f"agreement {agree:.2%}")
        if not (diff <= MAX_DIFF and agree == 1.0):
            raise ExportError(f"{out}: onnxruntime disagrees with PyTorch (max abs diff "
                              f"{diff:.2e}, limit {MAX_DIFF:g}; agreement {agree:.2%}); "
                              "not written")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {out}: ONNX opset {OPSET}, input 'image' float32 (N, 1, {size}, {size}) = "
          f"pixel/255, output 'logits' (N, {len(classes)}); classes and preprocessing in its "
          "metadata")
    return 0


def cmd_serve(a) -> int:
    import torch

    from lenet import serve
    from lenet.cli import _load_data
    from lenet.errors import DataError

    if len(a.runs) > serve.MAX_MODELS:
        raise serve.ServeError(f"{len(a.runs)} runs given: expected 1 or {serve.MAX_MODELS}")
    models = [serve.load_served(r, a.checkpoint) for r in a.runs]
    data = models[0].run.config.data.name
    test, note = None, ""
    try:  # examples need the test set; the page works without it
        test = _load_data(data, download=False).test
    except DataError as e:
        note = f"no test-set examples: {e}"
        print(f"lenet serve: {note}", file=sys.stderr)
    app = serve.create_app(models, test, note)
    sock = serve.bind(a.host, a.port)
    # One image per request: a single thread per forward pass is fastest, and leaves the
    # other cores to concurrent requests.
    torch.set_num_threads(1)
    print(f"serving {' and '.join(m.name for m in models)} at {serve.url(sock)} "
          "(Ctrl-C stops)", flush=True)
    serve.server(app).run(sockets=[sock])
    return 0


def print_report(p, ds, out_dir, suffix: str = "") -> tuple[Path, Path]:
    """For `lenet evaluate`: per-class accuracy, the five most confused pairs, and
    OUT_DIR/confusion{suffix}.png and OUT_DIR/misclassified{suffix}.png (whose paths it
    returns), from the test set's predictions `p` (report.classify)."""
    import numpy as np

    from lenet import plots, report

    out_dir = Path(out_dir)
    cm = report.confusion_matrix(p.labels, p.pred, len(ds.classes))
    accuracy = report.per_class_accuracy(cm)
    width = max(len("class"), *(len(c) for c in ds.classes))
    print(f"{'class':<{width}}  {'images':>6}  {'correct':>7}  accuracy")
    for k, name in enumerate(ds.classes):
        acc = "-" if np.isnan(accuracy[k]) else f"{accuracy[k]:.3f}"
        print(f"{name:<{width}}  {cm[k].sum():>6,}  {cm[k, k]:>7,}  {acc:>8}")
    print(f"{'all':<{width}}  {cm.sum():>6,}  {np.trace(cm):>7,}  {p.accuracy:>8.3f}")
    pairs = report.most_confused(cm, ds.classes, k=5)
    if pairs:
        print("most confused (true -> predicted):")
        for true, pred, count in pairs:
            print(f"  {true} -> {pred}: {count:,}")
    wrong = report.misclassified(p)
    confusion = out_dir / f"confusion{suffix}.png"
    gallery = out_dir / f"misclassified{suffix}.png"
    plots.confusion_figure(cm, ds.classes, confusion, title=f"{out_dir.name} on {ds.name}")
    shown = wrong[:32]
    plots.misclassified_gallery(ds.test.images[shown], p.labels[shown], p.pred[shown],
                                p.prob[shown], ds.classes, gallery)
    print(f"figures: {confusion}, {gallery}")
    return confusion, gallery


HANDLERS = {"predict": cmd_predict, "activations": cmd_activations, "export": cmd_export,
            "serve": cmd_serve}
