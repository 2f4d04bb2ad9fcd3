"""The Python API (kava.api.LatentReasoner), the thin CLI callers and ``python -m kava``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch

from kava import LatentReasoner, SolveResult
from kava.checkpoint import CheckpointError
from kava.cli import main
from kava.data import Example
from kava.evaluate import load_eval_examples

QUESTIONS = [
    "Tom has 3 apples and buys 2 more. How many apples does Tom have?",
    "A box holds 12 pens. Each pen costs 2 dollars. How much do the pens cost?",
    "Sam reads 5 pages a day for 4 days. How many pages does he read?",
]


@pytest.fixture(scope="module")
def reasoner(tiny_run):
    return LatentReasoner.from_pretrained(tiny_run / "final", device="cpu")


def test_from_pretrained_resolves_run_final_and_best(tiny_run, reasoner):
    assert reasoner.path == tiny_run / "final"
    assert LatentReasoner.from_pretrained(tiny_run).path == tiny_run / "final"
    best = LatentReasoner.from_pretrained(tiny_run / "best", dtype=torch.float32)
    assert best.path == tiny_run / "best" and best.config.model.dtype == "float32"
    assert reasoner.method.name == "kava" and reasoner.method.latent
    assert reasoner.device.type == "cpu"
    with pytest.raises(ValueError, match="dtype"):
        LatentReasoner.from_pretrained(tiny_run, dtype="float64")


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "best").mkdir()
    with pytest.raises(CheckpointError, match="neither a kava checkpoint"):
        LatentReasoner.from_pretrained(tmp_path)


def test_solve_matches_evaluation(tiny_run, reasoner):
    """solve / generate / evaluate decode the same way as ``kava eval`` (latent: 1 + T +
    generated tokens passes), and batching changes nothing."""
    examples = load_eval_examples("synthetic", reasoner.config, 5)
    metrics = reasoner.evaluate("synthetic", limit=5, return_predictions=True)
    preds = metrics["predictions"]
    result = reasoner.solve([e.question for e in examples], batch_size=2)
    assert isinstance(result, SolveResult) and len(result) == 5
    assert result.texts == [p["prediction"] for p in preds]
    assert result.answers == [p["parsed"] for p in preds]
    assert result.passes == [p["passes"] for p in preds]
    t = reasoner.config.effective_iterations
    assert all(p["passes"] == 1 + t + p["generated_tokens"] for p in preds)
    assert reasoner.generate([e.question for e in examples], batch_size=1) == result.texts
    same = reasoner.evaluate(examples)  # Examples, as given
    assert same["accuracy"] == metrics["accuracy"] and same["n"] == 5
    as_dicts = reasoner.evaluate([{"question": e.question, "answer": e.answer} for e in examples])
    assert as_dicts["correct"] == metrics["correct"]


def test_max_new_tokens_and_single_question(reasoner):
    one = reasoner.solve(QUESTIONS[0], max_new_tokens=1)
    assert len(one) == 1
    assert one.passes == [1 + reasoner.config.effective_iterations + 1]  # pass 0, T, prompt
    long = reasoner.solve(QUESTIONS, max_new_tokens=6)
    assert max(long.passes) <= 1 + reasoner.config.effective_iterations + 6
    with pytest.raises(ValueError, match="max_new_tokens"):
        reasoner.solve(QUESTIONS, max_new_tokens=0)
    with pytest.raises(ValueError, match="no questions"):
        reasoner.solve([])


def test_plain_methods_decode_text(tiny_run, tmp_path):
    """A method whose table entry says ``inference: text`` (No-CoT) decodes without
    latents: one pass per generated token."""
    import yaml

    from conftest import tiny_run_config

    base = yaml.safe_load((tiny_run / "config.yaml").read_text())["model"]["name_or_path"]
    cfg = tiny_run_config(base, tmp_path / "nocot", method="nocot", train={"max_steps": 1})
    cfg["train"]["eval_every"] = 0
    (tmp_path / "nocot.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "nocot.yaml"), "--no-progress"]) == 0
    r = LatentReasoner.from_pretrained(tmp_path / "nocot", device="cpu")
    assert not r.method.latent
    m = r.evaluate("synthetic", limit=3, return_predictions=True)
    assert all(p["passes"] == p["generated_tokens"] for p in m["predictions"])


def test_hub_repo_id_goes_through_snapshot_download(tiny_run, monkeypatch):
    calls = []

    def fake_snapshot_download(repo_id, revision=None, token=None):
        calls.append((repo_id, revision))
        return str(tiny_run / "final")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    r = LatentReasoner.from_pretrained("someone/kava-tiny", revision="v1")
    assert calls == [("someone/kava-tiny", "v1")]
    assert r.path == tiny_run / "final"


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    def offline(repo_id, revision=None, token=None):
        raise huggingface_hub.errors.LocalEntryNotFoundError("no connection to the Hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(
        FileNotFoundError, match="someone/missing: not a local folder.*no connection"
    ):
        LatentReasoner.from_pretrained("someone/missing")
    with pytest.raises(FileNotFoundError, match="nor a valid Hugging Face Hub repo id"):
        LatentReasoner.from_pretrained("./runs/no/such/folder")


def test_cli_solve_and_eval_use_the_api(tiny_run, reasoner, tmp_path, capsys):
    question = QUESTIONS[0]
    assert main(["solve", "--checkpoint", str(tiny_run / "final"), question]) == 0
    out = capsys.readouterr().out.splitlines()
    r = reasoner.solve(question)
    answer = r.answers[0] if r.answers[0] is not None else "(no number)"
    assert out == [
        f"answer: {answer}",
        f"generated: {r.texts[0]!r}",
        f"forward passes: {r.passes[0]}",
    ]
    import shutil

    run = tmp_path / "run"  # a copy: kava eval records its results in the checkpoint
    shutil.copytree(tiny_run / "final", run / "final")
    ev = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(run), "--out", str(ev), "--limit", "4"]) == 0
    assert (run / "final" / "eval_results.json").is_file()
    metrics = json.loads((ev / "synthetic" / "metrics.json").read_text())
    assert metrics["n"] == 4
    assert metrics["accuracy"] == reasoner.evaluate("synthetic", limit=4)["accuracy"]


def test_python_dash_m_kava_is_the_kava_command():
    src = Path(__file__).resolve().parents[1] / "src"
    proc = subprocess.run(
        [sys.executable, "-m", "kava", "--help"],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: kava")
    for command in ("train", "eval", "solve", "push"):
        assert command in proc.stdout


def test_example_type_check(reasoner):
    with pytest.raises(TypeError, match=r"examples\[0\]"):
        reasoner.evaluate([("q", "1")])
    assert reasoner.evaluate([Example(QUESTIONS[0], (), "5")], limit=1)["n"] == 1


def test_readme_python_api_snippet(tiny_run, capsys):
    """The README's Python API block, run as written on the tiny run's final/."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    marker = "tests/test_api.py::test_readme_python_api_snippet"
    block = readme[readme.index(marker) :].split("```python\n", 1)[1].split("```", 1)[0]
    assert 'LatentReasoner.from_pretrained("runs/kava/final")' in block
    exec(block.replace("runs/kava/final", str(tiny_run / "final")), {})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[1].startswith("['")
