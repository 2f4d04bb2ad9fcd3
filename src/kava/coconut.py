"""Coconut's training pass (Hao et al. 2024, "Training Large Language Models to Reason in
a Continuous Latent Space"; official code facebookresearch/coconut).

A continuous thought is the last-layer hidden state (after the final norm) of the
previous position, fed back directly as the next input embedding: no projection, one
thought per forward pass on top of the cached prefix, gradients through every thought.
For a ``kava.batching.CoconutBatch``:

* pass 0: ``question ++ <bot>`` (left-padded: ``<bot>`` is the last column of every row);
  its output at ``<bot>`` is thought 1;
* thought passes ``j = 1 .. N-1``: thought ``j`` alone, attending to everything before it;
  its output is thought ``j + 1``;
* final pass: thought ``N`` together with ``<eot> ++ remaining steps ++ prompt ++ answer
  ++ eos`` (the last thought's output feeds nothing, so it shares the pass; the official
  code merges it the same way): ``N + 1`` passes for ``N`` thoughts.

Loss: next-token cross-entropy on the remaining steps, the prompt, the answer and eos;
question, thoughts and markers are not supervised. A row with fewer thoughts than ``N``
has masked padding in the columns it does not use (padding invariance, as everywhere in
kava: positions count real columns only).
"""

from __future__ import annotations

import torch

from kava.attention import positions_from_mask
from kava.backbone import Backbone
from kava.batching import CoconutBatch
from kava.kv import KV, KVCache


def extend(prefix: KV, new: KV) -> KV:
    """Per layer ``cat(prefix, new)`` along the key columns (one prefix segment, so a
    compiled layer pass meets one shape family whatever the number of thoughts)."""
    if not prefix:
        return list(new)
    return [
        (torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2))
        for (pk, pv), (k, v) in zip(prefix, new)
    ]


def coconut_forward(backbone: Backbone, batch: CoconutBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Coconut's objective on one batch: ``(nll_sum [B], count [B])`` over the supervised
    tokens of the final pass (``kava.model.selected_nll``)."""
    from kava.model import selected_nll  # kava.model dispatches here

    bb = backbone
    s_q = batch.question_ids.shape[1]
    n = batch.thought_mask.shape[1]
    key_mask = batch.question_mask
    cache = KVCache.growing()
    out = bb(bb.embed(batch.question_ids), key_mask, positions_from_mask(key_mask, s_q), cache)
    prefix = cache.new
    thought = out.last_hidden_state[:, -1:]  # [B, 1, D]: the output at <bot>
    for j in range(n - 1):  # thoughts 1 .. N-1, one pass each
        key_mask = torch.cat([key_mask, batch.thought_mask[:, j : j + 1]], dim=1)
        cache = KVCache.growing(prefix)
        out = bb(thought, key_mask, positions_from_mask(key_mask, 1), cache)
        prefix = extend(prefix, cache.new)
        thought = out.last_hidden_state  # the next thought
    rest = bb.embed(batch.rest_ids)
    if n > 0:  # thought N shares the final pass
        inputs = torch.cat([thought.to(rest.dtype), rest], dim=1)
        new_mask = torch.cat([batch.thought_mask[:, n - 1 :], batch.rest_mask], dim=1)
    else:
        inputs, new_mask = rest, batch.rest_mask
    key_mask = torch.cat([key_mask, new_mask], dim=1)
    out = bb(
        inputs,
        key_mask,
        positions_from_mask(key_mask, inputs.shape[1]),
        KVCache.growing(prefix),
    )
    hidden = out.last_hidden_state[:, 1:] if n > 0 else out.last_hidden_state
    return selected_nll(bb, hidden, batch.rest_labels)


def coconut_tokens(batch: CoconutBatch) -> int:
    """Real tokens processed by every pass (for tokens/s)."""
    return int(batch.question_mask.sum() + batch.thought_mask.sum() + batch.rest_mask.sum())
