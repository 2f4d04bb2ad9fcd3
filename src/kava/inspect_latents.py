"""What do the latents encode, and which CoT tokens does the eviction keep? (``kava inspect``)

* ``probe_latents``: for one question, run pass 0 and the T Jacobi iterations and, for
  each latent slot of the **last** pass, decode (a) its last-layer hidden state ``h``
  (after the final norm, before ``prj``) through ``lm_head`` — CODI's probe: the top-k
  next tokens the latent "says" — and (b) its input ``x`` (what the slot read) as the
  nearest rows of the input-embedding matrix by cosine similarity. kava's own special
  tokens are left out of both.
* ``eviction_choice``: run the teacher on ``question ++ cot (last step dropped as in
  training) ++ prompt ++ answer`` and return, per (layer, KV head), the scores of the
  run's eviction method (``rkv.method``, ``rkv.lambda``) and which M CoT tokens are kept —
  the same top-M selection as ``kava.eviction.compress`` in training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kava import eviction
from kava.attention import positions_from_mask
from kava.backbone import Backbone
from kava.batching import collate_teacher, encode
from kava.config import KavaConfig
from kava.data import Example
from kava.kv import KVCache
from kava.model import latent_passes, teacher_forward


def token_text(tokenizer, token_id: int) -> str:
    """A readable form of one token: decoded, leading space shown as '␣', newline as '⏎'."""
    text = tokenizer.decode([token_id])
    return text.replace(" ", "␣").replace("\n", "⏎") or "∅"


@dataclass
class LatentProbe:
    slot: int  # 1-based latent slot
    output: list[tuple[str, float]]  # lm_head(h): top-k (token, probability)
    input: list[tuple[str, float]]  # nearest input embeddings to x: (token, cosine)


@torch.no_grad()
def last_latent_pass(
    backbone: Backbone, cfg: KavaConfig, question: str
) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Inputs ``x [M, D]`` and hidden states ``h [M, D]`` of the latents in the last pass.

    Runs ``kava.model.latent_passes`` and then the last pass once more on its own inputs
    to read its hidden states (``latent_passes`` keeps only the KV). Also returns the
    ``LatentState`` (its ``latent_kv`` equals the KV of the re-run pass).
    """
    from kava.evaluate import question_prompts

    m, t = cfg.latent.num_latents, cfg.effective_iterations
    device = backbone.new_token_embeddings.device
    row = question_prompts(backbone, cfg, [Example(question, (), "0")]).rows[0]
    ids = torch.tensor([row], device=device)
    mask = torch.ones_like(ids, dtype=torch.bool)
    s_q = ids.shape[1]
    # as evaluation decodes: no dropout (a checkpoint loads in train mode)
    with backbone.eval_mode():
        state = latent_passes(backbone, ids, mask, m, t)
        if t > 0:
            x = state.inputs[-1]
            out = backbone(
                x,
                state.key_mask,
                positions_from_mask(state.key_mask, m),
                cache=KVCache.growing(state.question_kv),
            )
            h = out.last_hidden_state
        else:  # pause tokens: the last pass is pass 0 on the placeholder embeddings
            ids0 = torch.cat([ids, ids.new_full((1, m), backbone.ids.latent)], dim=1)
            x = backbone.embed(ids0)[:, s_q:]
            out = backbone(
                backbone.embed(ids0), state.key_mask, positions_from_mask(state.key_mask, s_q + m)
            )
            h = out.last_hidden_state[:, s_q:]
    return x[0], h[0], state


@torch.no_grad()
def probe_latents(
    backbone: Backbone, cfg: KavaConfig, question: str, top_k: int = 5
) -> list[LatentProbe]:
    """Top-k vocabulary tokens of every latent slot (see the module docstring)."""
    if cfg.method_spec.inference != "jacobi":
        raise ValueError(f"method {cfg.method!r} has no Jacobi latent tokens to probe")
    x, h, _ = last_latent_pass(backbone, cfg, question)
    n_vocab = backbone.first_new_id  # ids from here on are kava's tokens (or spare rows)
    probs = torch.softmax(backbone.logits(h)[:, :n_vocab], dim=-1)  # [M, V]
    emb = backbone.lm.get_input_embeddings().weight[:n_vocab].float()
    cos = (
        torch.nn.functional.normalize(x.float(), dim=-1)
        @ torch.nn.functional.normalize(emb, dim=-1).T
    )  # [M, V]
    tok = backbone.tokenizer
    rows = []
    for j in range(h.shape[0]):
        p, pi = probs[j].topk(top_k)
        c, ci = cos[j].topk(top_k)
        rows.append(
            LatentProbe(
                j + 1,
                [(token_text(tok, int(i)), float(v)) for v, i in zip(p, pi)],
                [(token_text(tok, int(i)), float(v)) for v, i in zip(c, ci)],
            )
        )
    return rows


@dataclass
class EvictionChoice:
    cot_tokens: list[str]  # the teacher's CoT tokens (after dropping the last step)
    scores: np.ndarray  # [L, H_kv, N] eviction scores (higher = kept first)
    kept: np.ndarray  # [L, H_kv, N] bool, exactly min(M, N) True per (layer, head)
    method: str
    lam: float
    num_latents: int

    def kept_fraction(self) -> np.ndarray:
        """``[N]``: the fraction of (layer, head) pairs that keep each CoT token."""
        return self.kept.reshape(-1, self.kept.shape[-1]).mean(0)

    def majority(self) -> np.ndarray:
        """``[L, N]`` bool: kept by at least half of the KV heads of the layer."""
        return self.kept.mean(1) >= 0.5


@torch.no_grad()
def eviction_choice(
    backbone: Backbone,
    cfg: KavaConfig,
    question: str,
    steps: Sequence[str],
    answer: str,
) -> EvictionChoice:
    """Which teacher CoT tokens the run's eviction keeps, per (layer, KV head)."""
    ids = backbone.ids
    enc = encode(
        question,
        steps,
        answer,
        backbone.tokenizer,
        ids,
        cfg.answer_prompt,
        cfg.teacher.drop_last_step,
    )
    if not enc.cot:
        raise ValueError(
            f"the CoT {list(steps)!r} has no tokens left for the teacher "
            f"(teacher.drop_last_step={cfg.teacher.drop_last_step}); give more steps"
        )
    device = backbone.new_token_embeddings.device
    tb = collate_teacher([enc], ids)
    tb = type(tb)(**{k: v.to(device) for k, v in vars(tb).items()})
    with backbone.eval_mode():
        out = teacher_forward(backbone, tb, capture_kv=True, hidden=False)
    q = out.capture.stacked("queries")[:, 0]  # [L, H_q, N_a, d]
    k = out.capture.stacked("keys")[:, 0]  # [L, H_kv, N_c, d]
    n_layers = k.shape[0]
    r = cfg.rkv
    scores = eviction.eviction_scores(
        r.method,
        q,
        k,
        tb.answer_mask.expand(n_layers, -1),
        tb.cot_mask.expand(n_layers, -1),
        r.lam,
        torch.Generator().manual_seed(r.seed),
        cfg.latent.num_latents,
    )  # [L, H_kv, N]
    n = scores.shape[-1]
    m = cfg.latent.num_latents
    top = scores.topk(min(m, n), dim=-1).indices
    kept = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)
    return EvictionChoice(
        [token_text(backbone.tokenizer, t) for t in enc.cot],
        scores.float().cpu().numpy(),
        kept.cpu().numpy(),
        r.method,
        r.lam,
        m,
    )


def format_probe_table(rows: list[LatentProbe]) -> str:
    lines = [
        "| latent | lm_head(h) top tokens (prob) | nearest embeddings to input x (cosine) |",
        "|---|---|---|",
    ]
    for r in rows:
        out = ", ".join(f"`{t}` {p:.2f}" for t, p in r.output)
        inp = ", ".join(f"`{t}` {c:.2f}" for t, c in r.input)
        lines.append(f"| {r.slot} | {out} | {inp} |")
    return "\n".join(lines)


def format_eviction(choice: EvictionChoice) -> str:
    n_layers, n_heads, n = choice.kept.shape
    lines = [
        f"teacher CoT ({n} tokens): {' '.join(choice.cot_tokens)}",
        f"eviction {choice.method} (lambda={choice.lam}) keeps {min(choice.num_latents, n)} "
        f"of {n} per layer and KV head; tokens kept by >= half of the {n_heads} heads:",
    ]
    maj = choice.majority()
    for layer in range(n_layers):
        kept = [t for t, k in zip(choice.cot_tokens, maj[layer]) if k]
        lines.append(f"  layer {layer:2d}: {' '.join(kept) if kept else '(no majority)'}")
    frac = choice.kept_fraction()
    lines.append(
        "kept by % of (layer, head): "
        + " ".join(f"{t}:{100 * f:.0f}" for t, f in zip(choice.cot_tokens, frac))
    )
    return "\n".join(lines)
