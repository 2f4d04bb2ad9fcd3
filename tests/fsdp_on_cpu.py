"""Test shim: let accelerate run FSDP2 on CPU processes (gloo), which it refuses by itself.

accelerate turns ``distributed_type: FSDP`` into FSDP only on accelerators; on the CPU a
launch with ``ACCELERATE_USE_FSDP=true`` silently becomes DDP (``MULTI_CPU``). torch's
``fully_shard`` works on CPU with gloo, so after accelerate decided, this switches the
state to FSDP (with the plugin accelerate built from the launch config's environment).
Imported by tests/dist_worker.py; kava itself never needs it.
"""

from __future__ import annotations

import os

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_original_init = AcceleratorState.__init__


def _init(self, *args, **kwargs):
    _original_init(self, *args, **kwargs)
    wants_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if wants_fsdp and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        if getattr(self, "fsdp_plugin", None) is None:
            from accelerate.utils import FullyShardedDataParallelPlugin

            self.fsdp_plugin = kwargs.get("fsdp_plugin") or FullyShardedDataParallelPlugin()
            if self.mixed_precision != "no":  # as accelerate's FSDP branch does on GPUs
                self.fsdp_plugin.set_mixed_precision(self.mixed_precision)


AcceleratorState.__init__ = _init
