"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each column's rounding
error onto the columns not yet quantized through the inverse Hessian of the layer inputs.

    min_Wq || X W^T - X Wq^T ||^2,   H = X^T X  (K x K, summed over calibration tokens)

Choices made here (all of them visible in the tests):
- Quantizer: the one of `bisup.quant.quantizer` (`group_params`, same sym/asym formula, clip,
  scales rounded to fp16 like the kernels store them), so GPTQ with H = I is exactly RTN.
- Groups are always `group_size` consecutive input channels in the ORIGINAL order (the layout the
  kernels read; no g_idx). A group's scale/zero is fixed when the first of its columns comes up
  in the processing order, from the weights as updated by every column quantized before it
  (pending lazy-block updates included). Without act-order that is textbook GPTQ; with act-order
  (columns processed by descending diag(H)) a group's columns may be scattered over the sequence,
  and its scale still sees all of them, already error-compensated.
- outlier_idx (Atom's outlier input channels) leave the group quantizer: they are quantized at
  `outlier_bits` with one scale per output row (symmetric unless outlier_sym=False; default: like the
  rest, as FakeQuantLinear does), and are processed LAST, so the high-precision channels absorb
  the error of the low-bit ones (as Atom does).
  The remaining ("normal") channels form the groups: normal channel j (in original order, outlier
  channels removed) belongs to group j // group_size; a last partial group is allowed.
- clip_search: a group's clip ratio is chosen when its scale is fixed, as the least-squared-error
  one of clip_grid(clip) on those updated columns (mse_clip; not Hessian-weighted). Outliers: clip.
- Dead inputs (H[i, i] == 0: the channel never fired) get H[i, i] = 1 and a zero weight column.
- Damping: damp * mean(diag(H)) on the diagonal; if the Cholesky still fails the damping grows x10.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch

from bisup.quant.quantizer import clip_grid, group_params, mse_clip, qrange

IndexLike = Union[torch.Tensor, Sequence[int], None]


class GPTQResult(NamedTuple):
    """weight: dequantized [N, K] (weight's dtype); codes: int8 [N, K] in the original column order
    (int16 only if an asymmetric 8-bit outlier segment needs codes above 127); scales/zeros: fp16 [N, G]
    of the normal groups (zeros all 0 when sym); outlier_scales/outlier_zeros: fp16 [N, 1] of the outlier
    (outlier) channels, or None without outlier_idx."""

    weight: torch.Tensor
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    outlier_scales: Optional[torch.Tensor] = None
    outlier_zeros: Optional[torch.Tensor] = None


def normal_group_index(k: int, group_size: int, outlier_idx: IndexLike = None) -> Tuple[torch.Tensor, int]:
    """(group id of every input channel, G): normal channels (outlier_idx removed, original order) in
    runs of group_size (-1: one group), G groups; outlier channels get id G (one past the last)."""
    outliers = _as_index(outlier_idx, k)
    is_outlier = torch.zeros(k, dtype=torch.bool, device="cpu")
    is_outlier[outliers] = True
    n_normal = k - int(is_outlier.sum())
    g = n_normal if group_size == -1 else group_size
    gid = torch.empty(k, dtype=torch.long, device="cpu")
    gid[~is_outlier] = torch.arange(n_normal, device="cpu") // max(g, 1)
    n_groups = -(-n_normal // g) if n_normal > 0 else 0
    gid[is_outlier] = n_groups
    return gid, n_groups


def _as_index(idx: IndexLike, k: int) -> torch.Tensor:
    # index bookkeeping stays on the CPU; what the weight's device needs is moved there where used
    if idx is None:
        return torch.zeros(0, dtype=torch.long, device="cpu")
    t = torch.as_tensor(idx, dtype=torch.long, device="cpu").flatten()
    if t.numel() and (t.min() < 0 or t.max() >= k):
        raise ValueError(f"outlier_idx must lie in [0, {k}), got values in [{int(t.min())}, {int(t.max())}]")
    if t.unique().numel() != t.numel():
        raise ValueError("outlier_idx has repeated channels")
    return t


def inverse_hessian_cholesky(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp*mean(diag H)*I)^-1 (H^-1 = U^T U), float64 math."""
    h = hessian.to(torch.float64)
    k = h.shape[0]
    mean_diag = h.diagonal().mean().item()
    base = mean_diag if mean_diag > 0 else 1.0
    eye = torch.eye(k, dtype=h.dtype, device=h.device)
    d = damp
    for _ in range(6):
        l_fac, info = torch.linalg.cholesky_ex(h + (d * base) * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(l_fac)
            u, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return u
        d = max(d * 10.0, 1e-6)
    raise RuntimeError(f"GPTQ: Hessian not positive definite even with damping {d / 10:g} x mean diagonal")


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool = True,
    clip: float = 1.0,
    damp: float = 0.01,
    act_order: bool = True,
    block_size: int = 128,
    outlier_idx: IndexLike = None,
    outlier_bits: int = 8,
    outlier_sym: Optional[bool] = None,
    scale_dtype: Optional[torch.dtype] = torch.float16,
    clip_search: bool = False,
) -> GPTQResult:
    """GPTQ-quantize weight [N, K] given the input Hessian [K, K] (any positive scale).

    Returns GPTQResult(weight, codes, scales, zeros, outlier_scales); see the module docstring.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if hessian.shape != (k, k):
        raise ValueError(f"hessian must be [K, K] = [{k}, {k}] for weight {tuple(weight.shape)}, got {tuple(hessian.shape)}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    qmin, qmax = qrange(bits, sym)
    outlier_sym = sym if outlier_sym is None else outlier_sym
    kmin, kmax = qrange(outlier_bits, outlier_sym)
    dev = weight.device

    outliers = _as_index(outlier_idx, k)
    gid, n_groups = normal_group_index(k, group_size, outliers)
    has_outliers = outliers.numel() > 0

    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(device=dev, dtype=torch.float64).clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    # processing order: normal channels (by descending diag(H) with act_order), then outlier channels
    is_outlier = gid == n_groups
    normal = torch.nonzero(~is_outlier).flatten()
    kept = torch.nonzero(is_outlier).flatten()
    if act_order:
        diag = h.diagonal().cpu()
        normal = normal[torch.argsort(diag[normal], descending=True, stable=True)]
        kept = kept[torch.argsort(diag[kept], descending=True, stable=True)]
    perm = torch.cat([normal, kept])
    pos_of = torch.empty(k, dtype=torch.long, device="cpu")
    pos_of[perm] = torch.arange(k, device="cpu")
    gid_perm = gid[perm]
    # positions (in processing order) of every group's columns, the outlier set as group n_groups
    members = [pos_of[gid == g].to(dev) for g in range(n_groups + int(has_outliers))]

    w = w[:, perm.to(dev)]
    u = inverse_hessian_cholesky(h[perm][:, perm], damp).to(torch.float32)

    scales = torch.ones(n, len(members), dtype=torch.float32, device=dev)
    zeros = torch.zeros(n, len(members), dtype=torch.float32, device=dev)
    ready = [False] * len(members)
    q_out = torch.empty_like(w)
    codes = torch.empty(n, k, dtype=torch.float32, device=dev)

    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            p = i1 + i
            g = int(gid_perm[p])
            if not ready[g]:
                cur = _current_columns(w, w1, err1, u, members[g], i1, i2, i)
                in_outliers = g == n_groups
                g_bits, g_sym = (outlier_bits, outlier_sym) if in_outliers else (bits, sym)
                g_clip = clip
                if clip_search and not in_outliers:  # the group's clip chosen on its current (updated) columns
                    g_clip = mse_clip(cur.unsqueeze(1), g_bits, g_sym, clip_grid(clip), scale_dtype)
                s, z = group_params(cur.unsqueeze(1), g_bits, g_sym, g_clip, scale_dtype=scale_dtype)
                scales[:, g], zeros[:, g] = s[:, 0, 0], z[:, 0, 0]
                ready[g] = True
            lo, hi = (kmin, kmax) if g == n_groups else (qmin, qmax)
            col = w1[:, i]
            s, z = scales[:, g], zeros[:, g]
            q = torch.clamp(torch.round(col / s) + z, lo, hi)
            dq = (q - z) * s
            codes[:, p] = q
            q_out[:, p] = dq
            e = (col - dq) / u1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]

    inv = pos_of.to(dev)
    q_w = q_out[:, inv].to(weight.dtype)
    codes = codes[:, inv]
    codes = codes.to(torch.int8 if codes.numel() == 0 or (codes.max() <= 127 and codes.min() >= -128) else torch.int16)
    half = scale_dtype if scale_dtype is not None else torch.float16
    outlier_s = scales[:, n_groups:].to(half) if has_outliers else None
    outlier_z = zeros[:, n_groups:].to(half) if has_outliers else None
    return GPTQResult(q_w, codes, scales[:, :n_groups].to(half), zeros[:, :n_groups].to(half), outlier_s, outlier_z)


def _current_columns(w, w1, err1, u, cols, i1, i2, i):
    """Values of the (not yet quantized) columns `cols` (processing positions >= i1 + i) as if every
    pending update of this block had been applied: in-block columns are current in w1; later columns
    still owe -err1[:, :i] @ u[i1:i1+i, col]."""
    out = torch.empty(w.shape[0], cols.numel(), dtype=w.dtype, device=w.device)
    inb = cols < i2
    out[:, inb] = w1[:, cols[inb] - i1]
    if (~inb).any():
        later = cols[~inb]
        out[:, ~inb] = w[:, later] - err1[:, :i] @ u[i1:i1 + i, later]
    return out
