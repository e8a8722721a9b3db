"""Data sets: strict IDX files, where they are found, verified downloads, and loading."""

from lenet.data.idx import read_idx, write_idx
from lenet.data.layout import ROLES, STANDARD_FILES
from lenet.data.sources import (
    DATASETS,
    Dataset,
    DatasetInfo,
    Split,
    cache_root,
    candidates,
    fetch,
    find_files,
    load,
    locate,
    status,
)

__all__ = [
    "DATASETS",
    "ROLES",
    "STANDARD_FILES",
    "Dataset",
    "DatasetInfo",
    "Split",
    "cache_root",
    "candidates",
    "fetch",
    "find_files",
    "load",
    "locate",
    "read_idx",
    "status",
    "write_idx",
]
