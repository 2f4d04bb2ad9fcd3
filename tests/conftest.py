"""Shared fixtures: the SmolLM2 tokenizer (offline) and tiny random Llama / Qwen2 models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from kava.backbone import Backbone, load_tokenizer, resolve_model_source
from kava.config import LoraConfig, ModelConfig

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

EXAMPLES = [
    (
        "Mia has 7 apples. She buys 5 more apples. Then she gives 3 away. How many apples does Mia have?",
        ["<<7+5=12>>", "<<12-3=9>>"],
        "9",
    ),
    ("Tom has 3 cats.", ["<<3*2=6>>", "<<6+1=7>>", "<<7-1=6>>"], "6"),
    (
        "A box holds 12 pens and 4 more pencils than pens. Each pencil costs 2 dollars. "
        "How much do the pencils cost in all?",
        ["<<12+4=16>>", "<<16*2=32>>"],
        "32",
    ),
    ("Sam reads 5 pages a day for 4 days.", ["<<5*4=20>>"], "20"),
]


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module (``pytestmark = pytest.mark.usefixtures(
    "one_thread")``): tiny models run fastest so, immune to a busy CPU, and CPU kernels
    are bit-reproducible run to run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer():
    source, _ = resolve_model_source(ModelConfig())
    return load_tokenizer(source)


def tiny_lm(arch: str, vocab: int, seed: int = 0, init_range: float = 0.02, **config):
    """A tiny random Llama (tied embeddings) or Qwen2 (untied); ``config`` overrides keys
    of its HF config (e.g. ``tie_word_embeddings=False``)."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab,
        hidden_size=48,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=8,
        num_hidden_layers=2,
        intermediate_size=96,
        initializer_range=init_range,
    )
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**{"tie_word_embeddings": True, **common, **config}))
    if arch == "qwen2":  # untied, qkv bias, like Qwen2.5
        return Qwen2ForCausalLM(Qwen2Config(**{"tie_word_embeddings": False, **common, **config}))
    raise ValueError(arch)


def base_tokenizer(tokenizer):
    """The SmolLM2 tokenizer as a base model ships it: without kava's tokens."""
    return type(tokenizer).from_pretrained(tokenizer.name_or_path)


def save_tiny_model(path: Path, tokenizer, init_range: float = 0.3) -> Path:
    """A tiny random Llama (GQA) saved at ``path`` as a regular local HF folder, with the
    SmolLM2 tokenizer (without kava's tokens); returns ``path``."""
    base_tok = base_tokenizer(tokenizer)
    tiny_lm("llama", len(base_tok), init_range=init_range).save_pretrained(path)
    base_tok.save_pretrained(path)
    return path


@pytest.fixture
def make_backbone(tokenizer):
    def make(arch="llama", dropout=0.0, use_projection=True, seed=0, lora=True, init_range=0.02):
        # init_range ~0.3 lets frozen random embeddings express confident logits (overfitting)
        lm = tiny_lm(arch, len(tokenizer), seed, init_range)
        cfg = LoraConfig(enabled=lora, r=8, alpha=16, dropout=dropout)
        bb = Backbone.from_model(lm, tokenizer, cfg, use_projection)
        # LoRA B starts at zero; give it values so the adapters change the function
        torch.manual_seed(seed + 1)
        for n, p in bb.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02)
        return bb.eval()

    return make


def train_steps(model, batch, opt, steps: int = 30) -> list[dict]:
    """``steps`` optimizer steps of a ``KavaModel`` on one fixed ``batch``; the loss
    terms of each step (``history[0]``: before any update)."""
    history = []
    for _ in range(steps):
        out = model(batch)
        opt.zero_grad()
        out.total.backward()
        opt.step()
        history.append(out.terms)
    return history


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama (GQA) saved as a regular local HF folder, with the SmolLM2 tokenizer."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), tokenizer)


def tiny_run_config(model_dir, output_dir, **sections) -> dict:
    """A config dict for a few-second training run of the tiny model (sections update it)."""
    cfg = {
        "method": "kava",
        "model": {"name_or_path": str(model_dir)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "latent": {"num_latents": 3, "num_iterations": 2},
        "data": {"train": "synthetic", "synthetic_train_size": 8},
        "train": {
            "output_dir": str(output_dir),
            "max_steps": 2,
            "global_batch_size": 4,
            "micro_batch_size": 4,
            "lr": 0.01,
            "save_every": 0,
            "eval_every": 2,
            "eval_dataset": "synthetic",
            "eval_limit": 4,
        },
        "eval": {"datasets": ["synthetic"], "limit": 6, "batch_size": 4, "max_new_tokens": 4},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    return cfg


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tokenizer):
    """A trained tiny KaVa run folder (2 steps; final/ and best/), shared by the session:
    tests that change it work on a copy."""
    import yaml

    from kava.cli import main

    root = tmp_path_factory.mktemp("tiny-run")
    model_dir = save_tiny_model(root / "base", tokenizer)
    config = root / "cfg.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config(model_dir, root / "run")))
    assert main(["train", str(config), "--no-progress"]) == 0
    return root / "run"
