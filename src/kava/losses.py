"""Loss terms of METHOD.md section 3, as pure tensor functions.

``L = CE_student + w_teacher * CE_teacher + alpha1 * L_CODI + alpha2 * L_KV``.
Distillation targets (teacher hidden states and compressed KV) must arrive detached;
the functions detach them again so a caller cannot leak gradients into the teacher.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from kava.tokens import IGNORE

DISTANCES = ("smooth_l1", "mse", "l1")


def distance(a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    """Elementwise distance (no reduction): smooth-L1 (beta 1), squared error or absolute error."""
    if kind == "smooth_l1":
        return F.smooth_l1_loss(a, b, reduction="none", beta=1.0)
    if kind == "mse":
        return F.mse_loss(a, b, reduction="none")
    if kind == "l1":
        return F.l1_loss(a, b, reduction="none")
    raise ValueError(f"unknown distance {kind!r}; choose from {DISTANCES}")


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed next-token NLL and supervised-token counts.

    ``logits [B, S, V]`` (position p predicts token p+1), ``labels [B, S]`` aligned with the
    inputs (``IGNORE`` = not supervised). Returns ``(nll_sum [B], count [B])``.
    """
    target = labels[:, 1:]
    nll = F.cross_entropy(
        logits[:, :-1].float().flatten(0, 1),
        target.flatten(),
        ignore_index=IGNORE,
        reduction="none",
    ).view_as(target)
    return nll.sum(-1), (target != IGNORE).sum(-1)


def _chunk_nll(z, bias, target):
    """Head output ``z [n, V]`` (matmul dtype) -> ``(logsumexp [n], nll [n])`` in float32."""
    logits = z.float() + bias
    lse = torch.logsumexp(logits, -1)
    return lse, lse - logits.gather(1, target[:, None]).squeeze(1)


def _chunk_grad(z, bias, lse, target, grad):
    """``d nll / d z`` of one chunk, times ``grad [n]``: ``softmax - one_hot(target)``, in
    z's dtype."""
    p = torch.exp(z.float() + bias - lse[:, None])
    hit = torch.arange(z.shape[1], device=z.device) == target[:, None]
    return ((p - hit.float()) * grad[:, None]).to(z.dtype)


@functools.cache
def _chunk_fns(compiled: bool):
    """The two chunk functions, eager or ``torch.compile``d, once per process (inductor
    fuses their float32 elementwise work; measured no faster per step on an H100,
    benchmarks/RESULTS.md h6)."""
    fns = (_chunk_nll, _chunk_grad)
    return tuple(torch.compile(f, dynamic=True) for f in fns) if compiled else fns


class _LinearNLL(torch.autograd.Function):
    """``linear_nll``'s forward and backward, chunk by chunk of rows (see there)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, chunk_rows, compiled):
        chunk_nll, _ = _chunk_fns(compiled)
        nll = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
        lse = torch.empty_like(nll)
        # the matmuls in the inputs' dtype, forward and backward alike (no autocast)
        with torch.autocast(hidden.device.type, enabled=False):
            for a in range(0, hidden.shape[0], chunk_rows):
                b = a + chunk_rows
                lse[a:b], nll[a:b] = chunk_nll(hidden[a:b] @ weight.T, bias, target[a:b])
        ctx.save_for_backward(hidden, weight, bias, target, lse)
        ctx.chunk_rows, ctx.compiled = chunk_rows, compiled
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        hidden, weight, bias, target, lse = ctx.saved_tensors
        _, chunk_grad = _chunk_fns(ctx.compiled)
        want_h, want_w = ctx.needs_input_grad[:2]
        grad_h = torch.zeros_like(hidden) if want_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_w else None
        for a in range(0, hidden.shape[0], ctx.chunk_rows):
            b = a + ctx.chunk_rows
            z = hidden[a:b] @ weight.T  # recomputed, not kept: [n, V]
            d = chunk_grad(z, bias, lse[a:b], target[a:b], grad_nll[a:b])
            if want_h:
                grad_h[a:b] = d @ weight
            if want_w:
                grad_w += (d.T @ hidden[a:b]).float()
        return grad_h, grad_w.to(weight.dtype) if want_w else None, None, None, None, None


def linear_nll(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    target: torch.Tensor,
    chunk_rows: int | None = None,
    compiled: bool = False,
) -> torch.Tensor:
    """Cross-entropy of a linear head without keeping its ``[N, V]`` logits.

    ``hidden [N, D]`` and ``weight [V, D]`` in one dtype (the head's matmul dtype),
    ``bias [V]`` float32 (added to the float32 logits, e.g. 0 / -inf), ``target [N]``.
    Returns ``nll [N]`` float32, equal to ``F.cross_entropy((hidden @ weight.T).float() +
    bias, target, reduction="none")``. Rows go through in chunks of ``chunk_rows`` (default:
    about 1 GiB of float32 logits) and the backward recomputes each chunk's logits, so
    only ``hidden`` and one float per row are kept between forward and backward: the plain
    recipe keeps the float32 log-probabilities, N x V (8 GiB for 16k rows of a
    128k-token vocabulary), through the rest of the forward pass. ``compiled``: the
    per-chunk float32 work as ``torch.compile``d kernels (CUDA).
    """
    if chunk_rows is None:
        chunk_rows = max(1, 2**28 // weight.shape[0])
    return _LinearNLL.apply(hidden, weight, bias, target, chunk_rows, compiled)


def mean_ce(nll_sum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged per supervised token over the whole batch."""
    return nll_sum.sum() / count.sum().clamp(min=1)


def codi_loss(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, kind: str, layerwise_std: bool
) -> torch.Tensor:
    """CODI hidden-state distillation at the distillation position.

    ``student_hidden``/``teacher_hidden``: ``[L, B, D]`` (every layer, one position per
    row). Per layer: mean distance divided by the teacher's std (that layer's, or one std
    over all layers when ``layerwise_std`` is false); mean over layers.
    """
    teacher_hidden = teacher_hidden.detach().float()
    per_layer = distance(student_hidden.float(), teacher_hidden, kind).mean(dim=(1, 2))  # [L]
    if layerwise_std:
        std = teacher_hidden.flatten(1).std(dim=1)
    else:
        std = teacher_hidden.std().expand(per_layer.shape[0])
    return (per_layer / std.clamp(min=1e-6)).mean()


def kv_loss(
    student_k: torch.Tensor,
    student_v: torch.Tensor,
    teacher_k: torch.Tensor,
    teacher_v: torch.Tensor,
    slot_mask: torch.Tensor,
    kind: str,
    layerwise_std: bool,
) -> torch.Tensor:
    """KV distillation between the student's latent KV and the compressed teacher KV.

    All tensors ``[L, B, H_kv, M, d]`` except ``slot_mask [L, B, H_kv, M]`` (bool).
    Per layer: mean over kept slots and dims of the key and value distances (each divided
    by the std of that layer's kept teacher keys / values when ``layerwise_std``), the
    two averaged; then mean over layers.
    """
    teacher_k, teacher_v = teacher_k.detach().float(), teacher_v.detach().float()
    m = slot_mask[..., None].float()  # [L, B, H, M, 1]
    dims = (1, 2, 3, 4)
    count = (m.sum(dims) * student_k.shape[-1]).clamp(min=1.0)  # [L]

    def term(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        per_layer = (distance(s.float(), t, kind) * m).sum(dims) / count
        if layerwise_std:
            mean = (t * m).sum(dims) / count
            var = (((t - mean.view(-1, 1, 1, 1, 1)) ** 2) * m).sum(dims) / (count - 1).clamp(
                min=1.0
            )
            per_layer = per_layer / var.sqrt().clamp(min=1e-6)
        return per_layer

    return ((term(student_k, teacher_k) + term(student_v, teacher_v)) / 2).mean()
