"""Bounded load test of `lenet serve` on loopback: N requests from C concurrent clients,
half a drawing as the page sends it (its 280x280 pad as a 140x140 PNG), half a raw 28x28
image; prints p50/p99 latency and the errors.

    python benchmarks/serve_load.py RUN_DIR [--requests 1000] [--concurrency 4]
    python benchmarks/serve_load.py --url http://127.0.0.1:8000/   # a server already running

Without --url it starts `lenet serve RUN_DIR --port 0` itself and stops it afterwards.
"""
from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import numpy as np
from PIL import Image, ImageDraw


def bodies() -> list[tuple[bytes, str]]:
    im = Image.new("RGBA", (140, 140), "white")  # what a canvas's toBlob gives
    ImageDraw.Draw(im).line((30, 25, 70, 115, 110, 25), fill="black", width=9)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    rng = np.random.default_rng(0)
    raw = np.zeros((28, 28), np.uint8)
    raw[4:24, 8:20] = rng.integers(120, 256, (20, 12), dtype=np.uint8)
    return [(buf.getvalue(), "image/png"), (raw.tobytes(), "application/octet-stream")]


def start_server(run_dir: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "lenet", "serve", run_dir, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        found = re.search(r" at (http://\S+/) ", line)
        if found:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, found[1]
        print(line, end="", file=sys.stderr)
    raise SystemExit(f"lenet serve did not start (exit {proc.wait()})")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", nargs="?", metavar="RUN_DIR")
    p.add_argument("--url", help="a server already running (default: start one)")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=4)
    a = p.parse_args()
    if not (a.url or a.run):
        p.error("give RUN_DIR or --url")
    proc, url = (None, a.url) if a.url else start_server(a.run)
    try:
        return run_load(url, a.requests, a.concurrency)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)


def run_load(url: str, requests: int, concurrency: int) -> int:
    parts = urlsplit(url)
    work = bodies()
    local = threading.local()
    errors: list[str] = []

    def one(i: int) -> float:
        if not hasattr(local, "conn"):  # one keep-alive connection per client, as a browser
            local.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        body, kind = work[i % len(work)]
        t0 = time.perf_counter()
        try:
            local.conn.request("POST", "/api/predict", body, {"Content-Type": kind})
            r = local.conn.getresponse()
            data = r.read()
            if r.status != 200 or len(json.loads(data)["probabilities"]) < 2:
                errors.append(f"HTTP {r.status}: {data[:100]!r}")
        except (OSError, http.client.HTTPException, ValueError, KeyError) as e:
            errors.append(f"{type(e).__name__}: {e}")
            local.conn.close()
            del local.conn
        return (time.perf_counter() - t0) * 1000

    for i in range(20):  # warm up: first requests pay for lazy imports and allocations
        one(i)
    errors.clear()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        ms = np.array(list(pool.map(one, range(requests))))
    wall = time.perf_counter() - t0
    print(f"lenet serve load test: {requests:,} POST /api/predict ({len(work)} kinds "
          f"alternating: 140x140 RGBA PNG drawing, raw 28x28), {concurrency} concurrent, "
          f"on {os.cpu_count()} cores ({platform.processor() or platform.machine()})")
    print(f"latency ms: p50 {np.percentile(ms, 50):.1f}  p90 {np.percentile(ms, 90):.1f}  "
          f"p99 {np.percentile(ms, 99):.1f}  max {ms.max():.1f}; {requests / wall:,.0f} "
          f"requests/s; errors {len(errors)}")
    for e in sorted(set(errors))[:5]:
        print(f"  error: {e}")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
