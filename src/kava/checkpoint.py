"""Checkpoints: what a trained kava model is, on disk.

A checkpoint folder holds

* ``config.yaml``            — the resolved KavaConfig (model id, LoRA, M, T, ...);
* ``trainable.safetensors``  — every trainable tensor (LoRA, projection, new-token rows),
  keyed by ``Backbone`` parameter names: the one file kava loads back;
* ``adapter/``               — the LoRA adapter in peft format, for use outside kava;
* ``tokenizer/``             — the tokenizer with kava's special tokens;
* ``trainer_state.pt``       — optimizer, scheduler, eviction RNG and the step (the data
  position), and ``rng_state_<rank>.pt`` per process (dropout RNG): what ``--resume``
  needs; training checkpoints only;
* ``selection.json``         — in ``best/`` only: the step and validation accuracy that made
  it the best checkpoint, and the validation split used (``train.eval_every``).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from kava.backbone import Backbone, build_backbone
from kava.config import KavaConfig, load_config, save_config
from kava.guard import first_nonfinite

TRAINABLE = "trainable.safetensors"
TRAINER_STATE = "trainer_state.pt"


class CheckpointError(ValueError):
    """A checkpoint folder is missing a file or does not match its config."""


def trainable_state(backbone: Backbone) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().cpu().contiguous() for n, p in backbone.named_parameters() if p.requires_grad
    }


def save_checkpoint(
    path: str | Path,
    backbone: Backbone,
    cfg: KavaConfig,
    trainer_state: dict[str, Any] | None = None,
    extra_json: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder atomically (to ``path.tmp``, then renamed).

    ``extra_json``: file name -> JSON-serialisable object, written inside the folder
    before the rename (metadata that must never describe other weights, e.g.
    ``selection.json``)."""
    path = Path(path)
    state = trainable_state(backbone)
    bad = first_nonfinite(state)
    if bad is not None:  # never a checkpoint of diverged weights
        raise CheckpointError(f"{path}: not saved: tensor {bad} holds NaN/inf values")
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(state, str(tmp / TRAINABLE))
    if cfg.lora.enabled:
        # new-token rows live in trainable.safetensors; no copy of the whole embedding matrix
        backbone.lm.save_pretrained(tmp / "adapter", save_embedding_layers=False)
    backbone.tokenizer.save_pretrained(tmp / "tokenizer")
    save_config(cfg, tmp / "config.yaml")
    if trainer_state is not None:
        torch.save(trainer_state, tmp / TRAINER_STATE)
    for name, obj in (extra_json or {}).items():
        (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
    if path.exists():
        import shutil

        shutil.rmtree(path)
    tmp.rename(path)
    return path


def load_trainable(backbone: Backbone, path: str | Path) -> None:
    """Load ``trainable.safetensors`` into ``backbone``; every trainable tensor must be there."""
    file = Path(path) / TRAINABLE
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: not a kava checkpoint")
    state = load_file(str(file))
    expected = set(trainable_state(backbone))
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise CheckpointError(
            f"{file}: checkpoint does not match the model "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    bad = first_nonfinite(state)
    if bad is not None:
        raise CheckpointError(f"{file}: tensor {bad} holds NaN/inf values (a diverged run?)")
    params = dict(backbone.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def load_checkpoint(
    path: str | Path, overrides: list[str] | None = None
) -> tuple[Backbone, KavaConfig]:
    """Rebuild the backbone of a checkpoint (base model from its config + trained tensors)."""
    path = Path(path)
    if not (path / "config.yaml").is_file():
        raise FileNotFoundError(f"{path}/config.yaml not found: not a kava checkpoint")
    cfg = load_config(path / "config.yaml", overrides)
    backbone = build_backbone(cfg)
    load_trainable(backbone, path)
    return backbone, cfg


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest ``checkpoints/step-N`` folder with a trainer state, or None."""
    folder = Path(run_dir) / "checkpoints"
    steps = [
        (int(p.name.split("-", 1)[1]), p)
        for p in folder.glob("step-*")
        if p.name.split("-", 1)[1].isdigit() and (p / TRAINER_STATE).is_file()
    ]
    return max(steps)[1] if steps else None
