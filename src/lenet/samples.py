"""Photographs shipped with the package, for looking at what the network does with images
nothing like its training data (the chapter's "cats, cars, or even random noise"): a cat, a
coffee cup and a rocket on its launch pad. Credits: sample_images/CREDITS.txt."""
from __future__ import annotations

from pathlib import Path

from lenet.errors import ConfigError

NAMES = ("cat", "cup", "rocket")
_FOLDER = Path(__file__).with_name("sample_images")


def path(name: str) -> Path:
    """The file of sample `name` (one of NAMES)."""
    if name not in NAMES:
        raise ConfigError(f"sample '{name}': expected one of {', '.join(NAMES)}")
    return _FOLDER / f"{name}.jpg"
