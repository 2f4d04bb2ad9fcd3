"""The controls for the eviction claim and the key-matching choice, against loop
references: ``rkv.method: uniform`` and ``kv_loss.keys: pre_rope``."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import EXAMPLES
from kava import eviction, layers
from kava.attention import positions_from_mask
from kava.batching import collate, encode
from kava.config import load_config
from kava.model import KavaModel, teacher_forward


def test_uniform_eviction_matches_loop_reference():
    torch.manual_seed(0)
    b, h, n_c, d, m = 4, 3, 11, 5, 4
    k, v = torch.randn(b, h, n_c, d), torch.randn(b, h, n_c, d)
    cmask = torch.zeros(b, n_c, dtype=torch.bool)
    cmask[0, :11] = True  # 11 real: 4 of them kept
    cmask[1, :4] = True  # exactly m: all kept
    cmask[2, :2] = True  # fewer than m: all kept, 2 slots masked
    cmask[3, [0, 2, 3, 5, 6, 8, 9, 10]] = True  # holes (any mask), 8 real
    q = torch.randn(b, h * 2, 3, d)
    scores = eviction.eviction_scores(
        "uniform", q, k, torch.ones(b, 3, dtype=torch.bool), cmask, m=m
    )
    ck, cv, slot = eviction.compress(k, v, scores, cmask, m)
    for row in range(b):
        real = [i for i in range(n_c) if cmask[row, i]]
        n = len(real)
        keep = real if n <= m else [real[math.floor((i + 0.5) * n / m)] for i in range(m)]
        for head in range(h):  # the same positions for every head
            assert slot[row, head].tolist() == [True] * len(keep) + [False] * (m - len(keep))
            torch.testing.assert_close(ck[row, head, : len(keep)], k[row, head, keep])
            torch.testing.assert_close(cv[row, head, : len(keep)], v[row, head, keep])
    with pytest.raises(ValueError, match="needs m"):
        eviction.eviction_scores("uniform", q, k, torch.ones(b, 3, dtype=torch.bool), cmask)


def rotate_back_by_hand(key: torch.Tensor, pos: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """One post-RoPE key ``[d]`` at position ``pos``: rotate each (i, i + d/2) pair back by
    its angle ``pos * inv_freq[i]``, element by element."""
    half = key.shape[-1] // 2
    out = torch.empty_like(key)
    for i in range(half):
        c, s = math.cos(pos * float(inv_freq[i])), math.sin(pos * float(inv_freq[i]))
        x1, x2 = float(key[i]), float(key[i + half])
        out[i], out[i + half] = x1 * c + x2 * s, x2 * c - x1 * s
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_unrotated_teacher_keys_are_the_pre_rope_projections(make_backbone, arch):
    """kava's un-rotation of the captured CoT keys = the keys before RoPE, computed from
    each layer's input with its own k_proj (and = a by-hand 2x2 rotation back)."""
    bb = make_backbone(arch, init_range=0.3)
    enc = [encode(q, s, a, bb.tokenizer, bb.ids) for q, s, a in EXAMPLES]
    tb = collate(enc, bb.ids, bucket=4).teacher  # right padding: positions need the mask
    with torch.no_grad():
        out = bb(
            bb.embed(tb.input_ids),
            tb.attention_mask,
            positions_from_mask(tb.attention_mask, tb.input_ids.shape[1]),
            output_hidden_states=True,
        )
        t = teacher_forward(bb, tb)
    pos = positions_from_mask(tb.attention_mask, tb.input_ids.shape[1]).gather(1, tb.cot_index)
    got = layers.unrotate(t.capture.stacked("keys"), *bb.rope(pos))  # [L, B, H, N_c, d]
    inv_freq = bb.decoder.rotary_emb.inv_freq
    for layer_idx, layer in enumerate(bb.layers):
        attn = layer.self_attn
        x = layer.input_layernorm(out.hidden_states[layer_idx])
        k = attn.k_proj(x).view(*x.shape[:2], -1, attn.head_dim).transpose(1, 2)
        for row in range(len(enc)):
            for j in range(int(tb.cot_mask[row].sum())):
                col = int(tb.cot_index[row, j])
                want = k[row, :, col]  # [H, d]
                torch.testing.assert_close(got[layer_idx, row, :, j], want, atol=2e-5, rtol=1e-4)
                if layer_idx == 0 and j < 2:
                    post = t.capture.stacked("keys")[0, row, 0, j]
                    hand = rotate_back_by_hand(post, int(pos[row, j]), inv_freq)
                    torch.testing.assert_close(hand, want[0], atol=2e-5, rtol=1e-4)


def test_pre_rope_kv_loss_compares_unrotated_keys(make_backbone):
    """``kv_loss.keys: pre_rope`` changes the KV loss (keys at different positions are no
    longer compared rotated), keeps the eviction choice, and still trains LoRA."""
    bb = make_backbone("llama", init_range=0.3)
    enc = [encode(q, s, a, bb.tokenizer, bb.ids) for q, s, a in EXAMPLES]
    batch = collate(enc, bb.ids)
    base = ["latent.num_latents=3", "latent.num_iterations=2", "alpha1=0", "teacher.weight=0"]
    out = {}
    for keys in ("post_rope", "pre_rope"):
        model = KavaModel(bb, load_config(overrides=[*base, f"kv_loss.keys={keys}"]))
        bb.zero_grad(set_to_none=True)
        res = model(batch)
        res.total.backward()
        out[keys] = res
        assert all(p.grad.abs().sum() > 0 for n, p in bb.named_parameters() if "lora_B" in n)
    assert torch.equal(out["post_rope"].compressed.slot_mask, out["pre_rope"].compressed.slot_mask)
    post, pre = out["post_rope"].metrics["kv_loss"], out["pre_rope"].metrics["kv_loss"]
    assert post > 0 and pre > 0 and not torch.isclose(post, pre)
    # values are never rotated: identical in both
    torch.testing.assert_close(out["post_rope"].compressed.v, out["pre_rope"].compressed.v)


def test_pre_rope_student_keys_are_the_pre_rope_projections(make_backbone):
    """The student side of ``pre_rope``: the un-rotated latent keys of the last Jacobi
    iteration = that iteration's layer inputs through each layer's own k_proj."""
    from kava.kv import KVCache

    bb = make_backbone("qwen2", init_range=0.3)
    enc = [encode(q, s, a, bb.tokenizer, bb.ids) for q, s, a in EXAMPLES]
    batch = collate(enc, bb.ids)
    cfg = load_config(
        overrides=["latent.num_latents=3", "latent.num_iterations=2", "kv_loss.keys=pre_rope"]
    )
    model = KavaModel(bb, cfg)
    with torch.no_grad():
        state = model.latent_passes(batch)
        ((k, _),) = model.student_latent_keys(state, [state.latent_kv])  # [L, B, H, M, d]
        pos = positions_from_mask(state.key_mask, 3)
        out = bb(
            state.inputs[-1],
            state.key_mask,
            pos,
            KVCache.growing(state.question_kv),
            output_hidden_states=True,
        )
    for layer_idx, layer in enumerate(bb.layers):
        attn = layer.self_attn
        x = layer.input_layernorm(out.hidden_states[layer_idx])
        want = attn.k_proj(x).view(*x.shape[:2], -1, attn.head_dim).transpose(1, 2)
        torch.testing.assert_close(k[layer_idx], want, atol=2e-5, rtol=1e-4)
