"""train.report_to: experiment trackers through accelerate (TensorBoard by default)."""

from __future__ import annotations

import json

import pytest
import yaml

from kava.cli import main
from kava.config import TRACKERS, ConfigError, load_config
from kava.train import trackers


def test_known_trackers_are_accelerates():
    from accelerate.utils import LoggerType

    assert set(TRACKERS) == {str(t) for t in LoggerType} - {"all"}


@pytest.mark.parametrize(
    "value, expected",
    [
        ("none", []),
        ("[]", []),
        ("wandb", ["wandb"]),
        ("[tensorboard, mlflow]", ["tensorboard", "mlflow"]),
    ],
)
def test_report_to_values(value, expected):
    assert load_config(None, [f"train.report_to={value}"]).train.report_to == expected
    assert load_config(None).train.report_to == ["tensorboard"]


@pytest.mark.parametrize("value", ["tensorbord", "[none, wandb]", "[wandb, wandb]", "3"])
def test_bad_report_to_names_the_key(value):
    with pytest.raises(ConfigError, match="train.report_to"):
        load_config(None, [f"train.report_to={value}"])


def test_missing_tracker_package_is_a_config_error(tmp_path):
    cfg = load_config(None, ["train.report_to=[tensorboard, comet_ml]"])
    with pytest.raises(
        ConfigError,
        match=r"train.report_to: tracker 'comet_ml' needs the package comet-ml \(pip install comet-ml\)",
    ):
        trackers(cfg, tmp_path, available={"tensorboard"})
    (tb,) = trackers(load_config(None), tmp_path, available={"tensorboard"})
    assert (
        tb.name == "tensorboard" and tb.run_name == "tb" and tb.logging_dir_param == str(tmp_path)
    )


def test_tensorboard_gets_the_log_values(tiny_run):
    """The default tracker (accelerate's TensorBoard) holds log.jsonl's values per step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = [json.loads(line) for line in (tiny_run / "log.jsonl").read_text().splitlines()]
    events_dir = tiny_run / "tb"
    assert list(events_dir.glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events_dir))
    acc.Reload()
    for key in ("loss", "student_ce", "teacher_ce", "codi_loss", "kv_loss", "lr", "val_accuracy"):
        events = acc.Scalars(f"train/{key}")
        logged = [(r["step"], r[key]) for r in log if key in r]
        assert [e.step for e in events] == [s for s, _ in logged], key
        assert [e.value for e in events] == pytest.approx([v for _, v in logged], rel=1e-6), key


def test_report_to_none_writes_no_tracker_files(tmp_path, tiny_run):
    from conftest import tiny_run_config

    base = yaml.safe_load((tiny_run / "config.yaml").read_text())["model"]["name_or_path"]
    cfg = tiny_run_config(
        base, tmp_path / "run", train={"max_steps": 1, "eval_every": 0, "report_to": "none"}
    )
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "cfg.yaml"), "--no-progress"]) == 0
    assert (tmp_path / "run" / "final").is_dir() and not (tmp_path / "run" / "tb").exists()
