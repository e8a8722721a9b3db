"""The IDX reader is strict: every malformed file raises IDXError naming it, and fast."""

from __future__ import annotations

import gzip
import struct
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lenet.data.idx import read_idx, write_idx
from lenet.errors import DataError, IDXError

DTYPES = ["uint8", "int8", ">i2", "<i2", ">i4", "int32", ">f4", "float32", ">f8", "float64"]


def header(code: int, dims: tuple[int, ...]) -> bytes:
    return bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)


def put(path: Path, data: bytes, gz: bool = False) -> Path:
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip(tmp_path, dtype, gz):
    rng = np.random.default_rng(1)
    array = (rng.normal(size=(3, 4, 5)) * 100).astype(dtype)
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    write_idx(path, array)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == gz
    back = read_idx(path, ndim=3)
    np.testing.assert_array_equal(back, array)
    assert back.dtype == np.dtype(dtype).newbyteorder("=")
    assert back.dtype.isnative and back.flags.c_contiguous


def test_round_trip_keeps_1d_and_8d(tmp_path):
    for shape in [(7,), (1, 2, 1, 2, 1, 2, 1, 2), (0, 5)]:
        array = np.arange(int(np.prod(shape)), dtype=np.uint8).reshape(shape)
        write_idx(tmp_path / "a.idx", array)
        np.testing.assert_array_equal(read_idx(tmp_path / "a.idx"), array)


def test_gz_is_recognised_by_content_not_name(tmp_path):
    array = np.arange(12, dtype=np.int32).reshape(3, 4)
    data = header(0x0C, (3, 4)) + array.astype(">i4").tobytes()
    np.testing.assert_array_equal(read_idx(put(tmp_path / "plain.idx", data, gz=True)), array)
    np.testing.assert_array_equal(read_idx(put(tmp_path / "raw.gz", data)), array)


def test_write_rejects_what_idx_cannot_hold(tmp_path):
    with pytest.raises(IDXError, match="cannot write dtype int64"):
        write_idx(tmp_path / "a.idx", np.zeros(3, dtype=np.int64))
    with pytest.raises(IDXError, match="cannot write 0 dims"):
        write_idx(tmp_path / "a.idx", np.uint8(3))
    with pytest.raises(IDXError, match="a.idx: cannot write"):
        write_idx(tmp_path / "no-such-folder" / "a.idx", np.zeros(3, dtype=np.uint8))


U8 = 0x08
MALFORMED = {
    "empty": (b"", "file is empty"),
    "short header": (b"\0\0", "header is 2 bytes, expected at least 4"),
    "wrong magic": (b"\1\0\x08\x01" + bytes(8), "not an IDX file: starts with bytes 01 00 08 01"),
    "unknown dtype": (b"\0\0\x0a\x01" + bytes(8), "unknown dtype code 0x0a"),
    "zero dims": (b"\0\0\x08\x00", "declares 0 dims, expected 1 to 8"),
    "too many dims": (header(U8, (1,) * 9) + b"\0", "declares 9 dims, expected 1 to 8"),
    "truncated dims": (header(U8, (2, 3, 4))[:10], "declares 3 dims (16 header bytes)"),
    "short payload": (header(U8, (10,)) + bytes(9), "payload is 9 bytes, header declares 10"),
    "long payload": (header(U8, (10,)) + bytes(11), "bytes, header declares 10"),
    "short int32": (header(0x0C, (5,)) + bytes(19), "header declares 20"),
}


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_files_raise_idx_error_naming_the_file(tmp_path, case, gz):
    data, problem = MALFORMED[case]
    path = put(tmp_path / "bad-file.idx", data, gz=gz)
    with pytest.raises(IDXError) as info:
        read_idx(path)
    assert str(info.value).startswith(f"{path}: ")
    assert problem in str(info.value)


def test_ndim_mismatch_names_the_expected_axes(tmp_path):
    path = put(tmp_path / "labels.idx", header(U8, (4, 2)) + bytes(8))
    with pytest.raises(IDXError, match=r"expected 3 dims \(N, rows, cols\), found 2 \(4 x 2\)"):
        read_idx(path, ndim=3)
    assert read_idx(path, ndim=2).shape == (4, 2)


def test_missing_file_and_directory(tmp_path):
    missing = tmp_path / "nope.gz"
    with pytest.raises(IDXError, match=f"^{missing}: no such file"):
        read_idx(missing)
    with pytest.raises(IDXError, match=f"^{tmp_path}: is a directory"):
        read_idx(tmp_path)
    assert issubclass(IDXError, DataError)


def valid_gz(array: np.ndarray) -> bytes:
    return gzip.compress(header(U8, array.shape) + array.tobytes(), mtime=0)


def test_gzip_with_bad_crc(tmp_path):
    data = bytearray(valid_gz(np.arange(100, dtype=np.uint8)))
    data[-8] ^= 0xFF  # the CRC32 in the trailer
    path = put(tmp_path / "crc.gz", bytes(data))
    with pytest.raises(IDXError, match=f"^{path}: corrupt gzip data .*CRC"):
        read_idx(path)


def test_truncated_gzip(tmp_path):
    data = valid_gz(np.arange(1000, dtype=np.uint8) % 7)
    path = put(tmp_path / "cut.gz", data[: len(data) // 2])
    with pytest.raises(IDXError, match=f"^{path}: corrupt gzip data"):
        read_idx(path)


def test_gzip_with_corrupt_deflate_stream(tmp_path):
    data = bytearray(valid_gz(np.arange(1000, dtype=np.uint8) % 7))
    data[12:20] = b"\xff" * 8
    path = put(tmp_path / "garbled.gz", bytes(data))
    with pytest.raises(IDXError, match=f"^{path}: "):
        read_idx(path)


def test_text_file_named_gz(tmp_path):
    path = put(tmp_path / "train-images-idx3-ubyte.gz", b"<html>404 Not Found</html>\n")
    with pytest.raises(IDXError, match="name ends in .gz but the content is not gzip"):
        read_idx(path)


def peak_bytes(action) -> int:
    tracemalloc.start()
    try:
        action()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_absurd_dims_fail_fast_without_allocating(tmp_path, gz):
    path = put(tmp_path / "huge.idx", header(U8, (2**31, 2**31)) + bytes(100), gz=gz)
    start = time.perf_counter()

    def read():
        with pytest.raises(IDXError, match="header declares 4,611,686,018,427,387,904"):
            read_idx(path)

    assert peak_bytes(read) < 1 << 20
    assert time.perf_counter() - start < 1


def test_gzip_bomb_stops_at_the_declared_size(tmp_path):
    bomb = gzip.compress(header(U8, (10,)) + bytes(30_000_000), compresslevel=1, mtime=0)
    path = put(tmp_path / "bomb.gz", bomb)

    def read():
        with pytest.raises(IDXError, match="payload is more than 10 bytes, header declares 10$"):
            read_idx(path)

    assert peak_bytes(read) < 4 << 20


def test_real_size_uint8_is_read_without_extra_copies(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, size=(1000, 28, 28), dtype=np.uint8)
    for name in ("a.idx", "a.idx.gz"):
        write_idx(tmp_path / name, array)
        result: list[np.ndarray] = []
        peak = peak_bytes(lambda n=name, out=result: out.append(read_idx(tmp_path / n)))
        np.testing.assert_array_equal(result[0], array)
        assert peak < 2 * array.nbytes + (2 << 20)


def samples() -> list[bytes]:
    rng = np.random.default_rng(2)
    out = []
    for code, dtype in [(0x08, "u1"), (0x0B, ">i2"), (0x0D, ">f4")]:
        array = rng.integers(0, 100, size=(2, 3)).astype(dtype)
        raw = header(code, array.shape) + array.tobytes()
        out += [raw, gzip.compress(raw, mtime=0)]
    return out


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(samples())))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "append", "insert"]))
        at = draw(st.integers(0, len(data)))
        if kind == "flip" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[at:]
        elif kind == "append":
            data += draw(st.binary(max_size=8))
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
    return bytes(data)


# The reliability guarantee: >= 10,000 generated and mutated inputs per run, and each one
# ends as an array or an IDXError naming the file, never another exception.
@settings(
    max_examples=10_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.one_of(st.binary(max_size=64), mutated()))
def test_arbitrary_bytes_give_an_array_or_idx_error(tmp_path, data):
    path = put(tmp_path / "fuzz.idx.gz", data)
    try:
        array = read_idx(path)
    except IDXError as exc:
        assert str(exc).startswith(f"{path}: ")
    else:
        assert isinstance(array, np.ndarray) and array.dtype.isnative
