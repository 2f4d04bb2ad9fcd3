"""Attention plumbing: our own 4D masks, and capture of post-RoPE q/k/v rows.

kava registers one attention function, ``"kava_sdpa"``, in transformers' attention
interface. It is plain SDPA, plus an optional *capture*: when a ``RowCapture`` is active,
each layer stores the post-RoPE query rows and key/value rows it was asked for (gathered,
detached). That is how the teacher's CoT keys/values and answer-span queries reach the
eviction without ``output_attentions=True`` (which forces eager attention and
materialises every attention map).

Every pass gets an explicit 4D boolean mask built here (``causal_padding_mask``), so the
masks and positions are the same in training and generation, by construction.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN_IMPLEMENTATION = "kava_sdpa"


@dataclass
class RowCapture:
    """Which rows to capture, and what was captured, per layer.

    ``query_index``: ``[B, N_q]`` indices into the current pass's query positions.
    ``key_index``: ``[B, N_k]`` indices into the key/value sequence (cache included).
    Captured per layer: ``queries[l]`` ``[B, H_q, N_q, d]``, ``keys[l]``/``values[l]``
    ``[B, H_kv, N_k, d]`` — detached (they are distillation targets / eviction inputs).
    """

    query_index: torch.Tensor | None = None
    key_index: torch.Tensor | None = None
    queries: dict[int, torch.Tensor] = field(default_factory=dict)
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)

    def stacked(self, what: str) -> torch.Tensor:
        """``[L, B, H, N, d]`` of ``queries``/``keys``/``values`` in layer order."""
        rows = getattr(self, what)
        return torch.stack([rows[i] for i in sorted(rows)])


_ACTIVE: RowCapture | None = None


@contextlib.contextmanager
def capture_rows(capture: RowCapture) -> Iterator[RowCapture]:
    """Activate ``capture`` for the forward passes run inside the block."""
    global _ACTIVE
    previous, _ACTIVE = _ACTIVE, capture
    try:
        yield capture
    finally:
        _ACTIVE = previous


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x [B, H, S, d]``, ``index [B, N]`` -> ``[B, H, N, d]``."""
    b, h, _, d = x.shape
    idx = index[:, None, :, None].expand(b, h, index.shape[1], d)
    return torch.gather(x, 2, idx)


def kava_sdpa(module, query, key, value, attention_mask, **kwargs):
    """SDPA with optional row capture. ``query [B, H_q, S_q, d]``, ``key [B, H_kv, S_k, d]``."""
    cap = _ACTIVE
    if cap is not None:
        layer = module.layer_idx
        if cap.query_index is not None:
            cap.queries[layer] = gather_rows(query.detach(), cap.query_index)
        if cap.key_index is not None:
            cap.keys[layer] = gather_rows(key.detach(), cap.key_index)
            cap.values[layer] = gather_rows(value.detach(), cap.key_index)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTN_IMPLEMENTATION, kava_sdpa)
# Callers that pass a plain 2D padding mask (e.g. the model used outside kava) get SDPA's masks.
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def _query_columns(key_mask: torch.Tensor, query_len: int, query_start) -> torch.Tensor:
    """``[S_q]`` key columns of the pass's queries: ``query_start + i`` (default: the last
    ``query_len`` columns). ``query_start`` may be a 0-dim device tensor (CUDA graphs)."""
    if query_start is None:
        query_start = key_mask.shape[1] - query_len
    return query_start + torch.arange(query_len, device=key_mask.device)


def causal_padding_mask(
    key_mask: torch.Tensor, query_len: int, query_start: int | torch.Tensor | None = None
) -> torch.Tensor:
    """4D boolean attention mask for a pass whose queries sit at key columns
    ``[query_start, query_start + query_len)`` (default: the last ``query_len`` columns).

    ``key_mask``: ``[B, S_k]`` bool, True = real token, over cache + current tokens in
    column order. Returns ``[B, 1, S_q, S_k]`` (True = may attend): key j is visible to
    query i iff it is real and ``j <= query_start + i``. A query row with nothing visible
    (a pad query) attends to every column instead, so SDPA never sees an all-masked row
    (NaN); such rows are padding and never read.
    """
    q_pos = _query_columns(key_mask, query_len, query_start)
    k_pos = torch.arange(key_mask.shape[1], device=key_mask.device)
    causal = k_pos[None, :] <= q_pos[:, None]  # [S_q, S_k]
    mask = causal[None, None] & key_mask[:, None, None, :].bool()
    return mask | ~mask.any(dim=-1, keepdim=True)


def positions_from_mask(
    key_mask: torch.Tensor, query_len: int, query_start: int | torch.Tensor | None = None
) -> torch.Tensor:
    """``position_ids = cumsum(mask) - 1`` at the pass's query columns (default: the last
    ``query_len`` columns; see ``causal_padding_mask``).

    Left pads get 0, right pads repeat the last real position; pads are masked as keys
    and their outputs are never read, so their positions do not matter.

    ``key_mask``: ``[B, S_k]`` over cache + current tokens. Returns ``[B, S_q]`` long.
    """
    pos = (key_mask.long().cumsum(-1) - 1).clamp(min=0)
    if query_start is None:
        return pos[:, -query_len:]
    cols = _query_columns(key_mask, query_len, query_start)
    return pos.index_select(1, cols)
