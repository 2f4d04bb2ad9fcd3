"""Provenance of a training run: ``manifest.json`` (what code, packages and machine made it).

Written into the run folder when training starts, updated when it ends (``finished_at``),
and copied into ``final/`` and ``best/``. Schema::

    kava_version, git_commit (outside a git checkout: $KAVA_GIT_COMMIT, else null),
    git_dirty (null outside a checkout),
    command (sys.argv), config_sha256 (of the resolved config), packages {torch,
    transformers, peft, accelerate, safetensors, huggingface_hub, datasets: version or
    null}, python, platform, device {type, name, count}, parallel {processes, fsdp}
    (training runs), started_at, finished_at (ISO 8601 UTC; null while running), previous (the manifests of the runs a --resume
    continued, oldest first)
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kava.config import KavaConfig

MANIFEST = "manifest.json"
PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "safetensors",
    "huggingface_hub",
    "datasets",
)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def config_sha256(cfg: KavaConfig) -> str:
    """SHA-256 of the resolved config as canonical JSON (sorted keys)."""
    text = json.dumps(cfg.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        proc = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None  # no git on this machine
    return proc.stdout if proc.returncode == 0 else None


GIT_COMMIT_ENV = "KAVA_GIT_COMMIT"


def git_state(path: Path | None = None) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the git checkout holding kava's source. Outside one (an installed
    wheel, or a copy of the source on a GPU machine without ``.git``) the commit is
    ``$KAVA_GIT_COMMIT`` if set (whoever copied the source knows it; dirty is then unknown),
    else (None, None)."""
    path = path or Path(__file__).resolve().parent
    commit = _git(["rev-parse", "HEAD"], path)
    if commit is None:
        given = os.environ.get(GIT_COMMIT_ENV, "").strip()
        if not given:
            return None, None
        if not re.fullmatch(r"[0-9a-f]{7,40}", given):
            raise ValueError(
                f"${GIT_COMMIT_ENV}={given!r}: expected a git commit hash (7-40 hex digits)"
            )
        return given, None
    status = _git(["status", "--porcelain", "--untracked-files=no"], path)
    return commit.strip(), (bool(status.strip()) if status is not None else None)


def device_info(device_type: str, count: int) -> dict[str, Any]:
    """``{type, name, count}``: the accelerator's name (the CPU's on CPU), processes."""
    name = None
    if device_type == "cuda":
        import torch

        name = torch.cuda.get_device_name()
    else:
        name = platform.processor() or platform.machine() or None
    return {"type": device_type, "name": name, "count": count}


def build_manifest(
    cfg: KavaConfig,
    device: dict[str, Any],
    argv: list[str] | None = None,
    parallel: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``parallel``: the process layout of a training run (``kava.parallel.describe``)."""
    from kava import __version__

    commit, dirty = git_state()
    manifest = {
        "kava_version": __version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "command": list(sys.argv if argv is None else argv),
        "config_sha256": config_sha256(cfg),
        "packages": package_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "started_at": utc_now(),
        "finished_at": None,
    }
    if parallel is not None:
        manifest["parallel"] = parallel
    return manifest


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The folder's ``manifest.json``, or None when it has none. A file that is not JSON
    raises ``ValueError`` naming it."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def write_manifest(folder: str | Path, manifest: dict[str, Any]) -> Path:
    path = Path(folder) / MANIFEST
    tmp = path.with_name(MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(path)
    return path


def start_manifest(
    run_dir: str | Path,
    cfg: KavaConfig,
    device: dict[str, Any],
    resume: bool,
    parallel: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the run's manifest at train start; a resumed run keeps the manifests of the
    runs it continues under ``previous``."""
    manifest = build_manifest(cfg, device, parallel=parallel)
    old = read_manifest(run_dir) if resume else None
    if old is not None:
        manifest["previous"] = [*old.pop("previous", []), old]
    write_manifest(run_dir, manifest)
    return manifest


def finished(manifest: dict[str, Any]) -> dict[str, Any]:
    return {**manifest, "finished_at": utc_now()}
