"""The layout-keeping GroupNorm that the UNet and the autoencoder use: its compiled form against nn.GroupNorm."""

import pytest
import torch

from lightning_ldm.autoencoder.model import SMALL_PRESETS, Autoencoder
from lightning_ldm.group_norm import GroupNorm


def randomized(norm: GroupNorm) -> GroupNorm:
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn_like(norm.weight))
        norm.bias.copy_(0.3 * torch.randn_like(norm.bias))
    return norm


@pytest.mark.parametrize("channels, eps", [(224, 1e-5), (64, 1e-6)])  # LDM-4's UNet width; the autoencoders' eps
def test_compiled_form_matches_group_norm_and_keeps_layout(channels, eps):
    torch.manual_seed(0)
    norm = randomized(GroupNorm(32, channels, eps=eps))
    # Channel means far from zero and unequal within groups: the between-channel part of the group variance counts.
    offset = torch.linspace(-4.0, 6.0, channels).view(1, -1, 1, 1)
    x = (3 * torch.randn(2, channels, 3, 5) + offset).to(memory_format=torch.channels_last).requires_grad_()
    y = norm.layout_preserving_forward(x)
    expected = torch.nn.GroupNorm.forward(norm, x)
    torch.testing.assert_close(y, expected, atol=2e-5, rtol=1e-5)
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y * g).sum(), (x, norm.weight, norm.bias))
    for got, want in zip(grads, torch.autograd.grad((expected * g).sum(), (x, norm.weight, norm.bias))):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert norm.to(torch.bfloat16).layout_preserving_forward(x.detach().bfloat16()).dtype == torch.bfloat16


def test_eps_enters_the_compiled_form():
    """A near-constant input makes the variance tiny, so eps decides the scale: 1e-6 and 1e-5 must differ."""
    x = 1e-4 * torch.randn(1, 32, 4, 4)
    small, large = GroupNorm(32, 32, eps=1e-6), GroupNorm(32, 32, eps=1e-5)
    torch.testing.assert_close(small.layout_preserving_forward(x), torch.nn.GroupNorm.forward(small, x))
    assert not torch.allclose(small.layout_preserving_forward(x), large.layout_preserving_forward(x), rtol=1e-2)


def test_compiled_forward_falls_back_where_the_fast_form_does_not_apply():
    """No affine parameters, or no spatial dimension: nn.GroupNorm's own path, compiled or not."""
    compiled = torch.compile(lambda norm, t: norm(t), backend="aot_eager")
    for norm, x in ((GroupNorm(4, 8, affine=False), torch.randn(2, 8, 3, 3)), (GroupNorm(4, 8), torch.randn(2, 8))):
        torch._dynamo.reset()
        torch.testing.assert_close(compiled(norm, x), torch.nn.GroupNorm.forward(norm, x))


def test_the_compiled_autoencoder_uses_the_compiled_form_and_agrees_with_eager(monkeypatch):
    torch.manual_seed(0)
    model = Autoencoder(in_channels=3, **{**SMALL_PRESETS["kl-f2-small"], "resolution": 16}).eval()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(type(m) is GroupNorm and m.eps == 1e-6 for m in norms)
    for norm in norms:
        randomized(norm)
    calls = []
    original = GroupNorm.layout_preserving_forward
    monkeypatch.setattr(GroupNorm, "layout_preserving_forward", lambda self, x: calls.append(1) or original(self, x))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        eager = model.decode(model.encode(x).mode())
        assert calls == []  # eager mode keeps PyTorch's fused kernel
        torch._dynamo.reset()
        compiled = torch.compile(lambda t: model.decode(model.encode(t).mode()), backend="aot_eager")(x)
    assert len(calls) >= len(norms)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
