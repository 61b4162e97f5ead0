"""The `hadamard` op: CPU twin / CUDA kernel vs the PyTorch reference vs the dense matrix; HadamardTransform's
inverse and gradients (its autograd.Function around the op) vs the dense matrix."""
import pytest
import torch

import bisup.ops as ops
import bisup.reference as ref
from bisup.rotation import hadamard_base, hadamard_matrix

# (n, has base): powers of two, Paley bases (12, 20, 28, 36, 44, 108 ...), a GF(3^3) base (28),
# a random-orthogonal base (6 = 2 * 3, 13696 = 128 * 107), and a whole Paley order (p = 1).
SIZES = [1, 2, 8, 64, 12, 40, 28 * 4, 36 * 16, 44, 108, 6, 1536, 13696]
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", SIZES)
def test_hadamard_parity(device, n, dtype):
    gen = torch.Generator().manual_seed(n)
    rows = 5 if n < 4096 else 2
    x = (torch.randn(rows, 3, n, generator=gen) * 3).to(dtype)
    x[0, 0] = 0  # an all-zero row
    base = None if n & (n - 1) == 0 else hadamard_base(n)
    want = ref.hadamard(x, base)
    if n <= 2048:  # the reference is the dense orthonormal matrix
        dense = (x.double() @ hadamard_matrix(n, torch.float64).T).to(dtype)
        torch.testing.assert_close(want, dense, atol=TOL[dtype] * 4, rtol=TOL[dtype])
    got = ops.hadamard(x.to(device), None if base is None else base.to(device)).cpu()
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype] * 4, rtol=TOL[dtype])
    assert torch.equal(got[0, 0], torch.zeros_like(got[0, 0]))


def test_hadamard_is_orthonormal_and_self_consistent(device):
    n = 576
    x = torch.randn(4, n, generator=torch.Generator().manual_seed(1), dtype=torch.float32, device=device)
    base = hadamard_base(n, device=device)
    y = ops.hadamard(x, base)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)
    # H is symmetric for Sylvester-only orders, so applying it twice gives x back
    z = ops.hadamard(ops.hadamard(x[:, :512].contiguous()), None)
    torch.testing.assert_close(z, x[:, :512], rtol=1e-5, atol=1e-5)


def test_hadamard_errors(device):
    x = torch.randn(2, 24, device=device)
    with pytest.raises(RuntimeError, match="power of two"):
        ops.hadamard(x)  # 24 needs a base
    with pytest.raises(RuntimeError, match="multiple of the base order"):
        ops.hadamard(x, hadamard_base(20, device=device))
    with pytest.raises(RuntimeError, match="power of two"):
        ops.hadamard(torch.randn(2, 36, device=device), hadamard_base(12, device=device))
    with pytest.raises(RuntimeError, match="must have dtype Float"):
        ops.hadamard(x, hadamard_base(24, device=device).double())
    with pytest.raises(RuntimeError, match="must be square"):
        ops.hadamard(x, torch.ones(3, 6, device=device))
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.hadamard(torch.randn(24, 4, device=device).t(), None)
    with pytest.raises(RuntimeError, match="float16, bfloat16 or float32"):
        ops.hadamard(torch.ones(2, 8, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="power of two"):
        ref.hadamard(x)
    if device.type == "cuda":
        with pytest.raises(RuntimeError, match="is on"):
            ops.hadamard(x, hadamard_base(24))
        with pytest.raises(RuntimeError, match="up to 32768"):
            ops.hadamard(torch.randn(1, 65536, device=device))


# ------------------------------------------------------------------------------------------------
# HadamardTransform (x -> x M, M = diag(signs) H^T): inverse and gradients vs the dense matrix
# ------------------------------------------------------------------------------------------------
def _transforms(n):
    from bisup.rotation.fuse import HadamardTransform, random_hadamard_transform

    return [HadamardTransform(n), random_hadamard_transform(n, seed=n)]


# a Sylvester order, Paley bases (12, 20 * 4), a GF(3^3) base (28 * 4); none of the based M is symmetric
GRAD_SIZES = [16, 12, 80, 112]


@pytest.mark.parametrize("n", GRAD_SIZES)
def test_hadamard_transform_gradcheck_float64(n):
    """The float64 path (the reference) is differentiable; forward and inverse pass gradcheck."""
    x = torch.randn(2, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n), requires_grad=True)
    for t in _transforms(n):
        assert torch.autograd.gradcheck(t, (x,))
        assert torch.autograd.gradcheck(t.inverse, (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", GRAD_SIZES + [6])  # 6: a random-orthogonal (non-Hadamard) base
def test_hadamard_transform_kernel_gradients_match_the_dense_matrix(device, n, dtype):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(3, 2, n, generator=gen)
    dy = torch.randn(3, 2, n, generator=gen)
    tol = dict(atol=TOL[dtype] * 4, rtol=TOL[dtype])
    for t in _transforms(n):
        m = t.matrix(torch.float64)  # forward(x) = x M
        for fn, mat in ((t, m), (t.inverse, m.T)):
            xd = x.to(device, dtype, copy=True).requires_grad_(True)
            y = fn(xd)
            assert y.dtype == dtype and y.grad_fn is not None
            y.backward(dy.to(device, dtype))
            torch.testing.assert_close(y.detach().cpu().float(), (xd.detach().cpu().double() @ mat).float(), **tol)
            want = dy.to(dtype).double() @ mat.T  # d/dx of x A is dy A^T
            torch.testing.assert_close(xd.grad.cpu().float(), want.float(), **tol)
        xf = x.to(device)
        torch.testing.assert_close(t.inverse(t(xf)), xf, atol=1e-5, rtol=1e-5)
