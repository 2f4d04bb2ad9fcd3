"""Model selection on a validation split: the held-out GSM8k train sets, train.eval_every,
best/ (chosen on validation, restored across --resume) and experiments that test best/."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from safetensors.torch import load_file

from kava import evaluate as evaluate_module
from kava.cli import main
from kava.config import ConfigError, load_config
from kava.data import data_root, load_examples
from test_train import read_log, write_config


def _norm(q: str) -> str:
    return re.sub(r"\s+", " ", q).strip()


def _gsm8k_train_questions() -> list[str]:
    path = data_root() / "gsm8k" / "train.jsonl"
    return [_norm(json.loads(line)["question"]) for line in path.read_text().splitlines() if line]


def _valid_questions() -> set[str]:
    path = data_root() / "gsm8k_aug" / "valid.txt"
    return {_norm(line.split("||", 1)[0]) for line in path.read_text().split("\n") if line}


@pytest.mark.parametrize("name", ["gsm8k-train-eq", "gsm8k-train-nl"])
def test_held_out_train_sets_do_not_overlap_validation(name):
    valid = _valid_questions()
    assert len(valid) == 500
    examples = load_examples(name)
    questions = [_norm(e.question) for e in examples]
    assert len(examples) == 6973
    assert not set(questions) & valid  # the validation split never trains
    # with the validation questions they are exactly GSM8k's train questions
    assert set(questions) | valid == set(_gsm8k_train_questions())
    assert len(set(questions)) == len(questions)


def test_held_out_train_sets_have_the_two_trace_styles():
    eq = {e.question: e for e in load_examples("gsm8k-train-eq")}
    nl = {e.question: e for e in load_examples("gsm8k-train-nl")}
    assert eq.keys() == nl.keys()
    q = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?"  # noqa: E501
    assert eq[q].steps == ("<<48/2=24>>", "<<48+24=72>>") and eq[q].answer == "72"
    assert nl[q].answer == "72" and all("<<" not in s for s in nl[q].steps)
    assert "48/2 = 24" in " ".join(nl[q].steps)
    # the same gold answers in both styles
    assert all(eq[k].answer == nl[k].answer for k in eq)
    # equation traces are annotations only; 89 GSM8k solutions have none
    assert all(re.fullmatch(r"<<.*>>", s) for e in eq.values() for s in e.steps)
    assert sum(not e.steps for e in eq.values()) == 89


@pytest.mark.parametrize("test_set", ["gsm8k", "svamp", "gsm-hard", "multiarith", "gsm8k-aug-test"])
def test_selection_on_a_test_set_is_refused(test_set):
    with pytest.raises(ConfigError, match=r"train\.eval_dataset.*test set"):
        load_config(None, [f"train.eval_dataset={test_set}", "train.eval_every=10"])


@pytest.mark.parametrize("key", ["train.eval_dataset", "data.train"])
def test_a_test_set_file_is_refused_however_named(key, tmp_path):
    """A path to a test set's file is that test set, written any way (here through a
    symlink and a '..'), for selection and for training alike."""
    from kava.data import NAMED, data_root

    real = data_root() / NAMED["gsm8k"]
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.jsonl").symlink_to(real.resolve())
    for spec in (str(real), str(tmp_path / "sub" / ".." / "link.jsonl")):
        with pytest.raises(ConfigError, match=rf"{re.escape(key)}: .*the test set 'gsm8k'"):
            load_config(None, [f"{key}={spec}", "train.eval_every=10"])
    # another file is not a test set
    load_config(None, [f"{key}={data_root() / NAMED['gsm8k-aug-valid']}", "train.eval_every=10"])


@pytest.mark.parametrize("test_set", ["gsm8k", "svamp", "gsm-hard", "multiarith", "gsm8k-aug-test"])
def test_training_on_a_test_set_is_refused(test_set):
    """``data.train: gsm8k`` was the 1,319 test questions, with ``train_split: train``
    silently ignored; GSM8k's train split has its own names."""
    with pytest.raises(ConfigError, match=r"data\.train: .*test set.*gsm8k-train"):
        load_config(None, [f"data.train={test_set}"])
    load_config(None, ["data.train=gsm8k-train-eq"])


def test_a_split_for_data_without_splits_is_refused():
    for train in ("synthetic", "gsm8k-train", "gsm8k-train-eq"):
        with pytest.raises(ConfigError, match=r"data\.train_split: 'test': only a Hub"):
            load_config(None, [f"data.train={train}", "data.train_split=test"])
    cfg = load_config(None, ["data.train=whynlp/gsm8k-aug", "data.train_split=validation"])
    assert cfg.data.train_split == "validation"  # a Hub id: the split is its own


def test_eval_every_must_be_non_negative():
    with pytest.raises(ConfigError, match=r"train\.eval_every"):
        load_config(None, ["train.eval_every=-1"])


def _selection_config(tmp_path, tiny_model_dir, **train):
    return write_config(
        tmp_path,
        tiny_model_dir,
        train={"eval_every": 1, "eval_dataset": "synthetic", "eval_limit": 4, **train},
    )


class FakeValidation:
    """Stands in for kava.evaluate.evaluate: the given accuracies, one per call, in order;
    ``crash_at`` = the call (0-based) that raises, as a kill during training would stop it."""

    def __init__(self, accuracies, crash_at=None):
        self.accuracies = list(accuracies)
        self.calls = 0
        self.crash_at = crash_at

    def __call__(self, backbone, cfg, examples, **kw):
        assert kw["name"] == "validation" and len(examples) == 4
        assert cfg.eval.compile is False  # validation decodes eagerly
        if self.calls == self.crash_at:
            self.crash_at = None
            raise KeyboardInterrupt("killed")
        acc = self.accuracies.pop(0)
        self.calls += 1
        return {"accuracy": acc, "n": 4, "correct": round(4 * acc), "mean_forward_passes": 7.0}


def test_best_is_the_most_accurate_earliest_step_and_survives_resume(
    tmp_path, tiny_model_dir, monkeypatch
):
    # uninterrupted: accuracies per step 1..4; step 2 and 3 tie, the earlier one is best
    fake = FakeValidation([0.25, 0.5, 0.5, 0.25])
    monkeypatch.setattr(evaluate_module, "evaluate", fake)
    full_dir = tmp_path / "full"
    full_dir.mkdir()
    cfg = _selection_config(full_dir, tiny_model_dir)
    assert main(["train", str(cfg), "--no-progress"]) == 0
    run = full_dir / "run"
    log = read_log(run)
    assert [r["val_accuracy"] for r in log] == [0.25, 0.5, 0.5, 0.25]
    assert all(r["val_passes"] == 7.0 for r in log)
    selection = json.loads((run / "best" / "selection.json").read_text())
    assert selection["step"] == 2 and selection["accuracy"] == 0.5
    assert selection["dataset"] == "synthetic" and selection["split"] == "validation"
    assert json.loads((run / "data_stats.json").read_text())["validation"] == {
        "dataset": "synthetic",
        "n": 4,
    }
    # best/ holds the weights of step 2 (the step-2 checkpoint), not the final ones
    best = load_file(str(run / "best" / "trainable.safetensors"))
    step2 = load_file(str(run / "checkpoints" / "step-2" / "trainable.safetensors"))
    final = load_file(str(run / "final" / "trainable.safetensors"))
    assert best.keys() == step2.keys()
    assert all(torch.equal(best[k], step2[k]) for k in best)
    assert any(not torch.equal(best[k], final[k]) for k in best)
    assert not (run / "best" / "trainer_state.pt").exists()  # weights only

    # killed during step 3's validation, resumed from step-2: a later, less accurate step
    # must not replace best/ (the best so far is restored from the trainer state)
    part_dir = tmp_path / "part"
    part_dir.mkdir()
    cfg = _selection_config(part_dir, tiny_model_dir)
    monkeypatch.setattr(
        evaluate_module, "evaluate", FakeValidation([0.25, 0.5, 0.25, 0.25], crash_at=2)
    )
    with pytest.raises(KeyboardInterrupt):
        main(["train", str(cfg), "--no-progress"])
    assert main(["train", str(cfg), "--resume", "--no-progress"]) == 0
    run2 = part_dir / "run"
    assert json.loads((run2 / "best" / "selection.json").read_text())["step"] == 2
    best2 = load_file(str(run2 / "best" / "trainable.safetensors"))
    assert all(torch.equal(best2[k], best[k]) for k in best)
    assert [r["loss"] for r in read_log(run2)] == [r["loss"] for r in log]


def test_validation_accuracy_matches_eval_of_best(tmp_path, tiny_model_dir):
    """Unmocked: the logged val_accuracy of the selected step is what `kava eval` of best/
    measures on the same questions."""
    cfg = _selection_config(tmp_path, tiny_model_dir, max_steps=2, save_every=0)
    assert main(["train", str(cfg), "--no-progress"]) == 0
    run = tmp_path / "run"
    log = read_log(run)
    assert [r["step"] for r in log] == [1, 2] and all("val_accuracy" in r for r in log)
    selection = json.loads((run / "best" / "selection.json").read_text())
    logged = {r["step"]: r["val_accuracy"] for r in log}
    assert selection["accuracy"] == logged[selection["step"]] == max(logged.values())
    examples = load_examples(
        "synthetic", seed=0 + 1_000_003, synthetic_size=4, synthetic_steps=(2, 4), limit=4
    )
    data = tmp_path / "valid.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": e.question, "answer": f"{' '.join(e.steps)}\n#### {e.answer}"})
            + "\n"
            for e in examples
        )
    )
    out = tmp_path / "eval"
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(run / "best"),
                "--datasets",
                str(data),
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    metrics = json.loads(next(out.rglob("metrics.json")).read_text())
    assert metrics["n"] == 4 and metrics["accuracy"] == selection["accuracy"]


def test_experiment_tests_the_best_checkpoint(tmp_path, tiny_model_dir):
    from kava.experiments import load_spec, run_experiment

    base = yaml.safe_load(write_config(tmp_path, tiny_model_dir).read_text())
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "base": "base.yaml",
                "methods": ["pccot"],
                "seeds": [0],
                "overrides": {
                    "train.max_steps": 2,
                    "train.eval_every": 1,
                    "train.eval_dataset": "synthetic",
                    "train.eval_limit": 3,
                },
                "eval": {"datasets": ["synthetic"], "limit": 3},
                "output_dir": str(tmp_path / "exp"),
            }
        )
    )
    run_experiment(load_spec(spec), progress=False, echo=lambda *_: None)
    done = json.loads(next((tmp_path / "exp").rglob("DONE.json")).read_text())
    assert done["checkpoint"] == "best"
    assert done["selection"]["split"] == "validation" and done["selection"]["step"] in (1, 2)
