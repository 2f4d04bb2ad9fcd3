"""End to end through the CLI on a tiny local model: train, checkpoint, resume exactly, evaluate."""

from __future__ import annotations

import json

import pytest
import yaml

from kava.cli import main


def write_config(tmp_path, model_dir, **extra):
    cfg = {
        "method": "kava",
        "model": {"name_or_path": str(model_dir)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "latent": {"num_latents": 3, "num_iterations": 2},
        "data": {"train": "synthetic", "synthetic_train_size": 24},
        "train": {
            "output_dir": str(tmp_path / "run"),
            "max_steps": 4,
            "global_batch_size": 4,
            "micro_batch_size": 2,
            "lr": 0.01,
            "save_every": 2,
            "warmup_ratio": 0.25,
        },
        "eval": {"datasets": ["synthetic"], "limit": 6, "batch_size": 4, "max_new_tokens": 4},
    }
    for k, v in extra.items():
        cfg.setdefault(k, {}).update(v) if isinstance(v, dict) else cfg.__setitem__(k, v)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_train_resume_is_exact(tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path, tiny_model_dir)
    assert main(["train", str(cfg), "--no-progress"]) == 0
    run = tmp_path / "run"
    full = read_log(run)
    assert [r["step"] for r in full] == [1, 2, 3, 4]
    for r in full:
        assert {
            "loss",
            "student_ce",
            "teacher_ce",
            "codi_loss",
            "kv_loss",
            "lr",
            "tokens_per_s",
        } <= r.keys()
        assert r["kv_loss"] > 0 and r["codi_loss"] > 0 and r["tokens_per_s"] > 0
    final = run / "final"
    for f in (
        "trainable.safetensors",
        "config.yaml",
        "trainer_state.pt",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "tokenizer/tokenizer_config.json",
    ):
        assert (final / f).is_file(), f
    assert (run / "checkpoints" / "step-2" / "trainer_state.pt").is_file()
    assert list((run / "tb").iterdir())
    assert json.loads((run / "data_stats.json").read_text())["kept"] == 24

    # interrupt after step 2 (drop what came later), resume: identical steps 3-4
    import shutil

    shutil.rmtree(final)
    assert main(["train", str(cfg), "--no-progress", "--resume"]) == 0  # drops log lines > 2
    resumed = read_log(run)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(full[2:], resumed[2:]):
        for k in ("loss", "student_ce", "teacher_ce", "codi_loss", "kv_loss", "lr"):
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-7), (k, a, b)

    # evaluate the final checkpoint through the CLI
    out = tmp_path / "eval"
    assert (
        main(
            ["eval", "--checkpoint", str(final), "--out", str(out), "--limit", "5", "--no-progress"]
        )
        == 0
    )
    metrics = json.loads((out / "synthetic" / "metrics.json").read_text())
    preds = [
        json.loads(x) for x in (out / "synthetic" / "predictions.jsonl").read_text().splitlines()
    ]
    assert metrics["n"] == len(preds) == 5
    assert metrics["accuracy"] == pytest.approx(sum(p["correct"] for p in preds) / 5)
    assert metrics["mean_forward_passes"] == pytest.approx(sum(p["passes"] for p in preds) / 5)
    assert all(p["passes"] == 1 + 2 + p["generated_tokens"] for p in preds)  # 1 + T + 1 + (k - 1)

    assert (
        main(
            ["solve", "--checkpoint", str(final), "Tom has 3 apples and buys 2 more. How many now?"]
        )
        == 0
    )


def test_fresh_run_into_an_existing_run_is_a_clear_error(tmp_path, tiny_model_dir, capsys):
    cfg = write_config(tmp_path, tiny_model_dir, train={"max_steps": 1})
    assert main(["train", str(cfg), "--no-progress"]) == 0
    assert main(["train", str(cfg), "--no-progress"]) == 2
    assert "already holds a training run" in capsys.readouterr().err


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, tiny_model_dir, capsys):
    cfg = write_config(tmp_path, tiny_model_dir)
    assert main(["train", str(cfg), "--no-progress", "--resume"]) == 2
    assert "no checkpoints" in capsys.readouterr().err


def test_length_filter_counts_skips(tmp_path, tiny_model_dir, capsys):
    cfg = write_config(
        tmp_path, tiny_model_dir, data={"max_question_tokens": 48}, train={"max_steps": 1}
    )
    assert main(["train", str(cfg), "--no-progress"]) == 0
    stats = json.loads((tmp_path / "run" / "data_stats.json").read_text())
    assert stats["skipped"]["question_too_long"] > 0
    assert stats["kept"] + sum(stats["skipped"].values()) == 24
    assert f"skipped {stats['skipped']['question_too_long']}" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["cot", "nocot"])
def test_baseline_checkpoints_reload_and_evaluate(tmp_path, tiny_model_dir, method):
    """cot / nocot train without the projection; their checkpoints must load back."""
    cfg = write_config(tmp_path, tiny_model_dir, method=method, train={"max_steps": 1})
    assert main(["train", str(cfg), "--no-progress"]) == 0
    final = tmp_path / "run" / "final"
    out = tmp_path / "eval"
    assert (
        main(
            ["eval", "--checkpoint", str(final), "--out", str(out), "--limit", "2", "--no-progress"]
        )
        == 0
    )
    metrics = json.loads((out / "synthetic" / "metrics.json").read_text())
    assert metrics["method"] == method and metrics["n"] == 2


def test_data_smaller_than_the_global_batch_trains(tmp_path, tiny_model_dir):
    """3 micro-batches per epoch, a global batch of 4: each step takes the whole epoch."""
    cfg = write_config(
        tmp_path,
        tiny_model_dir,
        data={"synthetic_train_size": 6},
        train={"max_steps": 2, "global_batch_size": 8, "micro_batch_size": 2, "save_every": 0},
    )
    assert main(["train", str(cfg), "--no-progress"]) == 0
    assert [r["step"] for r in read_log(tmp_path / "run")] == [1, 2]
