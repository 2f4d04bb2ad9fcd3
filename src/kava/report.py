"""Aggregate an experiment folder into the paper's tables and plots (``kava report``).

Reads every complete run (``runs/*/DONE.json`` for what the run is, ``runs/*/eval/
<dataset>/metrics.json`` for its numbers, ``runs/*/log.jsonl`` for its losses) and
writes into ``<experiment>/report/``:

* ``results.md``  — (runs of one row must share their config but for the seed, else
  ``MixedConfigsError`` names the keys) rows = methods in the paper's order (``kava.methods.PAPER_ORDER``),
  then the variants of a grid; per dataset "accuracy (%)" and "forward passes per
  question", each the mean ± sample std (ddof=1) over seeds (no ± with one seed); then
  one row per run; then each run's provenance (kava version, git commit, packages,
  device from its ``manifest.json``; "unknown" without one);
* ``results.csv`` — the aggregated numbers (accuracy as a fraction): label, method,
  variant, dataset, n, accuracy_mean, accuracy_std, passes_mean, passes_std, seeds;
* ``runs.csv``    — one row per run and dataset;
* ``accuracy_vs_passes.png`` — accuracy against forward passes (log x), one panel per
  dataset, error bars = std over seeds: the efficiency frontier;
* ``loss_curves.png`` — each loss term against the optimizer step, mean over seeds
  (band = ± std) per method/variant;
* ``eviction.png`` — for a sample question, which teacher CoT tokens the first run with a
  KV loss (KaVa) keeps per layer and KV head;
* with ``compare=DIR`` (another experiment folder, e.g. the same grid on other traces):
  ``comparison.csv`` and ``comparison.png`` and a section of ``results.md`` — per row both
  experiments have and dataset, this experiment's accuracy minus DIR's over the seeds
  both have complete (paired by seed), mean ± sample std of the per-seed differences.
"""

from __future__ import annotations

import csv
import json
import logging
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kava.config import ConfigError
from kava.experiments import DONE, _comparable, _diff_keys, _normalized, format_value
from kava.manifest import read_manifest
from kava.methods import METHODS, PAPER_ORDER

log = logging.getLogger(__name__)

LOSS_TERMS = (
    ("loss", "total loss"),
    ("student_ce", "student CE (answer)"),
    ("teacher_ce", "teacher CE (CoT + answer)"),
    ("codi_loss", "CODI loss (hidden states, before x alpha1)"),
    ("kv_loss", "KV loss (latent vs. evicted KV, before x alpha2)"),
)


class ReportError(FileNotFoundError):
    """No (complete) runs, or a run's metrics file is missing; names the path."""


class MixedConfigsError(ConfigError):
    """Runs of one table row (method/variant) whose configs differ beyond the seed."""


@dataclass
class RunResult:
    name: str
    index: int
    method: str
    seed: int
    variant: tuple[tuple[str, str], ...]
    datasets: list[str]
    metrics: dict[str, dict[str, Any]]  # dataset -> metrics.json
    dir: Path
    config: dict[str, Any]
    manifest: dict[str, Any] | None = None  # the run's manifest.json (None: unknown)
    # the checkpoint the test sets scored, as DONE.json records it: step, dataset, split,
    # accuracy, correct, n on the validation split (None: the final one, no validation)
    selection: dict[str, Any] | None = None

    @property
    def group(self) -> tuple[str, tuple[tuple[str, str], ...]]:
        return self.method, self.variant


@dataclass
class Group:
    method: str
    variant: tuple[tuple[str, str], ...]
    runs: list[RunResult] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, tuple[tuple[str, str], ...]]:
        return self.method, self.variant

    @property
    def label(self) -> str:
        name = METHODS[self.method].label if self.method in METHODS else self.method
        if self.variant:
            name += " (" + ", ".join(f"{k}={v}" for k, v in self.variant) + ")"
        return name


def metrics_path(run_dir: Path, dataset: str) -> Path:
    return run_dir / "eval" / dataset.replace("/", "_") / "metrics.json"


def load_results(exp_dir: str | Path) -> tuple[list[RunResult], list[str]]:
    """Complete runs (sorted by run index) and the names of incomplete run folders."""
    exp_dir = Path(exp_dir)
    runs_dir = exp_dir / "runs"
    if not runs_dir.is_dir():
        raise ReportError(f"{runs_dir} does not exist: not an experiment folder (kava experiment)")
    done, incomplete = [], []
    for d in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        path = d / DONE
        if not path.is_file():
            incomplete.append(d.name)
            continue
        rec = json.loads(path.read_text())
        metrics = {}
        for ds in rec["datasets"]:
            mp = metrics_path(d, ds)
            if not mp.is_file():
                raise ReportError(f"{mp} is missing although {path} marks the run complete")
            metrics[ds] = json.loads(mp.read_text())
        variant = tuple((k, format_value(v)) for k, v in rec["variant"])
        done.append(
            RunResult(
                rec["run"],
                rec["index"],
                rec["method"],
                rec["seed"],
                variant,
                rec["datasets"],
                metrics,
                d,
                rec.get("config", {}),
                read_manifest(d),
                rec.get("selection"),
            )
        )
    if not done:
        raise ReportError(f"no complete runs (no {DONE}) under {runs_dir}")
    done.sort(key=lambda r: r.index)
    return done, incomplete


def load_also(spec: str) -> list[RunResult]:
    """``DIR:METHOD[,METHOD...]``: the complete runs of those methods in another experiment
    folder, as rows next to this one's (e.g. R-KV and PCCoT of the main table beside the
    eviction controls). Their names get the folder's name as a prefix."""
    folder, sep, names = spec.rpartition(":")
    methods = [m.strip() for m in names.split(",") if m.strip()]
    if not sep or not folder or not methods:
        raise ReportError(f"--also {spec!r}: expected DIR:METHOD[,METHOD...], e.g. eq:kava,pccot")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ReportError(
            f"--also {spec!r}: unknown method {', '.join(unknown)} (known: {', '.join(METHODS)})"
        )
    runs, _ = load_results(folder)
    prefix = Path(folder).resolve().name
    picked = []
    for m in methods:
        found = [r for r in runs if r.method == m]
        if not found:
            raise ReportError(f"--also {spec!r}: {folder} has no complete run of method {m}")
        picked += found
    for r in picked:
        r.name = f"{prefix}/{r.name}"
    return picked


def group_runs(runs: list[RunResult]) -> list[Group]:
    """Groups of seeds of one method and variant, in paper order, a method's default
    (no variant) before its grid variants, then grid order."""
    groups: dict[Any, Group] = {}
    for r in runs:
        groups.setdefault(r.group, Group(r.method, r.variant)).runs.append(r)

    def key(g: Group):
        rank = PAPER_ORDER.index(g.method) if g.method in PAPER_ORDER else len(PAPER_ORDER)
        return rank, bool(g.variant), min(r.index for r in g.runs)

    out = sorted(groups.values(), key=key)
    for g in out:
        g.runs.sort(key=lambda r: r.seed)
    return out


def _seedless_config(run: RunResult) -> dict[str, Any]:
    """The run's config as runs of one row are compared: without ``train.seed`` and the keys
    ``kava.experiments`` compares finished runs without (output folder, logging, speed)."""
    cfg = _comparable(_normalized(run.config))
    cfg.get("train", {}).pop("seed", None)
    return cfg


def check_same_configs(groups: list[Group]) -> None:
    """Refuse to aggregate a row whose runs differ in anything but ``train.seed`` (and the
    keys ``kava.experiments`` compares runs without: ``train.output_dir``, logging and
    checkpointing, the speed options such as ``train.compile``): ``MixedConfigsError``
    names the row, the runs and the keys."""
    for g in groups:
        runs = [r for r in g.runs if r.config]
        if len(runs) < 2:
            continue
        ref = _seedless_config(runs[0])
        for r in runs[1:]:
            diff = _diff_keys(ref, _seedless_config(r))
            if diff:
                raise MixedConfigsError(
                    f"row {g.label!r}: runs {runs[0].name} and {r.name} differ in "
                    f"{', '.join(diff)} (not only the seed): their numbers are not seeds of "
                    "one configuration; give them different variants or separate experiments"
                )


def _short_commit(m: dict[str, Any]) -> str:
    commit = m.get("git_commit")
    if not commit:
        return "unknown"
    return commit[:12] + ("+dirty" if m.get("git_dirty") else "")


def provenance_table(runs: list[RunResult]) -> str:
    """Per run: kava version, git commit, key package versions and device (manifest.json);
    runs without a manifest are shown as unknown."""
    header = ["run", "kava", "commit", "torch", "transformers", "peft", "accelerate", "device"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for r in runs:
        m = r.manifest
        if m is None:
            lines.append("| " + " | ".join([r.name] + ["unknown"] * (len(header) - 1)) + " |")
            continue
        pk = m.get("packages") or {}
        dev = m.get("device") or {}
        device = f"{dev.get('count', '?')} x {dev.get('name') or dev.get('type', '?')}"
        cells = [r.name, str(m.get("kava_version", "unknown")), _short_commit(m)]
        cells += [
            str(pk.get(k) or "unknown") for k in ("torch", "transformers", "peft", "accelerate")
        ]
        lines.append("| " + " | ".join([*cells, device]) + " |")
    return "\n".join(lines)


def datasets_of(runs: list[RunResult]) -> list[str]:
    seen: list[str] = []
    for r in runs:
        for d in r.datasets:
            if d not in seen:
                seen.append(d)
    return seen


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), (float(a.std(ddof=1)) if a.size > 1 else None)


def aggregate(groups: list[Group], datasets: list[str]) -> list[dict[str, Any]]:
    """One row per (group, dataset): mean and sample std over the seeds that have it."""
    rows = []
    for g in groups:
        for ds in datasets:
            runs = [r for r in g.runs if ds in r.metrics]
            if not runs:
                continue
            acc_m, acc_s = _mean_std([r.metrics[ds]["accuracy"] for r in runs])
            pas_m, pas_s = _mean_std([r.metrics[ds]["mean_forward_passes"] for r in runs])
            rows.append(
                {
                    "label": g.label,
                    "method": g.method,
                    "variant": ", ".join(f"{k}={v}" for k, v in g.variant),
                    "dataset": ds,
                    "n": len(runs),
                    "accuracy_mean": acc_m,
                    "accuracy_std": acc_s,
                    "passes_mean": pas_m,
                    "passes_std": pas_s,
                    "seeds": " ".join(str(r.seed) for r in runs),
                }
            )
    return rows


def _pm(mean: float, std: float | None, scale: float, digits: int) -> str:
    if std is None:
        return f"{scale * mean:.{digits}f}"
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def markdown_table(rows: list[dict[str, Any]], datasets: list[str]) -> str:
    """The main table: one line per method/variant, accuracy (%) and passes per dataset."""
    labels: list[str] = []
    for r in rows:
        if r["label"] not in labels:
            labels.append(r["label"])
    cell = {(r["label"], r["dataset"]): r for r in rows}
    header = ["method", "seeds"]
    for ds in datasets:
        header += [f"{ds} acc (%)", f"{ds} passes"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for label in labels:
        ns = sorted({cell[(label, ds)]["n"] for ds in datasets if (label, ds) in cell})
        out = [label, "/".join(map(str, ns))]
        for ds in datasets:
            r = cell.get((label, ds))
            if r is None:
                out += ["–", "–"]
            else:
                out += [
                    _pm(r["accuracy_mean"], r["accuracy_std"], 100.0, 1),
                    _pm(r["passes_mean"], r["passes_std"], 1.0, 1),
                ]
        lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines)


def per_run_table(runs: list[RunResult], datasets: list[str]) -> str:
    header = ["run", "seed"]
    for ds in datasets:
        header += [f"{ds} acc (%)", f"{ds} passes", f"{ds} n"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for r in runs:
        out = [r.name, str(r.seed)]
        for ds in datasets:
            m = r.metrics.get(ds)
            out += (
                ["–"] * 3
                if m is None
                else [
                    f"{100 * m['accuracy']:.1f}",
                    f"{m['mean_forward_passes']:.1f}",
                    str(m["n"]),
                ]
            )
        lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines)


def selection_table(groups: list[Group]) -> str:
    """Per method/variant: the validation score of the checkpoints the test sets scored
    (mean ± sample std over seeds) and the step each seed's checkpoint was taken at; the
    numbers the choice was made on, next to the test numbers it led to."""
    lines = [
        "| method | seeds | selected on | validation acc (%) | correct / n per seed | step per seed |",
        "|---|---:|---|---:|---|---|",
    ]
    for g in groups:
        chosen = [r.selection for r in g.runs if r.selection]
        if len(chosen) < len(g.runs):
            lines.append(f"| {g.label} | {len(g.runs)} | – (final checkpoint) | – | – | – |")
            continue
        where = sorted({f"{c['dataset']} ({c['split']})" for c in chosen})
        lines.append(
            f"| {g.label} | {len(chosen)} | {', '.join(where)} | "
            + _pm(*_mean_std([c["accuracy"] for c in chosen]), 100.0, 1)
            + " | "
            + ", ".join(f"{c['correct']}/{c['n']}" for c in chosen)
            + " | "
            + ", ".join(str(c["step"]) for c in chosen)
            + " |"
        )
    return "\n".join(lines)


CSV_FIELDS = (
    "label",
    "method",
    "variant",
    "dataset",
    "n",
    "accuracy_mean",
    "accuracy_std",
    "passes_mean",
    "passes_std",
    "seeds",
)


def write_csv(rows: list[dict[str, Any]], path: Path, fields=CSV_FIELDS) -> None:
    """``rows`` as CSV with the columns ``fields`` (None as an empty cell)."""
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r[k] is None else r[k]) for k in fields})


def write_runs_csv(runs: list[RunResult], path: Path) -> None:
    fields = ["run", "method", "variant", "seed", "dataset", "n", "accuracy", "mean_forward_passes"]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(fields)
        for r in runs:
            for ds, m in r.metrics.items():
                variant = ", ".join(f"{k}={v}" for k, v in r.variant)
                w.writerow(
                    [
                        r.name,
                        r.method,
                        variant,
                        r.seed,
                        ds,
                        m["n"],
                        m["accuracy"],
                        m["mean_forward_passes"],
                    ]
                )


# --------------------------------------------------------------------------- comparison

COMPARE_FIELDS = [
    "label",
    "method",
    "variant",
    "dataset",
    "n",
    "seeds",
    "baseline_accuracy_mean",
    "accuracy_mean",
    "difference_mean",
    "difference_std",
    "config_differs_in",
]


def compare_rows(
    runs: list[RunResult], baseline: list[RunResult], datasets: list[str]
) -> list[dict[str, Any]]:
    """Per row (method/variant) both run lists have and per dataset: accuracy here minus
    in ``baseline``, over the seeds both have (paired by seed, so a row still missing a
    seed in one experiment compares like with like); the std is the sample std of the
    per-seed differences (None with one seed); ``config_differs_in``: the config keys the
    paired runs differ in (what the comparison varies, e.g. ``data.train``). A pair scored
    on different numbers of questions is an error (its accuracies do not subtract)."""
    base = {(r.group, r.seed): r for r in baseline}
    rows = []
    for g in group_runs(runs):
        paired = [(r, base[(r.group, r.seed)]) for r in g.runs if (r.group, r.seed) in base]
        if not paired:
            continue
        differs = sorted(
            {k for a, b in paired for k in _diff_keys(_seedless_config(a), _seedless_config(b))}
        )
        for ds in datasets:
            pairs = [(a, b) for a, b in paired if ds in a.metrics and ds in b.metrics]
            if not pairs:
                continue
            for a, b in pairs:
                if a.metrics[ds]["n"] != b.metrics[ds]["n"]:
                    raise ReportError(
                        f"{metrics_path(a.dir, ds)} has n={a.metrics[ds]['n']} questions, "
                        f"{metrics_path(b.dir, ds)} n={b.metrics[ds]['n']}: accuracies on "
                        "different question sets do not subtract"
                    )
            acc_here = [a.metrics[ds]["accuracy"] for a, _ in pairs]
            acc_base = [b.metrics[ds]["accuracy"] for _, b in pairs]
            diff_m, diff_s = _mean_std([x - y for x, y in zip(acc_here, acc_base)])
            rows.append(
                {
                    "label": g.label,
                    "method": g.method,
                    "variant": ", ".join(f"{k}={v}" for k, v in g.variant),
                    "dataset": ds,
                    "n": len(pairs),
                    "seeds": " ".join(str(a.seed) for a, _ in pairs),
                    "baseline_accuracy_mean": _mean_std(acc_base)[0],
                    "accuracy_mean": _mean_std(acc_here)[0],
                    "difference_mean": diff_m,
                    "difference_std": diff_s,
                    "config_differs_in": " ".join(differs),
                }
            )
    return rows


def comparison_table(rows: list[dict[str, Any]], datasets: list[str]) -> str:
    """One line per row: per dataset "baseline -> here (difference ± std)", in points."""
    labels = list(dict.fromkeys(r["label"] for r in rows))
    cell = {(r["label"], r["dataset"]): r for r in rows}
    lines = [
        "| method | seeds | " + " | ".join(datasets) + " | configs differ in |",
        "|" + "|".join(["---", "---"] + ["---:"] * len(datasets) + ["---"]) + "|",
    ]
    for label in labels:
        seeds = sorted({cell[(label, d)]["seeds"] for d in datasets if (label, d) in cell})
        out = [label, "; ".join(seeds)]
        for ds in datasets:
            r = cell.get((label, ds))
            if r is None:
                out.append("–")
                continue
            diff = f"{round(100 * r['difference_mean'], 2) + 0.0:+.2f}"  # no "-0.00"
            if r["difference_std"] is not None:
                diff += f" ± {100 * r['difference_std']:.2f}"
            out.append(
                f"{100 * r['baseline_accuracy_mean']:.2f} -> {100 * r['accuracy_mean']:.2f} ({diff})"
            )
        keys = next(r for r in rows if r["label"] == label)["config_differs_in"].split()
        out.append(", ".join(f"`{k}`" for k in keys) or "nothing")  # one set per row
        lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


MARKERS = "osD^vP*XhP<>"


def _style(i: int) -> dict[str, Any]:
    import matplotlib

    colors = matplotlib.colormaps["tab10"].colors
    return {"color": colors[i % len(colors)], "marker": MARKERS[i % len(MARKERS)]}


def plot_efficiency(rows: list[dict[str, Any]], datasets: list[str], path: Path) -> None:
    """Accuracy (%) against mean forward passes per question (log x), one panel per dataset."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    plt = _plt()
    labels: list[str] = []
    for r in rows:
        if r["label"] not in labels:
            labels.append(r["label"])
    n = len(datasets)
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n + 0.4, 4.2), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        xs, ys_lo, ys_hi = [], [], []
        for i, label in enumerate(labels):
            r = next((r for r in rows if r["label"] == label and r["dataset"] == ds), None)
            if r is None:
                continue
            xs.append(r["passes_mean"])
            ys_lo.append(100 * (r["accuracy_mean"] - (r["accuracy_std"] or 0.0)))
            ys_hi.append(100 * (r["accuracy_mean"] + (r["accuracy_std"] or 0.0)))
            ax.errorbar(
                r["passes_mean"],
                100 * r["accuracy_mean"],
                xerr=r["passes_std"] or 0.0,
                yerr=100 * (r["accuracy_std"] or 0.0),
                label=label,
                capsize=4,
                markersize=8,
                alpha=0.85,
                linestyle="none",
                **_style(i),
            )
            if len(labels) <= 8:  # name the points too (markers of close methods overlap)
                ax.annotate(
                    label,
                    (r["passes_mean"], 100 * r["accuracy_mean"]),
                    xytext=(7, -3 if i % 2 else 5),
                    textcoords="offset points",
                    fontsize=8,
                    color=_style(i)["color"],
                )
        ax.set_xscale("log")
        lo, hi = min(xs), max(xs)
        ax.set_xlim(lo / 1.6, hi * 1.6)
        subs = (1.0, 2.0, 3.0, 5.0) if hi / lo < 20 else (1.0, 2.0, 5.0)
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("forward passes per question (mean, log scale)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(ds)
        ax.grid(True, which="both", alpha=0.3)
        lo, hi = min(ys_lo), max(ys_hi)
        pad = max(2.0, 0.08 * (hi - lo))
        top = min(101.0, hi + pad)
        bottom = lo - pad if lo - pad > 0 else -0.04 * top  # no negative accuracies on the axis
        ax.set_ylim(bottom, top)
        ax.yaxis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
    handles, leg_labels = axes[0][0].get_legend_handles_labels()
    fig.legend(
        handles,
        leg_labels,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.02),
        ncol=min(len(labels), 5),
        frameon=False,
    )
    fig.suptitle("Accuracy vs. forward passes (mean ± std over seeds; up-left is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_comparison(
    rows: list[dict[str, Any]], datasets: list[str], title: str, path: Path
) -> None:
    """Accuracy difference (points) per row, one panel per dataset; error bars = std of the
    per-seed differences."""
    plt = _plt()
    labels = list(dict.fromkeys(r["label"] for r in rows))
    n = len(datasets)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n + 0.4, 0.45 * len(labels) + 1.6), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        for i, label in enumerate(labels):
            r = next((r for r in rows if r["label"] == label and r["dataset"] == ds), None)
            if r is None:
                continue
            ax.barh(
                i,
                100 * r["difference_mean"],
                xerr=100 * (r["difference_std"] or 0.0),
                color=_style(i)["color"],
                alpha=0.85,
                capsize=3,
            )
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels if ax is axes[0][0] else [""] * len(labels))
        ax.invert_yaxis()
        ax.set_title(ds)
        ax.set_xlabel("accuracy difference (points)")
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def read_log(run_dir: Path) -> dict[int, dict[str, Any]]:
    """``log.jsonl`` as step -> record (the last record of a step wins, e.g. after a resume)."""
    path = run_dir / "log.jsonl"
    out: dict[int, dict[str, Any]] = {}
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "step" in rec:
            out[int(rec["step"])] = rec
    return out


def loss_curves(group: Group, term: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Steps, mean and std over seeds of ``term``; None if no seed logged a non-zero value."""
    logs = [read_log(r.dir) for r in group.runs]
    steps = sorted({s for lg in logs for s, rec in lg.items() if rec.get(term) is not None})
    if not steps:
        return None
    mean, std = [], []
    for s in steps:
        vals = [lg[s][term] for lg in logs if s in lg and lg[s].get(term) is not None]
        mean.append(float(np.mean(vals)))
        std.append(float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0)
    if not any(mean):
        return None  # the term is not part of this method's objective (logged as 0)
    return np.asarray(steps), np.asarray(mean), np.asarray(std)


def smoothing_window(n_steps: int) -> int:
    """Moving-average window for curves of ``n_steps`` points (1 = raw, up to 200 steps)."""
    return 1 if n_steps <= 200 else n_steps // 100


def smooth(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (the first points average what exists so far)."""
    if window <= 1:
        return x
    c = np.cumsum(np.insert(x, 0, 0.0))
    out = np.empty_like(x)
    for i in range(len(x)):
        lo = max(0, i + 1 - window)
        out[i] = (c[i + 1] - c[lo]) / (i + 1 - lo)
    return out


def plot_losses(groups: list[Group], path: Path) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    plt = _plt()
    fig, grid = plt.subplots(2, 3, figsize=(13.5, 7.6))
    axes = grid.flatten()
    handles = {}
    windows: set[int] = set()
    for ax, (term, title) in zip(axes, LOSS_TERMS):
        any_line = False
        lows, highs = [], []
        for i, g in enumerate(groups):
            c = loss_curves(g, term)
            if c is None:
                continue
            steps, mean, std = c
            w = smoothing_window(len(steps))
            windows.add(w)
            mean, std = smooth(mean, w), smooth(std, w)
            st = _style(i)
            (line,) = ax.plot(
                steps,
                mean,
                color=st["color"],
                marker=st["marker"] if len(steps) <= 25 else None,
                markersize=5,
                label=g.label,
            )
            handles[g.label] = line
            if len(g.runs) > 1:
                ax.fill_between(steps, mean - std, mean + std, color=st["color"], alpha=0.15)
            any_line = True
            lows.append(float((mean - std).min()))
            highs.append(float((mean + std).max()))
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats / token)" if term.endswith("ce") else "loss")
        ax.grid(True, which="both", alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if not any_line:
            ax.text(
                0.5,
                0.5,
                "nothing logged\n(no log.jsonl, or not in\nany method's objective)",
                ha="center",
                va="center",
                transform=ax.transAxes,
                color="gray",
            )
        elif min(lows) > 0 and max(highs) / min(lows) > 20:  # spans decades: log y
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
    legend_ax = axes[len(LOSS_TERMS)]
    legend_ax.axis("off")
    legend_ax.legend(
        list(handles.values()),
        list(handles),
        loc="center",
        title="method (mean over seeds)",
        frameon=False,
        fontsize=11,
    )
    title = "Training losses per term (mean over seeds, band = ± std over seeds)"
    if max(windows, default=1) > 1:
        title += f"; moving average over {max(windows)} steps"
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_eviction(choice, question: str, path: Path, title: str = "") -> None:
    """Heatmap: rows = (layer, KV head), columns = teacher CoT tokens; kept cells dark."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    plt = _plt()
    n_layers, n_heads, n = choice.kept.shape
    grid = choice.kept.reshape(n_layers * n_heads, n).astype(float)
    width = min(30.0, max(7.0, 0.32 * n + 3.0))
    height = min(26.0, max(4.5, 0.13 * n_layers * n_heads + 2.8))
    fig, (top, ax) = plt.subplots(
        2,
        1,
        figsize=(width, height),
        sharex=True,
        gridspec_kw={"height_ratios": [1, max(3.0, 0.13 * n_layers * n_heads)]},
    )
    frac = choice.kept_fraction()
    top.bar(np.arange(n), 100 * frac, color="#2b6cb0")
    top.set_ylabel("kept (%)")
    top.set_ylim(0, 100)
    top.grid(True, axis="y", alpha=0.3)
    ax.imshow(
        grid,
        aspect="auto",
        interpolation="nearest",
        cmap=ListedColormap(["#f3f3f3", "#1a4d8f"]),
        vmin=0,
        vmax=1,
    )
    for layer in range(1, n_layers):
        ax.axhline(layer * n_heads - 0.5, color="white", linewidth=1.2)
    if n_layers * n_heads <= 40:  # one label per (layer, head) row
        ax.set_yticks(np.arange(n_layers * n_heads))
        ax.set_yticklabels([f"L{i // n_heads} h{i % n_heads}" for i in range(n_layers * n_heads)])
        ax.set_ylabel("layer L, KV head h")
    else:  # one label per layer band (heads top to bottom inside a band)
        step = max(1, int(np.ceil(n_layers / 16)))
        layers = range(0, n_layers, step)
        ax.set_yticks([layer * n_heads + (n_heads - 1) / 2 for layer in layers])
        ax.set_yticklabels([f"layer {layer}" for layer in layers])
        ax.set_ylabel(f"layer ({n_heads} KV heads per band)")
    ax.set_xticks(np.arange(n))
    ax.set_xticklabels(choice.cot_tokens, rotation=90, fontsize=9, family="monospace")
    ax.set_xlabel("teacher CoT token (last step dropped as in training; ␣ = leading space)")
    ax.legend(
        handles=[Patch(color="#1a4d8f", label="kept"), Patch(color="#f3f3f3", label="evicted")],
        loc="upper left",
        bbox_to_anchor=(1.005, 1.0),
        frameon=False,
    )
    head = (
        f"Eviction ({choice.method}, lambda={choice.lam:g}): {min(choice.num_latents, n)} of {n} "
        f"CoT tokens kept per layer and KV head"
    )
    if title:
        head += f" — {title}"
    q = textwrap.fill("Q: " + question, width=max(60, int(width * 11)))
    note = "bars: % of the (layer, KV head) rows below that keep the token"
    top.set_title(head + "\n" + q + "\n" + note, fontsize=10, loc="left")
    fig.align_ylabels([top, ax])
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def sample_example(cfg, index: int = 0):
    """An example with a CoT of more than one step, from the eval sets, else the training data."""
    from kava.evaluate import load_eval_examples
    from kava.train import load_train_examples

    def with_steps(examples):
        exs = [e for e in examples if len(e.steps) >= 2]
        return exs[index] if len(exs) > index else None

    for ds in cfg.eval.datasets:
        try:
            ex = with_steps(load_eval_examples(ds, cfg, max(50, index + 1)))
        except Exception as e:  # a dataset we cannot read here: try the next
            log.warning("sample question: cannot read %s (%s)", ds, e)
            continue
        if ex is not None:
            return ex
    ex = with_steps(load_train_examples(cfg)[: max(200, index + 1)])
    if ex is None:
        raise ReportError("no example with a multi-step CoT in the eval or training data")
    return ex


def eviction_figure(runs: list[RunResult], path: Path, sample: int = 0) -> str | None:
    """Draw the eviction picture from the first complete run whose method has a KV loss
    (KaVa); returns its run name."""

    from kava.backbone import default_device
    from kava.checkpoint import load_checkpoint
    from kava.inspect_latents import eviction_choice

    run = next((r for r in runs if r.method in METHODS and METHODS[r.method].kv_loss), None)
    if run is None:
        return None
    backbone, cfg = load_checkpoint(run.dir / "final")
    backbone.to(default_device())
    ex = sample_example(cfg, sample)
    choice = eviction_choice(backbone, cfg, ex.question, ex.steps, ex.answer)
    plot_eviction(choice, ex.question, path, title=f"run {run.name}")
    del backbone
    return run.name


def make_report(
    exp_dir: str | Path,
    out_dir: str | Path | None = None,
    eviction: bool = True,
    sample: int = 0,
    also: list[str] | tuple[str, ...] = (),
    compare: str | Path | None = None,
) -> dict[str, Any]:
    """Write the tables and plots; returns the paths and the aggregated rows. ``also``:
    ``DIR:METHOD[,...]`` rows from other experiment folders (``load_also``); ``compare``:
    a baseline experiment folder to subtract (``compare_rows``)."""
    exp_dir = Path(exp_dir)
    out = Path(out_dir) if out_dir is not None else exp_dir / "report"
    runs, incomplete = load_results(exp_dir)
    own = len(runs)  # this experiment's complete runs (the count the header gives)
    for spec in also:
        extra = load_also(spec)
        clash = {r.group for r in extra} & {r.group for r in runs}
        if clash:
            rows = ", ".join(Group(m, v).label for m, v in sorted(clash))
            raise ReportError(
                f"--also {spec!r} adds runs to a row the report already has ({rows}): a "
                "row's seeds come from one experiment"
            )
        runs += extra
    groups = group_runs(runs)
    check_same_configs(groups)
    datasets = datasets_of(runs)
    rows = aggregate(groups, datasets)
    comparison: list[dict[str, Any]] = []
    if compare is not None:  # this experiment's own runs (not --also's) against DIR's
        baseline, _ = load_results(compare)
        own_groups = {r.group for r in runs[:own]}
        try:
            check_same_configs([g for g in group_runs(baseline) if g.key in own_groups])
        except MixedConfigsError as e:
            raise MixedConfigsError(f"--compare {compare}: {e}") from None
        comparison = compare_rows(runs[:own], baseline, datasets)
        if not comparison:
            raise ReportError(
                f"--compare {compare}: no method/variant with the same seed and dataset "
                f"complete in both {exp_dir} and {compare}"
            )
    out.mkdir(parents=True, exist_ok=True)
    info = {}
    info_path = exp_dir / "experiment.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
    files = {
        "markdown": out / "results.md",
        "csv": out / "results.csv",
        "runs_csv": out / "runs.csv",
        "efficiency": out / "accuracy_vs_passes.png",
        "losses": out / "loss_curves.png",
    }
    write_csv(rows, files["csv"])
    write_runs_csv(runs, files["runs_csv"])
    plot_efficiency(rows, datasets, files["efficiency"])
    plot_losses(groups, files["losses"])
    evict_run = None
    if eviction:
        files["eviction"] = out / "eviction.png"
        evict_run = eviction_figure(runs, files["eviction"], sample)
        if evict_run is None:
            del files["eviction"]
    name = info.get("name", exp_dir.name)
    md = [f"# Experiment {name}", ""]
    if info.get("description"):
        md += [info["description"].strip(), ""]
    done_names = {r.name for r in runs}
    for n in info.get("runs", []):  # runs of the spec never started (e.g. other shards)
        if n not in done_names and n not in incomplete:
            incomplete.append(n)
    shown = ", ".join(incomplete[:12]) + (", ..." if len(incomplete) > 12 else "")
    md.append(
        f"{own} of {own + len(incomplete)} runs complete"
        + (f" (not complete: {shown})" if incomplete else "")
        + (f"; base config `{info['base']}`" if info.get("base") else "")
        + ("; rows from other experiments: " + ", ".join(f"`{a}`" for a in also) if also else "")
        + ". Accuracy in %, passes = forward passes per question (mean over questions); "
        "each cell is the mean ± sample std (ddof=1) over seeds, without ± when a row has one "
        "seed; `seeds` = number of seeds."
    )
    md += ["", markdown_table(rows, datasets), ""]
    if comparison:
        files["comparison_csv"] = out / "comparison.csv"
        files["comparison_plot"] = out / "comparison.png"
        write_csv(comparison, files["comparison_csv"], COMPARE_FIELDS)
        title = f"Accuracy here minus in {compare} (mean ± std of per-seed differences)"
        compared = [d for d in datasets if any(r["dataset"] == d for r in comparison)]
        plot_comparison(comparison, compared, title, files["comparison_plot"])
        md += [
            f"## Against `{compare}`",
            "",
            f"Accuracy (%) in `{compare}` -> here (difference in points, mean ± sample std "
            "of the per-seed differences), per row both experiments have, over the seeds "
            "both have complete (`seeds`); the last column lists the config keys the "
            "paired runs differ in (the seed and the speed options aside).",
            "",
            comparison_table(comparison, compared),
            "",
            f"![comparison]({files['comparison_plot'].name})",
            "",
        ]
    md += ["## Checkpoint selection", "", selection_table(groups), ""]
    md += ["## Runs", "", per_run_table(runs, datasets), ""]
    md += ["## Provenance", "", provenance_table(runs), ""]
    md += ["## Plots", ""]
    md.append(f"![accuracy vs forward passes]({files['efficiency'].name})")
    md.append(f"![loss curves]({files['losses'].name})")
    if evict_run:
        md.append(f"![eviction]({files['eviction'].name}) (run {evict_run})")
    files["markdown"].write_text("\n".join(md) + "\n")
    return {
        "files": files,
        "rows": rows,
        "runs": runs,
        "incomplete": incomplete,
        "comparison": comparison,
    }
