"""Fused q/k/v projections (``kava.qkv``, ``train.fused_qkv``) against peft's three modules
(float64, CPU, tiny Llama and Qwen2 with q/k/v biases): outputs, every LoRA gradient, the
same dropout masks, the fallback, a training step, the weight layout, saves and merges."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import EXAMPLES
from kava import layers, qkv
from kava.batching import collate, encode
from kava.config import load_config
from kava.model import KavaModel

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest

ARCHS = ["llama", "qwen2"]


def cfg(**over):
    ov = ["latent.num_latents=3", "latent.num_iterations=2", *(f"{k}={v}" for k, v in over.items())]
    return load_config(overrides=ov)


def batch(bb):
    return collate([encode(q, s, a, bb.tokenizer, bb.ids) for q, s, a in EXAMPLES], bb.ids, 1)


def projections(attn):
    return [getattr(attn, name) for name in qkv.PROJECTIONS]


def random_biases_(bb) -> None:
    """HF initialises q/k/v biases (Qwen2) to zero; values make a dropped bias visible."""
    torch.manual_seed(5)
    with torch.no_grad():
        for n, t in bb.named_parameters():
            if n.endswith(
                ("q_proj.base_layer.bias", "k_proj.base_layer.bias", "v_proj.base_layer.bias")
            ):
                t.normal_(std=0.5)


def lora_params(attn) -> list[nn.Parameter]:
    return [t.weight for p in projections(attn) for t in (p.lora_A["default"], p.lora_B["default"])]


def outputs_and_grads(attn, x, project):
    """``project(x)``'s three outputs and the gradients of a random weighting of them into
    ``x`` and every LoRA A / B of ``attn``."""
    x = x.detach().requires_grad_(True)
    outs = project(x)
    torch.manual_seed(123)
    loss = sum((torch.randn_like(o) * o).sum() for o in outs)
    params = lora_params(attn)
    grads = torch.autograd.grad(loss, [x, *params])
    return [o.detach() for o in outs], grads


def peft_path(attn):
    return lambda x: tuple(p(x) for p in projections(attn))


def assert_all_close(a, b):
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)


class MaskDropout(nn.Module):
    """``nn.Dropout`` with a given keep-mask (``x * mask * 1 / (1 - p)``, as kava.qkv)."""

    def __init__(self, mask: torch.Tensor, p: float):
        super().__init__()
        self.mask, self.p = mask, p

    def forward(self, x):
        return x * self.mask * (1.0 / (1.0 - self.p))


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_projections_equal_peft_outputs_and_gradients(make_backbone, arch):
    bb = make_backbone(arch, init_range=0.3).double()
    random_biases_(bb)
    attn = bb.layers[1].self_attn
    assert (attn.q_proj.base_layer.bias is not None) == (arch == "qwen2")
    assert len({p.scaling["default"] for p in projections(attn)}) == 1
    attn.k_proj.scaling["default"] = 0.5  # scalings differ per projection (alpha_pattern)
    before = {n: t.clone() for n, t in attn.state_dict().items()}
    x = torch.randn(2, 5, bb.hidden_size, dtype=torch.float64)
    ref = outputs_and_grads(attn, x, peft_path(attn))
    fused = qkv.prepare(attn)
    assert fused is not None and fused.dropout == 0.0 and fused.scaling[1] == 0.5
    assert (fused.bias is not None) == (arch == "qwen2")
    got = outputs_and_grads(attn, x, lambda x: qkv.project_qkv(x, fused))
    assert_all_close(got[0], ref[0])
    assert_all_close(got[1], ref[1])
    assert all(g.abs().sum() > 0 for g in ref[1])
    # the layout changed no value, and peft's own path reads the views the same
    after = attn.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert_all_close(outputs_and_grads(attn, x, peft_path(attn))[0], ref[0])


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_dropout_is_peft_dropout_with_a_mask_per_projection(make_backbone, arch):
    """With the same three keep-masks given to peft's dropout modules, fused equals peft;
    the masks drawn by default are independent (a shared mask would differ)."""
    p = 0.3
    bb = make_backbone(arch, dropout=p, init_range=0.3).double().train()
    random_biases_(bb)
    attn = bb.layers[0].self_attn
    assert qkv.prepare(attn.eval()).dropout == 0.0  # none in eval mode, as nn.Dropout
    fused = qkv.prepare(attn.train())
    assert fused.dropout == p
    x = torch.randn(2, 5, bb.hidden_size, dtype=torch.float64)
    torch.manual_seed(7)
    masks = qkv.dropout_masks(x, p)
    assert masks.shape == (3, *x.shape) and masks.dtype == torch.bool
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])
    assert 0.55 < masks.double().mean() < 0.85
    got = outputs_and_grads(attn, x, lambda x: qkv.project_qkv(x, fused, masks))
    for proj, mask in zip(projections(attn), masks):
        proj.lora_dropout["default"] = MaskDropout(mask, p)
    ref = outputs_and_grads(attn, x, peft_path(attn))
    assert_all_close(got[0], ref[0])
    assert_all_close(got[1], ref[1])
    # without masks given, project_qkv draws them with dropout_masks
    torch.manual_seed(7)
    drawn = outputs_and_grads(attn, x, lambda x: qkv.project_qkv(x, fused))
    assert_all_close(drawn[0], ref[0])


def peft_backbone(make_backbone, arch, **peft_options):
    """A backbone whose LoRA is built by peft directly (options kava's config lacks)."""
    from peft import LoraConfig, get_peft_model

    from kava.backbone import Backbone

    plain = make_backbone(arch, lora=False, init_range=0.3)
    cfg = LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", **peft_options)
    lm = get_peft_model(plain.lm, cfg)  # lora=False: plain.lm is HF's model
    bb = Backbone(lm, plain.tokenizer, use_projection=True)
    torch.manual_seed(3)
    for n, t in bb.named_parameters():
        if "lora_B" in n:
            nn.init.normal_(t, std=0.02)
    return bb.double().eval()


@pytest.mark.parametrize(
    "options, reason",
    [
        (dict(target_modules=["q_proj", "v_proj", "o_proj"]), "k_proj has no LoRA"),
        (dict(target_modules=["q_proj", "k_proj", "v_proj"], use_dora=True), "variant"),
        (
            dict(target_modules=["q_proj", "k_proj", "v_proj"], rank_pattern={"v_proj": 2}),
            "different ranks",
        ),
    ],
)
def test_unsupported_layouts_run_unfused_and_equal(make_backbone, caplog, options, reason):
    bb = peft_backbone(make_backbone, "llama", **options)
    attn = bb.layers[0].self_attn
    assert reason in qkv.unfused_reason(attn)
    assert qkv.prepare(attn) is None
    b = batch(bb)
    c = cfg()
    with torch.no_grad():
        off = KavaModel(bb, c)(b).total
        bb.fused_qkv(True)
        on = KavaModel(bb, c)(b).total
    assert reason in caplog.text  # the fallback is named once, when switched on
    assert torch.equal(on, off)
    assert qkv.laid_out(attn) is None  # never laid out: the weights are as peft made them


def test_merged_or_hooked_adapters_run_unfused(make_backbone):
    bb = make_backbone("qwen2", init_range=0.3).double()
    attn = bb.layers[0].self_attn
    x = torch.randn(2, 3, bb.hidden_size, dtype=torch.float64)
    qkv.prepare(attn)  # laid out
    with torch.no_grad():
        ref = peft_path(attn)(x)
        attn.k_proj.merge()  # in place, through the view
        assert "merged" in qkv.unfused_reason(attn) and qkv.prepare(attn) is None
        assert qkv.laid_out(attn) is not None
        assert_all_close(peft_path(attn)(x), ref)
        attn.k_proj.unmerge()
        assert_all_close(qkv.project_qkv(x, qkv.prepare(attn)), ref)
        # a forward hook on a module the fused path skips: it must run, so peft's path does
        seen = []
        hook = attn.v_proj.lora_A["default"].register_forward_hook(lambda *a: seen.append(1))
        assert "hooks" in qkv.unfused_reason(attn) and qkv.prepare(attn) is None
        hook.remove()
        assert qkv.prepare(attn) is not None
        # a trainable base bias would get no gradient through the fused buffer's view
        attn.k_proj.base_layer.bias.requires_grad_(True)
        assert "trainable" in qkv.unfused_reason(attn) and qkv.prepare(attn) is None
        attn.k_proj.base_layer.bias.requires_grad_(False)
        attn.q_proj.cast_input_dtype_enabled = False  # set one by one, not by lora_input_cast
        assert "cast" in qkv.unfused_reason(attn)


def train_step(bb, c, b):
    """Loss, gradients, and the loss after one AdamW step."""
    from kava.train import apply_speed_options

    apply_speed_options(bb, c, torch.device("cpu"))
    model = KavaModel(bb, c)
    opt = torch.optim.AdamW(bb.trainable_parameters(), lr=1e-2)
    out = model(b)
    out.total.backward()
    grads = {n: p.grad.clone() for n, p in bb.named_parameters() if p.grad is not None}
    opt.step()
    with torch.no_grad():
        after = model(b).total
    return out.total.detach(), grads, after


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_train_step_with_fused_qkv_equals_unfused(make_backbone, monkeypatch, arch, checkpointing):
    ckpt = str(checkpointing).lower()
    on_cfg = cfg(**{"train.fused_qkv": "true", "train.activation_checkpointing": ckpt})
    off_cfg = cfg(**{"train.activation_checkpointing": ckpt})
    assert on_cfg.train.fused_qkv and not off_cfg.train.fused_qkv
    on = make_backbone(arch, init_range=0.3).double()
    off = make_backbone(arch, init_range=0.3).double()
    for bb in (on, off):
        random_biases_(bb)
    b = batch(on)
    calls = {"inputs": 0, "fused": 0}

    def counting(name, fn):
        def run(*args):
            calls[name] += 1
            return fn(*args)

        return run

    monkeypatch.setattr(layers, "attention_inputs", counting("inputs", layers.attention_inputs))
    monkeypatch.setattr(layers, "project_qkv", counting("fused", layers.project_qkv))
    loss_off, grads_off, after_off = train_step(off, off_cfg, b)
    assert calls["inputs"] > 0 and calls["fused"] == 0
    calls.update(inputs=0)
    loss_on, grads_on, after_on = train_step(on, on_cfg, b)
    assert calls["fused"] == calls["inputs"] > 0  # every layer pass ran fused
    assert on._fuse_qkv and not off._fuse_qkv
    assert all(qkv.laid_out(layer.self_attn) is not None for layer in on.layers)
    assert all(qkv.laid_out(layer.self_attn) is None for layer in off.layers)
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-10, atol=0)
    assert grads_on.keys() == grads_off.keys() and any("lora_A" in n for n in grads_on)
    for n in grads_on:
        scale = grads_off[n].abs().max().item()
        torch.testing.assert_close(grads_on[n], grads_off[n], rtol=1e-8, atol=1e-10 * scale)
    torch.testing.assert_close(after_on, after_off, rtol=1e-8, atol=0)
    assert after_on < loss_on


def storage_bytes(module: nn.Module) -> int:
    """Bytes of the distinct storages behind ``module``'s parameters and buffers."""
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for t in module.state_dict().values()
    }
    return sum(storages.values())


def test_layout_costs_no_memory_and_survives_saves_merges_and_moves(make_backbone, tmp_path):
    from kava.checkpoint import load_trainable, save_checkpoint

    bb = make_backbone("qwen2", init_range=0.3)
    fresh = make_backbone("qwen2", init_range=0.3)
    with torch.no_grad():  # other trained values, for the checkpoint to replace
        for t in fresh.trainable_parameters():
            t.add_(torch.randn_like(t))
    c = cfg(**{"train.fused_qkv": "true"})
    b = batch(bb)
    with torch.no_grad():
        ref = KavaModel(bb, c)(b).total
        ref_merged = KavaModel(bb.merged_copy(), c)(b).total
    size = storage_bytes(bb)
    bb.fused_qkv(True)
    with torch.no_grad():
        assert torch.allclose(KavaModel(bb, c)(b).total, ref, rtol=1e-6)
    assert all(qkv.laid_out(layer.self_attn) is not None for layer in bb.layers)
    assert storage_bytes(bb) == size  # the three weights are rows of one buffer, no copy
    # an adapter-only checkpoint of the fused backbone loads into an unfused one
    save_checkpoint(tmp_path / "ckpt", bb, c)
    assert (tmp_path / "ckpt" / "adapter" / "adapter_model.safetensors").is_file()
    load_trainable(fresh, tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(KavaModel(fresh, c)(b).total, ref)
        # LoRA merged into a copy for inference: the same as merging the unfused one
        merged = bb.merged_copy()
        assert qkv.unfused_reason(merged.layers[0].self_attn) is not None
        assert torch.allclose(KavaModel(merged, c)(b).total, ref_merged, rtol=1e-6)
    # views of one buffer in the wrong order are no layout; prepare lays it out anew
    attn = bb.layers[0].self_attn
    k, v = attn.k_proj.base_layer.weight, attn.v_proj.base_layer.weight
    x = torch.randn(2, 3, bb.hidden_size)
    with torch.no_grad():
        ref_qkv = peft_path(attn)(x)
        k.data, v.data = v.data, k.data  # [Dkv, D] each: k's rows now after v's
        ref_swapped = peft_path(attn)(x)
        assert qkv.laid_out(attn) is None
        torch.testing.assert_close(qkv.project_qkv(x, qkv.prepare(attn)), ref_swapped)  # fp32
        k.data, v.data = v.data, k.data
        torch.testing.assert_close(qkv.project_qkv(x, qkv.prepare(attn)), ref_qkv)
    # a cast gives each weight its own storage; the next pass lays them out again
    bb.double()
    assert qkv.laid_out(bb.layers[0].self_attn) is None
    with torch.no_grad():
        KavaModel(bb, c)(b)
    assert qkv.laid_out(bb.layers[0].self_attn) is not None


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_compiled_fused_layer_pass_matches_eager(make_backbone, dropout):
    """Under ``torch.compile`` (backend aot_eager: dynamo and AOTAutograd as on the GPU) the
    fused pass gives its eager losses and gradients (dropout: the same masks under one
    seed) over two batch shapes, without a graph per layer. (Fused against unfused: the
    float64 tests above; in fp32 they differ by rounding, ~1e-5 of a gradient's scale.)"""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    c = cfg(**{"train.fused_qkv": "true"})
    runs = []
    for compiled in (False, True):
        bb = make_backbone("qwen2", dropout=dropout, init_range=0.3).train()
        bb.fused_qkv(True)
        if compiled:
            bb.compile_layers(backend="aot_eager")
        out = []
        for exs in (EXAMPLES, EXAMPLES[1:]):
            b = collate([encode(q, s, a, bb.tokenizer, bb.ids) for q, s, a in exs], bb.ids, 8)
            bb.zero_grad(set_to_none=True)
            torch.manual_seed(11)
            loss = KavaModel(bb, c)(b).total
            loss.backward()
            out.append(
                (loss.detach(), {n: p.grad for n, p in bb.named_parameters() if p.grad is not None})
            )
        runs.append(out)
    for (loss_a, g_a), (loss_b, g_b) in zip(*runs):
        torch.testing.assert_close(loss_b, loss_a, rtol=1e-4, atol=2e-5)
        assert g_a.keys() == g_b.keys()
        for n in g_a:
            scale = g_a[n].abs().max().item()
            torch.testing.assert_close(g_b[n], g_a[n], rtol=1e-4, atol=1e-5 * scale, msg=n)
    assert counters["stats"]["unique_graphs"] <= 4, counters["stats"]
