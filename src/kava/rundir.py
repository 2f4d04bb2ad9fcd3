"""What a run folder may and may not have done to it.

* A fresh ``kava train`` into a folder that holds a run is refused before anything in
  it is written.
* ``--resume`` with a config that differs from the run's ``config.yaml`` is refused,
  naming each differing key (old -> new), unless every difference is in
  ``RESUME_MUTABLE``: keys that change neither the optimisation nor the data
  (logging, checkpoint frequency and retention, data-loader workers, the speed options
  a resumed run on another machine may need, evaluation — but not the decoding budget
  that validation chooses ``best/`` with). Those changes are appended to
  ``resume_history.jsonl``; the run's ``config.yaml`` stays the original.

Anything that changes the schedule (``train.max_steps``, ``train.epochs``, the batch
sizes, the lr), the data, the model or the objective is refused: a resumed run must be
the run that was started.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from kava.config import ConfigError, KavaConfig, load_config

RUN_MARKERS = ("log.jsonl", "checkpoints", "final")
RESUME_HISTORY = "resume_history.jsonl"

# Dotted keys (or prefixes ending in ".") that may differ on --resume.
RESUME_MUTABLE = (
    "train.output_dir",  # the run folder may have been moved
    "train.log_every",
    "train.save_every",
    "train.save_total_limit",
    "train.num_workers",
    "train.on_nonfinite",
    "train.max_consecutive_skips",
    "train.compile",
    "train.activation_checkpointing",
    "train.attention",  # the same attention, rounded differently (as train.compile)
    "train.fused_qkv",  # the same projections, rounded differently
    "train.chunked_ce",  # the same cross-entropy, rounded differently
    "train.report_to",  # trackers only observe
    "eval.",
)
# Evaluation keys that validation (train.eval_every > 0) decodes with and that change its
# answers: changed mid-run, best/ would be chosen among accuracies of different decoding
# budgets. (The others only change speed or rounding, as train.compile does.)
VALIDATION_DECODING = ("eval.max_new_tokens", "eval.cot_max_new_tokens")


def holds_run(run_dir: Path) -> bool:
    return any((run_dir / n).exists() for n in RUN_MARKERS)


def check_fresh(run_dir: Path) -> None:
    """A new run may not start in a folder holding one (nothing is written before)."""
    if holds_run(run_dir):
        raise FileExistsError(
            f"{run_dir} already holds a training run; continue it with --resume, "
            "or set another train.output_dir"
        )


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def config_changes(old: KavaConfig, new: KavaConfig) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (old, new) for every key whose value differs."""
    a, b = flatten(old.to_dict()), flatten(new.to_dict())
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def mutable(key: str, validating: bool = False) -> bool:
    """Whether ``key`` may change on --resume (``validating``: the run chooses ``best/``
    on a validation split, whose decoding budget must then stay)."""
    if validating and key in VALIDATION_DECODING:
        return False
    return any(key == m or (m.endswith(".") and key.startswith(m)) for m in RESUME_MUTABLE)


def check_resume(run_dir: Path, cfg: KavaConfig) -> dict[str, tuple[Any, Any]]:
    """Compare ``cfg`` with the run's ``config.yaml``; return the allowed changes or raise
    ``ConfigError`` naming every key that may not change."""
    stored = run_dir / "config.yaml"
    if not stored.is_file():
        raise FileNotFoundError(
            f"--resume: {run_dir} holds no kava run to continue (no config.yaml, no checkpoints)"
        )
    old_cfg = load_config(stored)
    changes = config_changes(old_cfg, cfg)
    validating = old_cfg.train.eval_every > 0
    refused = {k: v for k, v in changes.items() if not mutable(k, validating)}
    if refused:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
        but = (
            f", except {' and '.join(VALIDATION_DECODING)} while train.eval_every chooses best/"
            if validating
            else ""
        )
        raise ConfigError(
            f"--resume: the config differs from {stored} in keys a resumed run may not "
            f"change: {listed} (only these may change: {', '.join(RESUME_MUTABLE)}*{but})"
        )
    return changes


def record_resume(run_dir: Path, step: int, changes: dict[str, tuple[Any, Any]]) -> None:
    """Append one line to ``resume_history.jsonl``: when, from which step, what changed."""
    rec = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "step": step,
        "changes": {k: {"old": old, "new": new} for k, (old, new) in changes.items()},
    }
    with (run_dir / RESUME_HISTORY).open("a") as f:
        f.write(json.dumps(rec) + "\n")
