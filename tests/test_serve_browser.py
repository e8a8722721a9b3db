"""`lenet serve` end to end in a real browser: Debian's chromium driven by Playwright
(never `playwright install`: it downloads a browser). In CI a missing browser fails."""
from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from conftest import make_idx_folder
from lenet import cli, serve
from lenet.data import sources
from test_report import assert_picture, trained_tiny_run

CHROMIUM = Path("/usr/bin/chromium")
# Headless, and no calls home: updates, sync, field trials, first-run pages.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync",
                 "--disable-default-apps", "--disable-extensions"]


def _missing(why: str):
    if os.environ.get("CI"):
        pytest.fail(f"{why} (CI must install it: see .ci/run)")
    pytest.skip(why)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        _missing(f"{CHROMIUM} is not installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed (pip install -e '.[test]')")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@contextlib.contextmanager
def serving(runs: list, test):
    """A real uvicorn in a thread on a free port serving `runs` side by side; yields its URL."""
    sock = serve.bind("127.0.0.1", 0)
    server = serve.server(serve.create_app(runs, test))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield serve.url(sock)
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """The tiny run served twice, side by side."""
    run = trained_tiny_run(tmp_path_factory)
    served = serve.load_served(run)
    with serving([served, served],
                 sources.load(served.run.config.data.name, download=False).test) as url:
        yield url


@pytest.mark.slow
def test_draw_pick_upload_and_keyboard_in_chromium(browser, live, tmp_path):
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1560, "height": 1000})
    outside, problems = [], []
    page.on("request", lambda r: r.url.startswith(live) or outside.append(r.url))
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("console", lambda m: m.type == "error" and problems.append(m.text))
    status = page.locator("#status")

    def probabilities(col: int = 0) -> str:
        return page.locator(f"#m{col}").get_attribute("data-probabilities") or ""

    def changed(before: str, col: int = 0) -> str:
        page.wait_for_function("([sel, old]) => (document.querySelector(sel).dataset"
                               ".probabilities || '') !== old", arg=[f"#m{col}", before])
        return probabilities(col)

    def sees(col: int = 0) -> str:
        return page.eval_on_selector(f"#m{col} .sees canvas", "c => c.toDataURL()")

    page.goto(live)
    expect(status).to_contain_text("random: test image #")  # the page opens on an example
    for col in (0, 1):
        assert len(probabilities(col).split(",")) == 10
        expect(page.locator(f"#m{col} .maps.conv1 canvas")).to_have_count(6)
        expect(page.locator(f"#m{col} .maps.conv2 canvas")).to_have_count(16)
        expect(page.locator(f"#m{col} .answer")).to_contain_text("%")
        expect(page.locator(f"#m{col} .bars li.best")).to_have_count(1)
        bar = page.eval_on_selector(f"#m{col} .bars li.best .fill",
                                    "e => e.getBoundingClientRect().width")
        assert bar > 5  # the top class's bar is drawn, not only its number
    # Every feature map was painted, and each picture says what it is.
    painted = page.eval_on_selector_all(
        "#m0 .maps canvas", "cs => cs.map(c => c.getContext('2d').getImageData(0, 0, c.width, "
        "c.height).data.some((v, i) => i % 4 === 3 && v > 0))")
    assert painted == [True] * 22
    labels = page.eval_on_selector_all("canvas[role=img]", "cs => cs.map(c => c.ariaLabel ||"
                                       " c.getAttribute('aria-label'))")
    assert len(labels) == 1 + 2 * 23 and all(labels)

    page.click("#clear")
    expect(status).to_have_text("cleared")
    before, seen = probabilities(), sees()
    box = page.locator("#pad").bounding_box()

    def stroke(points):
        page.mouse.move(box["x"] + points[0][0], box["y"] + points[0][1])
        page.mouse.down()
        for x, y in points[1:]:
            page.mouse.move(box["x"] + x, box["y"] + y, steps=8)
        page.mouse.up()

    stroke([(60, 70), (220, 70)])  # a bar near the top
    first = changed(before)
    expect(status).to_have_text("your drawing")
    assert sees() != seen
    seen = sees()
    # Another stroke: the page answers while it is drawn, before the button is released.
    page.mouse.move(box["x"] + 140, box["y"] + 90)
    page.mouse.down()
    page.mouse.move(box["x"] + 140, box["y"] + 250, steps=12)
    changed(first)
    page.mouse.up()
    assert sees() != seen
    assert changed(first, 1) != first  # the second run answers the same input

    before = probabilities()
    page.click("#noise")
    expect(status).to_have_text("uniform noise")
    before = changed(before)
    page.select_option("#class", "Trouser")
    page.click("#example")
    expect(status).to_contain_text("a Trouser")
    changed(before)

    im = Image.new("RGB", (120, 200), "white")
    ImageDraw.Draw(im).rectangle((30, 10, 90, 190), fill=(20, 20, 20))
    im.save(tmp_path / "upload.png")
    page.set_input_files("#file", str(tmp_path / "upload.png"))
    expect(status).to_have_text("uploaded upload.png")
    (np.asarray(Image.open(tmp_path / "upload.png")))  # still readable: not moved or locked
    # A PNG saved without its suffix (the browser gives it no type) is still an image; a
    # file that is none is refused on the page, not sent as raw pixels.
    before = probabilities()
    (tmp_path / "shoe").write_bytes((tmp_path / "upload.png").read_bytes())
    (tmp_path / "notes").write_text("not an image")
    page.click("#noise")
    expect(status).to_have_text("uniform noise")
    before = changed(before)
    page.set_input_files("#file", str(tmp_path / "shoe"))
    expect(status).to_have_text("uploaded shoe")
    before = changed(before)
    page.set_input_files("#file", str(tmp_path / "notes"))
    expect(status).to_have_text("notes: not a PNG, JPEG, GIF, BMP or WebP image")
    assert probabilities() == before

    # The photos far from the training data: a button each, and `p` for the next one.
    expect(page.locator("#photos button")).to_have_text(["cat", "cup", "rocket"])
    before, seen = probabilities(), sees()
    page.click("#photo-cup")
    expect(status).to_have_text("photo: cup")
    before = changed(before)
    assert sees() != seen
    pad_lit = ("() => { const c = document.querySelector('#pad'); return c.getContext('2d')"
               ".getImageData(0, 0, c.width, c.height).data.filter((v, i) => i % 4 < 3)"
               ".reduce((a, v) => a + v, 0) }")
    on_pad = page.evaluate(pad_lit)
    page.keyboard.press("p")
    expect(status).to_have_text("photo: rocket")
    changed(before)
    assert page.evaluate(pad_lit) != on_pad  # the photo is drawn on the pad too

    page.focus("#random")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "noise"
    page.keyboard.press("Enter")
    expect(status).to_have_text("uniform noise")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "blank"
    page.keyboard.press("Space")
    expect(status).to_have_text("blank (all zeros)")
    page.keyboard.press("n")  # a shortcut
    expect(status).to_have_text("uniform noise")

    shot = tmp_path / "serve.png"
    page.screenshot(path=str(shot), full_page=True)
    assert_picture(shot, (1200, 600), (3000, 3000))
    page.set_viewport_size({"width": 420, "height": 900})  # a phone: no sideways scrolling
    assert page.evaluate("document.documentElement.scrollWidth") <= 420
    assert outside == [] and problems == []
    page.close()


@pytest.mark.slow
def test_many_classes_show_the_ten_most_likely_most_likely_first(browser, tmp_path):
    """15 classes (EMNIST has up to 62): ten bars, ordered by probability, and a note."""
    from playwright.sync_api import expect

    data = make_idx_folder(tmp_path / "data", n_train=150, n_test=45, classes=15)
    run = tmp_path / "run"
    assert cli.main(["train", "--data", str(data), "--epochs", "1", "--batch-size", "50",
                     "--out", str(run), "--no-progress"]) == 0
    with serving([serve.load_served(run)], sources.load(str(data)).test) as url:
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        problems = []
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.goto(url)
        expect(page.locator("#status")).to_contain_text("random: test image #")
        expect(page.locator("#m0 .more")).to_have_text("the 10 most likely of 15 classes")
        for press in ("", "n", "b"):  # an example, uniform noise, a blank
            before = page.get_attribute("#m0", "data-probabilities")
            if press:
                page.keyboard.press(press)
                page.wait_for_function("old => document.querySelector('#m0').dataset"
                                       ".probabilities !== old", arg=before)
            p = [float(x) for x in page.get_attribute("#m0", "data-probabilities").split(",")]
            expect(page.locator("#m0 .bars li:visible")).to_have_count(10)
            shown = page.eval_on_selector_all(
                "#m0 .bars li:not([hidden])",
                "ls => ls.map(l => [l.dataset.class, l.getBoundingClientRect().top])")
            expected = sorted(range(15), key=lambda k: (-p[k], k))[:10]
            assert [c for c, _ in sorted(shown, key=lambda t: t[1])] == [str(k) for k in expected]
            assert page.get_attribute("#m0 .bars li.best", "data-class") == str(expected[0])
        assert problems == []
        page.close()
