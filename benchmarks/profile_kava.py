"""Where the time goes: torch.profiler over one KaVa training micro-step and one latent
generation batch, on a random-weight architecture (same builders as bench_kava.py).

    python benchmarks/profile_kava.py --arch llama-1b --device cuda --micro-batch 64

Prints the top operators by device time and by host (CPU) time, and the ratio of
device-busy time to wall time (low = launch / Python overhead bound).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_kava as bk  # noqa: E402

from kava.backbone import Backbone  # noqa: E402
from kava.batching import pad_rows  # noqa: E402
from kava.inference import Generator  # noqa: E402
from kava.model import KavaModel  # noqa: E402
from kava.train import apply_speed_options  # noqa: E402


def covered_length(intervals) -> float:
    """Length of the union of ``(start, end)`` intervals: overlaps count once."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def busy_ms(prof, device) -> float:
    """Time the device ran anything: the union of its kernel (and memcpy/memset) intervals
    on CUDA; on CPU the operators' self time.

    Not a sum over ``key_averages()`` on CUDA: there an operator's self device time is the
    time of the kernels it launched, which are rows of their own too (counted twice; the
    2026-12-07 h3 profile printed "device busy 145%")."""
    if device.type == "cuda":
        kernels = [
            (e.time_range.start, e.time_range.end)
            for e in prof.events()
            if e.device_type == DeviceType.CUDA
        ]
        return covered_length(kernels) / 1e3
    return sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e3


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--arch", default="llama-1b", choices=sorted(bk.ARCHS))
    p.add_argument("--device", default="cuda")
    p.add_argument("--micro-batch", type=int, default=64)
    p.add_argument("--infer-batch", type=int, default=64)
    p.add_argument("--compile", choices=["none", "layers"], help="as bench_kava.py")
    p.add_argument("--no-graphs", action="store_true", help="generation without CUDA graphs")
    p.add_argument("--rows", type=int, default=18, help="operators to print per table")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    weights = "bf16" if device.type == "cuda" else "fp32"
    extra = ["--compile", args.compile] if args.compile else []
    bargs = bk.parse_args(
        ["--arch", args.arch, "--device", args.device, "--weights", weights, *extra]
    )
    cfg = bk.kava_config(bargs)
    arch = bk.ARCHS[args.arch]
    bb = Backbone.from_model(bk.build_lm(arch, device, 0), bk.build_tokenizer(arch), cfg.lora).to(
        device
    )
    if device.type == "cuda":
        bk.cast_frozen_(bb, torch.bfloat16)
    apply_speed_options(bb, cfg, device)  # what kava.train does
    model = KavaModel(bb, cfg).train()
    synth = bk.Synth(bb, bk.Lengths(50, 40, 0.25), 0, bucket=cfg.train.bucket)
    batch = synth.batch(args.micro_batch).to(device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def train_step():
        with amp:
            out = model(batch)
        out.total.backward()
        bb.zero_grad(set_to_none=True)

    runner = bb.merged_copy()  # what kava eval runs
    gen = Generator(runner, cuda_graphs=device.type == "cuda" and not args.no_graphs)
    rows = [synth.question(60) + [bb.ids.bot] for _ in range(args.infer_batch)]
    qids = pad_rows(rows, bb.ids.pad, left=True, multiple_of=16).to(device)
    qmask = pad_rows([[1] * len(r) for r in rows], 0, left=True, multiple_of=16).bool().to(device)
    cot_rows = [r[:-1] for r in rows]
    cids = pad_rows(cot_rows, bb.ids.pad, left=True, multiple_of=16).to(device)
    cmask = pad_rows([[1] * len(r) for r in cot_rows], 0, left=True, multiple_of=16)
    cmask = cmask.bool().to(device)

    def latent():
        gen.latent(qids, qmask, synth.prompt, 24, 3, max_new_tokens=3, stop_token=None)

    def cot():
        gen.text(cids, cmask, max_new_tokens=7, stop_token=None)

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for name, fn in (
        ("train micro-step", train_step),
        ("latent generation (7 passes)", latent),
        ("cot generation (7 passes)", cot),
    ):
        fn(), fn()  # warm-up (compilation, graph capture)
        bk.sync(device)
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            fn()
            bk.sync(device)
            wall = (time.perf_counter() - t0) * 1e3
        busy = busy_ms(prof, device)
        print(
            f"\n=== {name}: wall {wall:.1f} ms, device busy {busy:.1f} ms ({100 * busy / wall:.0f}%) ==="
        )
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(
            prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=60)
        )


if __name__ == "__main__":
    main()
