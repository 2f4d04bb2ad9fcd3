"""kava as an lm-evaluation-harness model, for real and offline: a local YAML task over a
local JSON file, a tiny checkpoint, lm-eval's own command line (python -m kava.lmeval)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import base_tokenizer, tiny_lm, tiny_run_config
from kava import LatentReasoner
from kava.cli import main
from kava.evaluate import load_eval_examples
from kava.lmeval import model as kava_lm  # noqa: E402
from kava.lmeval.__main__ import main as lmeval_main  # noqa: E402

N = 6


@pytest.fixture(scope="module")
def digit_checkpoint(tmp_path_factory, tokenizer):
    """A tiny checkpoint that answers with digits: its untied lm_head rows of "0".."9" are
    scaled up, so greedy decoding writes numbers (different ones per question)."""
    root = tmp_path_factory.mktemp("lmeval")
    base_tok = base_tokenizer(tokenizer)
    lm = tiny_lm("llama", len(base_tok), tie_word_embeddings=False)
    digits = [base_tok.convert_tokens_to_ids(str(d)) for d in range(10)]
    with torch.no_grad():
        lm.lm_head.weight[digits] *= 40.0
    lm.save_pretrained(root / "base")
    base_tok.save_pretrained(root / "base")
    cfg = tiny_run_config(root / "base", root / "run", train={"max_steps": 1, "eval_every": 0})
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(root / "cfg.yaml"), "--no-progress"]) == 0
    return root / "run" / "final"


def write_task(tmp_path, examples, parse_answer_task="kava_tiny"):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"question": q, "answer": a} for q, a in examples]))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    task = {
        "task": parse_answer_task,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{question}}",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": [], "max_gen_toks": 4},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        "num_fewshot": 0,
    }
    (tasks / f"{parse_answer_task}.yaml").write_text(yaml.safe_dump(task))
    return tasks


def test_lm_eval_exact_match_equals_kava_eval(digit_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    reasoner = LatentReasoner.from_pretrained(digit_checkpoint, device="cpu")
    questions = [e.question for e in load_eval_examples("synthetic", reasoner.config, N)]
    solved = reasoner.solve(questions, max_new_tokens=4)
    assert all(a is not None for a in solved.answers), solved.texts
    # gold = the model's own answer for every other question: accuracy 1/2 for both
    golds = [
        kava_lm.format_answer(a if i % 2 == 0 else a + 1) for i, a in enumerate(solved.answers)
    ]
    expected = reasoner.evaluate(
        [{"question": q, "answer": g} for q, g in zip(questions, golds)], max_new_tokens=4
    )
    assert expected["accuracy"] == 0.5

    tasks = write_task(tmp_path, list(zip(questions, golds)))
    out = tmp_path / "out"
    lmeval_main(
        [
            "--model_args",
            f"checkpoint={digit_checkpoint},parse_answer=true",
            "--device",
            "cpu",
            "--tasks",
            "kava_tiny",
            "--include_path",
            str(tasks),
            "--batch_size",
            "4",
            "--log_samples",
            "--output_path",
            str(out),
        ]
    )
    (results_file,) = out.rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]["kava_tiny"]
    assert results["exact_match,none"] == pytest.approx(expected["accuracy"])
    (samples_file,) = out.rglob("samples_kava_tiny_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert len(samples) == N
    by_question = {s["doc"]["question"]: s for s in samples}
    for q, a in zip(questions, solved.answers):
        assert by_question[q]["filtered_resps"] == [kava_lm.format_answer(a)]


class _Request:
    def __init__(self, context, gen_kwargs):
        self.args = (context, gen_kwargs)


def test_generate_until_texts_and_unsupported_requests(digit_checkpoint):
    lm = kava_lm.KavaLM(checkpoint=str(digit_checkpoint), device="cpu", batch_size="auto")
    questions = ["Tom has 3 apples and buys 2 more.", "Sam reads 5 pages a day for 4 days."]
    texts = lm.reasoner.generate(questions, max_new_tokens=3)
    stop = texts[0][1:2]
    reqs = [
        _Request(questions[0], {"until": [stop], "max_gen_toks": 3}),
        _Request(questions[1], {"max_gen_toks": 3}),
    ]
    assert lm.generate_until(reqs, disable_tqdm=True) == [texts[0][: texts[0].find(stop)], texts[1]]
    with pytest.raises(ValueError, match="greedily"):
        lm.generate_until([_Request(questions[0], {"do_sample": True})])
    for name in ("loglikelihood", "loglikelihood_rolling"):
        with pytest.raises(NotImplementedError, match="not supported for latent models"):
            getattr(lm, name)([_Request("q", "a")])


def test_truncate_at_the_first_stop():
    assert kava_lm.truncate("12 then 34\n", ["\n", "then"]) == "12 "
    assert kava_lm.truncate("12", []) == "12"
