"""A corpus of hand-made malformed data folders, each through `lenet train --data DIR`:
exit status 1 and one line on stderr naming the file and the problem, never a traceback."""
import gzip
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

from conftest import make_idx_folder
from lenet import cli
from lenet.data.idx import write_idx

TRAIN_IMAGES = "train-images-idx3-ubyte.gz"
TRAIN_LABELS = "train-labels-idx1-ubyte.gz"
TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
TEST_LABELS = "t10k-labels-idx1-ubyte.gz"


def idx(code: int, dims: tuple[int, ...], payload: bytes | None = None) -> bytes:
    head = bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)
    return head + (bytes(int(np.prod(dims))) if payload is None else payload)


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def bad_crc(data: bytes) -> bytes:
    z = bytearray(gz(data))
    z[-8] ^= 0xFF  # the CRC32 of the trailer
    return bytes(z)


NOISE = np.random.default_rng(0).integers(0, 256, 256 * 784, dtype=np.uint8).tobytes()

# name -> (file to replace, its new bytes or a callable(folder), text the error must contain)
CORPUS = {
    "wrong magic": (TRAIN_IMAGES, gz(b"\x01\x02\x08\x03" + bytes(40)), "not an IDX file"),
    "unknown dtype code": (TRAIN_IMAGES, gz(b"\0\0\x0a\x03" + bytes(40)), "dtype code 0x0a"),
    "zero dims": (TRAIN_LABELS, gz(b"\0\0\x08\x00"), "0 dims"),
    "too many dims": (TRAIN_LABELS, gz(idx(8, (1,) * 9)), "9 dims"),
    "header cut in the dims": (TRAIN_IMAGES, gz(b"\0\0\x08\x03\0\0\0\x40\0\0"), "header"),
    "payload shorter than declared": (TEST_IMAGES, gz(idx(8, (64, 28, 28))[:-5]),
                                      "header declares 50,176"),
    "payload longer than declared": (TEST_LABELS, gz(idx(8, (64,)) + b"\0\0"),
                                     "header declares 64"),
    "absurd dims 2^31 x 2^31": (TRAIN_IMAGES, gz(idx(8, (2**31, 2**31, 1), b"")),
                                "header declares"),
    "corrupt gzip (bad CRC)": (TRAIN_LABELS, bad_crc(idx(8, (256,))), "gzip"),
    "truncated gzip": (TRAIN_IMAGES, gz(idx(8, (256, 28, 28), NOISE))[:3000], "gzip"),
    "empty file": (TEST_LABELS, b"", "empty"),
    "text file named .gz": (TRAIN_LABELS, b"these are not the labels you want\n", "IDX"),
    "labels count != images count": (TRAIN_LABELS, gz(idx(8, (255,))), "255"),
    "labels outside the class range": (TEST_LABELS, gz(idx(8, (64,), bytes([42]) * 64)),
                                       "42"),
    "images not 2-D per example": (TRAIN_IMAGES, gz(idx(8, (256, 784))), "dims"),
    "images 4-D": (TRAIN_IMAGES, gz(idx(8, (256, 1, 28, 28))), "dims"),
    "labels 2-D": (TRAIN_LABELS, gz(idx(8, (256, 1))), "dims"),
    "float images": (TRAIN_IMAGES, gz(idx(0x0D, (256, 28, 28), bytes(256 * 784 * 4))),
                     "uint8"),
    "int32 labels": (TRAIN_LABELS, gz(idx(0x0C, (256,), bytes(256 * 4))), "uint8"),
    "train and test image sizes differ": (TEST_IMAGES, gz(idx(8, (64, 32, 32))), "32"),
    "no examples": (TEST_IMAGES, gz(idx(8, (0, 28, 28))), "0"),
    "missing file": (TEST_LABELS, None, TEST_LABELS.removesuffix(".gz")),
    "a folder where a file should be": (TRAIN_IMAGES, "dir", TRAIN_IMAGES),
    "non-square images": (None, "nonsquare", "28x27"),
}


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return make_idx_folder(tmp_path_factory.mktemp("good") / "data", n_train=256, n_test=64)


def make_case(good, folder, case):
    name, content, _ = CORPUS[case]
    shutil.copytree(good, folder)
    if content == "nonsquare":
        rng = np.random.default_rng(0)
        for prefix, n in (("train", 256), ("t10k", 64)):
            write_idx(folder / f"{prefix}-images-idx3-ubyte.gz",
                      rng.integers(0, 255, (n, 28, 27), dtype=np.uint8))
    elif content is None:
        (folder / name).unlink()
    elif content == "dir":
        (folder / name).unlink()
        (folder / name).mkdir()
    else:
        (folder / name).write_bytes(content)
    return folder


@pytest.mark.parametrize("case", CORPUS)
def test_each_malformed_folder_is_one_line(good, tmp_path, capsys, isolated_env, case):
    folder = make_case(good, tmp_path / "data", case)
    assert cli.main(["train", "--data", str(folder), "--epochs", "1",
                     "--out", str(tmp_path / "run"), "--no-progress"]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    expect_file, _, problem = CORPUS[case]
    assert str(folder / (expect_file or "")).rstrip("/") in lines[0] or str(folder) in lines[0]
    assert problem in lines[0], lines[0]
    assert not (tmp_path / "run" / "last.ckpt").exists()


def test_corpus_is_at_least_twenty_cases():
    assert len(CORPUS) >= 20


@pytest.mark.parametrize("case", ["absurd dims 2^31 x 2^31", "text file named .gz"])
def test_as_a_real_process_no_traceback(good, tmp_path, isolated_env, case):
    folder = make_case(good, tmp_path / "data", case)
    r = subprocess.run([sys.executable, "-m", "lenet", "train", "--data", str(folder),
                        "--out", str(tmp_path / "run")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and str(folder) in r.stderr
