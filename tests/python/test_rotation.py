"""Hadamard constructions: orthogonality of every constructed order, field arithmetic, fallbacks."""
import math

import numpy as np
import pytest
import torch

from bisup.rotation import hadamard as had

# Base orders from each construction plus the widths of real models (Llama, Qwen, SmolLM2).
ORDERS = [1, 2, 4, 12, 20, 24, 28, 36, 40, 44, 52, 60, 68, 76, 108, 148, 344, 576, 1536, 4096,
          11008, 14336, 18944, 27648, 29568]


@pytest.mark.parametrize("n", ORDERS)
def test_hadamard_orthogonal(n):
    p, m, ok = had.hadamard_factors(n)
    assert ok and p * m == n and p & (p - 1) == 0
    h = had.hadamard_pm1(m)
    assert h.shape == (m, m) and set(np.unique(h)) <= {-1, 1}
    assert np.array_equal(h @ h.T, m * np.eye(m, dtype=np.int64))
    if n <= 4096:  # the full orthonormal matrix: sqrt(n) H is +-1 and H H^T = I
        full = had.hadamard_matrix(n, torch.float64)
        torch.testing.assert_close(full @ full.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
        assert torch.allclose((full * math.sqrt(n)).abs(), torch.ones(n, n, dtype=torch.float64))


@pytest.mark.parametrize("q", [3, 7, 11, 19, 27, 43, 49, 59, 125, 343])
def test_paley_any_prime_power(q):
    h = had.paley1(q) if q % 4 == 3 else had.paley2(q)
    n = h.shape[0]
    assert n == (q + 1 if q % 4 == 3 else 2 * (q + 1))
    assert np.array_equal(h @ h.T, n * np.eye(n, dtype=np.int64))


def test_finite_field():
    f = had.GF(27)  # GF(3^3): x^26 = 1 for x != 0 and exactly 13 nonzero squares
    assert f.p == 3 and f.r == 3
    for a in [1, 5, 13, 26]:
        acc = 1
        for _ in range(26):
            acc = f.mul(acc, a)
        assert acc == 1
    chi = f.quadratic_character()
    assert (chi == 1).sum() == 13 and (chi == -1).sum() == 13 and chi[0] == 0
    assert had.prime_power(343) == (7, 3) and had.prime_power(12) is None
    assert had._is_irreducible(list(had.irreducible_polynomial(7, 3)), 7)


def test_known_impossible_and_fallback():
    assert had.hadamard_plan(6) is None and had.hadamard_plan(9) is None
    for n in [6, 9, 13696, 172]:  # 172 = 4 * 43: no Paley (171, 85 not prime powers) -> 4 (x) random 43
        p, m, ok = had.hadamard_factors(n)
        assert not ok and p * m == n
        with pytest.warns(UserWarning, match="no Hadamard matrix construction"):
            had._warned.discard(n)
            had._base_f64.cache_clear()
            b = had.hadamard_base(n, torch.float64)
        torch.testing.assert_close(b @ b.T, torch.eye(m, dtype=torch.float64), atol=1e-12, rtol=0)
    assert had.hadamard_factors(13696) == (128, 107, False)
    q = had.random_orthogonal(50, seed=3)
    torch.testing.assert_close(q.T @ q, torch.eye(50, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.equal(q, had.random_orthogonal(50, seed=3)) and not torch.equal(q, had.random_orthogonal(50, seed=4))


def test_random_hadamard_is_signed_hadamard():
    n = 40
    q = had.random_hadamard(n, seed=5, dtype=torch.float64)
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    s = had.random_signs(n, 5).double()
    x = torch.randn(3, n, dtype=torch.float64)
    torch.testing.assert_close(x @ q, (x * s) @ had.hadamard_matrix(n, torch.float64).T)


def test_errors():
    with pytest.raises(ValueError, match="power of two"):
        had.sylvester(12)
    with pytest.raises(ValueError, match="q = 3 mod 4"):
        had.paley1(13)
    with pytest.raises(ValueError, match="q = 1 mod 4"):
        had.paley2(15)
    with pytest.raises(ValueError, match="no Hadamard construction"):
        had.hadamard_pm1(6)
    with pytest.raises(ValueError, match="positive"):
        had.hadamard_factors(0)
