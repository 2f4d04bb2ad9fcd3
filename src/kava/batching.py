"""Tokenize examples and collate teacher / student batches (METHOD.md section 1).

Pieces are tokenized separately and concatenated, so every boundary (CoT span, answer
prompt, distillation position) is known exactly, per row:

* teacher: ``question ++ cot ++ prompt ++ answer ++ eos`` — right-padded;
* student: ``question ++ <bot>`` left-padded (latents then sit at the same columns in
  every row), and ``<eot> ++ prompt ++ answer ++ eos`` right-padded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch

from kava.tokens import IGNORE, SpecialIds

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Encoded:
    """Token ids of one example's pieces (no padding)."""

    question: list[int]  # bos (if the model uses one) + question
    cot: list[int]  # CoT steps as the teacher sees them (last step dropped if configured)
    prompt: list[int]  # " The answer is:"
    answer: list[int]  # " 18" (eos not included)
    # the CoT step by step (``encode_steps``; Coconut's stages remove whole steps):
    # ``cot`` is then their concatenation
    steps: tuple[tuple[int, ...], ...] = ()


def encode(
    question: str,
    steps: Sequence[str],
    answer: str,
    tokenizer: PreTrainedTokenizerBase,
    ids: SpecialIds,
    answer_prompt: str = "The answer is:",
    drop_last_step: bool = True,
) -> Encoded:
    """Tokenize one example. ``drop_last_step`` removes the last CoT step (it holds the answer)."""

    def tok(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids if text else []

    steps = list(steps[:-1] if drop_last_step else steps)
    cot_text = " " + " ".join(s.strip() for s in steps) if steps else ""
    bos = [ids.bos] if ids.bos is not None else []
    return Encoded(
        question=bos + tok(question.strip()),
        cot=tok(cot_text),
        prompt=tok(" " + answer_prompt.strip()),
        answer=tok(" " + answer.strip()),
    )


def encode_steps(
    question: str,
    steps: Sequence[str],
    answer: str,
    tokenizer: PreTrainedTokenizerBase,
    ids: SpecialIds,
    answer_prompt: str = "The answer is:",
) -> Encoded:
    """Tokenize one example keeping its CoT steps apart: step ``i`` is `` step_i`` (all
    steps kept), and ``cot`` is their concatenation."""
    base = encode(question, (), answer, tokenizer, ids, answer_prompt, drop_last_step=False)
    per_step = tuple(
        tuple(tokenizer(" " + s.strip(), add_special_tokens=False).input_ids)
        for s in steps
        if s.strip()
    )
    cot = [t for step in per_step for t in step]
    return Encoded(base.question, cot, base.prompt, base.answer, per_step)


def drop_cot_prefix(e: Encoded, n: int) -> Encoded:
    """``e`` with its first ``n`` CoT tokens removed (iCoT; all of them when ``n`` is at
    least the CoT's length)."""
    return Encoded(e.question, e.cot[n:], e.prompt, e.answer)


@dataclass
class TeacherBatch:
    """Right-padded teacher inputs. Positions index ``input_ids`` columns."""

    input_ids: torch.Tensor  # [B, S_t]
    attention_mask: torch.Tensor  # [B, S_t] bool
    labels: torch.Tensor  # [B, S_t], IGNORE on question and pads; label[p] = input_ids[p]
    cot_index: torch.Tensor  # [B, N_c] positions of CoT tokens (0 where padded)
    cot_mask: torch.Tensor  # [B, N_c] bool
    answer_index: torch.Tensor  # [B, N_a] positions of prompt + answer + eos
    answer_mask: torch.Tensor  # [B, N_a] bool
    distill_index: torch.Tensor  # [B] position of the last answer-prompt token


@dataclass
class StudentBatch:
    question_ids: torch.Tensor  # [B, S_q] left-padded, ends with <bot> in every row
    question_mask: torch.Tensor  # [B, S_q] bool
    answer_ids: torch.Tensor  # [B, S_a] <eot> + prompt + answer + eos, right-padded
    answer_mask: torch.Tensor  # [B, S_a] bool
    answer_labels: torch.Tensor  # [B, S_a], IGNORE on <eot> and pads
    distill_index: int  # column of the last prompt token in answer_ids (same in every row)


@dataclass
class Batch:
    teacher: TeacherBatch
    student: StudentBatch

    def to(self, device) -> Batch:
        def move(obj):
            return type(obj)(
                **{
                    f.name: v.to(device) if isinstance(v, torch.Tensor) else v
                    for f in fields(obj)
                    for v in [getattr(obj, f.name)]
                }
            )

        return Batch(move(self.teacher), move(self.student))


def pad_rows(
    rows: list[list[int]], value: int, left: bool = False, multiple_of: int = 1
) -> torch.Tensor:
    """``[len(rows), W]`` long: rows padded with ``value`` (on the left or the right) to the
    longest, rounded up to a multiple of ``multiple_of`` (length buckets: compiled code
    and CUDA graphs then meet a few shapes instead of one per batch)."""
    width = max((len(r) for r in rows), default=0)
    width = -(-width // multiple_of) * multiple_of
    out = [
        ([value] * (width - len(r)) + r) if left else (r + [value] * (width - len(r))) for r in rows
    ]
    return torch.tensor(out, dtype=torch.long).reshape(len(rows), width)


def collate_teacher(items: Sequence[Encoded], ids: SpecialIds, bucket: int = 1) -> TeacherBatch:
    seqs, labels, cot_idx, ans_idx, distill = [], [], [], [], []
    for e in items:
        q, c, p, a = len(e.question), len(e.cot), len(e.prompt), len(e.answer) + 1
        seqs.append(e.question + e.cot + e.prompt + e.answer + [ids.eos])
        labels.append([IGNORE] * q + seqs[-1][q:])
        cot_idx.append(list(range(q, q + c)))
        ans_idx.append(list(range(q + c, q + c + p + a)))
        distill.append(q + c + p - 1)
    input_ids = pad_rows(seqs, ids.pad, multiple_of=bucket)
    cot_index = pad_rows(cot_idx, -1, multiple_of=bucket)
    ans_index = pad_rows(ans_idx, -1, multiple_of=bucket)
    return TeacherBatch(
        input_ids=input_ids,
        attention_mask=pad_rows([[1] * len(s) for s in seqs], 0, multiple_of=bucket).bool(),
        labels=pad_rows(labels, IGNORE, multiple_of=bucket),
        cot_index=cot_index.clamp(min=0),
        cot_mask=cot_index >= 0,
        answer_index=ans_index.clamp(min=0),
        answer_mask=ans_index >= 0,
        distill_index=torch.tensor(distill, dtype=torch.long),
    )


def collate_student(items: Sequence[Encoded], ids: SpecialIds, bucket: int = 1) -> StudentBatch:
    questions = [e.question + [ids.bot] for e in items]
    answers = [[ids.eot] + e.prompt + e.answer + [ids.eos] for e in items]
    prompt_lens = {len(e.prompt) for e in items}
    if len(prompt_lens) != 1:
        raise ValueError("the answer prompt must tokenize to the same length in every row")
    question_ids = pad_rows(questions, ids.pad, left=True, multiple_of=bucket)
    answer_ids = pad_rows(answers, ids.pad, multiple_of=bucket)
    answer_mask = pad_rows([[1] * len(a) for a in answers], 0, multiple_of=bucket).bool()
    labels = answer_ids.masked_fill(~answer_mask, IGNORE)
    labels[:, 0] = IGNORE  # <eot> is given, not predicted
    return StudentBatch(
        question_ids=question_ids,
        question_mask=pad_rows(
            [[1] * len(q) for q in questions], 0, left=True, multiple_of=bucket
        ).bool(),
        answer_ids=answer_ids,
        answer_mask=answer_mask,
        answer_labels=labels,
        distill_index=prompt_lens.pop(),
    )


def collate(items: Sequence[Encoded], ids: SpecialIds, bucket: int = 1) -> Batch:
    """Teacher and student batches; every padded dimension a multiple of ``bucket``."""
    return Batch(collate_teacher(items, ids, bucket), collate_student(items, ids, bucket))


@dataclass
class CoconutBatch:
    """One Coconut training batch (kava.coconut): ``question ++ <bot>`` (left-padded), up
    to ``N`` continuous-thought columns, then ``<eot> ++ remaining steps ++ prompt ++
    answer ++ eos`` (right-padded). Row ``i`` uses the first ``n_i`` thought columns; the
    others are masked padding."""

    question_ids: torch.Tensor  # [B, S_q] left-padded, ends with <bot> in every row
    question_mask: torch.Tensor  # [B, S_q] bool
    thought_mask: torch.Tensor  # [B, N] bool, True for the row's first n_i columns
    rest_ids: torch.Tensor  # [B, S_r] <eot> ++ remaining steps ++ prompt ++ answer ++ eos
    rest_mask: torch.Tensor  # [B, S_r] bool
    rest_labels: torch.Tensor  # [B, S_r], IGNORE on <eot> and pads

    def to(self, device) -> CoconutBatch:
        return CoconutBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def collate_coconut(
    items: Sequence[Encoded],
    ids: SpecialIds,
    thoughts: Sequence[int],
    skip_steps: Sequence[int],
    bucket: int = 1,
) -> CoconutBatch:
    """Row ``i``: ``thoughts[i]`` continuous thoughts in place of its first
    ``skip_steps[i]`` CoT steps (``encode_steps`` items)."""
    if not (len(items) == len(thoughts) == len(skip_steps)):
        raise ValueError("one thought count and one skip count per item")
    questions = [e.question + [ids.bot] for e in items]
    rests = [
        [ids.eot] + [t for step in e.steps[k:] for t in step] + e.prompt + e.answer + [ids.eos]
        for e, k in zip(items, skip_steps)
    ]
    n = max(thoughts, default=0)
    rest_ids = pad_rows(rests, ids.pad, multiple_of=bucket)
    rest_mask = pad_rows([[1] * len(r) for r in rests], 0, multiple_of=bucket).bool()
    labels = rest_ids.masked_fill(~rest_mask, IGNORE)
    labels[:, 0] = IGNORE  # <eot> is given, not predicted
    return CoconutBatch(
        question_ids=pad_rows(questions, ids.pad, left=True, multiple_of=bucket),
        question_mask=pad_rows(
            [[1] * len(q) for q in questions], 0, left=True, multiple_of=bucket
        ).bool(),
        thought_mask=torch.arange(n)[None, :] < torch.tensor(list(thoughts))[:, None],
        rest_ids=rest_ids,
        rest_mask=rest_mask,
        rest_labels=labels,
    )
