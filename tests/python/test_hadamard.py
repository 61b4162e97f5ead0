"""The `hadamard` op: CPU twin / CUDA kernel vs the PyTorch reference vs the dense matrix."""
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
