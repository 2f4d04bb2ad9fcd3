"""Bad input fails at once with kava's own one-line errors (exit 2), never a traceback,
a Hub round trip, or silence."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import yaml

import kava.checkpoint
import kava.train
from kava.cli import main
from kava.config import ConfigError, load_config
from kava.data import NAMED, DataError, Example, data_root, load_examples, read_file
from kava.train import check_cot
from test_train import write_config


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if anything tries to load a model (errors must come before)."""

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the error")

    monkeypatch.setattr(kava.train, "build_backbone", refuse)
    monkeypatch.setattr(kava.checkpoint, "build_backbone", refuse)


def last_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("spec", ["gsm8kk", "data/nonexistent.jsonl"])
def test_mistyped_dataset_fails_before_anything_loads(
    tmp_path, tiny_model_dir, no_model, capsys, spec
):
    cfg = write_config(tmp_path, tiny_model_dir)
    assert main(["train", str(cfg), "--set", f"data.train={spec}"]) == 2
    line = last_error_line(capsys)
    assert line.startswith("kava train: error:") and spec in line
    assert "gsm8k-train-eq" in line and "svamp" in line and "owner/name" in line
    assert not (tmp_path / "run").exists()
    assert main(["eval", "--config", str(cfg), "--datasets", f"gsm8k,{spec}"]) == 2
    assert spec in last_error_line(capsys)


def test_directory_and_non_utf8_files_are_data_errors(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path}: is a directory"):
        load_examples(str(tmp_path))
    f = tmp_path / "bad.jsonl"
    f.write_bytes(b'{"question": "q", "answer": "1"}\n{"question": "caf\xe9", "answer": "2"}\n')
    with pytest.raises(DataError, match=rf"{f}:2: not UTF-8 text \(byte 0xe9 at column 18\)"):
        read_file(f)


def test_gold_answers_unicode_minus_and_ambiguous_commas(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text(json.dumps({"question": "q", "answer": "\u22125"}) + "\n")
    assert read_file(f)[0].answer == "-5"
    f.write_text(
        json.dumps({"question": "q", "answer": "1,234.5"})
        + "\n"
        + json.dumps({"question": "q", "answer": "1.234,5"})
        + "\n"
    )
    with pytest.raises(DataError, match=rf"{f}:2: field 'answer': '1.234,5' is ambiguous"):
        read_file(f)


def test_scientific_notation_is_a_number(tmp_path):
    assert load_config(overrides=["train.lr=1e-3"]).train.lr == 1e-3
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 8e-4\n  warmup_ratio: 5E-2\n")
    assert yaml.safe_load(path.read_text())["train"]["lr"] == "8e-4"  # YAML 1.1 says string
    cfg = load_config(path)
    assert (cfg.train.lr, cfg.train.warmup_ratio) == (8e-4, 0.05)
    with pytest.raises(ConfigError, match="train.lr: expected a number, got 'fast'"):
        load_config(overrides=["train.lr=fast"])


@pytest.mark.parametrize(
    "override",
    [
        "train.log_every=0",
        "train.save_every=-1",
        "train.save_total_limit=-1",
        "train.num_workers=-1",
        "data.max_cot_tokens=-1",
        "data.max_question_tokens=0",
        "data.limit=0",
        "eval.limit=-1",
    ],
)
def test_bad_ranges_are_refused_before_anything_is_written(
    tmp_path, tiny_model_dir, no_model, capsys, override
):
    cfg = write_config(tmp_path, tiny_model_dir)
    assert main(["train", str(cfg), "--set", override]) == 2
    key = override.split("=")[0]
    assert f"error: --set {override}: {key}: must be" in last_error_line(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_cli_limit_must_be_positive(tmp_path, capsys, limit):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--checkpoint", str(tmp_path), "--limit", limit])
    assert e.value.code == 2
    assert "argument --limit: must be >= 1" in capsys.readouterr().err


def test_empty_question_is_refused(tmp_path, no_model, capsys):
    assert main(["solve", "--checkpoint", str(tmp_path), "  "]) == 2
    assert last_error_line(capsys) == "kava solve: error: the question is empty"


def test_cot_methods_refuse_data_without_cot(tmp_path, tiny_model_dir, capsys, caplog):
    # SVAMP's questions have no CoT (a copy: the test set itself is refused as training data)
    nocot = tmp_path / "no_cot.json"
    shutil.copy(data_root() / NAMED["svamp"], nocot)
    cfg = write_config(tmp_path, tiny_model_dir, data={"train": str(nocot)})
    assert main(["train", str(cfg), "--no-progress"]) == 2
    assert "none of the 1000 examples has a chain of thought" in last_error_line(capsys)
    assert not (tmp_path / "run").exists()
    some = [Example("q1", ("<<1+1=2>>",), "2"), Example("q2", (), "3")]
    with caplog.at_level(logging.WARNING):
        assert check_cot(some, load_config(overrides=["method=pccot"])) == 1
    assert "1 of 2 examples have no chain of thought" in caplog.text
    assert check_cot(some[1:], load_config(overrides=["method=nocot"])) == 0


def test_multi_line_errors_print_as_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1,\n")
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"kava train: error: {bad}: invalid YAML")
