"""Run folders: a refused train writes nothing; --resume refuses config changes that
alter the training (naming each key) and records the allowed ones."""

from __future__ import annotations

import json

import pytest

from kava.cli import main
from kava.config import KavaConfig
from kava.rundir import RESUME_HISTORY, config_changes, mutable
from test_train import write_config


def snapshot(run):
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in run.rglob("*") if p.is_file()}


@pytest.fixture
def finished_run(tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path, tiny_model_dir, train={"max_steps": 2, "save_every": 1})
    assert main(["train", str(cfg), "--no-progress"]) == 0
    return cfg, tmp_path / "run"


def test_refused_train_leaves_the_run_folder_untouched(finished_run, capsys):
    cfg, run = finished_run
    before = snapshot(run)
    assert main(["train", str(cfg), "--no-progress", "--set", "train.lr=0.5"]) == 2
    assert "already holds a training run" in capsys.readouterr().err
    assert snapshot(run) == before


def test_resume_with_a_changed_schedule_is_refused_naming_each_key(finished_run, capsys):
    cfg, run = finished_run
    before = snapshot(run)
    changed = ["--set", "train.lr=0.02", "--set", "train.max_steps=8", "--set", "eval.limit=2"]
    assert main(["train", str(cfg), "--no-progress", "--resume", *changed]) == 2
    err = capsys.readouterr().err
    assert "train.lr: 0.01 -> 0.02" in err and "train.max_steps: 2 -> 8" in err
    assert "eval.limit" not in err.split("(only these")[0]  # allowed, not listed as refused
    assert snapshot(run) == before


def test_allowed_changes_on_resume_are_recorded(finished_run):
    cfg, run = finished_run
    config_before = (run / "config.yaml").read_bytes()
    # train.fused_qkv: the resumed steps run the fused q/k/v projections (kava.qkv)
    extra = ["--set", "train.log_every=2", "--set", "eval.limit=3", "--set", "train.fused_qkv=true"]
    assert main(["train", str(cfg), "--no-progress", "--resume", *extra]) == 0
    assert (run / "config.yaml").read_bytes() == config_before
    (rec,) = [json.loads(x) for x in (run / RESUME_HISTORY).read_text().splitlines()]
    assert rec["step"] == 1
    assert rec["changes"] == {
        "eval.limit": {"old": 6, "new": 3},
        "train.fused_qkv": {"old": False, "new": True},
        "train.log_every": {"old": 1, "new": 2},
    }


def test_mutable_keys():
    assert mutable("eval.batch_size") and mutable("train.save_every")
    assert mutable("train.fused_qkv") and mutable("train.attention")
    for key in ("train.max_steps", "train.epochs", "train.lr", "train.global_batch_size"):
        assert not mutable(key), key
    a, b = KavaConfig(), KavaConfig()
    b.train.epochs = 3.0
    assert config_changes(a, b) == {"train.epochs": (10.0, 3.0)}


def test_validation_decoding_budget_is_fixed_on_resume(tmp_path, tiny_model_dir, capsys):
    """A run that chooses best/ on validation keeps the decoding budget its earlier
    validations used: changing it would make best/ compare unlike accuracies. Without
    validation, the budget is free (as every other eval.* key)."""
    assert mutable("eval.max_new_tokens") and not mutable("eval.max_new_tokens", True)
    assert not mutable("eval.cot_max_new_tokens", True) and mutable("eval.batch_size", True)
    cfg = write_config(
        tmp_path,
        tiny_model_dir,
        train={"max_steps": 2, "save_every": 1, "eval_every": 1, "eval_limit": 2},
    )
    over = ["--set", "train.eval_dataset=synthetic"]
    assert main(["train", str(cfg), "--no-progress", *over]) == 0
    run = tmp_path / "run"
    before = snapshot(run)
    budget = ["--set", "eval.max_new_tokens=7", "--set", "eval.batch_size=1"]
    assert main(["train", str(cfg), "--no-progress", "--resume", *over, *budget]) == 2
    err = capsys.readouterr().err
    assert "eval.max_new_tokens: 4 -> 7" in err and "while train.eval_every" in err
    assert "eval.batch_size" not in err.split("(only these")[0]
    assert snapshot(run) == before
