"""The lm-evaluation-harness model ``kava`` (``generate_until`` with kava's decoding)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from kava.api import LatentReasoner
from kava.data import normalize_answer

log = logging.getLogger(__name__)

NOT_SUPPORTED = (
    "the kava model does not support {what}: not supported for latent models (they reason "
    "in latent tokens, not in a written continuation that has a likelihood); use "
    "generate_until tasks (output_type: generate_until)"
)


def format_answer(parsed: float | None) -> str:
    """kava's parsed number as its canonical string ("18", "2.5"); "" for none."""
    if parsed is None:
        return ""
    return normalize_answer(parsed, where="prediction", field="parsed")


def truncate(text: str, until: list[str]) -> str:
    """``text`` up to the first of the stop strings (lm-eval's ``until``)."""
    cut = len(text)
    for stop in until:
        if stop:
            i = text.find(stop)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


def _batch_size(value: Any) -> int | None:
    if value is None or str(value).startswith("auto"):
        return None  # the checkpoint's eval.batch_size
    return int(value)


@register_model("kava")
class KavaLM(LM):
    """lm-eval's view of a ``LatentReasoner``: each request's context is the question."""

    def __init__(
        self,
        checkpoint: str,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | str | None = None,
        max_batch_size: int | None = None,
        max_new_tokens: int | None = None,
        parse_answer: bool = False,
        revision: str | None = None,
        **unused: Any,
    ) -> None:
        super().__init__()
        if unused:
            log.warning("kava model: ignoring model_args %s", sorted(unused))
        if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval passes --device (default cuda:0) even where there is no GPU
            log.warning("kava model: device %s is not available, running on cpu", device)
            device = "cpu"
        self.reasoner = LatentReasoner.from_pretrained(
            checkpoint, device=device, dtype=dtype, revision=revision
        )
        self._device = self.reasoner.device
        self.batch_size = _batch_size(batch_size)
        self.max_new_tokens = int(max_new_tokens) if max_new_tokens is not None else None
        self.parse_answer = bool(parse_answer)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy kava decoding of every request's context, in batches; requests are
        grouped by their ``max_gen_toks`` (default: the checkpoint's ``eval.*`` budget).
        ``until`` cuts each text at its first stop string; with ``parse_answer`` the
        answer is kava's parsed number of the whole text."""
        groups: dict[int | None, list[int]] = {}
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            if gen_kwargs.get("do_sample") or (gen_kwargs.get("temperature") or 0) > 0:
                raise ValueError("the kava model decodes greedily: do_sample / temperature > 0")
            budget = gen_kwargs.get("max_gen_toks", self.max_new_tokens)
            groups.setdefault(None if budget is None else int(budget), []).append(i)
        out: list[str] = [""] * len(requests)
        for budget, idx in groups.items():
            questions = [requests[i].args[0] for i in idx]
            result = self.reasoner.solve(
                questions,
                batch_size=self.batch_size,
                max_new_tokens=budget,
                progress=not disable_tqdm,
            )
            for j, i in enumerate(idx):
                if self.parse_answer:
                    out[i] = format_answer(result.answers[j])
                else:
                    until = (requests[i].args[1] or {}).get("until") or []
                    out[i] = truncate(result.texts[j], [until] if isinstance(until, str) else until)
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError(NOT_SUPPORTED.format(what="loglikelihood"))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError(NOT_SUPPORTED.format(what="loglikelihood_rolling"))
