"""`kava demo` end to end at a tiny size: the numbers it prints do not depend on the
state of the global RNG when it starts (the README's table is what a fresh clone prints)."""

from __future__ import annotations

import json

import torch

from kava.cli import main

TINY = ["--set", "train.max_steps=1", "--set", "eval.limit=6", "--no-progress"]


def predictions(run, which):
    return (run / which / "synthetic" / "predictions.jsonl").read_text()


def test_demo_is_reproducible_whatever_the_global_rng(tmp_path):
    runs = []
    for k, seed in enumerate((1, 2)):
        torch.manual_seed(seed)  # as if another program had drawn before: must not matter
        out = tmp_path / f"demo{k}"
        assert main(["demo", "--out", str(out), *TINY]) == 0
        runs.append(out)
    a, b = runs
    for which in ("eval-untrained", "eval-trained", "nocot/eval-trained"):
        assert predictions(a, which) == predictions(b, which), which
    assert len(predictions(a, "eval-untrained").splitlines()) == 6
    rows = [json.loads((r / "demo_results.json").read_text())["rows"] for r in runs]
    assert [r["model"] for r in rows[0]] == ["untrained", "KaVa (trained)", "No-CoT (trained)"]
    assert rows[0][2]["mean_forward_passes"] < rows[0][1]["mean_forward_passes"]  # no latents
    for ra, rb in zip(*rows):  # the printed table, timings aside
        for key in ("model", "n", "correct", "accuracy", "mean_forward_passes"):
            assert ra[key] == rb[key], key
