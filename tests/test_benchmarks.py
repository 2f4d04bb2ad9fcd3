"""Smoke test of benchmarks/bench_kava.py: tiny model, CPU, --quick, run in-process."""

from __future__ import annotations

import gc
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_kava.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_kava", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_quick_cpu_run_writes_complete_json(bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--arch", "tiny", "--device", "cpu", "--quick", "--steps", "2", "--out", str(out)]
    res = bench.main(argv)
    data = json.loads(out.read_text())
    assert data["argv"] == argv and "bench_kava.py" in data["command"]
    for key in ("command", "environment", "arch", "settings", "precheck", "train", "inference"):
        assert key in data, key
    env = data["environment"]
    assert env["torch"] and env["transformers"] and env["date"]

    s = data["settings"]
    assert (s["method"], s["M"], s["T"]) == ("kava", 24, 3)
    assert s["lora"]["r"] == 128 and s["lora"]["alpha"] == 32
    assert s["global_batch"] == s["micro_batch"] * s["accumulation"]
    assert s["fused_qkv"] is False and data["train"]["fused_qkv_layers"] == 0
    assert s["fused_generation"] is False  # eval.fused_qkv: CUDA only

    pc = data["precheck"]
    assert pc["ok"] and pc["instrumented_matches"]
    assert positive(pc["loss_fp32"]) and positive(pc["loss_bf16_autocast"])

    tr = data["train"]
    for key in (
        "examples_per_s",
        "tokens_per_s",
        "padded_tokens_per_s",
        "step_time_s",
        "tokens_per_step",
        "achieved_tflops",
        "mfu",
        "phase_sum_ms",
    ):
        assert positive(tr[key]), key
    assert len(tr["step_times_s"]) == 2 and tr["losses_finite"]
    # per step, warm-up included (1 + 2): what compiled, and what may have stalled it
    assert len(tr["new_compiled_graphs_per_step"]) == 3
    stalls = tr["stall_counters_per_step"]
    assert len(stalls) == 3 and all(set(st) == {"gc_gen0", "gc_gen1", "gc_gen2"} for st in stalls)
    assert all(v >= 0 for st in stalls for v in st.values())
    assert "MFU = 4 * (N_nonemb + N_lm_head)" in tr["mfu_formula"]
    assert set(tr["phases_ms"]) == {
        "teacher_forward",
        "eviction",
        "student_latent_passes",
        "answer_pass_and_losses",
        "backward",
        "optimizer",
    }
    assert all(positive(v) for v in tr["phases_ms"].values())
    by_pass = tr["tokens_per_step_by_pass"]
    # pass 0 holds question + <bot> + M; every Jacobi iteration M tokens per example
    assert by_pass["iterations_real"] == s["global_batch"] * 24 * 3
    assert tr["tokens_per_step"] == sum(
        by_pass[f"{k}_real"] for k in ("teacher", "pass0", "iterations", "answer")
    )

    inf = data["inference"]
    modes = {(r["mode"], r["new_tokens"]) for r in inf["runs"]}
    assert modes == {("latent", 3), ("cot", 4), ("cot", 8)}
    assert inf["lora_merged"] and not inf["cuda_graphs"] and inf["stop_token"] is None
    assert inf["fused_qkv"] is False and inf["fused_qkv_layers"] == 0
    for r in inf["runs"]:
        assert positive(r["questions_per_s"]) and positive(r["time_s"])
        # no stop token: exactly the requested tokens; kava's pass count matches a hook
        # (CPU: no CUDA graphs, every pass is a module call)
        assert r["generated_tokens_per_question"] == r["new_tokens"]
        want = 1 + 3 + r["new_tokens"] if r["mode"] == "latent" else r["new_tokens"]
        assert r["passes_per_question"] == want == r["passes_per_question_hooked"]
    lat = next(r for r in inf["runs"] if r["mode"] == "latent")
    for r in inf["runs"]:
        if r["mode"] == "cot":
            ratio = inf["latent_speedup"][f"batch4_vs_cot{r['new_tokens']}"]
            assert ratio == pytest.approx(lat["questions_per_s"] / r["questions_per_s"])
    assert res["train"]["step_time_s"] == tr["step_time_s"]
    assert "kava benchmark: tiny" in capsys.readouterr().out  # the table is printed


def test_stall_counters_count_a_full_gc(bench):
    cpu = bench.torch.device("cpu")
    before = bench.stall_counters(cpu)
    gc.collect()
    after = bench.stall_counters(cpu)
    assert after["gc_gen2"] - before["gc_gen2"] == 1


def test_bad_batch_split_is_rejected(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(
            ["--arch", "tiny", "--device", "cpu", "--global-batch", "6", "--micro-batch", "4"]
        )


def test_bf16_frozen_weights_train_only(bench, tmp_path):
    """Also with --fused-qkv (train.fused_qkv): bf16 autocast, bf16 frozen weights."""
    argv = ["--arch", "tiny", "--device", "cpu", "--quick", "--weights", "bf16", "--amp", "bf16"]
    argv += ["--fused-qkv"]
    res = bench.main([*argv, "--skip-inference", "--steps", "1", "--out", str(tmp_path / "b.json")])
    assert set(res["settings"]["param_dtypes"]) == {"frozen bfloat16", "trainable float32"}
    assert res["settings"]["fused_qkv"] is True and res["train"]["fused_qkv_layers"] == 2
    assert res["precheck"]["ok"] and positive(res["train"]["examples_per_s"])
    assert "inference" not in res


def test_fused_generation_flag(bench, monkeypatch):
    """--fused-generation (eval.fused_qkv): off by default, on when asked on cuda, never on
    cpu."""
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)  # parsing only
    cuda = ["--arch", "tiny", "--device", "cuda"]
    assert bench.parse_args(cuda).fused_generation is False
    assert bench.parse_args([*cuda, "--fused-generation"]).fused_generation is True
    cpu = ["--arch", "tiny", "--device", "cpu", "--fused-generation"]
    assert bench.parse_args(cpu).fused_generation is False


def test_profile_script_profiles_the_train_step_and_both_generations():
    """benchmarks/profile_kava.py (device_speed.sh profile) on the tiny model, CPU: one
    section per profiled function, with a wall time, a busy time and an operator table."""
    import re
    import subprocess

    script = SCRIPT.parent / "profile_kava.py"
    argv = ["--arch", "tiny", "--device", "cpu", "--micro-batch", "2", "--infer-batch", "2"]
    out = subprocess.run(
        [sys.executable, str(script), *argv, "--compile", "none", "--rows", "3"],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout
    heads = re.findall(r"^=== (.+?): wall ([\d.]+) ms, device busy ([\d.]+) ms", out, re.M)
    assert [h[0] for h in heads] == [
        "train micro-step",
        "latent generation (7 passes)",
        "cot generation (7 passes)",
    ], out
    assert all(float(wall) > 0 and float(busy) > 0 for _, wall, busy in heads)
    assert out.count("Self CPU") >= 3  # the profiler's operator tables


def test_profile_busy_time_counts_overlapping_kernels_once():
    """profile_kava.covered_length against counting covered unit cells one by one."""
    import random

    spec = importlib.util.spec_from_file_location("profile_kava", SCRIPT.parent / "profile_kava.py")
    module = importlib.util.module_from_spec(spec)
    had_bench = "bench_kava" in sys.modules  # the fixture's; else profile_kava imports one
    try:
        spec.loader.exec_module(module)
    finally:
        if not had_bench:
            sys.modules.pop("bench_kava", None)
    rng = random.Random(0)
    for _ in range(200):
        cells = set()
        intervals = []
        for _ in range(rng.randint(0, 8)):
            start = rng.randint(0, 30)
            end = start + rng.randint(0, 10)
            intervals.append((start, end))
            cells.update(range(start, end))
        assert module.covered_length(intervals) == len(cells), intervals
    assert module.covered_length([(0, 4), (1, 2), (3, 6)]) == 6  # nested, then overlapping
