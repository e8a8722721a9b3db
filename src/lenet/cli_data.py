"""`lenet data`: where each registered data set is, `fetch` to download one, and `show` to
read any data set or folder as training would and say what it holds. Thin, like cli.py."""
from __future__ import annotations

import os
from pathlib import Path

from lenet.errors import ConfigError


def add_parser(verbs) -> None:
    d = verbs.add_parser("data", help="where each data set is; 'data fetch NAME' downloads; "
                         "'data show NAME|FOLDER' says what one holds")
    d.add_argument("action", nargs="?", metavar="fetch|show",
                   help="fetch NAME downloads; show NAME (or just NAME) reads and describes")
    d.add_argument("name", nargs="?", help="fetch: fashion-mnist or mnist; show: also a "
                   "folder of IDX files, or FOLDER/PREFIX")
    d.add_argument("--dest", help="folder to download into (default: the user cache)")


def cmd_data(a) -> int:
    if a.action not in (None, "fetch", "show"):
        if a.name:
            raise ConfigError(f"lenet data: unknown action '{a.action}', expected fetch or show")
        a.action, a.name = "show", a.action  # `lenet data FOLDER`
    if a.action == "fetch":
        return _fetch(a.name, a.dest)
    if a.action == "show":
        if a.dest:
            raise ConfigError("lenet data show: --dest is for fetch")
        return _show(a.name)
    return _status()


def _fetch(name: str | None, dest: str | None) -> int:
    from lenet.cli import _info
    from lenet.data import sources

    if not name:
        raise ConfigError("lenet data fetch: expected a data set name "
                          f"({', '.join(sources.DATASETS)})")
    if name not in sources.DATASETS:
        raise ConfigError(f"unknown data set '{name}': expected one of "
                          f"{', '.join(sources.DATASETS)}")
    found = None if dest else sources.locate(name)
    if found is not None:
        print(f"{name}: already here, in {found[1]} ({found[0]}); nothing to fetch "
              "(--dest DIR downloads a copy)")
        return 0
    folder = sources.fetch(sources.DATASETS[name], Path(dest) if dest else None, report=_info)
    print(f"{name}: ready in {folder}")
    return 0


def _show(name: str | None) -> int:
    from lenet.cli import _data_name
    from lenet.data import sources

    if not name:
        raise ConfigError("lenet data show: expected a data set name "
                          f"({', '.join(sources.DATASETS)}) or a folder")
    for i, target in enumerate(_sets(_data_name(name))):
        print(("\n" if i else "") + "\n".join(describe(sources.load(target, download=False))))
    return 0


def _status() -> int:
    from lenet.data import sources

    for row in sources.status():
        where = f"{row['found'][1]} ({row['found'][0]})" if row["found"] else "missing"
        print(f"{row['name']:<14} {where}")
        if not row["found"]:
            looked = ", ".join(str(p) for _, p in row["candidates"])
            print(f"{'':<14} looked in {looked}; 'lenet data fetch {row['name']}' downloads it")
    print(f"cache: {sources.cache_root()}" + (f"; $LENET_DATA={os.environ['LENET_DATA']}"
                                              if os.environ.get("LENET_DATA") else ""))
    return 0


def _sets(name: str) -> list[str]:
    """What `show NAME` reads: NAME itself, or each set of a folder: the one under MNIST's
    names (what --data FOLDER takes) first, then each prefixed set."""
    from lenet.data import layout, sources

    path = Path(name).expanduser()
    if name in sources.DATASETS or not path.is_dir():
        return [name]
    standard = [] if layout.scan(path, layout.STANDARD_FILES)[1] else [name]
    return standard + [str(path / prefix) for prefix in layout.prefixes_in(path)] or [name]


def describe(ds) -> list[str]:
    """A loaded data set in lines: where, files, sizes, class names and their counts."""
    import numpy as np

    n_train, rows, cols = ds.train.images.shape
    size = sum(p.stat().st_size for p in ds.files.values())
    lines = [f"{ds.name} from {ds.folder} ({ds.found_in})",
             f"files: {', '.join(p.name for p in ds.files.values())} ({size / 1e6:.1f} MB)",
             f"images: {n_train:,} train, {len(ds.test):,} test, {rows}x{cols} pixels, "
             "uint8" + ("; stored transposed (EMNIST), turned upright" if ds.transposed else "")]
    mean, std = _pixel_stats(ds.train.images)
    lines.append(f"pixels (train, /255): mean {mean:.4f}, std {std:.4f}")
    train = np.bincount(ds.train.labels, minlength=len(ds.classes))
    test = np.bincount(ds.test.labels, minlength=len(ds.classes))
    lines.append(f"{len(ds.classes)} classes, names from {ds.classes_from}:")
    width = max(8, *(len(c) for c in ds.classes))
    lines.append(f"  {'label':>5}  {'class':<{width}} {'train':>9} {'test':>9}")
    for k, name in enumerate(ds.classes):
        lines.append(f"  {k:>5}  {name:<{width}} {train[k]:>9,} {test[k]:>9,}")
    return lines


def _pixel_stats(images) -> tuple[float, float]:
    """Mean and standard deviation of all pixels, /255, a few thousand images at a time:
    numpy's std of EMNIST byclass (550 MB of uint8) would make a 4.4 GB float64 copy."""
    import numpy as np

    count, total, squares = 0, 0, 0
    for start in range(0, len(images), 4096):
        chunk = images[start:start + 4096].astype(np.int64)
        count += chunk.size
        total += int(chunk.sum())
        squares += int((chunk * chunk).sum())
    mean = total / count
    return mean / 255, max(0.0, squares / count - mean * mean) ** 0.5 / 255


HANDLERS = {"data": cmd_data}
