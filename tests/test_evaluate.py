"""Answer parsing and end-to-end evaluation on tiny random backbones (CPU, offline)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import EXAMPLES
from kava.config import load_config
from kava.data import Example
from kava.evaluate import (
    answers_match,
    evaluate,
    extract_answer,
    parse_prediction,
    question_prompts,
)

METRIC_KEYS = {
    "dataset",
    "method",
    "n",
    "accuracy",
    "correct",
    "mean_forward_passes",
    "mean_generated_tokens",
    "seconds",
    "questions_per_second",
}
RECORD_KEYS = {
    "index",
    "question",
    "gold",
    "prediction",
    "parsed",
    "correct",
    "passes",
    "generated_tokens",
}
METHODS = ["kava", "codi", "cot", "nocot", "icot", "coconut"]
MAX_NEW, COT_MAX_NEW = 5, 9
INIT_RANGE = 0.3  # random models whose outputs depend on the question


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


def config(method: str, merge_lora: bool = True):
    return load_config(
        overrides=[
            f"method={method}",
            "latent.num_latents=3",
            "latent.num_iterations=1",
            "coconut.max_latent_stage=2",  # 2 x 2 thoughts at evaluation
            f"eval.max_new_tokens={MAX_NEW}",
            f"eval.cot_max_new_tokens={COT_MAX_NEW}",
            f"eval.merge_lora={str(merge_lora).lower()}",
        ]
    )


def examples() -> list[Example]:
    """Conftest problems plus a very short and a very long question (different lengths)."""
    out = [Example(q, tuple(s), a) for q, s, a in EXAMPLES]
    out.insert(1, Example("Add 2 and 3.", ("<<2+3=5>>",), "5"))
    long_q = " ".join(["Ann has 4 red pens and 6 blue pens in her bag."] * 6) + " How many pens?"
    out.insert(3, Example(long_q, ("<<4+6=10>>",), "10"))
    return out


def read_predictions(path) -> list[dict]:
    return [json.loads(line) for line in (path / "predictions.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is: 18", 18.0),
        (" <<7+5=12>> The answer is: 12. So the answer is 12", 12.0),
        ("The answer is: 3. Wait. The answer is: 4", 4.0),  # last prompt wins
        ("The answer is: 7 apples and 9 pears", 7.0),  # first number after the last prompt
        ("The answer is: 1,234", 1234.0),
        ("The answer is: $1,234,567.50.", 1234567.5),
        ("The answer is: -3", -3.0),
        ("The answer is:-3", -3.0),
        ("The answer is: 2.5", 2.5),
        ("The answer is: .5", 0.5),
        ("The answer is: \u22127", -7.0),  # Unicode minus sign
        ("The answer is: 18.", 18.0),  # sentence end, not a decimal point
        ("She has 5 apples, then 8 apples, so 13", 13.0),  # no prompt: last number
        ("<<12-3=9>> <<9*2=18>>", 18.0),
        ("5-3 is two", 3.0),  # a hyphen between digits is not a minus sign
        ("values 1,2,3", 3.0),  # not thousands grouping
        ("no number here", None),
        ("The answer is: none", None),
        ("", None),
        ("<<2+3=5>> The answer is: unknown", 5.0),  # prompt without a number: last number
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_custom_prompt():
    assert extract_answer("Result: 4. Final: 7, Result: 9", "Result:") == 9.0
    assert extract_answer("Result: 4 The answer is: 7", "The answer is:") == 7.0


def test_parse_prediction_prepends_prompt_for_answer_only_methods():
    # latent / No-CoT generations start right after the prompt: the first number counts
    assert parse_prediction(" 12 and then 40", writes_cot=False) == 12.0
    # CoT writes the prompt itself; without it the last number counts
    assert parse_prediction(" <<3*4=12>> The answer is: 12", writes_cot=True) == 12.0
    assert parse_prediction(" <<3*4=12>> and then 40", writes_cot=True) == 40.0


@pytest.mark.parametrize(
    ("pred", "gold", "expected"),
    [
        (18.0, "18", True),
        (18.00005, "18", True),
        (18.0002, "18", False),
        (-3.0, "-3", True),
        (3.0, "-3", False),
        (2.5, "2.5", True),
        (1234.0, "1,234", True),
        (None, "18", False),
        (float("nan"), "18", False),
    ],
)
def test_answers_match(pred, gold, expected):
    assert answers_match(pred, gold) is expected


# --------------------------------------------------------------------------- prompts


@pytest.mark.parametrize("method", METHODS)
def test_question_prompts(make_backbone, method):
    bb = make_backbone()
    cfg = config(method)
    exs = examples()
    prompts = question_prompts(bb, cfg, exs)
    tok = bb.tokenizer
    assert prompts.answer_prompt == tok(" The answer is:", add_special_tokens=False).input_ids
    for ex, row in zip(exs, prompts.rows):
        question = tok(ex.question, add_special_tokens=False).input_ids
        bos = [bb.ids.bos] if bb.ids.bos is not None else []
        tail = {  # what the method's eval_prompt field asks for, written out
            "kava": [bb.ids.bot],
            "codi": [bb.ids.bot],
            "coconut": [bb.ids.bot],
            "cot": [],
            "nocot": prompts.answer_prompt,
            "icot": prompts.answer_prompt,
        }[method]
        assert row == bos + question + tail


# --------------------------------------------------------------------------- evaluate


@pytest.mark.parametrize("method", METHODS)
def test_evaluate_writes_consistent_outputs(make_backbone, tmp_path, method):
    bb = make_backbone(init_range=INIT_RANGE)
    cfg = config(method)
    exs = examples()
    metrics = evaluate(bb, cfg, exs, batch_size=2, out_dir=tmp_path, name="toy", progress=False)

    assert set(metrics) == METRIC_KEYS
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert metrics["dataset"] == "toy" and metrics["method"] == method
    assert metrics["n"] == len(exs)
    preds = read_predictions(tmp_path)
    assert len(preds) == len(exs)
    for i, (ex, rec) in enumerate(zip(exs, preds)):
        assert set(rec) == RECORD_KEYS
        # original order although batches are sorted by length
        assert rec["index"] == i and rec["question"] == ex.question and rec["gold"] == ex.answer
        assert rec["parsed"] == parse_prediction(rec["prediction"], method == "cot")
        assert rec["correct"] == answers_match(rec["parsed"], ex.answer)
        n_gen = rec["generated_tokens"]
        assert 1 <= n_gen <= (COT_MAX_NEW if method == "cot" else MAX_NEW)
        if method == "coconut":  # question pass + 3 thought passes + final pass (1st token)
            assert rec["passes"] == 4 + n_gen
        elif cfg.is_latent:  # pass 0 + T iterations + prompt pass (1st token) + 1 per further
            assert rec["passes"] == 1 + cfg.effective_iterations + n_gen
        else:  # prefill (1st token) + 1 per further token
            assert rec["passes"] == n_gen
    correct = sum(r["correct"] for r in preds)
    assert metrics["correct"] == correct
    assert metrics["accuracy"] == pytest.approx(correct / len(exs))
    assert metrics["mean_forward_passes"] == pytest.approx(
        sum(r["passes"] for r in preds) / len(exs)
    )
    assert metrics["mean_generated_tokens"] == pytest.approx(
        sum(r["generated_tokens"] for r in preds) / len(exs)
    )
    assert metrics["seconds"] > 0 and metrics["questions_per_second"] > 0


def test_codi_uses_sequential_iterations(make_backbone):
    bb = make_backbone()
    cfg = config("codi")
    assert cfg.effective_iterations == cfg.latent.num_latents == 3
    metrics = evaluate(bb, cfg, examples()[:2], progress=False)
    assert metrics["mean_forward_passes"] == 1 + 3 + metrics["mean_generated_tokens"]


@pytest.mark.parametrize(
    ("method", "arch", "eos_bonus"),
    [
        ("kava", "llama", None),
        ("kava", "qwen2", None),
        ("cot", "llama", None),
        ("nocot", "qwen2", None),
        ("kava", "llama", 2.0),
        ("cot", "llama", 1.0),
        ("nocot", "qwen2", 2.0),
        ("coconut", "llama", None),
        ("coconut", "qwen2", 2.0),
        ("icot", "llama", None),
    ],
)
def test_batching_does_not_change_predictions(make_backbone, tmp_path, method, arch, eos_bonus):
    """One left-padded batch of very different lengths == one question at a time.

    With ``eos_bonus`` the rows stop at different steps, so finished rows are masked
    while the others go on decoding.
    """
    bb = make_backbone(arch, init_range=INIT_RANGE)
    if eos_bonus is not None:
        numbers_only(bb, eos_bonus)
    cfg = config(method, merge_lora=eos_bonus is None)  # numbers_only patches this instance
    exs = examples()
    lens = [len(r) for r in question_prompts(bb, cfg, exs).rows]
    assert max(lens) > 3 * min(lens)
    evaluate(bb, cfg, exs, batch_size=len(exs), out_dir=tmp_path / "one", progress=False)
    evaluate(bb, cfg, exs, batch_size=1, out_dir=tmp_path / "each", progress=False)
    batched, single = read_predictions(tmp_path / "one"), read_predictions(tmp_path / "each")
    assert len({r["prediction"] for r in batched}) > 1  # the outputs depend on the question
    if eos_bonus is not None:
        assert len({r["generated_tokens"] for r in batched}) > 1
    for b, s in zip(batched, single):
        for key in ("index", "prediction", "parsed", "passes", "generated_tokens"):
            assert b[key] == s[key], (key, b["index"])


def numbers_only(bb, eos_bonus: float | None = None):
    """Mask the logits to digits (and eos, raised by ``eos_bonus``, if given) of this
    backbone instance (evaluate with ``eval.merge_lora=false``: a merged copy would not
    carry the patch).

    Generations are then always numbers; with eos allowed, rows stop at different steps.
    """
    allowed = torch.zeros(bb.lm_head.weight.shape[0], dtype=torch.bool)
    allowed[bb.tokenizer.convert_tokens_to_ids([str(d) for d in range(10)])] = True
    bonus = torch.zeros(allowed.shape)
    if eos_bonus is not None:
        allowed[bb.ids.eos] = True
        bonus[bb.ids.eos] = eos_bonus
    logits = bb.logits
    bb.logits = lambda hidden: (logits(hidden) + bonus).masked_fill(~allowed, float("-inf"))
    return bb


@pytest.mark.parametrize("method", ["kava", "cot", "nocot"])
def test_accuracy_follows_gold(make_backbone, tmp_path, method):
    """Gold = what the model writes -> accuracy 1.0; gold off by one -> 0.0; half -> 0.5."""
    bb = numbers_only(make_backbone(init_range=INIT_RANGE))
    cfg = config(method, merge_lora=False)  # numbers_only patches this instance
    exs = examples()[:4]
    evaluate(bb, cfg, exs, out_dir=tmp_path, progress=False)
    parsed = [r["parsed"] for r in read_predictions(tmp_path)]
    assert all(p is not None and p == int(p) for p in parsed)
    assert len(set(parsed)) > 1  # golds differ, so a mix-up of rows would show

    right = [Example(e.question, e.steps, str(int(p))) for e, p in zip(exs, parsed)]
    wrong = [Example(e.question, e.steps, str(int(p) + 1)) for e, p in zip(exs, parsed)]
    m = evaluate(bb, cfg, right, out_dir=tmp_path / "right", progress=False)
    assert m["accuracy"] == 1.0 and m["correct"] == len(exs)
    assert all(r["correct"] for r in read_predictions(tmp_path / "right"))
    m = evaluate(bb, cfg, wrong, progress=False)
    assert m["accuracy"] == 0.0 and m["correct"] == 0
    mixed = [r if i % 2 else w for i, (r, w) in enumerate(zip(right, wrong))]
    m = evaluate(bb, cfg, mixed, batch_size=3, out_dir=tmp_path / "mixed", progress=False)
    assert m["accuracy"] == 0.5
    assert [r["correct"] for r in read_predictions(tmp_path / "mixed")] == [False, True] * 2


def test_evaluate_restores_mode_and_rejects_empty(make_backbone):
    bb = make_backbone()
    bb.train()
    evaluate(bb, config("nocot"), examples()[:2], progress=False)
    assert bb.training
    bb.eval()
    evaluate(bb, config("nocot"), examples()[:2], progress=False)
    assert not bb.training
    with pytest.raises(ValueError, match="no examples"):
        evaluate(bb, config("kava"), [], progress=False)


def test_return_predictions(make_backbone, tmp_path):
    bb = make_backbone(init_range=INIT_RANGE)
    exs = examples()
    m = evaluate(bb, config("kava"), exs, out_dir=tmp_path, progress=False, return_predictions=True)
    assert set(m) == METRIC_KEYS | {"predictions"}
    assert m["predictions"] == read_predictions(tmp_path)
    assert set(json.loads((tmp_path / "metrics.json").read_text())) == METRIC_KEYS


@pytest.mark.parametrize(("method", "arch"), [("kava", "llama"), ("cot", "qwen2")])
def test_merged_lora_copy_predicts_what_the_adapters_do(make_backbone, tmp_path, method, arch):
    """eval.merge_lora evaluates a merged copy: same predictions, trained weights untouched."""
    bb = make_backbone(arch, init_range=INIT_RANGE)
    before = {n: p.detach().clone() for n, p in bb.named_parameters()}
    exs = examples()
    evaluate(bb, config(method, True), exs, out_dir=tmp_path / "m", progress=False)
    evaluate(bb, config(method, False), exs, out_dir=tmp_path / "u", progress=False)
    merged, plain = read_predictions(tmp_path / "m"), read_predictions(tmp_path / "u")
    assert len({r["prediction"] for r in plain}) > 1
    assert [r["prediction"] for r in merged] == [r["prediction"] for r in plain]
    assert [r["passes"] for r in merged] == [r["passes"] for r in plain]
    after = dict(bb.named_parameters())
    assert any("lora_B" in n for n in after)
    for n, p in after.items():
        assert torch.equal(p, before[n]), n
    copy = bb.merged_copy()
    assert not any("lora" in n for n, _ in copy.named_parameters())
