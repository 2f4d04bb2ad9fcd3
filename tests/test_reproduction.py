"""The SmolLM2 reproduction (results/smollm2-gsm8k): its specs build the protocol the
README states, and every run committed there was made with the config the spec builds
today (so a later session's device run skips exactly those, and the table describes the
code and config in the repo)."""

import json
from pathlib import Path

import pytest

from kava.data import HELD_OUT, TEST_SETS
from kava.experiments import load_spec, run_status
from kava.methods import METHODS

RESULTS = Path(__file__).resolve().parents[1] / "results" / "smollm2-gsm8k"
SPECS = {"eq": 21, "controls": 9, "nl": 21}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_spec_builds_the_stated_protocol(name):
    exp = load_spec(RESULTS / f"{name}.yaml", output_dir=RESULTS / name)
    assert len(exp.runs) == SPECS[name]
    assert exp.seeds == [0, 1, 2]
    for run in exp.runs:
        cfg = run.cfg
        assert cfg.model.name_or_path == "smollm2"
        assert cfg.data.train == ("gsm8k-train-nl" if name == "nl" else "gsm8k-train-eq")
        assert cfg.data.train in HELD_OUT
        # one training budget in examples for every method, selection on validation only
        assert (cfg.train.epochs, cfg.train.global_batch_size) == (3, 128)
        assert cfg.train.eval_dataset == "gsm8k-aug-valid"
        assert cfg.train.eval_dataset not in TEST_SETS
        assert list(cfg.eval.datasets) == ["gsm8k", "svamp", "gsm-hard", "multiarith"]
        if METHODS[run.method].latent and run.method != "codi" and run.method != "coconut":
            assert (cfg.latent.num_latents, cfg.latent.num_iterations) == (24, 3)
        if run.method == "codi":  # CODI's own recipe
            assert cfg.latent.num_latents == 6
    if name == "controls":
        assert {dict(r.variant)["rkv.method"] for r in exp.runs} == {"random", "uniform", "crop"}
    else:
        assert [m.name for m in METHODS.values()] == exp.methods  # all seven, paper order


@pytest.mark.parametrize("name", sorted(SPECS))
def test_committed_runs_match_the_spec(name):
    exp = load_spec(RESULTS / f"{name}.yaml", output_dir=RESULTS / name)
    committed = [r for r in exp.runs if (r.dir / "DONE.json").is_file()]
    for run in committed:  # a config drift raises SpecError naming the keys
        assert run_status(run) == "done", run.name
        done = json.loads((run.dir / "DONE.json").read_text())
        assert done["checkpoint"] in ("best", "final")
        for ds in exp.datasets:  # every test set scored in full
            assert (
                done["metrics"][ds]["n"]
                == {
                    "gsm8k": 1319,
                    "svamp": 1000,
                    "gsm-hard": 1319,
                    "multiarith": 600,
                }[ds]
            )
        assert done["selection"]["dataset"] == "gsm8k-aug-valid"
        assert not list(run.dir.rglob("*.safetensors"))  # no weights in the repo


# Committed reports and the other experiments' rows each was written with (kava report
# --also); the README's tables are copied from these.
REPORTS = {"eq": {}, "controls": {"eq": ["kava", "pccot"]}, "nl": {}}


def _runs_of(folder: Path) -> dict[tuple[str, str], list[Path]]:
    """(method, "key=value, ...") -> complete run folders, read from DONE.json."""
    out: dict[tuple[str, str], list[Path]] = {}
    for done in sorted(folder.glob("runs/*/DONE.json")):
        rec = json.loads(done.read_text())
        variant = ", ".join(f"{k}={v}" for k, v in rec["variant"])
        out.setdefault((rec["method"], variant), []).append(done.parent)
    return out


@pytest.mark.parametrize("name", sorted(REPORTS))
def test_committed_report_is_the_committed_runs(name):
    """Every row of report/results.csv is the mean and sample std of its runs' metrics.json
    (recomputed here), and every complete run of the experiment is in a row."""
    import csv
    import statistics

    own = _runs_of(RESULTS / name)
    others = [_runs_of(RESULTS / o) for o in REPORTS[name]]
    also = {(m, "") for methods in REPORTS[name].values() for m in methods}
    with (RESULTS / name / "report" / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows
    seen = set()
    for row in rows:
        key = (row["method"], row["variant"])
        dirs = own.get(key) or next(o[key] for o in others if key in o)
        seen.add(key)
        ms = [json.loads((d / "eval" / row["dataset"] / "metrics.json").read_text()) for d in dirs]
        acc = [m["accuracy"] for m in ms]
        assert int(row["n"]) == len(dirs) == 3, key  # every seed of every row done
        assert float(row["accuracy_mean"]) == pytest.approx(statistics.mean(acc), abs=1e-12)
        assert float(row["accuracy_std"]) == pytest.approx(statistics.stdev(acc), abs=1e-12)
        passes = statistics.mean(m["mean_forward_passes"] for m in ms)
        assert float(row["passes_mean"]) == pytest.approx(passes, abs=1e-12)
    assert set(own) | also <= seen  # no complete run left out, the --also rows in


# Committed comparisons (kava report --compare): experiment -> baseline experiment.
COMPARISONS = {"nl": "eq"}


@pytest.mark.parametrize("name", sorted(COMPARISONS))
def test_committed_comparison_is_the_committed_runs(name):
    """Every row of report/comparison.csv is this experiment's accuracy minus the
    baseline's over the seeds both have, recomputed here from the runs' metrics.json."""
    import csv
    import statistics

    here, base = RESULTS / name, RESULTS / COMPARISONS[name]
    with (here / "report" / "comparison.csv").open() as f:
        rows = list(csv.DictReader(f))
    seen = set()
    for row in rows:
        assert row["variant"] == ""  # these grids have no variants
        seeds = [
            s
            for s in (0, 1, 2)
            if (here / "runs" / f"{row['method']}__seed{s}" / "DONE.json").is_file()
            and (base / "runs" / f"{row['method']}__seed{s}" / "DONE.json").is_file()
        ]
        assert row["seeds"] == " ".join(map(str, seeds)) and int(row["n"]) == len(seeds) >= 2

        def acc(folder, s, row=row):
            path = folder / "runs" / f"{row['method']}__seed{s}" / "eval" / row["dataset"]
            return json.loads((path / "metrics.json").read_text())["accuracy"]

        diffs = [acc(here, s) - acc(base, s) for s in seeds]
        assert float(row["difference_mean"]) == pytest.approx(statistics.mean(diffs), abs=1e-12)
        assert float(row["difference_std"]) == pytest.approx(statistics.stdev(diffs), abs=1e-12)
        base_mean = statistics.mean(acc(base, s) for s in seeds)
        assert float(row["baseline_accuracy_mean"]) == pytest.approx(base_mean, abs=1e-12)
        here_mean = statistics.mean(acc(here, s) for s in seeds)
        assert float(row["accuracy_mean"]) == pytest.approx(here_mean, abs=1e-12)
        assert row["config_differs_in"] == "data.train"  # the trace style, nothing else
        seen.add((row["method"], row["dataset"]))
    datasets = ["gsm8k", "svamp", "gsm-hard", "multiarith"]
    assert seen == {(m, d) for m in METHODS for d in datasets}  # every method, every test set
