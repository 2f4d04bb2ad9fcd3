"""Training loop (accelerate): one code path for a CPU process, one GPU, or DDP.

``train(cfg)`` writes into ``cfg.train.output_dir``:

* ``manifest.json`` (kava.manifest: code, packages, machine; ``finished_at`` at the end),
  ``config.yaml``, ``log.jsonl`` (one line per optimizer step: loss terms, lr, tokens/s;
  with a curriculum, ``curriculum`` = the Coconut stage or the iCoT removal count, "all"
  once the whole CoT is removed, and ``cot_exhausted`` = rows whose CoT ran out early),
  ``tb/`` (TensorBoard; ``train.report_to`` picks accelerate's trackers), ``data_stats.json`` (examples kept / skipped by the length filter);
* ``checkpoints/step-N/`` every ``save_every`` steps and ``final/`` (see kava.checkpoint;
  ``final/`` and ``best/`` also hold the model card ``README.md`` and ``manifest.json``);
* with ``train.eval_every``: ``val_accuracy`` / ``val_passes`` in the log lines of the
  validation steps and ``best/``, the checkpoint most accurate on ``train.eval_dataset``
  (with ``selection.json``: step, accuracy, split).

``resume=True`` continues from the newest ``checkpoints/step-N``: trainable weights,
optimizer, scheduler, RNG states and the position in the data order.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from kava.backbone import Backbone, build_backbone
from kava.batching import CoconutBatch, Encoded, encode, encode_steps
from kava.card import CARD, model_card
from kava.checkpoint import (
    TRAINER_STATE,
    latest_checkpoint,
    load_trainable,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from kava.coconut import coconut_tokens
from kava.config import TRACKERS, ConfigError, KavaConfig, save_config
from kava.curricula import Curriculum
from kava.data import DataError, Example, load_examples
from kava.manifest import MANIFEST, device_info, finished, start_manifest, write_manifest
from kava.model import KavaModel

log = logging.getLogger(__name__)


@dataclass
class EncodedData:
    items: list[Encoded]
    total: int
    skipped: dict[str, int]  # reason -> count (length filter)


def encode_for_method(ex: Example, backbone: Backbone, cfg: KavaConfig) -> Encoded:
    """The training sequence of the method: the full CoT, the teacher's, or none; step by
    step for Coconut (its stages remove whole steps)."""
    kind = cfg.method_spec.training_cot
    if cfg.method_spec.curriculum == "thought_stages":
        return encode_steps(
            ex.question, ex.steps, ex.answer, backbone.tokenizer, backbone.ids, cfg.answer_prompt
        )
    steps = () if kind == "none" else ex.steps
    drop = cfg.teacher.drop_last_step if kind == "teacher" else False
    return encode(
        ex.question, steps, ex.answer, backbone.tokenizer, backbone.ids, cfg.answer_prompt, drop
    )


def encode_examples(
    examples: Sequence[Example], backbone: Backbone, cfg: KavaConfig
) -> EncodedData:
    """Tokenize and apply the length filter; skips are counted per reason, never silent."""
    d = cfg.data
    items = []
    skipped = {"question_too_long": 0, "cot_too_long": 0, "answer_too_long": 0}
    for ex in examples:
        e = encode_for_method(ex, backbone, cfg)
        if len(e.question) > d.max_question_tokens:
            skipped["question_too_long"] += 1
        elif len(e.cot) > d.max_cot_tokens:
            skipped["cot_too_long"] += 1
        elif len(e.answer) + 1 > d.max_answer_tokens:
            skipped["answer_too_long"] += 1
        else:
            items.append(e)
    if not items:
        raise DataError(
            f"the length filter removed all {len(examples)} examples ({skipped}); raise data.max_*_tokens"
        )
    return EncodedData(items, len(examples), skipped)


def load_train_examples(cfg: KavaConfig) -> list[Example]:
    d = cfg.data
    return load_examples(
        d.train,
        split=d.train_split,
        steps_format=d.steps_format,
        limit=d.limit,
        seed=cfg.train.seed,
        synthetic_size=d.synthetic_train_size,
        synthetic_steps=(d.synthetic_min_steps, d.synthetic_max_steps),
        metamath_types=d.metamath_types,
    )


def batch_tokens(batch, cfg: KavaConfig) -> int:
    """Tokens processed by every pass actually run (for tokens/s)."""
    if isinstance(batch, CoconutBatch):
        return coconut_tokens(batch)
    n = int(batch.teacher.attention_mask.sum())
    if cfg.method_spec.objective == "distill":
        s = batch.student
        b, m = s.question_ids.shape[0], cfg.latent.num_latents
        n += (
            int(s.question_mask.sum())
            + b * m * (1 + cfg.effective_iterations)
            + int(s.answer_mask.sum())
        )
    return n


def load_validation_examples(cfg: KavaConfig) -> list[Example] | None:
    """The validation questions of ``train.eval_every`` (None when it is off)."""
    t = cfg.train
    if not t.eval_every:
        return None
    return load_examples(
        t.eval_dataset,
        split="validation",
        steps_format=cfg.data.steps_format,
        limit=t.eval_limit,
        seed=t.seed + 1_000_003,  # for "synthetic": other problems than the training ones
        synthetic_size=t.eval_limit or 200,
        synthetic_steps=(cfg.data.synthetic_min_steps, cfg.data.synthetic_max_steps),
    )


def validation_config(cfg: KavaConfig) -> KavaConfig:
    """What validation decodes with: ``cfg``, but eager generation passes (a compiled pass
    would recompile for every new merged copy of the weights)."""
    val = copy.deepcopy(cfg)
    val.eval.compile = False
    return val


def _mixed_precision(cfg: KavaConfig) -> str:
    mp = cfg.train.mixed_precision
    if mp == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return mp


def compile_enabled(cfg: KavaConfig, device: torch.device) -> bool:
    """``train.compile``: auto = on CUDA."""
    return cfg.train.compile == "layers" or (cfg.train.compile == "auto" and device.type == "cuda")


def apply_speed_options(backbone: Backbone, cfg: KavaConfig, device: torch.device) -> None:
    """Compiled layer pass, activation checkpointing, no fp32 copies of LoRA inputs under
    bf16 autocast (train.compile, train.activation_checkpointing, train.mixed_precision)."""
    if _mixed_precision(cfg) == "bf16":
        backbone.lora_input_cast(False)
    if cfg.train.activation_checkpointing:
        backbone.checkpoint_layers()
    if compile_enabled(cfg, device):
        backbone.compile_layers()  # batch and length dims dynamic, weights static


def reset_optimizer_state(optimizer) -> None:
    """Drop the optimizer's moments and step counts (a fresh AdamW, as iCoT's and
    Coconut's recipes do at a curriculum switch); the lr schedule goes on."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    inner.state.clear()


def truncate_log(path: Path, step: int) -> None:
    """Keep the log lines up to ``step`` (a resumed run writes the later ones again)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line + "\n")
        except json.JSONDecodeError:
            continue  # a line torn by the interruption
    path.write_text("".join(keep))


def rng_file_name(process_index: int) -> str:
    return f"rng_state_{process_index}.pt"


def trackers(cfg: KavaConfig, run_dir: Path, available: set[str] | None = None) -> list:
    """What ``Accelerator(log_with=...)`` gets for ``train.report_to``: accelerate's tracker
    names, TensorBoard as a tracker writing to ``run_dir/tb``. A tracker whose package is
    not installed is a ``ConfigError`` naming the key and the package (``available``:
    the trackers accelerate finds, default ``accelerate.tracking.get_available_trackers``)."""
    from accelerate.tracking import TensorBoardTracker, get_available_trackers

    if available is None:
        available = {str(t) for t in get_available_trackers()}
    out = []
    for name in cfg.train.report_to:
        if name not in available:
            raise ConfigError(
                f"train.report_to: tracker {name!r} needs the package {TRACKERS[name]} "
                f"(pip install {TRACKERS[name]}), or drop it (train.report_to=none)"
            )
        out.append(TensorBoardTracker("tb", str(run_dir)) if name == "tensorboard" else name)
    return out


def tracker_config(cfg: KavaConfig) -> dict:
    """The resolved config flattened to dotted keys of scalars (what trackers accept)."""
    flat: dict = {}

    def walk(node, prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                ok = isinstance(v, (int, float, str, bool))
                flat[prefix + k] = v if ok else str(v)

    walk(cfg.to_dict(), "")
    return flat


def tracked_values(rec: dict) -> dict:
    """A log.jsonl record as tracker scalars: every number but the step, as train/<key>."""
    return {
        f"train/{k}": v
        for k, v in rec.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def train(cfg: KavaConfig, resume: bool = False, progress: bool = True) -> Path:
    """Train ``cfg`` and return the path of the final checkpoint."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    t = cfg.train
    run_dir = Path(t.output_dir)
    log_with = trackers(cfg, run_dir)
    accelerator = Accelerator(
        mixed_precision=_mixed_precision(cfg), log_with=log_with or None, project_dir=str(run_dir)
    )
    world = accelerator.num_processes
    accum = max(1, t.global_batch_size // (t.micro_batch_size * world))
    if accum * t.micro_batch_size * world != t.global_batch_size:
        log.warning(
            "global batch %d is not micro-batch %d x processes %d x accumulation; using %d",
            t.global_batch_size,
            t.micro_batch_size,
            world,
            accum * t.micro_batch_size * world,
        )
    set_seed(t.seed, device_specific=True)  # each process its own dropout stream

    backbone = build_backbone(cfg)
    apply_speed_options(backbone, cfg, accelerator.device)
    model = KavaModel(backbone, cfg)
    data = encode_examples(load_train_examples(cfg), backbone, cfg)
    val_examples = load_validation_examples(cfg)
    val_cfg = validation_config(cfg)
    n_skipped = sum(data.skipped.values())
    manifest: dict = {}
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        stats = {"examples": data.total, "kept": len(data.items), "skipped": data.skipped}
        if val_examples is not None:
            stats["validation"] = {"dataset": t.eval_dataset, "n": len(val_examples)}
        (run_dir / "data_stats.json").write_text(json.dumps(stats, indent=2))
        msg = f"training on {len(data.items)} of {data.total} examples"
        if n_skipped:
            msg += f"; skipped {n_skipped} longer than the limits: {data.skipped}"
        accelerator.print(msg)

    optimizer = torch.optim.AdamW(
        backbone.trainable_parameters(),
        lr=t.lr,
        weight_decay=t.weight_decay,
        fused=accelerator.device.type == "cuda",
    )
    model, optimizer = accelerator.prepare(model, optimizer)

    def loader(epoch: int) -> DataLoader:
        g = torch.Generator().manual_seed(t.seed + epoch)
        dl = DataLoader(
            data.items,
            batch_size=t.micro_batch_size,
            shuffle=True,
            generator=g,
            # lists of encoded items: the batch is built per optimizer step (a curriculum
            # changes the sequences with the step; kava.curricula)
            collate_fn=list,
            num_workers=t.num_workers,
            drop_last=False,
        )
        return accelerator.prepare_data_loader(dl)

    batches_per_epoch = len(loader(0))
    if batches_per_epoch < accum:  # a data set smaller than the global batch
        log.warning(
            "an epoch has %d micro-batches, fewer than the %d of a global batch: "
            "each optimizer step uses the whole epoch",
            batches_per_epoch,
            accum,
        )
        accum = batches_per_epoch
    steps_per_epoch = batches_per_epoch // accum
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
    warmup = int(t.warmup_ratio * total_steps)
    if t.lr_schedule == "cosine":
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    else:
        scheduler = get_constant_schedule_with_warmup(optimizer, warmup)
    curriculum = Curriculum(cfg, steps_per_epoch, backbone.ids, accelerator.process_index)

    step = 0
    best: dict | None = None  # {"step", "accuracy"} of best/ so far (train.eval_every)
    if not resume and any((run_dir / n).exists() for n in ("log.jsonl", "checkpoints", "final")):
        raise FileExistsError(
            f"{run_dir} already holds a training run; continue it with --resume, "
            "or set another train.output_dir"
        )
    if t.init_from is not None and not resume:
        load_trainable(backbone, t.init_from)  # e.g. Coconut from a CoT run's final/
        accelerator.print(f"initialised the trainable tensors from {t.init_from}")
    if resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise FileNotFoundError(
                f"--resume: no checkpoints/step-N with a trainer state in {run_dir}"
            )
        load_trainable(backbone, ckpt)
        state = torch.load(ckpt / TRAINER_STATE, weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rng_file = ckpt / rng_file_name(accelerator.process_index)
        if not rng_file.is_file():
            raise FileNotFoundError(
                f"{rng_file} missing: resume with the number of processes the run was saved with"
            )
        ranks_rng = torch.load(rng_file, weights_only=False)
        set_rng_state(ranks_rng["rng"])
        accelerator.unwrap_model(model).generator.set_state(ranks_rng["eviction_rng"])
        step = state["step"]
        best = state.get("best")
        if accelerator.is_main_process:
            truncate_log(run_dir / "log.jsonl", step)
        accelerator.print(f"resumed from {ckpt} at step {step}")

    if accelerator.is_main_process:
        device = device_info(accelerator.device.type, accelerator.num_processes)
        manifest = start_manifest(run_dir, cfg, device, resume)
    if log_with:
        accelerator.init_trackers(
            "kava", config=tracker_config(cfg), init_kwargs={"wandb": {"name": run_dir.name}}
        )
    log_file = (run_dir / "log.jsonl").open("a") if accelerator.is_main_process else None
    bar = tqdm(
        total=total_steps,
        initial=step,
        disable=not (progress and accelerator.is_main_process),
        desc="train",
    )

    def hub_files(selection: dict | None = None) -> dict:
        """The model card and manifest of final/ and best/ (kava.card, kava.manifest)."""
        card = model_card(cfg, manifest=manifest, selection=selection)
        return {"extra_json": {MANIFEST: manifest}, "extra_text": {CARD: card}}

    def checkpoint(path: Path, with_state: bool, **extra) -> None:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state = None
            if with_state:
                state = {
                    "step": step,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "best": best,
                }
            save_checkpoint(path, backbone, cfg, state, **extra)
        if with_state:  # every process has its own RNG stream (dropout); each saves its own
            accelerator.wait_for_everyone()
            ranks_rng = {
                "rng": rng_state(),
                "eviction_rng": accelerator.unwrap_model(model).generator.get_state(),
            }
            torch.save(ranks_rng, path / rng_file_name(accelerator.process_index))
        accelerator.wait_for_everyone()

    def validate() -> dict[str, float]:
        """Decode the validation split (main process); keep best/ when it is the most
        accurate so far. Returns the log fields."""
        nonlocal best
        from kava.evaluate import evaluate

        accelerator.wait_for_everyone()
        fields: dict[str, float] = {}
        if accelerator.is_main_process:
            m = evaluate(backbone, val_cfg, val_examples, name="validation", progress=False)
            fields = {"val_accuracy": m["accuracy"], "val_passes": m["mean_forward_passes"]}
            if best is None or m["accuracy"] > best["accuracy"]:  # ties keep the earlier
                best = {"step": step, "accuracy": m["accuracy"]}
                selection = {
                    **best,
                    "metric": "accuracy",
                    "dataset": t.eval_dataset,
                    "split": "validation",
                    "n": m["n"],
                    "correct": m["correct"],
                    "mean_forward_passes": m["mean_forward_passes"],
                }
                files = hub_files(selection)
                files["extra_json"]["selection.json"] = selection
                save_checkpoint(run_dir / "best", backbone, cfg, **files)
            model.train()
        accelerator.wait_for_everyone()
        return fields

    model.train()
    sums: dict[str, torch.Tensor] = {}
    n_micro, tokens, exhausted, t0 = 0, 0, 0, time.perf_counter()
    while step < total_steps:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        dl = loader(epoch)
        skip = done_in_epoch * accum
        if skip:
            dl = accelerator.skip_first_batches(dl, skip)
        for i, items in enumerate(dl, start=skip):
            if i >= steps_per_epoch * accum:
                break  # leftover micro-batches that do not fill an optimizer step
            built = curriculum.batch(items, step, i % accum)
            batch = built.batch.to(accelerator.device)
            exhausted += built.cot_exhausted
            sync = (i + 1) % accum == 0
            ctx = accelerator.no_sync(model) if not sync else torch.enable_grad()
            with ctx:
                out = model(batch)
                accelerator.backward(out.total / accum)
            for k, v in out.metrics.items():
                sums[k] = sums[k] + v if k in sums else v
            del out  # teacher capture, latent KV, compressed KV: free before the next forward
            n_micro += 1
            tokens += batch_tokens(batch, cfg)
            if not sync:
                continue
            grad_norm = None
            if t.grad_clip > 0:
                grad_norm = accelerator.clip_grad_norm_(
                    backbone.trainable_parameters(), t.grad_clip
                )
            lr = scheduler.get_last_lr()[0]  # the lr this step used
            if curriculum.resets_optimizer and curriculum.switches_at(step):
                reset_optimizer_state(optimizer)  # a new stage / removal count starts here
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            validating = val_examples is not None and (
                step % t.eval_every == 0 or step == total_steps
            )
            val_fields = validate() if validating else {}
            if step % t.log_every == 0 or step == total_steps or validating:
                elapsed = time.perf_counter() - t0
                # mean over the micro-batches since the last log line, and over processes
                means = accelerator.reduce(
                    torch.stack(list(sums.values())) / n_micro, reduction="mean"
                )
                rec = dict(zip(sums, means.tolist()))
                rec.update(
                    step=step,
                    epoch=round(step / steps_per_epoch, 4),
                    lr=lr,
                    tokens_per_s=tokens * world / max(elapsed, 1e-9),
                    grad_norm=float(grad_norm) if grad_norm is not None else None,
                    **val_fields,
                )
                if curriculum.kind != "none":
                    value = curriculum.value(step - 1)  # of the step just taken
                    rec["curriculum"] = "all" if math.isinf(value) else int(value)
                    counted = torch.tensor(exhausted, device=accelerator.device)
                    rec["cot_exhausted"] = int(accelerator.reduce(counted, reduction="sum"))
                if accelerator.is_main_process:
                    log_file.write(json.dumps(rec) + "\n")
                    log_file.flush()
                    accelerator.log(tracked_values(rec), step=step)
                bar.set_postfix(
                    {
                        k: f"{rec[k]:.3g}"
                        for k in (
                            "loss",
                            "student_ce",
                            "teacher_ce",
                            "codi_loss",
                            "kv_loss",
                            "val_accuracy",
                        )
                        if k in rec
                    }
                )
                sums, n_micro, tokens, exhausted, t0 = {}, 0, 0, 0, time.perf_counter()
            bar.update(1)
            if t.save_every and step % t.save_every == 0 and step < total_steps:
                checkpoint(run_dir / "checkpoints" / f"step-{step}", with_state=True)
            if step >= total_steps:
                break
    bar.close()
    final = run_dir / "final"
    if accelerator.is_main_process:
        manifest = finished(manifest)
        write_manifest(run_dir, manifest)
    checkpoint(final, with_state=True, **(hub_files() if accelerator.is_main_process else {}))
    if accelerator.is_main_process:
        for tracker in accelerator.trackers:
            tracker.finish()
        log_file.close()
    accelerator.print(f"saved {final}")
    return final
