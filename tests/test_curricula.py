"""iCoT's removal schedule and Coconut's stages: hand-computed schedules, the sequences
they build token by token, the optimizer resets, and exact resume across a switch."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import EXAMPLES
from kava.batching import encode, encode_steps
from kava.cli import main
from kava.config import CoconutConfig, ConfigError, IcotConfig, load_config
from kava.curricula import (
    Curriculum,
    coconut_stage,
    icot_removal,
    smoothing_distribution,
)
from kava.experiments import load_spec
from kava.methods import METHODS
from kava.parallel import steps_per_epoch
from test_train import read_log, write_config

INF = math.inf


@pytest.mark.parametrize(
    "steps_per_epoch, per_epoch, start, beyond, expected",
    [
        # round(10 / 4) = 2 steps per token; from 3 on, everything
        (10, 4.0, 0, 3, [0, 0, 1, 1, 2, 2, INF, INF]),
        # round(12 / 8) = 2 (rounding half to even, as Python's round in the official code)
        (12, 8.0, 0, None, [0, 0, 1, 1, 2, 2, 3, 3]),
        # more tokens per epoch than steps: round(3 / 8) = 0 -> one token per step
        (3, 8.0, 0, 39, [0, 1, 2, 3, 4, 5, 6, 7]),
        (10, 4.0, 5, 7, [5, 5, 6, 6, INF, INF, INF, INF]),  # remove_start_from
    ],
)
def test_icot_removal_schedule(steps_per_epoch, per_epoch, start, beyond, expected):
    cfg = IcotConfig(
        remove_per_epoch=per_epoch, remove_start_from=start, remove_all_when_remove_beyond=beyond
    )
    assert [icot_removal(s, steps_per_epoch, cfg) for s in range(8)] == expected


def test_smoothing_distribution():
    p = smoothing_distribution(4.0)
    assert p.shape == (100,) and p.sum().item() == pytest.approx(1.0, abs=1e-12)
    for s in (0, 1, 2):
        assert p[s].item() == pytest.approx((1 - math.exp(-4)) * math.exp(-4 * s))
    assert smoothing_distribution(None).tolist() == [1.0] + [0.0] * 99


@pytest.mark.parametrize(
    "steps_per_epoch, per_stage, expected",
    [
        # 4 steps per stage; past stage 3 (the last latent one) the stage stays 4
        (4, 1.0, [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4 + [4] * 3),
        (6, 1 / 3, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 4, 4]),  # round(6 / 3) = 2 steps per stage
    ],
)
def test_coconut_stage_schedule(steps_per_epoch, per_stage, expected):
    cfg = CoconutConfig(max_latent_stage=3, epochs_per_stage=per_stage)
    assert [coconut_stage(s, steps_per_epoch, cfg) for s in range(len(expected))] == expected


def test_icot_sequences_token_by_token(make_backbone):
    bb = make_backbone()
    cfg = load_config(
        overrides=[
            "method=icot",
            "icot.remove_per_epoch=1",
            "icot.removal_smoothing_lambda=null",
            "icot.remove_all_when_remove_beyond=6",
        ]
    )
    items = [encode(q, s, a, bb.tokenizer, bb.ids, drop_last_step=False) for q, s, a in EXAMPLES]
    cur = Curriculum(cfg, steps_per_epoch=1, ids=bb.ids)  # one more token each step
    for step in range(8):
        built = cur.batch(items, step)
        removed = icot_removal(step, 1, cfg.icot)
        teacher = built.batch.teacher
        for row, e in enumerate(items):
            n = len(e.cot) if math.isinf(removed) else int(removed)
            want = e.question + e.cot[n:] + e.prompt + e.answer + [bb.ids.eos]
            got = teacher.input_ids[row][teacher.attention_mask[row]].tolist()
            assert got == want, (step, row)
            labels = teacher.labels[row][: len(want)].tolist()
            assert labels == [-100] * len(e.question) + want[len(e.question) :]
        short = sum(0 < len(e.cot) <= removed for e in items if not math.isinf(removed))
        assert built.cot_exhausted == short  # counted, never dropped


def test_icot_smoothing_offsets_are_seeded_per_step(make_backbone):
    bb = make_backbone()
    cfg = load_config(overrides=["method=icot", "icot.removal_smoothing_lambda=0.3"])
    items = [encode(q, s, a, bb.tokenizer, bb.ids, drop_last_step=False) for q, s, a in EXAMPLES]
    a = Curriculum(cfg, 10, bb.ids).batch(items * 8, step=3, micro=1).batch.teacher.input_ids
    b = Curriculum(cfg, 10, bb.ids).batch(items * 8, step=3, micro=1).batch.teacher.input_ids
    c = Curriculum(cfg, 10, bb.ids).batch(items * 8, step=4, micro=1).batch.teacher.input_ids
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_coconut_batches_follow_the_stage(make_backbone):
    bb = make_backbone()
    cfg = load_config(
        overrides=[
            "method=coconut",
            "coconut.thoughts_per_step=2",
            "coconut.max_latent_stage=2",
            "coconut.epochs_per_stage=1",
        ]
    )
    items = [encode_steps(q, s, a, bb.tokenizer, bb.ids) for q, s, a in EXAMPLES]
    cur = Curriculum(cfg, steps_per_epoch=1, ids=bb.ids)
    for step, thoughts in [(0, 0), (1, 2), (2, 4), (3, 4), (9, 4)]:
        batch = cur.batch(items, step).batch
        assert batch.thought_mask.tolist() == [[True] * thoughts] * len(items)
        for row, e in enumerate(items):
            skip = len(e.steps) if step > 2 else min(step, len(e.steps))
            rest = [bb.ids.eot] + [t for s in e.steps[skip:] for t in s] + e.prompt + e.answer
            got = batch.rest_ids[row][batch.rest_mask[row]].tolist()
            assert got == rest + [bb.ids.eos]
    assert [cur.switches_at(s) for s in range(5)] == [False, True, True, True, False]
    assert not cur.switches_at(9)  # past the last stage nothing changes


def adam_steps(path) -> set[int]:
    state = torch.load(path / "trainer_state.pt", weights_only=False)["optimizer"]["state"]
    return {int(s["step"]) for s in state.values()}


CURRICULA = {
    # 24 examples / 4 per step = 6 steps per epoch; 3 tokens per epoch: one per 2 steps
    "icot": dict(icot={"remove_per_epoch": 3.0, "remove_all_when_remove_beyond": 2}),
    # stage = step // 2, max stage 2: stages 0 0 1 1 2 2 3 3
    "coconut": dict(
        coconut={"thoughts_per_step": 1, "max_latent_stage": 2, "epochs_per_stage": 1 / 3}
    ),
}


@pytest.mark.parametrize("method", list(CURRICULA))
def test_resume_across_switches_is_exact_and_resets_the_optimizer(tmp_path, tiny_model_dir, method):
    cfg = write_config(
        tmp_path,
        tiny_model_dir,
        method=method,
        train={"max_steps": 8, "save_every": 1, "save_total_limit": 0, "warmup_ratio": 0.0},
    )
    cfg.write_text(yaml.safe_dump({**yaml.safe_load(cfg.read_text()), **CURRICULA[method]}))
    assert main(["train", str(cfg), "--no-progress"]) == 0
    run = tmp_path / "run"
    full = read_log(run)
    want = (
        [0, 0, 1, 1, "all", "all", "all", "all"] if method == "icot" else [0, 0, 1, 1, 2, 2, 3, 3]
    )
    assert [r["curriculum"] for r in full] == want
    assert all(r["student_ce" if method == "coconut" else "teacher_ce"] > 0 for r in full)
    # the optimizer starts afresh at each switch (steps 2, 4, 6; iCoT: 2, 4)
    ckpt = run / "checkpoints"
    switches = {2, 4} if method == "icot" else {2, 4, 6}
    since = 0
    for step in range(1, 8):
        since = 1 if step - 1 in switches else since + 1
        assert adam_steps(ckpt / f"step-{step}") == {since}, step

    # interrupted after step 3 (inside a stage): steps 4-8 cross two switches again
    shutil.rmtree(run / "final")
    for step in range(4, 8):
        shutil.rmtree(ckpt / f"step-{step}")
    assert main(["train", str(cfg), "--no-progress", "--resume"]) == 0
    resumed = read_log(run)
    assert [r["step"] for r in resumed] == list(range(1, 9))
    for a, b in zip(full, resumed):
        assert a["curriculum"] == b["curriculum"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7), (a, b)


# --- training reaches the form evaluation answers in ---------------------------------------

REPO = Path(__file__).resolve().parents[1]
SHIPPED_CONFIGS = sorted((REPO / "src" / "kava" / "configs").glob("*.yaml"))
SHIPPED_SPECS = sorted(
    [*(REPO / "experiments").glob("*.yaml"), *(REPO / "results").glob("*/*.yaml")]
)
CURRICULUM_METHODS = [m for m, spec in METHODS.items() if spec.curriculum != "none"]


def eval_form_check(cfg, longest_cot=10_000):
    """``check_reaches_eval_form`` at the run's own schedule: the exact steps per epoch of
    synthetic data, a nominal 1,000 for a named dataset (the check is then a ratio of
    epochs, to rounding)."""
    t = cfg.train
    if cfg.data.train == "synthetic":
        accum = t.global_batch_size // t.micro_batch_size
        spe = steps_per_epoch(cfg.data.synthetic_train_size, t.micro_batch_size, accum, 1)
    else:
        spe = 1000
    total = t.max_steps or math.ceil(t.epochs * spe)
    return Curriculum(cfg, spe, None).check_reaches_eval_form(longest_cot, total)


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.stem)
@pytest.mark.parametrize("method", CURRICULUM_METHODS)
def test_shipped_configs_train_the_form_they_are_evaluated_in(path, method):
    """Every config kava ships, trained with iCoT or Coconut, reaches the layout its
    evaluation answers in (no written CoT) and spends at least a tenth of training there."""
    cfg = load_config(path, [f"method={method}"])
    first = eval_form_check(cfg)
    total = cfg.train.max_steps or math.ceil(cfg.train.epochs * 1000)
    if cfg.data.train != "synthetic":
        assert first <= 0.9 * total, (first, total)


@pytest.mark.parametrize("path", SHIPPED_SPECS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_shipped_experiments_train_the_form_they_are_evaluated_in(path):
    for run in load_spec(path).runs:
        if run.cfg.method_spec.curriculum != "none":
            eval_form_check(run.cfg)  # raises naming the keys


@pytest.mark.parametrize(
    "method, over, steps_per_epoch, total, longest, first",
    [
        # stage 3 + 1 = 4 from step 4 x round(0.75 x 55) = 4 x 41 = 164 (< 165: reached)
        ("coconut", {"coconut.epochs_per_stage": 0.75}, 55, 165, 50, 164),
        ("coconut", {"coconut.epochs_per_stage": 0.75}, 55, 164, 50, None),  # ends at 164
        ("coconut", {"coconut.max_latent_stage": 1, "coconut.epochs_per_stage": 1}, 10, 21, 9, 20),
        # iCoT: round(55 / 16) = 3 steps per token, all removed once 39 are: step 117
        ("icot", {"icot.remove_per_epoch": 16}, 55, 165, 80, 117),
        ("icot", {"icot.remove_per_epoch": 16}, 55, 117, 80, None),
        # the longest CoT (20 tokens) gone before 39: step 60; without the jump: the longest
        ("icot", {"icot.remove_per_epoch": 16}, 55, 61, 20, 60),
        ("icot", {"icot.remove_all_when_remove_beyond": None}, 16, 100, 30, 60),
        ("icot", {"icot.remove_start_from": 5, "icot.remove_per_epoch": 16}, 16, 35, 30, 25),
    ],
)
def test_eval_form_step(method, over, steps_per_epoch, total, longest, first):
    cfg = load_config(overrides={"method": method, **over})
    cur = Curriculum(cfg, steps_per_epoch, None)
    if first is None:
        with pytest.raises(ConfigError, match="before the curriculum reaches the form") as err:
            cur.check_reaches_eval_form(longest, total)
        key = "coconut.epochs_per_stage" if method == "coconut" else "icot.remove_per_epoch"
        assert key in str(err.value) and f"after {total} steps" in str(err.value)
    else:
        assert cur.eval_form_step(longest) == first
        assert cur.check_reaches_eval_form(longest, total) == first
        # the schedule itself: the step before has a written CoT left, the step has none
        if method == "coconut":
            top = cfg.coconut.max_latent_stage
            assert coconut_stage(first, steps_per_epoch, cfg.coconut) == top + 1
            assert coconut_stage(first - 1, steps_per_epoch, cfg.coconut) == top
        else:
            removal = [icot_removal(s, steps_per_epoch, cfg.icot) for s in (first - 1, first)]
            assert removal[0] < longest and removal[1] >= longest


def test_training_that_never_reaches_the_eval_form_is_refused(tmp_path, tiny_model_dir, capsys):
    """``kava train`` refuses before its first step, naming the keys; with a schedule that
    does reach it, the log line says from which step."""
    path = write_config(
        tmp_path,
        tiny_model_dir,
        method="coconut",
        coconut={"max_latent_stage": 2, "epochs_per_stage": 1},
        train={"max_steps": 3},
    )
    assert main(["train", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "coconut.epochs_per_stage" in err and "training ends after 3 steps" in err
    assert not (tmp_path / "run" / "final").exists()
