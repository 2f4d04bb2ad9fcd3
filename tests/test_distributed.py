"""Two CPU processes (gloo, ``accelerate launch``) against one, at the same global batch.

One launch runs every 2-process job (tests/dist_worker.py); the 1-process references run
in this process. fp32, LoRA dropout 0: the per-step losses must agree to rounding
(rtol 1e-5), and so must the final trainable tensors:

* KaVa with R-KV eviction, 15 examples in micro-batches of 2 (the last holds 1: with
  accelerate's ``even_batches`` it would be padded with a repeated example), resumed
  exactly from a mid-epoch checkpoint under 2 processes;
* Coconut with ``uniform_prob`` (random stages per example), 9 examples: an epoch has
  5 micro-batches, 2 steps of 2 (a per-process count would make it 3 steps);
* random eviction (``rkv.method random``): draws seeded by the global micro-batch; a
  global batch of 8, so each process accumulates 2 micro-batches (local j of rank r is
  global micro-batch 2j + r);
* a data set smaller than the global batch (each step takes the whole epoch);
* validation during training (``train.eval_every``) shared by the processes;
* the main process does not write the run folder before a slow process checked it;
* every process builds the same trainable tensors;
* ``kava eval`` on 2 processes writes byte-identical predictions and the same metrics;
* FSDP2 (configs/accelerate/fsdp2.yaml, on CPU through tests/fsdp_on_cpu.py): the same
  losses and weights for KaVa with R-KV and for Coconut, whole tensors in the checkpoint
  files, exact resume; with a bf16 base under bf16, the losses to bf16 rounding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from conftest import save_tiny_model, tiny_run_config
from kava.cli import main
from kava.parallel import local_launch

REPO = Path(__file__).resolve().parents[1]
LOSSES = ("loss", "student_ce", "teacher_ce", "codi_loss", "kv_loss", "grad_norm", "lr")


def launch(script: Path, args: list[str], n: int = 2, timeout: int = 300, extra: list[str] = ()):
    """``accelerate launch`` of ``n`` gloo processes on the CPU (``--cpu`` would start one)."""
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "tests")]),
        "OMP_NUM_THREADS": "1",
    }
    # a config file names the distributed type itself
    cmd = [*local_launch(n, *(extra or ["--multi_gpu"])), str(script), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def run_config(model_dir, out, n_examples, max_steps, global_batch=4, **sections) -> dict:
    cfg = tiny_run_config(model_dir, out)
    cfg["data"]["synthetic_train_size"] = n_examples
    cfg["train"].update(
        max_steps=max_steps,
        micro_batch_size=2,
        global_batch_size=global_batch,
        eval_every=0,
        save_every=2,
        report_to=["none"],
        lr=1e-3,
    )
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


CONFIGS = {
    "rkv": dict(n_examples=15, max_steps=4),
    "coconut": dict(
        n_examples=9,
        max_steps=3,
        method="coconut",
        coconut={"epochs_per_stage": 0.5, "uniform_prob": 0.5, "max_latent_stage": 1},
    ),
    # a global batch of 8: 4 micro-batches on 1 process, 2 each (accumulated) on 2
    "random": dict(n_examples=17, max_steps=3, rkv={"method": "random"}, global_batch=8),
    # fewer examples than a global batch: 2 micro-batches (2 + 1 examples), one each
    "small": dict(n_examples=3, max_steps=2, global_batch=8),
    # validation every step, its 5 questions in batches of 2 dealt over the processes
    "val": dict(
        n_examples=9, max_steps=2, train={"eval_every": 1, "eval_limit": 5}, eval={"batch_size": 2}
    ),
}


def write_configs(root: Path, model_dir: Path, tag: str) -> dict[str, Path]:
    out = {}
    for name, spec in CONFIGS.items():
        path = root / f"{name}-{tag}.yaml"
        path.write_text(yaml.safe_dump(run_config(model_dir, root / tag / name, **spec)))
        out[name] = path
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama at the usual init scale: smooth enough that rounding (the
    order of a gradient sum differs between 1 and 2 processes) stays at rounding size
    over a few steps (the sharper init of ``tiny_model_dir`` amplifies it to 1e-4)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama-dist"), tokenizer, init_range=0.02)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, model_dir):
    """The 2-process jobs (one launch) and the 1-process references."""
    root = tmp_path_factory.mktemp("dist")
    two = write_configs(root, model_dir, "two")
    one = write_configs(root, model_dir, "one")
    rkv2 = root / "two" / "rkv"
    jobs = [
        {"argv": ["train", str(two["rkv"]), "--no-progress"], "slow_check_rank": 1},
        {"copy": str(rkv2), "to": str(root / "two" / "rkv-resumed")},
        {"rm": str(root / "two" / "rkv-resumed" / "final")},
        {
            "argv": [
                "train",
                str(two["rkv"]),
                "--no-progress",
                "--resume",
                "--output-dir",
                str(root / "two" / "rkv-resumed"),
            ]
        },
        {"argv": ["train", str(two["coconut"]), "--no-progress"]},
        {"argv": ["train", str(two["random"]), "--no-progress"]},
        {"argv": ["train", str(two["small"]), "--no-progress"]},
        {"argv": ["train", str(two["val"]), "--no-progress"]},
        {"init": str(two["rkv"]), "out": str(root / "init")},
        {
            "argv": [
                "eval",
                "--checkpoint",
                str(rkv2 / "final"),
                "--out",
                str(root / "eval-two"),
                "--limit",
                "7",
                "--batch-size",
                "2",
                "--no-progress",
            ]
        },
    ]
    (root / "jobs.json").write_text(json.dumps(jobs))
    launch(REPO / "tests" / "dist_worker.py", [str(root / "jobs.json")])
    for name in CONFIGS:
        assert main(["train", str(one[name]), "--no-progress"]) == 0
    argv = ["eval", "--checkpoint", str(rkv2 / "final"), "--out", str(root / "eval-one")]
    assert main([*argv, "--limit", "7", "--batch-size", "2", "--no-progress"]) == 0
    return root


def assert_same_losses(one: list[dict], two: list[dict]) -> None:
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):
        for k in LOSSES:
            if a.get(k) is not None:
                assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (k, a, b)


def assert_same_weights(one: Path, two: Path) -> None:
    a, b = (
        load_file(str(one / "trainable.safetensors")),
        load_file(str(two / "trainable.safetensors")),
    )
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-5 + 1e-4 * a[k].abs().max(), k


@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_processes_give_the_one_process_losses(runs, name):
    one, two = runs / "one" / name, runs / "two" / name
    assert_same_losses(read_log(one), read_log(two))
    assert_same_weights(one / "final", two / "final")


def test_validation_on_two_processes_matches_one(runs):
    one, two = read_log(runs / "one" / "val"), read_log(runs / "two" / "val")
    for a, b in zip(one, two):
        assert (a["val_accuracy"], a["val_passes"]) == (b["val_accuracy"], b["val_passes"])
    selection = "best/selection.json"
    assert json.loads((runs / "one" / "val" / selection).read_text()) == json.loads(
        (runs / "two" / "val" / selection).read_text()
    )


def test_resume_under_two_processes_is_exact(runs):
    full, resumed = read_log(runs / "two" / "rkv"), read_log(runs / "two" / "rkv-resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(full[2:], resumed[2:]):
        for k in LOSSES:
            assert b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-7), (k, a, b)
    assert_same_weights(runs / "two" / "rkv" / "final", runs / "two" / "rkv-resumed" / "final")


def test_throughput_is_summed_over_processes(runs):
    """Tokens per example of a step are those of the whole global batch: the 1-process
    ratio. Counting only the main process's share (times N) would change it."""
    for a, b in zip(read_log(runs / "one" / "rkv"), read_log(runs / "two" / "rkv")):
        ratio_one = a["tokens_per_s"] / a["examples_per_s"]
        assert b["tokens_per_s"] / b["examples_per_s"] == pytest.approx(ratio_one, rel=1e-9)


def test_process_layout_is_recorded(runs):
    import torch

    two = runs / "two" / "rkv"
    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["parallel"] == {"processes": 2, "fsdp": False}
    assert manifest["device"]["count"] == 2
    state = torch.load(two / "final" / "trainer_state.pt", weights_only=False)
    assert state["parallel"] == {"processes": 2, "fsdp": False}
    assert sorted(p.name for p in (two / "final").glob("rng_state_*.pt")) == [
        "rng_state_0.pt",
        "rng_state_1.pt",
    ]


def test_every_process_initialises_the_same_trainable_tensors(runs):
    a = json.loads((runs / "init.0").read_text())
    b = json.loads((runs / "init.1").read_text())
    assert a == b and any("lora" in k for k in a)


def test_eval_on_two_processes_matches_one(runs):
    for f in ("predictions.jsonl",):
        one = (runs / "eval-one" / "synthetic" / f).read_bytes()
        assert (runs / "eval-two" / "synthetic" / f).read_bytes() == one
    timing = {"seconds", "questions_per_second"}
    m1 = json.loads((runs / "eval-one" / "synthetic" / "metrics.json").read_text())
    m2 = json.loads((runs / "eval-two" / "synthetic" / "metrics.json").read_text())
    assert m1["n"] == 7
    assert {k: v for k, v in m1.items() if k not in timing} == {
        k: v for k, v in m2.items() if k not in timing
    }


@pytest.fixture(scope="module")
def fsdp_runs(runs):
    """The KaVa R-KV run under FSDP2 (2 processes), interrupted and resumed."""
    config = runs / "rkv-two.yaml"
    fsdp = runs / "fsdp"
    argv = ["train", str(config), "--no-progress"]
    bf16 = ["--set", "model.dtype=bfloat16", "--set", "train.mixed_precision=bf16"]
    jobs = [
        {"argv": [*argv, "--output-dir", str(fsdp / "rkv")], "slow_check_rank": 1},
        {"copy": str(fsdp / "rkv"), "to": str(fsdp / "rkv-resumed")},
        {"rm": str(fsdp / "rkv-resumed" / "final")},
        {"argv": [*argv, "--resume", "--output-dir", str(fsdp / "rkv-resumed")]},
        {  # refused before anything is written: validation needs every shard
            "argv": [*argv, "--output-dir", str(fsdp / "refused"), "--set", "train.eval_every=2"],
            "expect_rc": 2,
        },
        # a DDP run resumed under FSDP: refused (its optimizer state is laid out per rank)
        {"copy": str(runs / "two" / "rkv"), "to": str(fsdp / "from-ddp")},
        {"rm": str(fsdp / "from-ddp" / "final")},
        {
            "argv": [*argv, "--resume", "--output-dir", str(fsdp / "from-ddp")],
            "expect_rc": 2,
        },
        {
            "argv": [
                "train",
                str(runs / "coconut-two.yaml"),
                "--no-progress",
                "--output-dir",
                str(fsdp / "coconut"),
            ]
        },
    ]
    (runs / "jobs-fsdp.json").write_text(json.dumps(jobs))
    # bf16 in fresh processes: accelerate's state keeps the first run's mixed precision
    bf16_jobs = [{"argv": [*argv, *bf16, "--output-dir", str(fsdp / "rkv-bf16")]}]
    (runs / "jobs-fsdp-bf16.json").write_text(json.dumps(bf16_jobs))
    one = [sys.executable, "-m", "kava", *argv, *bf16, "--output-dir", str(runs / "one-bf16")]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    subprocess.run(one, env=env, check=True, capture_output=True, timeout=300)
    config_file = REPO / "configs" / "accelerate" / "fsdp2.yaml"
    launch(
        REPO / "tests" / "dist_worker.py",
        [str(runs / "jobs-fsdp.json")],
        extra=["--config_file", str(config_file)],
    )
    launch(
        REPO / "tests" / "dist_worker.py",
        [str(runs / "jobs-fsdp-bf16.json")],
        extra=["--config_file", str(config_file)],
    )
    return fsdp


def test_fsdp_gives_the_one_process_losses(runs, fsdp_runs):
    assert_same_losses(read_log(runs / "one" / "rkv"), read_log(fsdp_runs / "rkv"))
    assert_same_weights(runs / "one" / "rkv" / "final", fsdp_runs / "rkv" / "final")
    manifest = json.loads((fsdp_runs / "rkv" / "manifest.json").read_text())
    assert manifest["parallel"] == {"processes": 2, "fsdp": True}


def test_fsdp_bf16_agrees_with_one_process_within_bf16_rounding(runs, fsdp_runs):
    """A bf16 base and fp32 LoRA, as on GPUs: FSDP2 computes in bf16 (its mixed-precision
    policy), one process under bf16 autocast; the losses agree to bf16 rounding."""
    one, two = read_log(runs / "one-bf16"), read_log(fsdp_runs / "rkv-bf16")
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):
        for k in ("loss", "student_ce", "teacher_ce"):
            assert b[k] == pytest.approx(a[k], rel=1e-3), (k, a, b)


def test_fsdp_refuses_validation_during_training(fsdp_runs):
    refused = fsdp_runs / "refused"  # exit code 2 on both processes, nothing written
    assert not refused.exists() or not any(refused.iterdir())


def test_fsdp_refuses_to_resume_a_ddp_run(runs, fsdp_runs):
    """Resuming a DDP checkpoint under FSDP exits 2 and leaves the run as it was."""
    ddp, refused = runs / "two" / "rkv", fsdp_runs / "from-ddp"
    assert (refused / "log.jsonl").read_text() == (ddp / "log.jsonl").read_text()
    ckpts = sorted(p.name for p in (refused / "checkpoints").iterdir())
    assert ckpts == sorted(p.name for p in (ddp / "checkpoints").iterdir())
    assert not (refused / "final").exists()


def test_fsdp_coconut_gives_the_one_process_losses(runs, fsdp_runs):
    assert_same_losses(read_log(runs / "one" / "coconut"), read_log(fsdp_runs / "coconut"))
    assert_same_weights(runs / "one" / "coconut" / "final", fsdp_runs / "coconut" / "final")


def test_fsdp_checkpoint_is_whole_and_loads_in_one_process(runs, fsdp_runs):
    from kava.checkpoint import load_checkpoint, trainable_state

    final = fsdp_runs / "rkv" / "final"
    backbone, _ = load_checkpoint(final)
    one = load_file(str(runs / "one" / "rkv" / "final" / "trainable.safetensors"))
    for name, value in trainable_state(backbone).items():
        assert value.shape == one[name].shape, name  # whole tensors, not shards
    adapter = load_file(str(final / "adapter" / "adapter_model.safetensors"))
    ref = load_file(str(runs / "one" / "rkv" / "final" / "adapter" / "adapter_model.safetensors"))
    assert adapter.keys() == ref.keys()


def test_fsdp_resume_is_exact(fsdp_runs):
    full, resumed = read_log(fsdp_runs / "rkv"), read_log(fsdp_runs / "rkv-resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(full[2:], resumed[2:]):
        for k in LOSSES:
            assert b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-7), (k, a, b)
    assert_same_weights(fsdp_runs / "rkv" / "final", fsdp_runs / "rkv-resumed" / "final")
