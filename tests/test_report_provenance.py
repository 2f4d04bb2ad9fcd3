"""kava report: per-run provenance from manifest.json, and no row mixing configurations."""

from __future__ import annotations

import json
import shutil

import pytest

from kava.cli import main
from kava.config import load_config
from kava.report import MixedConfigsError, make_report


def make_experiment(root, runs):
    """runs: (name, method, seed, config overrides, manifest source folder or None)."""
    for index, (name, method, seed, overrides, manifest_from) in enumerate(runs):
        d = root / "runs" / name
        (d / "eval" / "synthetic").mkdir(parents=True)
        cfg = load_config(
            None, [f"method={method}", f"train.seed={seed}", f"train.output_dir={d}", *overrides]
        )
        done = {"run": name, "index": index, "method": method, "seed": seed, "variant": []}
        done.update(datasets=["synthetic"], config=cfg.to_dict())
        (d / "DONE.json").write_text(json.dumps(done))
        metrics = {"n": 10, "accuracy": 0.1 * (index + 1), "mean_forward_passes": 5.0}
        (d / "eval" / "synthetic" / "metrics.json").write_text(json.dumps(metrics))
        if manifest_from is not None:
            shutil.copy(manifest_from / "manifest.json", d / "manifest.json")
    return root


def test_report_lists_versions_and_commit(tiny_run, tmp_path):
    exp = make_experiment(
        tmp_path / "exp",
        [
            ("kava__seed0", "kava", 0, [], tiny_run),
            ("kava__seed1", "kava", 1, [], None),
        ],
    )
    res = make_report(exp, eviction=False)
    md = res["files"]["markdown"].read_text()
    manifest = json.loads((tiny_run / "manifest.json").read_text())
    section = md[md.index("## Provenance") :]
    row0 = next(line for line in section.splitlines() if line.startswith("| kava__seed0 "))
    assert manifest["git_commit"][:12] in row0 and manifest["packages"]["torch"] in row0
    assert manifest["kava_version"] in row0
    row1 = next(line for line in section.splitlines() if line.startswith("| kava__seed1 "))
    assert row1.count("unknown") == 7
    assert "| KaVa | 2 |" in md  # the two seeds are one row


def test_report_refuses_a_row_of_different_configs(tmp_path, capsys):
    exp = make_experiment(
        tmp_path / "exp",
        [
            ("kava__seed0", "kava", 0, [], None),
            ("kava__seed1", "kava", 1, ["train.lr=0.001", "kv_loss.type=mse"], None),
            ("cot__seed0", "cot", 0, ["train.lr=0.5"], None),  # its own row: fine
        ],
    )
    with pytest.raises(MixedConfigsError, match=r"'KaVa'.*differ in kv_loss.type, train.lr"):
        make_report(exp, eviction=False)
    assert main(["report", str(exp), "--no-eviction-plot"]) == 2
    assert "kava__seed0 and kava__seed1 differ in kv_loss.type, train.lr" in capsys.readouterr().err


def test_report_row_may_mix_speed_options(tmp_path):
    """Seeds run eager and compiled (train.compile, train.attention: the same training,
    rounded differently) are one row, as kava experiment counts them as the same run."""
    exp = make_experiment(
        tmp_path / "exp",
        [
            ("kava__seed0", "kava", 0, [], None),
            ("kava__seed1", "kava", 1, ["train.compile=layers", "train.attention=grouped"], None),
        ],
    )
    md = make_report(exp, eviction=False)["files"]["markdown"].read_text()
    assert "| KaVa | 2 |" in md
