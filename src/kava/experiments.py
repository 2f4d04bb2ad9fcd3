"""Experiment grids: methods x seeds x config overrides, each run trained and evaluated.

A spec is a YAML file (see ``experiments/`` for ready-made ones)::

    name: llama1b-main                     # optional; default: the spec file's stem
    description: ...                       # optional, free text
    base: llama1b-gsm8k-aug                # config file (relative to the spec, or the cwd)
                                           # or a packaged config name; default: the defaults
    overrides: {train.max_steps: 100}      # dotted keys applied to every run
    methods: [cot, nocot, icot, coconut, codi, pccot, kava]   # names of kava.methods.METHODS
    method_overrides:                      # optional: dotted keys for one method's runs
      coconut: {train.lr: 1.0e-4}          # (what a method's own recipe defines)
    seeds: [0, 1, 2]                       # train.seed of each run
    grid: {rkv.method: [rkv, crop]}        # optional: cartesian product over these keys
    grid_methods: [kava]                   # optional: the methods the grid applies to
                                           # (default all); the others run once per seed
    eval: {datasets: [gsm8k, svamp], limit: 500}   # eval.* keys for every run
    output_dir: runs/experiments/llama1b-main      # default runs/experiments/<name>

Every run's ``KavaConfig`` is built (and validated) before anything is trained; an error
names the spec file and the spec key at fault. Run ``i`` of the deterministic order
(methods, then grid values, then seeds) lives in
``<output_dir>/runs/<method>[__key=value...]__seed<k>/``: the training run folder
(``config.yaml``, ``log.jsonl``, ``checkpoints/``, ``final/``, with ``train.eval_every``
``best/``: its test numbers then come from best/), ``eval/<dataset>/
metrics.json`` and, written last, ``DONE.json``. A run with ``DONE.json`` is skipped, so
an interrupted grid re-run finishes only what is missing: a run with a ``final/``
checkpoint is only evaluated, one with a ``checkpoints/step-N`` resumes training there,
anything else starts again from scratch. A run folder made with a config that differs
from the spec's in more than the speed and bookkeeping keys (``kava.rundir.RESUME_MUTABLE``:
``train.compile``, ``train.attention``, ...) is an error naming the keys.
``shard=(i, n)`` takes the runs whose index is ``i`` modulo ``n`` (one process per GPU);
``only`` (run-name patterns, e.g. ``*__seed0``) takes the runs one of them matches, e.g. one
seed of every method first, or one run for a scheduler that hands out runs one at a time.
"""

from __future__ import annotations

import copy
import fnmatch
import gc
import itertools
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kava.config import (
    ConfigError,
    KavaConfig,
    apply_overrides,
    from_dict,
    read_config_data,
    resolve_config_path,
)
from kava.methods import CURRICULUM_SECTIONS, METHODS
from kava.rundir import RESUME_MUTABLE

log = logging.getLogger(__name__)

SPEC_KEYS = (
    "name",
    "description",
    "base",
    "overrides",
    "methods",
    "method_overrides",
    "seeds",
    "grid",
    "grid_methods",
    "eval",
    "output_dir",
)
# Keys the experiment sets itself, per run: a spec may not override them.
RESERVED = {
    "method": "methods",
    "train.seed": "seeds",
    "train.output_dir": "output_dir",
}
DONE = "DONE.json"
# Config keys that do not change what a run computes: where it is stored, logging and
# checkpointing, and the speed options (train.compile, train.attention, ...) that only round
# differently; the same keys a resumed run may change (kava.rundir). A run finished with
# another speed option is the same run (evaluation keys are compared apart: a change there
# re-evaluates).
_IGNORED_IN_COMPARISON = tuple(
    k for k in RESUME_MUTABLE if k.startswith("train.") and not k.endswith(".")
)


class SpecError(ConfigError):
    """A bad experiment spec; the message names the spec file and the key."""


@dataclass
class Run:
    index: int
    name: str
    method: str
    seed: int
    variant: list[tuple[str, Any]]  # grid (key, value) pairs of this run, in grid order
    cfg: KavaConfig
    dir: Path

    @property
    def variant_label(self) -> str:
        return ", ".join(f"{k}={format_value(v)}" for k, v in self.variant)


@dataclass
class Experiment:
    spec_path: Path
    name: str
    description: str
    base: str | None
    output_dir: Path
    methods: list[str]
    seeds: list[int]
    grid: dict[str, list[Any]]
    runs: list[Run] = field(default_factory=list)

    @property
    def datasets(self) -> list[str]:
        return list(self.runs[0].cfg.eval.datasets)


# --------------------------------------------------------------------------- spec


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    return str(value)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]", "-", text)


def run_name(method: str, variant: list[tuple[str, Any]], seed: int) -> str:
    parts = [method, *(f"{k}={format_value(v)}" for k, v in variant), f"seed{seed}"]
    return _safe("__".join(parts))


def _load_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(f"{path}: the {what} must be a mapping, got {type(data).__name__}")
    return data


def _resolve_base(base: str, spec_path: Path) -> Path:
    """``base`` relative to the spec's folder, else to the cwd, else a packaged config name."""
    beside = spec_path.parent / base
    if beside.is_file():
        return beside
    try:
        return resolve_config_path(base)
    except ConfigError as e:
        raise SpecError(f"{spec_path}: base: {e}") from None


def _check_dotted_keys(mapping: Any, spec_path: Path, key: str) -> dict[str, Any]:
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise SpecError(
            f"{spec_path}: {key}: expected a mapping of dotted config keys, "
            f"got {type(mapping).__name__}"
        )
    for k in mapping:
        if not isinstance(k, str) or not k:
            raise SpecError(f"{spec_path}: {key}: bad config key {k!r}")
        if k in RESERVED:
            raise SpecError(
                f"{spec_path}: {key}.{k}: set by the experiment; use the spec key "
                f"'{RESERVED[k]}' instead"
            )
    return dict(mapping)


def _build_config(base_data: dict[str, Any], *layers: dict[str, Any]) -> KavaConfig:
    data = copy.deepcopy(base_data)
    for layer in layers:
        data = apply_overrides(data, layer)
    return from_dict(KavaConfig, data)


def load_spec(
    path: str | Path,
    output_dir: str | Path | None = None,
    extra_overrides: list[str] | None = None,
) -> Experiment:
    """Read and validate a spec; build every run's config (nothing is trained).

    ``output_dir`` replaces the spec's ``output_dir``; ``extra_overrides`` (``key=value``
    strings, as ``--set``) are applied to every run after the spec's ``overrides``.
    """
    spec_path = Path(path)
    if not spec_path.is_file():
        raise SpecError(f"experiment spec {spec_path} does not exist")
    spec = _load_yaml_mapping(spec_path, "spec")
    unknown = sorted(set(map(str, spec)) - set(SPEC_KEYS))
    if unknown:
        raise SpecError(f"{spec_path}: unknown key '{unknown[0]}' (known: {', '.join(SPEC_KEYS)})")

    def string(key: str, default: str | None) -> str | None:
        value = spec.get(key, default)
        if value is not None and not isinstance(value, str):
            raise SpecError(f"{spec_path}: {key}: expected a string, got {value!r}")
        return value

    name = string("name", spec_path.stem)
    description = string("description", "") or ""
    base = string("base", None)
    out = Path(output_dir) if output_dir is not None else None
    out = out or Path(string("output_dir", None) or f"runs/experiments/{name}")

    methods = spec.get("methods")
    if not isinstance(methods, list) or not methods:
        raise SpecError(
            f"{spec_path}: methods: must be a non-empty list of {list(METHODS)}, got {methods!r}"
        )
    for m in methods:
        if m not in METHODS:
            raise SpecError(f"{spec_path}: methods: {m!r} is not one of {list(METHODS)}")
    if len(set(methods)) != len(methods):
        raise SpecError(f"{spec_path}: methods: duplicates in {methods}")

    seeds = spec.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds:
        raise SpecError(f"{spec_path}: seeds: must be a non-empty list of integers")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise SpecError(f"{spec_path}: seeds: {s!r} is not a non-negative integer")
    if len(set(seeds)) != len(seeds):
        raise SpecError(f"{spec_path}: seeds: duplicates in {seeds}")

    overrides = _check_dotted_keys(spec.get("overrides"), spec_path, "overrides")
    raw_method_overrides = spec.get("method_overrides") or {}
    if not isinstance(raw_method_overrides, dict):
        raise SpecError(f"{spec_path}: method_overrides: expected a mapping method -> overrides")
    method_overrides: dict[str, dict[str, Any]] = {}
    for m, layer in raw_method_overrides.items():
        if m not in methods:
            raise SpecError(
                f"{spec_path}: method_overrides.{m}: not one of the spec's methods {methods}"
            )
        method_overrides[m] = _check_dotted_keys(layer, spec_path, f"method_overrides.{m}")
    eval_section = spec.get("eval") or {}
    if not isinstance(eval_section, dict):
        raise SpecError(f"{spec_path}: eval: expected a mapping of eval.* keys")
    eval_overrides = {f"eval.{k}": v for k, v in eval_section.items()}
    grid = _check_dotted_keys(spec.get("grid"), spec_path, "grid")
    for k, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SpecError(f"{spec_path}: grid.{k}: expected a non-empty list of values")
        if len({format_value(v) for v in values}) != len(values):
            raise SpecError(f"{spec_path}: grid.{k}: duplicate values in {values}")
    grid_methods = spec.get("grid_methods", methods)
    if not isinstance(grid_methods, list) or any(m not in methods for m in grid_methods):
        raise SpecError(
            f"{spec_path}: grid_methods: expected a list of the spec's methods {methods}, "
            f"got {grid_methods!r}"
        )
    cli_overrides: dict[str, Any] = {}
    if extra_overrides:
        cli = apply_overrides({}, list(extra_overrides))

        def flatten(d: dict[str, Any], prefix: str = "") -> None:
            for k, v in d.items():
                if isinstance(v, dict) and v:
                    flatten(v, f"{prefix}{k}.")
                else:
                    cli_overrides[prefix + k] = v

        flatten(cli)
        for k in cli_overrides:
            if k in RESERVED:
                raise SpecError(f"--set {k}: set by the experiment (spec key '{RESERVED[k]}')")

    # Base config, then each spec key alone, so that an error names the key at fault.
    base_data: dict[str, Any] = {}
    if base is not None:
        base_path = _resolve_base(base, spec_path)
        try:
            base_data = read_config_data(base_path)
            _build_config(base_data)
        except ConfigError as e:
            raise SpecError(f"{spec_path}: base: {base_path}: {e}") from None
    sections = [("overrides", overrides), ("eval", eval_overrides)]
    sections += [(f"method_overrides.{m}", layer) for m, layer in method_overrides.items()]
    for section, layer in sections:
        for k, v in layer.items():
            try:
                _build_config(base_data, {k: v})
            except ConfigError as e:
                raise SpecError(f"{spec_path}: {section}: {e}") from None
    for k, values in grid.items():
        for v in values:
            try:
                _build_config(base_data, overrides, {k: v})
            except ConfigError as e:
                raise SpecError(f"{spec_path}: grid.{k}: {e}") from None
    try:
        _build_config(base_data, overrides, eval_overrides, cli_overrides)
    except ConfigError as e:
        raise SpecError(f"{spec_path}: --set: {e}") from None

    exp = Experiment(spec_path, name, description, base, out, list(methods), list(seeds), grid, [])
    for method in methods:
        keys = list(grid) if method in grid_methods else []
        for values in itertools.product(*(grid[k] for k in keys)):
            variant = list(zip(keys, values))
            for seed in seeds:
                rname = run_name(method, variant, seed)
                rdir = out / "runs" / rname
                per_run = {
                    "method": method,
                    "train.seed": seed,
                    "train.output_dir": str(rdir),
                    **dict(variant),
                }
                try:
                    cfg = _build_config(
                        base_data,
                        overrides,
                        method_overrides.get(method, {}),
                        eval_overrides,
                        cli_overrides,
                        per_run,
                    )
                except ConfigError as e:
                    raise SpecError(f"{spec_path}: run {rname}: {e}") from None
                exp.runs.append(Run(len(exp.runs), rname, method, seed, variant, cfg, rdir))
    names = [r.name for r in exp.runs]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise SpecError(f"{spec_path}: grid: two runs map to the same folder name {dup!r}")
    return exp


def parse_shard(text: str) -> tuple[int, int]:
    """``"1/4"`` -> ``(1, 4)``: shard index (0-based) and number of shards."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m:
        raise ConfigError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. 0/4")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or i >= n:
        raise ConfigError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. 0/4")
    return i, n


def parse_only(text: str) -> list[str]:
    """``"*__seed0, kava__seed2"`` -> ``["*__seed0", "kava__seed2"]``: run-name patterns."""
    patterns = [p.strip() for p in (text or "").split(",") if p.strip()]
    if not patterns:
        raise ConfigError(f"--only {text!r}: expected run-name patterns, e.g. '*__seed0'")
    return patterns


def shard_runs(runs: list[Run], shard: tuple[int, int] | None) -> list[Run]:
    if shard is None:
        return list(runs)
    i, n = shard
    return [r for r in runs if r.index % n == i]


def select_runs(runs: list[Run], only: list[str] | None) -> list[Run]:
    """The runs whose name matches one of the ``fnmatch`` patterns ``only`` (all if None);
    a pattern that matches no run is an error (a typo would otherwise run nothing)."""
    if only is None:
        return list(runs)
    for pattern in only:
        if not any(fnmatch.fnmatchcase(r.name, pattern) for r in runs):
            names = ", ".join(r.name for r in runs[:4]) + (", ..." if len(runs) > 4 else "")
            raise ConfigError(f"--only {pattern!r}: matches none of the runs ({names})")
    return [r for r in runs if any(fnmatch.fnmatchcase(r.name, p) for p in only)]


# --------------------------------------------------------------------------- status


def _comparable(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    d = copy.deepcopy(cfg_dict)
    for key in _IGNORED_IN_COMPARISON:
        *parents, last = key.split(".")
        node = d
        for p in parents:
            node = node.get(p, {})
        node.pop(last, None)
    # a curriculum's section is read only by the method that has that curriculum: a change
    # to Coconut's stages leaves the other methods' finished runs valid
    method = METHODS.get(d.get("method"))
    for curriculum, section in CURRICULUM_SECTIONS.items():
        if method is not None and method.curriculum != curriculum:
            d.pop(section, None)
    return d


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def _normalized(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored config with the defaults of keys added since it was written."""
    try:
        return from_dict(KavaConfig, copy.deepcopy(stored)).to_dict()
    except ConfigError:
        return stored  # a key that no longer exists: the comparison names it


def _check_same_config(run: Run, stored: dict[str, Any], where: Path, ignore_eval: bool) -> None:
    now, then = _comparable(run.cfg.to_dict()), _comparable(_normalized(stored))
    if ignore_eval:
        now.pop("eval", None)
        then.pop("eval", None)
    diff = _diff_keys(then, now)
    if diff:
        raise SpecError(
            f"run {run.name}: {where} was made with a different config "
            f"(keys {', '.join(diff[:5])}); delete {run.dir} to redo it, or use another "
            "output_dir"
        )


def read_done(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / DONE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # a torn write: redo the run's last stage


def run_status(run: Run) -> str:
    """``done`` | ``eval`` (re-evaluate only) | ``evaluate`` (trained) | ``resume`` | ``new``.

    Raises ``SpecError`` when the folder holds a run of a different config.
    """
    from kava.checkpoint import latest_checkpoint

    done = read_done(run.dir)
    if done is not None:
        _check_same_config(run, done["config"], run.dir / DONE, ignore_eval=True)
        if _normalized(done["config"]).get("eval") == run.cfg.to_dict()["eval"]:
            return "done"
        return "eval"
    cfg_file = run.dir / "config.yaml"
    if cfg_file.is_file():
        _check_same_config(run, yaml.safe_load(cfg_file.read_text()), cfg_file, True)
    if (run.dir / "final" / "config.yaml").is_file():
        return "evaluate"
    if latest_checkpoint(run.dir) is not None:
        return "resume"
    return "new"


# --------------------------------------------------------------------------- running


def _fresh(run_dir: Path) -> None:
    """Remove what a from-scratch run would otherwise append to (the folder is ours)."""
    for name in (
        "log.jsonl",
        "tb",
        "checkpoints",
        "final",
        "final.tmp",
        "final.old",
        "best",
        "best.tmp",
        "best.old",
        "resume_history.jsonl",
        "eval",
        DONE,
    ):
        p = run_dir / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def preflight_datasets(exp: Experiment) -> None:
    """Load one question of every eval dataset (files / synthetic) before training anything."""
    from kava.data import HELD_OUT, NAMED
    from kava.evaluate import load_eval_examples

    cfg = exp.runs[0].cfg
    for name in exp.datasets:
        if name == "synthetic" or name in NAMED or name in HELD_OUT or Path(name).is_file():
            load_eval_examples(name, cfg, 1)


def selected_checkpoint(run_dir: Path) -> tuple[Path, dict[str, Any] | None]:
    """The checkpoint a run's test numbers come from: ``best/`` (chosen on the validation
    split, ``train.eval_every``) when the run has one, else ``final/``; with best/'s
    ``selection.json``."""
    best = run_dir / "best"
    if (best / "selection.json").is_file():
        return best, json.loads((best / "selection.json").read_text())
    return run_dir / "final", None


def execute_run(run: Run, status: str, progress: bool = True) -> dict[str, Any]:
    """Train (or resume) and evaluate one run; write ``DONE.json`` last. Returns its record."""
    import torch

    from kava import train as train_module
    from kava.backbone import default_device
    from kava.card import record_eval
    from kava.checkpoint import load_checkpoint
    from kava.evaluate import run_eval

    run.dir.mkdir(parents=True, exist_ok=True)
    done_path = run.dir / DONE
    if done_path.exists():
        done_path.unlink()
    train_s = 0.0
    if status in ("new", "resume"):
        t0 = time.perf_counter()
        if status == "resume":
            train_module.train(run.cfg, resume=True, progress=progress)
        else:
            _fresh(run.dir)
            train_module.train(run.cfg, progress=progress)
        train_s = time.perf_counter() - t0
    chosen, selection = selected_checkpoint(run.dir)
    t0 = time.perf_counter()
    backbone, _ = load_checkpoint(chosen)
    backbone.to(default_device())
    eval_dir = run.dir / "eval"
    if eval_dir.exists():
        shutil.rmtree(eval_dir)
    results = run_eval(backbone, run.cfg, run.cfg.eval.datasets, eval_dir, progress=progress)
    record_eval(chosen, results)  # the checkpoint's model card shows its test numbers
    eval_s = time.perf_counter() - t0
    del backbone
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    record = {
        "run": run.name,
        "index": run.index,
        "method": run.method,
        "seed": run.seed,
        "variant": [[k, v] for k, v in run.variant],
        "datasets": list(run.cfg.eval.datasets),
        "metrics": {name: m for name, m in zip(run.cfg.eval.datasets, results)},
        "checkpoint": chosen.name,
        "selection": selection,
        "train_seconds": train_s,
        "eval_seconds": eval_s,
        "config": run.cfg.to_dict(),
    }
    tmp = run.dir / (DONE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(done_path)
    return record


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and a rename: processes of one grid (shards, --only)
    rewrite these files at their start, and a reader never sees half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_experiment_files(exp: Experiment) -> None:
    exp.output_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(exp.output_dir / "spec.yaml", exp.spec_path.read_text())
    summary = {
        "name": exp.name,
        "description": exp.description,
        "spec": str(exp.spec_path),
        "base": exp.base,
        "methods": exp.methods,
        "seeds": exp.seeds,
        "grid": exp.grid,
        "datasets": exp.datasets,
        "runs": [r.name for r in exp.runs],
    }
    _write_atomic(exp.output_dir / "experiment.json", json.dumps(summary, indent=2) + "\n")


def run_experiment(
    exp: Experiment,
    shard: tuple[int, int] | None = None,
    dry_run: bool = False,
    progress: bool = True,
    echo=print,
    only: list[str] | None = None,
) -> list[tuple[Run, str]]:
    """Run (or with ``dry_run`` only list) the runs of this shard that ``only`` selects;
    returns (run, status before)."""
    runs = shard_runs(select_runs(exp.runs, only), shard)
    statuses = [(r, run_status(r)) for r in runs]  # config clashes fail before any training
    shard_txt = f" shard {shard[0]}/{shard[1]}" if shard else " process"
    shard_txt += f" (--only {','.join(only)})" if only else ""
    todo = [(r, s) for r, s in statuses if s != "done"]
    echo(
        f"experiment {exp.name}: {len(exp.runs)} runs, {len(runs)} in this{shard_txt}, "
        f"{len(todo)} to do -> {exp.output_dir}"
    )
    if dry_run:
        width = max((len(r.name) for r, _ in statuses), default=0)  # a shard may be empty
        for r, s in statuses:
            echo(f"  {r.index:4d}  {r.name:<{width}}  {s}")
        return statuses
    write_experiment_files(exp)
    if todo:
        preflight_datasets(exp)
    for k, (r, s) in enumerate(todo, 1):
        what = {
            "new": "training",
            "resume": "resuming training",
            "evaluate": "evaluating",
            "eval": "re-evaluating",
        }[s]
        echo(f"[{k}/{len(todo)}] run {r.index} {r.name}: {what}")
        rec = execute_run(r, s, progress)
        accs = ", ".join(
            f"{d}: acc {m['accuracy']:.3f}, passes {m['mean_forward_passes']:.1f}"
            for d, m in rec["metrics"].items()
        )
        echo(f"[{k}/{len(todo)}] {r.name} done ({accs})")
    missing = [r.name for r in exp.runs if read_done(r.dir) is None]
    if missing:
        echo(f"{len(missing)} runs of the experiment are not done yet (other shards?)")
    else:
        echo(f"all {len(exp.runs)} runs done; tables and plots: kava report {exp.output_dir}")
    return statuses
