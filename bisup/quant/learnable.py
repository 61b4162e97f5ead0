"""Trainable pieces of BiSup's vertical error suppression (the training loop: bisup/methods/bisup.py).

- `lwc_quantize`: symmetric / asymmetric group fake-quantization of a weight with learnable per-group
  clip factors gamma = sigmoid(a) (upper) and beta = sigmoid(b) (lower), OmniQuant-LWC style:
      sym : s = max(gamma * max w, beta * (-min w)) / qmax
      asym: s = (gamma * max w - beta * min w) / qmax, z = round(-beta * min w / s)
  s is rounded to fp16 as the kernels store it (straight-through), codes use round-half-to-even
  with a straight-through estimator; the clip factors get their gradient through s.
  Learned rounding (AutoRound style): an offset in [-0.5, 0.5] per weight added before rounding,
  so each code can move to its other neighbour.
- `Smoothing`: one learnable per-channel scale vector s = exp(log_s) shared by a producer and its
  readers (x / s into the readers, W * s in their input columns), with a soft penalty keeping
  |log s| <= range (no hard clamp).
- `LowRank`: a rank-r branch delta = scale * A @ B added to the latent weight BEFORE quantization
  (merged): A from a truncated (randomized) SVD of the weight's quantization error, B = init * sqrt(S) V^T
  (0: the training starts exactly at the base method's model and learns in the error's leading subspace).
- `LearnableLinear`: a decoder linear computing
      y = act_quant(T(x / s_in)) @ Q_lwc( T_w((W + delta) * s_in[cols] / s_out[rows]) )^T + b / s_out
  where T is an optional orthogonal input transform x -> x M (QuaRot's online Hadamard before
  down_proj: the fast transform, differentiable, O(K log K) per row; W M is T applied to W's rows)
  and the activation clip is sigmoid(c) per linear. While gradients are on, the weight path
  (W_eff and its fake quantization) is recomputed in backward instead of kept (see Memory).
  `export()` returns the WeightCodes and the folded bias of exactly the weight that the ordinary
  FakeQuantLinear will hold.

Memory: what training one decoder layer holds beyond the model itself, in bytes per weight of its
linears [N, K] (defaults: learned rounding with AdamW, group size g, rank r; fp32 state):
    latent weight W                      0   the linear's own storage (bf16/fp16/fp32), read as fp32
    rounding offsets                     4   parameter [N, K]
      their gradient                     4   from backward to the step (freed right after it)
      their AdamW moments                8   0 with BiSupConfig.rounding_optimizer="signsgd"
    clip logits (2 per group)         32/g   parameter, gradient, 2 moments (0.25 at g = 128)
    low-rank A [N, r], B [r, K]   16r(N+K)/(NK)  parameter, gradient, 2 moments (0.04 at r = 8, 4096 x 11008)
    Q(W_eff) kept by F.linear            4   from a linear's forward to its backward (for the input gradient)
    other weight-path intermediates      0   recomputed in backward: ~25-30 bytes per weight of ONE linear
                                             at a time (kept, they would be 25-29 of every linear)
so ~16-20 bytes per weight of the layer at the peak of a step (offsets, moments, then gradients as
Q(W_eff) is released) plus the recompute of its largest linear, plus activations. Smoothing scales,
activation clips and biases are per channel.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from bisup.quant.codes import WeightCodes, code_dtype, quantize_weight
from bisup.quant.formats import BISUP_ACTS, OFF_BITS, SCALE_DTYPE, num_groups
from bisup.quant.groups import complement, fake_quant_channels, ragged_parts, searched_clips
from bisup.quant.quantizer import FP16_MAX, engine_fake_quantize, qrange, round_ste


# A learnable clip starts at most here: sigmoid saturates at 1 (zero gradient in float32), so a clip
# that starts at 1.0 could never move.
MAX_TRAINABLE_CLIP = 0.99


def logit(p: float) -> float:
    """log(p / (1 - p)), p clamped to [1e-9, 1 - 1e-9] (so sigmoid(logit(1.0)) == 1.0 in float32)."""
    p = min(max(float(p), 1e-9), 1 - 1e-9)
    return math.log(p / (1 - p))


def fp16_ste(s: torch.Tensor) -> torch.Tensor:
    """s rounded to fp16 (and 0 -> 1) in the forward, identity gradient."""
    r = s.detach().clamp(max=FP16_MAX).to(SCALE_DTYPE).to(torch.float32)
    r = torch.where(r > 0, r, torch.ones_like(r))
    return s + (r - s).detach()


def lwc_quantize(w: torch.Tensor, bits: int, group_size: int, sym: bool, hi_logit: torch.Tensor,
                 lo_logit: Optional[torch.Tensor], round_offset: Optional[torch.Tensor] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dequantized w, codes, scales, zeros) of w [N, K] in groups along K (shorter last group allowed),
    clip logits [N, G]; round_offset [N, K] (clamped to [-0.5, 0.5]) is added to w / s before
    rounding (learned rounding). Differentiable in w (STE), the logits and the offset; scales/zeros
    are [N, G] fp32 holding fp16 values."""
    qmin, qmax = qrange(bits, sym)
    outs, codes, scales, zeros = [], [], [], []
    col = 0
    for lo, hi, g in ragged_parts(w.shape[1], group_size):
        n_g = (hi - lo) // g
        xg = w[:, lo:hi].to(torch.float32).reshape(w.shape[0], n_g, g)
        gam = torch.sigmoid(hi_logit[:, col:col + n_g]).unsqueeze(-1)
        bet = gam if lo_logit is None else torch.sigmoid(lo_logit[:, col:col + n_g]).unsqueeze(-1)
        col += n_g
        mx = xg.amax(-1, keepdim=True)
        mn = xg.amin(-1, keepdim=True)
        if sym:
            s = fp16_ste(torch.maximum(gam * mx.clamp(min=0), bet * (-mn).clamp(min=0)) / qmax)
            z = torch.zeros_like(s)
        else:
            s = fp16_ste((gam * mx - bet * mn) / qmax)
            z = round_ste(-(bet * mn) / s)
            z = z + (z.detach().clamp(-FP16_MAX, FP16_MAX).to(SCALE_DTYPE).to(torch.float32) - z).detach()
        v = xg / s
        if round_offset is not None:
            v = v + round_offset[:, lo:hi].clamp(-0.5, 0.5).reshape(w.shape[0], n_g, g)
        q = torch.clamp(round_ste(v) + z, qmin, qmax)
        outs.append(((q - z) * s).reshape(w.shape[0], hi - lo))
        codes.append(q.reshape(w.shape[0], hi - lo))
        scales.append(s.squeeze(-1))
        zeros.append(z.squeeze(-1))
    return torch.cat(outs, 1), torch.cat(codes, 1), torch.cat(scales, 1), torch.cat(zeros, 1)


class Smoothing(nn.Module):
    """A learnable per-channel scale s = exp(log_s) migrating range from activations into weights."""

    def __init__(self, init: torch.Tensor, trainable: bool = True):
        super().__init__()
        self.log_s = nn.Parameter(init.detach().to(torch.float32).log().clone(), requires_grad=trainable)

    def scale(self) -> torch.Tensor:
        return self.log_s.exp()

    def penalty(self, allowed: float) -> torch.Tensor:
        """Soft constraint: mean of relu(|log s| - allowed)^2 (0 inside the region)."""
        return F.relu(self.log_s.abs() - allowed).square().mean()


def smooth_init(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), divided by its geometric mean
    (a global factor changes nothing: per-token / per-group quantization is scale-invariant)."""
    if alpha == 0:
        return torch.ones_like(act_absmax, dtype=torch.float32)
    a = act_absmax.to(torch.float32).clamp(min=1e-5)
    w = weight_absmax.to(torch.float32).clamp(min=1e-5)
    s = a.pow(alpha) / w.pow(1 - alpha)
    return (s / s.log().mean().exp()).clamp(1e-4, 1e4)


def svd_factors(err: torch.Tensor, rank: int, oversample: int = 8, power_iters: int = 4, seed: int = 0
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(A [N, r], B [r, K]) with A @ B a rank-r approximation of err (A = U sqrt(S), B = sqrt(S) V^T) by a
    randomized truncated SVD in fp32 (Halko et al.): the range of err @ G (G Gaussian, r + oversample
    columns) refined by `power_iters` power iterations, then the exact SVD of its small projection.
    O(N K (r + oversample) power_iters) instead of a full SVD's O(N K min(N, K)); the same input gives
    the same factors (G comes from a local generator seeded with `seed`; the global RNG is not
    touched: torch.svd_lowrank takes no generator). Quantization errors have flat spectra: on a
    1024 x 2688 W4 error the top-8 energy captured is 90% of the exact SVD's with 2 power
    iterations, 96% with 4 (the default), 99% with 8; the residual norm is within 0.4% either way."""
    e = err.to(torch.float32)
    cols = min(rank + oversample, *e.shape)
    g = torch.randn(e.shape[1], cols, generator=torch.Generator(e.device).manual_seed(seed), device=e.device)
    basis = torch.linalg.qr(e @ g).Q
    for _ in range(power_iters):  # re-orthonormalised each time: fp32 would lose the small directions
        basis = torch.linalg.qr(e @ torch.linalg.qr(e.T @ basis).Q).Q
    u, s, vh = torch.linalg.svd(basis.T @ e, full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    return (basis @ u[:, :r]) * root, root[:, None] * vh[:r]


class LowRank(nn.Module):
    """delta = scale * A @ B (merged into the latent weight before quantization)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, scale: float):
        super().__init__()
        self.a = nn.Parameter(a.clone())
        self.b = nn.Parameter(b.clone())
        self.scale = scale

    def delta(self) -> torch.Tensor:
        return self.scale * (self.a @ self.b)


def cayley(generator: torch.Tensor) -> torch.Tensor:
    """The orthogonal (I + A)^-1 (I - A) of the skew-symmetric A = G - G^T, for G [..., d, d]
    (G = 0: the identity). Every orthogonal matrix without eigenvalue -1 is one of these."""
    a = generator - generator.transpose(-1, -2)
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    return torch.linalg.solve(eye + a, eye - a)


class HeadRotation(nn.Module):
    """Learnable orthogonal matrices, one per head: start[h] @ cayley(G[h]) [H, d, d], G starting at 0
    (exactly `start`, an orthogonal [H, d, d] float32 buffer)."""

    def __init__(self, start: torch.Tensor):
        super().__init__()
        self.register_buffer("start", start.detach().to(torch.float32).clone())
        self.generator = nn.Parameter(torch.zeros_like(self.start))

    def matrix(self) -> torch.Tensor:
        return self.start @ cayley(self.generator)


def rotate_head_rows(w: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Output rows of head h (rows h*d .. h*d+d-1 of w [H*d, K], or a bias [H*d]) -> R_h^T w_h: the
    head's outputs become o_h R_h."""
    h, d, _ = rotation.shape
    out = torch.einsum("hei,he...->hi...", rotation, w.reshape(h, d, *w.shape[1:]))
    return out.reshape(w.shape)


def rotate_head_cols(w: torch.Tensor, rotation: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    """Input columns of head j (columns j*d .. j*d+d-1 of w [N, J*d]) -> w_j R_{heads[j]}: what reads
    head outputs o_j R_{heads[j]} computes what w read from o_j."""
    d = rotation.shape[-1]
    out = torch.einsum("nje,jei->nji", w.reshape(w.shape[0], heads.numel(), d), rotation[heads])
    return out.reshape(w.shape)


class LearnableLinear(nn.Module):
    """A decoder linear being fine-tuned (see the module docstring); frozen latent weight (the given
    weight's storage, any float dtype, read as fp32) and bias (an fp32 copy).

    in_smooth: scales of the input channels; divide_input: whether this module divides its input by
    them (readers of a norm) or its input already arrives divided (o_proj after v, down_proj after
    up). in_expand: index mapping input channels to in_smooth entries (o_proj under GQA).
    out_smooth: scales dividing this module's output channels (v_proj, up_proj).
    transform: callable x -> x M with inverse(x) = x M^T (M orthogonal [K, K], never built densely:
    a HadamardTransform; differentiable) applied to the (smoothed) input and to the weight's rows
    (W M); at export the caller installs the matching online transform.
    out_rotation: a HeadRotation of this module's output heads (v_proj: rows of head h -> R_h^T W_h);
    in_rotation (+ in_rotation_heads, input head -> rotation index): of its input heads (o_proj:
    columns of head j -> W_j R_{heads[j]}); both after the smoothing, so that they fold exactly.
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], w_bits: int, w_group_size: int,
                 w_sym: bool, a_bits: int, a_group_size: int, a_sym: bool, w_clip: float, a_clip: float,
                 outlier_idx: Optional[torch.Tensor] = None, outlier_bits: int = 8,
                 learn_weight_clip: bool = True, learn_act_clip: bool = True, weight_clip_init: float = 1.0,
                 learn_rounding: bool = False, a_convention: str = BISUP_ACTS):
        super().__init__()
        self.a_convention = a_convention  # formats.ACT_CONVENTIONS: whose activation quantizer trains
        self.register_buffer("weight", weight.detach())  # the linear's own storage and dtype: no fp32 copy
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32, copy=True))
        self.out_features, self.in_features = weight.shape
        self.w_bits, self.w_group_size, self.w_sym = w_bits, w_group_size, w_sym
        self.a_bits, self.a_group_size, self.a_sym = a_bits, a_group_size, a_sym
        self.outlier_bits = outlier_bits
        self.outlier_idx = None if outlier_idx is None or outlier_idx.numel() == 0 else outlier_idx.to(weight.device)
        km = self.in_features - (0 if self.outlier_idx is None else self.outlier_idx.numel())
        self._main_idx = None if self.outlier_idx is None else complement(self.outlier_idx, self.in_features)
        n_g = num_groups(km, w_group_size)
        self.w_clip_start = min(w_clip, weight_clip_init, MAX_TRAINABLE_CLIP) if learn_weight_clip else w_clip
        init = logit(self.w_clip_start)
        self.w_hi = nn.Parameter(torch.full((self.out_features, n_g), init, device=weight.device),
                                 requires_grad=learn_weight_clip)
        self.w_lo = nn.Parameter(torch.full((self.out_features, n_g), init, device=weight.device),
                                 requires_grad=learn_weight_clip)
        self.w_round = nn.Parameter(torch.zeros(self.out_features, km, device=weight.device)) \
            if learn_rounding and w_bits < OFF_BITS else None
        self.fixed_a_clip = float(a_clip)
        self.a_logit = nn.Parameter(torch.tensor(logit(min(a_clip, MAX_TRAINABLE_CLIP)), device=weight.device),
                                   requires_grad=learn_act_clip) \
            if learn_act_clip and a_bits < OFF_BITS else None
        self.in_smooth: Optional[Smoothing] = None
        self.divide_input = False
        self.register_buffer("in_expand", None)
        self.out_smooth: Optional[Smoothing] = None
        self.transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        self.out_rotation: Optional[HeadRotation] = None
        self.in_rotation: Optional[HeadRotation] = None
        self.register_buffer("in_rotation_heads", None)
        self.lowrank: Optional[LowRank] = None
        self.record = None  # optional callable seeing the input the weight multiplies (GPTQ Hessians)

    # ---------------------------------------------------------------- pieces
    def input_scale(self) -> Optional[torch.Tensor]:
        if self.in_smooth is None:
            return None
        s = self.in_smooth.scale()
        return s if self.in_expand is None else s[self.in_expand]

    def effective_weight(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(W_eff, b_eff) before quantization: ((W + delta) * s_in / s_out) M, b / s_out (fp32), with
        the head rotations (out: rows and bias; in: columns) applied after the smoothing."""
        w = self.weight.to(torch.float32)
        if self.lowrank is not None:
            w = w + self.lowrank.delta()
        s_in = self.input_scale()
        if s_in is not None:
            w = w * s_in[None, :]
        b = self.bias
        if self.out_smooth is not None:
            s_out = self.out_smooth.scale()
            w = w / s_out[:, None]
            b = None if b is None else b / s_out
        if self.out_rotation is not None:
            r = self.out_rotation.matrix()
            w = rotate_head_rows(w, r)
            b = None if b is None else rotate_head_rows(b, r)
        if self.in_rotation is not None:
            w = rotate_head_cols(w, self.in_rotation.matrix(), self.in_rotation_heads)
        if self.transform is not None:
            w = self.transform(w)
        return w, b

    @torch.no_grad()
    def search_weight_clip(self) -> None:
        """Start the learnable weight clipping at each group's least-squared-error ratio of the current
        effective weight (mse_clip over clip_grid of the start ratio min(w_clip, weight_clip_init, 0.99))
        instead of that one ratio for all: a sigmoid-bounded clip near 1 moves slowly (its gradient
        carries sigmoid' ~ 0.01). Nothing to do when the clip is not learned (weight_clip off)."""
        if self.w_bits >= OFF_BITS or not self.w_hi.requires_grad:
            return
        w, _ = self.effective_weight()
        main = w if self.outlier_idx is None else w[:, self._main_idx]
        init = torch.logit(searched_clips(main, self.w_bits, self.w_group_size, self.w_sym, self.w_clip_start))
        self.w_hi.copy_(init)
        self.w_lo.copy_(init)

    def act_clip(self):
        return torch.sigmoid(self.a_logit) if self.a_logit is not None else self.fixed_a_clip

    def quantize_weight(self, w: torch.Tensor):
        """(dequantized weight, codes, scales, zeros) of w under the learned clipping (main channels);
        outlier channels per row at outlier_bits, unclipped (RTN, straight-through)."""
        if self.w_bits >= OFF_BITS:
            return w, None, None, None
        hi, lo = self.w_hi, self.w_lo
        if self.outlier_idx is None:
            return lwc_quantize(w, self.w_bits, self.w_group_size, self.w_sym, hi, lo, self.w_round)
        main = w[:, self._main_idx]
        dq_main, codes, scales, zeros = lwc_quantize(main, self.w_bits, self.w_group_size, self.w_sym, hi, lo,
                                                     self.w_round)
        out = torch.empty_like(w)
        out[:, self._main_idx] = dq_main.to(w.dtype)
        out[:, self.outlier_idx] = fake_quant_channels(w[:, self.outlier_idx], self.outlier_bits, -1, self.w_sym, 1.0)
        return out, codes, scales, zeros

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.float32)
        if self.divide_input:
            xf = xf / self.input_scale()
        if self.transform is not None:
            xf = self.transform(xf)
        if self.record is not None:
            self.record(xf)
        if self.a_bits < OFF_BITS and self.a_convention != BISUP_ACTS:  # an engine's quantizer (unclipped)
            xf = engine_fake_quantize(xf, self.a_bits, self.a_group_size)
        elif self.a_bits < OFF_BITS:  # as common.act_quantizer: no activation quantizer at 16 bits
            xf = fake_quant_channels(xf, self.a_bits, self.a_group_size, self.a_sym, self.act_clip(),
                                     self.outlier_idx, self.outlier_bits)
        wq, b = checkpoint(self._quantized_weight, use_reentrant=False) if torch.is_grad_enabled() \
            else self._quantized_weight()
        return F.linear(xf, wq, b).to(x.dtype)

    def _quantized_weight(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        w, b = self.effective_weight()
        return self.quantize_weight(w)[0], b

    # ---------------------------------------------------------------- export
    @torch.no_grad()
    def export(self) -> Tuple[Optional[WeightCodes], torch.Tensor, Optional[torch.Tensor], float]:
        """(codes of the final weight (None when weights stay FP), the FP weight it stands for,
        folded bias, activation clip ratio as a Python float)."""
        w, b = self.effective_weight()
        clip = float(self.act_clip())
        if self.w_bits >= OFF_BITS:
            return None, w, b, clip
        main = w if self.outlier_idx is None else w[:, self._main_idx]
        _, codes, scales, zeros = lwc_quantize(main, self.w_bits, self.w_group_size, self.w_sym, self.w_hi, self.w_lo,
                                               self.w_round)
        wc = WeightCodes(self.w_bits, self.w_group_size, self.w_sym, codes.to(code_dtype(self.w_bits, self.w_sym)),
                         scales.to(SCALE_DTYPE),
                         None if self.w_sym else zeros.to(SCALE_DTYPE))
        if self.outlier_idx is not None:
            oc = quantize_weight(w[:, self.outlier_idx], self.outlier_bits, -1, self.w_sym, 1.0)
            wc.with_outliers(self.outlier_idx, self.outlier_bits, oc.codes, oc.scales, oc.zeros)
        return wc, w, b, clip

    @torch.no_grad()
    def clamp_to_clip(self, w: torch.Tensor, bounds: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """w [N, K] with its main channels clamped to the learned clipping's range (outliers as they are);
        bounds: clip_bounds(w) when the caller has them."""
        main = w if self.outlier_idx is None else w[:, self._main_idx]
        lo, hi = self.clip_bounds(w) if bounds is None else bounds
        clamped = torch.maximum(torch.minimum(main, hi), lo)
        if self.outlier_idx is None:
            return clamped
        out = w.clone()
        out[:, self._main_idx] = clamped
        return out

    @torch.no_grad()
    def clip_bounds(self, w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-element [lo, hi] range of the learned clipping of w's main channels (for GPTQ pre-clamping)."""
        main = w if self.outlier_idx is None else w[:, self._main_idx]
        qmin, qmax = qrange(self.w_bits, self.w_sym)
        _, _, s, z = lwc_quantize(main, self.w_bits, self.w_group_size, self.w_sym, self.w_hi, self.w_lo)
        lo_parts, hi_parts = [], []
        col = 0
        for lo, hi, g in ragged_parts(main.shape[1], self.w_group_size):
            n_g = (hi - lo) // g
            sg, zg = s[:, col:col + n_g], z[:, col:col + n_g]
            col += n_g
            lo_parts.append(((qmin - zg) * sg).repeat_interleave(g, 1))
            hi_parts.append(((qmax - zg) * sg).repeat_interleave(g, 1))
        return torch.cat(lo_parts, 1), torch.cat(hi_parts, 1)
