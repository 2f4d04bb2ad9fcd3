"""Loss terms of METHOD.md section 3, as pure tensor functions.

``L = CE_student + w_teacher * CE_teacher + alpha1 * L_CODI + alpha2 * L_KV``.
Distillation targets (teacher hidden states and compressed KV) must arrive detached;
the functions detach them again so a caller cannot leak gradients into the teacher.
"""

from __future__ import annotations

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
