"""Crash-safe checkpoints: a SIGKILL at each phase of a save, then --resume, gives the
same final weights as an uninterrupted run; corrupt files are detected and skipped;
retention keeps the newest N; SIGTERM saves at the next step boundary."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from kava.checkpoint import CRASH_ENV, prune_checkpoints
from kava.cli import main
from test_train import write_config

# 12 examples / global batch 4 = 3 steps an epoch: 6 steps cross an epoch boundary;
# dropout 0.1 (write_config) makes the RNG state part of what must be restored
RUN = {
    "data": {"synthetic_train_size": 12},
    "train": {"max_steps": 6, "save_every": 2, "save_total_limit": 2},
}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


def train_args(tmp_path, model_dir, *extra):
    return ["train", str(write_config(tmp_path, model_dir, **RUN)), "--no-progress", *extra]


def final_weights(run):
    return load_file(str(run / "final" / "trainable.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    """The final weights of an uninterrupted run, and its run folder."""
    tmp = tmp_path_factory.mktemp("reference")
    assert main(train_args(tmp, tiny_model_dir)) == 0
    return final_weights(tmp / "run"), tmp / "run"


def in_child(fn) -> int:
    """Run ``fn`` in a forked process; return its wait status (SIGKILL kills only it)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            fn()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return status


def killed_at(phase: str, args: list[str]) -> None:
    def child():
        os.environ[CRASH_ENV] = phase
        main(args)

    status = in_child(child)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, phase


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_reference_run_layout(reference):
    _, run = reference
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2", "step-4"]
    sums = json.loads((run / "final" / "checksums.json").read_text())
    assert {"trainable.safetensors", "trainer_state.pt", "rng_state_0.pt", "config.yaml"} <= set(
        sums
    )
    assert not list(run.glob("**/*.tmp")) and not list(run.glob("*.old"))


# phase@n: the n-th save of the run is step-2, step-4, then final
@pytest.mark.parametrize(
    "phase", ["trainable@2", "rank_state@2", "checksums@2", "renamed@2", "state@3"]
)
def test_sigkill_during_a_save_then_resume_is_bit_identical(
    tmp_path, tiny_model_dir, reference, phase
):
    args = train_args(tmp_path, tiny_model_dir)
    killed_at(phase, args)
    run = tmp_path / "run"
    assert not (run / "final").exists()
    assert main([*args, "--resume"]) == 0
    assert_same(final_weights(run), reference[0])
    assert not list(run.glob("**/*.tmp"))


def test_sigkill_while_final_is_replaced_keeps_a_loadable_final(
    tmp_path, tiny_model_dir, reference
):
    args = train_args(tmp_path, tiny_model_dir)
    assert main(args) == 0
    killed_at("aside@1", [*args, "--resume"])  # a re-run resumes at step-4, replaces final/
    run = tmp_path / "run"
    assert not (run / "final").exists() and (run / "final.old").is_dir()
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(run / "final"), "--out", str(out), "--limit", "1",
                 "--no-progress"]) == 0  # fmt: skip
    assert (run / "final").is_dir() and not (run / "final.old").exists()
    assert_same(final_weights(run), reference[0])


def test_corrupt_newest_checkpoint_falls_back_with_a_warning(
    tmp_path, tiny_model_dir, reference, caplog
):
    args = train_args(tmp_path, tiny_model_dir)
    killed_at("trainable@3", args)  # step-2 and step-4 saved, final/ not
    run = tmp_path / "run"
    f = run / "checkpoints" / "step-4" / "trainable.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte in the tensor data
    f.write_bytes(bytes(data))
    assert main([*args, "--resume"]) == 0
    assert f"skipping {f.parent}: {f}: checksum mismatch" in caplog.text
    assert_same(final_weights(run), reference[0])


def test_truncated_or_corrupt_final_is_an_error_naming_the_file(tmp_path, reference, capsys):
    import shutil

    final = tmp_path / "final"
    shutil.copytree(reference[1] / "final", final)
    f = final / "trainable.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    assert main(["solve", "--checkpoint", str(final), "What is 2 plus 3?"]) == 2
    err = capsys.readouterr().err
    assert f"{f}: truncated or resized (100 bytes" in err and "Traceback" not in err
    (final / "checksums.json").unlink()  # an older kava's checkpoint: still no traceback
    assert main(["solve", "--checkpoint", str(final), "What is 2 plus 3?"]) == 2
    err = capsys.readouterr().err
    assert f"{f}: unreadable safetensors file" in err and "Traceback" not in err


def test_retention_keeps_the_newest_n(tmp_path):
    for n in (2, 4, 6, 8, 10):
        (tmp_path / "checkpoints" / f"step-{n}").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-12.tmp").mkdir()
    (tmp_path / "best").mkdir()
    deleted = prune_checkpoints(tmp_path, 3)
    assert sorted(p.name for p in deleted) == ["step-2", "step-4"]
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert left == ["step-10", "step-12.tmp", "step-6", "step-8"]
    assert prune_checkpoints(tmp_path, 0) == [] and (tmp_path / "best").is_dir()


def test_sigterm_saves_at_the_next_step_and_resume_finishes_identically(
    tmp_path, tiny_model_dir, reference
):
    import kava.train

    args = train_args(tmp_path, tiny_model_dir, "--set", "train.save_every=0")

    def child():
        write_log = kava.train.write_log

        def log_then_term(log_file, rec):  # a SIGTERM arrives during step 3
            write_log(log_file, rec)
            if rec.get("step") == 2:
                signal.raise_signal(signal.SIGTERM)

        kava.train.write_log = log_then_term
        code = main(args)
        os._exit(code)

    status = in_child(child)
    run = tmp_path / "run"
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 143
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-3"]
    assert main([*args, "--resume"]) == 0
    assert_same(final_weights(run), reference[0])
