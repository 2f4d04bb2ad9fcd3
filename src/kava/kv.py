"""kava's KV cache: the one module that holds keys and values between passes.

Every pass kava runs (teacher, student pass 0, Jacobi iterations, answer pass, Coconut
thoughts, decoding) hands the HF decoder a ``KVCache``; attention layers call its
``update`` with the pass's own post-RoPE keys/values ``[B, H_kv, n, d]`` and attend to
what it returns. Two layouts:

* **growing** (training): the cache holds zero or more *prefix* segments per layer (e.g.
  the question + ``<bot>`` KV of pass 0, and the latent KV of the last iteration for the
  answer pass) and ``update`` returns ``cat(prefix..., new)`` — one new tensor per pass
  and layer, never an in-place write, so autograd may keep it for backward. The pass's
  own rows are kept in ``new`` (a Jacobi iteration's latent KV, the student side of the
  KV loss). The question KV is computed once (pass 0) and only read afterwards.
* **static** (inference): per-layer buffers ``[B, H_kv, S_max, d]`` allocated at the
  first write; a pass writes its rows in place at columns ``[start, start + n)`` and
  attends to the whole buffer, the attention mask hiding unwritten columns. Addresses and
  shapes never change, so a pass can be captured once as a CUDA graph and replayed;
  ``start`` may be a 0-dim device tensor (the decoding column), so no host sync is needed
  to advance it.

Masks and positions for both layouts come from ``kava.attention`` (one scheme:
``position_ids = cumsum(mask) - 1`` over every column, masked pads everywhere).
"""

from __future__ import annotations

import inspect

import torch
from transformers import Cache

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (k, v), each [B, H_kv, S, d]


class KVCache(Cache):
    """A cache in the growing or the static layout (see the module docstring).

    Build it with ``KVCache.growing(*prefix)`` or ``KVCache.static(length)``.
    """

    def __init__(self, prefix: tuple[KV, ...] = (), static_length: int | None = None):
        super().__init__(layers=[])
        self.prefix = prefix  # growing: segments read before the new rows, in column order
        self.new: KV = []  # growing: this pass's own rows per layer
        self.static_length = static_length
        self.keys: list[torch.Tensor] = []  # static: [B, H_kv, S_max, d] per layer
        self.values: list[torch.Tensor] = []
        self.start: int | torch.Tensor = 0  # static: column of the next pass's first row

    @classmethod
    def growing(cls, *prefix: KV) -> KVCache:
        """A training cache reading ``prefix`` segments (each per-layer ``(k, v)``) first."""
        return cls(prefix=tuple(p for p in prefix if p))

    @classmethod
    def static(cls, length: int) -> KVCache:
        """An inference cache of ``length`` columns, written in place."""
        return cls(static_length=length)

    @property
    def is_static(self) -> bool:
        return self.static_length is not None

    # --- writing ---------------------------------------------------------------------------
    def segments(self, layer_idx: int) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """Growing layout: the prefix ``(k, v)`` segments layer ``layer_idx`` reads first."""
        return tuple(p[layer_idx] for p in self.prefix)

    def record(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Growing layout: keep a pass's own rows ``[B, H_kv, n, d]`` of layer ``layer_idx``."""
        if layer_idx == len(self.new):
            self.new.append((k, v))
        else:  # a layer run again (activation checkpointing's recomputation)
            self.new[layer_idx] = (k, v)

    def write(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        """Static layout: write ``k, v [B, H_kv, n, d]`` at columns ``[start, start + n)``
        (allocating the layer's buffers at its first write); return the whole buffers."""
        if layer_idx == len(self.keys):
            b, h, _, d = k.shape
            self.keys.append(k.new_zeros(b, h, self.static_length, d))
            self.values.append(v.new_zeros(b, h, self.static_length, d))
        cols = self.start + torch.arange(k.shape[2], device=k.device)
        self.keys[layer_idx].index_copy_(2, cols, k)
        self.values[layer_idx].index_copy_(2, cols, v)
        return self.keys[layer_idx], self.values[layer_idx]

    # What HF's attention layers call (the fallback path, kava.backbone): eager even inside
    # a compiled region, the layer index being an int attribute of the module.
    @torch.compiler.disable
    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """Store a pass's rows ``[B, H_kv, n, d]``; return what the layer attends to."""
        if self.is_static:
            return self.write(layer_idx, key_states, value_states)
        self.record(layer_idx, key_states, value_states)
        segments = self.segments(layer_idx)
        if not segments:
            return key_states, value_states
        keys = torch.cat([*(k for k, _ in segments), key_states], dim=2)
        values = torch.cat([*(v for _, v in segments), value_states], dim=2)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if self.is_static:
            return self.static_length
        if layer_idx < len(self.new):
            return (
                sum(p[layer_idx][0].shape[2] for p in self.prefix) + self.new[layer_idx][0].shape[2]
            )
        return sum(p[layer_idx][0].shape[2] for p in self.prefix) if self.prefix else 0

    # --- reading ---------------------------------------------------------------------------
    def columns(self, start: int, stop: int | None = None) -> KV:
        """Per-layer ``(k, v)`` views of columns ``[start, stop)``: of the static buffers,
        or (growing) of this pass's own rows."""
        if self.is_static:
            return [
                (k[:, :, start:stop], v[:, :, start:stop]) for k, v in zip(self.keys, self.values)
            ]
        return [(k[:, :, start:stop], v[:, :, start:stop]) for k, v in self.new]

    def reset(self) -> None:
        """Zero the static buffers (unwritten columns must hold finite values: a masked
        column still meets the attention's value matmul with weight 0)."""
        for buf in (*self.keys, *self.values):
            buf.zero_()


def stack_kv(kv: KV) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer list -> ``(k, v)`` each ``[L, B, H_kv, S, d]``."""
    return torch.stack([k for k, _ in kv]), torch.stack([v for _, v in kv])


def cache_keyword(decoder: torch.nn.Module) -> str:
    """The name under which this transformers version's decoder takes the cache
    (``cache`` from 5.2x on; ``past_key_values`` before, still accepted with a warning)."""
    params = inspect.signature(decoder.forward).parameters
    return "cache" if "cache" in params else "past_key_values"
