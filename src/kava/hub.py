"""``kava push``: upload a checkpoint folder to the Hugging Face Hub (huggingface_hub).

What is uploaded is planned first (``push_plan``): every file of the folder except the
training-resume state (``trainer_state.pt``, ``rng_state_<rank>.pt``: optimizer moments
and RNG streams, of no use for inference and the largest files) and temporary files. The
card (``README.md``) is refreshed from the folder's files first. ``push`` then calls
``HfApi.create_repo`` and ``HfApi.upload_folder`` with exactly the planned files. A dry
run only plans: it renders the card in memory (the plan lists it as it would be uploaded)
and leaves the folder as it was.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path, PurePosixPath
from typing import Any

from kava.card import CARD, card_text, write_card
from kava.checkpoint import RESUME_STATE, TRAINABLE, CheckpointError

EXCLUDED = (*RESUME_STATE, "*.tmp", "*.tmp/*", "push_plan.json")


def push_plan(
    folder: str | Path, repo_id: str, private: bool = False, card: str | None = None
) -> dict[str, Any]:
    """Which files ``push`` uploads (paths relative to ``folder``, sorted) and which it
    leaves out; ``card``: the text ``README.md`` would have (a dry run: the folder's own
    README.md, if any, is not what would be uploaded). Raises ``CheckpointError`` when
    ``folder`` is no kava checkpoint."""
    folder = Path(folder)
    if not (folder / TRAINABLE).is_file() or not (folder / "config.yaml").is_file():
        raise CheckpointError(
            f"{folder}: not a kava checkpoint folder (needs {TRAINABLE} and config.yaml; "
            "e.g. RUN/final or RUN/best)"
        )
    files, excluded = [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if any(fnmatch.fnmatch(rel, pat) for pat in EXCLUDED):
            excluded.append(rel)
        else:
            files.append({"path": rel, "bytes": path.stat().st_size})
    if card is not None:
        files = [f for f in files if f["path"] != CARD]
        files.append({"path": CARD, "bytes": len(card.encode())})
        files.sort(key=lambda f: PurePosixPath(f["path"]))
    return {
        "repo_id": repo_id,
        "private": private,
        "folder": str(folder.resolve()),
        "files": files,
        "excluded": excluded,
        "total_bytes": sum(f["bytes"] for f in files),
    }


def push(
    folder: str | Path,
    repo_id: str,
    private: bool = False,
    dry_run: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
) -> dict[str, Any]:
    """Refresh the card, plan, and (unless ``dry_run``) create the repo and upload the
    planned files. Returns the plan (with ``url`` of the commit after an upload). A dry
    run writes nothing: the card is rendered in memory, the folder stays as it was."""
    push_plan(folder, repo_id, private)  # a kava checkpoint folder, or a CheckpointError
    if dry_run:
        return push_plan(folder, repo_id, private, card=card_text(folder))
    write_card(folder)
    plan = push_plan(folder, repo_id, private)
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        allow_patterns=[f["path"] for f in plan["files"]],
        commit_message=commit_message or f"kava push {Path(folder).name}",
    )
    plan["url"] = str(getattr(info, "commit_url", info))
    return plan
