"""The differentiable quantizers: ranges, group shapes, zero groups, STE gradients."""
import pytest
import torch

from bisup.quant import fake_quantize, fake_quantize_per_tensor, qrange, quantize_groups


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [-1, 16, 64])
def test_codes_in_range_and_error_bounded(bits, sym, group_size, gen):
    x = torch.randn(5, 128, generator=gen) * 3
    q, s, z = quantize_groups(x, bits, group_size, sym)
    lo, hi = qrange(bits, sym)
    assert q.min() >= lo and q.max() <= hi and torch.equal(q, q.round())
    xq = fake_quantize(x, bits, group_size, sym)
    g = 128 if group_size == -1 else group_size
    step = s.expand(-1, -1, g).reshape(5, 128)
    assert ((xq - x).abs() <= step / 2 + 1e-6).all()


def test_more_bits_less_error(gen):
    x = torch.randn(8, 256, generator=gen)
    errs = [(fake_quantize(x, b, 64) - x).pow(2).mean().item() for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True)


def test_zero_groups_are_exact_and_finite():
    x = torch.zeros(2, 64)
    x[1, 32:] = torch.linspace(-1, 1, 32)
    for sym in (True, False):
        q, s, z = quantize_groups(x, 4, 32, sym)
        assert torch.isfinite(s).all() and s[0, 0, 0] == 1
        assert torch.equal(fake_quantize(x, 4, 32, sym)[0], torch.zeros(64))


def test_sixteen_bits_is_identity(gen):
    x = torch.randn(3, 8, generator=gen)
    assert fake_quantize(x, 16) is x


def test_per_tensor_uses_one_scale(gen):
    x = torch.randn(4, 16, generator=gen)
    xq = fake_quantize_per_tensor(x, 4)
    step = x.abs().max() / 7
    assert torch.allclose(xq / step, (xq / step).round(), atol=1e-4)


def test_ste_gradients_reach_input_and_clip(gen):
    x = torch.randn(4, 64, generator=gen, requires_grad=True)
    clip = torch.full((4, 2, 1), 0.9, requires_grad=True)
    y = fake_quantize(x, 4, 32, True, clip)
    (y * torch.randn(4, 64, generator=gen)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert clip.grad is not None and clip.grad.abs().sum() > 0
    # straight-through: inside the clipping range the input gradient is the upstream gradient
    x2 = torch.randn(1, 32, generator=gen, requires_grad=True)
    fake_quantize(x2, 8, -1, True).sum().backward()
    # (the abs-max element also gets a gradient through the scale)
    assert (x2.grad == 1).sum() >= 30


def test_asym_lower_clip_gradient(gen):
    x = torch.randn(2, 32, generator=gen)
    lo = torch.tensor(0.95, requires_grad=True)
    hi = torch.tensor(0.9, requires_grad=True)
    y = fake_quantize(x, 3, -1, False, hi, lo)
    (y - x).pow(2).sum().backward()
    assert lo.grad is not None and hi.grad is not None and lo.grad != 0 and hi.grad != 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="bits"):
        fake_quantize(torch.randn(2, 8), 1)
    with pytest.raises(ValueError, match="multiple of group_size"):
        fake_quantize(torch.randn(2, 10), 4, 4)
