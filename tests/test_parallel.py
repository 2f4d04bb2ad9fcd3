"""kava.parallel on one process: the global indices, seeds and gathering it defines."""

from __future__ import annotations

import pytest

from kava.parallel import (
    Shard,
    current_shard,
    draw_seed,
    gather_in_order,
    global_micro,
    shard,
    steps_per_epoch,
)


def test_global_micro_is_accelerates_round_robin():
    # 2 processes, 2 accumulated micro-batches each: rank 0 holds global 0 and 2
    assert [global_micro(j, r, 2) for j in range(2) for r in range(2)] == [0, 1, 2, 3]
    assert [global_micro(j, 0, 1) for j in range(4)] == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("n", "micro", "accum", "world", "steps"),
    [
        (9, 2, 2, 1, 2),  # 5 micro-batches, the 5th unused
        (9, 2, 1, 2, 2),  # the same global batch on 2 processes: the same 2 steps
        (7, 2, 2, 1, 2),  # the last, short micro-batch counts
        (7, 2, 1, 2, 2),
        (16, 2, 2, 2, 2),
    ],
)
def test_steps_per_epoch_counts_the_global_batch(n, micro, accum, world, steps):
    assert steps_per_epoch(n, micro, accum, world) == steps


def test_draw_seed_is_the_single_process_key_of_before():
    """The curricula's draws on one process are those of the code before kava.parallel
    (seed, process 0, step, micro-batch): single-process runs are unchanged."""
    p = 1_000_003
    for seed, step, micro in [(0, 0, 0), (3, 17, 2), (2**40, 5, 1)]:
        old = ((seed * p + 0) * p + step) * p
        assert draw_seed(seed, step, micro) == (old + micro) % (2**63)
    assert draw_seed(0, 1, 0) != draw_seed(0, 0, 1)


def test_shard_and_gather_on_one_process():
    batches = [[0, 1], [2, 3], [4]]
    assert shard(batches, Shard()) == batches
    assert shard(batches, Shard(1, 2)) == [[2, 3]]
    assert gather_in_order([(2, "c"), (0, "a"), (1, "b")], 3, Shard()) == ["a", "b", "c"]
    with pytest.raises(RuntimeError, match="gathered 2 results for 3"):
        gather_in_order([(0, "a"), (1, "b")], 3, Shard())


def test_a_plain_process_is_rank_0_of_1(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert current_shard() == Shard(0, 1) and current_shard().is_main
