"""Markdown tables of a folder of bench_kava.py JSON files (what benchmarks/RESULTS.md shows).

    python benchmarks/results_table.py benchmarks/results/h200-2026-12-02

One training row and one inference block per file, in file-name order, each with its
GPU, versions and command, so a table can be regenerated from the recorded numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def training_rows(runs: list[tuple[str, dict]]) -> list[str]:
    lines = [
        "| file | arch | micro x accum | CoT | examples/s | tokens/s | step (s) | peak GiB | MFU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, d in runs:
        tr, s = d.get("train"), d["settings"]
        if not tr:
            continue
        if "error" in tr:
            lines.append(f"| {name} | {d['arch']['name']} | | | {tr['error']} | | | | |")
            continue
        lines.append(
            f"| {name} | {d['arch']['name']} | {s['micro_batch']} x {s['accumulation']} | "
            f"~{s['cot_len']} | {tr['examples_per_s']:.1f} | {tr['tokens_per_s']:,.0f} | "
            f"{tr['step_time_s']:.3f} | {tr['peak_mem_gib']:.1f} | {100 * tr['mfu']:.1f}% |"
        )
    return lines


def inference_rows(runs: list[tuple[str, dict]]) -> list[str]:
    lines = [
        "| file | arch | batch | mode | new tokens | questions | q/s | passes/q | time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, d in runs:
        for r in (d.get("inference") or {}).get("runs", []):
            lines.append(
                f"| {name} | {d['arch']['name']} | {r['batch']} | {r['mode']} | "
                f"{r['new_tokens']} | {r['questions']} | {r['questions_per_s']:.1f} | "
                f"{r['passes_per_question']:.1f} | {r['time_s']:.2f} |"
            )
    return lines


def provenance(runs: list[tuple[str, dict]]) -> list[str]:
    lines = []
    for name, d in runs:
        env = d["environment"]
        lines.append(
            f"* `{name}`: {env.get('gpu') or 'CPU'}, torch {env['torch']}, transformers "
            f"{env['transformers']}, peft {env.get('peft')}, {env['date']}: `{d['command']}`"
            + (f"; code: {d['code']}" if "code" in d else "")
        )
    return lines


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path)
    args = p.parse_args(argv)
    runs = [(f.stem, json.loads(f.read_text())) for f in sorted(args.folder.glob("*.json"))]
    runs = [(name, d) for name, d in runs if "settings" in d]  # bench_kava.py files only
    text = "\n".join(
        ["### Training", "", *training_rows(runs), "", "### Inference", "", *inference_rows(runs)]
        + ["", "### Runs", "", *provenance(runs)]
    )
    print(text)
    return text


if __name__ == "__main__":
    main()
