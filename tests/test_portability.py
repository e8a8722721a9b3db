"""What differs on Windows, simulated here (the suite runs on Linux): the run folder's lock
through msvcrt, atomic writes without os.fchmod, a sweep's liveness check that must not
call os.kill, and the fused kernel's reason. Nothing here has run on Windows itself."""
from __future__ import annotations

import os
import sys
import types

import pytest

from lenet import files, fused, runs, sweep
from lenet.errors import RunFolderError


@pytest.fixture
def windows_locking(monkeypatch):
    """No fcntl; an msvcrt whose byte-range locks live in a dict, released when the file
    descriptor holding them is closed."""
    held: dict[tuple[int, int], int] = {}
    taken: list[int] = []

    def locking(fd, mode, nbytes):
        assert mode == fake.LK_NBLCK and nbytes == 1
        key = (os.fstat(fd).st_ino, os.lseek(fd, 0, os.SEEK_CUR))
        owner = held.get(key)
        if owner is not None and owner != fd:
            try:
                os.fstat(owner)
            except OSError:  # its holder closed it: released
                owner = None
        if owner is not None and owner != fd:
            raise OSError(36, "Resource deadlock avoided")
        held[key] = fd
        taken.append(key[1])

    fake = types.SimpleNamespace(LK_NBLCK=2, locking=locking)
    monkeypatch.setitem(sys.modules, "fcntl", None)
    monkeypatch.setitem(sys.modules, "msvcrt", fake)
    return taken


def test_the_run_folder_lock_through_msvcrt(tmp_path, windows_locking):
    first, second = runs.RunFolder(tmp_path / "run"), runs.RunFolder(tmp_path / "run")
    first.path.mkdir()
    first.lock()
    assert windows_locking == [runs._WINDOWS_LOCK_BYTE]  # past the text, which stays readable
    assert (first.path / ".lock").read_text() == f"pid {os.getpid()}\n"
    holder = rf"in use by another lenet train \(pid {os.getpid()}\)"
    with pytest.raises(RunFolderError, match=holder):
        second.lock()
    first.unlock()
    second.lock()  # released with its file descriptor
    second.unlock()


def test_atomic_write_without_os_fchmod(tmp_path, monkeypatch):
    monkeypatch.delattr(os, "fchmod", raising=False)
    target = tmp_path / "x.bin"
    files.atomic_write(target, lambda f: f.write(b"abc"))
    files.atomic_write(target, lambda f: f.write(b"defg"))
    assert target.read_bytes() == b"defg" and [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_on_windows_no_check_ends_a_worker(monkeypatch):
    def kill(pid, sig):
        raise AssertionError("os.kill on Windows terminates the process")

    monkeypatch.setattr(os, "kill", kill)
    monkeypatch.setattr(os, "name", "nt")
    try:
        assert sweep._alive(os.getpid() + 12345)  # cannot tell: assumed alive, left alone
    finally:
        monkeypatch.undo()
    assert not sweep._alive(2**22 + 7)  # here, a pid no process has is dead


def test_on_windows_the_fused_kernel_says_why_it_does_not_run(monkeypatch):
    monkeypatch.setattr(os, "name", "nt")
    try:
        reason = fused._machine_problem()
    finally:
        monkeypatch.undo()
    assert reason == "needs Linux or macOS with GCC or Clang (on Windows: WSL2)"
