"""Loss terms against loop references written independently here."""

import pytest
import torch

from kava import losses


def elem(a, b, kind):
    d = a - b
    if kind == "mse":
        return d * d
    if kind == "l1":
        return abs(d)
    return 0.5 * d * d if abs(d) < 1 else abs(d) - 0.5


def std(xs):
    m = sum(xs) / len(xs)
    return (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5


@pytest.mark.parametrize("kind", ["smooth_l1", "mse", "l1"])
@pytest.mark.parametrize("layerwise", [True, False])
def test_kv_loss_matches_loop(kind, layerwise):
    g = torch.Generator().manual_seed(0)
    L, B, H, M, d = 2, 2, 2, 3, 4
    sk, sv, tk, tv = (torch.randn(L, B, H, M, d, generator=g) * 1.5 for _ in range(4))
    slot = torch.ones(L, B, H, M, dtype=torch.bool)
    slot[:, 1, :, 2] = False  # row 1 had a short CoT
    got = losses.kv_loss(sk, sv, tk, tv, slot, kind, layerwise)
    per_layer = []
    for l in range(L):
        parts = []
        for s, t in ((sk, tk), (sv, tv)):
            vals, tvals = [], []
            for b in range(B):
                for h in range(H):
                    for m in range(M):
                        if slot[l, b, h, m]:
                            for x in range(d):
                                vals.append(
                                    elem(float(s[l, b, h, m, x]), float(t[l, b, h, m, x]), kind)
                                )
                                tvals.append(float(t[l, b, h, m, x]))
            val = sum(vals) / len(vals)
            parts.append(val / std(tvals) if layerwise else val)
        per_layer.append(sum(parts) / 2)
    assert got.item() == pytest.approx(sum(per_layer) / L, rel=1e-5)


@pytest.mark.parametrize("layerwise", [True, False])
def test_codi_loss_matches_loop(layerwise):
    g = torch.Generator().manual_seed(1)
    L, B, D = 3, 2, 5
    s, t = torch.randn(L, B, D, generator=g) * 2, torch.randn(L, B, D, generator=g) * 3
    got = losses.codi_loss(s, t, "smooth_l1", layerwise)
    all_t = [float(x) for x in t.flatten()]
    total = 0.0
    for l in range(L):
        vals = [
            elem(float(s[l, b, x]), float(t[l, b, x]), "smooth_l1")
            for b in range(B)
            for x in range(D)
        ]
        sd = std([float(x) for x in t[l].flatten()]) if layerwise else std(all_t)
        total += sum(vals) / len(vals) / sd
    assert got.item() == pytest.approx(total / L, rel=1e-5)


def test_targets_are_detached():
    s = torch.randn(2, 2, 2, 3, 4, requires_grad=True)
    t = torch.randn(2, 2, 2, 3, 4, requires_grad=True)
    losses.kv_loss(s, s, t, t, torch.ones(2, 2, 2, 3, dtype=torch.bool), "mse", True).backward()
    assert t.grad is None and s.grad is not None
    h_s = torch.randn(2, 2, 4, requires_grad=True)
    h_t = torch.randn(2, 2, 4, requires_grad=True)
    losses.codi_loss(h_s, h_t, "l1", True).backward()
    assert h_t.grad is None and h_s.grad is not None


def test_token_nll_and_mean_ce():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 7, generator=g)
    labels = torch.tensor([[-100, 3, 5, -100], [-100, -100, 1, 2]])
    s, c = losses.token_nll(logits, labels)
    ref = []
    for b in range(2):
        tot = 0.0
        for p in range(3):
            y = int(labels[b, p + 1])
            if y != -100:
                tot -= float(torch.log_softmax(logits[b, p], -1)[y])
        ref.append(tot)
    torch.testing.assert_close(s, torch.tensor(ref), atol=1e-5, rtol=1e-5)
    assert c.tolist() == [2, 2]
    assert losses.mean_ce(s, c).item() == pytest.approx(sum(ref) / 4, rel=1e-5)


def _nll_loop(hidden, weight, bias, target):
    """Per-row NLL with a Python loop over rows: logsumexp by hand, in float64."""
    out = []
    for h, t in zip(hidden.double(), target.tolist()):
        z = torch.stack([h @ w + c for w, c in zip(weight.double(), bias.double())])
        top = z.max().detach()
        out.append(top + (z - top).exp().sum().log() - z[t])
    return torch.stack(out)


@pytest.mark.parametrize("chunk_rows", [1, 3, 7, None])
def test_linear_nll_matches_loop_forward_and_backward(chunk_rows):
    """Value and gradients (rows and head weight) against the loop reference, with a
    weighted sum (an uneven incoming gradient) and -inf bias columns; chunks that split
    the rows unevenly give the same."""
    g = torch.Generator().manual_seed(0)
    N, D, V = 7, 5, 11
    hidden = torch.randn(N, D, generator=g, dtype=torch.float64).requires_grad_()
    weight = torch.randn(V, D, generator=g, dtype=torch.float64).requires_grad_()
    bias = torch.zeros(V)
    bias[[3, 9]] = float("-inf")
    target = torch.tensor([0, 1, 2, 4, 10, 5, 0])
    scale = torch.rand(N, generator=g, dtype=torch.float64) + 0.5
    got = losses.linear_nll(hidden, weight, bias, target, chunk_rows)
    (got * scale).sum().backward()
    h2 = hidden.detach().clone().requires_grad_()
    w2 = weight.detach().clone().requires_grad_()
    want = _nll_loop(h2, w2, bias, target)
    (want * scale).sum().backward()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hidden.grad, h2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight.grad, w2.grad, rtol=1e-5, atol=1e-6)


def test_linear_nll_keeps_no_row_by_vocabulary_tensor_for_backward():
    """What the plain recipe saves for backward includes [N, V] float32 log-probabilities;
    linear_nll saves its inputs and one float per row."""
    g = torch.Generator().manual_seed(1)
    N, D, V = 6, 4, 50
    hidden = torch.randn(N, D, generator=g).requires_grad_()
    weight = torch.randn(V, D, generator=g)
    bias = torch.zeros(V)
    target = torch.randint(0, V, (N,), generator=g)

    def saved_shapes(fn):
        shapes = []

        def pack(t):
            shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return shapes

    plain = saved_shapes(
        lambda: torch.nn.functional.cross_entropy(hidden @ weight.T + bias, target)
    )
    ours = saved_shapes(lambda: losses.linear_nll(hidden, weight, bias, target, 2).sum())
    assert (N, V) in plain  # the test can tell
    assert (N, V) not in ours and all(s[0] != N or s[-1] != V for s in ours if len(s) == 2)


def test_linear_nll_bf16_matches_the_float_cast_recipe():
    """bf16 rows and head: the same as casting the bf16 matmul's output to float32 and
    taking cross-entropy (the recipe `Backbone.logits` follows), gradients included."""
    g = torch.Generator().manual_seed(2)
    N, D, V = 9, 16, 64
    hidden = torch.randn(N, D, generator=g).bfloat16().requires_grad_()
    weight = torch.randn(V, D, generator=g).bfloat16()
    bias = torch.zeros(V)
    target = torch.randint(0, V, (N,), generator=g)
    got = losses.linear_nll(hidden, weight, bias, target, 4)
    got.sum().backward()
    h2 = hidden.detach().clone().requires_grad_()
    want = torch.nn.functional.cross_entropy(
        (h2 @ weight.T).float() + bias, target, reduction="none"
    )
    want.sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.grad.float(), h2.grad.float(), rtol=2e-2, atol=2e-2)


def test_linear_nll_of_no_rows():
    hidden = torch.zeros(0, 3, requires_grad=True)
    out = losses.linear_nll(hidden, torch.randn(5, 3), torch.zeros(5), torch.zeros(0).long())
    out.sum().backward()
    assert out.shape == (0,) and hidden.grad.shape == (0, 3)


def test_linear_nll_compiled_chunks_match_eager():
    """The torch.compile'd chunk kernels (inductor, as on CUDA) against the eager ones:
    value and row gradient, for two row counts (dynamic shapes) and a -inf column."""
    g = torch.Generator().manual_seed(3)
    D, V = 8, 40
    weight = torch.randn(V, D, generator=g)
    bias = torch.zeros(V)
    bias[5] = float("-inf")
    for N in (6, 11):
        hidden = torch.randn(N, D, generator=g)
        target = torch.randint(0, 5, (N,), generator=g)
        scale = torch.rand(N, generator=g)
        out = []
        for compiled in (True, False):
            h = hidden.clone().requires_grad_()
            nll = losses.linear_nll(h, weight, bias, target, 4, compiled=compiled)
            (nll * scale).sum().backward()
            out.append((nll.detach(), h.grad))
        torch.testing.assert_close(out[0], out[1], rtol=1e-5, atol=1e-6)
