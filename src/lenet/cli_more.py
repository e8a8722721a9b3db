"""CLI verbs for the chapter's exercises: predict, activations, export (being written)."""
from __future__ import annotations

HANDLERS: dict = {}


def add_parsers(verbs) -> None:
    pass
