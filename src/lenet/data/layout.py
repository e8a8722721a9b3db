"""How a data set's files lie in a folder: the four IDX files and the names of its classes.

A folder holds one set under MNIST's names (train-images-idx3-ubyte, ..., t10k-... or
test-..., each raw or .gz), or one or more sets whose names share a prefix, the way EMNIST
ships its six in one folder (emnist-letters-train-images-idx3-ubyte.gz, ...,
emnist-letters-mapping.txt). A prefixed set is named as FOLDER/PREFIX, a path that is not
itself a folder.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from lenet.errors import DataError

ROLES = ("train_images", "train_labels", "test_images", "test_labels")
STANDARD_FILES: Mapping[str, str] = MappingProxyType(
    {
        "train_images": "train-images-idx3-ubyte.gz",
        "train_labels": "train-labels-idx1-ubyte.gz",
        "test_images": "t10k-images-idx3-ubyte.gz",
        "test_labels": "t10k-labels-idx1-ubyte.gz",
    }
)
UNUSED = "(unused)"  # the name of a label a mapping skips; no image may carry it
_PREFIXED = re.compile(r"^(?P<prefix>.+)-train-images[-.]idx3-ubyte(?:\.gz)?$")


def prefixed_files(prefix: str) -> dict[str, str]:
    """The four file names of the set called `prefix` (EMNIST's spelling: train and test)."""
    return {
        "train_images": f"{prefix}-train-images-idx3-ubyte.gz",
        "train_labels": f"{prefix}-train-labels-idx1-ubyte.gz",
        "test_images": f"{prefix}-test-images-idx3-ubyte.gz",
        "test_labels": f"{prefix}-test-labels-idx1-ubyte.gz",
    }


def scan(folder: Path, files: Mapping[str, str]) -> tuple[dict[str, Path], list[str]]:
    """The files of each role found in `folder`, and the names of those missing."""
    found: dict[str, Path] = {}
    missing: list[str] = []
    for role in ROLES:
        path = next((folder / n for n in _spellings(files[role]) if _is_file(folder / n)), None)
        if path is None:
            missing.append(files[role])
        else:
            found[role] = path
    return found, missing


def _spellings(name: str) -> list[str]:
    raw = name.removesuffix(".gz")
    # MNIST's own uncompressed files are spelled train-images.idx3-ubyte.
    dotted = raw.replace("-idx", ".idx", 1)
    names = [name, raw, dotted, dotted + ".gz"]
    # The test split is t10k-... in MNIST's names and test-... in EMNIST's and others'.
    for old, new in (("t10k-", "test-"), ("test-", "t10k-")):
        names += [n.replace(old + "images", new + "images").replace(old + "labels", new + "labels")
                  for n in names]
    return list(dict.fromkeys(names))


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. a folder we may not list
        return False


def prefixes_in(folder: Path) -> list[str]:
    """The prefixes of the sets whose training images lie in `folder`, sorted."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return sorted({m["prefix"] for n in names if (m := _PREFIXED.match(n))})


def resolve(path: Path) -> tuple[Path, str | None] | None:
    """(folder, prefix) of the set that `path` names (prefix None: MNIST's file names), or
    None when `path` is neither a folder nor FOLDER/PREFIX of a prefixed set. A folder without
    MNIST's names but with exactly one prefixed set is that set; with several it is an error."""
    if path.is_dir():
        if not scan(path, STANDARD_FILES)[1]:
            return path, None
        prefixes = prefixes_in(path)
        if len(prefixes) == 1:
            return path, prefixes[0]
        if len(prefixes) > 1:
            raise DataError(
                f"{path}: holds {len(prefixes)} data sets ({', '.join(prefixes)}), expected "
                f"one; name one as {path / prefixes[0]}"
            )
        return path, None
    if names_prefixed_set(path):
        return path.parent, path.name
    return None


def names_prefixed_set(path: Path) -> bool:
    """Whether `path` is FOLDER/PREFIX of a prefixed set in FOLDER (and not a folder itself)."""
    return (bool(path.name) and not path.is_dir() and path.parent.is_dir()
            and path.name in prefixes_in(path.parent))


def stored_transposed(prefix: str | None) -> bool:
    """EMNIST's IDX files hold each image transposed (columns as rows); its files are named
    emnist-SPLIT-...; every other set is stored upright."""
    return prefix is not None and prefix.lower().startswith("emnist-")


def class_names(folder: Path, prefix: str | None) -> tuple[tuple[str, ...], Path] | None:
    """The class names a set's folder gives, and the file they come from: PREFIX-classes.txt,
    then PREFIX-mapping.txt (EMNIST's "label code..." lines), then classes.txt; None if none."""
    if prefix is not None:
        listed = folder / f"{prefix}-classes.txt"
        if listed.is_file():
            return read_class_list(listed), listed
        mapping = folder / f"{prefix}-mapping.txt"
        if mapping.is_file():
            return read_mapping(mapping), mapping
    listed = folder / "classes.txt"
    if listed.is_file():
        return read_class_list(listed), listed
    return None


def read_class_list(path: Path) -> tuple[str, ...]:
    """One class name per line, blank lines skipped, each name once."""
    names = tuple(line.strip() for line in _lines(path) if line.strip())
    if not names:
        raise DataError(f"{path}: holds no class names, expected one per line")
    twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if twice is not None:
        raise DataError(f"{path}: class name {twice!r} appears twice, expected unique names")
    return names


def read_mapping(path: Path) -> tuple[str, ...]:
    """EMNIST's mapping: "label code [code...]" per line, codes being Unicode code points
    (letters: "1 65 97" is A/a). A label the file skips (letters have no 0) is "(unused)"."""
    found: dict[int, str] = {}
    for number, line in enumerate(_lines(path), 1):
        fields = line.split()
        if not fields:
            continue
        try:
            label, codes = int(fields[0]), [int(f) for f in fields[1:]]
            name = "/".join(chr(c) for c in codes)
        except (ValueError, OverflowError):
            name, label, codes = "", -1, []
        if not (0 <= label <= 255 and codes and name.isprintable()):
            raise DataError(f"{path}: line {number} is {line.strip()!r}, expected a label "
                            "0-255 and one or more Unicode code points, e.g. '1 65 97'")
        if label in found:
            raise DataError(f"{path}: label {label} appears twice, expected each once")
        if name in found.values():
            raise DataError(f"{path}: line {number} names label {label} {name!r}, as another "
                            "label is named; expected unique names")
        found[label] = name
    if not found:
        raise DataError(f"{path}: holds no labels, expected lines like '1 65 97'")
    return tuple(found.get(k, UNUSED) for k in range(max(found) + 1))


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read class names ({exc})") from exc
