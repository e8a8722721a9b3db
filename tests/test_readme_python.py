"""The README's "From Python" example runs as written, on the real Fashion-MNIST, and prints
what the README shows (the CLI's own figures for two epochs of the book recipe)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lenet.data import sources

README = Path(__file__).parents[1] / "README.md"
MARK = "<!-- python-example -->"


def readme_blocks() -> tuple[str, str]:
    """The example's code, and the output block that follows it."""
    text = README.read_text()
    assert MARK in text, "the README lost its Python example"
    code, output = re.findall(r"```(?:python)?\n(.*?)```", text.split(MARK, 1)[1],
                              flags=re.S)[:2]
    return code, output


def test_the_example_is_whole():
    code, output = readme_blocks()
    compile(code, "README.md", "exec")  # it parses
    assert "fit(model, train, test)" in code and "epoch 2:" in output


@pytest.mark.slow
def test_the_readme_python_example_runs_and_prints_what_it_shows(tmp_path):
    if sources.locate("fashion-mnist") is None:
        pytest.skip("Fashion-MNIST is not installed (make data / lenet data fetch)")
    code, output = readme_blocks()
    (tmp_path / "example.py").write_text(code)
    r = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    shown = [line for line in output.splitlines() if line and line != "..."]
    printed = r.stdout.splitlines()
    assert printed[-len(shown):][:-1] == shown[:-1]  # the summary's total and both epochs
    top = re.match(r"\[\[\('(\w+)', ", printed[-1])  # probabilities: same class, any digits
    assert top and f"[[('{top[1]}', " in shown[-1], printed[-1]
    assert r.stderr == ""
