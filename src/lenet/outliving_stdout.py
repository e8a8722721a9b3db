"""stdout for the verbs whose work is worth more than their output (train, sweep): when its
reader goes away (`lenet train | head`), the rest of the output is thrown away and the work
goes on. No torch here: `lenet train` enters it before torch's import."""
from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Iterator


class _OutlivesItsReader:
    """Writes through to the stream until a write or flush meets a broken pipe, then drops
    the rest; a run's lines are all in its log.txt anyway."""

    def __init__(self, stream):
        self._stream = stream
        self._gone = False

    def write(self, text: str) -> int:
        if not self._gone:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._reader_left()
        return len(text)

    def flush(self) -> None:
        if not self._gone:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._reader_left()

    def _reader_left(self) -> None:
        self._gone = True
        # What the stream still buffers must reach somewhere quietly: its flush at exit
        # would otherwise raise again.
        with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
            null = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(null, self._stream.fileno())
            finally:
                os.close(null)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextlib.contextmanager
def output_outlives_reader() -> Iterator[None]:
    """Within it, a reader of stdout that leaves does not stop the work (see above)."""
    saved = sys.stdout
    if saved is not None and not isinstance(saved, _OutlivesItsReader):
        sys.stdout = _OutlivesItsReader(saved)
    try:
        yield
    finally:
        sys.stdout = saved
