"""The Python API: load a trained kava model and ask it questions.

    from kava import LatentReasoner

    model = LatentReasoner.from_pretrained("runs/kava/final")        # or RUN, RUN/best, a Hub id
    result = model.solve(["Tom has 3 apples and buys 2 more. How many now?"])
    result.answers, result.texts, result.passes                       # parsed numbers, texts, passes
    model.evaluate("gsm8k", limit=100)["accuracy"]

Every method answers the way it was trained (its ``kava.methods`` entry): the latent ones
(KaVa, PCCoT, CODI, Coconut) with latent decoding, CoT / No-CoT / iCoT with plain greedy
decoding. Argument names follow transformers where they apply (``max_new_tokens``,
``batch_size``, ``device``, ``dtype``); defaults come from the checkpoint's ``eval.*``
config keys.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kava.backbone import DTYPES, Backbone, default_device
from kava.checkpoint import TRAINABLE, CheckpointError, load_checkpoint, recover
from kava.config import KavaConfig
from kava.data import Example, normalize_answer
from kava.evaluate import Prediction, load_eval_examples, make_generator, predict
from kava.evaluate import evaluate as evaluate_examples
from kava.inference import Generator
from kava.methods import Method
from kava.parallel import Shard

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SolveResult:
    """Answers to a list of questions, in their order."""

    answers: list[float | None]  # the number parsed from each text (None: no number)
    texts: list[str]  # what the model generated (without special tokens)
    passes: list[int]  # forward passes spent on each question

    def __len__(self) -> int:
        return len(self.texts)


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A local checkpoint folder: ``path`` itself when it holds ``trainable.safetensors``,
    else ``path/final`` (a run folder). Raises ``CheckpointError`` naming what is missing."""
    path = Path(path)
    if (path / TRAINABLE).is_file():
        return path
    if (path / "final" / TRAINABLE).is_file():
        return path / "final"
    hint = " (it has best/: pass RUN/best)" if (path / "best" / TRAINABLE).is_file() else ""
    raise CheckpointError(
        f"{path} is neither a kava checkpoint (no {TRAINABLE}) nor a run folder with a "
        f"final/ checkpoint{hint}"
    )


def download_checkpoint(
    repo_id: str, revision: str | None = None, token: str | bool | None = None
) -> Path:
    """The local snapshot of a Hub model repo (``huggingface_hub.snapshot_download``).
    Raises ``FileNotFoundError`` when ``repo_id`` is no valid repo id or the Hub (or the
    local Hub cache) cannot provide it; the message names the id and the cause."""
    import huggingface_hub
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise FileNotFoundError(
            f"{repo_id}: not a local folder, nor a valid Hugging Face Hub repo id (owner/name)"
        ) from None
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, revision=revision, token=token))
    except Exception as e:  # offline, unknown repo, gated, ...: say which id and why
        raise FileNotFoundError(
            f"{repo_id}: not a local folder, and the Hugging Face Hub could not provide it "
            f"({type(e).__name__}: {e})"
        ) from e


def _dtype_name(dtype: str | torch.dtype | None) -> str | None:
    if dtype is None or isinstance(dtype, str):
        if dtype is not None and dtype != "auto" and dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}: expected one of {['auto', *DTYPES]}")
        return dtype
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"dtype {dtype}: expected one of {list(DTYPES.values())}")


def _as_example(item: Example | Mapping[str, Any], i: int) -> Example:
    if isinstance(item, Example):
        return item
    if isinstance(item, Mapping) and "question" in item and "answer" in item:
        where = f"examples[{i}]"
        return Example(
            str(item["question"]), (), normalize_answer(item["answer"], where=where, field="answer")
        )
    raise TypeError(f"examples[{i}]: expected a kava Example or a {{question, answer}} mapping")


class LatentReasoner:
    """A trained kava model (any method of ``kava.methods``) ready to answer questions.

    ``backbone`` and ``config`` are what ``kava.checkpoint.load_checkpoint`` returns;
    ``path`` is the checkpoint folder it came from (None when built in memory). Decoding
    runs on ``kava.evaluate.make_generator``: with ``eval.merge_lora`` (the default) a
    LoRA-merged copy of the weights, made at the first call and kept.
    """

    def __init__(self, backbone: Backbone, config: KavaConfig, path: Path | None = None):
        self.backbone = backbone
        self.config = config
        self.path = path
        self._generator: Generator | None = None

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | Path,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        overrides: list[str] | None = None,
    ) -> LatentReasoner:
        """Load a checkpoint: a local folder (``RUN/final``, ``RUN/best``, or ``RUN``
        meaning its ``final/``) or a Hugging Face Hub repo id (``kava push``), downloaded
        with ``snapshot_download`` (``revision``, ``token`` go there).

        ``device``: default the GPU if there is one. ``dtype``: the frozen base weights'
        dtype (``model.dtype``: "auto", "float32", "bfloat16", "float16" or a
        ``torch.dtype``; default the checkpoint's). ``overrides``: ``key=value`` config
        overrides, as ``--set`` (e.g. ``eval.batch_size=16``).
        """
        local = Path(path_or_repo_id).expanduser()
        if local.with_name(local.name + ".old").is_dir():
            recover(local)  # a final/ caught between the two renames of its replacement
        if local.is_dir():
            folder = resolve_checkpoint_dir(local)
        else:
            folder = resolve_checkpoint_dir(
                download_checkpoint(str(path_or_repo_id), revision, token)
            )
        overrides = list(overrides or [])
        name = _dtype_name(dtype)
        if name is not None:
            overrides.append(f"model.dtype={name}")
        backbone, cfg = load_checkpoint(folder, overrides)
        backbone.to(torch.device(device) if device is not None else default_device())
        return cls(backbone.eval(), cfg, folder)

    # --- what it is -------------------------------------------------------------------
    @property
    def method(self) -> Method:
        """The methods-table entry of the checkpoint's method (``kava.methods``)."""
        return self.config.method_spec

    @property
    def device(self) -> torch.device:
        return self.backbone.new_token_embeddings.device

    def __repr__(self) -> str:
        where = f" from {self.path}" if self.path is not None else ""
        return f"LatentReasoner({self.method.label}, {self.config.model.name_or_path}{where})"

    # --- answering --------------------------------------------------------------------
    def _config(self, max_new_tokens: int | None) -> KavaConfig:
        """The config with ``max_new_tokens`` in the key this method decodes with."""
        if max_new_tokens is None:
            return self.config
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        cfg = copy.deepcopy(self.config)
        if cfg.method_spec.writes_cot:
            cfg.eval.cot_max_new_tokens = max_new_tokens
        else:
            cfg.eval.max_new_tokens = max_new_tokens
        return cfg

    def _generator_for(self) -> Generator:
        if self._generator is None:
            self._generator = make_generator(self.backbone, self.config)
        return self._generator

    def _predict(
        self,
        questions: Sequence[str | Example],
        batch_size: int | None,
        max_new_tokens: int | None,
        progress: bool,
    ) -> list[Prediction]:
        return predict(
            self.backbone,
            self._config(max_new_tokens),
            questions,
            batch_size=batch_size,
            generator=self._generator_for(),
            progress=progress,
        )

    def generate(
        self,
        questions: str | Sequence[str],
        *,
        max_new_tokens: int | None = None,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> list[str]:
        """The generated text for each question (greedy; latent decoding for the latent
        methods). ``max_new_tokens``: default ``eval.max_new_tokens`` (answers) or
        ``eval.cot_max_new_tokens`` (a method that writes its CoT)."""
        if isinstance(questions, str):
            questions = [questions]
        return [p.text for p in self._predict(questions, batch_size, max_new_tokens, progress)]

    def solve(
        self,
        questions: str | Sequence[str],
        *,
        batch_size: int | None = None,
        max_new_tokens: int | None = None,
        progress: bool = False,
    ) -> SolveResult:
        """Answer questions: parsed numbers, generated texts and forward passes, in order."""
        if isinstance(questions, str):
            questions = [questions]
        preds = self._predict(questions, batch_size, max_new_tokens, progress)
        return SolveResult(
            [p.parsed for p in preds], [p.text for p in preds], [p.passes for p in preds]
        )

    def evaluate(
        self,
        dataset_name_or_examples: str | Sequence[Example | Mapping[str, Any]],
        limit: int | None = None,
        *,
        batch_size: int | None = None,
        max_new_tokens: int | None = None,
        out_dir: str | Path | None = None,
        progress: bool = False,
        return_predictions: bool = False,
        where: Shard | None = None,
    ) -> dict[str, Any]:
        """Accuracy and forward passes (``kava.evaluate.evaluate``'s metrics dict) on a
        dataset (a name such as ``gsm8k``, a file, ``synthetic`` or a Hub id, as ``kava
        eval --datasets``) or on examples (``Example``s or ``{question, answer}``
        mappings); the first ``limit``. With ``out_dir``: ``metrics.json`` and
        ``predictions.jsonl`` there. ``where``: this process's share of several
        (``kava.parallel.current_shard``; ``kava eval`` under ``accelerate launch``)."""
        cfg = self._config(max_new_tokens)
        if isinstance(dataset_name_or_examples, str):
            name = dataset_name_or_examples
            examples = load_eval_examples(name, cfg, limit)
        else:
            name = "examples"
            examples = [_as_example(x, i) for i, x in enumerate(dataset_name_or_examples)]
            examples = examples if limit is None else examples[:limit]
        return evaluate_examples(
            self.backbone,
            cfg,
            examples,
            batch_size=batch_size,
            out_dir=out_dir,
            name=name,
            progress=progress,
            return_predictions=return_predictions,
            generator=self._generator_for(),
            where=where,
        )
