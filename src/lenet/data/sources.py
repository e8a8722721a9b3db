"""Where the data sets live: the registry, discovery on disk, verified downloads, and loading.

A registered data set is looked for in this order: the --data folder, $LENET_DATA, the cache,
then SYSTEM_DATASETS, where Debian's dataset-* packages install. Checksums are verified on
download only: Debian recompresses the .gz files, so their md5 differs from upstream's even
though the content is the same.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import numpy as np

from lenet.data.idx import read_idx
from lenet.data.layout import (
    ROLES,
    STANDARD_FILES,
    UNUSED,
    class_names,
    names_prefixed_set,
    prefixed_files,
    prefixes_in,
    resolve,
    scan,
    stored_transposed,
)
from lenet.errors import DataError, DownloadError, IDXError
from lenet.files import current_umask

Report = Callable[[str], None]

SYSTEM_DATASETS = Path("/usr/share/datasets")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class DatasetInfo:
    """A registered data set: its classes, file names, checksums and where to download it.

    `files` maps each role in ROLES to a file name, `md5` maps each file name to its md5 hex
    digest, `mirrors` are base URLs tried in order, and `package` is the Debian package that
    installs the files under SYSTEM_DATASETS, if any.
    """

    name: str
    classes: tuple[str, ...]
    files: Mapping[str, str] = field(hash=False)
    md5: Mapping[str, str] = field(hash=False)
    mirrors: tuple[str, ...] = ()
    homepage: str = ""
    package: str = ""

    def __post_init__(self) -> None:
        # Read-only views keep a registered entry from being changed through a shared reference.
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "files", MappingProxyType(dict(self.files)))
        object.__setattr__(self, "md5", MappingProxyType(dict(self.md5)))
        object.__setattr__(self, "mirrors", tuple(self.mirrors))
        missing = [role for role in ROLES if role not in self.files]
        if missing:
            raise ValueError(f"DatasetInfo {self.name!r}: files lacks roles {', '.join(missing)}")


DATASETS: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo(
        name="fashion-mnist",
        classes=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        files=STANDARD_FILES,
        md5={
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        homepage="https://github.com/zalandoresearch/fashion-mnist",
        package="dataset-fashion-mnist",
    ),
    "mnist": DatasetInfo(
        name="mnist",
        classes=tuple(str(digit) for digit in range(10)),
        files=STANDARD_FILES,
        md5={
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        homepage="http://yann.lecun.com/exdb/mnist/",
    ),
}


@dataclass(frozen=True, eq=False)
class Split:
    """Images (uint8, shape (N, rows, cols)) and their labels (int64, shape (N,))."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True, eq=False)
class Dataset:
    """A loaded data set; `found_in` says where: "--data", "$LENET_DATA", "cache", "system"
    or "downloaded". `name` is a registered name, a folder's name, or a prefixed set's prefix."""

    name: str
    classes: tuple[str, ...]
    train: Split
    test: Split
    folder: Path
    found_in: str
    transposed: bool = False  # stored transposed (EMNIST) and turned upright when read
    files: Mapping[str, Path] = field(default_factory=dict)  # the file read for each role
    classes_from: str = ""  # where the class names came from, in words or as a path
    prefix: str | None = None  # a prefixed set's prefix (layout); None: MNIST's file names

    @property
    def location(self) -> Path:
        """The folder, or FOLDER/PREFIX for a prefixed set: what --data names."""
        return self.folder / self.prefix if self.prefix else self.folder


def cache_root() -> Path:
    """$LENET_CACHE, else $XDG_CACHE_HOME/lenet, else ~/.cache/lenet."""
    if os.environ.get("LENET_CACHE"):
        return Path(os.environ["LENET_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "lenet"
    return Path.home() / ".cache" / "lenet"


def find_files(
    folder: str | os.PathLike[str], files: Mapping[str, str] = STANDARD_FILES
) -> dict[str, Path] | None:
    """The four files in `folder` by role, each as name.gz or raw; None if any is missing."""
    found, missing = scan(Path(folder), files)
    return None if missing else found


def candidates(name: str, data_dir: str | os.PathLike[str] | None = None) -> list[tuple[str, Path]]:
    """The folders searched for data set `name`, in order, each with the label `load` reports."""
    found = []
    if data_dir is not None:
        found.append(("--data", Path(data_dir).expanduser()))
    if os.environ.get("LENET_DATA"):
        root = Path(os.environ["LENET_DATA"]).expanduser()
        found.append(("$LENET_DATA", root / name))
        # Older scripts point LENET_DATA at the data set's own folder. One named after another
        # registered data set is plainly not meant for this one, so it is skipped.
        if root.name == name or root.name not in DATASETS:
            found.append(("$LENET_DATA", root))
    found.append(("cache", cache_root() / name))
    found.append(("system", SYSTEM_DATASETS / name))
    return found


def locate(name: str, data_dir: str | os.PathLike[str] | None = None) -> tuple[str, Path] | None:
    """The first candidate folder that holds the four files, as (label, folder), or None."""
    files = DATASETS[name].files if name in DATASETS else STANDARD_FILES
    for label, folder in candidates(name, data_dir):
        if find_files(folder, files) is not None:
            return label, folder
    return None


def status(data_dir: str | os.PathLike[str] | None = None) -> list[dict]:
    """For each registered data set: {"name", "found": (label, folder) or None, "cache": the
    folder fetch downloads into, "candidates": [(label, folder)] in the order checked}."""
    rows = []
    for name, info in DATASETS.items():
        checked = candidates(name, data_dir)
        found = next((c for c in checked if find_files(c[1], info.files) is not None), None)
        rows.append(
            {"name": name, "found": found, "cache": cache_root() / name, "candidates": checked}
        )
    return rows


def fetch(
    info: DatasetInfo,
    dest: str | os.PathLike[str] | None = None,
    *,
    mirrors: tuple[str, ...] | list[str] | None = None,
    report: Report | None = None,
    timeout: float = 60,
) -> Path:
    """Download the files of `info` that `dest` lacks, verify their md5, and return `dest`.

    `dest` defaults to cache_root()/info.name. Mirrors are tried in order: $LENET_MIRROR first
    when set, then `mirrors` (default info.mirrors). $LENET_MIRROR is the root of a local
    mirror laid out like the cache, i.e. holding <name>/<file> (for example
    http://host:8000/ serving another machine's ~/.cache/lenet, or file:///srv/lenet/, or a
    plain folder path). A file already in `dest` with the right md5 is kept. Each download is
    streamed to a temporary .part file, verified, synced and then renamed into place, so a
    failure never leaves a partial or unverified file behind. Raises DownloadError naming the
    file and every URL tried with why it failed, DataError if `dest` cannot be written.
    """
    say = report or _quiet
    dest = Path(dest).expanduser() if dest is not None else cache_root() / info.name
    made = [p for p in (dest, *dest.parents) if not p.exists()]  # deepest first
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        problem = f"cannot create the download folder ({exc.strerror or exc})"
        raise DataError(f"{dest}: {problem}") from exc
    bases = _mirror_urls(info, mirrors)
    for role in ROLES:
        name = info.files[role]
        expected = info.md5.get(name, "").lower()
        if not expected:
            raise DownloadError(f"{name}: no md5 registered for {info.name}, cannot verify it")
        target = dest / name
        if target.is_file():
            actual = _md5_of(target)
            if actual == expected:
                say(f"kept {target}: md5 {actual} verified")
                continue
            say(f"{target} has md5 {actual}, expected {expected}: downloading it again")
        failures = []
        for base in bases:
            url = base + name
            problem = _download(url, target, expected, timeout, say)
            if problem is None:
                say(f"verified md5 of {name} ({expected})")
                break
            failures.append(f"{url}: {problem}")
            if len(failures) < len(bases):  # the next mirror is tried; the last goes below
                say(f"{url}: {problem}")
        else:
            for folder in made:  # no empty folder left behind (the cache's own included)
                if any(folder.iterdir()):
                    break
                folder.rmdir()
            tried = "; ".join(failures) or "no mirror to try (give mirrors or set $LENET_MIRROR)"
            raise DownloadError(f"{name}: download failed: {tried}; offline? give the files "
                                "with --data DIR, or point $LENET_MIRROR at a mirror or folder")
    return dest


def _mirror_urls(info: DatasetInfo, mirrors: tuple[str, ...] | list[str] | None) -> list[str]:
    bases = list(info.mirrors if mirrors is None else mirrors)
    local = os.environ.get("LENET_MIRROR")
    if local:
        bases.insert(0, local.rstrip("/") + "/" + info.name)
    urls = []
    for base in bases:
        if "://" not in base:  # a folder path
            base = Path(base).expanduser().resolve().as_uri()
        urls.append(base if base.endswith("/") else base + "/")
    return list(dict.fromkeys(urls))


def _download(url: str, target: Path, expected: str, timeout: float, say: Report) -> str | None:
    """Put `url` at `target` if its md5 is `expected`; return None, or why it was not."""
    try:
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    except OSError as exc:
        raise DataError(f"{target.parent}: cannot write there ({exc.strerror or exc})") from exc
    part = Path(name)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    size = _human(response.headers.get("Content-Length"))
                    say(f"downloading {target.name}{size} from {url}")
                    while chunk := response.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
            except urllib.error.HTTPError as exc:
                exc.close()
                return f"HTTP {exc.code} {exc.reason}"
            except urllib.error.URLError as exc:
                return str(exc.reason)
            except (http.client.HTTPException, OSError, ValueError) as exc:
                return str(exc) or type(exc).__name__
            out.flush()
            os.fsync(out.fileno())
        actual = digest.hexdigest()
        if actual != expected:
            return f"expected md5 {expected}, got {actual}"
        part.chmod(0o666 & ~current_umask())  # mkstemp's 0600 would hide a shared cache
        os.replace(part, target)
        _fsync_folder(target.parent)
        return None
    finally:
        part.unlink(missing_ok=True)


def _md5_of(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with open(path, "rb") as file:
            while chunk := file.read(_CHUNK):
                digest.update(chunk)
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    return digest.hexdigest()


def _fsync_folder(folder: Path) -> None:
    # Makes the rename itself durable; not every platform can open a folder, which is harmless.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _human(length: str | None) -> str:
    if not length or not length.isdigit():
        return ""
    size = int(length)
    if size >= 1_000_000:
        return f" ({size / 1e6:.1f} MB)"
    if size >= 1_000:
        return f" ({size / 1e3:.1f} kB)"
    return f" ({size} bytes)"


def _quiet(message: str) -> None:
    pass


def load(
    data: str | os.PathLike[str] = "fashion-mnist",
    *,
    download: bool = True,
    report: Report | None = None,
) -> Dataset:
    """Load a registered data set by name, or the four IDX files in a folder.

    A name is looked for where `candidates` says and, if absent and `download` is true,
    fetched into the cache. A path is a folder or FOLDER/PREFIX of a prefixed set (the layout
    module says which files each means). Class names come from the folder (layout.class_names:
    classes.txt, or a prefixed set's own list or EMNIST mapping), else from the registered data
    set the folder is named after, else "0", "1", ... up to the largest training label. Raises
    DataError (IDXError for malformed files) naming the file.
    """
    say = report or _quiet
    if isinstance(data, str) and data in DATASETS and not _looks_like_path(data):
        info = DATASETS[data]
        hit = locate(data)
        if hit is not None:
            found_in, folder = hit  # the caller reports where: no need to say it here
        elif not download:
            raise DataError(_not_found(info))
        else:
            folder = cache_root() / data
            say(f"{data} not found locally: downloading it into {folder}")
            fetch(info, folder, report=say)
            say(f"md5 checksums of all {len(ROLES)} {data} files verified")
            found_in = "downloaded"
        return _load_folder(folder, info.name, info.classes, info.files, found_in)

    path = Path(data).expanduser()
    if not (isinstance(data, os.PathLike) or _looks_like_path(data) or path.is_dir()
            or names_prefixed_set(path)):
        raise DataError(
            f"unknown data set {data!r}: expected one of {', '.join(DATASETS)}, "
            "or a folder holding the four IDX files"
        )
    where = resolve(path)
    if where is None and path.exists():
        raise DataError(f"{path}: is a file, expected a folder holding the four IDX files, "
                        "or FOLDER/PREFIX of a set in one")
    if where is None and (there := prefixes_in(path.parent)):
        raise DataError(f"{path}: no such folder, and {path.parent} holds no set named "
                        f"{path.name!r}: expected one of {', '.join(there)}")
    if where is None:
        raise DataError(
            f"{path}: no such folder, expected a folder holding the four IDX files "
            f"or a data set name ({', '.join(DATASETS)})"
        )
    folder, prefix = where
    if prefix is not None:
        return _load_folder(folder, prefix, None, prefixed_files(prefix), "--data", prefix)
    info = DATASETS.get(folder.resolve().name)
    if info is None:
        return _load_folder(folder, folder.resolve().name, None, STANDARD_FILES, "--data")
    return _load_folder(folder, info.name, info.classes, info.files, "--data")


def _looks_like_path(data: str) -> bool:
    return os.sep in data or (os.altsep is not None and os.altsep in data)


def _not_found(info: DatasetInfo) -> str:
    looked = ", ".join(f"{label} {folder}" for label, folder in candidates(info.name))
    hint = f"run `lenet data fetch {info.name}`"
    if info.package:
        hint += f" or `apt-get install {info.package}`"
    return f"{info.name} not found: looked in {looked}, expected the four IDX files; {hint}"


def _load_folder(
    folder: Path,
    name: str,
    classes: tuple[str, ...] | None,
    files: Mapping[str, str],
    found_in: str,
    prefix: str | None = None,
) -> Dataset:
    paths, missing = scan(folder, files)
    if missing:
        raise DataError(
            f"{folder}: missing {', '.join(missing)}, expected the four IDX files (.gz or raw)"
        )
    train = _read_split(paths["train_images"], paths["train_labels"])
    test = _read_split(paths["test_images"], paths["test_labels"])
    train_size, test_size = train.images.shape[1:], test.images.shape[1:]
    if train_size != test_size:
        raise DataError(
            f"{paths['test_images']}: images are {_pixels(test_size)} pixels, "
            f"but {paths['train_images']} has {_pixels(train_size)}, expected the same size"
        )
    transposed = stored_transposed(prefix)
    if transposed:
        train, test = _transposed(train), _transposed(test)
    source = f"the classes of {name}"
    listed = class_names(folder, prefix)
    if listed is not None:
        classes, source = listed[0], str(listed[1])
    elif classes is None:
        classes = tuple(str(k) for k in range(int(train.labels.max()) + 1))
        source = "one more than the largest training label"
    from_mapping = listed is not None and listed[1].name.endswith("-mapping.txt")
    for split, role in ((train, "train_labels"), (test, "test_labels")):
        _check_labels(split.labels, paths[role], len(classes), source)
        if from_mapping:  # a label the mapping skips is UNUSED: no image may carry it
            _check_named(split.labels, paths[role], classes, source)
    return Dataset(
        name=name,
        classes=classes,
        train=Split(train.images, train.labels.astype(np.int64)),
        test=Split(test.images, test.labels.astype(np.int64)),
        folder=folder,
        found_in=found_in,
        transposed=transposed,
        files=MappingProxyType(dict(paths)),
        classes_from=source,
        prefix=prefix,
    )


def _transposed(split: Split) -> Split:
    return Split(np.ascontiguousarray(split.images.transpose(0, 2, 1)), split.labels)


def _read_split(images_path: Path, labels_path: Path) -> Split:
    images = read_idx(images_path, ndim=3)
    if images.dtype != np.uint8:
        raise IDXError(f"{images_path}: images are {images.dtype}, expected uint8")
    if min(images.shape[1:]) == 0:
        size = _pixels(images.shape[1:])
        raise IDXError(f"{images_path}: images are {size} pixels, expected 1x1 or more")
    labels = read_idx(labels_path, ndim=1)
    if labels.dtype != np.uint8:
        raise IDXError(f"{labels_path}: labels are {labels.dtype}, expected uint8")
    if len(labels) != len(images):
        raise DataError(
            f"{labels_path}: holds {len(labels):,} labels but {images_path} holds "
            f"{len(images):,} images, expected one label per image"
        )
    if len(images) == 0:
        raise DataError(f"{images_path}: holds no images, expected at least 1")
    return Split(images, labels)


def _pixels(size: tuple[int, ...]) -> str:
    return "x".join(str(n) for n in size)


def _check_named(labels: np.ndarray, path: Path, classes: tuple[str, ...], source: str) -> None:
    unnamed = [k for k, name in enumerate(classes) if name == UNUSED]
    counts = np.bincount(labels, minlength=len(classes))
    used = next((k for k in unnamed if counts[k]), None)
    if used is not None:
        raise DataError(f"{path}: {counts[used]:,} images have label {used}, which {source} "
                        "does not name; expected a line for every label in use")


def _check_labels(labels: np.ndarray, path: Path, count: int, source: str) -> None:
    bad = np.flatnonzero(labels >= count)
    if bad.size:
        index = int(bad[0])
        raise DataError(
            f"{path}: label {int(labels[index])} at index {index:,} is out of range: "
            f"{count} classes ({source}), expected 0 to {count - 1}"
        )
