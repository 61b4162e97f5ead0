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

import contextlib
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


def inverse_hessian_cholesky(hessian: torch.Tensor, damp: float, order: Optional[torch.Tensor] = None,
                             dead: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp*mean(diag H)*I)^-1 (H^-1 = U^T U), float32 [K, K], of H
    with rows and columns taken in `order` (default: as they are), H[i, i] = 1 where dead[i].

    With J the order-reversing permutation, chol(J H J) = L gives U = J L^-1 J (J L^-1 J is upper
    triangular and (J L^-1 J)^T (J L^-1 J) = J (L L^T)^-1 J = H^-1): one Cholesky and one
    triangular inverse instead of Cholesky, inverse and Cholesky again. float32, as GPTQ's own
    implementation: a K = 28672 Hessian (a 70B down_proj) is 3.3 GB in float32, twice that in float64."""
    k = hessian.shape[0]
    rev = torch.arange(k - 1, -1, -1, device=hessian.device) if order is None else order.flip(0)
    h = hessian.index_select(0, rev).index_select(1, rev).to(torch.float32)  # J H J in `order`: a copy
    if dead is not None:
        dr = dead.to(h.device)[rev]
        h[dr, dr] = 1.0
    mean_diag = h.diagonal().mean().item()
    base = mean_diag if mean_diag > 0 else 1.0
    d, added = damp, 0.0
    for _ in range(6):
        h.diagonal().add_(d * base - added)
        added = d * base
        l_fac, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            del h
            inv = torch.linalg.solve_triangular(l_fac, torch.eye(k, dtype=l_fac.dtype, device=l_fac.device),
                                                upper=False)
            del l_fac
            return inv.flip(0, 1)
        d = max(d * 10.0, 1e-6)
    raise RuntimeError(f"GPTQ: Hessian not positive definite even with damping {d / 10:g} x mean diagonal")


class GPTQPlan(NamedTuple):
    """What GPTQ needs from one Hessian, shared by every linear that reads the same input (q/k/v,
    gate/up): the processing order and the inverse-Hessian factor in that order.

    perm: processing order of the input channels; gid_perm: group id per position; members: positions
    of every group's columns (the outlier set last, as group n_groups); u: upper Cholesky factor of the
    damped inverse Hessian in processing order; dead: channels that never fired (zero weight column)."""

    k: int
    group_size: int
    damp: float
    act_order: bool
    outliers: torch.Tensor
    n_groups: int
    perm: torch.Tensor
    pos_of: torch.Tensor
    gid_perm: torch.Tensor
    members: list
    u: torch.Tensor
    dead: torch.Tensor


@torch.no_grad()
def gptq_plan(hessian: torch.Tensor, group_size: int, damp: float = 0.01, act_order: bool = True,
              outlier_idx: IndexLike = None, device=None) -> GPTQPlan:
    """The GPTQPlan of one input Hessian [K, K] (computed on `device`, default the Hessian's)."""
    k = hessian.shape[0]
    dev = hessian.device if device is None else torch.device(device)
    outliers = _as_index(outlier_idx, k)
    gid, n_groups = normal_group_index(k, group_size, outliers)
    h = hessian.detach().diagonal().to(device=dev, dtype=torch.float32)
    dead = (h == 0).cpu()
    # processing order: normal channels (by descending diag(H) with act_order), then outlier channels
    is_outlier = gid == n_groups
    normal = torch.nonzero(~is_outlier).flatten()
    kept = torch.nonzero(is_outlier).flatten()
    if act_order:  # dead channels count as H[i, i] = 1 (their value in the factor)
        diag = torch.where(dead, torch.ones_like(h.cpu()), h.cpu())
        normal = normal[torch.argsort(diag[normal], descending=True, stable=True)]
        kept = kept[torch.argsort(diag[kept], descending=True, stable=True)]
    perm = torch.cat([normal, kept])
    pos_of = torch.empty(k, dtype=torch.long, device="cpu")
    pos_of[perm] = torch.arange(k, device="cpu")
    members = [pos_of[gid == g].to(dev) for g in range(n_groups + int(outliers.numel() > 0))]
    del h  # (a view or the one copy) the factor is made from `hessian` in the processing order
    u = inverse_hessian_cholesky(hessian.detach().to(dev), damp, perm.to(dev), dead.to(dev))
    return GPTQPlan(k, group_size, damp, act_order, outliers, n_groups, perm, pos_of, gid[perm], members, u, dead)


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: Optional[torch.Tensor],
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
    plan: Optional[GPTQPlan] = None,
) -> GPTQResult:
    """GPTQ-quantize weight [N, K] given the input Hessian [K, K] (any positive scale).

    Returns GPTQResult(weight, codes, scales, zeros, outlier_scales); see the module docstring.
    plan: gptq_plan(hessian, ...) made once for every linear reading the same input (hessian is then
    not read again).
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if plan is None and (hessian is None or hessian.shape != (k, k)):
        got = None if hessian is None else tuple(hessian.shape)
        raise ValueError(f"hessian must be [K, K] = [{k}, {k}] for weight {tuple(weight.shape)}, got {got}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    qmin, qmax = qrange(bits, sym)
    outlier_sym = sym if outlier_sym is None else outlier_sym
    kmin, kmax = qrange(outlier_bits, outlier_sym)
    dev = weight.device
    if plan is None:
        plan = gptq_plan(hessian, group_size, damp, act_order, outlier_idx, dev)
    elif (plan.k, plan.group_size, plan.damp, plan.act_order) != (k, group_size, damp, act_order) \
            or not torch.equal(plan.outliers, _as_index(outlier_idx, k)):
        raise ValueError("gptq_quantize: the plan was made for another shape, group size, damping, order or outlier set")
    n_groups, members, gid_perm, u = plan.n_groups, plan.members, plan.gid_perm, plan.u.to(dev)
    has_outliers = plan.outliers.numel() > 0

    # Transposed layout: row p of wt is the weight column processed at position p, so every per-column
    # step below reads and writes contiguous memory (the column loop is latency-bound, K steps).
    perm = plan.perm.to(dev)
    wt = weight.detach().T.index_select(0, perm).to(torch.float32)  # one [K, N] copy
    wt[plan.dead.to(dev)[perm]] = 0.0
    scales = torch.ones(len(members), n, dtype=torch.float32, device=dev)
    zeros = torch.zeros(len(members), n, dtype=torch.float32, device=dev)
    ready = [False] * len(members)
    q_out = torch.empty_like(wt)
    codes = torch.empty_like(wt)
    gids = gid_perm.tolist()
    diag = u.diagonal().tolist()

    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        err1 = torch.empty(i2 - i1, n, dtype=torch.float32, device=dev)
        with _one_thread(dev):  # the column steps: tiny sequential ops (_one_thread)
            for i in range(i2 - i1):
                p = i1 + i
                g = gids[p]
                if not ready[g]:
                    cur = _current_columns(wt, err1, u, members[g], i1, i2, i)
                    in_outliers = g == n_groups
                    g_bits, g_sym = (outlier_bits, outlier_sym) if in_outliers else (bits, sym)
                    g_clip = clip
                    if clip_search and not in_outliers:  # the group's clip chosen on its current (updated) columns
                        g_clip = mse_clip(cur.unsqueeze(1), g_bits, g_sym, clip_grid(clip), scale_dtype)
                    sg, zg = group_params(cur.unsqueeze(1), g_bits, g_sym, g_clip, scale_dtype=scale_dtype)
                    scales[g], zeros[g] = sg[:, 0, 0], zg[:, 0, 0]
                    ready[g] = True
                lo, hi = (kmin, kmax) if g == n_groups else (qmin, qmax)
                col, sg, zg = wt[p], scales[g], zeros[g]
                q = torch.div(col, sg, out=codes[p]).round_().add_(zg).clamp_(lo, hi)
                dq = torch.sub(q, zg, out=q_out[p]).mul_(sg)
                e = torch.sub(col, dq, out=err1[i]).div_(diag[p])
                if p + 1 < i2:  # the rest of the block takes this column's error now, later columns per block
                    wt[p + 1:i2].addr_(u[p, p + 1:i2], e, alpha=-1.0)
        if i2 < k:
            wt[i2:].addmm_(u[i1:i2, i2:].T, err1, alpha=-1.0)

    inv = plan.pos_of.to(dev)
    q_w = q_out[inv].T.to(weight.dtype)
    codes = codes[inv].T
    codes = codes.to(torch.int8 if codes.numel() == 0 or (codes.max() <= 127 and codes.min() >= -128) else torch.int16)
    half = scale_dtype if scale_dtype is not None else torch.float16
    scales, zeros = scales.T.to(half), zeros.T.to(half)

    def part(t, lo, hi):
        return t[:, lo:hi].contiguous()

    outlier_s = part(scales, n_groups, None) if has_outliers else None
    outlier_z = part(zeros, n_groups, None) if has_outliers else None
    return GPTQResult(q_w.contiguous(), codes.contiguous(), part(scales, 0, n_groups), part(zeros, 0, n_groups),
                      outlier_s, outlier_z)


@contextlib.contextmanager
def _one_thread(dev: torch.device):
    """One intra-op thread for GPTQ's column steps on the CPU. Each step is a handful of tiny, strictly
    sequential ops (K steps per linear); split over threads, every op ends in a barrier that costs
    more than the op, and when the cores are shared with another busy process each barrier waits for
    a descheduled thread (a scheduler time slice). Measured on 2 shared cores with another process
    busy, the GPTQ of one gemma-3-270m layer's linears: 32 s with 2 threads, 0.6 s with 1."""
    if dev.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _current_columns(wt, err1, u, cols, i1, i2, i):
    """Values [N, len(cols)] of the (not yet quantized) columns at processing positions `cols` (>= i1 + i)
    as if every pending update of this block had been applied: in-block rows of wt are current; later
    rows still owe -u[i1:i1+i, col]^T @ err1[:i]."""
    out = wt[cols]
    later = cols >= i2
    if i > 0 and bool(later.any()):
        out[later] -= u[i1:i1 + i, cols[later]].T @ err1[:i]
    return out.T
