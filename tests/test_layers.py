"""The optimised paths against the plain ones (fp32, CPU, tiny Llama and Qwen2).

* kava's own layer loop (``kava.layers``, ``Backbone.fast``) against HF's decoder forward;
* the layer pass under ``torch.compile`` against eager (backend ``aot_eager``: dynamo's
  tracing and AOTAutograd as on the GPU, without code generation);
* activation checkpointing against none;
* length buckets against tight padding;
in losses, every gradient, captured K/V and generated tokens.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from conftest import EXAMPLES
from kava.batching import collate, encode, pad_rows
from kava.config import load_config
from kava.inference import generate_latent, generate_text
from kava.kv import stack_kv
from kava.losses import kv_loss
from kava.model import KavaModel, student_forward, teacher_forward

TOL = dict(atol=2e-5, rtol=1e-4)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


def cfg(**over):
    ov = ["latent.num_latents=3", "latent.num_iterations=2", *(f"{k}={v}" for k, v in over.items())]
    return load_config(overrides=ov)


def batch(bb, bucket=1, examples=EXAMPLES):
    enc = [encode(q, s, a, bb.tokenizer, bb.ids) for q, s, a in examples]
    return collate(enc, bb.ids, bucket)


def loss_and_grads(bb, c, b):
    bb.zero_grad(set_to_none=True)
    out = KavaModel(bb, c)(b)
    out.total.backward()
    grads = {n: p.grad.clone() for n, p in bb.named_parameters() if p.grad is not None}
    return out, grads


def assert_same(a, b):
    (out_a, g_a), (out_b, g_b) = a, b
    for k in out_a.metrics:
        torch.testing.assert_close(out_a.metrics[k], out_b.metrics[k], **TOL, msg=k)
    assert g_a.keys() == g_b.keys() and any("lora_B" in n for n in g_a)
    for n in g_a:  # fp32 rounding: relative to the gradient's own scale
        scale = g_b[n].abs().max().item()
        torch.testing.assert_close(g_a[n], g_b[n], atol=1e-5 * scale, rtol=1e-4, msg=n)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fast_path_matches_hf_forward(make_backbone, arch):
    # float64: kava's grouped-query attention sums in another order than HF's repeat_kv,
    # which at init_range 0.3 moves fp32 gradients by ~3e-5 of their scale
    bb = make_backbone(arch, init_range=0.3).double()
    assert bb.fast, bb.fast_path_blocker
    b = batch(bb)
    c = cfg()
    fast = loss_and_grads(bb, c, b)
    bb.fast = False
    hf = loss_and_grads(bb, c, b)
    assert fast[0].metrics["kv_loss"] > 0 and fast[0].metrics["codi_loss"] > 0
    assert_same(fast, hf)
    # the captured teacher rows and hidden states agree too
    with torch.no_grad():
        hf_t = teacher_forward(bb, b.teacher)
        bb.fast = True
        fast_t = teacher_forward(bb, b.teacher)
    torch.testing.assert_close(fast_t.hidden, hf_t.hidden, **TOL)
    for what in ("queries", "keys", "values"):
        torch.testing.assert_close(
            fast_t.capture.stacked(what), hf_t.capture.stacked(what), **TOL, msg=what
        )


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fast_path_generates_what_hf_forward_generates(make_backbone, arch):
    bb = make_backbone(arch, init_range=0.3)
    b = batch(bb).student
    prompt = encode("q", (), "1", bb.tokenizer, bb.ids).prompt
    prompts = [encode(q, (), a, bb.tokenizer, bb.ids).question for q, _, a in EXAMPLES]
    runs = []
    for fast in (True, False):
        bb.fast = fast
        lat = generate_latent(bb, b.question_ids, b.question_mask, prompt, 3, 2, 6)
        txt = generate_text(bb, prompts, 6)
        runs.append((lat.tokens, lat.passes, txt.tokens, txt.passes))
    assert runs[0] == runs[1]
    assert len({tuple(t) for t in runs[0][0]}) > 1  # outputs depend on the question


def unique_graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_compiled_layer_pass_matches_eager(make_backbone, arch):
    """Compiled losses and gradients equal eager ones over batches of several shapes, and a
    handful of graphs serve every layer and pass (no per-layer variants)."""
    torch._dynamo.reset()
    counters.clear()
    eager = make_backbone(arch, init_range=0.3)
    compiled = make_backbone(arch, init_range=0.3)
    compiled.compile_layers(backend="aot_eager")  # batch and length dims marked dynamic
    c = cfg()
    shapes = [(8, EXAMPLES), (8, EXAMPLES[:2]), (16, EXAMPLES[1:])]
    for bucket, exs in shapes:
        b = batch(eager, bucket, exs)
        assert_same(loss_and_grads(compiled, c, b), loss_and_grads(eager, c, b))
    # variants: prefix of 0, 1 or 2 segments, with or without query capture; the lengths
    # and batch sizes of later batches reuse them (nothing is specialised on a length)
    assert unique_graphs() <= 4, counters["stats"]
    b = batch(eager, 4, EXAMPLES[2:] + EXAMPLES[:1])
    assert_same(loss_and_grads(compiled, c, b), loss_and_grads(eager, c, b))
    assert unique_graphs() <= 4, counters["stats"]
    assert compiled.num_layers == 2  # tiny model; the bound does not grow with layers


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_compiled_generation_generates_what_eager_generates(make_backbone, arch):
    """Generation with compiled layer passes (``Generator(compile=...)``) gives the eager
    tokens and pass counts, latent and text, over two batch shapes, with a few graphs."""
    from kava.inference import Generator

    torch._dynamo.reset()
    counters.clear()
    bb = make_backbone(arch, init_range=0.3)
    prompt = encode("q", (), "1", bb.tokenizer, bb.ids).prompt
    runs = []
    for compile in (False, {"backend": "aot_eager"}):
        gen = Generator(bb, compile=compile)
        assert gen.compiled == bool(compile)
        out = []
        for exs, bucket in ((EXAMPLES, 1), (EXAMPLES[1:], 16)):
            b = batch(bb, bucket, exs).student
            lat = gen.latent(b.question_ids, b.question_mask, prompt, 3, 2, 6)
            rows = [encode(q, (), a, bb.tokenizer, bb.ids).question for q, _, a in exs]
            ids = pad_rows(rows, bb.ids.pad, left=True, multiple_of=bucket)
            mask = pad_rows([[1] * len(r) for r in rows], 0, left=True, multiple_of=bucket)
            txt = gen.text(ids, mask.bool(), 6)
            out.append((lat.tokens, lat.passes, txt.tokens, txt.passes))
        runs.append(out)
    assert runs[0] == runs[1]
    # inputs / output halves, each for one-token passes and for longer ones (size-1
    # specialisation), at most once more for a dynamic batch size
    assert 0 < unique_graphs() <= 8, counters["stats"]


def test_activation_checkpointing_keeps_losses_gradients_and_kv_graph(make_backbone):
    """Checkpointed layers give the same losses and gradients; the KV loss alone still has
    a gradient into LoRA (the failure elsewhere: checkpointing detached the captured K/V)."""
    plain = make_backbone("qwen2", init_range=0.3)
    ckpt = make_backbone("qwen2", init_range=0.3)
    ckpt.checkpoint_layers()
    b = batch(plain)
    c = cfg()
    assert_same(loss_and_grads(ckpt, c, b), loss_and_grads(plain, c, b))
    for bb in (ckpt, make_backbone("llama", init_range=0.3)):
        bb.checkpoint_layers()
        for fast in (True, False):
            bb.fast = fast
            bb.zero_grad(set_to_none=True)
            with torch.no_grad():
                teacher = teacher_forward(bb, b.teacher)
            from kava.model import compress_teacher_kv

            comp = compress_teacher_kv(teacher.capture, b.teacher, 3)
            student = student_forward(bb, b.student, 3, 2)
            loss = kv_loss(
                *stack_kv(student.state.latent_kv), comp.k, comp.v, comp.slot_mask, "mse", True
            )
            loss.backward()
            lora = [p.grad for n, p in bb.named_parameters() if "lora_B" in n]
            assert lora and all(g is not None and g.abs().sum() > 0 for g in lora), fast


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_attention_with_kv_copies_matches_grouped(make_backbone, arch):
    """train.attention repeat_kv (K/V copied per query head) and grouped give the same
    losses and gradients, and kava.train switches the backbone as configured."""
    from kava.train import apply_speed_options

    # float64: the two sum in another order (fp32 gradients ~2e-5 of their scale apart)
    grouped = make_backbone(arch, init_range=0.3).double()
    copies = make_backbone(arch, init_range=0.3).double()
    c = cfg()
    assert c.train.attention == "repeat_kv"
    apply_speed_options(copies, c, torch.device("cpu"))
    apply_speed_options(grouped, cfg(**{"train.attention": "grouped"}), torch.device("cpu"))
    assert copies._copy_kv and not grouped._copy_kv
    attn = grouped.layers[0].self_attn  # the tiny models are grouped-query (G > 1)
    assert attn.q_proj.out_features > attn.k_proj.out_features
    b = batch(grouped)
    assert_same(loss_and_grads(copies, c, b), loss_and_grads(grouped, c, b))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_bucket_invariance(make_backbone, arch):
    """Padding every segment to a multiple of 5 or 16 changes no loss term or latent."""
    bb = make_backbone(arch, init_range=0.3)
    c = cfg()
    model = KavaModel(bb, c)
    batches = [batch(bb, bucket) for bucket in (1, 5, 16)]
    with torch.no_grad():
        outs = [model(b) for b in batches]
    widths = {(b.teacher.input_ids.shape[1], b.student.answer_ids.shape[1]) for b in batches}
    assert len(widths) == 3  # the buckets did change the shapes
    for o in outs[1:]:
        for k in o.metrics:
            torch.testing.assert_close(o.metrics[k], outs[0].metrics[k], **TOL, msg=k)
        for x, x0 in zip(o.student.state.inputs, outs[0].student.state.inputs):
            torch.testing.assert_close(x, x0, **TOL)


@pytest.mark.parametrize("h_q,h_kv,s", [(6, 2, 5), (4, 4, 3), (8, 2, 1)])
@pytest.mark.parametrize("copies", [False, True])
def test_grouped_attention_matches_per_head_softmax(h_q, h_kv, s, copies):
    """Grouped-query attention without K/V copies, and with them (``train.attention:
    repeat_kv``), against a loop over query heads, each reading KV head ``head // (h_q //
    h_kv)``, with an explicit masked softmax."""
    from kava.layers import grouped_attention, repeated_kv_attention

    attend = repeated_kv_attention if copies else grouped_attention

    torch.manual_seed(0)
    b, s_k, d = 3, 7, 4
    q = torch.randn(b, h_q, s, d, dtype=torch.float64)
    k, v = (torch.randn(b, h_kv, s_k, d, dtype=torch.float64) for _ in range(2))
    mask = torch.rand(b, 1, s, s_k) > 0.4
    mask[..., 0] = True  # every query sees at least one key
    out = attend(q, k, v, mask, scale=0.3)
    ref = torch.empty_like(out)
    for head in range(h_q):
        kv_head = head // (h_q // h_kv)
        scores = 0.3 * q[:, head] @ k[:, kv_head].transpose(-1, -2)  # [B, S, S_k]
        scores = scores.masked_fill(~mask[:, 0], float("-inf"))
        ref[:, head] = scores.softmax(-1) @ v[:, kv_head]
    torch.testing.assert_close(out, ref)
