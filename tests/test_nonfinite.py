"""train.on_nonfinite: a diverging run stops (or skips) without applying or saving NaN
weights; log.jsonl stays valid JSON; NaN weights are refused at load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from kava.checkpoint import CheckpointError, load_trainable, save_checkpoint, trainable_state
from kava.cli import main
from kava.config import KavaConfig
from test_train import write_config

DIVERGE = ["--set", "train.lr=10000", "--set", "train.warmup_ratio=0"]


def strict_log(run) -> list[dict]:
    """Every line of log.jsonl parsed by a JSON parser that refuses NaN / Infinity."""

    def refuse(token):
        raise AssertionError(f"bare {token} in log.jsonl")

    lines = (run / "log.jsonl").read_text().splitlines()
    return [json.loads(line, parse_constant=refuse) for line in lines]


def test_divergence_stops_with_a_clear_error_and_no_nan_checkpoint(
    tmp_path, tiny_model_dir, capsys
):
    cfg = write_config(tmp_path, tiny_model_dir, train={"max_steps": 6, "save_every": 1})
    assert main(["train", str(cfg), "--no-progress", *DIVERGE]) == 1
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.splitlines()[-1].startswith("kava train: error:")
    assert "error: step 2: non-finite grad_norm" in err and "train.on_nonfinite=skip" in err
    run = tmp_path / "run"
    assert "checkpoints/step-1 holds the last good weights" in err
    assert not (run / "final").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1"]
    state = torch.load(run / "checkpoints" / "step-1" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 1
    log = strict_log(run)
    assert log[0]["step"] == 1 and isinstance(log[0]["grad_norm"], float)
    assert log[-1]["step"] == 2 and "grad_norm" in log[-1]["nonfinite"]


def test_skip_counts_skipped_steps_and_stops_after_n_in_a_row(tmp_path, tiny_model_dir, capsys):
    cfg = write_config(
        tmp_path,
        tiny_model_dir,
        train={"max_steps": 8, "save_every": 0, "on_nonfinite": "skip", "max_consecutive_skips": 3},
    )
    assert main(["train", str(cfg), "--no-progress", *DIVERGE]) == 1
    err = capsys.readouterr().err
    assert "step 4: non-finite" in err and "3 steps in a row skipped" in err
    log = strict_log(tmp_path / "run")
    regular = [r for r in log if "skipped_steps" in r]
    assert [r["step"] for r in regular] == [1, 2, 3]
    assert [r["skipped_steps"] for r in regular] == [0, 1, 2]
    assert regular[1]["loss"] is None and "grad_norm" in regular[1]["nonfinite"]
    assert not (tmp_path / "run" / "final").exists()


def test_grad_norm_is_logged_without_clipping(tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path, tiny_model_dir, train={"max_steps": 2, "grad_clip": 0})
    assert main(["train", str(cfg), "--no-progress"]) == 0
    log = strict_log(tmp_path / "run")
    assert all(isinstance(r["grad_norm"], float) and r["grad_norm"] > 0 for r in log)
    assert all(r["skipped_steps"] == 0 and "nonfinite" not in r for r in log)


def test_nan_weights_are_refused_at_load_and_at_save(tmp_path, make_backbone):
    bb = make_backbone()
    state = trainable_state(bb)
    name = sorted(state)[0]
    state[name][0] = float("nan")
    (tmp_path / "ckpt").mkdir()
    save_file(state, str(tmp_path / "ckpt" / "trainable.safetensors"))
    with pytest.raises(CheckpointError, match=rf"trainable.safetensors: tensor {name} holds NaN"):
        load_trainable(bb, tmp_path / "ckpt")
    with torch.no_grad():
        dict(bb.named_parameters())[name][0] = float("inf")
    with pytest.raises(CheckpointError, match=f"not saved: tensor {name}"):
        save_checkpoint(tmp_path / "out", bb, KavaConfig())
    assert not (tmp_path / "out").exists()
