"""Invariants of the teacher / student passes on tiny random GQA models (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import EXAMPLES, train_steps
from kava import losses
from kava.batching import StudentBatch, collate, collate_student, encode
from kava.config import load_config
from kava.data import Example
from kava.inference import Generator, generate_latent
from kava.kv import stack_kv
from kava.model import KavaModel, answer_pass, latent_passes, student_forward, teacher_forward
from kava.tokens import IGNORE

ATOL = 1e-5


def encoded(bb, examples=EXAMPLES, drop_last=True):
    return [encode(q, s, a, bb.tokenizer, bb.ids, drop_last_step=drop_last) for q, s, a in examples]


def config(m=4, t=2, **over):
    ov = [f"latent.num_latents={m}", f"latent.num_iterations={t}"]
    ov += [f"{k}={v}" for k, v in over.items()]
    return load_config(overrides=ov)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_padding_invariance(make_backbone, arch):
    """A question alone and inside a left-padded batch with longer questions agree."""
    bb = make_backbone(arch)
    enc = encoded(bb)
    lens = [len(e.question) for e in enc]
    short = lens.index(min(lens))
    assert sorted(lens)[1] > lens[short]  # every other row is longer: this row gets left pads
    with torch.no_grad():
        alone = student_forward(bb, collate_student([enc[short]], bb.ids), 4, 2)
        batch = student_forward(bb, collate_student(enc, bb.ids), 4, 2)
        t_alone = teacher_forward(bb, collate([enc[short]], bb.ids).teacher)
        t_batch = teacher_forward(bb, collate(enc, bb.ids).teacher)
    for x_alone, x_batch in zip(alone.state.inputs, batch.state.inputs):
        torch.testing.assert_close(x_batch[short], x_alone[0], atol=ATOL, rtol=0)
    assert batch.count[short] == alone.count[0]
    # per-token loss (a sum of ~20 token losses would need a looser bound than 1e-5)
    torch.testing.assert_close(
        batch.nll_sum[short] / batch.count[short],
        alone.nll_sum[0] / alone.count[0],
        atol=ATOL,
        rtol=0,
    )
    torch.testing.assert_close(batch.hidden[:, short], alone.hidden[:, 0], atol=ATOL, rtol=0)
    torch.testing.assert_close(t_batch.nll_sum[short], t_alone.nll_sum[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(t_batch.hidden[:, short], t_alone.hidden[:, 0], atol=ATOL, rtol=0)
    for l in range(bb.num_layers):
        n = t_alone.capture.keys[l].shape[2]
        torch.testing.assert_close(
            t_batch.capture.keys[l][short, :, :n], t_alone.capture.keys[l][0], atol=ATOL, rtol=0
        )
    # generation: same tokens and passes alone and in the batch
    sb, s1 = collate_student(enc, bb.ids), collate_student([enc[short]], bb.ids)
    prompt = enc[0].prompt
    g_batch = generate_latent(bb, sb.question_ids, sb.question_mask, prompt, 4, 2, max_new_tokens=6)
    g_alone = generate_latent(bb, s1.question_ids, s1.question_mask, prompt, 4, 2, max_new_tokens=6)
    assert g_batch.tokens[short] == g_alone.tokens[0]
    assert g_batch.passes[short] == g_alone.passes[0]


def sequential_reference(bb, e, m):
    """CODI-style decoding, one latent at a time, full recompute with plain model calls."""
    ids = e.question + [bb.ids.bot]
    seq = bb.embed(torch.tensor([ids]))
    latents = []
    for _ in range(m):
        h = bb.decoder(inputs_embeds=seq).last_hidden_state[:, -1:]
        x = bb.prj(h)
        latents.append(x[0, 0])
        seq = torch.cat([seq, x], dim=1)
    answer = [bb.ids.eot] + e.prompt + e.answer + [bb.ids.eos]
    seq = torch.cat([seq, bb.embed(torch.tensor([answer]))], dim=1)
    h = bb.decoder(inputs_embeds=seq).last_hidden_state[0, -len(answer) :]
    return torch.stack(latents), bb.logits(h)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("t_extra", [0, 2])
def test_jacobi_with_t_ge_m_is_sequential(make_backbone, arch, t_extra):
    bb = make_backbone(arch)
    enc = encoded(bb)
    m = 3
    with torch.no_grad():
        out = student_forward(bb, collate_student(enc, bb.ids), m, m + t_extra)
        for row, e in enumerate(enc):
            want_latents, want_logits = sequential_reference(bb, e, m)
            torch.testing.assert_close(out.state.inputs[-1][row], want_latents, atol=ATOL, rtol=0)
            # answer-pass logits at the supervised positions, via the loss
            labels = torch.tensor([[-100] + e.prompt + e.answer + [bb.ids.eos]])
            s, c = losses.token_nll(want_logits[None], labels)
            torch.testing.assert_close(out.nll_sum[row], s[0], atol=1e-4, rtol=1e-5)


def test_jacobi_with_t_lt_m_differs_from_sequential(make_backbone):
    """Guards the test above: with too few iterations the latents are not yet sequential."""
    bb = make_backbone()
    e = encoded(bb)[0]
    with torch.no_grad():
        out = student_forward(bb, collate_student([e], bb.ids), 4, 2)
        want, _ = sequential_reference(bb, e, 4)
    assert not torch.allclose(out.state.inputs[-1][0], want, atol=1e-3)


def test_t0_is_pause_tokens(make_backbone):
    bb = make_backbone("qwen2")
    enc = encoded(bb)
    m = 3
    with torch.no_grad():
        out = student_forward(bb, collate_student(enc, bb.ids), m, 0)
        for row, e in enumerate(enc):
            answer = [bb.ids.eot] + e.prompt + e.answer + [bb.ids.eos]
            ids = e.question + [bb.ids.bot] + [bb.ids.latent] * m + answer
            h = bb.decoder(inputs_embeds=bb.embed(torch.tensor([ids]))).last_hidden_state
            labels = torch.tensor([[-100] * (len(ids) - len(answer) + 1) + answer[1:]])
            s, _ = losses.token_nll(bb.logits(h), labels)
            torch.testing.assert_close(out.nll_sum[row], s[0], atol=1e-4, rtol=1e-5)


def test_selected_nll_equals_full_logits(make_backbone):
    bb = make_backbone()
    batch = collate(encoded(bb), bb.ids).teacher
    with torch.no_grad():
        t = teacher_forward(bb, batch, capture_kv=False, hidden=False)
        pos = (batch.attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        h = bb.decoder(
            inputs_embeds=bb.embed(batch.input_ids),
            attention_mask=batch.attention_mask,
            position_ids=pos,
        ).last_hidden_state
        s, c = losses.token_nll(bb.logits(h), batch.labels)
    torch.testing.assert_close(t.nll_sum, s, atol=1e-4, rtol=1e-5)
    assert torch.equal(t.count, c)


def test_selected_nll_gradients_equal_full_logits(make_backbone):
    """The optimised loss path (logits only at labelled rows) has the plain path's gradients."""
    bb = make_backbone("qwen2")
    batch = collate(encoded(bb), bb.ids).teacher
    pos = (batch.attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def grads(optimised: bool):
        bb.zero_grad()
        if optimised:
            t = teacher_forward(bb, batch, capture_kv=False, hidden=False)
            loss = losses.mean_ce(t.nll_sum, t.count)
        else:
            h = bb.decoder(
                inputs_embeds=bb.embed(batch.input_ids),
                attention_mask=batch.attention_mask,
                position_ids=pos,
            ).last_hidden_state
            loss = losses.mean_ce(*losses.token_nll(bb.logits(h), batch.labels))
        loss.backward()
        return loss.detach(), {
            n: p.grad.clone() for n, p in bb.named_parameters() if p.grad is not None
        }

    loss_opt, g_opt = grads(True)
    loss_plain, g_plain = grads(False)
    torch.testing.assert_close(loss_opt, loss_plain, atol=1e-5, rtol=1e-5)
    assert g_opt.keys() == g_plain.keys() and any("lora" in n for n in g_opt)
    for n in g_opt:
        torch.testing.assert_close(g_opt[n], g_plain[n], atol=1e-6, rtol=1e-4)


def test_gradients_reach_every_trainable_part(make_backbone):
    bb = make_backbone()
    model = KavaModel(bb, config(m=4, t=3))
    out = model(collate(encoded(bb), bb.ids))
    for x in out.student.state.inputs:
        x.retain_grad()
    out.total.backward()
    assert len(out.student.state.inputs) == 3
    for i, x in enumerate(out.student.state.inputs):
        assert x.grad is not None and x.grad.abs().sum() > 0, (
            f"no gradient through iteration {i + 1}"
        )
    lora = {n: p for n, p in bb.named_parameters() if "lora_B" in n}
    assert len(lora) == 4 * bb.num_layers
    for n, p in lora.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    for n, p in bb.prj.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    g = bb.new_token_embeddings.grad
    for tok in (bb.ids.bot, bb.ids.eot, bb.ids.latent):
        assert g[tok - bb.first_new_id].abs().sum() > 0
    frozen = [n for n, p in bb.named_parameters() if not p.requires_grad]
    assert any("embed_tokens" in n for n in frozen) and all(
        p.grad is None for n, p in bb.named_parameters() if not p.requires_grad
    )


def distill_grads(bb, cfg, teacher_no_grad):
    batch = collate(encoded(bb), bb.ids)
    bb.zero_grad()
    from kava.model import compress_teacher_kv

    ctx = torch.no_grad() if teacher_no_grad else torch.enable_grad()
    with ctx:
        teacher = teacher_forward(bb, batch.teacher)
    student = student_forward(bb, batch.student, cfg.latent.num_latents, cfg.latent.num_iterations)
    comp = compress_teacher_kv(teacher.capture, batch.teacher, cfg.latent.num_latents)
    loss = losses.codi_loss(student.hidden, teacher.hidden, "smooth_l1", True) + losses.kv_loss(
        *stack_kv(student.state.latent_kv), comp.k, comp.v, comp.slot_mask, "smooth_l1", True
    )
    loss.backward()
    return teacher, {n: p.grad.clone() for n, p in bb.named_parameters() if p.grad is not None}


def test_teacher_targets_carry_no_gradient(make_backbone):
    bb = make_backbone()
    cfg = config()
    teacher, g_live = distill_grads(bb, cfg, teacher_no_grad=False)
    assert not teacher.hidden.requires_grad
    assert not any(t.requires_grad for t in teacher.capture.keys.values())
    assert not any(t.requires_grad for t in teacher.capture.values.values())
    _, g_frozen = distill_grads(bb, cfg, teacher_no_grad=True)
    assert g_live.keys() == g_frozen.keys()
    for n in g_live:
        torch.testing.assert_close(g_live[n], g_frozen[n], atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("method", ["icot", "coconut"])
def test_overfit_few_examples_with_a_curriculum(make_backbone, arch, method):
    """~30 AdamW steps on 4 examples at a later curriculum step (iCoT: 8 tokens removed with
    smoothing; Coconut: stage 1, 2 thoughts) lower the loss. Coconut's thoughts feed the
    chaotic hidden states of a random model back in: a lower lr keeps it stable (its
    recipe starts from a CoT-trained model for that reason)."""
    bb = make_backbone(arch, dropout=0.1, init_range=0.3).train()
    cfg = config(m=3, t=2, method=method, **{"coconut.epochs_per_stage": 0.5})
    model = KavaModel(bb, cfg)
    batch = method_batch(bb, cfg, step=1 if method == "coconut" else 8)
    opt = torch.optim.AdamW(bb.trainable_parameters(), lr=1e-2 if method == "coconut" else 2e-2)
    history = train_steps(model, batch, opt)
    assert history[-1]["loss"] < 0.7 * history[0]["loss"], (history[0], history[-1])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("method", ["kava", "pccot", "codi", "cot", "nocot"])
def test_overfit_few_examples(make_backbone, arch, method):
    """~30 AdamW steps on 4 examples lower the total loss (every method, every loss term on)."""
    bb = make_backbone(arch, dropout=0.1, init_range=0.3).train()
    cfg = config(m=3, t=2, method=method)
    model = KavaModel(bb, cfg)
    drop = method != "cot"
    ex = EXAMPLES if method != "nocot" else [(q, [], a) for q, _, a in EXAMPLES]
    batch = collate(encoded(bb, ex, drop_last=drop), bb.ids)
    opt = torch.optim.AdamW(bb.trainable_parameters(), lr=2e-2)
    history = train_steps(model, batch, opt)
    first, last = history[0], history[-1]
    assert last["loss"] < 0.7 * first["loss"], (first, last)
    assert last["teacher_ce"] < 0.85 * first["teacher_ce"], (first, last)
    if cfg.is_latent:
        assert last["student_ce"] < 0.85 * first["student_ce"], (first, last)
    if method == "kava":  # KV term active (that it can be minimised: test_kv_loss_is_minimised)
        assert first["kv_loss"] > 0 and first["codi_loss"] > 0 and last["kv_loss"] > 0
    if method in ("pccot", "codi"):
        assert first["kv_loss"] == 0.0 and first["codi_loss"] > 0


@pytest.mark.parametrize("t", [0, 2])
def test_forward_pass_count(make_backbone, t):
    bb = make_backbone()
    enc = encoded(bb)
    calls = []
    hook = bb.register_forward_hook(lambda *a: calls.append(1))  # one call = one pass
    try:
        for max_new in (1, 5):
            for e in enc:
                sb = collate_student([e], bb.ids)
                calls.clear()
                g = generate_latent(bb, sb.question_ids, sb.question_mask, e.prompt, 3, t, max_new)
                n_answer = len(g.tokens[0])
                assert 1 <= n_answer <= max_new
                assert g.passes[0] == 1 + t + 1 + (n_answer - 1) == len(calls)
    finally:
        hook.remove()


@pytest.fixture
def build(monkeypatch, make_backbone):
    """``build_backbone(cfg)`` as training calls it, on a tiny model instead of a download."""
    from kava import backbone as backbone_module

    monkeypatch.setattr(
        backbone_module.Backbone, "from_config", classmethod(lambda cls, *a: make_backbone())
    )
    return backbone_module.build_backbone


def method_batch(bb, cfg, step: int = 0):
    """The training batch of ``cfg.method`` at optimizer ``step``, as kava.train builds it."""
    from kava.curricula import Curriculum
    from kava.train import encode_for_method

    exs = [Example(q, tuple(s), a) for q, s, a in EXAMPLES]
    items = [encode_for_method(e, bb, cfg) for e in exs]
    return Curriculum(cfg, steps_per_epoch=2, ids=bb.ids).batch(items, step).batch


def test_chunked_ce_trains_what_the_plain_ce_trains(build):
    """A KaVa step with train.chunked_ce (set as kava.train sets it) gives the loss terms
    and gradients of the plain cross-entropy, and never takes the [N, V] logits path."""
    from kava.train import apply_speed_options

    results = []
    for chunked in (True, False):
        cfg = config(m=3, t=2, method="kava", **{"train.chunked_ce": chunked})
        torch.manual_seed(0)
        bb = build(cfg)
        apply_speed_options(bb, cfg, torch.device("cpu"))
        if chunked:  # the plain recipe would call logits; the chunked one must not
            bb.logits = lambda h: pytest.fail("logits called under chunked_ce")
        out = KavaModel(bb, cfg)(method_batch(bb, cfg))
        out.total.backward()
        grads = {n: p.grad for n, p in bb.named_parameters() if p.requires_grad}
        results.append((out.metrics["student_ce"], out.metrics["teacher_ce"], grads))
    (s1, t1, g1), (s2, t2, g2) = results
    torch.testing.assert_close((s1, t1), (s2, t2), rtol=1e-5, atol=1e-6)
    assert g1.keys() == g2.keys() and g1
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "method, t",
    [
        ("kava", 0),
        ("kava", 2),
        ("pccot", 2),
        ("codi", 1),
        ("cot", 2),
        ("nocot", 2),
        ("icot", 2),
        ("coconut", 2),
    ],
)
def test_every_trainable_tensor_reaches_the_loss(build, method, t):
    """DDP requires it: a trainable tensor outside the graph crashes the gradient all-reduce
    (e.g. prj with T=0, pause tokens, which build_backbone must freeze)."""
    cfg = config(m=3, t=t, method=method, **{"coconut.epochs_per_stage": 0.5})
    bb = build(cfg)
    KavaModel(bb, cfg)(method_batch(bb, cfg, step=2)).total.backward()  # Coconut stage 2
    missing = [n for n, p in bb.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    uses_prj = cfg.method_spec.uses_projection and t > 0
    assert any(p.requires_grad for p in bb.prj.parameters()) == uses_prj


def test_kava_tokens_are_never_predicted(make_backbone):
    bb = make_backbone("qwen2")
    with torch.no_grad():
        logits = bb.logits(torch.randn(5, bb.hidden_size) * 10)
    assert logits.shape[-1] == len(bb.tokenizer)
    for tok in (bb.ids.bot, bb.ids.eot, bb.ids.latent, bb.ids.pad):
        assert torch.isinf(logits[:, tok]).all()
    assert torch.isfinite(logits[:, : bb.first_new_id]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_match_a_masked_float_copy(make_backbone, dtype):
    """`logits` (head output + a 0/-inf bias) equals the plain recipe bit for bit, forward
    and backward: the head's output cast to float32, kava's tokens set to -inf."""
    bb = make_backbone("llama")
    bb.lm_head.to(dtype)
    special = [bb.ids.bot, bb.ids.eot, bb.ids.latent, bb.ids.pad]
    hidden = (torch.randn(6, bb.hidden_size) * 3).to(dtype)
    target = torch.randint(0, bb.first_new_id, (6,))

    def reference(h):
        out = bb.lm_head(h)[:, : len(bb.tokenizer)].float().clone()
        out[:, special] = float("-inf")
        return out

    grads = []
    for fn in (bb.logits, reference):
        h = hidden.clone().requires_grad_()  # the head is frozen: the gradient goes to h
        logits = fn(h)
        assert logits.dtype == torch.float32
        torch.nn.functional.cross_entropy(logits, target).backward()
        grads.append((logits.detach(), h.grad))
    for got, want in zip(grads[0], grads[1]):
        assert torch.equal(got, want)
    assert torch.isinf(grads[0][0][:, special]).all()


@pytest.mark.parametrize("autocast", [False, True])
def test_nll_is_cross_entropy_of_the_logits(make_backbone, autocast):
    """`Backbone.nll` under `chunked_ce` (the training CE without keeping [N, V] logits)
    against F.cross_entropy of `logits`, value and gradient; under bf16 autocast both run
    the head's matmul in bf16."""
    bb = make_backbone("qwen2")  # spare rows past the tokenizer's: cut off in both
    bb.chunked_ce(True)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, bb.hidden_size, generator=g) * 3
    target = torch.randint(0, bb.first_new_id, (7,), generator=g)
    out = []
    for fn in (bb.nll, lambda h, t: F.cross_entropy(bb.logits(h), t, reduction="none")):
        h = hidden.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            nll = fn(h, target)
        nll.sum().backward()
        out.append((nll.detach(), h.grad))
    assert out[0][0].dtype == torch.float32
    # a sharded head (FSDP2: a DTensor, with placements) goes through the module instead
    bb.lm_head.weight.placements = ("Shard(dim=0)",)
    seen = []
    logits = bb.logits
    bb.logits = lambda h: seen.append(h) or logits(h)
    bb.nll(hidden, target)
    assert len(seen) == 1
    tol = {"rtol": 1e-2, "atol": 1e-2} if autocast else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(out[0][0], out[1][0], **tol)
    torch.testing.assert_close(out[0][1], out[1][1], **tol)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_kv_loss_is_minimised(make_backbone, arch):
    """The student's latent KV moves onto fixed compressed teacher KV when only L_KV is trained."""
    from kava.model import compress_teacher_kv

    bb = make_backbone(arch, init_range=0.3).train()
    batch = collate(encoded(bb), bb.ids)
    with torch.no_grad():
        teacher = teacher_forward(bb, batch.teacher)
        comp = compress_teacher_kv(teacher.capture, batch.teacher, 3)
    opt = torch.optim.AdamW(bb.trainable_parameters(), lr=1e-2)
    history = []
    for _ in range(40):
        state = student_forward(bb, batch.student, 3, 2).state
        loss = losses.kv_loss(
            *stack_kv(state.latent_kv), comp.k, comp.v, comp.slot_mask, "smooth_l1", True
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert history[-1] < 0.5 * history[0], history


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("m,t", [(3, 2), (3, 0), (2, 3)])
def test_training_answer_pass_scores_what_generation_generates(make_backbone, arch, m, t):
    """Training and inference condition the answer on the same latents, positions and
    cache: the answer pass that training scores, fed the tokens that greedy latent
    generation produced (teacher forcing), has its argmax on those tokens at every
    position, and its NLL is minus the sum of the log-softmax maxima."""
    bb = make_backbone(arch, init_range=0.3)
    enc = encoded(bb)
    sb = collate(enc, bb.ids).student
    prompt, n = enc[0].prompt, 5
    gen = Generator(bb).latent(sb.question_ids, sb.question_mask, prompt, m, t, n, stop_token=None)
    g = torch.tensor(gen.tokens)  # [B, n]
    assert g.shape == (len(enc), n) and len({tuple(r) for r in gen.tokens}) > 1
    head = torch.tensor([[bb.ids.eot, *prompt]] * len(enc))  # <eot> ++ prompt
    batch = StudentBatch(
        question_ids=sb.question_ids,
        question_mask=sb.question_mask,
        answer_ids=torch.cat([head, g], 1),
        answer_mask=torch.ones(len(enc), head.shape[1] + n, dtype=torch.bool),
        answer_labels=torch.cat([torch.full_like(head, IGNORE), g], 1),
        distill_index=head.shape[1] - 1,
    )
    seen = []  # the hidden states training scores, [B * n, D], labelled positions row-major
    nll = bb.nll
    bb.nll = lambda h, target: seen.append(h) or nll(h, target)
    with torch.no_grad():
        out = answer_pass(bb, batch, latent_passes(bb, sb.question_ids, sb.question_mask, m, t))
        del bb.nll
        (hidden,) = seen
        scored = bb.logits(hidden)  # [B * n, V]
    assert torch.equal(scored.argmax(-1).reshape(g.shape), g)
    best = scored.log_softmax(-1).max(-1).values.reshape(g.shape).sum(-1)
    torch.testing.assert_close(out.nll_sum, -best)
    assert out.count.tolist() == [n] * len(enc)


def test_probing_latents_ignores_dropout_and_keeps_the_mode(make_backbone):
    """``kava inspect`` reads a checkpoint that loads in train mode: the probe computes in
    eval mode (as evaluation decodes), so two calls agree, and the mode is given back."""
    from kava.inspect_latents import probe_latents

    bb = make_backbone(dropout=0.5, init_range=0.3).train()
    with torch.no_grad():  # adapters large enough that a dropout mask moves the top tokens
        for name, p in bb.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.5)
    cfg = config(m=3, t=2)
    question = EXAMPLES[0][0]
    first, second = (probe_latents(bb, cfg, question, top_k=3) for _ in range(2))
    assert bb.training and first == second
    assert first == probe_latents(bb.eval(), cfg, question, top_k=3)
