"""Verify kava on several GPUs: 1 vs N processes under DDP and FSDP2, through ``kava train``.

What it runs (each run is a real ``accelerate launch ... kava train``, so this checks the
code users run, not a copy of it):

1. **Equivalence and scaling**: the Llama-3.2-1B architecture built from its config with
   random weights (bench_kava.ARCHS, word-level tokenizer, no network), KaVa M=24 T=3,
   LoRA r=128, global batch 128, synthetic data. One GPU (micro-batch x accumulation),
   N GPUs with DDP (configs/accelerate/ddp.yaml) and with FSDP2
   (configs/accelerate/fsdp2.yaml), the same micro-batch: per-step losses against the
   1-GPU run (max relative difference per term), examples/s (median over the steps
   after the first), scaling efficiency ``ex/s(N) / (N x ex/s(1))``, peak memory per GPU.
2. **Memory**: 3B- and 8B-shaped Llama models under FSDP2 on N GPUs: peak memory per GPU
   and examples/s for a few steps.
3. **Evaluation**: ``kava eval`` of the 1-GPU run's ``final/`` on 1,319 synthetic
   questions (GSM8k-test sized) on 1 and N GPUs: seconds, questions/s, and whether the
   N-GPU predictions.jsonl is byte-identical.

It writes every number to a JSON (``--out``) and a Markdown table next to it (``.md``)
with the command, GPUs, versions and date. ``--cpu-smoke``: the same code paths on 2
CPU processes (gloo) with the tiny architecture in a minute (tests/test_bench_multi.py
runs it; FSDP on CPU needs tests/fsdp_on_cpu.py, which accelerate would refuse).

    python benchmarks/bench_multi.py --gpus 4 --out $OUT/multi.json
    python benchmarks/bench_multi.py --cpu-smoke --out /tmp/multi.json

Sections can run in separate calls sharing ``--work`` (a device call has a time limit):
``--skip memory,eval`` first, then ``--skip scaling,memory`` evaluates that run's
``1-process/final``, ``--skip scaling,eval`` measures memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import bench_kava as bk  # noqa: E402

from kava import parallel  # noqa: E402

# Llama-3.1-8B's shape (untied lm_head), for the memory section; the others are bench_kava's
ARCHS = {
    **bk.ARCHS,
    "llama-8b": bk._arch(
        "meta-llama/Llama-3.1-8B-Instruct",
        "llama",
        128256,
        128256,
        4096,
        32,
        32,
        8,
        128,
        14336,
        tied=False,
    ),
}
LOSS_TERMS = ("loss", "student_ce", "teacher_ce", "codi_loss", "kv_loss", "grad_norm")
SHIM_ENV = "KAVA_BENCH_FSDP_ON_CPU"  # the worker imports tests/fsdp_on_cpu.py


def log(msg: str) -> None:
    print(msg, flush=True)


# --- the worker: one process of a launched run ----------------------------------------------


def worker_train(config: str, mem_out: str) -> None:
    """``kava train`` in this process, then its peak GPU memory into ``mem_out.<rank>``."""
    if os.environ.get(SHIM_ENV):
        sys.path.insert(0, str(REPO / "tests"))
        import fsdp_on_cpu  # noqa: F401

    from kava.config import load_config
    from kava.train import train

    cuda = torch.cuda.is_available()
    train(load_config(config), progress=False)
    rank = int(os.environ.get("RANK", "0"))
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    Path(f"{mem_out}.{rank}").write_text(json.dumps({"rank": rank, "peak_mem_gib": peak}))


# --- the orchestrator ------------------------------------------------------------------------


def launcher(n: int, mode: str, smoke: bool) -> tuple[list[str], dict[str, str]]:
    """``accelerate launch`` arguments and environment for ``n`` processes in ``mode``
    (``single``, ``ddp``, ``fsdp``)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    options: list[str] = []
    if mode == "fsdp":
        options = ["--config_file", str(REPO / "configs" / "accelerate" / "fsdp2.yaml")]
        if smoke:
            env[SHIM_ENV] = "1"
    elif mode == "ddp" and not smoke:
        options = ["--config_file", str(REPO / "configs" / "accelerate" / "ddp.yaml")]
    elif mode == "ddp":
        options = ["--multi_gpu"]  # on CPU: N gloo processes (--cpu would start one)
    if smoke:
        env["ACCELERATE_USE_CPU"] = "1"
        env["OMP_NUM_THREADS"] = "1"
    cmd = parallel.local_launch(n, *options)
    return cmd, env


def run(cmd: list[str], env: dict[str, str], what: str) -> None:
    log(f"-- {what}: {' '.join(cmd[2:])}")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")


def prepare_model(arch_name: str, folder: Path, dtype: torch.dtype, device: torch.device) -> Path:
    """A random-weight model of ``arch_name`` saved as a local HF folder with its tokenizer."""
    if (folder / "config.json").is_file():
        return folder
    arch = ARCHS[arch_name]
    lm = bk.build_lm(arch, device, seed=0).to(dtype)
    lm.save_pretrained(folder)
    bk.build_tokenizer(arch).save_pretrained(folder)
    del lm
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return folder


def train_config(args, model_dir: Path, out: Path, steps: int, micro: int, fsdp: bool) -> dict:
    """The paper's Llama-1B KaVa config on the random model, synthetic data, ``steps``
    optimizer steps of the global batch, a log line per step, no checkpoints."""
    cfg = yaml.safe_load((REPO / "configs" / "llama1b-gsm8k-aug.yaml").read_text())
    g = args.global_batch
    cfg["model"] = {"name_or_path": str(model_dir), "dtype": args.dtype}
    cfg["data"] = {"train": "synthetic", "synthetic_train_size": g * steps}
    cfg["eval"] = {"datasets": ["synthetic"], "batch_size": args.eval_batch, "max_new_tokens": 16}
    cfg["lora"]["dropout"] = 0.0  # no per-process dropout streams: comparable losses
    cfg["train"] = {
        **cfg["train"],
        "output_dir": str(out),
        "max_steps": steps,
        "epochs": 1,
        "global_batch_size": g,
        "micro_batch_size": micro,
        "save_every": 0,
        "eval_every": 0,
        "log_every": 1,
        "report_to": ["none"],
        "mixed_precision": args.mixed_precision,
        # FSDP runs each HF layer's own forward (kava.parallel.keep_gathered), uncompiled
        "compile": "none" if fsdp else args.compile,
    }
    if args.smoke:
        cfg["lora"].update(r=4, alpha=8)
        cfg["latent"].update(num_latents=3, num_iterations=2)
    return cfg


def launch_train(args, name: str, n: int, mode: str, model_dir: Path, steps: int, micro: int):
    """One ``kava train`` run; returns its log lines and per-rank peak memory."""
    out = args.work / name
    shutil.rmtree(out, ignore_errors=True)
    cfg_file = args.work / f"{name}.yaml"
    cfg = train_config(args, model_dir, out, steps, micro, fsdp=mode == "fsdp")
    cfg_file.write_text(yaml.safe_dump(cfg))
    cmd, env = launcher(n, mode, args.smoke)
    mem = args.work / f"{name}.mem"
    run([*cmd, __file__, "--worker-train", str(cfg_file), str(mem)], env, name)
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    peaks = [json.loads(Path(f"{mem}.{r}").read_text())["peak_mem_gib"] for r in range(n)]
    return out, lines, peaks


def summarise(name: str, n: int, mode: str, micro: int, lines: list[dict], peaks: list) -> dict:
    rates = [r["examples_per_s"] for r in lines[1:]] or [lines[-1]["examples_per_s"]]
    known = [p for p in peaks if p is not None]
    return {
        "name": name,
        "processes": n,
        "mode": mode,
        "micro_batch": micro,
        "accumulation": None,  # filled by the caller
        "examples_per_s": statistics.median(rates),
        "tokens_per_s": statistics.median(
            [r["tokens_per_s"] for r in lines[1:]] or [lines[-1]["tokens_per_s"]]
        ),
        "peak_mem_gib_per_process": peaks,
        "peak_mem_gib_max": max(known) if known else None,
        "losses": [{k: r.get(k) for k in ("step", *LOSS_TERMS)} for r in lines],
    }


def max_rel_diff(ref: list[dict], other: list[dict]) -> dict[str, float]:
    out = {}
    for k in LOSS_TERMS:
        diffs = [
            abs(b[k] - a[k]) / max(abs(a[k]), 1e-12)
            for a, b in zip(ref, other)
            if a.get(k) is not None and b.get(k) is not None
        ]
        out[k] = max(diffs) if diffs else None
    return out


def launch_eval(args, name: str, n: int, checkpoint: Path) -> dict:
    out = args.work / name
    shutil.rmtree(out, ignore_errors=True)
    cmd, env = launcher(n, "ddp" if n > 1 else "single", args.smoke)
    argv = ["-m", "kava", "eval", "--checkpoint", str(checkpoint), "--datasets", "synthetic"]
    argv += ["--limit", str(args.eval_questions), "--batch-size", str(args.eval_batch)]
    run([*cmd, *argv, "--out", str(out), "--no-progress"], env, name)
    metrics = json.loads((out / "synthetic" / "metrics.json").read_text())
    return {
        "name": name,
        "processes": n,
        "questions": metrics["n"],
        "seconds": metrics["seconds"],
        "questions_per_s": metrics["questions_per_second"],
        "accuracy": metrics["accuracy"],
        "predictions": out / "synthetic" / "predictions.jsonl",
    }


def environment(args) -> dict[str, Any]:
    env = bk.environment(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    env["gpus_used"] = args.gpus
    if torch.cuda.is_available():
        env["gpus_visible"] = torch.cuda.device_count()
    return env


def table(res: dict[str, Any]) -> str:
    env, s = res["environment"], res["settings"]
    lines = [
        f"# kava on {s['gpus']} {'CPU processes' if s['smoke'] else 'GPUs'}: 1 vs N",
        "",
        f"command: `{res['command']}`  ",
        f"device: {env.get('gpu') or env.get('cpu')} | torch {env['torch']} | transformers "
        f"{env['transformers']} | accelerate {env['accelerate']} | peft {env['peft']} | "
        f"{env['date']}  ",
        f"arch {s['arch']} (random weights), KaVa M={s['M']} T={s['T']}, global batch "
        f"{s['global_batch']}, {s['steps']} steps, dtype {s['dtype']}, mixed precision "
        f"{s['mixed_precision']}, synthetic data",
        "",
        "| run | processes | micro x accum | ex/s | scaling eff. | peak GiB / process | "
        "max rel. loss diff vs 1 | max rel. grad-norm diff vs 1 |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def gib(x):
        return f"{x:.1f}" if x is not None else "n/a"

    def sci(x):
        return f"{x:.1e}" if x is not None else "-"

    for r in res["scaling"]:
        d = r.get("diff_vs_single") or {}
        eff = r.get("scaling_efficiency")
        lines.append(
            f"| {r['name']} | {r['processes']} | {r['micro_batch']} x {r['accumulation']} | "
            f"{r['examples_per_s']:.1f} | {f'{eff:.2f}' if eff is not None else '-'} | "
            f"{gib(r['peak_mem_gib_max'])} | {sci(d.get('loss'))} | {sci(d.get('grad_norm'))} |"
        )
    if res["memory"]:
        lines += [
            "",
            "| FSDP2 memory run | arch | processes | micro x accum | ex/s | peak GiB / process |",
            "|---|---|---|---|---|---|",
        ]
        for r in res["memory"]:
            if "error" in r:
                lines.append(f"| {r['name']} | {r['arch']} | - | - | - | {r['error'][:80]} |")
                continue
            lines.append(
                f"| {r['name']} | {r['arch']} | {r['processes']} | {r['micro_batch']} x "
                f"{r['accumulation']} | {r['examples_per_s']:.1f} | {gib(r['peak_mem_gib_max'])} |"
            )
    if res["eval"]:
        lines += [
            "",
            "| eval | processes | questions | seconds | questions/s | predictions == 1 process |",
            "|---|---|---|---|---|---|",
        ]
        for r in res["eval"]:
            lines.append(
                f"| {r['name']} | {r['processes']} | {r['questions']} | {r['seconds']:.1f} | "
                f"{r['questions_per_s']:.1f} | {r['identical_predictions']} |"
            )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, default=None, help="N (default: all visible; smoke 2)")
    p.add_argument("--cpu-smoke", dest="smoke", action="store_true", help="tiny, 2 CPU processes")
    p.add_argument("--arch", default="llama-1b", choices=sorted(ARCHS))
    p.add_argument("--memory-archs", default="llama-3b,llama-8b", help="FSDP2 memory section")
    p.add_argument("--global-batch", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=32, help="per process, section 1")
    p.add_argument("--memory-micro-batch", type=int, default=16, help="per process, section 2")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--memory-steps", type=int, default=3)
    p.add_argument("--dtype", default="auto", help="model.dtype (auto: bf16 on CUDA)")
    p.add_argument("--mixed-precision", default="auto", help="train.mixed_precision")
    p.add_argument("--compile", default="auto", help="train.compile of the 1-GPU and DDP runs")
    p.add_argument("--eval-questions", type=int, default=1319)
    p.add_argument("--eval-batch", type=int, default=64)
    p.add_argument("--skip", default="", help="comma list of sections: scaling,memory,eval")
    p.add_argument("--work", type=Path, help="run folders (default: a temporary folder)")
    p.add_argument("--out", type=Path, help="JSON results (and .md beside it); required")
    p.add_argument("--worker-train", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.gpus = args.gpus or 2
        args.arch, args.memory_archs = "tiny", "tiny"
        args.global_batch, args.micro_batch, args.memory_micro_batch = 4, 2, 2
        args.steps, args.memory_steps = min(args.steps, 2), 1
        args.eval_questions, args.eval_batch = min(args.eval_questions, 6), 2
        args.dtype, args.mixed_precision, args.compile = "float32", "no", "none"
    elif args.gpus is None:
        args.gpus = torch.cuda.device_count()
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.worker_train:
        worker_train(*args.worker_train)
        return {}
    if args.out is None:
        raise SystemExit("bench_multi: --out is required")
    if args.gpus < 2:
        raise SystemExit("bench_multi needs at least 2 GPUs (--gpus), or --cpu-smoke")
    skip = set(filter(None, args.skip.split(",")))
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-multi-")
        args.work = Path(tmp.name)
    args.work.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    save_dtype = torch.float32 if args.smoke else torch.bfloat16
    n, g = args.gpus, args.global_batch
    res: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv])
        if argv is None
        else " ".join(["python", "benchmarks/bench_multi.py", *argv]),
        "argv": list(sys.argv[1:] if argv is None else argv),
        "environment": environment(args),
        "settings": {
            "smoke": args.smoke,
            "gpus": n,
            "arch": args.arch,
            "global_batch": g,
            "steps": args.steps,
            "dtype": args.dtype,
            "mixed_precision": args.mixed_precision,
            "M": 3 if args.smoke else 24,
            "T": 2 if args.smoke else 3,
        },
        "scaling": [],
        "memory": [],
        "eval": [],
    }
    try:
        model_dir = prepare_model(args.arch, args.work / f"model-{args.arch}", save_dtype, device)
        single_final = None
        if "scaling" not in skip:
            micro = args.micro_batch
            plan = [("1-process", 1, "single"), (f"ddp-{n}", n, "ddp"), (f"fsdp2-{n}", n, "fsdp")]
            for name, procs, mode in plan:
                out, lines, peaks = launch_train(
                    args, name, procs, mode, model_dir, args.steps, micro
                )
                r = summarise(name, procs, mode, micro, lines, peaks)
                r["accumulation"] = max(1, g // (micro * procs))
                res["scaling"].append(r)
                if mode == "single":
                    single_final = out / "final"
            ref = res["scaling"][0]
            for r in res["scaling"][1:]:
                r["diff_vs_single"] = max_rel_diff(ref["losses"], r["losses"])
                r["scaling_efficiency"] = r["examples_per_s"] / (n * ref["examples_per_s"])
        if "memory" not in skip:
            for arch in filter(None, args.memory_archs.split(",")):
                name = f"fsdp2-{n}-{arch}"
                try:
                    folder = prepare_model(arch, args.work / f"model-{arch}", save_dtype, device)
                    micro = args.memory_micro_batch
                    _, lines, peaks = launch_train(
                        args, name, n, "fsdp", folder, args.memory_steps, micro
                    )
                    r = summarise(name, n, "fsdp", micro, lines, peaks)
                    r.update(arch=arch, accumulation=max(1, g // (micro * n)))
                except RuntimeError as e:  # e.g. out of memory: recorded, the rest goes on
                    r = {"name": name, "arch": arch, "error": str(e)[-2000:]}
                res["memory"].append(r)
        if single_final is None and (args.work / "1-process" / "final").is_dir():
            single_final = args.work / "1-process" / "final"  # an earlier call's (--work)
        if "eval" not in skip and single_final is not None:
            one = launch_eval(args, "eval-1", 1, single_final)
            many = launch_eval(args, f"eval-{n}", n, single_final)
            same = one["predictions"].read_bytes() == many["predictions"].read_bytes()
            one["identical_predictions"], many["identical_predictions"] = True, same
            for r in (one, many):
                r["predictions"] = str(r["predictions"])
            res["eval"] = [one, many]
    finally:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2) + "\n")
        md = table(res) if res["scaling"] or res["memory"] else "(no run finished)\n"
        args.out.with_suffix(".md").write_text(md)
        log(md)
        if tmp is not None:
            tmp.cleanup()
    return res


if __name__ == "__main__":
    main()
