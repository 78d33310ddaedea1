"""DenseFlow's networks: Nyström attention converges to exact softmax attention as the
landmarks reach the sequence length; the iterative pseudo-inverse converges; the
coupling and cross-unit nets start at zero and have the authors' sizes."""

from __future__ import annotations

import math

import pytest
import torch

from resflow.nets.denseflow import (
    ContextDenseNet,
    CrossUnitNet,
    DenseAttentionNet,
    DenseBlock,
    NystromAttention,
    _segment_means,
    iterative_pinv,
    nystrom_attention,
)


def _exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v


def test_nystrom_attention_converges_to_softmax_attention_as_landmarks_reach_n():
    gen = torch.Generator().manual_seed(0)
    n, d = 16, 8
    q, k, v = (torch.randn(4, 2, n, d, generator=gen, dtype=torch.float64) for _ in range(3))
    exact = _exact(q, k, v)

    def error(m: int, iterations: int = 6) -> float:
        return float((nystrom_attention(q, k, v, m, iterations) - exact).abs().mean())

    # with the default (6-iteration) pseudo-inverse the error falls as m grows to n
    errors = [error(m) for m in (4, 8, 12, 16)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < error(1) / 10
    # at m = n the kernels are the full attention matrix S and S S^+ S = S: exact with
    # the exact pseudo-inverse, and with the iterative one once it has converged
    assert error(n, 0) < 1e-12 and error(n, 30) < 1e-12
    assert error(n, 30) < error(n, 6) < error(n, 2)
    # more landmarks than positions: capped at n, still exact
    torch.testing.assert_close(nystrom_attention(q, k, v, 64, 0), exact)


def test_iterative_pinv_converges_to_the_pseudo_inverse():
    gen = torch.Generator().manual_seed(1)
    a = torch.softmax(torch.randn(3, 5, 5, generator=gen, dtype=torch.float64), -1)
    torch.testing.assert_close(iterative_pinv(a, 40), torch.linalg.pinv(a), atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(iterative_pinv(a, 0), torch.linalg.pinv(a))


def test_segment_means_cover_uneven_lengths():
    p = _segment_means(7, 3, torch.zeros(()))
    torch.testing.assert_close(p.sum(1), torch.ones(3))
    assert [int((row > 0).sum()) for row in p] == [2, 3, 2]
    torch.testing.assert_close(_segment_means(5, 5, torch.zeros(())), torch.eye(5))


def test_nystrom_module_is_exact_attention_plus_value_skip_at_full_landmarks():
    torch.manual_seed(0)
    full = NystromAttention(6, 4, heads=2, landmarks=16).double()  # 16 = 4 x 4 positions
    approx = NystromAttention(6, 4, heads=2, landmarks=15, pinv_iterations=0).double()
    approx.load_state_dict(full.state_dict())
    x = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    b = x.shape[0]
    qkv = full.qkv(x).view(b, 3, 2, 2, 16).transpose(-1, -2).unbind(1)
    ref = full.out((_exact(*qkv) + qkv[2]).transpose(-1, -2).reshape(b, 4, 4, 4))
    torch.testing.assert_close(full(x), ref)
    assert float((approx(x) - ref).abs().max().detach()) < 0.5  # close, not equal (15 landmarks)
    with pytest.raises(ValueError, match="multiple of heads"):
        NystromAttention(6, 3, heads=2)


def test_nets_start_at_zero_and_have_the_authors_sizes():
    x = torch.randn(2, 6, 4, 4)
    net = DenseAttentionNet(6, 12, hidden=48, depth=7, growth=64, heads=4)
    assert float(net(x).detach().abs().max()) == 0.0
    # conv1x1 6->48, dense block (7 layers, growth 64, gated), attention over 24
    # channels, BN(96) -> ReLU -> conv1x1(96->48, no bias), conv1x1 48->12
    dense = sum(c * c + c + 9 * c * 64 + 64 for c in (48 + 64 * i for i in range(7)))
    dense += (48 + 7 * 64) * 3 * 48 + 3 * 48
    expected = (6 * 48 + 48) + dense + (48 * 72 + 72 + 24 * 48 + 48) + 192 + 96 * 48 + 48 * 12 + 12
    assert sum(p.numel() for p in net.parameters()) == expected
    g = CrossUnitNet(6, 10)
    assert float(g(x).abs().max()) == 0.0 and g(x).shape == (2, 20, 4, 4)
    assert sum(p.numel() for p in g.parameters()) == 6 * 24 * 9 + 24 + 24 * 20 + 20
    c = ContextDenseNet(6, 12, context_channels=3, hidden=8, depth=2, growth=4)
    assert float(c(x, torch.randn(2, 3, 4, 4)).abs().max()) == 0.0
    with pytest.raises(ValueError, match="expects a context"):
        c(x)
    with pytest.raises(ValueError, match="residual dense block keeps its channels"):
        DenseBlock(4, 5, 2, 2, residual=True)
    with pytest.raises(ValueError, match=r"DenseAttentionNet expects \[B, 6, H, W\]"):
        net(torch.randn(2, 5, 4, 4))


def _authors_reference(x: torch.Tensor, qkv: torch.nn.Conv2d, out: torch.nn.Conv2d, m: int):
    """The authors' Nyström attention written out element by element (float64): the
    convolution's output read as [HW, 3E] rows in memory order, landmarks the means of
    m equal segments divided by sqrt(HW), column-normalised kernels, the exact
    pseudo-inverse of the middle kernel, the value skip, and the result read back as
    [E, H, W] in memory order."""
    b, _, h, w = x.shape
    n = h * w
    y = qkv(x)
    e = y.shape[1] // 3
    results = []
    for i in range(b):
        flat = y[i].flatten()  # channel-major memory order
        rows = [[float(flat[r * 3 * e + c]) for c in range(3 * e)] for r in range(n)]
        q = torch.tensor([row[:e] for row in rows], dtype=torch.float64)
        k = torch.tensor([row[e : 2 * e] for row in rows], dtype=torch.float64)
        v = torch.tensor([row[2 * e :] for row in rows], dtype=torch.float64)
        size = n // m
        q_l = torch.stack([q[j * size : (j + 1) * size].mean(0) for j in range(m)]) / n**0.5
        k_l = torch.stack([k[j * size : (j + 1) * size].mean(0) for j in range(m)]) / n**0.5

        def column_softmax(a: torch.Tensor) -> torch.Tensor:
            ex = torch.exp(a)
            return ex / ex.sum(0, keepdim=True)

        k1 = column_softmax(q @ k_l.T)
        k2 = column_softmax(q_l @ k_l.T)
        k3 = column_softmax(q_l @ k.T)
        att = k1 @ torch.linalg.pinv(k2) @ k3 @ v + v  # [n, e]
        results.append(att.flatten().view(e, h, w))
    return out(torch.stack(results))


def test_authors_nystrom_attention_matches_the_formula_written_out():
    torch.manual_seed(3)
    layer = NystromAttention(5, 3, heads=1, landmarks=4, pinv_iterations=0, form="authors")
    layer = layer.double()
    x = torch.randn(2, 5, 4, 2, dtype=torch.float64)  # 8 positions, 2 per landmark
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _authors_reference(x, layer.qkv, layer.out, 4))
        # the iterative pseudo-inverse (the authors' uses 6 steps) converges to the exact one
        iterative = NystromAttention(5, 3, landmarks=4, pinv_iterations=40, form="authors")
        iterative = iterative.double()
        iterative.load_state_dict(layer.state_dict())
        torch.testing.assert_close(iterative(x), layer(x))
        # and it is not the textbook form with the same weights
        textbook = NystromAttention(5, 3, landmarks=4, pinv_iterations=0).double()
        textbook.load_state_dict(layer.state_dict())
        assert float((textbook(x) - layer(x)).abs().max()) > 1e-3


def test_authors_nystrom_attention_has_one_head_and_the_same_parameters():
    with pytest.raises(ValueError, match="one head"):
        NystromAttention(8, 4, heads=2, form="authors")
    with pytest.raises(ValueError, match="unknown attention form"):
        NystromAttention(8, 4, form="other")
    sizes = [
        sum(p.numel() for p in NystromAttention(48, 24, heads=h, form=f).parameters())
        for h, f in ((1, "authors"), (4, "textbook"))
    ]
    assert sizes[0] == sizes[1]
    net = DenseAttentionNet(2, 4, hidden=8, depth=2, growth=4, heads=1, attention="authors")
    assert net.attention.form == "authors"
    assert net(torch.randn(3, 2, 4, 4)).shape == (3, 4, 4, 4)
