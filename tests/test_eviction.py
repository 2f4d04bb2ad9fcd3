"""rkv_scores / compress against per-row, per-head plain-Python loop references."""

import math

import pytest
import torch

from kava import eviction


def ref_scores(q, k, amask, cmask, lam):
    """Loop reference of METHOD.md section 2, one (row, KV head) at a time."""
    b, h_q, n_a, d = q.shape
    h_kv, n_c = k.shape[1], k.shape[2]
    g = h_q // h_kv
    out = torch.full((b, h_kv, n_c), float("-inf"), dtype=torch.float64)
    for bi in range(b):
        cot = [i for i in range(n_c) if cmask[bi, i]]
        ans = [a for a in range(n_a) if amask[bi, a]]
        for h in range(h_kv):
            # importance: per answer query, max over the group's heads of the logits,
            # softmax over real CoT keys; mean over real answer queries
            imp = {i: 0.0 for i in cot}
            for a in ans:
                logits = {}
                for i in cot:
                    logits[i] = max(
                        sum(
                            float(q[bi, h * g + gg, a, x]) * float(k[bi, h, i, x]) for x in range(d)
                        )
                        / math.sqrt(d)
                        for gg in range(g)
                    )
                z = sum(math.exp(v) for v in logits.values())
                for i in cot:
                    imp[i] += math.exp(logits[i]) / z / len(ans)
            # redundancy: mean cosine to the other real keys, negated, softmax
            red_raw = {}
            for i in cot:
                s = 0.0
                for j in cot:
                    if j == i:
                        continue
                    ki, kj = k[bi, h, i].double(), k[bi, h, j].double()
                    s += float(ki @ kj / (ki.norm() * kj.norm()))
                red_raw[i] = -s / len(cot)
            z = sum(math.exp(v) for v in red_raw.values())
            for i in cot:
                out[bi, h, i] = lam * imp[i] + (1 - lam) * math.exp(red_raw[i]) / z
    return out


def random_case(seed, b=3, h_q=6, h_kv=2, n_a=5, n_c=9, d=8):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h_q, n_a, d, generator=g)
    k = torch.randn(b, h_kv, n_c, d, generator=g)
    v = torch.randn(b, h_kv, n_c, d, generator=g)
    cot_len = torch.tensor([n_c, 4, 2])[:b]  # ragged; rows 1 and 2 shorter than m below
    ans_len = torch.tensor([n_a, 3, 2])[:b]
    cmask = torch.arange(n_c)[None] < cot_len[:, None]
    amask = torch.arange(n_a)[None] < ans_len[:, None]
    return q, k, v, amask, cmask


@pytest.mark.parametrize("lam", [0.1, 0.0, 1.0, 0.5])
def test_rkv_scores_match_loop_reference(lam):
    q, k, _, amask, cmask = random_case(0)
    got = eviction.rkv_scores(q, k, amask, cmask, lam)
    want = ref_scores(q, k, amask, cmask, lam)
    assert got.dtype == torch.float32 and got.shape == (3, 2, 9)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin].double(), want[fin], atol=1e-5, rtol=1e-5)


def ref_compress(k, v, scores, cmask, m, order):
    b, h, n, d = k.shape
    ko = torch.zeros(b, h, m, d)
    vo = torch.zeros(b, h, m, d)
    so = torch.zeros(b, h, m, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            cand = [i for i in range(n) if cmask[bi, i]]
            cand.sort(key=lambda i: -float(scores[bi, hi, i]))
            kept = cand[:m]
            if order == "position":
                kept = sorted(kept)
            for slot, i in enumerate(kept):
                ko[bi, hi, slot], vo[bi, hi, slot], so[bi, hi, slot] = (
                    k[bi, hi, i],
                    v[bi, hi, i],
                    True,
                )
    return ko, vo, so


@pytest.mark.parametrize("order", ["position", "score"])
@pytest.mark.parametrize("m", [3, 6, 12])
def test_compress_matches_loop_reference(order, m):
    q, k, v, amask, cmask = random_case(1)
    scores = eviction.rkv_scores(q, k, amask, cmask, 0.1)
    ko, vo, so = eviction.compress(k, v, scores, cmask, m, order)
    rk, rv, rs = ref_compress(k, v, scores, cmask, m, order)
    assert ko.shape == (3, 2, m, 8) and so.shape == (3, 2, m)
    assert torch.equal(so, rs)
    torch.testing.assert_close(ko, rk, atol=1e-6, rtol=0)
    torch.testing.assert_close(vo, rv, atol=1e-6, rtol=0)
    # slots beyond a short CoT are masked: row 2 has only 2 CoT tokens
    assert so[2].sum(-1).tolist() == [min(2, m)] * 2


def test_gqa_groups_use_their_own_kv_head():
    """Query head h*G+g belongs to KV head h: moving signal to another group changes scores."""
    q, k, _, amask, cmask = random_case(2)
    base = eviction.rkv_scores(q, k, amask, cmask, 1.0)
    q2 = q.clone()
    q2[:, 0:3] *= 5.0  # heads 0..2 = group of KV head 0
    changed = eviction.rkv_scores(q2, k, amask, cmask, 1.0)
    assert not torch.allclose(changed[:, 0], base[:, 0])
    torch.testing.assert_close(changed[:, 1], base[:, 1])


def test_alternative_methods():
    q, k, v, amask, cmask = random_case(3)
    crop = eviction.eviction_scores("crop", q, k, amask, cmask)
    _, _, _ = eviction.compress(k, v, crop, cmask, 3)
    top = crop.topk(3, dim=-1).indices.sort(-1).values
    assert top[0, 0].tolist() == [0, 1, 2]
    att = eviction.eviction_scores("attention", q, k, amask, cmask)
    torch.testing.assert_close(att, eviction.rkv_scores(q, k, amask, cmask, 1.0))
    red = eviction.eviction_scores("redundancy", q, k, amask, cmask)
    torch.testing.assert_close(red, eviction.rkv_scores(q, k, amask, cmask, 0.0))
    r1 = eviction.eviction_scores(
        "random", q, k, amask, cmask, generator=torch.Generator().manual_seed(5)
    )
    r2 = eviction.eviction_scores(
        "random", q, k, amask, cmask, generator=torch.Generator().manual_seed(5)
    )
    torch.testing.assert_close(r1, r2)
    for s in (crop, r1):
        assert torch.isinf(s[1, :, 4:]).all() and torch.isfinite(s[1, :, :4]).all()
    with pytest.raises(ValueError, match="unknown eviction method"):
        eviction.eviction_scores("magic", q, k, amask, cmask)


def test_pads_never_selected_even_with_huge_keys():
    q, k, v, amask, cmask = random_case(4)
    k[1, :, 5:] = 1e3  # pad positions of row 1 (cot_len 4) look very important
    s = eviction.rkv_scores(q, k, amask, cmask, 0.1)
    _, _, slot = eviction.compress(k, v, s, cmask, 6)
    assert slot[1].sum(-1).tolist() == [4, 4]
