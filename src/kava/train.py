"""Training loop (accelerate): one code path for a CPU process, one GPU, DDP or FSDP2
(what is the same for 1 and N processes: kava.parallel).

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

from kava import parallel
from kava.backbone import Backbone, build_backbone
from kava.batching import CoconutBatch, Encoded, encode, encode_steps
from kava.card import CARD, model_card
from kava.checkpoint import (
    TRAINABLE,
    CheckpointError,
    apply_trainable,
    clean_staging,
    commit_checkpoint,
    latest_checkpoint,
    load_trainable,
    prune_checkpoints,
    rank_state_name,
    resume_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
    staging_path,
    start_staging,
    trainable_state,
    write_checkpoint_files,
    write_rank_state,
)
from kava.coconut import coconut_tokens
from kava.config import TRACKERS, ConfigError, KavaConfig, save_config
from kava.curricula import Curriculum
from kava.data import DataError, Example, check_spec, load_examples
from kava.guard import (
    NonFiniteError,
    StopRequest,
    TrainingInterrupted,
    describe,
    flagged_names,
    json_safe,
    nonfinite_flags,
)
from kava.manifest import MANIFEST, device_info, finished, start_manifest, write_manifest
from kava.model import KavaModel
from kava.rundir import check_fresh, check_resume, record_resume

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


def check_cot(examples: Sequence[Example], cfg: KavaConfig) -> int:
    """A method that trains on a written CoT (the teacher of KaVa/CODI/PCCoT, CoT, iCoT,
    Coconut) needs examples that have one: data without any CoT (e.g. an eval-only set
    such as svamp) is refused, since the CoT losses would supervise nothing; some
    examples without one are counted and warned about. Returns that count."""
    if cfg.method_spec.training_cot == "none":
        return 0
    missing = sum(1 for ex in examples if not ex.steps)
    if missing == len(examples):
        raise DataError(
            f"data.train={cfg.data.train}: none of the {len(examples)} examples has a chain "
            f"of thought, and method {cfg.method} trains on one; use a training set with "
            "CoT (e.g. gsm8k-train-eq, synthetic) or method=nocot"
        )
    if missing:
        log.warning(
            "data.train=%s: %d of %d examples have no chain of thought (method %s trains "
            "on one; those examples teach only the answer)",
            cfg.data.train,
            missing,
            len(examples),
            cfg.method,
        )
    return missing


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
        seed=t.seed + 1_000_003,  # "synthetic": its validation part (kava.data.synthetic_part)
        synthetic_size=t.eval_limit or 200,
        synthetic_steps=(cfg.data.synthetic_min_steps, cfg.data.synthetic_max_steps),
    )


def validation_config(cfg: KavaConfig) -> KavaConfig:
    """What validation decodes with: ``cfg``, but eager generation passes (a compiled pass
    would recompile for every new merged copy of the weights)."""
    val = copy.deepcopy(cfg)
    val.eval.compile = False
    return val


def init_backbone(cfg: KavaConfig) -> Backbone:
    """``build_backbone`` with the global RNG seeded from ``train.seed`` first: every
    process draws the same initial LoRA / projection tensors (FSDP does not broadcast
    them from rank 0 as DDP does)."""
    torch.manual_seed(cfg.train.seed)
    return build_backbone(cfg)


def _mixed_precision(cfg: KavaConfig) -> str:
    mp = cfg.train.mixed_precision
    if mp == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return mp


def compile_enabled(cfg: KavaConfig, device: torch.device) -> bool:
    """``train.compile``: auto = on CUDA."""
    return cfg.train.compile == "layers" or (cfg.train.compile == "auto" and device.type == "cuda")


def apply_speed_options(backbone: Backbone, cfg: KavaConfig, device: torch.device) -> None:
    """Compiled layer pass, attention with or without K/V copies, fused q/k/v
    projections, chunked cross-entropy, activation checkpointing, no fp32 copies of LoRA
    inputs under bf16 autocast (train.compile, train.attention, train.fused_qkv,
    train.chunked_ce, train.activation_checkpointing, train.mixed_precision)."""
    if _mixed_precision(cfg) == "bf16":
        backbone.lora_input_cast(False)
    backbone.attention_copies(cfg.train.attention == "repeat_kv")
    backbone.fused_qkv(cfg.train.fused_qkv)
    backbone.chunked_ce(cfg.train.chunked_ce, compiled=compile_enabled(cfg, device))
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


def write_log(log_file, rec: dict) -> None:
    """One ``log.jsonl`` line: valid JSON (non-finite floats become null, named in
    ``nonfinite``), flushed at once."""
    log_file.write(json.dumps(json_safe(rec), allow_nan=False) + "\n")
    log_file.flush()


def step_decision(
    accelerator, step_bad: torch.Tensor, grad_norm, names: list[str], stop: bool
) -> tuple[list[str], bool]:
    """The loss terms (and ``grad_norm``) that were non-finite on ANY process in this
    step, and whether any process got SIGTERM: the flags are summed over processes (one
    collective), so every rank takes the same decisions."""
    norm = torch.as_tensor(grad_norm, device=step_bad.device).float().reshape(1)
    stop_flag = torch.tensor([float(stop)], device=step_bad.device)
    flags = torch.cat([step_bad.float(), nonfinite_flags(norm).float(), stop_flag])
    flags = (accelerator.reduce(flags, reduction="sum") > 0).tolist()
    return flagged_names(flags[:-1], names), flags[-1]


def nonfinite_message(step: int, parts: list[str], run_dir: Path, cfg: KavaConfig) -> str:
    newest = latest_checkpoint(run_dir)
    kept = (
        f"the newest checkpoint {newest} holds the last good weights"
        if newest
        else "no checkpoint was saved yet"
    )
    return (
        f"{describe(step, parts)}; the update was not applied and {kept}. Lower train.lr "
        f"(now {cfg.train.lr:g}) or set train.on_nonfinite=skip"
    )


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
    from accelerate.utils import DataLoaderConfiguration, set_seed
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    t = cfg.train
    run_dir = Path(t.output_dir)
    log_with = trackers(cfg, run_dir)
    accelerator = Accelerator(
        mixed_precision=_mixed_precision(cfg),
        log_with=log_with or None,
        project_dir=str(run_dir),
        # no example repeated to even out the processes' shares: the epoch's micro-batches
        # are dealt as they are, and every step takes whole global batches (parallel)
        dataloader_config=DataLoaderConfiguration(even_batches=False),
    )
    world, rank = accelerator.num_processes, accelerator.process_index
    accum = max(1, t.global_batch_size // (t.micro_batch_size * world))
    if accum * t.micro_batch_size * world != t.global_batch_size:
        log.warning(
            "global batch %d is not micro-batch %d x processes %d x accumulation; using %d",
            t.global_batch_size,
            t.micro_batch_size,
            world,
            accum * t.micro_batch_size * world,
        )
    set_seed(t.seed)  # the same on every process: identical trainable tensors (init_backbone)
    # before anything is loaded or written: a refused run leaves the folder untouched;
    # every process checks before the main one may write (else a slower one would find
    # the main one's config.yaml and refuse)
    changes = check_resume(run_dir, cfg) if resume else check_fresh(run_dir)
    check_spec(cfg.data.train)  # a mistyped dataset fails now, not after a Hub round trip
    if t.eval_every:
        check_spec(t.eval_dataset)
    accelerator.wait_for_everyone()

    # the main process converts / downloads / caches the model and data first
    with accelerator.main_process_first():
        backbone = init_backbone(cfg)
        examples = load_train_examples(cfg)
    if rank > 0:  # each other process its own dropout stream; rank 0 goes on as 1 process
        set_seed(t.seed, device_specific=True)
    fsdp = parallel.is_fsdp(accelerator)
    if fsdp:
        parallel.check_fsdp(accelerator, t.eval_every)
        backbone.use_hf_layers("FSDP: each layer gathers its weights in its own forward")
    apply_speed_options(backbone, cfg, accelerator.device)
    model = KavaModel(backbone, cfg)
    without_cot = check_cot(examples, cfg)
    data = encode_examples(examples, backbone, cfg)
    val_examples = load_validation_examples(cfg)
    val_cfg = validation_config(cfg)
    n_skipped = sum(data.skipped.values())
    manifest: dict = {}
    if accelerator.is_main_process:
        if not resume:  # a resumed run keeps its original config.yaml and data stats
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run_dir / "config.yaml")
            stats = {"examples": data.total, "kept": len(data.items), "skipped": data.skipped}
            if without_cot:
                stats["without_cot"] = without_cot
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
    if fsdp:
        parallel.keep_gathered(model)

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

    # counted on the whole data set, not on this process's share of it (kava.parallel)
    batches_per_epoch = math.ceil(len(data.items) / t.micro_batch_size)
    if batches_per_epoch < accum * world:  # a data set smaller than the global batch
        if batches_per_epoch < world:
            raise ConfigError(
                f"train.micro_batch_size: {len(data.items)} examples make {batches_per_epoch} "
                f"micro-batches of {t.micro_batch_size}, fewer than the {world} processes; "
                "lower train.micro_batch_size or use fewer processes"
            )
        log.warning(
            "an epoch has %d micro-batches, fewer than the %d of a global batch: "
            "each optimizer step uses the whole epoch",
            batches_per_epoch,
            accum * world,
        )
        accum = batches_per_epoch // world
    steps_per_epoch = parallel.steps_per_epoch(len(data.items), t.micro_batch_size, accum, world)
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
    warmup = int(t.warmup_ratio * total_steps)
    if t.lr_schedule == "cosine":
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    else:
        scheduler = get_constant_schedule_with_warmup(optimizer, warmup)
    curriculum = Curriculum(cfg, steps_per_epoch, backbone.ids)
    if curriculum.kind != "none":
        longest_cot = max((len(e.cot) for e in data.items), default=0)
        first = curriculum.check_reaches_eval_form(longest_cot, total_steps)
        accelerator.print(
            f"curriculum: the form evaluation answers in (no written CoT) trains from step "
            f"{first} of {total_steps} ({(total_steps - first) / total_steps:.0%} of training)"
        )
    layout = parallel.describe(world, fsdp=fsdp)

    step = 0
    best: dict | None = None  # {"step", "accuracy"} of best/ so far (train.eval_every)
    skipped_steps = consecutive_skips = 0  # train.on_nonfinite: skip
    if t.init_from is not None and not resume:
        load_trainable(backbone, t.init_from)  # e.g. Coconut from a CoT run's final/
        accelerator.print(f"initialised the trainable tensors from {t.init_from}")
    if resume:
        if accelerator.is_main_process:
            clean_staging(run_dir)  # leftovers of a save interrupted by a crash
        accelerator.wait_for_everyone()
        resumed = resume_state(
            run_dir, rank_state_name(accelerator.process_index), accelerator.num_processes
        )
        ckpt = resumed.path
        apply_trainable(backbone, resumed.trainable, ckpt / TRAINABLE)
        state = resumed.trainer
        saved_fsdp = state.get("parallel", {}).get("fsdp", False)
        if saved_fsdp != fsdp:  # the optimizer state is laid out per parameter name under FSDP
            raise CheckpointError(
                f"{ckpt}: saved {'with' if saved_fsdp else 'without'} FSDP, resumed "
                f"{'with' if fsdp else 'without'}: resume with the accelerate config it was "
                "saved with"
            )
        if fsdp:  # saved whole (parallel.full_optimizer_state); each process its shards
            parallel.load_full_optimizer_state(model, optimizer, state["optimizer"])
        else:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(resumed.rank["rng"])
        step = state["step"]
        best = state.get("best")
        skipped_steps = state.get("skipped_steps", 0)
        consecutive_skips = state.get("consecutive_skips", 0)
        if accelerator.is_main_process:
            truncate_log(run_dir / "log.jsonl", step)
            record_resume(run_dir, step, changes)
        accelerator.print(f"resumed from {ckpt} at step {step}")

    if accelerator.is_main_process:
        device = device_info(accelerator.device.type, accelerator.num_processes)
        manifest = start_manifest(run_dir, cfg, device, resume, parallel=layout)
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
        """Save into ``path.tmp`` from every process, then commit (checksums, fsync,
        rename) from the main one; older step-N folders beyond train.save_total_limit go.
        ``extra``: ``extra_json`` / ``extra_text`` files (``hub_files``)."""
        accelerator.wait_for_everyone()
        tmp = staging_path(path)
        # under FSDP every process takes part in gathering the whole tensors (collectives);
        # the files hold them whole, as from one process
        trainable = trainable_state(backbone) if fsdp else None
        optim = None
        if with_state:
            optim = (
                parallel.full_optimizer_state(model, optimizer) if fsdp else optimizer.state_dict()
            )
        if accelerator.is_main_process:
            start_staging(path)
            state = None
            if with_state:
                state = {
                    "step": step,
                    "optimizer": optim,
                    "scheduler": scheduler.state_dict(),
                    "best": best,
                    "skipped_steps": skipped_steps,
                    "consecutive_skips": consecutive_skips,
                    "parallel": layout,
                }
            write_checkpoint_files(tmp, backbone, cfg, state, trainable=trainable, **extra)
        accelerator.wait_for_everyone()
        if with_state:  # every process has its own RNG stream (dropout); each saves its own
            write_rank_state(tmp, rank_state_name(rank), {"rng": rng_state()})
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            commit_checkpoint(tmp, path)
            if path.parent.name == "checkpoints":
                prune_checkpoints(run_dir, t.save_total_limit)
        accelerator.wait_for_everyone()

    def validate() -> dict[str, float]:
        """Decode the validation split, every process its share of the batches
        (kava.parallel); keep best/ (written by the main process) when it is the most
        accurate so far. Returns the log fields."""
        nonlocal best
        from kava.evaluate import evaluate

        accelerator.wait_for_everyone()
        where = parallel.Shard(rank, world)
        m = evaluate(
            backbone, val_cfg, val_examples, name="validation", progress=False, where=where
        )
        fields = {"val_accuracy": m["accuracy"], "val_passes": m["mean_forward_passes"]}
        if best is None or m["accuracy"] > best["accuracy"]:  # ties keep the earlier
            best = {"step": step, "accuracy": m["accuracy"]}
            if accelerator.is_main_process:
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

    stop = StopRequest().__enter__()  # SIGTERM: checkpoint at the next step boundary
    try:
        model.train()
        sums: dict[str, torch.Tensor] = {}  # loss terms of the applied steps since the last line
        step_sums: dict[str, torch.Tensor] = {}  # loss terms of the step being accumulated
        step_bad: torch.Tensor | None = None  # which loss terms were non-finite in this step
        window_nonfinite: list[str] = []  # terms non-finite in steps skipped since the last line
        n_micro, step_micro, tokens, exhausted, t0 = 0, 0, 0, 0, time.perf_counter()
        n_examples = 0  # examples this process trained on since the last log line
        while step < total_steps:
            epoch, done_in_epoch = divmod(step, steps_per_epoch)
            dl = loader(epoch)
            skip = done_in_epoch * accum
            if skip:
                dl = accelerator.skip_first_batches(dl, skip)
            for i, items in enumerate(dl, start=skip):
                if i >= steps_per_epoch * accum:
                    break  # leftover micro-batches that do not fill an optimizer step
                micro = parallel.global_micro(i % accum, rank, world)  # in the global batch
                built = curriculum.batch(items, step, micro)
                batch = built.batch.to(accelerator.device)
                accelerator.unwrap_model(model).seed_draws(step, micro)
                exhausted += built.cot_exhausted
                sync = (i + 1) % accum == 0
                ctx = accelerator.no_sync(model) if not sync else torch.enable_grad()
                with ctx:
                    out = model(batch)
                    accelerator.backward(out.total / accum)
                if fsdp:
                    parallel.reshard_micro_batch(model)
                for k, v in out.metrics.items():
                    step_sums[k] = step_sums[k] + v if k in step_sums else v
                bad = nonfinite_flags(torch.stack(list(out.metrics.values())))
                step_bad = bad if step_bad is None else step_bad | bad
                del out  # teacher capture, latent KV, compressed KV: free before the next forward
                step_micro += 1
                tokens += batch_tokens(batch, cfg)
                n_examples += len(items)
                if not sync:
                    continue
                # the norm is computed without clipping too (max_norm=inf scales by exactly 1)
                grad_norm = accelerator.clip_grad_norm_(
                    backbone.trainable_parameters(), t.grad_clip if t.grad_clip > 0 else math.inf
                )
                grad_norm = parallel.full_value(grad_norm)  # FSDP: a DTensor
                lr = scheduler.get_last_lr()[0]  # the lr this step used
                names = [*step_sums, "grad_norm"]
                bad_parts, stopping = step_decision(
                    accelerator, step_bad, grad_norm, names, stop.requested
                )
                if curriculum.resets_optimizer and curriculum.switches_at(step):
                    reset_optimizer_state(optimizer)  # a new stage / removal count starts here
                if bad_parts:
                    if accelerator.is_main_process:
                        write_log(log_file, {"step": step + 1, "nonfinite": bad_parts, "lr": lr})
                    if t.on_nonfinite == "stop":
                        raise NonFiniteError(nonfinite_message(step + 1, bad_parts, run_dir, cfg))
                    skipped_steps += 1
                    consecutive_skips += 1
                    window_nonfinite += [p for p in bad_parts if p not in window_nonfinite]
                    if consecutive_skips >= t.max_consecutive_skips:
                        raise NonFiniteError(
                            nonfinite_message(step + 1, bad_parts, run_dir, cfg)
                            + f" ({consecutive_skips} steps in a row skipped; "
                            "train.max_consecutive_skips)"
                        )
                    accelerator.print(f"{describe(step + 1, bad_parts)}: optimizer step skipped")
                else:
                    consecutive_skips = 0
                    optimizer.step()
                    for k, v in step_sums.items():
                        sums[k] = sums[k] + v if k in sums else v
                    n_micro += step_micro
                scheduler.step()  # the schedule follows the step (and the data position)
                optimizer.zero_grad(set_to_none=True)
                step_sums, step_bad, step_micro = {}, None, 0
                step += 1
                validating = val_examples is not None and (
                    step % t.eval_every == 0 or step == total_steps
                )
                val_fields = validate() if validating else {}
                if step % t.log_every == 0 or step == total_steps or validating:
                    elapsed = time.perf_counter() - t0
                    # mean over the micro-batches of the applied steps since the last log
                    # line, and over processes (null when every step since was skipped)
                    rec: dict = dict.fromkeys(names[:-1])
                    if n_micro:
                        means = accelerator.reduce(
                            torch.stack(list(sums.values())) / n_micro, reduction="mean"
                        )
                        rec.update(zip(sums, means.tolist()))
                    # throughput of all processes: their counts summed
                    counts = torch.tensor([tokens, n_examples], device=accelerator.device)
                    all_tokens, all_examples = accelerator.reduce(counts, reduction="sum").tolist()
                    rec.update(
                        step=step,
                        epoch=round(step / steps_per_epoch, 4),
                        lr=lr,
                        tokens_per_s=all_tokens / max(elapsed, 1e-9),
                        examples_per_s=all_examples / max(elapsed, 1e-9),
                        grad_norm=float(grad_norm),
                        skipped_steps=skipped_steps,
                        **val_fields,
                    )
                    if window_nonfinite:
                        rec["nonfinite"] = window_nonfinite
                    if curriculum.kind != "none":
                        value = curriculum.value(step - 1)  # of the step just taken
                        rec["curriculum"] = "all" if math.isinf(value) else int(value)
                        counted = torch.tensor(exhausted, device=accelerator.device)
                        rec["cot_exhausted"] = int(accelerator.reduce(counted, reduction="sum"))
                    rec = json_safe(rec)
                    if accelerator.is_main_process:
                        write_log(log_file, rec)
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
                            if rec.get(k) is not None
                        }
                    )
                    sums, n_micro, tokens, exhausted, t0 = {}, 0, 0, 0, time.perf_counter()
                    n_examples = 0
                    window_nonfinite = []
                bar.update(1)
                saving = t.save_every and step % t.save_every == 0
                if (saving or stopping) and step < total_steps:
                    checkpoint(run_dir / "checkpoints" / f"step-{step}", with_state=True)
                if stopping and step < total_steps:
                    raise TrainingInterrupted(
                        f"SIGTERM: saved {run_dir / 'checkpoints' / f'step-{step}'} at step "
                        f"{step} of {total_steps}; continue with --resume"
                    )
                if step >= total_steps:
                    break
    finally:  # also when a NonFiniteError stops the run: the log lines so far are kept
        stop.__exit__()
        bar.close()
        if accelerator.is_main_process:
            log_file.close()
    final = run_dir / "final"
    if accelerator.is_main_process:
        manifest = finished(manifest)
        write_manifest(run_dir, manifest)
    checkpoint(final, with_state=True, **(hub_files() if accelerator.is_main_process else {}))
    if accelerator.is_main_process:
        for tracker in accelerator.trackers:
            tracker.finish()
    accelerator.print(f"saved {final}")
    return final
