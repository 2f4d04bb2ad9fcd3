"""What each method is, in one table (imports nothing heavy).

The CLI, config validation, training, evaluation, reports and plots all read these
entries; no other module compares method names. Adding a method means: one entry in
``METHODS``, its training-sequence builder (``objective``), its curriculum if any, and
its tests.

The table is in the order of the KaVa paper's main table: CoT, No-CoT, iCoT, Coconut,
CODI, PCCoT, KaVa.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# How the training step is computed (kava.model / kava.coconut):
#   sft     - cross-entropy on one written sequence (question ++ cot ++ prompt ++ answer ++ eos)
#   distill - teacher pass (written CoT) + student latent passes (PCCoT Jacobi iterations)
#             + answer pass, with the CODI and KV distillation terms
#   thoughts - continuous thoughts fed back one per pass (Coconut), staged curriculum
Objective = Literal["sft", "distill", "thoughts"]
# Which CoT the training sequence holds: all of it, the teacher's (teacher.drop_last_step
# applies), or none.
TrainingCot = Literal["full", "teacher", "none"]
# How a question is answered at evaluation:
#   text    - greedy decoding after the prompt row (CoT writes its own chain of thought)
#   jacobi  - pass 0 + T Jacobi iterations over M latents, <eot> ++ prompt, then the answer
#   thoughts - <bot>, continuous thoughts one per pass, <eot> ++ prompt, then the answer
Inference = Literal["text", "jacobi", "thoughts"]
# What the prompt row holds before generation starts.
EvalPrompt = Literal["question", "question_prompt", "question_bot"]
# How the training sequence changes with the optimizer step (kava.curricula):
#   token_removal  - CoT tokens removed from the left at a constant rate (iCoT)
#   thought_stages - stage k replaces the first k CoT steps by k*c thoughts (Coconut)
Curriculum = Literal["none", "token_removal", "thought_stages"]
# The config section each curriculum reads (no other method reads it).
CURRICULUM_SECTIONS: dict[str, str] = {"token_removal": "icot", "thought_stages": "coconut"}


@dataclass(frozen=True)
class Method:
    """The facts that tell one method from another. Every module asks these fields."""

    name: str  # the config value (``method: kava``)
    label: str  # shown in tables and plots
    paper: str  # where it comes from
    summary: str  # one line for ``--help`` and docs
    objective: Objective
    training_cot: TrainingCot
    codi_loss: bool  # alpha1 (CODI hidden-state distillation) is part of the loss
    kv_loss: bool  # alpha2 (KV distillation against the evicted teacher KV)
    sequential: bool  # latent iterations forced to T >= M (= one latent at a time)
    curriculum: Curriculum
    inference: Inference
    eval_prompt: EvalPrompt
    writes_cot: bool  # generates its own CoT and answer prompt: long budget, parsed as is
    passes: str  # forward passes per question at evaluation, as a formula

    @property
    def latent(self) -> bool:
        """Reasons in continuous latent tokens at inference."""
        return self.inference != "text"

    @property
    def uses_projection(self) -> bool:
        """Latent inputs go through ``prj`` (PCCoT/KaVa/CODI-style Jacobi latents)."""
        return self.inference == "jacobi"


_TEXT = dict(codi_loss=False, kv_loss=False, sequential=False, inference="text")
_JACOBI = dict(
    objective="distill",
    training_cot="teacher",
    codi_loss=True,
    curriculum="none",
    inference="jacobi",
    eval_prompt="question_bot",
    writes_cot=False,
    passes="1 + T + answer tokens (pass 0, T Jacobi iterations, <eot>+prompt pass, decoding)",
)

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "cot",
            "CoT",
            "supervised fine-tuning on written chains of thought",
            "fine-tune on question ++ full CoT ++ answer; write the CoT at evaluation",
            objective="sft",
            training_cot="full",
            curriculum="none",
            eval_prompt="question",
            writes_cot=True,
            passes="generated tokens (prefill, then one pass per further token)",
            **_TEXT,
        ),
        Method(
            "nocot",
            "No-CoT",
            "supervised fine-tuning on answers only",
            "fine-tune on question ++ answer; answer directly at evaluation",
            objective="sft",
            training_cot="none",
            curriculum="none",
            eval_prompt="question_prompt",
            writes_cot=False,
            passes="answer tokens",
            **_TEXT,
        ),
        Method(
            "icot",
            "iCoT",
            "Deng et al. 2024, stepwise internalization (da03/Internalize_CoT_Step_by_Step)",
            "fine-tune on the CoT while removing its tokens from the left over training; "
            "answer directly at evaluation",
            objective="sft",
            training_cot="full",
            curriculum="token_removal",
            eval_prompt="question_prompt",
            writes_cot=False,
            passes="answer tokens",
            **_TEXT,
        ),
        Method(
            "coconut",
            "Coconut",
            "Hao et al. 2024, Coconut (facebookresearch/coconut)",
            "continuous thoughts: the last hidden state fed back as the next input, one "
            "thought per pass; stages replace CoT steps by thoughts",
            objective="thoughts",
            training_cot="full",
            codi_loss=False,
            kv_loss=False,
            sequential=False,
            curriculum="thought_stages",
            inference="thoughts",
            eval_prompt="question_bot",
            writes_cot=False,
            passes="thoughts + answer tokens (question+<bot> pass, one pass per further "
            "thought, last thought + <eot>+prompt pass, decoding)",
        ),
        Method(
            "codi",
            "CODI",
            "Shen et al. 2025, CODI (self-distillation, sequential latents)",
            "sequential latents (T >= M) with CODI's hidden-state distillation, no KV loss",
            kv_loss=False,
            sequential=True,
            **_JACOBI,
        ),
        Method(
            "pccot",
            "PCCoT",
            "Wu et al. 2025, PCCoT (parallel continuous CoT, Jacobi iterations)",
            "M latents refined by T Jacobi iterations, CODI loss, no KV loss",
            kv_loss=False,
            sequential=False,
            **_JACOBI,
        ),
        Method(
            "kava",
            "KaVa",
            "Kuzina et al. 2025, KaVa (compressed KV-cache distillation)",
            "PCCoT latents + CODI loss + KV loss against the R-KV-evicted teacher KV-cache",
            kv_loss=True,
            sequential=False,
            **_JACOBI,
        ),
    )
}

DEFAULT_METHOD = "kava"
# Paper order of the main table (the dict above is written in it).
PAPER_ORDER: tuple[str, ...] = tuple(METHODS)


def get_method(name: str) -> Method:
    """The table entry of ``name``; a ``KeyError`` names the known methods."""
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(METHODS)}") from None


def method_help() -> str:
    """One line per method, for ``--help``."""
    width = max(len(n) for n in METHODS)
    return "\n".join(f"  {m.name:<{width}}  {m.summary}" for m in METHODS.values())
