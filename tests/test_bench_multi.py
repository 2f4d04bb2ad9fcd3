"""Smoke test of benchmarks/bench_multi.py: tiny model, 2 CPU processes (--cpu-smoke)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_multi.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_multi", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_cpu_smoke_run_writes_json_and_table(bench, tmp_path):
    out = tmp_path / "multi.json"
    bench.main(["--cpu-smoke", "--out", str(out), "--work", str(tmp_path / "work")])
    res = json.loads(out.read_text())
    assert res["settings"]["gpus"] == 2 and res["environment"]["torch"]
    single, ddp, fsdp = res["scaling"]
    assert (single["processes"], ddp["mode"], fsdp["mode"]) == (1, "ddp", "fsdp")
    assert single["accumulation"] == 2 and ddp["accumulation"] == fsdp["accumulation"] == 1
    for r in (ddp, fsdp):  # fp32 on CPU: the 1-process losses, to rounding
        assert r["diff_vs_single"]["loss"] < 1e-5, r["diff_vs_single"]
        assert r["scaling_efficiency"] > 0 and r["examples_per_s"] > 0
    assert res["memory"][0]["arch"] == "tiny" and "error" not in res["memory"][0]
    one, two = res["eval"]
    assert one["questions"] == two["questions"] == 6 and two["identical_predictions"]
    md = out.with_suffix(".md").read_text()
    assert "| ddp-2 | 2 | 2 x 1 |" in md and "bench_multi.py --cpu-smoke" in md
