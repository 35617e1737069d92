"""Offline text metrics as local `evaluate` modules: ROUGE-L, corpus BLEU, normalised exact match.

`evaluate.load("rouge")` fetches its script from the Hub; these files ship inside the package
(installed wheels included) and are loaded by path, so they work with no network.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

NAMES = ("rouge", "bleu", "exact_match")


def path(name: str) -> Path:
    """The module file of metric `name`, wherever the package is installed."""
    if name not in NAMES:
        raise ValueError(f"unknown metric '{name}'; known: {', '.join(NAMES)}")
    return Path(str(resources.files(__name__).joinpath(f"{name}.py")))


def load(name: str):
    """`evaluate.load` of our own module file; kept in memory (nothing written beside the cache)."""
    import evaluate
    return evaluate.load(str(path(name)), keep_in_memory=True)
