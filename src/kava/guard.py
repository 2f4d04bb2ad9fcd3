"""Non-finite losses and gradients (``train.on_nonfinite``) and JSON-safe log records.

A step whose loss terms or gradient norm are NaN/inf is never applied to the weights.
The decision is taken on flags reduced over every process, so all ranks skip (or stop)
the same step.
"""

from __future__ import annotations

import math
import signal
import threading
from collections.abc import Sequence
from typing import Any

import torch


class NonFiniteError(RuntimeError):
    """Training met a non-finite loss or gradient norm (``train.on_nonfinite``)."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM: a checkpoint was saved at a step boundary; ``--resume`` continues."""


def nonfinite_flags(values: torch.Tensor) -> torch.Tensor:
    """``values`` (any shape) -> bool tensor, True where a value is NaN or +-inf."""
    return ~torch.isfinite(values)


def flagged_names(flags: Sequence[bool], names: Sequence[str]) -> list[str]:
    return [n for n, f in zip(names, flags) if f]


def describe(step: int, parts: list[str]) -> str:
    return f"step {step}: non-finite {', '.join(parts)}"


def json_safe(rec: dict[str, Any]) -> dict[str, Any]:
    """``rec`` with every NaN/inf float replaced by None and the keys listed in
    ``rec["nonfinite"]`` (so ``json.dumps(allow_nan=False)`` never writes a bare NaN)."""
    out = dict(rec)
    bad = list(out.get("nonfinite", []))
    for k, v in rec.items():
        if isinstance(v, float) and not math.isfinite(v):
            out[k] = None
            if k not in bad:
                bad.append(k)
    if bad:
        out["nonfinite"] = bad
    return out


def first_nonfinite(state: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor of ``state`` holding NaN/inf, or None."""
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


class StopRequest:
    """While entered, SIGTERM only sets ``requested`` (the training loop saves a
    checkpoint at the next step boundary and stops); the previous handler comes back on
    exit. Outside the main thread (where signals cannot be handled) it does nothing."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
