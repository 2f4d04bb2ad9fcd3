"""Batched greedy generation with a KV cache, counting forward passes per question.

* latent (kava / pccot / codi): pass 0 + T Jacobi iterations + ``<eot> ++ prompt`` pass
  + one pass per further answer token: ``1 + T + 1 + (n_generated - 1)`` passes;
* text (cot / nocot): prefill of the question (+ the answer prompt for No-CoT) + one
  pass per further token: ``1 + (n_generated - 1)``.

Masks and positions are built exactly as in training (kava.attention), so a question
decodes the same alone or inside a left-padded batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kava.attention import positions_from_mask
from kava.backbone import Backbone
from kava.batching import pad_rows
from kava.model import latent_passes


@dataclass
class Generation:
    tokens: list[list[int]]  # generated ids per question (eos included when produced)
    texts: list[str]  # decoded without special tokens
    passes: list[int]  # forward passes spent on each question


@torch.no_grad()
def greedy_decode(
    backbone: Backbone,
    cache,
    key_mask: torch.Tensor,
    last_hidden: torch.Tensor,
    max_new_tokens: int,
) -> tuple[list[list[int]], list[int]]:
    """Greedy continuation after a prefill whose final hidden states are ``last_hidden [B, D]``.

    ``cache`` holds the prefilled KV, ``key_mask [B, S]`` its real columns. Returns the
    generated ids per row (stopping at eos) and how many were generated per row. Rows
    that finished feed pad (masked) while the others go on.
    """
    eos, pad = backbone.ids.eos, backbone.ids.pad
    b = key_mask.shape[0]
    done = torch.zeros(b, dtype=torch.bool, device=key_mask.device)
    out: list[list[int]] = [[] for _ in range(b)]
    for step in range(max_new_tokens):
        next_ids = backbone.logits(last_hidden).argmax(-1)  # [B]
        next_ids = next_ids.masked_fill(done, pad)
        for i, (tok, finished) in enumerate(zip(next_ids.tolist(), done.tolist())):  # one sync
            if not finished:
                out[i].append(tok)
        done = done | (next_ids == eos)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        key_mask = torch.cat([key_mask, ~done[:, None]], dim=1)
        res = backbone(
            backbone.embed(next_ids[:, None]),
            key_mask,
            positions_from_mask(key_mask, 1),
            cache=cache,
        )
        cache, last_hidden = res.past_key_values, res.last_hidden_state[:, -1]
    return out, [len(o) for o in out]


def _texts(backbone: Backbone, tokens: list[list[int]]) -> list[str]:
    return backbone.tokenizer.batch_decode(tokens, skip_special_tokens=True)


@torch.no_grad()
def generate_latent(
    backbone: Backbone,
    question_ids: torch.Tensor,
    question_mask: torch.Tensor,
    prompt_ids: list[int],
    num_latents: int,
    num_iterations: int,
    max_new_tokens: int = 16,
) -> Generation:
    """Latent reasoning then the answer. ``question_ids [B, S_q]`` left-padded, ending in ``<bot>``."""
    state = latent_passes(backbone, question_ids, question_mask, num_latents, num_iterations)
    b = question_ids.shape[0]
    prompt = torch.tensor([[backbone.ids.eot, *prompt_ids]], device=question_ids.device).expand(
        b, -1
    )
    key_mask = torch.cat([state.key_mask, torch.ones_like(prompt, dtype=torch.bool)], dim=1)
    res = backbone(
        backbone.embed(prompt),
        key_mask,
        positions_from_mask(key_mask, prompt.shape[1]),
        cache=state.answer_cache(),
    )
    tokens, n = greedy_decode(
        backbone, res.past_key_values, key_mask, res.last_hidden_state[:, -1], max_new_tokens
    )
    passes = [1 + num_iterations + k for k in n]  # pass 0 + T + prompt pass (1st token) + k-1
    return Generation(tokens, _texts(backbone, tokens), passes)


@torch.no_grad()
def generate_text(backbone: Backbone, prompts: list[list[int]], max_new_tokens: int) -> Generation:
    """Plain greedy generation from token-id prompts (CoT / No-CoT baselines), left-padded."""
    ids = pad_rows(prompts, backbone.ids.pad, left=True).to(backbone.new_token_embeddings.device)
    mask = pad_rows([[1] * len(p) for p in prompts], 0, left=True).bool().to(ids.device)
    res = backbone(backbone.embed(ids), mask, positions_from_mask(mask, ids.shape[1]))
    tokens, n = greedy_decode(
        backbone, res.past_key_values, mask, res.last_hidden_state[:, -1], max_new_tokens
    )
    return Generation(tokens, _texts(backbone, tokens), [k for k in n])
