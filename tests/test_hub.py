"""Hub-ready run folders: manifest.json, the model card, record_eval, kava push."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import huggingface_hub
import pytest
import yaml

from kava import LatentReasoner
from kava.card import EVAL_RESULTS, model_card, write_card
from kava.cli import main
from kava.config import load_config
from kava.hub import push, push_plan
from kava.manifest import PACKAGES, config_sha256, git_state, start_manifest

REPO = Path(__file__).resolve().parents[1]
MANIFEST_KEYS = {
    "kava_version",
    "git_commit",
    "git_dirty",
    "command",
    "config_sha256",
    "packages",
    "python",
    "platform",
    "device",
    "started_at",
    "finished_at",
}


def front_matter(path: Path) -> dict:
    text = path.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_run_folders_hold_manifest_and_card(tiny_run):
    run = json.loads((tiny_run / "manifest.json").read_text())
    assert MANIFEST_KEYS <= run.keys()
    assert set(run["packages"]) == set(PACKAGES) and run["packages"]["torch"]
    assert run["device"] == {"type": "cpu", "name": run["device"]["name"], "count": 1}
    assert run["config_sha256"] == config_sha256(load_config(tiny_run / "config.yaml"))
    assert run["command"] and run["finished_at"] >= run["started_at"]
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert run["git_commit"] == head and isinstance(run["git_dirty"], bool)
    assert json.loads((tiny_run / "final" / "manifest.json").read_text()) == run
    best = json.loads((tiny_run / "best" / "manifest.json").read_text())
    assert best["finished_at"] is None and best["started_at"] == run["started_at"]
    for folder in ("final", "best"):
        meta = front_matter(tiny_run / folder / "README.md")
        assert meta["library_name"] == "kava"
        assert meta["tags"][:2] == ["latent-reasoning", "kava"]
        assert "model-index" not in meta  # not evaluated yet: no results, no placeholders
        assert "base_model" not in meta  # a local folder is no Hub id
    assert (
        "Chosen as the best checkpoint at step 2" in (tiny_run / "best" / "README.md").read_text()
    )


def test_git_state_outside_a_checkout(tmp_path, monkeypatch):
    monkeypatch.delenv("KAVA_GIT_COMMIT", raising=False)
    assert git_state(tmp_path) == (None, None)


def test_git_state_outside_a_checkout_takes_the_commit_given(tmp_path, monkeypatch):
    # a copy of the source without .git (the GPU machine): whoever copied it names the commit
    monkeypatch.setenv("KAVA_GIT_COMMIT", "003f8a4")
    assert git_state(tmp_path) == ("003f8a4", None)  # dirty stays unknown
    monkeypatch.setenv("KAVA_GIT_COMMIT", "main")
    with pytest.raises(ValueError, match=r"\$KAVA_GIT_COMMIT='main'"):
        git_state(tmp_path)


def test_git_state_in_a_checkout_ignores_the_variable(monkeypatch):
    monkeypatch.setenv("KAVA_GIT_COMMIT", "0000000")
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parent,
    ).stdout.strip()
    assert git_state()[0] == head


def test_resumed_manifest_keeps_the_previous_one(tmp_path):
    cfg = load_config(None)
    first = start_manifest(tmp_path, cfg, {"type": "cpu", "name": None, "count": 1}, False)
    second = start_manifest(tmp_path, cfg, {"type": "cpu", "name": None, "count": 1}, True)
    assert second["previous"] == [first]
    assert json.loads((tmp_path / "manifest.json").read_text()) == second


def test_card_front_matter_for_hub_bases():
    cfg = load_config(None, ["model.name_or_path=smollm2", "data.train=whynlp/gsm8k-aug"])
    meta = yaml.safe_load(model_card(cfg).split("---\n")[1])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["license"] == "apache-2.0" and meta["datasets"] == ["whynlp/gsm8k-aug"]
    cfg = load_config(None, ["model.name_or_path=someone/unknown-model", "method=pccot"])
    meta = yaml.safe_load(model_card(cfg).split("---\n")[1])
    assert meta["base_model"] == "someone/unknown-model"
    assert "license" not in meta and "datasets" not in meta  # synthetic data: no Hub id
    assert "pccot" in meta["tags"]


@pytest.fixture
def checkpoint(tiny_run, tmp_path):
    """A copy of the tiny run's final/ (tests write into it)."""
    return Path(shutil.copytree(tiny_run / "final", tmp_path / "final"))


def test_eval_records_results_in_the_card(checkpoint, tmp_path):
    out = tmp_path / "eval"
    args = ["eval", "--checkpoint", str(checkpoint), "--out", str(out), "--no-progress"]
    assert main([*args, "--limit", "3"]) == 0
    metrics = json.loads((out / "synthetic" / "metrics.json").read_text())
    recorded = json.loads((checkpoint / EVAL_RESULTS).read_text())["results"]
    assert [r["dataset"] for r in recorded] == ["synthetic"]
    assert recorded[0]["accuracy"] == metrics["accuracy"] and recorded[0]["n"] == 3
    (result,) = front_matter(checkpoint / "README.md")["model-index"][0]["results"]
    values = {m["type"]: m["value"] for m in result["metrics"]}
    assert values["accuracy"] == pytest.approx(metrics["accuracy"])
    assert values["forward_passes"] == pytest.approx(metrics["mean_forward_passes"], abs=1e-4)
    assert result["dataset"]["name"] == "synthetic"
    # an evaluation with a changed model config is listed, but not as the model's result
    assert main([*args, "--limit", "2", "--set", "latent.num_latents=2"]) == 0
    assert json.loads((checkpoint / EVAL_RESULTS).read_text())["results"][0]["n"] == 2
    assert "model-index" not in front_matter(checkpoint / "README.md")
    assert "latent.num_latents=2" in (checkpoint / "README.md").read_text()


UPLOADED = {
    "README.md",
    "manifest.json",
    "config.yaml",
    "trainable.safetensors",
    "adapter/adapter_config.json",
    "adapter/adapter_model.safetensors",
}


def test_push_dry_run_lists_the_files(checkpoint, tmp_path, capsys, monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("a dry run must not talk to the Hub")

    monkeypatch.setattr(huggingface_hub, "HfApi", no_network)
    (checkpoint / "README.md").unlink()  # a push would write it: the plan lists it
    plan_file = tmp_path / "plan.json"
    cmd = ["push", str(checkpoint), "me/kava-tiny", "--dry-run", "--plan", str(plan_file)]
    assert main(cmd) == 0
    out = capsys.readouterr().out
    plan = json.loads(plan_file.read_text())
    assert json.loads(out[: out.rindex("}") + 1]) == plan
    files = {f["path"] for f in plan["files"]}
    assert UPLOADED <= files and any(f.startswith("tokenizer/") for f in files)
    assert {"trainer_state.pt", "rng_state_0.pt"} <= set(plan["excluded"])
    assert not files & set(plan["excluded"])
    assert plan["repo_id"] == "me/kava-tiny" and plan["private"] is False
    assert not (checkpoint / "README.md").exists()  # a dry run writes nothing


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def test_push_dry_run_leaves_the_folder_unchanged(checkpoint, monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("a dry run must not talk to the Hub")

    monkeypatch.setattr(huggingface_hub, "HfApi", no_network)
    (checkpoint / "README.md").write_text("a stale card\n")  # a push would rewrite it
    (checkpoint / EVAL_RESULTS).write_text(json.dumps({"results": []}))
    before = snapshot(checkpoint)
    assert main(["push", str(checkpoint), "me/kava-tiny", "--dry-run"]) == 0
    assert snapshot(checkpoint) == before
    plan = push(checkpoint, "me/kava-tiny", dry_run=True)
    assert snapshot(checkpoint) == before
    # the plan is the one a real push uploads: the refreshed card, with its size
    write_card(checkpoint)
    assert plan == push_plan(checkpoint, "me/kava-tiny")
    assert (checkpoint / "README.md").read_text() != "a stale card\n"


def test_push_uploads_and_loads_back(checkpoint, tmp_path, monkeypatch):
    calls = []
    hub = tmp_path / "hub"  # what the Hub stores

    class RecordingApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))

        def upload_folder(self, *, repo_id, folder_path, allow_patterns, **kw):
            calls.append(("upload_folder", repo_id, sorted(allow_patterns)))
            for rel in allow_patterns:
                (hub / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(Path(folder_path) / rel, hub / rel)
            return "https://huggingface.co/me/kava-tiny/commit/abc"

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    assert main(["push", str(checkpoint), "me/kava-tiny", "--private"]) == 0
    assert calls[1] == (
        "create_repo",
        "me/kava-tiny",
        {"private": True, "exist_ok": True, "repo_type": "model"},
    )
    assert calls[2][0:2] == ("upload_folder", "me/kava-tiny") and UPLOADED <= set(calls[2][2])
    assert not (hub / "trainer_state.pt").exists()

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(hub))
    pulled = LatentReasoner.from_pretrained("me/kava-tiny", device="cpu")
    local = LatentReasoner.from_pretrained(checkpoint, device="cpu")
    question = "Tom has 3 apples and buys 2 more. How many apples does Tom have?"
    assert pulled.solve(question) == local.solve(question)


def test_push_refuses_a_folder_that_is_no_checkpoint(tmp_path, capsys):
    assert main(["push", str(tmp_path), "me/x", "--dry-run"]) == 2
    assert "not a kava checkpoint" in capsys.readouterr().err
