"""Compress the teacher's CoT KV-cache to M entries per (layer, KV head), R-KV style.

Pure tensor functions (METHOD.md section 2). Shapes: ``B`` batch (layers may be folded
into it), ``H_q`` query heads, ``H_kv`` KV heads (``H_q = G * H_kv``; query head
``h*G + g`` belongs to KV head ``h``), ``N_a`` answer-span queries, ``N_c`` CoT keys.
"""

from __future__ import annotations

import torch

METHODS = ("rkv", "attention", "redundancy", "crop", "random", "uniform")


def _masked_softmax(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim restricted to ``mask``; all-masked rows give zeros."""
    x = x.masked_fill(~mask, float("-inf"))
    out = torch.softmax(x, dim=-1)
    return torch.nan_to_num(out, nan=0.0)


def importance_scores(
    q_answer: torch.Tensor, k_cot: torch.Tensor, answer_mask: torch.Tensor, cot_mask: torch.Tensor
) -> torch.Tensor:
    """Attention of the answer span to the CoT keys: ``[B, H_kv, N_c]`` float32.

    Logits ``q . k / sqrt(d)``, max over the query heads of a group, softmax over the
    (real) CoT keys, mean over the (real) answer queries.
    """
    b, h_q, n_a, d = q_answer.shape
    h_kv = k_cot.shape[1]
    g = h_q // h_kv
    q = q_answer.float().view(b, h_kv, g, n_a, d)
    logits = torch.einsum("bhgad,bhcd->bhgac", q, k_cot.float()) / d**0.5
    logits = logits.amax(dim=2)  # [B, H_kv, N_a, N_c]
    attn = _masked_softmax(logits, cot_mask[:, None, None, :])
    a = answer_mask[:, None, :, None].float()
    return (attn * a).sum(2) / a.sum(2).clamp(min=1.0)


def redundancy_scores(k_cot: torch.Tensor, cot_mask: torch.Tensor) -> torch.Tensor:
    """Distinctiveness of each CoT key: ``[B, H_kv, N_c]`` float32 (higher = less redundant).

    Mean cosine similarity to the other real keys (diagonal 0, divided by the real count),
    negated, then a masked softmax over CoT positions. Uses
    ``sum_j cos(k_i, k_j) = khat_i . sum_j khat_j - 1``; no ``N_c x N_c`` matrix.
    """
    m = cot_mask[:, None, :, None].float()
    khat = torch.nn.functional.normalize(k_cot.float(), dim=-1) * m
    total = khat.sum(dim=2, keepdim=True)  # [B, H_kv, 1, d]
    sim_sum = (khat * total).sum(-1) - 1.0  # [B, H_kv, N_c], self term removed
    count = cot_mask.sum(-1).clamp(min=1).float()[:, None, None]
    return _masked_softmax(-sim_sum / count, cot_mask[:, None, :])


def rkv_scores(
    q_answer: torch.Tensor,
    k_cot: torch.Tensor,
    answer_mask: torch.Tensor,
    cot_mask: torch.Tensor,
    lam: float = 0.1,
) -> torch.Tensor:
    """R-KV score ``lam * I + (1 - lam) * R``: ``[B, H_kv, N_c]`` float32, pads ``-inf``.

    ``q_answer [B, H_q, N_a, d]``, ``k_cot [B, H_kv, N_c, d]``, ``answer_mask [B, N_a]``,
    ``cot_mask [B, N_c]`` (bool, True = real token).
    """
    answer_mask, cot_mask = answer_mask.bool(), cot_mask.bool()
    score = torch.zeros(k_cot.shape[:3], dtype=torch.float32, device=k_cot.device)
    if lam > 0:
        score = score + lam * importance_scores(q_answer, k_cot, answer_mask, cot_mask)
    if lam < 1:
        score = score + (1 - lam) * redundancy_scores(k_cot, cot_mask)
    return score.masked_fill(~cot_mask[:, None, :], float("-inf"))


def uniform_keep(cot_mask: torch.Tensor, m: int) -> torch.Tensor:
    """``[B, N_c]`` bool: ``m`` real CoT positions evenly spaced over each row's CoT.

    With ``n`` real tokens (``n > m``), the kept ones are those of rank
    ``floor((i + 0.5) * n / m)``, ``i = 0..m-1`` (centres of m equal segments, distinct
    since n > m); a CoT of at most ``m`` tokens is kept whole.
    """
    cot_mask = cot_mask.bool()
    n = cot_mask.sum(-1, keepdim=True)  # [B, 1]
    rank = cot_mask.long().cumsum(-1) - 1  # [B, N_c] rank among the real tokens
    centres = ((torch.arange(m, device=n.device) + 0.5) * n / m).floor().long()  # [B, m]
    chosen = (rank[:, :, None] == centres[:, None, :]).any(-1)
    return cot_mask & (chosen | (n <= m))


def eviction_scores(
    method: str,
    q_answer: torch.Tensor,
    k_cot: torch.Tensor,
    answer_mask: torch.Tensor,
    cot_mask: torch.Tensor,
    lam: float = 0.1,
    generator: torch.Generator | None = None,
    m: int | None = None,
) -> torch.Tensor:
    """Scores for ``method`` in ``METHODS``; top-m of them are kept. ``[B, H_kv, N_c]``.

    ``m`` (the number kept) is needed by ``uniform`` only."""
    cot_mask = cot_mask.bool()
    if method == "rkv":
        return rkv_scores(q_answer, k_cot, answer_mask, cot_mask, lam)
    if method == "attention":
        return rkv_scores(q_answer, k_cot, answer_mask, cot_mask, 1.0)
    if method == "redundancy":
        return rkv_scores(q_answer, k_cot, answer_mask, cot_mask, 0.0)
    b, h, n = k_cot.shape[:3]
    if method == "crop":  # earliest real positions score highest
        score = -torch.arange(n, dtype=torch.float32, device=k_cot.device).expand(b, h, n)
    elif method == "random":
        score = torch.rand((b, h, n), generator=generator, device="cpu").to(k_cot.device)
    elif method == "uniform":  # the same positions for every layer and head
        if m is None:
            raise ValueError("eviction method 'uniform' needs m, the number of entries kept")
        score = uniform_keep(cot_mask, m).float()[:, None, :].expand(b, h, n)
    else:
        raise ValueError(f"unknown eviction method {method!r}; choose from {METHODS}")
    return score.masked_fill(~cot_mask[:, None, :], float("-inf"))


def compress(
    k_cot: torch.Tensor,
    v_cot: torch.Tensor,
    scores: torch.Tensor,
    cot_mask: torch.Tensor,
    m: int,
    order: str = "position",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the top-``m`` scored CoT entries per (row, KV head).

    ``k_cot``/``v_cot`` ``[B, H_kv, N_c, d]``, ``scores [B, H_kv, N_c]`` (``-inf`` = never
    keep), ``cot_mask [B, N_c]``. Returns ``k, v [B, H_kv, m, d]`` and
    ``slot_mask [B, H_kv, m]`` (bool). ``order="position"`` sorts kept entries by original
    index (slot i <-> i-th kept CoT token), ``"score"`` by descending score. Slots beyond
    a CoT shorter than ``m`` are masked and come last, with zero k/v.
    """
    if order not in ("position", "score"):
        raise ValueError(f"order must be 'position' or 'score', got {order!r}")
    b, h, n, d = k_cot.shape
    valid = cot_mask.bool()[:, None, :].expand(b, h, n) & torch.isfinite(scores)
    scores = scores.float().masked_fill(~valid, float("-inf"))
    if n < m:  # pad with never-kept columns so topk always has m candidates
        pad = m - n
        scores = torch.nn.functional.pad(scores, (0, pad), value=float("-inf"))
        valid = torch.nn.functional.pad(valid, (0, pad), value=False)
        k_cot = torch.nn.functional.pad(k_cot, (0, 0, 0, pad))
        v_cot = torch.nn.functional.pad(v_cot, (0, 0, 0, pad))
        n = m
    top = scores.topk(m, dim=-1).indices  # [B, H_kv, m], by descending score
    kept = torch.gather(valid, -1, top)
    if order == "position":  # real entries by index, masked slots after them
        key = top + (~kept).long() * n
        top = torch.gather(top, -1, key.argsort(dim=-1))
        kept = torch.gather(valid, -1, top)
    idx = top[..., None].expand(b, h, m, d)
    keep = kept[..., None].to(k_cot.dtype)
    k = torch.gather(k_cot, 2, idx) * keep
    v = torch.gather(v_cot, 2, idx) * keep
    return k, v, kept
