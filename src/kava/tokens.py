"""kava's special tokens, their ids, and the ignored-label value (no transformers import).

``batching`` and ``losses`` read these without loading the backbone; ``kava.backbone``
adds the tokens to a tokenizer (``load_tokenizer``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BOT, EOT, LATENT, PAD = "<bot>", "<eot>", "<latent>", "<kava_pad>"
NEW_TOKENS = (BOT, EOT, LATENT, PAD)
IGNORE = -100  # label of a position that is not supervised (torch's cross-entropy default)


@dataclass(frozen=True)
class SpecialIds:
    bot: int
    eot: int
    latent: int
    pad: int
    eos: int
    bos: int | None  # prepended to the question when the tokenizer normally adds one


def special_ids(tok: Any) -> SpecialIds:
    """The ids of kava's tokens (added by ``kava.backbone.load_tokenizer``), eos and bos."""
    ids = tok.convert_tokens_to_ids(list(NEW_TOKENS))
    if tok.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; kava needs one to end answers")
    if tok.pad_token_id == tok.eos_token_id:
        raise ValueError("pad must not be eos (eos would stop being supervised)")
    probe = tok("1").input_ids
    bos = (
        tok.bos_token_id
        if tok.bos_token_id is not None and probe[:1] == [tok.bos_token_id]
        else None
    )
    return SpecialIds(*ids, eos=tok.eos_token_id, bos=bos)
