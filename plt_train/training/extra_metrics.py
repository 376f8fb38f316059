"""Per-step metrics that model components contribute, without the training loop knowing them.

A component (e.g. the MoE layers' all-to-all counters) registers ``reset`` and ``collect``
under a name when it is built; ``train_step`` calls ``reset_step_metrics()`` before the step
and ``collect_step_metrics()`` after it, on every rank, and the loop logs the merged dict.
``collect`` may run collectives (every rank built the same model, so every rank registered
the same sources, in the same order).  Registering a name again replaces the old entry, so
building a model twice in one process does not double-count.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

_SOURCES: Dict[str, Tuple[Callable[[], None], Callable[[], dict]]] = {}


def register_step_metrics(name: str, reset: Callable[[], None],
                          collect: Callable[[], dict]) -> None:
    _SOURCES[name] = (reset, collect)


def clear_step_metrics() -> None:
    _SOURCES.clear()


def reset_step_metrics() -> None:
    for reset, _ in _SOURCES.values():
        reset()


def collect_step_metrics() -> dict:
    out: dict = {}
    for name in sorted(_SOURCES):
        out.update(_SOURCES[name][1]())
    return out
