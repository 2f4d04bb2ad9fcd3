"""Fused q/k/v projections for kava's layer pass (``train.fused_qkv``; off by default).

peft runs ``q_proj``, ``k_proj`` and ``v_proj`` one by one: per layer and pass three base
GEMMs, three LoRA-A GEMMs, three LoRA-B GEMMs and three dropout copies of ``x``, each
again in backward. ``project_qkv`` computes the same function with fewer kernels: one base
GEMM against the frozen weights stacked ``[Dq + 2 * Dkv, D]`` (biases too, Qwen2), the three
A matrices in one matmul (one GEMM without dropout, one batched matmul with a dropout
mask per projection), then the three B matrices (their outputs differ in width). peft's
semantics per projection: ``y = base(x) + scaling * B(A(dropout(x)))``.

The stacked frozen weight is no copy: ``lay_out`` moves the three base weights into one
buffer and makes each parameter a view of its rows, and ``laid_out`` finds that buffer
again from the parameters' shared storage. Nothing else is stored, so the model holds
each weight once, its state dict and peft's adapter saves and merges see the usual
three tensors (an in-place merge writes through the views), and a ``.to()``, a cast or
a ``deepcopy``, which give each parameter its own storage, leave a layout that
``laid_out`` does not accept: ``prepare`` lays it out again, on the tensors of the moment.

Any layer not in the one form handled here (see ``unfused_reason``) runs peft's modules
unchanged.

Generation on a LoRA-merged copy (``eval.fused_qkv``) has no adapters: q/k/v are plain
``nn.Linear`` layers, laid out the same way, and ``project_plain`` is the one base GEMM
(``prepare_plain``, ``plain_unfused_reason``). There the layout happens before any CUDA
graph is captured (a graph keeps the pointers it saw) and is never redone during a
capture: a layout lost by then runs the three modules instead.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

PROJECTIONS = ("q_proj", "k_proj", "v_proj")


class FusedQKV(NamedTuple):
    """What ``project_qkv`` reads of one attention module."""

    weight: torch.Tensor  # [Dq + 2 * Dkv, D], frozen: the three base weights' rows
    bias: torch.Tensor | None  # [Dq + 2 * Dkv] or None
    lora_a: tuple[torch.Tensor, ...]  # three [r, D]
    lora_b: tuple[torch.Tensor, ...]  # [Dq, r], [Dkv, r], [Dkv, r]
    scaling: tuple[float, ...]  # peft's alpha / r per projection
    dropout: float  # peft's LoRA dropout probability, 0 when off or in eval mode
    cast_input: bool  # peft's cast of x to the adapters' dtype (cast_input_dtype_enabled)


class PlainQKV(NamedTuple):
    """What ``project_plain`` reads of one attention module whose q/k/v are plain
    ``nn.Linear`` layers (a LoRA-merged copy)."""

    weight: torch.Tensor  # [Dq + 2 * Dkv, D]: the three weights' rows
    bias: torch.Tensor | None  # [Dq + 2 * Dkv] or None
    sizes: tuple[int, int, int]  # Dq, Dkv, Dkv: where the output splits


def _base_layer(proj: nn.Module) -> nn.Module:
    """The ``nn.Linear`` holding a projection's frozen weight: a peft LoRA layer's
    ``base_layer``, or the module itself (a plain or merged layer)."""
    return getattr(proj, "base_layer", proj)


def _has_hooks(proj: nn.Module, adapter: str) -> bool:
    """Forward hooks on a module whose ``forward`` the fused path skips (checked one by
    one: walking ``modules()`` cost half of ``prepare``'s time, which runs every pass)."""
    parts = (
        proj,
        proj.base_layer,
        *(d[adapter] for d in (proj.lora_A, proj.lora_B, proj.lora_dropout)),
    )
    return any(m._forward_hooks or m._forward_pre_hooks for m in parts)


def unfused_reason(attn: nn.Module) -> str | None:
    """Why ``attn``'s q/k/v cannot be fused, or None: each must be a peft LoRA ``Linear``
    over an ``nn.Linear`` with one active, unmerged, plain adapter (no DoRA or other
    variant, no LoRA bias) of one rank, frozen base weights, the same dropout and no
    hooks."""
    from peft.tuners.lora import Linear as LoraLinear

    projs = [getattr(attn, name, None) for name in PROJECTIONS]
    for name, p in zip(PROJECTIONS, projs):
        if not isinstance(p, LoraLinear):
            return f"{name} has no LoRA adapter"
        if type(p.base_layer) is not nn.Linear or p.fan_in_fan_out:
            return f"{name}'s base layer is not a plain nn.Linear"
        if p.merged or p.disable_adapters:
            return f"{name}'s adapters are merged or disabled"
        if len(p.active_adapters) != 1 or p.active_adapters[0] not in p.lora_A:
            return f"{name} has not exactly one active LoRA adapter"
        adapter = p.active_adapters[0]
        if adapter in p.lora_variant or p.lora_bias.get(adapter, False):
            return f"{name}'s adapter is a LoRA variant (DoRA, ...) or has a bias"
        if any(t is not None and t.requires_grad for t in (p.base_layer.weight, p.base_layer.bias)):
            return f"{name}'s base weight or bias is trainable"
        if _has_hooks(p, adapter):
            return f"{name} has forward hooks"
    if len({tuple(p.active_adapters) for p in projs}) > 1:
        return "q/k/v have different active adapters"
    if len({getattr(p, "cast_input_dtype_enabled", True) for p in projs}) > 1:
        return "q/k/v cast their LoRA inputs differently"
    adapter = projs[0].active_adapters[0]
    if len({p.r[adapter] for p in projs}) > 1:
        return "q/k/v adapters of different ranks"
    drops = [p.lora_dropout[adapter] for p in projs]
    if len({(type(d), getattr(d, "p", 0.0), d.training) for d in drops}) > 1:
        return "q/k/v adapters with different dropout"
    if not isinstance(drops[0], (nn.Identity, nn.Dropout)) or getattr(drops[0], "p", 0.0) >= 1:
        return f"LoRA dropout {drops[0]!r}"
    bases = [p.base_layer for p in projs]
    if len({(b.in_features, b.weight.dtype, b.weight.device, b.bias is None) for b in bases}) > 1:
        return "q/k/v base layers differ in input size, dtype, device or bias"
    tensors = [t for p in projs for t in (p.lora_A[adapter].weight, p.lora_B[adapter].weight)]
    if len({(t.dtype, t.device) for t in tensors}) > 1:
        return "q/k/v adapters differ in dtype or device"
    return None


def plain_unfused_reason(attn: nn.Module) -> str | None:
    """Why ``attn``'s q/k/v cannot run as one plain GEMM (``project_plain``), or None:
    each must be exactly an ``nn.Linear`` (no peft layer, no subclass), frozen and without
    hooks, all three of one input size, dtype and device, with biases on all or none."""
    projs = [getattr(attn, name, None) for name in PROJECTIONS]
    for name, p in zip(PROJECTIONS, projs):
        if type(p) is not nn.Linear:
            kind = type(p)
            return f"{name} is not a plain nn.Linear ({kind.__module__}.{kind.__qualname__})"
        if any(t is not None and t.requires_grad for t in (p.weight, p.bias)):
            return f"{name}'s weight or bias is trainable"
        if p._forward_hooks or p._forward_pre_hooks:
            return f"{name} has forward hooks"
    keys = {
        (p.in_features, p.weight.dtype, p.weight.device, None if p.bias is None else p.bias.dtype)
        for p in projs
    }
    if len(keys) > 1:
        return "q/k/v differ in input size, dtype, device or bias"
    return None


def _rows_of_one_buffer(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """The tensor whose consecutive rows the contiguous ``parts`` are (in order, in one
    storage), or None if they are not laid out so."""
    first = parts[0]
    row = first[0].numel()
    offset = first.storage_offset()
    rows = 0
    for p in parts:
        if (
            not p.is_contiguous()
            or p.dtype != first.dtype
            or p.shape[1:] != first.shape[1:]
            or p.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
            or p.storage_offset() != offset + rows * row
        ):
            return None
        rows += p.shape[0]
    return first.as_strided((rows, *first.shape[1:]), first.stride(), offset)


def laid_out(attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(weight [Dq + 2 * Dkv, D], bias [Dq + 2 * Dkv] or None)``: the buffer the three
    base weights (and biases) are views of, or None while they are not (before
    ``lay_out``, or after a ``.to()`` gave each its own storage). The base weights: of
    peft's LoRA layers or of plain ``nn.Linear`` q/k/v (``_base_layer``)."""
    bases = [_base_layer(getattr(attn, name)) for name in PROJECTIONS]
    weight = _rows_of_one_buffer([b.weight for b in bases])
    if weight is None or bases[0].bias is None:
        return None if weight is None else (weight, None)
    bias = _rows_of_one_buffer([b.bias for b in bases])
    return None if bias is None else (weight, bias)


def lay_out(attn: nn.Module) -> None:
    """Move the three frozen base weights (and biases) of ``attn`` into one buffer each,
    every parameter a view of its rows (the same ``Parameter`` objects, values unchanged;
    their old storage is freed, so memory does not grow)."""
    bases = [_base_layer(getattr(attn, name)) for name in PROJECTIONS]
    for attr in ("weight", "bias"):
        params = [getattr(b, attr) for b in bases]
        if params[0] is None:
            continue
        # normal tensors even when the first pass runs under inference_mode
        with torch.no_grad(), torch.inference_mode(False):
            buffer = torch.cat([p.detach() for p in params])
        start = 0
        for p in params:
            p.data = buffer[start : start + p.shape[0]]
            start += p.shape[0]


def stacked_base(attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``laid_out(attn)``, laying the three base weights out first when they are not; None
    when they are not and a CUDA graph is being captured: laying out then would allocate
    inside the capture and free the storage the captured kernels read (the caller runs
    the three modules, which read the weights where they are)."""
    base = laid_out(attn)
    if base is None and not (
        torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    ):
        lay_out(attn)
        base = laid_out(attn)
    return base


def prepare(attn: nn.Module) -> FusedQKV | None:
    """``project_qkv``'s inputs for ``attn`` (laying its base weights out first when they
    are not), or None when the layer is not in the supported form (``unfused_reason``):
    it then runs unfused."""
    if unfused_reason(attn) is not None:
        return None
    base = stacked_base(attn)
    if base is None:
        return None
    projs = [getattr(attn, name) for name in PROJECTIONS]
    adapter = projs[0].active_adapters[0]
    drop = projs[0].lora_dropout[adapter]
    return FusedQKV(
        weight=base[0],
        bias=base[1],
        lora_a=tuple(p.lora_A[adapter].weight for p in projs),
        lora_b=tuple(p.lora_B[adapter].weight for p in projs),
        scaling=tuple(float(p.scaling[adapter]) for p in projs),
        dropout=drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0,
        cast_input=bool(getattr(projs[0], "cast_input_dtype_enabled", True)),
    )


def prepare_plain(attn: nn.Module) -> PlainQKV | None:
    """``project_plain``'s inputs for ``attn`` whose q/k/v are plain ``nn.Linear`` layers,
    laid out first when they are not (``stacked_base``); None (run the three modules) when
    the layer is not in that form (``plain_unfused_reason``) or cannot be laid out now."""
    if plain_unfused_reason(attn) is not None:
        return None
    base = stacked_base(attn)
    if base is None:
        return None
    sizes = tuple(getattr(attn, name).out_features for name in PROJECTIONS)
    return PlainQKV(weight=base[0], bias=base[1], sizes=sizes)


def project_plain(x: torch.Tensor, qkv: PlainQKV) -> tuple[torch.Tensor, ...]:
    """``q [B, S, Dq]``, ``k, v [B, S, Dkv]`` of ``x [B, S, D]``: what the three plain
    ``nn.Linear`` q/k/v return, as one GEMM against their stacked weights."""
    return F.linear(x, qkv.weight, qkv.bias).split(qkv.sizes, dim=-1)


def dropout_masks(x: torch.Tensor, p: float, n: int = 3) -> torch.Tensor:
    """``n`` independent keep-masks (bool ``[n, *x.shape]``, each element kept with
    probability ``1 - p``): one per projection, as peft's three dropout modules draw."""
    return torch.empty((n, *x.shape), dtype=torch.bool, device=x.device).bernoulli_(1 - p)


def lora_hidden(
    x: torch.Tensor,
    lora_a: tuple[torch.Tensor, ...],
    p: float,
    masks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """The three adapters' ``A(dropout(x))``, each ``[B, S, r]``, of ``x [B, S, D]``.

    Without dropout every adapter reads the same ``x``: one GEMM against the three A
    stacked ``[3r, D]``. With dropout (probability ``p``; ``masks`` bool ``[3, B, S, D]``,
    drawn by ``dropout_masks`` when None) each reads its own masked, rescaled copy (as
    ``nn.Dropout``: ``x * mask * 1 / (1 - p)``): one batched matmul.
    """
    if masks is None and p == 0.0:
        return F.linear(x, torch.cat(lora_a)).split(lora_a[0].shape[0], dim=-1)
    if masks is None:
        masks = dropout_masks(x, p)
    dropped = (x * masks * (1.0 / (1.0 - p))).reshape(len(lora_a), -1, x.shape[-1])
    hidden = torch.bmm(dropped, torch.stack(lora_a).transpose(1, 2))  # [3, B * S, r]
    return hidden.reshape(len(lora_a), *x.shape[:-1], -1).unbind(0)


def project_qkv(
    x: torch.Tensor, qkv: FusedQKV, masks: torch.Tensor | None = None
) -> tuple[torch.Tensor, ...]:
    """``q [B, S, Dq]``, ``k, v [B, S, Dkv]`` of ``x [B, S, D]``: what ``q_proj(x)``,
    ``k_proj(x)``, ``v_proj(x)`` of peft return (dtypes included), fused. ``masks``: the
    dropout keep-masks ``[3, B, S, D]`` (tests give them; default: drawn)."""
    base = F.linear(x, qkv.weight, qkv.bias)  # [B, S, Dq + 2 * Dkv]
    parts = base.split([b.shape[0] for b in qkv.lora_b], dim=-1)
    lora_x = x.to(qkv.lora_a[0].dtype) if qkv.cast_input else x
    hidden = lora_hidden(lora_x, qkv.lora_a, qkv.dropout, masks)
    return tuple(
        (y + F.linear(h, b) * s).to(y.dtype)
        for y, h, b, s in zip(parts, hidden, qkv.lora_b, qkv.scaling)
    )
