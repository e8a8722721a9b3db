"""Strict reader and writer for IDX, the file format of (Fashion-)MNIST, raw or gzip-compressed.

The reader trusts nothing in a header: every size it declares is checked against the bytes that
are really there before anything that large is allocated, so a corrupt or hostile file fails
fast with an IDXError instead of exhausting memory or surfacing a zlib traceback.
"""

from __future__ import annotations

import gzip
import math
import os
import stat
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from lenet.errors import IDXError

__all__ = ["DTYPES", "MAX_DIMS", "read_idx", "write_idx"]

# IDX type code -> on-disk dtype; IDX stores multi-byte numbers big-endian.
DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
MAX_DIMS = 8

_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 18
_CODES = ", ".join(f"0x{code:02x} ({dt.name})" for code, dt in DTYPES.items())
# idx1 files hold labels and idx3 files hold images; naming the axes makes the error obvious.
_AXES = {1: " (N,)", 3: " (N, rows, cols)"}


def read_idx(path: str | os.PathLike[str], *, ndim: int | None = None) -> np.ndarray:
    """Read an IDX file (gzip-compressed or raw, told apart by content) into a native array.

    The array has the shape the header declares, native byte order and C order. `ndim`, when
    given, is the number of dimensions the caller needs. Every problem raises IDXError, whose
    message starts with the path.
    """
    path = Path(path)
    try:
        file = open(path, "rb")
    except FileNotFoundError:
        raise IDXError(f"{path}: no such file, expected an IDX file") from None
    except IsADirectoryError:
        raise IDXError(f"{path}: is a directory, expected an IDX file") from None
    except OSError as exc:
        raise IDXError(f"{path}: cannot open ({exc.strerror or exc})") from exc
    with file:
        try:
            if file.peek(2)[:2] == _GZIP_MAGIC:
                return _read_gzip(file, path, ndim)
            # Only a regular file's size is meaningful; anything else is read as a stream.
            info = os.fstat(file.fileno())
            size = info.st_size if stat.S_ISREG(info.st_mode) else None
            return _parse(file, path, ndim, size)
        except IsADirectoryError:
            raise IDXError(f"{path}: is a directory, expected an IDX file") from None
        except OSError as exc:
            raise IDXError(f"{path}: cannot read ({exc.strerror or exc})") from exc


def _read_gzip(file: BinaryIO, path: Path, ndim: int | None) -> np.ndarray:
    try:
        with gzip.GzipFile(fileobj=file, mode="rb") as stream:
            return _parse(stream, path, ndim, None)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        problem = f"corrupt gzip data ({exc}), expected a complete gzip stream"
        raise IDXError(f"{path}: {problem}") from exc


def _parse(stream: BinaryIO, path: Path, ndim: int | None, size: int | None) -> np.ndarray:
    head = _read_exactly(stream, 4)
    if not head:
        raise IDXError(f"{path}: file is empty, expected an IDX header")
    if len(head) < 4:
        raise IDXError(f"{path}: header is {len(head)} bytes, expected at least 4")
    if head[:2] != b"\0\0":
        hint = ""
        if path.name.endswith(".gz"):
            hint = " (the name ends in .gz but the content is not gzip-compressed)"
        raise IDXError(
            f"{path}: not an IDX file: starts with bytes {head.hex(' ')}, "
            f"expected 00 00, a dtype code and a dims count{hint}"
        )
    code, count = head[2], head[3]
    dtype = DTYPES.get(code)
    if dtype is None:
        raise IDXError(f"{path}: unknown dtype code 0x{code:02x}, expected one of {_CODES}")
    if not 1 <= count <= MAX_DIMS:
        raise IDXError(f"{path}: header declares {count} dims, expected 1 to {MAX_DIMS}")
    header_size = 4 + 4 * count
    raw_dims = _read_exactly(stream, 4 * count)
    if len(raw_dims) < 4 * count:
        raise IDXError(
            f"{path}: header declares {count} dims ({header_size} header bytes) "
            f"but the data ends after {4 + len(raw_dims)} bytes"
        )
    dims = struct.unpack(f">{count}I", raw_dims)
    if ndim is not None and count != ndim:
        raise IDXError(
            f"{path}: expected {ndim} dims{_AXES.get(ndim, '')}, found {count} ({_shape(dims)})"
        )
    expected = math.prod(dims) * dtype.itemsize
    available = None if size is None else size - header_size
    payload = _read_payload(stream, path, expected, available)
    try:
        array = np.frombuffer(payload, dtype=dtype).reshape(dims)
    except ValueError as exc:  # an empty payload with dims too large for numpy's index type
        raise IDXError(f"{path}: shape {_shape(dims)} cannot be represented ({exc})") from exc
    return array if dtype.isnative else array.astype(dtype.newbyteorder("="))


def _read_payload(stream: BinaryIO, path: Path, expected: int, available: int | None) -> bytearray:
    if available is not None:
        # The file size is known, so the declared size is checked before it is allocated.
        if available != expected:
            raise IDXError(f"{path}: payload is {available:,} bytes, header declares {expected:,}")
        buffer = bytearray(expected)
        got = stream.readinto(buffer)
        if got != expected:  # the file shrank while being read
            raise IDXError(f"{path}: payload is {got:,} bytes, header declares {expected:,}")
        return buffer
    # A stream's length is unknown until read, so the buffer grows with the data actually
    # there and stops one byte past the declared size: a gzip bomb cannot exhaust memory.
    buffer = bytearray()
    while len(buffer) <= expected:
        chunk = stream.read(min(_CHUNK, expected + 1 - len(buffer)))
        if not chunk:
            break
        buffer += chunk
    if len(buffer) > expected:
        size = f"{expected:,}"
        raise IDXError(f"{path}: payload is more than {size} bytes, header declares {size}")
    if len(buffer) < expected:
        raise IDXError(f"{path}: payload is {len(buffer):,} bytes, header declares {expected:,}")
    return buffer


def _read_exactly(stream: BinaryIO, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = stream.read(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _shape(dims: tuple[int, ...]) -> str:
    return " x ".join(f"{d:,}" for d in dims)


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write `array` as an IDX file, gzip-compressed when the name ends with .gz.

    The dtype must be one IDX can hold (uint8, int8, int16, int32, float32, float64, any byte
    order) and the array must have 1 to 8 dims. Problems raise IDXError naming the path.
    """
    path = Path(path)
    array = np.asarray(array)
    kind = (array.dtype.kind, array.dtype.itemsize)
    code = next((c for c, dt in DTYPES.items() if (dt.kind, dt.itemsize) == kind), None)
    if code is None:
        names = ", ".join(dt.name for dt in DTYPES.values())
        raise IDXError(f"{path}: cannot write dtype {array.dtype}, expected one of {names}")
    if not 1 <= array.ndim <= MAX_DIMS:
        raise IDXError(f"{path}: cannot write {array.ndim} dims, expected 1 to {MAX_DIMS}")
    if max(array.shape) >= 1 << 32:
        raise IDXError(f"{path}: shape {_shape(array.shape)} has a dim of 2**32 or more")
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = np.ascontiguousarray(array, dtype=DTYPES[code]).reshape(-1).view(np.uint8)
    try:
        with open(path, "wb") as file:
            if path.name.endswith(".gz"):
                # mtime=0 makes equal arrays give equal files, hence stable checksums.
                with gzip.GzipFile(fileobj=file, mode="wb", compresslevel=6, mtime=0) as stream:
                    stream.write(header)
                    stream.write(data)
            else:
                file.write(header)
                file.write(data)
    except OSError as exc:
        raise IDXError(f"{path}: cannot write ({exc.strerror or exc})") from exc
