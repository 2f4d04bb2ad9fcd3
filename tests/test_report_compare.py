"""kava report --compare DIR: this experiment's accuracy minus another's, paired by seed."""

from __future__ import annotations

import csv
import json
import math

import pytest

from kava.cli import main
from kava.config import load_config
from kava.report import MixedConfigsError, ReportError, make_report


def make_experiment(root, runs, overrides=(), n=100):
    """runs: (method, seed, {dataset: accuracy}); one folder per run as kava experiment
    writes it (DONE.json, eval/<dataset>/metrics.json), configs with ``overrides``."""
    for index, (method, seed, accs) in enumerate(runs):
        d = root / "runs" / f"{method}__seed{seed}"
        sets = [f"method={method}", f"train.seed={seed}", f"train.output_dir={d}", *overrides]
        cfg = load_config(None, sets)
        done = {"run": d.name, "index": index, "method": method, "seed": seed, "variant": []}
        done.update(datasets=list(accs), config=cfg.to_dict())
        for ds, acc in accs.items():
            (d / "eval" / ds).mkdir(parents=True)
            metrics = {"n": n, "accuracy": acc, "mean_forward_passes": 8.0}
            (d / "eval" / ds / "metrics.json").write_text(json.dumps(metrics))
        (d / "DONE.json").write_text(json.dumps(done))
    return root


def test_compare_pairs_seeds_and_subtracts(tmp_path, capsys):
    eq = make_experiment(
        tmp_path / "eq",
        [
            ("kava", 0, {"a": 0.10, "b": 0.50}),
            ("kava", 1, {"a": 0.20, "b": 0.50}),
            ("kava", 2, {"a": 0.30, "b": 0.50}),  # no seed 2 in nl: left out of the pairs
            ("pccot", 0, {"a": 0.40, "b": 0.40}),
        ],
    )
    nl = make_experiment(
        tmp_path / "nl",
        [
            ("kava", 0, {"a": 0.15, "b": 0.50}),
            ("kava", 1, {"a": 0.10, "b": 0.50}),
            ("pccot", 0, {"a": 0.30, "b": 0.45}),
            ("cot", 0, {"a": 0.90, "b": 0.90}),  # not in eq: no comparison row
        ],
        overrides=["data.train=gsm8k-train-nl", "train.compile=layers"],  # compile: not a diff
    )
    res = make_report(nl, eviction=False, compare=eq)
    got = {(r["method"], r["dataset"]): r for r in res["comparison"]}
    assert set(got) == {(m, d) for m in ("kava", "pccot") for d in ("a", "b")}
    kava_a = got[("kava", "a")]  # differences +0.05 and -0.10 over seeds 0 and 1
    assert kava_a["n"] == 2 and kava_a["seeds"] == "0 1"
    assert kava_a["baseline_accuracy_mean"] == pytest.approx(0.15)
    assert kava_a["accuracy_mean"] == pytest.approx(0.125)
    assert kava_a["difference_mean"] == pytest.approx(-0.025)
    assert kava_a["difference_std"] == pytest.approx(math.sqrt(2 * 0.075**2))
    assert got[("kava", "b")]["difference_std"] == pytest.approx(0.0)
    assert got[("pccot", "a")]["difference_mean"] == pytest.approx(-0.10)
    assert got[("pccot", "a")]["difference_std"] is None  # one seed: no std
    assert {r["config_differs_in"] for r in res["comparison"]} == {"data.train"}

    md = res["files"]["markdown"].read_text()
    assert f"## Against `{eq}`" in md
    row = "| KaVa | 0 1 | 15.00 -> 12.50 (-2.50 ± 10.61) | 50.00 -> 50.00 (+0.00 ± 0.00) |"
    assert row + " `data.train` |" in md
    assert "| PCCoT | 0 | 40.00 -> 30.00 (-10.00) | 40.00 -> 45.00 (+5.00) | `data.train` |" in md
    assert "| CoT |" not in md.split("## Against")[1].split("##")[0]
    with res["files"]["comparison_csv"].open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["dataset"]) for r in rows] == [  # the paper's order of rows
        ("pccot", "a"),
        ("pccot", "b"),
        ("kava", "a"),
        ("kava", "b"),
    ]
    assert float(rows[2]["difference_mean"]) == pytest.approx(-0.025)
    assert res["files"]["comparison_plot"].stat().st_size > 0

    # nothing in common (other methods, or no shared seed) is an error naming both folders
    other = make_experiment(tmp_path / "other", [("kava", 7, {"a": 0.1})])
    with pytest.raises(ReportError, match="no method/variant with the same seed"):
        make_report(nl, eviction=False, compare=other)
    assert main(["report", str(nl), "--no-eviction-plot", "--compare", str(other)]) == 2
    assert str(other) in capsys.readouterr().err
    assert main(["report", str(nl), "--no-eviction-plot", "--compare", str(tmp_path)]) == 2
    assert "not an experiment folder" in capsys.readouterr().err
    # without --compare: no section, no files
    res = make_report(nl, eviction=False)
    assert "## Against" not in res["files"]["markdown"].read_text() and not res["comparison"]


def test_compare_edge_cases(tmp_path):
    eq = make_experiment(tmp_path / "eq", [("kava", 0, {"a": 0.1}), ("pccot", 0, {"a": 0.2})])
    # a dataset only this experiment has: no column for it; --also rows are not compared
    here = make_experiment(
        tmp_path / "here", [("kava", 0, {"a": 0.3, "c": 0.5}), ("cot", 0, {"a": 0.4})]
    )
    res = make_report(here, eviction=False, also=[f"{eq}:pccot"], compare=eq)
    assert [(r["method"], r["dataset"]) for r in res["comparison"]] == [("kava", "a")]
    section = res["files"]["markdown"].read_text().split("## Against")[1].split("\n## ")[0]
    assert "| method | seeds | a | configs differ in |" in section
    assert "| KaVa | 0 | 10.00 -> 30.00 (+20.00) | nothing |" in section
    assert "PCCoT" not in section  # the --also row is eq's own: never compared with itself

    # accuracies over different question sets do not subtract
    fewer = make_experiment(tmp_path / "fewer", [("kava", 0, {"a": 0.3})], n=50)
    with pytest.raises(ReportError, match=r"n=50 questions.*n=100"):
        make_report(fewer, eviction=False, compare=eq)

    # a baseline row whose seeds differ in config: the error says it is the baseline's
    mixed = make_experiment(tmp_path / "mixed", [("kava", 0, {"a": 0.1})])
    make_experiment(tmp_path / "mixed", [("kava", 1, {"a": 0.1})], overrides=["train.lr=0.5"])
    with pytest.raises(MixedConfigsError, match=rf"--compare {mixed}: row 'KaVa'.*train.lr"):
        make_report(here, eviction=False, compare=mixed)
