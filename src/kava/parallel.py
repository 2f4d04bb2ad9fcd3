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
  as one process decodes it;
* FSDP2: the checks, the layers kept gathered through a micro-batch (``keep_gathered``)
  and the optimizer state gathered whole for the checkpoint files.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator, PartialState
    from torch import nn

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


def local_launch(processes: int, *options: str) -> list[str]:
    """``accelerate launch`` of ``processes`` processes on this machine, up to the script
    (append it and its arguments): ``options`` such as ``--multi_gpu`` or ``--config_file
    FILE``, a free rendezvous port, and mixed precision and dynamo off at the launcher
    because kava's config sets them (``train.mixed_precision``, ``train.compile``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *options,
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--main_process_port",
        str(port),
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]


def process_state() -> PartialState:
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


def process_device(where: Shard) -> torch.device | None:
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


# --- FSDP2 (accelerate's fully_shard) ------------------------------------------------------


def is_fsdp(accelerator: Accelerator) -> bool:
    """Whether ``accelerator`` shards the model with FSDP (``accelerate launch
    --config_file configs/accelerate/fsdp2.yaml``)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def check_fsdp(accelerator: Accelerator, eval_every: int) -> None:
    """FSDP runs as FSDP2 only, and without in-training validation: decoding on the main
    process alone cannot gather the other processes' shards."""
    from kava.config import ConfigError

    if not accelerator.is_fsdp2:
        raise ConfigError(
            "accelerate config: kava supports FSDP2 only (fsdp_version: 2; "
            "configs/accelerate/fsdp2.yaml)"
        )
    if eval_every:
        raise ConfigError(
            "train.eval_every: validation during training is not supported under FSDP; "
            "set train.eval_every=0 and run kava eval on final/ (several processes work)"
        )


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state of every shard, whole (what one process would hold), keyed by
    parameter name; a collective (every process calls it), complete on the main one."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, inner, options=options)


def load_full_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict
) -> None:
    """Inverse of ``full_optimizer_state``: every process takes its shards of ``state``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)
    set_optimizer_state_dict(
        model, inner, optim_state_dict=state, options=StateDictOptions(full_state_dict=True)
    )


def full_value(x: Any) -> Any:
    """A sharded (``DTensor``) result, e.g. FSDP's gradient norm, as a plain tensor."""
    from torch.distributed.tensor import DTensor

    return x.full_tensor() if isinstance(x, DTensor) else x


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def keep_gathered(model: nn.Module) -> None:
    """Keep each FSDP unit's weights gathered from its first pass of a micro-batch to the
    end of that micro-batch's backward (``reshard_micro_batch`` frees them).

    A kava micro-batch calls every layer several times (teacher, latent passes, answer)
    and reads a layer's keys/values from a LATER pass through the KV cache: that
    gradient reaches the layer's projections without passing FSDP's pre-backward hooks
    (registered on the layer's outputs), so weights resharded after a forward, or after
    the backward of one of the passes, would be freed storage when it arrives."""
    for m in _fsdp_modules(model):
        m.set_reshard_after_forward(False, recurse=False)
        m.set_reshard_after_backward(False, recurse=False)


def reshard_micro_batch(model: nn.Module) -> None:
    """Free the gathered weights after a micro-batch's backward (``keep_gathered``): the
    next forward gathers them again, after the optimizer step changed the shards."""
    for m in _fsdp_modules(model):
        m.reshard()
