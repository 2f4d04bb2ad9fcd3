"""Curricula: what a training batch looks like at a given optimizer step.

iCoT and Coconut change their training sequences over training (kava.methods
``curriculum``); every other method trains on the same sequence throughout. A schedule
here is a pure function of the optimizer step, and every random choice (iCoT's removal
smoothing, Coconut's ``uniform_prob``) is drawn from a generator seeded by (seed, step,
micro-batch of the global batch; ``kava.parallel.draw_seed``), so ``--resume`` reproduces
a curriculum exactly with nothing but the step in the trainer state, also across a stage
boundary, and N processes draw what one process draws.

* **iCoT** (Deng et al. 2024, official code da03/Internalize_CoT_Step_by_Step): CoT tokens
  are removed from the left, one more every ``round(steps_per_epoch / remove_per_epoch)``
  optimizer steps, starting from ``remove_start_from``; once the count reaches
  ``remove_all_when_remove_beyond`` the whole CoT is removed. Removal smoothing: each
  example removes ``s`` extra tokens with probability ``(1 - e^-lambda) e^(-lambda s)``
  (``s < 100``, the remainder on the last).
* **Coconut** (Hao et al. 2024, official code facebookresearch/coconut): stage
  ``k = step // round(epochs_per_stage * steps_per_epoch)``; at stage ``k <=
  max_latent_stage`` the first ``k`` CoT steps are replaced by ``k * c`` continuous
  thoughts; past it all steps are removed and ``max_latent_stage * c`` thoughts are used
  (``pad_latent_to_max``; else ``min(steps, max_latent_stage) * c``). With probability
  ``uniform_prob`` an example trains at a stage drawn uniformly from ``0 .. its steps``.

``Curriculum.switches_at(step)`` says when the stage / removal count changes: the
trainer resets the optimizer state there (``reset_optimizer``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kava.batching import Batch, CoconutBatch, Encoded, collate, collate_coconut, drop_cot_prefix
from kava.config import CoconutConfig, ConfigError, IcotConfig, KavaConfig
from kava.parallel import draw_seed
from kava.tokens import SpecialIds

SMOOTHING_SUPPORT = 100  # extra tokens an iCoT example may remove: 0 .. 99


# --- iCoT ----------------------------------------------------------------------------------


def icot_steps_per_token(steps_per_epoch: int, cfg: IcotConfig) -> int:
    """Optimizer steps between two increases of the removal count (at least 1)."""
    return max(1, round(steps_per_epoch / cfg.remove_per_epoch))


def icot_removal(step: int, steps_per_epoch: int, cfg: IcotConfig) -> float:
    """CoT tokens scheduled for removal at optimizer ``step`` (0-based); ``math.inf`` =
    the whole CoT."""
    removed = cfg.remove_start_from + step // icot_steps_per_token(steps_per_epoch, cfg)
    beyond = cfg.remove_all_when_remove_beyond
    if beyond is not None and removed >= beyond:
        return math.inf
    return float(removed)


def smoothing_distribution(lam: float | None) -> torch.Tensor:
    """``[100]`` probabilities of removing ``s`` extra tokens: ``(1 - e^-lam) e^(-lam s)``,
    the leftover mass on the last entry; ``lam=None``: always 0 extra."""
    p = torch.zeros(SMOOTHING_SUPPORT, dtype=torch.float64)
    if lam is None:
        p[0] = 1.0
        return p
    s = torch.arange(SMOOTHING_SUPPORT, dtype=torch.float64)
    p = (1 - math.exp(-lam)) * torch.exp(-lam * s)
    p[-1] += 1 - p.sum()
    return p


# --- Coconut -------------------------------------------------------------------------------


def coconut_steps_per_stage(steps_per_epoch: int, cfg: CoconutConfig) -> int:
    return max(1, round(cfg.epochs_per_stage * steps_per_epoch))


def coconut_stage(step: int, steps_per_epoch: int, cfg: CoconutConfig) -> int:
    """The curriculum stage at optimizer ``step``, capped at ``max_latent_stage + 1``
    (every stage past the last latent one trains the same sequences)."""
    stage = step // coconut_steps_per_stage(steps_per_epoch, cfg)
    return min(stage, cfg.max_latent_stage + 1)


def coconut_layout(stage: int, num_steps: int, cfg: CoconutConfig) -> tuple[int, int]:
    """``(thoughts, steps removed)`` of an example with ``num_steps`` CoT steps at ``stage``."""
    c, top = cfg.thoughts_per_step, cfg.max_latent_stage
    if stage > top:
        thoughts = top if cfg.pad_latent_to_max else min(num_steps, top)
        return thoughts * c, num_steps
    return stage * c, min(stage, num_steps)


# --- the trainer's view --------------------------------------------------------------------


@dataclass
class CurriculumBatch:
    batch: Batch | CoconutBatch
    cot_exhausted: int  # rows whose CoT is shorter than what their stage removes (all gone)


class Curriculum:
    """Builds the batch of optimizer step ``step`` for ``cfg.method`` from encoded items."""

    def __init__(self, cfg: KavaConfig, steps_per_epoch: int, ids: SpecialIds):
        self.kind = cfg.method_spec.curriculum
        self.objective = cfg.method_spec.objective
        self.cfg = cfg
        self.steps_per_epoch = steps_per_epoch
        self.ids = ids
        self.bucket = cfg.train.bucket
        self.seed = cfg.train.seed
        self.smoothing = smoothing_distribution(cfg.icot.removal_smoothing_lambda)

    def value(self, step: int) -> float | None:
        """What the log records per step: the Coconut stage or the iCoT removal count
        (``inf`` = all), None without a curriculum."""
        if self.kind == "token_removal":
            return icot_removal(step, self.steps_per_epoch, self.cfg.icot)
        if self.kind == "thought_stages":
            return float(coconut_stage(step, self.steps_per_epoch, self.cfg.coconut))
        return None

    def eval_form_step(self, longest_cot: int) -> int | None:
        """The first optimizer step whose sequences have the form evaluation answers in
        (iCoT: no CoT token left, ``longest_cot`` being the longest CoT in tokens; Coconut:
        every CoT step replaced by thoughts, stage ``max_latent_stage + 1``), None without
        a curriculum. Removal smoothing and ``uniform_prob`` reach it earlier for some
        examples; this is when every example does."""
        if self.kind == "token_removal":
            i = self.cfg.icot
            beyond = i.remove_all_when_remove_beyond
            target = longest_cot if beyond is None else min(beyond, longest_cot)
            per = icot_steps_per_token(self.steps_per_epoch, i)
            return per * max(0, target - i.remove_start_from)
        if self.kind == "thought_stages":
            c = self.cfg.coconut
            return (c.max_latent_stage + 1) * coconut_steps_per_stage(self.steps_per_epoch, c)
        return None

    def check_reaches_eval_form(self, longest_cot: int, total_steps: int) -> int | None:
        """``eval_form_step``, or a ``ConfigError`` naming the keys when training ends
        before it: evaluation would answer in a form the model never trained on."""
        first = self.eval_form_step(longest_cot)
        if first is None or first < total_steps:
            return first
        spe = self.steps_per_epoch
        if self.kind == "token_removal":
            i = self.cfg.icot
            why = (
                f"iCoT removes one more CoT token every {icot_steps_per_token(spe, i)} steps "
                f"(icot.remove_per_epoch {i.remove_per_epoch:g} at {spe} steps per epoch) and "
                f"removes the whole CoT (longest: {longest_cot} tokens; "
                f"icot.remove_all_when_remove_beyond {i.remove_all_when_remove_beyond}) from "
                f"step {first}"
            )
            fix = "raise icot.remove_per_epoch or lower icot.remove_all_when_remove_beyond"
        else:
            c = self.cfg.coconut
            why = (
                f"Coconut replaces every CoT step by thoughts from stage "
                f"coconut.max_latent_stage + 1 = {c.max_latent_stage + 1}, which starts at step "
                f"{first} ({coconut_steps_per_stage(spe, c)} steps per stage: "
                f"coconut.epochs_per_stage {c.epochs_per_stage:g} x {spe} steps per epoch)"
            )
            fix = "lower coconut.epochs_per_stage or coconut.max_latent_stage"
        raise ConfigError(
            f"method {self.cfg.method}: training ends after {total_steps} steps, before the "
            f"curriculum reaches the form evaluation answers in: {why}. Evaluation would "
            f"score a form the model never trained on; {fix}, or train longer "
            "(train.epochs / train.max_steps)"
        )

    def switches_at(self, step: int) -> bool:
        """The stage / removal count of ``step`` differs from the previous step's."""
        return step > 0 and self.kind != "none" and self.value(step) != self.value(step - 1)

    @property
    def resets_optimizer(self) -> bool:
        if self.kind == "token_removal":
            return self.cfg.icot.reset_optimizer
        return self.kind == "thought_stages" and self.cfg.coconut.reset_optimizer

    def _generator(self, step: int, micro: int) -> torch.Generator:
        # one stream per (seed, step, global micro-batch): nothing to save for resume, and
        # the same draws on 1 or N processes (kava.parallel)
        return torch.Generator().manual_seed(draw_seed(self.seed, step, micro))

    def batch(self, items: Sequence[Encoded], step: int, micro: int = 0) -> CurriculumBatch:
        """The batch of micro-batch ``micro`` of optimizer step ``step``; ``micro`` indexes
        the GLOBAL batch (``kava.parallel.global_micro``), not a process's share."""
        if self.kind == "token_removal":
            return self._icot(items, step, micro)
        if self.objective == "thoughts":
            return self._coconut(items, step, micro)
        return CurriculumBatch(collate(items, self.ids, self.bucket), 0)

    def _icot(self, items: Sequence[Encoded], step: int, micro: int) -> CurriculumBatch:
        scheduled = self.value(step)
        extra = torch.multinomial(
            self.smoothing, len(items), replacement=True, generator=self._generator(step, micro)
        ).tolist()
        out, exhausted = [], 0
        for e, s in zip(items, extra):
            n = len(e.cot) if math.isinf(scheduled) else int(scheduled) + s
            exhausted += n >= len(e.cot) > 0 and not math.isinf(scheduled)
            out.append(drop_cot_prefix(e, n))
        return CurriculumBatch(collate(out, self.ids, self.bucket), exhausted)

    def _coconut(self, items: Sequence[Encoded], step: int, micro: int) -> CurriculumBatch:
        cfg = self.cfg.coconut
        stage = int(self.value(step))
        g = self._generator(step, micro)
        thoughts, skips, exhausted = [], [], 0
        for e in items:
            k = stage
            if cfg.uniform_prob > 0 and torch.rand((), generator=g).item() < cfg.uniform_prob:
                k = int(torch.randint(len(e.steps) + 1, (), generator=g))
            n, skip = coconut_layout(k, len(e.steps), cfg)
            exhausted += 0 < len(e.steps) < k <= cfg.max_latent_stage
            thoughts.append(n)
            skips.append(skip)
        batch = collate_coconut(items, self.ids, thoughts, skips, self.bucket)
        return CurriculumBatch(batch, exhausted)
