"""kava's own pass over the decoder layers of a Llama-family model (the fast path).

HF's decoder forward is written for one pass with one cache object: each layer reads its
int ``layer_idx`` to address the cache, a mask/cache machinery runs per call, and
deprecation wrappers sit around every forward. Under ``torch.compile`` that becomes one
compiled variant per layer and per wrapper state (measured: 4 layers gave more than a
dozen recompiles). kava runs many small passes per example (teacher, pass 0, T Jacobi
iterations, answer pass), so it runs the layers itself instead: ``layer_pass`` is one
pure function of a layer's modules (their weights, LoRA included, are used through the
HF / peft modules as they are), the hidden states, RoPE cos/sin, the 4D mask and the
prefix KV, returning the new hidden states and the layer's own K/V (and, for the
teacher, its query rows). It holds no Python state and no layer index, so one compiled
graph serves every layer and every pass of a shape family.
With ``train.fused_qkv`` the q/k/v projections run fused (``kava.qkv``: one base GEMM,
one LoRA-A matmul), their inputs prepared per layer outside the compiled function; with
``eval.fused_qkv`` generation's static-cache passes on a merged copy run q/k/v as one GEMM.

Supported: ``model_type`` llama, qwen2, mistral (SmolLM2 is llama) with full attention,
no attention dropout and no q/k norms: the structure of their HF decoder layers, written
out below and tested against HF's own forward (tests/test_layers.py). Other models run
HF's decoder forward (``Backbone.fast`` is False), with the same masks and caches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, rotate_half

from kava.qkv import FusedQKV, PlainQKV, project_plain, project_qkv

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")


def unsupported_reason(decoder: nn.Module) -> str | None:
    """Why ``decoder`` cannot take kava's fast path, or None when it can."""
    cfg = decoder.config
    if cfg.model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type {cfg.model_type!r} is not one of {SUPPORTED_MODEL_TYPES}"
    if getattr(cfg, "attention_dropout", 0.0):
        return "attention dropout"
    if any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or ()):
        return "sliding-window layers"
    for part in ("layers", "norm", "rotary_emb"):
        if not hasattr(decoder, part):
            return f"the decoder has no {part}"
    layer = decoder.layers[0]
    attn = layer.self_attn
    for part in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling"):
        if not hasattr(attn, part):
            return f"the attention has no {part}"
    if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
        return "q/k norms"
    for part in ("input_layernorm", "post_attention_layernorm", "mlp"):
        if not hasattr(layer, part):
            return f"the layer has no {part}"
    return None


def attention_inputs(
    layer: nn.Module,
    h: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    qkv: FusedQKV | PlainQKV | None = None,
):
    """Post-RoPE ``q [B, H_q, S, d]``, ``k, v [B, H_kv, S, d]`` of ``h [B, S, D]``.
    ``qkv``: the layer's fused projections (``kava.qkv.prepare``: LoRA; ``prepare_plain``:
    plain q/k/v of a merged copy), else the three modules."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    shape = (*h.shape[:-1], -1, attn.head_dim)
    if isinstance(qkv, PlainQKV):
        q, k, v = project_plain(x, qkv)
    elif qkv is not None:
        q, k, v = project_qkv(x, qkv)
    else:
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v


def grouped_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """SDPA of ``q [B, H_q, S, d]`` over ``keys``/``values [B, H_kv, S_k, d]`` under ``mask
    [B, 1, S, S_k]`` (bool), for grouped-query attention without copying K/V per head.

    HF's ``repeat_kv`` materialises K/V ``H_q / H_kv`` times per layer and pass (in
    decoding, a copy of the whole cache per token). Here the ``G = H_q / H_kv`` query heads
    that share KV head ``j`` (heads ``j*G .. j*G+G-1``, as ``repeat_kv`` pairs them) become
    ``G * S`` query rows of head ``j``, and the mask rows are repeated to match: the same
    attention, row by row. Returns ``[B, H_q, S, d]``.
    """
    b, h_q, s, d = q.shape
    h_kv = keys.shape[1]
    g = h_q // h_kv
    if g == 1:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
    rows = q.reshape(b, h_kv, g * s, d)  # row r = (group r // S, query r % S)
    mask = mask.expand(b, 1, s, mask.shape[-1])
    mask = mask[:, :, None].expand(b, 1, g, s, mask.shape[-1]).reshape(b, 1, g * s, -1)
    out = F.scaled_dot_product_attention(rows, keys, values, attn_mask=mask, scale=scale)
    return out.reshape(b, h_q, s, d)  # SDPA may return a [B, S, H, d]-strided result


def repeated_kv_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """``grouped_attention``'s result with K/V copied once per query head first (HF's
    ``repeat_kv``: KV head ``j`` serves query heads ``j*G .. j*G+G-1``). More memory, yet
    faster in training on an H200 (``train.attention``); shapes as ``grouped_attention``."""
    b, h_kv, s_k, d = keys.shape
    g = q.shape[1] // h_kv
    if g > 1:
        keys = keys[:, :, None].expand(b, h_kv, g, s_k, d).reshape(b, h_kv * g, s_k, d)
        values = values[:, :, None].expand(b, h_kv, g, s_k, d).reshape(b, h_kv * g, s_k, d)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)


def attention_output(
    layer: nn.Module,
    h: torch.Tensor,
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    copy_kv: bool = False,
) -> torch.Tensor:
    """The rest of the layer: attention of ``q`` over ``keys``/``values`` ``[B, H_kv, S_k,
    d]`` under ``mask [B, 1, S, S_k]``, output projection, residual, MLP, residual.
    ``copy_kv``: ``repeated_kv_attention`` instead of ``grouped_attention``."""
    attn = layer.self_attn
    attend = repeated_kv_attention if copy_kv else grouped_attention
    out = attend(q, keys, values, mask, attn.scaling)
    h = h + attn.o_proj(out.transpose(1, 2).reshape(*h.shape[:-1], -1))
    return h + layer.mlp(layer.post_attention_layernorm(h))


def mark_dynamic_dims(
    h: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor,
    prefix: tuple[tuple[torch.Tensor, torch.Tensor], ...],
    query_index: torch.Tensor | None,
) -> None:
    """Mark the batch and length dims of ``layer_pass``'s inputs dynamic for
    ``torch.compile``, and nothing else. ``dynamic=True`` would make every dim symbolic,
    the weights' too; a length that happens to equal a weight dim (the head dim, the hidden
    size) is then unified with it and specialised, and the next length recompiles (seen on
    an H200: two recompiling steps in five). Batch 1 stays specialised (PyTorch's 0/1 rule)."""
    mark = torch._dynamo.maybe_mark_dynamic
    for t, dims in ((h, (0, 1)), (cos, (0, 1)), (sin, (0, 1)), (mask, (0, 2, 3))):
        for d in dims:
            mark(t, d)
    for k, v in prefix:
        for t in (k, v):
            mark(t, 0)
            mark(t, 2)
    if query_index is not None:
        mark(query_index, 0)
        mark(query_index, 1)


def mark_dynamic(t: torch.Tensor, *dims: int) -> None:
    """``torch._dynamo.maybe_mark_dynamic`` of ``dims`` of ``t`` (see ``mark_dynamic_dims``)."""
    for d in dims:
        torch._dynamo.maybe_mark_dynamic(t, d)


def layer_pass(
    layer: nn.Module,
    h: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor,
    prefix: tuple[tuple[torch.Tensor, torch.Tensor], ...],
    query_index: torch.Tensor | None = None,
    copy_kv: bool = False,
    qkv: FusedQKV | None = None,
):
    """One layer over ``h [B, S, D]`` attending to ``prefix`` segments then its own rows
    (``copy_kv``: see ``attention_output``; ``qkv``: see ``attention_inputs``).

    Returns ``(h_out [B, S, D], k, v [B, H_kv, S, d], q_rows)``; ``q_rows`` is
    ``[B, H_q, N, d]`` (detached) of the query rows ``query_index [B, N]``, or None.
    """
    q, k, v = attention_inputs(layer, h, cos, sin, qkv)
    keys = torch.cat([*(p[0] for p in prefix), k], dim=2) if prefix else k
    values = torch.cat([*(p[1] for p in prefix), v], dim=2) if prefix else v
    q_rows = None
    if query_index is not None:
        idx = query_index[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[-1])
        q_rows = torch.gather(q, 2, idx).detach()
    return attention_output(layer, h, q, keys, values, mask, copy_kv), k, v, q_rows


def unrotate(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo RoPE: the pre-RoPE keys of post-RoPE ``keys [..., B, H, N, d]`` whose positions
    gave ``cos, sin [B, N, d]`` (``Backbone.rope``). RoPE rotates each pair of dims by
    its angle (``k * cos + rotate_half(k) * sin``); the inverse rotates by minus it."""
    cos, sin = cos[:, None].to(keys.dtype), sin[:, None].to(keys.dtype)  # [B, 1, N, d]
    return keys * cos - rotate_half(keys) * sin
