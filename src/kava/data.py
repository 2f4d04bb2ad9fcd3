"""Math word-problem datasets as a list of ``Example`` records.

Supported sources (see ``shared/data/README.md`` for the files):

* Deng et al. text files ``question||cot #### answer`` (``gsm8k_aug/*.txt``);
* original GSM8k JSONL ``{question, answer: "...\\n#### N"}``;
* Hub schemas: whynlp/gsm8k-aug ``{question, steps, answer}``, zen-E/GSM8k-Aug(-NL)
  ``{question, cot, answer}``, PAL-style ``{input, target}`` (SVAMP, GSM-Hard, MultiArith);
* MetaMathQA ``{query, response, type}`` (meta-math/MetaMathQA): steps = the sentences
  of ``response`` before "The answer is:", the answer after it; rows are kept by
  ``type`` (``metamath_types``; others are counted and reported);
* SVAMP.json and MultiArith.json lists;
* a seeded synthetic generator of small multi-step arithmetic problems.

Every parse error is a ``DataError`` whose message names the file (or dataset id), the
1-based line/record/row, and the field.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STEPS_FORMATS = ("equation", "nl")
# MetaMathQA's GSM8k-derived types (numeric answers); its MATH_* types hold LaTeX answers
METAMATH_NUMERIC_TYPES = ("GSM_AnsAug", "GSM_Rephrased", "GSM_SV", "GSM_FOBAR")
METAMATH_ANSWER_MARKER = "The answer is:"

NAMED: dict[str, str] = {
    "gsm8k": "gsm8k/test.jsonl",
    "gsm8k-train": "gsm8k/train.jsonl",
    "gsm-hard": "gsm_hard/gsmhardv2.jsonl",
    "svamp": "svamp/SVAMP.json",
    "multiarith": "multiarith/MultiArith.json",
    "gsm8k-aug-valid": "gsm8k_aug/valid.txt",
    "gsm8k-aug-test": "gsm8k_aug/test.txt",
    "gsm8k-nl-train": "gsm8k_aug/train_no_aug.txt",
}

# Named training sets derived from another named set by removing the questions of a
# held-out one (matched on whitespace-normalized text): name -> (source, held out, steps
# format, which overrides data.steps_format). Both hold the 6,973 GSM8k train questions that
# are not in GSM8k-Aug's validation split: with the <<...>> equation traces of
# gsm8k/train.jsonl (the GSM8k-Aug format) or the natural-language ones of train_no_aug.txt.
HELD_OUT: dict[str, tuple[str, str, str]] = {
    "gsm8k-train-eq": ("gsm8k-train", "gsm8k-aug-valid", "equation"),
    "gsm8k-train-nl": ("gsm8k-nl-train", "gsm8k-aug-valid", "nl"),
}

# Test sets: reported once, never used to choose a checkpoint or a hyperparameter.
TEST_SETS = ("gsm8k", "gsm8k-aug-test", "svamp", "gsm-hard", "multiarith")


def test_set_of(spec: str) -> str | None:
    """The test set (``TEST_SETS``) that ``spec`` names or whose file it is (the same file
    under ``data_root()``, however the path is written), else None."""
    if spec in TEST_SETS:
        return spec
    path = Path(spec)
    if not path.is_file():
        return None
    for name in TEST_SETS:
        named = data_root() / NAMED[name] if name in NAMED else None
        if named is not None and named.is_file() and named.resolve() == path.resolve():
            return name
    return None


# Named sets that can also be loaded from the Hub: name -> (dataset id, config, split).
HUB_FALLBACK: dict[str, tuple[str, str, str]] = {
    "gsm8k": ("openai/gsm8k", "main", "test"),
    "gsm8k-train": ("openai/gsm8k", "main", "train"),
}

_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")  # 1,234 / -12,345.5
_ANNOTATION = re.compile(r"<<.*?>>")  # GSM8k calculator annotation, e.g. "<<16-3-4=9>>"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")  # whitespace after end punctuation


@dataclass(frozen=True)
class Example:
    """One math word problem."""

    question: str
    steps: tuple[str, ...]  # chain-of-thought steps; () for eval-only sets or an empty CoT
    answer: str  # normalized number string: "18", "-3", "2.5"


class DataError(ValueError):
    """Malformed data; the message names the file or dataset, the 1-based line/row, the field."""


class SkippedRecord(Exception):
    """A well-formed record that a filter leaves out (counted and reported by the reader)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------- helpers


def normalize_answer(value: Any, *, where: str, field: str) -> str:
    """Return ``value`` as a canonical number string ("1,234" -> "1234", 18.0 -> "18").

    Accepts ints, floats and strings with optional thousands commas and a leading "$".
    Integral values are written without a decimal point; others without trailing zeros.
    """
    error = DataError(f"{where}: field '{field}': {value!r} is not a number")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise error
    text = repr(value) if isinstance(value, float) else str(value)
    text = text.strip().replace("\u2212", "-").replace("$", "")  # Unicode minus, as generations
    if "," in text:
        if not _THOUSANDS.fullmatch(text):  # "1.234,5", "1,5", "12,34": which is meant?
            raise DataError(
                f"{where}: field '{field}': {value!r} is ambiguous: a comma is accepted only "
                "as a thousands separator (1,234 or 1,234.5)"
            )
        text = text.replace(",", "")
    try:
        number = Decimal(text)
    except InvalidOperation:
        raise error from None
    if not number.is_finite():
        raise error
    if number == number.to_integral_value():
        return str(int(number))
    return format(number.normalize(), "f")


def _check_steps_format(steps_format: str) -> None:
    if steps_format not in STEPS_FORMATS:
        raise ValueError(f"steps_format must be one of {STEPS_FORMATS}, got {steps_format!r}")


def _require_str(rec: dict, key: str, where: str) -> str:
    """Return ``rec[key]`` stripped; it must be a non-empty string."""
    if key not in rec or rec[key] is None:
        raise DataError(f"{where}: field '{key}': missing")
    value = rec[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}': expected a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field '{key}': empty")
    return value.strip()


def _require(rec: dict, key: str, where: str) -> Any:
    """Return ``rec[key]``; it must be present and not ``None``."""
    if key not in rec or rec[key] is None:
        raise DataError(f"{where}: field '{key}': missing")
    return rec[key]


def split_cot(cot: str) -> tuple[str, ...]:
    """Split a CoT string into steps.

    If it contains ``<<`` annotations, the steps are those annotations in order (brackets
    kept). Otherwise it is natural language and each sentence is a step.
    """
    cot = cot.strip()
    if "<<" in cot:
        return tuple(_ANNOTATION.findall(cot))
    return tuple(s.strip() for s in _SENTENCE_END.split(cot) if s.strip())


def _parse_gsm8k_solution(
    solution: str, *, where: str, steps_format: str
) -> tuple[tuple[str, ...], str]:
    """Split a GSM8k ``answer`` field (solution lines + ``#### N``) into (steps, answer)."""
    body, sep, final = solution.rpartition("####")
    if not sep:
        raise DataError(f"{where}: field 'answer': no '####' final-answer marker")
    answer = normalize_answer(final.strip(), where=where, field="answer")
    if steps_format == "equation":
        return tuple(_ANNOTATION.findall(body)), answer
    lines = (" ".join(_ANNOTATION.sub("", line).split()) for line in body.split("\n"))
    return tuple(line for line in lines if line), answer


# --------------------------------------------------------------------------- records


def _metamath_record(rec: dict, where: str, types: Sequence[str]) -> Example:
    """One MetaMathQA row; ``SkippedRecord`` when its ``type`` is not in ``types``."""
    kind = rec.get("type")
    if types and kind not in types:
        raise SkippedRecord(f"MetaMathQA type {kind} (not in data.metamath_types)")
    question = _require_str(rec, "query", where)
    response = _require_str(rec, "response", where)
    body, sep, final = response.rpartition(METAMATH_ANSWER_MARKER)
    if not sep:
        raise DataError(
            f"{where}: field 'response': no {METAMATH_ANSWER_MARKER!r} before the answer"
        )
    answer = normalize_answer(final.strip(), where=where, field="response")
    lines = (line.strip() for line in body.split("\n"))
    steps = tuple(s.strip() for line in lines for s in _SENTENCE_END.split(line) if s.strip())
    return Example(question, steps, answer)


def from_record(
    rec: dict,
    *,
    where: str,
    steps_format: str = "equation",
    metamath_types: Sequence[str] = METAMATH_NUMERIC_TYPES,
) -> Example:
    """Convert one JSON/Hub record to an ``Example``; ``where`` (e.g. "f.jsonl:12") goes in errors.

    Schemas, checked in this order:

    * ``{query, response, type}`` (MetaMathQA), kept by ``metamath_types``;
    * ``{input, target}`` (PAL svamp/gsmhardv2/mawpsmultiarith) -> no steps;
    * ``{question, steps: list[str], answer}`` (whynlp/gsm8k-aug);
    * ``{question, cot: str, answer}`` (zen-E/GSM8k-Aug, -NL), cot split by ``split_cot``;
    * ``{question, answer: "solution\\n#### N"}`` (GSM8k), steps per ``steps_format``;
    * ``{question, answer: number}`` -> no steps.

    Keys whose value is ``None`` count as absent: ``datasets`` fills columns that a row
    lacks with ``None``.
    """
    _check_steps_format(steps_format)
    if not isinstance(rec, dict):
        raise DataError(f"{where}: record: expected a JSON object, got {type(rec).__name__}")
    present = {key for key, value in rec.items() if value is not None}
    if "query" in present and "response" in present:
        return _metamath_record(rec, where, metamath_types)
    if "input" in present or "target" in present:
        question = _require_str(rec, "input", where)
        answer = normalize_answer(_require(rec, "target", where), where=where, field="target")
        return Example(question, (), answer)

    question = _require_str(rec, "question", where)
    raw_answer = _require(rec, "answer", where)
    if "steps" in present:
        steps = rec["steps"]
        if not isinstance(steps, list) or not all(isinstance(s, str) for s in steps):
            raise DataError(f"{where}: field 'steps': expected a list of strings")
        answer = normalize_answer(raw_answer, where=where, field="answer")
        return Example(question, tuple(s.strip() for s in steps if s.strip()), answer)
    if "cot" in present:
        cot = rec["cot"]
        if not isinstance(cot, str):
            raise DataError(f"{where}: field 'cot': expected a string, got {type(cot).__name__}")
        answer = normalize_answer(raw_answer, where=where, field="answer")
        return Example(question, split_cot(cot), answer)
    if isinstance(raw_answer, str) and "####" in raw_answer:
        steps, answer = _parse_gsm8k_solution(raw_answer, where=where, steps_format=steps_format)
        return Example(question, steps, answer)
    return Example(question, (), normalize_answer(raw_answer, where=where, field="answer"))


def _svamp_record(rec: Any, where: str) -> Example:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: record: expected a JSON object, got {type(rec).__name__}")
    body = " ".join(_require_str(rec, "Body", where).split())
    question = " ".join(_require_str(rec, "Question", where).split())
    if body[-1] not in ".?!":
        body += "."
    answer = normalize_answer(_require(rec, "Answer", where), where=where, field="Answer")
    return Example(f"{body} {question}", (), answer)


def _multiarith_record(rec: Any, where: str) -> Example:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: record: expected a JSON object, got {type(rec).__name__}")
    question = _require_str(rec, "sQuestion", where)
    solutions = _require(rec, "lSolutions", where)
    if not isinstance(solutions, list) or not solutions:
        raise DataError(f"{where}: field 'lSolutions': expected a non-empty list")
    return Example(question, (), normalize_answer(solutions[0], where=where, field="lSolutions"))


# --------------------------------------------------------------------------- files


def read_text(path: Path) -> str:
    """The UTF-8 text of a data file; a directory or undecodable bytes are a
    ``DataError`` naming the file (and the line of the first bad byte)."""
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not a data file (.txt/.json/.jsonl)")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {column})"
        ) from None


def _read_lines(path: Path) -> list[str]:
    """Split on "\n" only: ``str.splitlines`` would also split on U+2028, which occurs
    inside a real line of gsm8k_aug/train_no_aug.txt (line 4479)."""
    return [line.removesuffix("\r") for line in read_text(path).split("\n")]


def _nonempty(examples: list[Example], path: Path | str) -> list[Example]:
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def read_deng_txt(path: str | Path) -> list[Example]:
    """Read a Deng et al. ``question||cot #### answer`` file (blank lines skipped)."""
    path = Path(path)
    examples = []
    for lineno, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        question, sep, rest = line.partition("||")
        if not sep:
            raise DataError(f"{where}: field 'cot': no '||' between question and chain of thought")
        if not question.strip():
            raise DataError(f"{where}: field 'question': empty")
        cot, sep, final = rest.rpartition("####")
        if not sep:
            raise DataError(f"{where}: field 'answer': no '####' before the answer")
        answer = normalize_answer(final.strip(), where=where, field="answer")
        examples.append(Example(question.strip(), split_cot(cot), answer))
    return _nonempty(examples, path)


def _parse_json_lines(path: Path) -> list[tuple[str, Any]]:
    """Return ``(where, record)`` for every non-blank line of a JSON-lines file."""
    records = []
    for lineno, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            records.append((where, json.loads(line)))
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: invalid JSON ({err.msg}, column {err.colno})") from None
    return records


def _parse_json_list(path: Path) -> list[tuple[str, Any]]:
    """Return ``(where, record)`` for every element of a file holding one JSON list."""
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}:{err.lineno}: invalid JSON ({err.msg}, column {err.colno})"
        ) from None
    if not isinstance(data, list):
        raise DataError(f"{path}:1: expected a JSON list of records, got {type(data).__name__}")
    return [(f"{path} record {i}", rec) for i, rec in enumerate(data, start=1)]


def read_gsm8k_jsonl(path: str | Path, steps_format: str = "equation") -> list[Example]:
    """Read the original GSM8k JSONL (``{question, answer}``, answer ends with ``#### N``).

    ``steps_format="equation"``: the ``<<...>>`` annotations in order, brackets kept.
    ``steps_format="nl"``: one step per solution line, annotations removed, blank lines dropped.
    """
    _check_steps_format(steps_format)
    path = Path(path)
    examples = []
    for where, rec in _parse_json_lines(path):
        if not isinstance(rec, dict):
            raise DataError(f"{where}: record: expected a JSON object, got {type(rec).__name__}")
        question = _require_str(rec, "question", where)
        solution = _require_str(rec, "answer", where)
        steps, answer = _parse_gsm8k_solution(solution, where=where, steps_format=steps_format)
        examples.append(Example(question, steps, answer))
    return _nonempty(examples, path)


def read_svamp_json(path: str | Path) -> list[Example]:
    """Read SVAMP.json; question = Body (ending in punctuation) + " " + Question."""
    path = Path(path)
    return _nonempty([_svamp_record(rec, where) for where, rec in _parse_json_list(path)], path)


def read_multiarith_json(path: str | Path) -> list[Example]:
    """Read MultiArith.json; question = sQuestion stripped, answer = lSolutions[0]."""
    path = Path(path)
    records = _parse_json_list(path)
    return _nonempty([_multiarith_record(rec, where) for where, rec in records], path)


def _from_json_element(rec: Any, where: str, steps_format: str, types: Sequence[str]) -> Example:
    if isinstance(rec, dict) and "Body" in rec:
        return _svamp_record(rec, where)
    if isinstance(rec, dict) and "sQuestion" in rec:
        return _multiarith_record(rec, where)
    return from_record(rec, where=where, steps_format=steps_format, metamath_types=types)


def _convert(pairs, convert, source: Path | str) -> list[Example]:
    """``convert(record, where)`` over ``(where, record)`` pairs; records a filter leaves
    out (``SkippedRecord``) are counted per reason and reported, never dropped silently."""
    examples: list[Example] = []
    skipped: dict[str, int] = {}
    for where, rec in pairs:
        try:
            examples.append(convert(rec, where))
        except SkippedRecord as skip:
            skipped[skip.reason] = skipped.get(skip.reason, 0) + 1
    if skipped:
        log.warning("%s: skipped %d records: %s", source, sum(skipped.values()), skipped)
    return _nonempty(examples, source)


def read_file(
    path: str | Path,
    steps_format: str = "equation",
    *,
    metamath_types: Sequence[str] = METAMATH_NUMERIC_TYPES,
) -> list[Example]:
    """Read any supported local file, dispatching on extension and record keys.

    ``.txt``: Deng format. ``.jsonl``: one ``from_record`` per line. ``.json``: a JSON list
    (SVAMP or MultiArith records recognized by their keys, others via ``from_record``);
    a ``.json`` file that does not start with ``[`` is read as JSON lines, which is what
    ``datasets.Dataset.to_json`` writes.
    """
    _check_steps_format(steps_format)
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return read_deng_txt(path)
    if suffix == ".jsonl":
        records = _parse_json_lines(path)
    elif suffix == ".json":
        is_list = read_text(path).lstrip().startswith("[")
        records = _parse_json_list(path) if is_list else _parse_json_lines(path)
    else:
        raise DataError(f"{path}: unsupported file extension {suffix!r} (use .txt/.json/.jsonl)")
    return _convert(
        records,
        lambda rec, where: _from_json_element(rec, where, steps_format, metamath_types),
        path,
    )


def load_hf_dataset(
    name_or_path: str,
    split: str = "train",
    steps_format: str = "equation",
    *,
    config: str | None = None,
    metamath_types: Sequence[str] = METAMATH_NUMERIC_TYPES,
) -> list[Example]:
    """Load a dataset through ``datasets.load_dataset`` and convert rows with ``from_record``.

    A local ``.json``/``.jsonl`` file goes through the ``"json"`` builder (its only split is
    "train"); anything else is a Hub id, optionally with a ``config`` name. Rows are
    numbered from 1 in error messages.
    """
    import datasets  # slow import; only needed here

    _check_steps_format(steps_format)
    local = Path(name_or_path)
    if local.is_file() and local.suffix.lower() in (".json", ".jsonl"):
        split = "train"
        ds = datasets.load_dataset("json", data_files=str(local), split=split)
    else:
        ds = datasets.load_dataset(name_or_path, config, split=split)
    rows = ((f"{name_or_path}[{split}] row {i}", row) for i, row in enumerate(ds, start=1))

    def convert(row, where):
        return from_record(
            row, where=where, steps_format=steps_format, metamath_types=metamath_types
        )

    return _convert(rows, convert, f"{name_or_path}[{split}]")


# --------------------------------------------------------------------------- entry point


def data_root() -> Path:
    """The data directory: $KAVA_DATA_DIR, else ./data, else <repo>/../shared/data."""
    env = os.environ.get("KAVA_DATA_DIR")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2]
    for candidate in (Path("data"), repo.parent / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    return Path("data")


def load_examples(
    spec: str,
    *,
    split: str = "train",
    steps_format: str = "equation",
    limit: int | None = None,
    seed: int = 0,
    synthetic_size: int = 1000,
    synthetic_steps: tuple[int, int] = (2, 4),
    metamath_types: Sequence[str] = METAMATH_NUMERIC_TYPES,
) -> list[Example]:
    """Load examples from ``spec`` and keep the first ``limit``.

    ``spec`` is one of: ``"synthetic"`` (uses ``seed``, ``synthetic_size``,
    ``synthetic_steps``, and ``split`` as its part: train, validation or test); a ``NAMED`` key (file under ``data_root()``, or the Hub for keys in
    ``HUB_FALLBACK`` when the file is missing); a ``HELD_OUT`` key (a named set less the
    questions of another); an existing file path; otherwise a Hub
    dataset id (``split`` applies only to this last case).
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if spec == "synthetic":
        if split not in SYNTHETIC_PARTS:
            raise DataError(
                f"synthetic data has the splits {', '.join(SYNTHETIC_PARTS)}, not {split!r} "
                "(data.train_split)"
            )
        examples = synthetic_examples(synthetic_size, seed, *synthetic_steps, part=split)
    elif spec in NAMED:
        examples = _load_named(spec, steps_format)
    elif spec in HELD_OUT:
        examples = _load_held_out(spec)
    elif Path(spec).is_file():
        examples = read_file(spec, steps_format, metamath_types=metamath_types)
    else:
        check_spec(spec)
        examples = load_hf_dataset(
            spec, split=split, steps_format=steps_format, metamath_types=metamath_types
        )
    return examples if limit is None else examples[:limit]


DATA_SUFFIXES = (".txt", ".json", ".jsonl")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def known_names() -> list[str]:
    return ["synthetic", *NAMED, *HELD_OUT]


def check_spec(spec: str) -> None:
    """Refuse at once (no Hub round trip) a data spec that can only fail: a missing
    file, a directory, or a bare name that is none of kava's dataset names."""
    if spec == "synthetic" or spec in NAMED or spec in HELD_OUT:
        return
    path = Path(spec)
    names = ", ".join(known_names())
    hint = f"known dataset names: {names}; Hub dataset ids look like owner/name"
    if path.is_dir():
        raise DataError(f"{spec}: is a directory, not a data file (.txt/.json/.jsonl)")
    if path.is_file():
        return
    if path.suffix.lower() in DATA_SUFFIXES or spec.startswith((".", "/", "~")):
        raise DataError(f"{spec}: file not found ({hint})")
    if not _HUB_ID.fullmatch(spec):
        raise DataError(f"dataset {spec!r}: not a dataset name, a file or a Hub id ({hint})")


def question_key(question: str) -> str:
    """What two questions must share to be the same question: whitespace-normalized text."""
    return " ".join(question.split())


def _load_held_out(name: str) -> list[Example]:
    source, held_out, steps_format = HELD_OUT[name]
    removed = {question_key(e.question) for e in _load_named(held_out, steps_format)}
    return [e for e in _load_named(source, steps_format) if question_key(e.question) not in removed]


def _load_named(name: str, steps_format: str) -> list[Example]:
    root = data_root()
    path = root / NAMED[name]
    if path.is_file():
        return read_file(path, steps_format)
    hint = (
        f"dataset '{name}': file {path} not found; put {NAMED[name]} under {root} "
        f"or set KAVA_DATA_DIR to a directory that holds it"
    )
    if name not in HUB_FALLBACK:
        raise DataError(hint)
    hub_id, config, split = HUB_FALLBACK[name]
    try:
        return load_hf_dataset(hub_id, split=split, steps_format=steps_format, config=config)
    except DataError:
        raise
    except Exception as err:  # network/Hub failures: report them together with the hint
        raise DataError(f"{hint} (Hub fallback {hub_id} failed: {err})") from err


# --------------------------------------------------------------------------- synthetic


@dataclass(frozen=True)
class _Scene:
    """A story frame for synthetic problems; sentence templates per operation."""

    opening: str  # "{name} has {n} {items}."
    question: str  # "How many {items} does {name} have now?"
    items: tuple[tuple[str, str], ...]  # (singular, plural)
    add: tuple[str, ...]  # templates use {subj}, {pos}, {n}, {items}
    sub: tuple[str, ...]
    mul: tuple[str, ...]
    div: tuple[str, ...]
    person: bool = True  # False: {name} is a place and the pronoun is "it"


_PEOPLE = (
    ("Mia", "she", "her"),
    ("Liam", "he", "his"),
    ("Sofia", "she", "her"),
    ("Noah", "he", "his"),
    ("Ava", "she", "her"),
    ("Omar", "he", "his"),
    ("Lena", "she", "her"),
    ("Ravi", "he", "his"),
)
_PLACES = ("The shop", "The store", "The market stall", "The warehouse")

_SCENES = (
    _Scene(
        opening="{name} has {n} {items}.",
        question="How many {items} does {name} have now?",
        items=(
            ("apple", "apples"),
            ("marble", "marbles"),
            ("sticker", "stickers"),
            ("pencil", "pencils"),
            ("cookie", "cookies"),
            ("seashell", "seashells"),
        ),
        add=("{subj} buys {n} more {items}.", "{subj} finds {n} more {items}."),
        sub=("{subj} gives {n} {items} to {pos} friend.", "{subj} loses {n} {items}."),
        mul=("{subj} ends up with {n} times as many {items} as before.",),
        div=("{subj} splits {pos} {items} into {n} equal piles and keeps one pile.",),
    ),
    _Scene(
        opening="{name} has {n} {items}.",
        question="How many dollars does {name} have now?",
        items=(("dollar", "dollars"),),
        add=("{subj} earns {n} more {items}.", "{subj} gets {n} {items} from {pos} aunt."),
        sub=("{subj} spends {n} {items} on a book.", "{subj} pays {n} {items} for lunch."),
        mul=("{subj} ends up with {n} times as much money as before.",),
        div=("{subj} shares {pos} money equally into {n} envelopes and keeps one envelope.",),
    ),
    _Scene(
        opening="{name} has {n} {items} for sale.",
        question="How many {items} does {name_lower} have now?",
        items=(("box", "boxes"), ("bag", "bags"), ("jar", "jars"), ("basket", "baskets")),
        add=("{subj} buys {n} more {items} from a supplier.", "{subj} receives {n} more {items}."),
        sub=("{subj} sells {n} {items}.", "{subj} gives away {n} {items}."),
        mul=("{subj} orders enough {items} to have {n} times as many as before.",),
        div=("{subj} divides {pos} {items} equally among {n} branches and keeps one share.",),
        person=False,
    ),
)


def _random_operation(rng: random.Random, x: int) -> tuple[str, int, int]:
    """Pick a random valid operation on ``x`` (0..999); return (sign, operand, result).

    Adding is always possible for x < 980 and subtracting for x >= 1, so a choice exists.
    """
    options: list[tuple[str, int, int]] = []
    b = rng.randint(1, 20)
    if x + b < 1000:
        options.append(("+", b, x + b))
    if x >= 1:
        c = rng.randint(1, min(20, x))
        options.append(("-", c, x - c))
    k = rng.randint(2, 5)
    if x >= 1 and x * k < 1000:
        options.append(("*", k, x * k))
    divisors = [d for d in range(2, 6) if x >= d and x % d == 0]
    if divisors:
        d = rng.choice(divisors)
        options.append(("/", d, x // d))
    return rng.choice(options)


def _noun(count: int, forms: tuple[str, str]) -> str:
    """The singular form for a count of 1, else the plural."""
    return forms[0] if count == 1 else forms[1]


def _synthetic_problem(rng: random.Random, num_steps: int) -> Example:
    """One random problem with exactly ``num_steps`` operations."""
    scene = rng.choice(_SCENES)
    if scene.person:
        name, pronoun, possessive = rng.choice(_PEOPLE)
    else:
        name, pronoun, possessive = rng.choice(_PLACES), "it", "its"
    forms = rng.choice(scene.items)
    templates = {"+": scene.add, "-": scene.sub, "*": scene.mul, "/": scene.div}

    x = rng.randint(1, 20)
    sentences = [scene.opening.format(name=name, n=x, items=_noun(x, forms))]
    steps = []
    for i in range(num_steps):
        sign, operand, result = _random_operation(rng, x)
        subject = pronoun.capitalize() if i == 0 else f"Then {pronoun}"
        sentence = rng.choice(templates[sign]).format(
            subj=subject, pos=possessive, n=operand, items=_noun(operand, forms)
        )
        sentences.append(sentence)
        steps.append(f"<<{x}{sign}{operand}={result}>>")
        x = result
    sentences.append(scene.question.format(name=name, name_lower=name.lower(), items=forms[1]))
    return Example(" ".join(sentences), tuple(steps), str(x))


# The synthetic problems are split by a hash of their question text, so that training,
# validation and held-out test problems never coincide, whatever the seeds and sizes
# (independent draws otherwise meet: ~4 % of 1,000 two-step problems are among 10,000
# others): 1 in 10 questions is a test problem, 1 in 10 a validation one.
SYNTHETIC_PARTS = ("train", "validation", "test")


def synthetic_part(question: str) -> str:
    """Which part of the synthetic data ``question`` belongs to (``SYNTHETIC_PARTS``)."""
    bucket = int(hashlib.sha256(question.encode()).hexdigest()[:8], 16) % 10
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def synthetic_examples(
    n: int, seed: int = 0, min_steps: int = 2, max_steps: int = 4, part: str = "train"
) -> list[Example]:
    """Generate ``n`` seeded multi-step arithmetic word problems of ``part``.

    Difficulty is the number of steps, uniform in ``min_steps..max_steps``. Each problem
    starts from a number 1..20 and applies that many operations (add/subtract 1..20,
    multiply/divide by 2..5, exact divisions, every intermediate result in 0..999).
    Steps are equations like ``"<<7+5=12>>"``; the answer is the last result. Problems of
    another part (``synthetic_part``) are drawn and passed over, so the parts never share
    a question. The same seed and part always give the same list.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 1 <= min_steps <= max_steps:
        raise ValueError(f"need 1 <= min_steps <= max_steps, got {min_steps}, {max_steps}")
    if part not in SYNTHETIC_PARTS:
        raise ValueError(f"synthetic part must be one of {SYNTHETIC_PARTS}, got {part!r}")
    rng = random.Random(seed)
    out: list[Example] = []
    while len(out) < n:
        example = _synthetic_problem(rng, rng.randint(min_steps, max_steps))
        if synthetic_part(example.question) == part:
            out.append(example)
    return out
