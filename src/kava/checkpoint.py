"""Checkpoints: what a trained kava model is, on disk.

A checkpoint folder holds

* ``config.yaml``            — the resolved KavaConfig (model id, LoRA, M, T, ...);
* ``trainable.safetensors``  — every trainable tensor (LoRA, projection, new-token rows),
  keyed by ``Backbone`` parameter names: the one file kava loads back;
* ``adapter/``               — the LoRA adapter in peft format, for use outside kava;
* ``tokenizer/``             — the tokenizer with kava's special tokens;
* ``trainer_state.pt``       — optimizer, scheduler, the step (the data position; random
  eviction and curricula are seeded by it) and the process layout (``parallel``), and
  ``rng_state_<rank>.pt`` per process (dropout RNG): what ``--resume`` needs; training
  checkpoints only. Under FSDP the tensors are gathered whole before they are written;
* ``README.md``, ``manifest.json`` — in ``final/`` and ``best/``: the model card
  (kava.card; ``eval_results.json`` beside it once ``kava eval`` ran) and the run's
  provenance (kava.manifest);
* ``selection.json``         — in ``best/`` only: the step and validation accuracy that made
  it the best checkpoint, and the validation split used (``train.eval_every``);
* ``checksums.json``         — sha256 and size of every file above (written last).

Crash safety: a checkpoint is written into ``<name>.tmp``, every file and folder is
fsynced, ``checksums.json`` is written, and only then is the folder renamed into place.
An existing folder (``final/``, ``best/``) is replaced by renaming it to ``<name>.old``
first and deleting it after the rename; a crash in between leaves ``<name>.old``, which
``recover`` renames back. ``--resume`` verifies the checksums of the newest
``checkpoints/step-N`` and falls back to the previous one, naming what was wrong.
Files that ``kava eval`` may add or rewrite later (``UNCHECKED``) are not checksummed.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import random
import shutil
import signal
from dataclasses import dataclass
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
RANK_STATE_GLOB = "rng_state_*.pt"  # one per process: its RNG streams (rank_state_name)
RESUME_STATE = (TRAINER_STATE, RANK_STATE_GLOB)  # what only --resume reads (kava push skips)
CHECKSUMS = "checksums.json"
# added or rewritten inside final/ and best/ by `kava eval` after the save
UNCHECKED = frozenset({"README.md", "eval_results.json", CHECKSUMS})
# KAVA_CRASH_AT=<phase>[@n]: SIGKILL this process the n-th time (default 1st) a save
# reaches <phase> (tests of crash safety; see CRASH_PHASES)
CRASH_ENV = "KAVA_CRASH_AT"
CRASH_PHASES = ("trainable", "state", "rank_state", "checksums", "aside", "renamed")
_crash_counts: dict[str, int] = {}

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint folder is missing a file or does not match its config."""


def trainable_state(backbone: Backbone) -> dict[str, torch.Tensor]:
    """Every trainable tensor, whole, on the CPU. Under FSDP the parameters are shards
    (``DTensor``): they are gathered, a collective, so every process must call this."""
    return {
        n: _full(p).detach().cpu().contiguous()
        for n, p in backbone.named_parameters()
        if p.requires_grad
    }


def _full(p: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return p.full_tensor() if isinstance(p, DTensor) else p


def _as_param(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor) laid out like ``param``: this process's shard of it
    under FSDP (every process must call this), else ``value`` itself."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(param, DTensor):
        return value
    return distribute_tensor(value.to(param.device), param.device_mesh, param.placements)


def crash_point(phase: str) -> None:
    """Die here (SIGKILL, no cleanup) when ``$KAVA_CRASH_AT`` names this phase."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    name, _, nth = spec.partition("@")
    if name != phase:
        return
    _crash_counts[phase] = _crash_counts.get(phase, 0) + 1
    if _crash_counts[phase] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (files first, then their folders)."""
    for folder, _, files in os.walk(root, topdown=False):
        for f in files:
            _fsync(Path(folder) / f)
        _fsync(Path(folder))


def staging_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".tmp")


def start_staging(path: str | Path) -> Path:
    """A fresh, empty ``<path>.tmp`` (a leftover of an interrupted save is removed)."""
    tmp = staging_path(path)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write_checkpoint_files(
    tmp: Path,
    backbone: Backbone,
    cfg: KavaConfig,
    trainer_state: dict[str, Any] | None = None,
    extra_json: dict[str, Any] | None = None,
    extra_text: dict[str, str] | None = None,
    trainable: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write the files of one checkpoint into the staging folder ``tmp``.

    ``extra_json``: file name -> JSON-serialisable object (metadata that must never
    describe other weights, e.g. ``selection.json``, ``manifest.json``); ``extra_text``:
    file name -> text, likewise (the model card ``README.md``). ``trainable``: the
    trainable tensors already gathered (``trainable_state`` on every process, FSDP);
    default: read from ``backbone``."""
    state = trainable_state(backbone) if trainable is None else trainable
    bad = first_nonfinite(state)
    if bad is not None:  # never a checkpoint of diverged weights
        raise CheckpointError(
            f"{tmp.with_suffix('')}: not saved: tensor {bad} holds NaN/inf values"
        )
    save_file(state, str(tmp / TRAINABLE))
    crash_point("trainable")
    if cfg.lora.enabled:
        # new-token rows live in trainable.safetensors; no copy of the whole embedding matrix
        # (from the gathered tensors: under FSDP the model's own are shards)
        lm_state = {n.removeprefix("lm."): v for n, v in state.items() if n.startswith("lm.")}
        backbone.lm.save_pretrained(
            tmp / "adapter", save_embedding_layers=False, state_dict=lm_state
        )
    backbone.tokenizer.save_pretrained(tmp / "tokenizer")
    save_config(cfg, tmp / "config.yaml")
    if trainer_state is not None:
        torch.save(trainer_state, tmp / TRAINER_STATE)
        crash_point("state")
    for name, obj in (extra_json or {}).items():
        (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
    for name, text in (extra_text or {}).items():
        (tmp / name).write_text(text)


def write_rank_state(tmp: Path, name: str, obj: Any) -> None:
    """One process's own file (its RNG streams) into the staging folder."""
    torch.save(obj, tmp / name)
    crash_point("rank_state")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checked_files(folder: Path) -> list[str]:
    """Relative paths of the files of ``folder`` that ``checksums.json`` covers."""
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.relative_to(folder).as_posix() not in UNCHECKED
    )


def commit_checkpoint(tmp: Path, path: str | Path) -> Path:
    """Checksum, fsync and rename the staging folder ``tmp`` into place as ``path``."""
    path = Path(path)
    sums = {
        name: {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
        for name in checked_files(tmp)
    }
    (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=2) + "\n")
    _fsync_tree(tmp)
    crash_point("checksums")
    old = path.with_name(path.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if path.exists():
        os.rename(path, old)  # a crash from here to the next rename: recover() undoes it
        crash_point("aside")
    os.rename(tmp, path)
    _fsync(path.parent)
    crash_point("renamed")
    if old.exists():
        shutil.rmtree(old)
    return path


def recover(path: str | Path) -> None:
    """Undo a replacement interrupted between its two renames (``<path>.old`` left, no
    ``<path>``), and drop a staging folder left by an interrupted save."""
    path = Path(path)
    old = path.with_name(path.name + ".old")
    if not path.exists() and old.is_dir():
        os.rename(old, path)
        log.warning("%s: restored from %s (a save was interrupted while replacing it)", path, old)
    tmp = staging_path(path)
    if tmp.exists():
        shutil.rmtree(tmp)


def save_checkpoint(
    path: str | Path,
    backbone: Backbone,
    cfg: KavaConfig,
    trainer_state: dict[str, Any] | None = None,
    extra_json: dict[str, Any] | None = None,
    extra_text: dict[str, str] | None = None,
) -> Path:
    """Write a checkpoint folder atomically from one process (see the module docstring);
    ``extra_json`` / ``extra_text`` as in ``write_checkpoint_files``."""
    tmp = start_staging(path)
    write_checkpoint_files(tmp, backbone, cfg, trainer_state, extra_json, extra_text)
    return commit_checkpoint(tmp, path)


def rank_state_name(process_index: int) -> str:
    return RANK_STATE_GLOB.replace("*", str(process_index))


def is_rank_state(name: str) -> bool:
    return fnmatch.fnmatchcase(name, RANK_STATE_GLOB)


def _resume_only(name: str) -> bool:
    """Files only ``--resume`` reads (``RESUME_STATE``; ``kava push`` leaves them out)."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in RESUME_STATE)


def verify_checkpoint(
    path: str | Path, required: tuple[str, ...] = (), for_resume: bool = True
) -> list[str]:
    """What is wrong with a checkpoint folder: missing files, size or sha256 mismatches
    against ``checksums.json``, an unreadable safetensors header. Empty = sound.
    ``for_resume=False`` (loading the weights): absent resume-state files are fine.

    A folder without ``checksums.json`` (written by an older kava) is checked for its
    ``required`` files and safetensors header only."""
    path = Path(path)
    problems = [f"{path / name}: missing" for name in required if not (path / name).is_file()]
    sums_file = path / CHECKSUMS
    if sums_file.is_file():
        try:
            sums = json.loads(sums_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return [*problems, f"{sums_file}: unreadable ({e})"]
        for name, want in sorted(sums.items()):
            file = path / name
            if not file.is_file():
                if for_resume or not _resume_only(name):
                    problems.append(f"{file}: missing")
            elif file.stat().st_size != want["bytes"]:
                problems.append(
                    f"{file}: truncated or resized ({file.stat().st_size} bytes, "
                    f"{want['bytes']} when saved)"
                )
            elif _sha256(file) != want["sha256"]:
                problems.append(f"{file}: checksum mismatch (the file changed after the save)")
    elif (path / TRAINABLE).is_file():
        try:
            safe_open_header(path / TRAINABLE)
        except CheckpointError as e:
            problems.append(str(e))
    return sorted(set(problems), key=problems.index)


def safe_open_header(file: Path) -> list[str]:
    """The tensor names of a safetensors file; ``CheckpointError`` if it is unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own error types for torn files
        raise CheckpointError(f"{file}: unreadable safetensors file ({e})") from e


def read_tensors(file: Path) -> dict[str, torch.Tensor]:
    """``load_file`` with a torn or corrupt file reported as a ``CheckpointError``."""
    try:
        return load_file(str(file))
    except Exception as e:  # safetensors' SafetensorError, OSError, ...
        raise CheckpointError(f"{file}: unreadable safetensors file ({e})") from e


def read_torch(file: Path) -> Any:
    """``torch.load`` (full pickle: kava's own trainer files) as a ``CheckpointError``."""
    try:
        return torch.load(file, weights_only=False)
    except Exception as e:  # zip / unpickling errors of a torn file
        raise CheckpointError(f"{file}: unreadable ({type(e).__name__}: {e})") from e


def load_trainable(backbone: Backbone, path: str | Path) -> None:
    """Load ``trainable.safetensors`` into ``backbone``; every trainable tensor must be there."""
    file = Path(path) / TRAINABLE
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: not a kava checkpoint")
    apply_trainable(backbone, read_tensors(file), file)


def apply_trainable(backbone: Backbone, state: dict[str, torch.Tensor], file: Path) -> None:
    """Copy ``state`` (read from ``file``) into the trainable tensors of ``backbone``."""
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
        for name in sorted(state):  # one order on every process (FSDP: collectives)
            params[name].copy_(_as_param(state[name], params[name]))


def load_checkpoint(
    path: str | Path, overrides: list[str] | None = None
) -> tuple[Backbone, KavaConfig]:
    """Rebuild the backbone of a checkpoint (base model from its config + trained tensors)."""
    path = Path(path)
    recover(path)
    if not (path / "config.yaml").is_file():
        raise FileNotFoundError(f"{path}/config.yaml not found: not a kava checkpoint")
    problems = verify_checkpoint(path, (TRAINABLE,), for_resume=False)
    if problems:
        raise CheckpointError("; ".join(problems))
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


def step_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(N, checkpoints/step-N)`` of a run, newest first (staging folders excluded)."""
    folder = Path(run_dir) / "checkpoints"
    steps = [
        (int(p.name.split("-", 1)[1]), p)
        for p in folder.glob("step-*")
        if p.is_dir() and p.name.split("-", 1)[1].isdigit()
    ]
    return sorted(steps, reverse=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest ``checkpoints/step-N`` folder with a trainer state, or None."""
    for _, p in step_checkpoints(run_dir):
        if (p / TRAINER_STATE).is_file():
            return p
    return None


def prune_checkpoints(run_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` step-N folders (0 = keep all); best/ and final/
    live elsewhere and are never touched. Returns the deleted folders."""
    if keep <= 0:
        return []
    old = [p for _, p in step_checkpoints(run_dir)[keep:]]
    for p in old:
        shutil.rmtree(p)
    return old


def clean_staging(run_dir: str | Path) -> None:
    """Remove what interrupted saves left behind: ``*.tmp`` staging folders, and put back
    a ``final``/``best`` moved aside (``recover``)."""
    run_dir = Path(run_dir)
    for p in (run_dir / "checkpoints").glob("*.tmp"):
        shutil.rmtree(p)
    for name in ("final", "best"):
        recover(run_dir / name)


def rank_files_of(ckpt: Path) -> list[str]:
    """The per-process ``rng_state_<rank>.pt`` files a checkpoint was saved with (from
    ``checksums.json`` when present: a lost file still counts)."""
    sums = ckpt / CHECKSUMS
    try:
        names = json.loads(sums.read_text()) if sums.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        names = None  # reported by verify_checkpoint
    if names is None:
        names = [p.name for p in ckpt.glob(RANK_STATE_GLOB)]
    return sorted(n for n in names if is_rank_state(n))


@dataclass
class ResumeState:
    path: Path
    trainable: dict[str, torch.Tensor]
    trainer: dict[str, Any]
    rank: dict[str, Any]  # this process's RNG streams


def resume_state(run_dir: str | Path, rank_file: str, n_rank_files: int) -> ResumeState:
    """The newest sound ``checkpoints/step-N``, read into memory. A checkpoint that fails
    verification or reading is skipped with a warning naming what was wrong; none left
    is a ``CheckpointError`` listing every problem."""
    candidates = step_checkpoints(run_dir)
    if not candidates:
        raise FileNotFoundError(
            f"--resume: no checkpoints/step-N with a trainer state in {run_dir}"
        )
    problems_seen = []
    for _, ckpt in candidates:
        saved_ranks = rank_files_of(ckpt)
        if saved_ranks and len(saved_ranks) != n_rank_files:
            raise CheckpointError(
                f"{ckpt}: saved by {len(saved_ranks)} processes, resumed with {n_rank_files}: "
                "resume with the number of processes the run was saved with"
            )
        problems = verify_checkpoint(ckpt, (TRAINABLE, TRAINER_STATE, "config.yaml", rank_file))
        if not problems:
            try:
                return ResumeState(
                    ckpt,
                    read_tensors(ckpt / TRAINABLE),
                    read_torch(ckpt / TRAINER_STATE),
                    read_torch(ckpt / rank_file),
                )
            except CheckpointError as e:
                problems = [str(e)]
        log.warning("--resume: skipping %s: %s", ckpt, "; ".join(problems))
        problems_seen += problems
    raise CheckpointError(
        f"--resume: no sound checkpoint in {Path(run_dir) / 'checkpoints'}: "
        + "; ".join(problems_seen)
    )
