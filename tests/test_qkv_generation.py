"""Fused q/k/v in generation (``eval.fused_qkv``, ``kava.qkv.project_plain``): the static-cache
passes of a LoRA-merged copy run q/k/v as one GEMM against the three weights laid out as
rows of one buffer. Against the unfused copy (CPU, float64, tiny Llama and Qwen2 with
q/k/v biases): tokens, pass counts and hidden states of latent and text generation at
batch > 1 with padding, compiled too; no extra memory; casts and moved weights after the
layout; the fallback; and the CUDA-only default."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from conftest import EXAMPLES
from kava import evaluate, layers, qkv
from kava.batching import collate, encode, pad_rows
from kava.config import load_config
from kava.inference import Generator

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest

ARCHS = ["llama", "qwen2"]


def merged(make_backbone, arch: str, dtype=torch.float64):
    """A merged copy (what evaluation decodes with) of a tiny backbone whose LoRA and
    q/k/v biases (Qwen2; HF initialises them to zero) have values."""
    bb = make_backbone(arch, init_range=0.3)
    torch.manual_seed(5)
    with torch.no_grad():
        for n, t in bb.named_parameters():
            if n.endswith("bias") and "_proj" in n:
                t.normal_(std=0.5)
    return bb.merged_copy().to(dtype)


def generate(gen: Generator, bucket: int = 16):
    """Latent and text generation of the conftest questions (batch 4, left-padded to
    ``bucket`` columns): tokens and passes of each, and every session's final hidden
    states and latents ``[B, D]``, ``[B, M, D]``."""
    bb = gen.bb
    prompt = encode("q", (), "1", bb.tokenizer, bb.ids).prompt
    s = collate([encode(q, st, a, bb.tokenizer, bb.ids) for q, st, a in EXAMPLES], bb.ids, bucket)
    lat = gen.latent(s.student.question_ids, s.student.question_mask, prompt, 3, 2, 5)
    rows = [encode(q, (), a, bb.tokenizer, bb.ids).question for q, _, a in EXAMPLES]
    ids = pad_rows(rows, bb.ids.pad, left=True, multiple_of=bucket)
    mask = pad_rows([[1] * len(r) for r in rows], 0, left=True, multiple_of=bucket).bool()
    assert not mask.all()  # padded rows
    txt = gen.text(ids, mask, 8, stop_token=None)  # CoT-like: tokens until the limit
    states = [
        t.clone()
        for sess in gen.sessions.values()
        for t in (sess.last_hidden, sess.latents)
        if t is not None
    ]
    return (lat.tokens, lat.passes, txt.tokens, txt.passes), states


def assert_same_generation(got, ref, rtol=1e-10, atol=1e-10):
    assert got[0] == ref[0]
    assert len(got[1]) == len(ref[1]) > 0
    for a, b in zip(got[1], ref[1]):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def count_fused(monkeypatch) -> dict:
    """Counts calls of ``project_plain`` (the fused GEMM) from ``attention_inputs``."""
    calls = {"fused": 0}

    def counting(*args):
        calls["fused"] += 1
        return qkv.project_plain(*args)

    monkeypatch.setattr(layers, "project_plain", counting)
    return calls


def all_laid_out(bb) -> bool:
    return all(qkv.laid_out(layer.self_attn) is not None for layer in bb.layers)


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_generation_equals_unfused(make_backbone, monkeypatch, arch):
    off, on = merged(make_backbone, arch), merged(make_backbone, arch)
    assert (on.layers[0].self_attn.q_proj.bias is not None) == (arch == "qwen2")
    calls = count_fused(monkeypatch)
    ref = generate(Generator(off, fused_qkv=False))
    assert calls["fused"] == 0 and not any(qkv.laid_out(x.self_attn) for x in off.layers)
    gen = Generator(on, fused_qkv=True)
    assert gen.fused_qkv and all_laid_out(on)  # laid out when the generator is built
    got = generate(gen)
    assert calls["fused"] > 0 and calls["fused"] % on.num_layers == 0  # every layer pass
    assert_same_generation(got, ref)
    assert len(set(map(tuple, got[0][2]))) > 1  # the rows differ: the test can see a mix-up


def parameter_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def storage_bytes(module) -> int:
    """Bytes of the distinct storages behind ``module``'s parameters and buffers."""
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for t in module.state_dict().values()
    }
    return sum(storages.values())


def test_layout_keeps_state_dict_and_memory(make_backbone):
    bb = merged(make_backbone, "qwen2")
    before = {n: t.clone() for n, t in bb.state_dict().items()}
    params, storage = parameter_bytes(bb), storage_bytes(bb)
    assert bb.fused_qkv_generation(True) == bb.num_layers
    assert all_laid_out(bb)
    after = bb.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert parameter_bytes(bb) == params
    assert storage_bytes(bb) == storage  # the three weights are rows of one buffer, no copy
    attn = bb.layers[0].self_attn
    weight, bias = qkv.laid_out(attn)
    assert weight.untyped_storage().data_ptr() == attn.v_proj.weight.untyped_storage().data_ptr()
    assert bias.shape == (sum(qkv.prepare_plain(attn).sizes),)


@pytest.mark.parametrize("arch", ARCHS)
def test_cast_or_moved_weight_after_layout_is_read_fresh(make_backbone, arch):
    """A ``.to(dtype)`` after the layout gives each weight its own storage: the next pass
    lays out again and matches the unfused cast copy. A weight replaced afterwards (its
    own storage, other values) is read from where it is now, never from the old buffer."""
    on = merged(make_backbone, arch, torch.float32)
    off = merged(make_backbone, arch, torch.float32)
    gen = Generator(on, fused_qkv=True)
    assert all_laid_out(on)
    on.double()
    off.double()
    assert not any(qkv.laid_out(x.self_attn) for x in on.layers)
    ref = generate(Generator(off, fused_qkv=False))
    assert_same_generation(generate(gen), ref)
    assert all_laid_out(on)  # laid out again, in float64
    with torch.no_grad():
        for bb in (on, off):
            k = bb.layers[1].self_attn.k_proj
            torch.manual_seed(9)
            k.weight.data = torch.randn_like(k.weight) * 0.3  # no longer a view of the buffer
    assert qkv.laid_out(on.layers[1].self_attn) is None
    new_ref = generate(Generator(off, fused_qkv=False))
    assert new_ref[0] != ref[0]  # the new weight changes what is generated
    assert_same_generation(generate(gen), new_ref)


def test_unsupported_layers_fall_back(make_backbone, caplog):
    """A layer with a hook on k_proj, or q/k/v of different dtypes, runs its three modules
    (the others fused), with a warning; a LoRA backbone (eval.merge_lora false) and HF's
    decoder loop run unfused entirely."""
    off, on = merged(make_backbone, "llama"), merged(make_backbone, "llama")
    seen = []
    for bb in (off, on):
        bb.layers[0].self_attn.k_proj.register_forward_hook(lambda *a: seen.append(1))
    attn = on.layers[0].self_attn
    assert "hooks" in qkv.plain_unfused_reason(attn) and qkv.prepare_plain(attn) is None
    ref = generate(Generator(off, fused_qkv=False))
    n_ref, seen[:] = len(seen), []
    with caplog.at_level(logging.WARNING, logger="kava.backbone"):
        gen = Generator(on, fused_qkv=True)
    assert "1 of 2 layers run unfused" in caplog.text and "hooks" in caplog.text
    assert gen.fused_qkv and qkv.laid_out(attn) is None
    assert qkv.laid_out(on.layers[1].self_attn) is not None
    assert_same_generation(generate(gen), ref)
    assert len(seen) == n_ref > 0  # the hook ran on every pass, as unfused

    mixed = merged(make_backbone, "llama", torch.float32)
    mixed.layers[1].self_attn.v_proj.double()
    assert "dtype" in qkv.plain_unfused_reason(mixed.layers[1].self_attn)
    assert mixed.fused_qkv_generation(True) == 1

    lora = make_backbone("qwen2", init_range=0.3)
    assert "not a plain nn.Linear" in qkv.plain_unfused_reason(lora.layers[0].self_attn)
    assert Generator(lora, fused_qkv=True).fused_qkv is False
    assert not any(qkv.laid_out(x.self_attn) for x in lora.layers)
    hf = merged(make_backbone, "llama")
    hf.use_hf_layers("test")
    assert hf.fused_qkv_generation(True) == 0 and not hf._fuse_static_qkv


def test_no_layout_inside_a_cuda_graph_capture(make_backbone, monkeypatch):
    """While a CUDA graph is captured (faked here: no GPU), a layer whose layout was lost
    runs its three modules: laying out would allocate inside the capture and free the
    storage the captured kernels read. A layout made before the capture is used."""
    bb = merged(make_backbone, "llama")
    attn, laid = bb.layers[0].self_attn, bb.layers[1].self_attn
    qkv.lay_out(laid)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert qkv.prepare_plain(attn) is None and qkv.laid_out(attn) is None
    assert qkv.prepare_plain(laid) is not None
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert qkv.prepare_plain(attn) is not None and qkv.laid_out(attn) is not None


def test_compiled_fused_generation_equals_eager_unfused(make_backbone):
    """Under ``torch.compile`` (aot_eager, as ``compile_generation`` on the GPU with
    inductor) the fused static passes give the eager unfused tokens (float32: rounding
    may differ from the eager order, so hidden states within 1e-5)."""
    import torch._dynamo

    torch._dynamo.reset()
    off = merged(make_backbone, "qwen2", torch.float32)
    on = merged(make_backbone, "qwen2", torch.float32)
    ref = generate(Generator(off, fused_qkv=False, compile=False))
    gen = Generator(on, fused_qkv=True, compile={"backend": "aot_eager"})
    assert gen.compiled and gen.fused_qkv
    assert_same_generation(generate(gen), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("method", "arch"), [("kava", "llama"), ("cot", "qwen2"), ("coconut", "qwen2")]
)
def test_evaluation_with_fused_generation_predicts_the_same(
    make_backbone, monkeypatch, method, arch
):
    """``kava.evaluate.predict`` on the merged copy, fused (forced on, as on CUDA) or not:
    the same texts and passes, latent, written CoT and Coconut's thoughts (batch 3 of 4
    questions: a full and a partial batch, both padded)."""
    overrides = [f"method={method}", "latent.num_latents=3", "latent.num_iterations=1"]
    overrides += ["coconut.max_latent_stage=2", "eval.max_new_tokens=5"]
    c = load_config(overrides=overrides + ["eval.cot_max_new_tokens=9"])
    bb = make_backbone(arch, init_range=0.3).double()
    calls = count_fused(monkeypatch)
    questions = [q for q, _, _ in EXAMPLES]
    runs = []
    for fused in (False, True):
        gen = Generator(evaluate.inference_model(bb, c), fused_qkv=fused)
        assert gen.fused_qkv == fused
        runs.append(evaluate.predict(bb, c, questions, batch_size=3, generator=gen))
    assert calls["fused"] > 0
    assert [(p.text, p.passes) for p in runs[1]] == [(p.text, p.passes) for p in runs[0]]
    assert len({p.text for p in runs[0]}) > 1


def test_fused_generation_is_opt_in_and_cuda_only(make_backbone, monkeypatch):
    """eval.fused_qkv (default false until a GPU measures it) reaches the generator on CUDA
    only: on CPU evaluation and ``Generator``'s default leave q/k/v unfused, the weights as
    they were."""
    assert load_config(overrides=["method=kava"]).eval.fused_qkv is False
    c = load_config(overrides=["method=kava", "eval.fused_qkv=true"])
    bb = make_backbone("llama", init_range=0.3)
    gen = evaluate.make_generator(bb, c)
    assert not gen.fused_qkv and not gen.bb._fuse_static_qkv
    assert not any(qkv.laid_out(x.self_attn) for x in gen.bb.layers)
    plain = merged(make_backbone, "llama")
    assert not Generator(plain).fused_qkv and not plain._fuse_static_qkv
    # the decision itself, for a backbone on CUDA (a stand-in: no GPU here)
    seen = {}
    monkeypatch.setattr(evaluate, "Generator", lambda bb, **kw: seen.update(kw))
    monkeypatch.setattr(evaluate, "inference_model", lambda bb, cfg: bb)
    cuda = SimpleNamespace(new_token_embeddings=SimpleNamespace(device=torch.device("cuda")))
    evaluate.make_generator(cuda, c)
    assert seen["fused_qkv"] is True
    evaluate.make_generator(cuda, load_config(overrides=["method=kava"]))  # the default
    assert seen["fused_qkv"] is False
    evaluate.make_generator(bb, c)
    assert seen["fused_qkv"] is False
