"""Flow++'s coupling network: zero start, attention over positions (and its pointwise
ablation), the context path, dropout, and the authors' parameter counts."""

from __future__ import annotations

import math

import pytest
import torch

from resflow.nets.flowpp import ContextProcessor, FlowppNet, GatedAttention, concat_elu, gate


def _perturbed(net: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return net


def test_zero_output_at_the_start_and_shapes():
    net = FlowppNet(3, 10, (4, 6), hidden=8, blocks=2, heads=2)
    out = net(torch.randn(5, 3, 4, 6)).detach()
    assert out.shape == (5, 10, 4, 6) and float(out.abs().max()) == 0.0
    with pytest.raises(ValueError, match=r"expects \[B, 3, 4, 6\]"):
        net(torch.randn(5, 3, 4, 4))
    with pytest.raises(ValueError, match="divisible by heads"):
        GatedAttention(6, heads=4)


def test_attention_is_multi_head_dot_product_attention_over_positions():
    torch.manual_seed(0)
    layer = _perturbed(GatedAttention(8, heads=2))
    x, pos = torch.randn(2, 8, 3, 3), torch.randn(8, 3, 3)
    qkv = layer.proj1(x + pos).flatten(2)  # [B, 3C, T]
    q, k, v = (t.view(2, 2, 4, 9) for t in qkv.chunk(3, 1))  # [B, heads, d, T]
    w = torch.softmax(q.transpose(-1, -2) @ k / math.sqrt(4), -1)  # [B, heads, T, T]
    a = (w @ v.transpose(-1, -2)).transpose(-1, -2).reshape(2, 8, 3, 3)
    expected = x + gate(layer.proj2(a))
    torch.testing.assert_close(layer(x, pos), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", [True, False])
def test_attention_mixes_positions_and_the_ablation_does_not(attention):
    torch.manual_seed(1)
    layer = _perturbed(GatedAttention(8, heads=2, attention=attention))
    x, pos = torch.randn(1, 8, 4, 4), torch.randn(8, 4, 4)
    x2 = x.clone()
    x2[..., 0, 0] += 1.0
    changed = (layer(x2, pos) - layer(x, pos)).abs().sum(1)[0]  # [H, W]
    assert changed[0, 0] > 0
    far = changed.flatten()[1:]
    assert bool((far > 0).all()) == attention and bool((far == 0).all()) != attention


def test_context_enters_every_block_and_dropout_only_in_training():
    torch.manual_seed(2)
    net = _perturbed(FlowppNet(2, 4, (4, 4), hidden=8, blocks=2, heads=2, dropout=0.5,
                               context_channels=3))  # fmt: skip
    x = torch.randn(2, 2, 4, 4)
    image, vector = torch.randn(2, 3, 4, 4), torch.randn(2, 3)
    net.eval()
    assert not torch.equal(net(x, image), net(x, image + 1))
    broadcast = vector[:, :, None, None].expand(-1, -1, 4, 4)
    torch.testing.assert_close(net(x, vector), net(x, broadcast))
    torch.testing.assert_close(net(x, image), net(x, image))  # eval: deterministic
    net.train()
    assert not torch.equal(net(x, image), net(x, image))
    with pytest.raises(ValueError, match="expects a context"):
        net(x)


def test_concat_elu_and_gate():
    x = torch.tensor([[-1.0, 2.0]]).view(1, 2, 1, 1)
    torch.testing.assert_close(
        concat_elu(x).flatten(), torch.tensor([math.exp(-1) - 1, 2.0, 1.0, math.exp(-2) - 1])
    )
    torch.testing.assert_close(
        gate(x).flatten(), torch.tensor([-1.0 * torch.sigmoid(torch.tensor(2.0))])
    )


def test_parameter_counts_of_the_authors_networks():
    """Counted from the TensorFlow code (flows/flows.py): the first CIFAR-10 coupling
    network (10 blocks, 96 channels, 32 components, halves of 3 x 32 x 16) and a
    dequantizer coupling (2 blocks, a 32-channel context)."""
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(FlowppNet(3, 3 * 98, (32, 16), hidden=96, blocks=10)) == 2_805_990
    assert (
        count(FlowppNet(3, 3 * 98, (32, 16), hidden=96, blocks=2, context_channels=32)) == 818_598
    )
    assert count(ContextProcessor(6, 32, 3)) == 167_936
    noattn = FlowppNet(3, 3 * 98, (32, 16), hidden=96, blocks=10, attention=False)
    assert count(noattn) == 2_805_990
