"""Discovery, loading and verified downloads, against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest

from conftest import make_idx_folder
from lenet.data import sources
from lenet.data.idx import read_idx, write_idx
from lenet.data.sources import (
    DATASETS,
    STANDARD_FILES,
    cache_root,
    candidates,
    fetch,
    find_files,
    load,
    locate,
    status,
)
from lenet.errors import DataError, DownloadError, IDXError

FASHION = "fashion-mnist"
SYSTEM_FASHION = Path("/usr/share/datasets/fashion-mnist")


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --- discovery -------------------------------------------------------------------------------


@pytest.fixture
def small(tmp_path) -> Path:
    return make_idx_folder(tmp_path / "small", n_train=20, n_test=10)


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("LENET_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "lenet"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "lenet"
    monkeypatch.setenv("LENET_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"


def test_candidates_order(isolated_env, monkeypatch, tmp_path):
    assert candidates(FASHION) == [
        ("cache", isolated_env.cache / FASHION),
        ("system", isolated_env.system / FASHION),
    ]
    monkeypatch.setenv("LENET_DATA", str(tmp_path / "d"))
    labels = [label for label, _ in candidates(FASHION, tmp_path / "x")]
    assert labels == ["--data", "$LENET_DATA", "$LENET_DATA", "cache", "system"]
    assert candidates(FASHION)[:2] == [
        ("$LENET_DATA", tmp_path / "d" / FASHION),
        ("$LENET_DATA", tmp_path / "d"),
    ]


def test_discovery_order(isolated_env, monkeypatch, tmp_path, small):
    given = tmp_path / "given"
    places = {
        "--data": given,
        "$LENET_DATA": tmp_path / "env" / FASHION,
        "cache": isolated_env.cache / FASHION,
        "system": isolated_env.system / FASHION,
    }
    for folder in places.values():
        shutil.copytree(small, folder)
    monkeypatch.setenv("LENET_DATA", str(tmp_path / "env"))
    # Each is found once every folder before it in the order is gone.
    for label, folder in places.items():
        assert locate(FASHION, given) == (label, folder)
        shutil.rmtree(folder)
    assert locate(FASHION, given) is None


def test_lenet_data_may_point_at_the_data_set_folder_itself(isolated_env, monkeypatch, small):
    monkeypatch.setenv("LENET_DATA", str(small))
    assert locate(FASHION) == ("$LENET_DATA", small)
    assert load(FASHION, download=False).found_in == "$LENET_DATA"


def test_lenet_data_named_after_another_data_set_is_not_used(isolated_env, monkeypatch, tmp_path):
    mnist = make_idx_folder(tmp_path / "mnist", n_train=10, n_test=10)
    monkeypatch.setenv("LENET_DATA", str(mnist))
    assert locate(FASHION) is None
    assert locate("mnist") == ("$LENET_DATA", mnist)


def test_find_files_accepts_gz_raw_and_dotted_names(tmp_path, small):
    assert set(find_files(small)) == {"train_images", "train_labels", "test_images", "test_labels"}
    raw = make_idx_folder(tmp_path / "raw", n_train=10, n_test=10, gz=False)
    found = find_files(raw)
    assert found["train_images"] == raw / "train-images-idx3-ubyte"
    (raw / "train-images-idx3-ubyte").rename(raw / "train-images.idx3-ubyte")
    assert find_files(raw)["train_images"] == raw / "train-images.idx3-ubyte"
    (raw / "t10k-labels-idx1-ubyte").unlink()
    assert find_files(raw) is None
    assert find_files(tmp_path / "nowhere") is None


def test_status_reports_where_each_data_set_is(isolated_env, small):
    shutil.copytree(small, isolated_env.system / FASHION)
    rows = {row["name"]: row for row in status()}
    assert set(rows) == set(DATASETS)
    assert rows[FASHION]["found"] == ("system", isolated_env.system / FASHION)
    assert rows["mnist"]["found"] is None
    assert rows[FASHION]["candidates"] == candidates(FASHION)
    assert rows[FASHION]["cache"] == isolated_env.cache / FASHION


# --- loading a folder ------------------------------------------------------------------------


def test_load_folder(tiny_data):
    data = load(str(tiny_data))
    assert (data.name, data.found_in, data.folder) == ("tiny-data", "--data", tiny_data)
    assert data.classes == tuple("0123456789")
    assert data.train.images.shape == (600, 28, 28) and data.train.images.dtype == np.uint8
    assert data.test.images.shape == (200, 28, 28)
    assert data.train.labels.dtype == np.int64 and data.train.labels.shape == (600,)
    assert np.bincount(data.train.labels).tolist() == [60] * 10
    assert len(data.test) == 200


def test_load_accepts_a_path_object_and_raw_files(tmp_path):
    folder = make_idx_folder(tmp_path / "raw", n_train=30, n_test=10, classes=3, gz=False)
    data = load(folder)
    assert data.classes == ("0", "1", "2") and len(data.train) == 30


def test_classes_txt(tiny_data):
    (tiny_data / "classes.txt").write_text("\n".join(f"class {k}" for k in range(10)) + "\n\n")
    assert load(tiny_data).classes == tuple(f"class {k}" for k in range(10))
    (tiny_data / "classes.txt").write_text("a\nb\nc\n")
    with pytest.raises(DataError, match=r"labels-idx1-ubyte.gz: label \d+ at index .* 3 classes"):
        load(tiny_data)
    (tiny_data / "classes.txt").write_text("\n \n")
    with pytest.raises(DataError, match="classes.txt: holds no class names"):
        load(tiny_data)


def test_folder_named_after_a_registered_data_set_gets_its_classes(tmp_path):
    folder = make_idx_folder(tmp_path / FASHION, n_train=20, n_test=10)
    data = load(folder)
    assert data.name == FASHION and data.classes == DATASETS[FASHION].classes


def test_unknown_name():
    message = (
        "unknown data set 'foo': expected one of fashion-mnist, mnist, "
        "or a folder holding the four IDX files"
    )
    with pytest.raises(DataError) as info:
        load("foo")
    assert str(info.value) == message


def test_missing_folder_and_missing_file(tmp_path, small):
    with pytest.raises(DataError, match="no such folder"):
        load(tmp_path / "absent")
    (small / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=f"^{small}: missing t10k-labels-idx1-ubyte.gz"):
        load(small)


def test_label_count_mismatch(small):
    write_idx(small / "train-labels-idx1-ubyte.gz", np.zeros(19, dtype=np.uint8))
    with pytest.raises(DataError) as info:
        load(small)
    message = str(info.value)
    assert "train-labels-idx1-ubyte.gz: holds 19 labels" in message
    assert "train-images-idx3-ubyte.gz holds 20 images" in message


def test_label_out_of_range(tiny_data):
    labels = read_idx(tiny_data / "t10k-labels-idx1-ubyte.gz").copy()
    labels[5] = 10
    write_idx(tiny_data / "t10k-labels-idx1-ubyte.gz", labels)
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz: label 10 at index 5 .*10 cla"):
        load(tiny_data)


def test_image_sizes_must_match(small):
    write_idx(small / "t10k-images-idx3-ubyte.gz", np.zeros((10, 32, 32), dtype=np.uint8))
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz: images are 32x32 pixels"):
        load(small)


def test_images_must_be_3d_uint8_and_labels_1d(small):
    images = small / "train-images-idx3-ubyte.gz"
    write_idx(images, np.zeros((20, 28, 28), dtype=np.float32))
    with pytest.raises(IDXError, match=f"^{images}: images are float32, expected uint8"):
        load(small)
    write_idx(images, np.zeros((20, 784), dtype=np.uint8))
    with pytest.raises(IDXError, match=r"expected 3 dims \(N, rows, cols\), found 2"):
        load(small)


def test_empty_split(small):
    write_idx(small / "t10k-images-idx3-ubyte.gz", np.zeros((0, 28, 28), dtype=np.uint8))
    write_idx(small / "t10k-labels-idx1-ubyte.gz", np.zeros(0, dtype=np.uint8))
    with pytest.raises(DataError, match="holds no images, expected at least 1"):
        load(small)


# --- downloads -------------------------------------------------------------------------------


@pytest.fixture
def closed_url():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def assert_same_files(dest: Path, source: Path):
    assert listing(dest) == sorted(STANDARD_FILES.values())
    for name in STANDARD_FILES.values():
        assert (dest / name).read_bytes() == (source / name).read_bytes()


def test_fetch_downloads_and_verifies(isolated_env, published, tmp_path):
    lines: list[str] = []
    dest = tmp_path / "a" / "b"
    assert fetch(published.info, dest, report=lines.append) == dest
    assert_same_files(dest, published.folder)
    assert any(line.startswith("downloading train-images-idx3-ubyte.gz (") for line in lines)
    assert sum(line.startswith("verified md5 of") for line in lines) == 4
    mask = os.umask(0o022)
    os.umask(mask)
    for f in dest.iterdir():  # readable by the others a shared cache serves, as umask allows
        assert f.stat().st_mode & 0o777 == 0o666 & ~mask, f

    asked = len(published.server.requests)
    fetch(published.info, dest)
    assert len(published.server.requests) == asked


def test_fetch_defaults_to_the_cache(isolated_env, published):
    assert fetch(published.info) == isolated_env.cache / "toy"
    assert_same_files(isolated_env.cache / "toy", published.folder)


def test_fetch_replaces_a_file_with_the_wrong_md5(isolated_env, published, tmp_path):
    dest = tmp_path / "dest"
    fetch(published.info, dest)
    (dest / "train-labels-idx1-ubyte.gz").write_bytes(b"stale")
    asked = len(published.server.requests)
    fetch(published.info, dest)
    assert published.server.requests[asked:] == ["/toy/train-labels-idx1-ubyte.gz"]
    assert_same_files(dest, published.folder)


def test_wrong_checksum_is_rejected_and_leaves_nothing(isolated_env, published, tmp_path):
    name = "train-images-idx3-ubyte.gz"
    info = dataclasses.replace(published.info, md5={**published.info.md5, name: "0" * 32})
    dest = tmp_path / "dest"
    with pytest.raises(DownloadError) as caught:
        fetch(info, dest)
    message = str(caught.value)
    assert message.startswith(f"{name}: ")
    assert f"{published.server.url}toy/{name}" in message
    assert f"expected md5 {'0' * 32}, got {published.info.md5[name]}" in message
    assert listing(dest) == []


def test_falls_back_when_a_mirror_404s_or_serves_a_bad_file(isolated_env, published, tmp_path):
    bad = published.server.root / "bad"
    shutil.copytree(published.folder, bad)
    (bad / "t10k-images-idx3-ubyte.gz").write_bytes(b"corrupt")
    url = published.server.url
    lines: list[str] = []
    dest = fetch(
        published.info,
        tmp_path / "dest",
        mirrors=(url + "missing/", url + "bad", url + "toy/"),
        report=lines.append,
    )
    assert_same_files(dest, published.folder)
    assert any("missing/train-images-idx3-ubyte.gz: HTTP 404" in line for line in lines)
    assert any("bad/t10k-images-idx3-ubyte.gz: expected md5" in line for line in lines)


def test_every_mirror_failing_names_each_url(isolated_env, published, tmp_path, closed_url):
    dest = tmp_path / "cache" / "dest"
    lines: list[str] = []
    with pytest.raises(DownloadError) as caught:
        fetch(published.info, dest, mirrors=(closed_url, published.server.url + "missing/"),
              report=lines.append)
    message = str(caught.value)
    assert f"{closed_url}train-images-idx3-ubyte.gz: " in message
    assert "missing/train-images-idx3-ubyte.gz: HTTP 404" in message
    assert message.endswith("; offline? give the files with --data DIR, or point "
                            "$LENET_MIRROR at a mirror or folder")
    # The first failure is said as it happens (another mirror follows); the last only in
    # the error, not twice.
    assert sum("missing/train-images" in line for line in lines) == 0
    assert sum(closed_url in line for line in lines) == 1
    assert not (tmp_path / "cache").exists()  # made for the download, left empty: removed


def test_unreachable_mirror(isolated_env, published, tmp_path, closed_url):
    with pytest.raises(DownloadError, match="Connection refused|refused"):
        fetch(published.info, tmp_path / "dest", mirrors=(closed_url,), timeout=5)


def test_lenet_mirror_is_tried_first(isolated_env, published, monkeypatch, tmp_path, closed_url):
    monkeypatch.setenv("LENET_MIRROR", published.server.url)
    fetch(published.info, tmp_path / "dest", mirrors=(closed_url,))
    assert_same_files(tmp_path / "dest", published.folder)
    # A plain folder laid out like the cache works as a mirror too.
    monkeypatch.setenv("LENET_MIRROR", str(published.server.root))
    fetch(published.info, tmp_path / "dest2", mirrors=())
    assert_same_files(tmp_path / "dest2", published.folder)


def test_an_interrupted_download_leaves_nothing(isolated_env, published, tmp_path):
    def interrupt(line: str) -> None:
        if line.startswith("downloading"):
            raise KeyboardInterrupt

    dest = tmp_path / "dest"
    with pytest.raises(KeyboardInterrupt):
        fetch(published.info, dest, report=interrupt)
    assert listing(dest) == []


def test_registry_entries_are_hashable_and_read_only():
    info = DATASETS["mnist"]
    assert hash(info) == hash(dataclasses.replace(info))
    with pytest.raises(TypeError):
        info.md5["train-images-idx3-ubyte.gz"] = "0" * 32  # type: ignore[index]


def test_unwritable_destination(isolated_env, published, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(DataError, match=f"^{blocker / 'data'}: cannot create"):
        fetch(published.info, blocker / "data")


def test_load_downloads_a_registered_data_set(isolated_env, published, monkeypatch):
    registered = dataclasses.replace(
        DATASETS[FASHION], md5=published.info.md5, mirrors=published.info.mirrors
    )
    monkeypatch.setitem(sources.DATASETS, FASHION, registered)
    lines: list[str] = []
    data = load(FASHION, report=lines.append)
    assert (data.found_in, data.folder) == ("downloaded", isolated_env.cache / FASHION)
    assert data.classes[0] == "T-shirt/top" and data.train.images.shape == (60, 28, 28)
    assert any("verified" in line for line in lines)
    assert load(FASHION).found_in == "cache"


def test_load_without_download_explains_where_it_looked(isolated_env):
    with pytest.raises(DataError) as caught:
        load(FASHION, download=False)
    message = str(caught.value)
    assert str(isolated_env.cache / FASHION) in message
    assert str(isolated_env.system / FASHION) in message
    assert "lenet data fetch fashion-mnist" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "\n" not in message


# --- the real data set, when Debian's dataset-fashion-mnist is installed ----------------------


@pytest.mark.slow
@pytest.mark.skipif(find_files(SYSTEM_FASHION) is None, reason="needs dataset-fashion-mnist")
def test_real_fashion_mnist_from_the_system(isolated_env, monkeypatch):
    monkeypatch.setattr(sources, "SYSTEM_DATASETS", SYSTEM_FASHION.parent)
    data = load(FASHION, download=False)
    assert (data.found_in, data.folder) == ("system", SYSTEM_FASHION)
    assert data.train.images.shape == (60000, 28, 28)
    assert data.test.images.shape == (10000, 28, 28)
    assert data.train.labels.min() >= 0 and data.test.labels.max() <= 9
    assert np.bincount(data.train.labels).tolist() == [6000] * 10
