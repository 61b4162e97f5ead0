"""Hadamard matrices of (almost) any order, built from scratch.

A Hadamard matrix H of order n has entries +-1 and H H^T = n I. Orders 1, 2 and multiples of 4
can have one (the Hadamard conjecture); we build them from:

- Sylvester:       H_{2n} = [[H, H], [H, -H]]  (orders 2^k)
- Paley type I:    q a prime power, q = 3 (mod 4)  ->  order q + 1
- Paley type II:   q a prime power, q = 1 (mod 4)  ->  order 2(q + 1)
- Kronecker:       H_a (x) H_b is Hadamard of order a*b

Prime-power fields GF(p^r) are constructed here (an irreducible polynomial found by search), so
e.g. 344 = 7^3 + 1 (Llama-2-7B's 11008 = 32 * 344) and 28 = 3^3 + 1 work.

For the fast transform (bisup.ops.hadamard) an order-n matrix is used in the factored form
    H_n / sqrt(n) = (Sylvester_{2^k} / sqrt(2^k)) (x) B,     B an orthonormal m x m "base",
with n = 2^k * m. `hadamard_factors(n)` picks the smallest base m that admits a construction.
When no Hadamard matrix of any order m * 2^j (j <= k) exists among our constructions (n odd,
n = 2 mod 4, or e.g. 13696 = 2^7 * 107, which would need a Hadamard matrix of order 428*2^j
that no Paley construction gives), the base is a seeded random orthogonal matrix of order m
(the odd part of n), with a warning: still orthogonal and still fast (butterflies on the 2^k part).
"""
from __future__ import annotations

import functools
import itertools
import math
import warnings
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

# --------------------------------------------------------------------------------------------
# number theory and finite fields
# --------------------------------------------------------------------------------------------


def prime_power(q: int) -> Optional[Tuple[int, int]]:
    """(p, r) with q = p^r, p prime, r >= 1; None if q is not a prime power."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)
    r, rest = 0, q
    while rest % p == 0:
        rest //= p
        r += 1
    return (p, r) if rest == 1 else None


def _poly_mod(a: List[int], m: List[int], p: int) -> List[int]:
    """a mod m over GF(p); polynomials as coefficient lists, lowest degree first, m monic."""
    a = list(a)
    while len(a) >= len(m):
        c = a[-1] % p
        if c:
            shift = len(a) - len(m)
            for i, mi in enumerate(m):
                a[shift + i] = (a[shift + i] - c * mi) % p
        a.pop()
    return [x % p for x in a]


def _is_irreducible(m: List[int], p: int) -> bool:
    """Monic m of degree r is irreducible iff no monic polynomial of degree 1..r//2 divides it."""
    r = len(m) - 1
    for d in range(1, r // 2 + 1):
        for low in itertools.product(range(p), repeat=d):
            if not any(_poly_mod(m, list(low) + [1], p)):
                return False
    return True


@functools.lru_cache(maxsize=None)
def irreducible_polynomial(p: int, r: int) -> Tuple[int, ...]:
    """The first monic irreducible polynomial of degree r over GF(p) (lexicographic search)."""
    for low in itertools.product(range(p), repeat=r):
        if low[0] == 0:  # divisible by x
            continue
        m = list(low) + [1]
        if _is_irreducible(m, p):
            return tuple(m)
    raise AssertionError(f"no irreducible polynomial of degree {r} over GF({p})")  # cannot happen


class GF:
    """The field GF(p^r): elements are integers 0..q-1 whose base-p digits are the coefficients
    of a polynomial of degree < r (digit i = coefficient of x^i), reduced mod an irreducible one."""

    def __init__(self, q: int):
        pr = prime_power(q)
        if pr is None:
            raise ValueError(f"GF(q) needs a prime power q, got {q}")
        self.q, (self.p, self.r) = q, pr
        self.modulus = irreducible_polynomial(self.p, self.r) if self.r > 1 else (0, 1)
        # digits[e, i] = coefficient i of element e
        e = np.arange(q)
        self.digits = np.stack([(e // self.p**i) % self.p for i in range(self.r)], axis=1)
        self.weights = self.p ** np.arange(self.r)

    def sub(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Elementwise a - b (broadcasting), coefficient-wise mod p."""
        d = (self.digits[a] - self.digits[b]) % self.p
        return d @ self.weights

    def mul(self, a: int, b: int) -> int:
        pa, pb = self.digits[a], self.digits[b]
        prod = [0] * (2 * self.r - 1)
        for i, x in enumerate(pa):
            for j, y in enumerate(pb):
                prod[i + j] += int(x) * int(y)
        rem = _poly_mod(prod, list(self.modulus), self.p) if self.r > 1 else [prod[0] % self.p]
        rem = rem + [0] * (self.r - len(rem))
        return int(np.dot(rem, self.weights))

    def quadratic_character(self) -> np.ndarray:
        """chi[a] = 0 for a = 0, +1 for a nonzero square, -1 otherwise."""
        chi = -np.ones(self.q, dtype=np.int64)
        chi[0] = 0
        for x in range(1, self.q):
            chi[self.mul(x, x)] = 1
        return chi


def jacobsthal(q: int) -> np.ndarray:
    """Q[a, b] = chi(a - b) over GF(q): symmetric if q = 1 mod 4, skew if q = 3 mod 4."""
    field = GF(q)
    chi = field.quadratic_character()
    idx = np.arange(q)
    return chi[field.sub(idx[:, None], idx[None, :])]


# --------------------------------------------------------------------------------------------
# constructions (integer +-1 matrices, numpy int64)
# --------------------------------------------------------------------------------------------


def sylvester(n: int) -> np.ndarray:
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester construction needs a power of two, got {n}")
    h = np.ones((1, 1), dtype=np.int64)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def paley1(q: int) -> np.ndarray:
    """Order q + 1 for a prime power q = 3 mod 4: H = I + S, S = [[0, 1^T], [-1, Q]] (skew)."""
    if q % 4 != 3 or prime_power(q) is None:
        raise ValueError(f"Paley I needs a prime power q = 3 mod 4, got {q}")
    s = np.zeros((q + 1, q + 1), dtype=np.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = jacobsthal(q)
    return s + np.eye(q + 1, dtype=np.int64)


def paley2(q: int) -> np.ndarray:
    """Order 2(q + 1) for a prime power q = 1 mod 4, from the symmetric conference matrix
    C = [[0, 1^T], [1, Q]]: replace 0 by [[1, -1], [-1, -1]] and +-1 by +-[[1, 1], [1, -1]]."""
    if q % 4 != 1 or prime_power(q) is None:
        raise ValueError(f"Paley II needs a prime power q = 1 mod 4, got {q}")
    c = np.zeros((q + 1, q + 1), dtype=np.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = jacobsthal(q)
    zero_block = np.array([[1, -1], [-1, -1]], dtype=np.int64)
    one_block = np.array([[1, 1], [1, -1]], dtype=np.int64)
    return np.kron(c, one_block) + np.kron(c == 0, zero_block)


# A plan says how to build one order: ("sylvester", n), ("paley1", q), ("paley2", q) or
# ("kron", plan_a, plan_b).
Plan = tuple


@functools.lru_cache(maxsize=None)
def hadamard_plan(n: int) -> Optional[Plan]:
    """A construction of a Hadamard matrix of order n from ours, or None. Prefers Paley
    matrices directly (one dense block) over Kronecker products."""
    if n < 1:
        return None
    if n & (n - 1) == 0:
        return ("sylvester", n)
    if n % 4:
        return None
    if n % 4 == 0 and (n - 1) % 4 == 3 and prime_power(n - 1):
        return ("paley1", n - 1)
    if n % 8 == 4 and prime_power(n // 2 - 1) and (n // 2 - 1) % 4 == 1:
        return ("paley2", n // 2 - 1)
    # Kronecker product of two smaller constructible orders (a >= 2, both factors Hadamard orders)
    for a in range(2, math.isqrt(n) + 1):
        if n % a == 0:
            pa, pb = hadamard_plan(a), hadamard_plan(n // a)
            if pa is not None and pb is not None:
                return ("kron", pa, pb)
    return None


def build(plan: Plan) -> np.ndarray:
    kind = plan[0]
    if kind == "sylvester":
        return sylvester(plan[1])
    if kind == "paley1":
        return paley1(plan[1])
    if kind == "paley2":
        return paley2(plan[1])
    return np.kron(build(plan[1]), build(plan[2]))


def hadamard_pm1(n: int) -> np.ndarray:
    """A +-1 Hadamard matrix of order n (int64); ValueError if none of our constructions applies."""
    plan = hadamard_plan(n)
    if plan is None:
        raise ValueError(f"no Hadamard construction for order {n} (Sylvester x Paley I/II Kronecker)")
    return build(plan)


# --------------------------------------------------------------------------------------------
# factored orthonormal transforms for any n
# --------------------------------------------------------------------------------------------


def _pow2_part(n: int) -> int:
    return n & -n


@functools.lru_cache(maxsize=None)
def hadamard_factors(n: int) -> Tuple[int, int, bool]:
    """(p, m, is_hadamard) with n = p * m, p a power of two, m the smallest base order.

    is_hadamard: the base is a Hadamard matrix (then the whole transform is a scaled Hadamard
    matrix); otherwise the base is a random orthogonal matrix of the odd part of n."""
    if n < 1:
        raise ValueError(f"Hadamard order must be positive, got {n}")
    p2 = _pow2_part(n)
    odd = n // p2
    if odd == 1:
        return n, 1, True
    m = odd
    while m <= n:
        if hadamard_plan(m) is not None:
            return n // m, m, True
        m *= 2
    return p2, odd, False


def random_orthogonal(n: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """Haar-random orthogonal matrix: QR of a seeded Gaussian with the sign of R's diagonal fixed."""
    g = torch.Generator(device="cpu").manual_seed(seed)  # seeded on the CPU: the same matrix on every device
    a = torch.randn(n, n, generator=g, dtype=torch.float64, device="cpu")
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones_like(torch.diagonal(r)))
    return q.to(dtype).contiguous()


_warned: set = set()


def hadamard_base(n: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """The orthonormal base B (m x m) of the factored order-n transform (see module doc)."""
    return _base_f64(n).to(dtype=dtype, device=device).contiguous()


@functools.lru_cache(maxsize=64)
def _base_f64(n: int) -> torch.Tensor:
    p, m, ok = hadamard_factors(n)
    if ok:
        b = torch.from_numpy(hadamard_pm1(m)).to(torch.float64) / math.sqrt(m)
    else:
        if n not in _warned:
            _warned.add(n)
            warnings.warn(
                f"no Hadamard matrix construction for order {n} = {p} * {m}; using Sylvester({p}) (x) a seeded "
                f"random orthogonal {m}x{m} base instead (orthogonal, not +-1)",
                stacklevel=3,
            )
        b = random_orthogonal(m, seed=n)
    return b


def hadamard_matrix(n: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """Orthonormal order-n matrix (Sylvester_p / sqrt(p)) (x) B, B = hadamard_base(n): a scaled
    Hadamard matrix whenever one of our constructions applies (then sqrt(n) * H is +-1),
    otherwise orthogonal with a warning. bisup.ops.hadamard(x, hadamard_base(n)) == x @ H^T."""
    p, m, _ = hadamard_factors(n)
    s = torch.from_numpy(sylvester(p)).to(torch.float64) / math.sqrt(p)
    return torch.kron(s, hadamard_base(n, torch.float64)).to(dtype=dtype, device=device)


def random_signs(n: int, seed: int = 0) -> torch.Tensor:
    """Seeded +-1 vector (float32)."""
    g = torch.Generator(device="cpu").manual_seed(seed)  # seeded on the CPU: the same signs on every device
    return torch.randint(0, 2, (n,), generator=g, device="cpu").to(torch.float32) * 2 - 1


def random_hadamard(n: int, seed: int = 0, dtype=torch.float32, device=None) -> torch.Tensor:
    """Randomized orthonormal Hadamard Q = diag(s) H^T (s = random_signs(n, seed)), so that
    x @ Q = hadamard(x * s): the rotation QuaRot applies to the residual stream."""
    h = hadamard_matrix(n, torch.float64)
    s = random_signs(n, seed).to(torch.float64)
    return (s[:, None] * h.T).to(dtype=dtype, device=device)


def supported_orders(limit: int) -> Dict[int, Plan]:
    """Every order <= limit with a Hadamard construction here (for docs/tests)."""
    return {n: hadamard_plan(n) for n in range(1, limit + 1) if hadamard_plan(n) is not None}
