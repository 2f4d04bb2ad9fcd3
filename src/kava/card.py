"""Model cards: the ``README.md`` of a checkpoint folder, ready for the Hugging Face Hub.

The card is a pure function of the folder's own files: ``config.yaml`` (method, base
model, data, M/T), ``manifest.json`` (provenance), ``selection.json`` (best/ only) and
``eval_results.json`` (written by ``record_eval`` after ``kava eval``). Its YAML front
matter holds ``base_model`` (a Hub id only: a local path means nothing on the Hub),
``library_name: kava``, ``license`` (of the base model, where kava knows it), ``datasets``
(the training set's Hub id, where it has one), ``tags`` and ``model-index``, whose results
are exactly the recorded evaluations: none before an evaluation has run, never
placeholders.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from kava.config import KavaConfig, load_config
from kava.manifest import read_manifest, utc_now

CARD = "README.md"
EVAL_RESULTS = "eval_results.json"

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the "smollm2" alias is
# Licenses of the bases kava's configs use (from their Hub model cards).
LICENSES = {
    SMOLLM2_HUB_ID: "apache-2.0",
    "Qwen/Qwen2.5-0.5B-Instruct": "apache-2.0",
    "meta-llama/Llama-3.2-1B-Instruct": "llama3.2",
    "meta-llama/Llama-3.2-3B-Instruct": "llama3.2",
}
# kava dataset names with a Hub counterpart (the same questions).
DATASET_HUB_IDS = {
    "gsm8k": "openai/gsm8k",
    "gsm8k-train": "openai/gsm8k",
    "gsm8k-train-eq": "openai/gsm8k",
}


def _is_hub_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if "/" not in name or Path(name).expanduser().exists() or name.startswith((".", "/", "~")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def base_model_id(cfg: KavaConfig) -> str | None:
    """The base model's Hub id, or None for a local folder."""
    name = cfg.model.name_or_path
    if name == "smollm2":
        return SMOLLM2_HUB_ID
    return name if _is_hub_id(name) else None


def dataset_id(name: str) -> str | None:
    if name in DATASET_HUB_IDS:
        return DATASET_HUB_IDS[name]
    return name if _is_hub_id(name) else None


def read_eval_results(folder: str | Path) -> list[dict[str, Any]]:
    path = Path(folder) / EVAL_RESULTS
    if not path.is_file():
        return []
    try:
        return json.loads(path.read_text())["results"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a kava eval results file ({e})") from e


def _model_index(cfg: KavaConfig, evals: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """model-index entries of the evaluations made with the checkpoint's own model config
    (overrides of ``eval.*`` keys only)."""
    results = []
    for r in evals:
        if any(not o.startswith("eval.") for o in r.get("overrides", [])):
            continue
        dataset: dict[str, Any] = {
            "name": r["dataset"],
            "type": dataset_id(r["dataset"]) or r["dataset"],
        }
        results.append(
            {
                "task": {"type": "text-generation", "name": "math word problems"},
                "dataset": dataset,
                "metrics": [
                    {
                        "type": "accuracy",
                        "value": round(r["accuracy"], 6),
                        "name": f"accuracy (n={r['n']})",
                    },
                    {
                        "type": "forward_passes",
                        "value": round(r["mean_forward_passes"], 4),
                        "name": "forward passes per question (mean)",
                    },
                ],
            }
        )
    if not results:
        return None
    return [{"name": f"{cfg.method_spec.label} ({cfg.model.name_or_path})", "results": results}]


def model_card(
    cfg: KavaConfig,
    *,
    manifest: dict[str, Any] | None = None,
    selection: dict[str, Any] | None = None,
    evals: list[dict[str, Any]] | None = None,
) -> str:
    """The card's text: YAML front matter, then a short description."""
    spec = cfg.method_spec
    evals = evals or []
    meta: dict[str, Any] = {}
    base = base_model_id(cfg)
    if base is not None:
        meta["base_model"] = base
    meta["library_name"] = "kava"
    if base in LICENSES:
        meta["license"] = LICENSES[base]
    train_id = dataset_id(cfg.data.train)
    if train_id is not None:
        meta["datasets"] = [train_id]
    meta["tags"] = ["latent-reasoning", spec.name, "math"] + (["lora"] if cfg.lora.enabled else [])
    meta["pipeline_tag"] = "text-generation"
    index = _model_index(cfg, evals)
    if index is not None:
        meta["model-index"] = index
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)

    latent = ""
    if spec.inference == "jacobi":
        latent = (
            f" It reasons in M={cfg.latent.num_latents} continuous latent tokens refined by "
            f"T={cfg.effective_iterations} Jacobi iterations."
        )
    elif spec.inference == "thoughts":
        latent = f" It reasons in {cfg.coconut_eval_thoughts} continuous thoughts."
    lines = [
        f"# {spec.label} on {cfg.model.name_or_path}",
        "",
        f"A [kava](https://arxiv.org/abs/2510.02312) checkpoint of method `{spec.name}` "
        f"({spec.paper}): {spec.summary}.{latent} Trained on `{cfg.data.train}`.",
        "",
        "```python",
        "from kava import LatentReasoner",
        "",
        'model = LatentReasoner.from_pretrained("REPO_ID_OR_FOLDER")',
        'print(model.solve("Tom has 3 apples and buys 2 more. How many now?").answers)',
        "```",
        "",
        "## Evaluation",
        "",
    ]
    if evals:
        lines += [
            "| dataset | n | accuracy | forward passes / question | config overrides | evaluated |",
            "|---|---:|---:|---:|---|---|",
        ]
        for r in evals:
            over = ", ".join(r.get("overrides", [])) or "–"
            lines.append(
                f"| {r['dataset']} | {r['n']} | {r['accuracy']:.4f} | "
                f"{r['mean_forward_passes']:.2f} | {over} | {r.get('evaluated_at', '')} |"
            )
    else:
        lines.append(
            "Not evaluated yet (`kava eval --checkpoint THIS_FOLDER` records results here)."
        )
    if selection is not None:
        lines += [
            "",
            f"Chosen as the best checkpoint at step {selection['step']} by accuracy "
            f"{selection['accuracy']:.4f} on the {selection.get('split', 'validation')} split "
            f"of `{selection.get('dataset')}`.",
        ]
    lines += ["", "## Provenance", ""]
    if manifest is None:
        lines.append("unknown (no manifest.json)")
    else:
        pk = manifest.get("packages", {})
        dirty = " (uncommitted changes)" if manifest.get("git_dirty") else ""
        lines += [
            f"kava {manifest.get('kava_version')}, commit {manifest.get('git_commit') or 'unknown'}"
            f"{dirty}; torch {pk.get('torch')}, transformers {pk.get('transformers')}, "
            f"peft {pk.get('peft')}; config sha256 {manifest.get('config_sha256')}.",
        ]
    return f"---\n{front}---\n\n" + "\n".join(lines) + "\n"


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def card_text(folder: str | Path) -> str:
    """The ``README.md`` a checkpoint folder's files make (``write_card`` writes it)."""
    folder = Path(folder)
    return model_card(
        load_config(folder / "config.yaml"),
        manifest=read_manifest(folder),
        selection=_read_json(folder / "selection.json"),
        evals=read_eval_results(folder),
    )


def write_card(folder: str | Path) -> Path:
    """(Re)write ``README.md`` of a checkpoint folder from its files."""
    path = Path(folder) / CARD
    path.write_text(card_text(folder))
    return path


def record_eval(
    folder: str | Path, results: list[dict[str, Any]], overrides: list[str] | None = None
) -> Path:
    """Record ``kava eval`` metrics (``evaluate``'s dicts) in the checkpoint folder:
    ``eval_results.json`` (one entry per dataset, the newest wins) and the card."""
    folder = Path(folder)
    kept = {r["dataset"]: r for r in read_eval_results(folder)}
    for m in results:
        kept[m["dataset"]] = {
            "dataset": m["dataset"],
            "n": m["n"],
            "accuracy": m["accuracy"],
            "correct": m["correct"],
            "mean_forward_passes": m["mean_forward_passes"],
            "mean_generated_tokens": m["mean_generated_tokens"],
            "overrides": list(overrides or []),
            "evaluated_at": utc_now(),
        }
    path = folder / EVAL_RESULTS
    path.write_text(json.dumps({"results": list(kept.values())}, indent=2) + "\n")
    return write_card(folder)
