"""The README's picture of `lenet serve`: serve one or two trained runs, open the page in
Debian's chromium (headless, via Playwright), show a test image of a class, screenshot.

    .venv/bin/python scripts/serve_screenshot.py RUN_DIR [RUN_DIR2] [--class Coat] [--index 3388]
        [--out docs/images/serve.png]
"""
from __future__ import annotations

import argparse
import threading
import time

from lenet import serve
from lenet.data import sources

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--class", dest="cls", default="Coat", help="class shown in the select")
    p.add_argument("--index", type=int, default=3388, help="test image shown (a Coat)")
    p.add_argument("--out", default="docs/images/serve.png")
    a = p.parse_args()
    models = [serve.load_served(r) for r in a.runs]
    test = sources.load(models[0].run.config.data.name, download=False).test
    sock = serve.bind("127.0.0.1", 0)
    server = serve.server(serve.create_app(models, test))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    from playwright.sync_api import expect, sync_playwright

    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                         args=ARGS)
            page = browser.new_page(viewport={"width": 1500, "height": 680})
            page.goto(serve.url(sock))
            expect(page.locator("#status")).to_contain_text("random")
            page.select_option("#class", a.cls)
            page.evaluate("i => example(`?index=${i}`, 'example')", a.index)  # app.js
            expect(page.locator("#status")).to_contain_text(f"test image #{a.index},")
            page.mouse.move(1, 1)  # no hover shading in the picture
            page.screenshot(path=a.out, full_page=True)
            browser.close()
    finally:
        server.should_exit = True
        thread.join(10)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
