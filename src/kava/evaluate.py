"""Accuracy and forward-pass evaluation (METHOD.md section 5).

``evaluate(backbone, cfg, examples)`` greedily decodes every question the way the method
was trained (its ``kava.methods`` entry: ``eval_prompt``, ``inference``, ``writes_cot``),
parses the number, and reports accuracy next to the mean forward passes:

* ``jacobi`` latents (KaVa, PCCoT, CODI): ``question ++ <bot>`` left-padded, then M
  latents, T Jacobi iterations, ``<eot> ++ prompt`` and the answer
  (``1 + T + n_generated`` passes);
* written CoT (CoT): the question; the model writes its CoT, " The answer is: N" and eos;
* continuous thoughts (Coconut): ``question ++ <bot>``, ``max_latent_stage x c`` thoughts,
  ``<eot> ++ prompt`` and the answer (``n_thoughts + n_generated`` passes);
* direct answer (No-CoT, iCoT): ``question ++ prompt``; the model writes the answer and
  eos.

Parsing: the number after the last answer prompt, else the last number in the text. A
generation that starts after the prompt gets it prepended before parsing.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from kava.backbone import Backbone
from kava.batching import encode, pad_rows
from kava.config import KavaConfig
from kava.data import Example
from kava.inference import Generation, Generator
from kava.parallel import Shard, gather_in_order, shard

ANSWER_PROMPT = "The answer is:"
TOLERANCE = 1e-4

# A number: optional minus (not after a word character, so "5-3" is 5 and 3), then either
# comma-grouped thousands ("1,234") or plain digits, then optional decimals; or ".5".
# "18." (end of a sentence) matches "18": decimals need a digit after the point.
_MINUS = r"(?:(?<![\w.])-)?"
_NUMBER = re.compile(rf"{_MINUS}(?:\d{{1,3}}(?:,\d{{3}})+|\d+)(?:\.\d+)?|{_MINUS}\.\d+")


def _to_float(match: str) -> float:
    return float(match.replace(",", ""))


def extract_answer(text: str, answer_prompt: str = ANSWER_PROMPT) -> float | None:
    """The number after the LAST ``answer_prompt`` in ``text``, else the last number; or None.

    Commas are thousands separators ("1,234" -> 1234.0); negatives ("-3"), decimals
    ("2.5", ".5"), the Unicode minus ("−7") and a sentence's final "." ("is 18.") are
    handled. When the prompt is present but no number follows it, the last number of the
    whole text is returned.
    """
    text = text.replace("\u2212", "-")
    _, sep, tail = text.rpartition(answer_prompt.strip())
    if sep:
        after = _NUMBER.search(tail)
        if after is not None:
            return _to_float(after.group())
    numbers = _NUMBER.findall(text)
    return _to_float(numbers[-1]) if numbers else None


def answers_match(pred: float | None, gold: str) -> bool:
    """``|pred - gold| < 1e-4``; ``None`` (nothing parsed) never matches."""
    if pred is None:
        return False
    return abs(pred - float(gold.replace(",", ""))) < TOLERANCE


def parse_prediction(
    text: str, writes_cot: bool, answer_prompt: str = ANSWER_PROMPT
) -> float | None:
    """Parse a generated text. A method that ``writes_cot`` writes the prompt itself; the
    others start generating after it."""
    if not writes_cot:
        text = f"{answer_prompt.strip()} {text}"
    return extract_answer(text, answer_prompt)


@dataclass(frozen=True)
class Prompts:
    """Unpadded token-id inputs of a list of questions, in the order of the examples."""

    # per the method's eval_prompt: bos? + question (+ <bot> | + prompt)
    rows: list[list[int]]
    # " The answer is:" ids: the latent methods read them after <eot> before decoding
    answer_prompt: list[int]


def question_prompts(
    backbone: Backbone, cfg: KavaConfig, examples: Sequence[Example | str]
) -> Prompts:
    """Tokenize the questions (``Example``s or plain strings) with ``kava.batching.encode``,
    exactly as in training."""
    tok, ids = backbone.tokenizer, backbone.ids
    prompt = encode("", (), "", tok, ids, answer_prompt=cfg.answer_prompt).prompt
    suffix = {"question": [], "question_prompt": prompt, "question_bot": [ids.bot]}[
        cfg.method_spec.eval_prompt
    ]
    rows = []
    for ex in examples:
        text = ex if isinstance(ex, str) else ex.question
        question = encode(text, (), "", tok, ids, cfg.answer_prompt).question
        rows.append(question + suffix)
    return Prompts(rows, prompt)


def generate(
    generator: Generator, cfg: KavaConfig, rows: list[list[int]], answer_prompt: list[int]
) -> Generation:
    """Greedy generation for one batch of ``question_prompts`` rows, left-padded here to a
    multiple of ``eval.bucket`` columns, the way the method answers (``inference``)."""
    spec = cfg.method_spec
    bb = generator.bb
    device = bb.new_token_embeddings.device
    ids = pad_rows(rows, bb.ids.pad, left=True, multiple_of=cfg.eval.bucket).to(device)
    mask = pad_rows([[1] * len(r) for r in rows], 0, left=True, multiple_of=cfg.eval.bucket)
    mask = mask.bool().to(device)  # [B, S]
    if spec.inference == "jacobi":
        return generator.latent(
            ids,
            mask,
            answer_prompt,
            num_latents=cfg.latent.num_latents,
            num_iterations=cfg.effective_iterations,
            max_new_tokens=cfg.eval.max_new_tokens,
        )
    if spec.inference == "thoughts":
        return generator.coconut(
            ids,
            mask,
            answer_prompt,
            num_thoughts=cfg.coconut_eval_thoughts,
            max_new_tokens=cfg.eval.max_new_tokens,
        )
    if spec.inference != "text":
        raise NotImplementedError(f"no generation for inference {spec.inference!r}")
    max_new = cfg.eval.cot_max_new_tokens if spec.writes_cot else cfg.eval.max_new_tokens
    return generator.text(ids, mask, max_new)


def inference_model(backbone: Backbone, cfg: KavaConfig) -> Backbone:
    """What evaluation runs: with ``eval.merge_lora``, a copy with LoRA merged into the
    frozen weights (in their dtype, bf16 on CUDA), else ``backbone`` itself."""
    if not cfg.eval.merge_lora:
        return backbone
    return backbone.merged_copy()


@dataclass(frozen=True)
class Prediction:
    """What the model answered to one question."""

    text: str  # generated text, decoded without special tokens
    parsed: float | None  # the number parsed from it (``parse_prediction``)
    passes: int  # forward passes spent on the question
    generated_tokens: int


def make_generator(backbone: Backbone, cfg: KavaConfig) -> Generator:
    """The generator evaluation decodes with: on ``inference_model`` (a LoRA-merged copy
    with ``eval.merge_lora``), compiled passes, CUDA graphs and fused q/k/v on CUDA
    (``eval.compile``, ``eval.cuda_graphs``, ``eval.fused_qkv``). Reuse it across calls to
    keep its compiled graphs."""
    on_cuda = backbone.new_token_embeddings.device.type == "cuda"
    return Generator(
        inference_model(backbone, cfg),
        cuda_graphs=cfg.eval.cuda_graphs and on_cuda,
        compile=cfg.eval.compile and on_cuda,
        fused_qkv=cfg.eval.fused_qkv and on_cuda,
    )


def predict(
    backbone: Backbone,
    cfg: KavaConfig,
    questions: Sequence[Example | str],
    *,
    batch_size: int | None = None,
    generator: Generator | None = None,
    name: str = "predict",
    progress: bool = False,
    where: Shard | None = None,
) -> list[Prediction]:
    """Greedy-decode every question the way the method answers; results in input order.

    Questions are batched by length (longest first, ``batch_size`` defaults to
    ``cfg.eval.batch_size``) to limit padding. Runs in eval mode under ``no_grad`` on the
    device of ``backbone.new_token_embeddings`` with ``generator`` (default:
    ``make_generator(backbone, cfg)``, built for this call); the previous train/eval mode
    of ``backbone`` is restored.

    ``where`` (several processes, ``kava.parallel.current_shard``): this process decodes
    every ``world``-th of those batches, exactly the rows and padding one process gives
    them, and every process returns all predictions, gathered in input order.
    """
    n = len(questions)
    if n == 0:
        raise ValueError(f"{name}: no questions to answer")
    batch_size = batch_size or cfg.eval.batch_size
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompts = question_prompts(backbone, cfg, questions)
    order = sorted(range(n), key=lambda i: len(prompts.rows[i]), reverse=True)
    where = where or Shard()
    batches = shard([order[lo : lo + batch_size] for lo in range(0, n, batch_size)], where)
    device = backbone.new_token_embeddings.device
    generator = generator or make_generator(backbone, cfg)
    # a merged copy holds every weight in one dtype; the unmerged model mixes bf16 frozen
    # weights with fp32 LoRA on CUDA (no autocast weight cache: CUDA graphs)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
        if device.type == "cuda" and generator.bb is backbone
        else contextlib.nullcontext()
    )
    local: list[tuple[int, Prediction]] = []  # (input index, prediction) of this process
    with (
        backbone.eval_mode(),
        torch.no_grad(),
        autocast,
        tqdm(total=sum(map(len, batches)), desc=name, unit="q", disable=not progress) as bar,
    ):
        for idx in batches:
            gen = generate(generator, cfg, [prompts.rows[i] for i in idx], prompts.answer_prompt)
            for j, i in enumerate(idx):
                text = gen.texts[j]
                parsed = parse_prediction(text, cfg.method_spec.writes_cot, cfg.answer_prompt)
                local.append((i, Prediction(text, parsed, gen.passes[j], len(gen.tokens[j]))))
            bar.update(len(idx))
    return gather_in_order(local, n, where)


def evaluate(
    backbone: Backbone,
    cfg: KavaConfig,
    examples: Sequence[Example],
    *,
    batch_size: int | None = None,
    out_dir: str | Path | None = None,
    name: str = "eval",
    progress: bool = True,
    return_predictions: bool = False,
    generator: Generator | None = None,
    where: Shard | None = None,
) -> dict[str, Any]:
    """Greedy-decode every example (``predict``) and score it; return (and optionally
    write) the metrics.

    Decodes on a LoRA-merged copy (``eval.merge_lora``; ``backbone`` is left untouched)
    with compiled layer passes, CUDA graphs and fused q/k/v on CUDA (``eval.compile``,
    ``eval.cuda_graphs``, ``eval.fused_qkv``), unless a ``generator`` is given.

    With ``out_dir``: ``metrics.json`` and ``predictions.jsonl`` (one record per example
    in input order: index, question, gold, prediction, parsed, correct, passes,
    generated_tokens). ``return_predictions=True`` adds those records to the returned
    dict under ``"predictions"`` (never to ``metrics.json``).

    ``where``: decode on several processes (``predict``); every process returns the
    metrics of all examples, only the main one writes the files.
    """
    n = len(examples)
    if n == 0:
        raise ValueError(f"{name}: no examples to evaluate")
    start = time.perf_counter()
    preds = predict(
        backbone,
        cfg,
        examples,
        batch_size=batch_size,
        generator=generator,
        name=name,
        progress=progress,
        where=where,
    )
    seconds = time.perf_counter() - start
    records = [
        {
            "index": i,
            "question": ex.question,
            "gold": ex.answer,
            "prediction": p.text,
            "parsed": p.parsed,
            "correct": answers_match(p.parsed, ex.answer),
            "passes": p.passes,
            "generated_tokens": p.generated_tokens,
        }
        for i, (ex, p) in enumerate(zip(examples, preds))
    ]

    correct = sum(r["correct"] for r in records)
    metrics: dict[str, Any] = {
        "dataset": name,
        "method": cfg.method,
        "n": n,
        "accuracy": correct / n,
        "correct": correct,
        "mean_forward_passes": sum(r["passes"] for r in records) / n,
        "mean_generated_tokens": sum(r["generated_tokens"] for r in records) / n,
        "seconds": seconds,
        "questions_per_second": n / max(seconds, 1e-9),
    }
    if out_dir is not None and (where is None or where.is_main):
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        with (out / "predictions.jsonl").open("w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    if return_predictions:
        return {**metrics, "predictions": records}
    return metrics


SYNTHETIC_EVAL_SEED = 1_000_003


def load_eval_examples(name: str, cfg: KavaConfig, limit: int | None) -> list[Example]:
    """Examples of an evaluation dataset (a name, a file, a Hub id, or ``synthetic``)."""
    from kava.data import load_examples

    limit = limit if limit is not None else cfg.eval.limit
    # held-out synthetic problems: the test part (kava.data.synthetic_part, never a training
    # or validation problem) drawn from one fixed seed, the same for every run
    return load_examples(
        name,
        split="test",
        steps_format=cfg.data.steps_format,
        limit=limit,
        seed=SYNTHETIC_EVAL_SEED,
        synthetic_size=limit or 200,
        synthetic_steps=(cfg.data.synthetic_min_steps, cfg.data.synthetic_max_steps),
    )


def run_eval(
    backbone, cfg: KavaConfig, datasets, out: Path, limit=None, batch_size=None, progress=True
) -> list[dict]:
    """``evaluate`` each dataset into ``out/<dataset>/``; returns the metrics dicts."""

    results = []
    for name in datasets:
        examples = load_eval_examples(name, cfg, limit)
        m = evaluate(
            backbone,
            cfg,
            examples,
            batch_size=batch_size or cfg.eval.batch_size,
            out_dir=out / name.replace("/", "_"),
            name=name,
            progress=progress,
        )
        results.append(m)
    return results
