"""The methods table is the one place that says what a method is."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from kava.config import ConfigError, load_config
from kava.methods import METHODS, PAPER_ORDER, get_method

SRC = Path(__file__).resolve().parents[1] / "src" / "kava"


def test_paper_order_and_labels():
    assert PAPER_ORDER[:2] == ("cot", "nocot") and PAPER_ORDER[-3:] == ("codi", "pccot", "kava")
    assert [METHODS[m].label for m in ("cot", "nocot", "codi", "pccot", "kava")] == [
        "CoT",
        "No-CoT",
        "CODI",
        "PCCoT",
        "KaVa",
    ]


def test_facts_of_the_five_original_methods():
    assert {m for m in METHODS if METHODS[m].kv_loss} == {"kava"}
    assert {m for m in METHODS if METHODS[m].sequential} == {"codi"}
    for name in ("kava", "pccot", "codi"):
        m = METHODS[name]
        assert m.latent and m.uses_projection and m.codi_loss and m.objective == "distill"
    for name in ("cot", "nocot"):
        m = METHODS[name]
        assert not m.latent and not m.codi_loss and m.objective == "sft"
    assert METHODS["cot"].writes_cot and METHODS["cot"].training_cot == "full"
    assert METHODS["nocot"].training_cot == "none" and not METHODS["nocot"].writes_cot


def test_config_reads_the_table():
    assert load_config(overrides=["method=pccot"]).effective_alpha2 == 0.0
    assert load_config(overrides=["method=cot"]).effective_alpha1 == 0.0
    assert load_config(overrides=["method=kava"]).effective_alpha1 == 10.0
    with pytest.raises(ConfigError, match="method: 'kavaa' is not one of"):
        load_config(overrides=["method=kavaa"])
    with pytest.raises(KeyError, match="known: cot"):
        get_method("nope")


def test_no_method_name_comparisons_outside_the_table():
    """Modules ask the table's fields; method names appear in methods.py alone (docstrings and
    help texts aside). Allowed: the zen-E schema's ``cot`` field (data), and "kava" as the
    program's own name (the CLI's prog, the cache folder, the model card's library_name,
    the report's version column, the trackers' project name)."""
    pattern = re.compile(r'"(cot|nocot|codi|pccot|kava|icot|coconut)"')
    allowed = {("data.py", '"cot"')} | {
        (name, '"kava"') for name in ("cli.py", "backbone.py", "card.py", "report.py", "train.py")
    }
    hits = []
    for path in sorted(SRC.glob("*.py")):
        if path.name == "methods.py":
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            for m in pattern.finditer(line):
                if (path.name, m.group(0)) not in allowed:
                    hits.append(f"{path.name}:{lineno}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_losses_and_batching_do_not_import_transformers():
    code = "import sys, kava.losses, kava.batching, kava.methods; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
