"""The helper process behind plots.CurvePainter: `lenet train` starts it first thing, so it
imports matplotlib (~0.6 s) on the second core while the trainer imports torch and reads
the data on the first; the trainer then waits only for the drawing itself.

Protocol, one line each way: a JSON request {"history": [[epoch, train_loss, train_acc,
test_acc], ...], "path": ..., "title": ...} on stdin; "ok", or "error: ..." (the trainer
then draws the picture itself, and reports the error as it would have), on stdout. It ends
when stdin closes. Imports neither torch nor the rest of lenet's training code."""
from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from types import SimpleNamespace


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle
    from lenet import plots

    plots.pyplot()
    for line in sys.stdin:
        try:
            request = json.loads(line)
            history = [SimpleNamespace(epoch=e, train_loss=loss, train_acc=acc, test_acc=test)
                       for e, loss, acc, test in request["history"]]
            plots.training_curves(history, Path(request["path"]), title=request["title"])
            reply = "ok"
        except Exception as e:  # noqa: BLE001 - any failure: the trainer draws it itself
            reply = "error: " + " ".join(str(e).split())
        print(reply, flush=True)


if __name__ == "__main__":
    main()
