"""Coconut against an independent reference (float64, CPU, tiny Llama and Qwen2).

The reference knows nothing of kava's caches, masks or batching: one example at a time,
a loop of full-sequence forwards of the HF model (``inputs_embeds``, no cache, no
padding) that appends the last position's final hidden state as the next input by hand,
then one forward over the whole sequence and a cross-entropy over the supervised tokens.
float64, because six thoughts fed back through a chaotic random model (init 0.3) amplify
fp32 rounding to ~3e-4 of a gradient's scale; kava's logits are float32 (``Backbone.logits``),
which bounds the float64 agreement at ~1e-6.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import EXAMPLES
from kava.batching import collate_coconut, encode_steps
from kava.coconut import coconut_forward
from kava.config import CoconutConfig, load_config
from kava.curricula import coconut_layout
from kava.inference import Generator
from kava.losses import mean_ce
from kava.model import KavaModel

TOL = dict(atol=2e-5, rtol=1e-4)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


def items(bb, examples=EXAMPLES):
    return [encode_steps(q, s, a, bb.tokenizer, bb.ids) for q, s, a in examples]


def hf_hidden(bb, embeds: torch.Tensor) -> torch.Tensor:
    """Final-norm hidden states ``[1, S, D]`` of one unpadded row, through HF's own model."""
    out = bb.lm(inputs_embeds=embeds, output_hidden_states=True)
    return out.hidden_states[-1]


def masked_logits(bb, hidden: torch.Tensor) -> torch.Tensor:
    """The lm_head over the tokenizer's ids, kava's four tokens excluded (written here:
    kava never predicts them, so the reference must not either)."""
    logits = F.linear(hidden, bb.lm.get_output_embeddings().weight)[..., : len(bb.tokenizer)]
    new = torch.tensor([bb.ids.bot, bb.ids.eot, bb.ids.latent, bb.ids.pad])
    return logits.index_fill(-1, new, float("-inf"))


def reference_nll(bb, e, thoughts: int, skip: int) -> tuple[torch.Tensor, int]:
    """Summed NLL and token count of one example with ``thoughts`` thoughts replacing its
    first ``skip`` steps."""
    emb = bb.embed(torch.tensor([e.question + [bb.ids.bot]]))
    for _ in range(thoughts):
        h = hf_hidden(bb, emb)[:, -1:]  # the last position's output becomes the next input
        emb = torch.cat([emb, h], dim=1)
    rest = [bb.ids.eot] + [t for s in e.steps[skip:] for t in s] + e.prompt + e.answer
    rest = rest + [bb.ids.eos]
    full = torch.cat([emb, bb.embed(torch.tensor([rest]))], dim=1)
    logits = masked_logits(bb, hf_hidden(bb, full))[0]
    start = emb.shape[1]  # column of <eot>; it predicts the first supervised token
    targets = torch.tensor(rest[1:])
    nll = F.cross_entropy(logits[start : start + len(rest) - 1], targets, reduction="sum")
    return nll, len(rest) - 1


def grads(bb, loss):
    bb.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in bb.named_parameters() if p.grad is not None}


LAYOUTS = {
    "stage 0 (CoT)": [(0, 0)] * 4,
    "stage 1": [(2, 1)] * 4,
    "last stage": [(6, 9)] * 4,  # all steps removed, 3 x c thoughts
    "mixed rows": [(0, 0), (2, 1), (4, 2), (6, 9)],  # uniform_prob: a stage per row
}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_coconut_loss_and_gradients_match_the_reference(make_backbone, arch, layout):
    bb = make_backbone(arch, init_range=0.3).double()
    enc = items(bb)
    thoughts = [t for t, _ in LAYOUTS[layout]]
    skips = [min(k, len(e.steps)) for e, (_, k) in zip(enc, LAYOUTS[layout])]
    batch = collate_coconut(enc, bb.ids, thoughts, skips, bucket=8)  # padded, bucketed
    loss = mean_ce(*coconut_forward(bb, batch))
    got = grads(bb, loss)

    ref = [reference_nll(bb, e, t, k) for e, t, k in zip(enc, thoughts, skips)]
    ref_loss = sum(n for n, _ in ref) / sum(c for _, c in ref)
    want = grads(bb, ref_loss)
    torch.testing.assert_close(loss, ref_loss.to(loss.dtype), **TOL)
    assert got.keys() == want.keys() and any("lora_B" in n for n in got)
    for n in got:
        scale = want[n].abs().max().item()
        torch.testing.assert_close(got[n], want[n], atol=1e-5 * scale, rtol=1e-4, msg=n)
    if max(thoughts) > 0:  # the thoughts carry gradient: the loss depends on pass 0's path
        assert got["new_token_embeddings"].abs().sum() > 0


def test_coconut_method_trains_through_kava_model(make_backbone):
    bb = make_backbone("llama")
    cfg = load_config(overrides=["method=coconut"])
    enc = items(bb)
    batch = collate_coconut(enc, bb.ids, [2] * 4, [1] * 4)
    out = KavaModel(bb, cfg)(batch)
    assert set(out.metrics) == {"loss", "student_ce"}
    out.total.backward()
    lora = [p.grad for n, p in bb.named_parameters() if "lora_B" in n]
    assert all(g is not None and g.abs().sum() > 0 for g in lora)
    assert not bb.prj.net[0].weight.requires_grad or bb.prj.net[0].weight.grad is None


@pytest.mark.parametrize(
    "stage, steps, pad, expected",
    [
        (0, 3, True, (0, 0)),
        (1, 3, True, (2, 1)),
        (2, 1, True, (4, 1)),  # fewer steps than the stage removes: all gone, k*c thoughts
        (3, 5, True, (6, 3)),
        (4, 5, True, (6, 5)),  # past the last stage: every step removed, max thoughts
        (4, 2, True, (6, 2)),
        (4, 2, False, (4, 2)),  # pad_latent_to_max off: min(steps, max stage) * c
    ],
)
def test_coconut_layout(stage, steps, pad, expected):
    cfg = CoconutConfig(thoughts_per_step=2, max_latent_stage=3, pad_latent_to_max=pad)
    assert coconut_layout(stage, steps, cfg) == expected


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("n_thoughts", [0, 1, 4])
def test_coconut_generation_matches_reference_and_counts_passes(make_backbone, arch, n_thoughts):
    """Batched static-cache generation = a reference greedy loop of full forwards, per
    question; passes = thoughts + generated tokens (1 + generated without thoughts)."""
    bb = make_backbone(arch, init_range=0.3)
    enc = items(bb)
    prompt = enc[0].prompt
    rows = [e.question + [bb.ids.bot] for e in enc]
    width = max(map(len, rows))
    ids = torch.tensor([[bb.ids.pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows])
    calls = []
    hook = bb.register_forward_hook(lambda *a: calls.append(1))
    gen = Generator(bb, cuda_graphs=False, compile=False).coconut(
        ids, mask, prompt, n_thoughts, max_new_tokens=5, stop_token=None
    )
    hook.remove()
    assert len(calls) == (n_thoughts if n_thoughts else 1) + 5
    assert gen.passes == [len(calls)] * 4
    with torch.no_grad():
        for row, e in zip(gen.tokens, enc):
            emb = bb.embed(torch.tensor([e.question + [bb.ids.bot]]))
            for _ in range(n_thoughts):
                emb = torch.cat([emb, hf_hidden(bb, emb)[:, -1:]], dim=1)
            emb = torch.cat([emb, bb.embed(torch.tensor([[bb.ids.eot, *prompt]]))], dim=1)
            want = []
            for _ in range(5):
                nxt = int(masked_logits(bb, hf_hidden(bb, emb)[:, -1]).argmax(-1))
                want.append(nxt)
                emb = torch.cat([emb, bb.embed(torch.tensor([[nxt]]))], dim=1)
            assert row == want
    assert len({tuple(t) for t in gen.tokens}) > 1  # outputs depend on the question
