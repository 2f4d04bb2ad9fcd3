"""Tests for kava.data on the real files in shared/data (see shared/data/README.md)."""

from __future__ import annotations

import ast
import json
import operator
import re
from pathlib import Path

import pytest

from kava import data as kd
from kava.data import DataError, Example

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared data directory; its absence is a failure, never a skip."""
    if not (DATA / "README.md").is_file():
        pytest.fail(f"shared data directory missing: expected the datasets under {DATA}")
    return DATA


def real(data_dir: Path, relative: str) -> Path:
    path = data_dir / relative
    if not path.is_file():
        pytest.fail(f"shared data file missing: {path}")
    return path


def deng_lines(path: Path) -> list[str]:
    """Non-blank raw lines of a Deng-format file (split on newlines only)."""
    return [line for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


# --------------------------------------------------------------------------- normalize


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (18, "18"),
        (18.0, "18"),
        ("18.0", "18"),
        ("1,234", "1234"),
        ("$5", "5"),
        (" 1,450,000 ", "1450000"),
        ("-3", "-3"),
        (2.5, "2.5"),
        ("0.50", "0.5"),
        (-0.0, "0"),
        (1e16, "10000000000000000"),
        (3244047.0999999996, "3244047.0999999996"),
    ],
)
def test_normalize_answer(value: object, expected: str) -> None:
    assert kd.normalize_answer(value, where="f.jsonl:3", field="answer") == expected


@pytest.mark.parametrize("value", ["abc", "", "12 apples", "nan", "inf", None, True, [1]])
def test_normalize_answer_rejects(value: object) -> None:
    with pytest.raises(DataError, match=r"f\.jsonl:3: field 'target': .* not a number"):
        kd.normalize_answer(value, where="f.jsonl:3", field="target")


# --------------------------------------------------------------------------- real files


def test_gsm8k_test_equation(data_dir: Path) -> None:
    examples = kd.read_gsm8k_jsonl(real(data_dir, "gsm8k/test.jsonl"))
    assert len(examples) == 1319
    janet = examples[0]
    assert janet.question.startswith("Janet’s ducks lay 16 eggs per day.")
    assert janet.steps == ("<<16-3-4=9>>", "<<9*2=18>>")
    assert janet.answer == "18"
    assert sum(not ex.steps for ex in examples) == 18  # solutions without annotations
    assert all("," not in ex.answer for ex in examples)


def test_gsm8k_test_nl(data_dir: Path) -> None:
    examples = kd.read_gsm8k_jsonl(real(data_dir, "gsm8k/test.jsonl"), steps_format="nl")
    assert examples[0].steps == (
        "Janet sells 16 - 3 - 4 = 9 duck eggs a day.",
        "She makes 9 * 2 = $18 every day at the farmer’s market.",
    )
    assert all(ex.steps for ex in examples)
    assert not any("<<" in s or ">>" in s or "####" in s for ex in examples for s in ex.steps)


def test_gsm8k_train(data_dir: Path) -> None:
    examples = kd.read_file(real(data_dir, "gsm8k/train.jsonl"))
    assert len(examples) == 7473
    assert examples[0].answer == "72"
    assert examples[0].steps == ("<<48/2=24>>", "<<48+24=72>>")


def test_deng_test_matches_gsm8k(data_dir: Path) -> None:
    deng = kd.read_deng_txt(real(data_dir, "gsm8k_aug/test.txt"))
    gsm8k = kd.read_gsm8k_jsonl(real(data_dir, "gsm8k/test.jsonl"))
    assert len(deng) == 1319
    assert sum(not ex.steps for ex in deng) == 18
    assert [ex.answer for ex in deng] == [ex.answer for ex in gsm8k]
    assert [ex.question for ex in deng] == [ex.question for ex in gsm8k]
    assert [ex.steps for ex in deng] == [ex.steps for ex in gsm8k]
    assert deng[0] == Example(gsm8k[0].question, ("<<16-3-4=9>>", "<<9*2=18>>"), "18")


def test_deng_valid(data_dir: Path) -> None:
    path = real(data_dir, "gsm8k_aug/valid.txt")
    examples = kd.read_deng_txt(path)
    assert len(examples) == 500
    assert examples[0].steps == ("<<4-2=2>>", "<<2/.5=4>>", "<<12/4=3>>", "<<100*3=300>>")
    assert examples[0].answer == "300"
    empty = [i for i, ex in enumerate(examples, start=1) if not ex.steps]
    assert empty == [90, 187, 328, 412, 446, 469]
    assert all(s.startswith("<<") and s.endswith(">>") for ex in examples for s in ex.steps)


def test_deng_nl_train(data_dir: Path) -> None:
    examples = kd.read_file(real(data_dir, "gsm8k_aug/train_no_aug.txt"))
    assert len(examples) == 6973
    assert examples[0].steps == (
        "The annual budget for policing is 32 / 2 = $16 million.",
        "The combined budget for education and policing is 16 + 12 = $28 million.",
        "There is 32 - 28 = $4 million to manage public spaces.",
    )
    assert examples[0].answer == "4"
    assert all(ex.steps for ex in examples)
    assert not any("<<" in s for ex in examples for s in ex.steps)
    # Line 4479 holds a U+2028 inside its question; it must stay one example.
    clive = examples[4478]
    assert clive.question.startswith("Clive opens a box") and "\u2028" in clive.question
    assert clive.answer == "36"


def test_deng_splits_cover_gsm8k_train(data_dir: Path) -> None:
    train = {ex.question for ex in kd.read_gsm8k_jsonl(real(data_dir, "gsm8k/train.jsonl"))}
    valid = [ex.question for ex in kd.read_deng_txt(real(data_dir, "gsm8k_aug/valid.txt"))]
    nl = [ex.question for ex in kd.read_deng_txt(real(data_dir, "gsm8k_aug/train_no_aug.txt"))]
    assert not set(valid) & set(nl)
    assert set(valid) | set(nl) == train


def test_svamp_both_files(data_dir: Path) -> None:
    svamp = kd.read_svamp_json(real(data_dir, "svamp/SVAMP.json"))
    pal = kd.read_file(real(data_dir, "svamp/svamp.jsonl"))
    assert len(svamp) == len(pal) == 1000
    assert svamp[0] == Example(
        "Each pack of dvds costs 76 dollars. If there is a discount of 25 dollars on each pack. "
        "How much do you have to pay to buy each pack?",
        (),
        "51",
    )
    assert [ex.answer for ex in svamp] == [ex.answer for ex in pal]
    assert [ex.question for ex in svamp] == [ex.question for ex in pal]
    assert kd.read_file(real(data_dir, "svamp/SVAMP.json")) == svamp


def test_gsm_hard(data_dir: Path) -> None:
    examples = kd.read_file(real(data_dir, "gsm_hard/gsmhardv2.jsonl"))
    assert len(examples) == 1319
    assert examples[0].answer == "-9867630"
    assert examples[0].steps == ()
    assert "4933828" in examples[0].question
    assert examples[7].answer == "3244047.0999999996"  # float targets kept as published


def test_multiarith_both_files(data_dir: Path) -> None:
    multi = kd.read_multiarith_json(real(data_dir, "multiarith/MultiArith.json"))
    pal = kd.read_file(real(data_dir, "multiarith/mawpsmultiarith.jsonl"))
    assert len(multi) == len(pal) == 600
    assert multi[0].question.startswith("For Halloween Debby and her sister")
    assert multi[0].question == multi[0].question.strip()
    assert multi[0].answer == "39"
    assert multi == pal
    assert kd.read_file(real(data_dir, "multiarith/MultiArith.json")) == multi


# --------------------------------------------------------------------------- load_examples


def test_load_examples_named(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAVA_DATA_DIR", str(data_dir))
    assert kd.data_root() == data_dir
    expected = {"gsm8k": 1319, "gsm-hard": 1319, "svamp": 1000, "multiarith": 600}
    for name, count in expected.items():
        assert len(kd.load_examples(name)) == count
    assert kd.load_examples("gsm8k-aug-valid", limit=3) == kd.load_examples("gsm8k-aug-valid")[:3]
    nl = kd.load_examples("gsm8k-train", steps_format="nl", limit=2)
    assert len(nl) == 2 and not any("<<" in s for ex in nl for s in ex.steps)
    path = str(real(data_dir, "gsm8k_aug/test.txt"))
    assert kd.load_examples(path, limit=1)[0].answer == "18"


def test_data_root_default(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KAVA_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert kd.data_root().resolve() == data_dir.resolve()
    (tmp_path / "data").mkdir()
    assert kd.data_root() == Path("data")


def test_load_examples_missing_named_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAVA_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match=r"svamp/SVAMP\.json.*KAVA_DATA_DIR"):
        kd.load_examples("svamp")


def test_load_examples_hub_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAVA_DATA_DIR", str(tmp_path))
    calls = []

    def fake_hub(name: str, split: str, steps_format: str, *, config: str | None) -> list[Example]:
        calls.append((name, config, split, steps_format))
        return [Example("q", (), "1")] * 5

    monkeypatch.setattr(kd, "load_hf_dataset", fake_hub)
    assert len(kd.load_examples("gsm8k-train", steps_format="nl", limit=2)) == 2
    assert calls == [("openai/gsm8k", "main", "train", "nl")]

    def offline(*args: object, **kwargs: object) -> list[Example]:
        raise ConnectionError("no network")

    monkeypatch.setattr(kd, "load_hf_dataset", offline)
    with pytest.raises(DataError, match=r"gsm8k/test\.jsonl.*no network"):
        kd.load_examples("gsm8k")


# --------------------------------------------------------------------------- Hub path


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the `datasets` cache for these tiny files inside tmp_path."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def write_records(path: Path, records: list[dict]) -> Path:
    if path.suffix == ".json":
        path.write_text(json.dumps(records), encoding="utf-8")
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
@pytest.mark.usefixtures("hf_cache")
def test_hf_whynlp_and_zen_schemas(data_dir: Path, tmp_path: Path, suffix: str) -> None:
    valid = kd.read_deng_txt(real(data_dir, "gsm8k_aug/valid.txt"))
    rows = valid[:4] + [valid[89]]  # valid line 90 has an empty CoT
    whynlp = [
        {"question": ex.question, "steps": list(ex.steps), "answer": ex.answer} for ex in rows
    ]
    zen = [{"question": ex.question, "cot": " ".join(ex.steps), "answer": ex.answer} for ex in rows]
    for schema, records in [("whynlp", whynlp), ("zen", zen)]:
        path = write_records(tmp_path / f"{schema}{suffix}", records)
        assert kd.load_hf_dataset(str(path)) == rows
        assert kd.read_file(path) == rows


@pytest.mark.usefixtures("hf_cache")
def test_hf_zen_nl_and_pal_schemas(data_dir: Path, tmp_path: Path) -> None:
    nl_lines = deng_lines(real(data_dir, "gsm8k_aug/train_no_aug.txt"))[:3]
    zen_nl = []
    for line in nl_lines:
        question, rest = line.split("||")
        cot, answer = rest.rsplit("####", 1)
        zen_nl.append({"question": question, "cot": cot.strip(), "answer": answer.strip()})
    path = write_records(tmp_path / "zen_nl.json", zen_nl)
    expected = kd.read_deng_txt(real(data_dir, "gsm8k_aug/train_no_aug.txt"))[:3]
    assert kd.load_hf_dataset(str(path)) == expected

    pal_lines = real(data_dir, "svamp/svamp.jsonl").read_text(encoding="utf-8").split("\n")[:3]
    path = tmp_path / "svamp_head.jsonl"
    path.write_text("\n".join(pal_lines), encoding="utf-8")
    loaded = kd.load_hf_dataset(str(path))
    assert loaded == kd.read_svamp_json(real(data_dir, "svamp/SVAMP.json"))[:3]


@pytest.mark.usefixtures("hf_cache")
def test_hf_gsm8k_schema_and_error(data_dir: Path, tmp_path: Path) -> None:
    lines = real(data_dir, "gsm8k/test.jsonl").read_text(encoding="utf-8").split("\n")[:2]
    path = tmp_path / "gsm8k_head.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    loaded = kd.load_hf_dataset(str(path), steps_format="nl")
    assert loaded == kd.read_gsm8k_jsonl(real(data_dir, "gsm8k/test.jsonl"), "nl")[:2]

    bad = write_records(
        tmp_path / "bad_rows.jsonl",
        [{"question": "a?", "steps": [], "answer": "1"}, {"question": "b?", "steps": []}],
    )
    with pytest.raises(DataError, match=r"bad_rows\.jsonl\[train\] row 2: field 'answer'"):
        kd.load_hf_dataset(str(bad))


# --------------------------------------------------------------------------- from_record


def test_from_record_schemas() -> None:
    gsm8k = {
        "question": "Q?",
        "answer": "Add 2+3 = <<2+3=5>>5.\n\nDouble it: <<5*2=10>>10\n#### 10",
    }
    assert kd.from_record(gsm8k, where="x:1") == Example("Q?", ("<<2+3=5>>", "<<5*2=10>>"), "10")
    nl = kd.from_record(gsm8k, where="x:1", steps_format="nl")
    assert nl.steps == ("Add 2+3 = 5.", "Double it: 10")
    assert kd.from_record({"input": " Q? ", "target": 3.0}, where="x:1") == Example("Q?", (), "3")
    assert kd.from_record({"question": "Q?", "answer": 7}, where="x:1") == Example("Q?", (), "7")
    zen_nl = {"question": "Q?", "cot": "He has 2+3 = 5. Then 5*2 = 10!", "answer": "10"}
    assert kd.from_record(zen_nl, where="x:1").steps == ("He has 2+3 = 5.", "Then 5*2 = 10!")
    with pytest.raises(ValueError, match="steps_format"):
        kd.from_record(gsm8k, where="x:1", steps_format="latex")


# --------------------------------------------------------------------------- malformed input


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_error_missing_field(tmp_path: Path) -> None:
    path = write(
        tmp_path, "miss.jsonl", '{"question": "a?", "answer": "#### 1"}\n{"question": "b?"}\n'
    )
    with pytest.raises(DataError, match=r"miss\.jsonl:2: field 'answer': missing"):
        kd.read_file(path)
    path = write(tmp_path, "noq.jsonl", '\n{"steps": [], "answer": "1"}\n')
    with pytest.raises(DataError, match=r"noq\.jsonl:2: field 'question': missing"):
        kd.read_file(path)
    path = write(tmp_path, "svamp_bad.json", json.dumps([{"Body": "A.", "Question": "B?"}] * 2))
    with pytest.raises(DataError, match=r"svamp_bad\.json record 1: field 'Answer': missing"):
        kd.read_svamp_json(path)


def test_error_non_numeric_answer(tmp_path: Path) -> None:
    path = write(tmp_path, "gsm.jsonl", '{"question": "a?", "answer": "x <<1+1=2>>2\\n#### two"}\n')
    with pytest.raises(DataError, match=r"gsm\.jsonl:1: field 'answer': 'two' is not a number"):
        kd.read_gsm8k_jsonl(path)
    path = write(tmp_path, "deng.txt", "a?||<<1+1=2>> #### 2\nb?||<<1+1=2>> #### many\n")
    with pytest.raises(DataError, match=r"deng\.txt:2: field 'answer': 'many' is not a number"):
        kd.read_file(path)
    path = write(tmp_path, "pal.jsonl", '{"input": "a?", "target": "n/a"}')
    with pytest.raises(DataError, match=r"pal\.jsonl:1: field 'target'"):
        kd.read_file(path)


@pytest.mark.parametrize(("name", "text"), [("e.jsonl", ""), ("e.txt", "\n\n"), ("e.json", "[]")])
def test_error_empty_file(tmp_path: Path, name: str, text: str) -> None:
    path = write(tmp_path, name, text)
    with pytest.raises(DataError, match=re.escape(f"{path}: no examples")):
        kd.read_file(path)


def test_error_bad_json(tmp_path: Path) -> None:
    good = '{"input": "a?", "target": 1}\n'
    path = write(tmp_path, "broken.jsonl", good + good + '{"input": "c?", "target": \n')
    with pytest.raises(DataError, match=r"broken\.jsonl:3: invalid JSON"):
        kd.read_file(path)
    path = write(tmp_path, "broken.json", '[\n {"input": "a?", "target": 1},\n {"input": }\n]')
    with pytest.raises(DataError, match=r"broken\.json:3: invalid JSON"):
        kd.read_file(path)


def test_error_deng_separators(tmp_path: Path) -> None:
    path = write(tmp_path, "d.txt", "a?||<<1+1=2>> #### 2\nb?||<<1+1=2>> 2\n")
    with pytest.raises(DataError, match=r"d\.txt:2: field 'answer': no '####'"):
        kd.read_deng_txt(path)
    path = write(tmp_path, "q.txt", "a?||<<1+1=2>> #### 2\n\nb? <<1+1=2>> #### 2\n")
    with pytest.raises(DataError, match=r"q\.txt:3: field 'cot': no '\|\|'"):
        kd.read_deng_txt(path)
    path = write(tmp_path, "x.csv", "a,b\n")
    with pytest.raises(DataError, match=r"x\.csv: unsupported file extension"):
        kd.read_file(path)


# --------------------------------------------------------------------------- synthetic

_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}
_STEP = re.compile(r"<<([0-9+\-*/ ]+)=(\d+)>>")


def evaluate(expr: str) -> float:
    """Evaluate integer arithmetic with + - * / only (no names, calls or other nodes)."""

    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        raise ValueError(f"unsupported expression: {expr!r}")

    return walk(ast.parse(expr, mode="eval").body)


def test_synthetic_deterministic() -> None:
    first = kd.synthetic_examples(200, seed=7)
    assert first == kd.synthetic_examples(200, seed=7)
    other = kd.synthetic_examples(200, seed=8)
    assert sum(a != b for a, b in zip(first, other)) > 150
    assert kd.load_examples("synthetic", seed=7, synthetic_size=200) == first
    assert kd.load_examples("synthetic", seed=7, synthetic_size=200, limit=5) == first[:5]


@pytest.mark.parametrize(("min_steps", "max_steps"), [(2, 4), (1, 1), (5, 6)])
def test_synthetic_steps_are_correct(min_steps: int, max_steps: int) -> None:
    examples = kd.synthetic_examples(300, seed=1, min_steps=min_steps, max_steps=max_steps)
    assert len(examples) == 300
    counts = {len(ex.steps) for ex in examples}
    assert counts == set(range(min_steps, max_steps + 1))
    for ex in examples:
        first = re.match(r"<<(\d+)", ex.steps[0]).group(1)
        assert re.search(rf"\b{first}\b", ex.question.split(".")[0])  # opening sentence
        previous = None
        for step in ex.steps:
            match = _STEP.fullmatch(step)
            assert match, step
            expr, result = match.group(1), int(match.group(2))
            assert evaluate(expr) == result, step
            assert 0 <= result < 1000
            left, sign, right = re.fullmatch(r"(\d+)([-+*/])(\d+)", expr).groups()
            assert previous is None or int(left) == previous  # each step uses the last result
            assert (1 <= int(right) <= 20) if sign in "+-" else (2 <= int(right) <= 5)
            assert re.search(rf"\b{right}\b", ex.question), (right, ex.question)
            previous = result
        assert ex.answer == str(previous)
        assert ex.question.endswith("now?")


def test_synthetic_variety_and_args() -> None:
    examples = kd.synthetic_examples(300, seed=3)
    items = {re.search(r"How many (\w+)", ex.question).group(1) for ex in examples}
    assert len(items) >= 8  # several scenes and objects
    assert {re.search(r"[-+*/]", s).group() for ex in examples for s in ex.steps} == set("+-*/")
    assert kd.synthetic_examples(0) == []
    with pytest.raises(ValueError):
        kd.synthetic_examples(5, min_steps=3, max_steps=2)


def test_synthetic_parts_never_share_a_question() -> None:
    """Training, validation and held-out test problems are disjoint whatever the seeds:
    the validation draw of seed 0 (train.seed + 1_000_003) and the test draw (1_000_003)
    once were the same problems."""
    parts = {
        "train": kd.synthetic_examples(2000, 0, 2, 2, part="train"),
        "validation": kd.synthetic_examples(300, 1_000_003, 2, 2, part="validation"),
        "test": kd.synthetic_examples(300, 1_000_003, 2, 2, part="test"),
    }
    questions = {name: {e.question for e in ex} for name, ex in parts.items()}
    assert not questions["train"] & questions["validation"]
    assert not questions["train"] & questions["test"]
    assert not questions["validation"] & questions["test"]
    for name, ex in parts.items():
        assert {kd.synthetic_part(e.question) for e in ex} == {name}
    # the part is load_examples' split; one outside the three is refused, naming the key
    val = kd.load_examples(
        "synthetic", split="validation", seed=1_000_003, synthetic_size=300, synthetic_steps=(2, 2)
    )
    assert val == parts["validation"]
    with pytest.raises(kd.DataError, match="data.train_split"):
        kd.load_examples("synthetic", split="dev")


def test_synthetic_validation_is_not_the_held_out_test_set() -> None:
    from kava.config import load_config
    from kava.evaluate import load_eval_examples
    from kava.train import load_validation_examples

    over = ["train.eval_every=10", "train.eval_dataset=synthetic", "train.eval_limit=100"]
    cfg = load_config("demo", over)
    val, test = load_validation_examples(cfg), load_eval_examples("synthetic", cfg, 1000)
    assert len(val) == 100 and len(test) == 1000
    assert not {e.question for e in val} & {e.question for e in test}
