"""Several processes (DDP, FSDP, sharded evaluation): ranks, global indices, gathering.

Everything that must come out the same for 1 and N processes is defined here on the
*global* batch, never on a process's own share of it:

* accelerate deals the micro-batches of an epoch round-robin (``split_batches=False``):
  global micro-batch ``g`` goes to process ``g % N`` as its local micro-batch ``g // N``;
  an optimizer step takes ``accum x N`` consecutive global micro-batches
  (``global_micro``, ``steps_per_epoch``);
* random draws (random eviction, curricula) are seeded by ``(seed, optimizer step,
  global micro-batch)`` (``draw_seed``), not taken from a per-process stream;
* evaluation deals whole decoding batches round-robin and gathers the predictions back
  into input order (``shard``, ``gather_in_order``), so every batch is decoded exactly
  as one process decodes it.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

_PRIME = 1_000_003


@dataclass(frozen=True)
class Shard:
    """This process's place among ``world`` processes (``rank`` 0 is the main one)."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_world() -> int:
    """The process count of an ``accelerate launch`` / ``torchrun`` (``WORLD_SIZE``), 1
    otherwise: a plain ``kava`` call starts no process group."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def process_state():
    """accelerate's ``PartialState`` (starts the process group). ``ACCELERATE_USE_CPU``
    must be passed on by hand: ``PartialState()`` ignores it (only ``Accelerator`` reads
    it) and would see N single processes on a CPU launch."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def current_shard() -> Shard:
    """This process's ``Shard``; with several processes the process group is started
    (``process_state``). A single process gets ``Shard()`` and nothing is initialised."""
    if launched_world() <= 1:
        return Shard()
    state = process_state()
    return Shard(state.process_index, state.num_processes)


def process_device(where: Shard):
    """The device of this process under a launcher (its own GPU, or the CPU), None for a
    single process (the caller's default)."""
    if where.world <= 1:
        return None
    return process_state().device


@contextlib.contextmanager
def main_first(where: Shard) -> Iterator[None]:
    """The main process runs the block first (downloads, conversions, caches), the others
    after it: one process writes a cache, the rest read it."""
    if where.world <= 1:
        yield
        return
    with process_state().main_process_first():
        yield


def global_micro(local: int, rank: int, world: int) -> int:
    """Index, within its optimizer step, of local micro-batch ``local`` of process ``rank``.

    A step's ``accum x world`` micro-batches are dealt round-robin: local ``j`` of rank
    ``r`` is global ``j * world + r`` (1 process: ``local`` itself)."""
    return local * world + rank


def steps_per_epoch(n_items: int, micro: int, accum: int, world: int) -> int:
    """Optimizer steps in one epoch of ``n_items`` examples: whole global batches of
    ``accum x world`` micro-batches of ``micro`` (the last, short micro-batch counts),
    the leftover micro-batches unused. Computed on the global data, not on a process's
    share (which would count N times more steps, re-using examples)."""
    return math.ceil(n_items / micro) // (accum * world)


def draw_seed(seed: int, step: int, micro: int) -> int:
    """The seed of the random draws of global micro-batch ``micro`` of optimizer ``step``:
    the same on 1 or N processes, and after ``--resume`` (no stream to save)."""
    key = ((seed * _PRIME) * _PRIME + step) * _PRIME  # the old (seed, process 0, step) key
    return (key + micro) % (2**63)


def shard(batches: Sequence[T], where: Shard) -> list[T]:
    """The batches of process ``where.rank``: every ``world``-th, from its rank on."""
    return list(batches[where.rank :: where.world])


def gather_in_order(local: Sequence[tuple[int, Any]], n: int, where: Shard) -> list[Any]:
    """``(index, value)`` pairs of every process -> the ``n`` values in index order, on
    every process. One process: no collective."""
    pairs = list(local)
    if where.world > 1:
        from accelerate.utils import gather_object

        pairs = gather_object(pairs)  # every process's list, concatenated
    out: list[Any] = [None] * n
    seen = 0
    for i, value in pairs:
        out[i] = value
        seen += 1
    if seen != n or any(v is None for v in out):
        raise RuntimeError(f"gathered {seen} results for {n} inputs (a process lost a shard)")
    return out


def describe(num_processes: int, fsdp: bool) -> dict[str, Any]:
    """What ``trainer_state.pt`` and ``manifest.json`` record of the process layout."""
    return {"processes": num_processes, "fsdp": fsdp}
