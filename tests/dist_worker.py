"""Run a list of kava jobs inside ONE ``accelerate launch`` (tests/test_distributed.py).

``accelerate launch ... tests/dist_worker.py JOBS.json``: every process runs the jobs in
order (one launch pays the start-up of N Python processes once). A job is a dict:

* ``{"argv": [...]}``: ``kava.cli.main(argv)`` (train, eval, ...); must return 0, or
  ``expect_rc`` (a refused run: 2);
* ``{"argv": [...], "slow_check_rank": r}``: process ``r`` sleeps before its
  fresh-folder check (a slow process at start-up; the main one must wait for it);
* ``{"rm": path}`` / ``{"copy": src, "to": dst}``: the main process deletes ``path`` (an
  interruption) / copies a folder, then a barrier;
* ``{"init": config, "out": file}``: build the trainable tensors as ``kava train`` does,
  after a per-process RNG state, and write their checksum per rank to ``file.<rank>``.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch
from accelerate import PartialState

import fsdp_on_cpu  # noqa: F401  (FSDP launches on CPU processes)
from kava.parallel import process_state


def run_job(job: dict, state: PartialState) -> None:
    from kava import train as train_mod
    from kava.cli import main

    if "rm" in job or "copy" in job:
        if state.is_main_process:
            if "rm" in job:
                shutil.rmtree(job["rm"])
            else:
                shutil.copytree(job["copy"], job["to"])
        state.wait_for_everyone()
        return
    if "init" in job:
        from kava.config import load_config

        torch.manual_seed(1234 + state.process_index)  # as after a per-process seed
        backbone = train_mod.init_backbone(load_config(job["init"]))
        sums = {
            n: float(p.double().sum()) for n, p in backbone.named_parameters() if p.requires_grad
        }
        Path(f"{job['out']}.{state.process_index}").write_text(json.dumps(sums))
        state.wait_for_everyone()
        return
    original = train_mod.check_fresh
    if job.get("slow_check_rank") == state.process_index:

        def slow(run_dir):
            time.sleep(4.0)
            return original(run_dir)

        train_mod.check_fresh = slow
    try:
        rc = main(job["argv"])
    finally:
        train_mod.check_fresh = original
    if rc != job.get("expect_rc", 0):
        raise SystemExit(f"rank {state.process_index}: {job['argv']} returned {rc}")
    state.wait_for_everyone()


def main() -> None:
    state = process_state()
    jobs = json.loads(Path(sys.argv[1]).read_text())
    print(f"rank {state.process_index} of {state.num_processes}", flush=True)
    for job in jobs:
        run_job(job, state)


if __name__ == "__main__":
    main()
