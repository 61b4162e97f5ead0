"""Folding RMSNorm scales and orthogonal rotations into linear layers (QuaRot's model surgery).

Row-vector convention: a linear computes y = x W^T + b. With the residual stream rotated,
h' = h Q (Q orthogonal), the model computes the same function when
  - embeddings:                      E' = E Q
  - layers reading the stream:       W' = W Q          (after the norm scale is folded into W)
  - layers writing into the stream:  W' = Q^T W, b' = b Q
because RMSNorm(h Q) = RMSNorm(h) Q once its elementwise scale is gone (folded into the readers).
A rotation is passed as a callable rot(x) = x @ M applied along the last dim (a fast Hadamard
transform, O(n log n) per row, instead of a dense n x n product); products are computed in
work_dtype (float64 for float32 parameters, float32 for bf16/fp16 ones), in chunks of rows, and
cast back to the parameter's dtype.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from torch.autograd.function import once_differentiable

import bisup.reference as reference
from bisup.rotation.hadamard import hadamard_base, random_signs

Rotation = Callable[[torch.Tensor], torch.Tensor]


_ROW_CHUNK = 4096  # rows transformed at once: a [128256, 8192] embedding is 8 GB in float64, a chunk 268 MB


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data = value.to(dtype=param.dtype, device=param.device).contiguous()


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision the folds compute in: float64 for float32/float64 parameters (the rotated model computes
    the same function to float32 rounding), float32 for bf16/fp16 ones (16 bits more than they keep;
    the fast transform's kernel runs it)."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def _map_rows(param: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], device=None) -> None:
    """param[r] <- fn(param[r] in work_dtype on `device` (default: param's)) for chunks of rows, in
    place: one chunk at a time, never the whole matrix in the working precision."""
    dev = param.device if device is None else device
    for r0 in range(0, param.shape[0], _ROW_CHUNK):
        rows = param.data[r0:r0 + _ROW_CHUNK]
        rows.copy_(fn(rows.to(dev, work_dtype(param.dtype))).to(param.device, param.dtype))


@torch.no_grad()
def fold_norm_into(norm: nn.Module, linears, offset: float = 0.0) -> None:
    """Fold norm's elementwise scale (weight + offset) into the input columns of `linears`, then
    make the norm an identity scale (weight = 1 - offset, i.e. 0 for Gemma's (1 + w) norms)."""
    scale = norm.weight.detach().to(torch.float64) + offset
    for lin in linears:
        _map_rows(lin.weight, lambda w: w * scale.to(w.device, w.dtype)[None, :])
    norm.weight.data.fill_(1.0 - offset)


@torch.no_grad()
def rotate_input(linear: nn.Module, rot: Rotation, device=None) -> None:
    """W' = W M: the layer reads a rotated input x M (rot(x) = x @ M); rows transformed on `device`."""
    _map_rows(linear.weight, rot, device)


@torch.no_grad()
def rotate_output(linear: nn.Module, rot: Rotation) -> None:
    """W' = M^T W = rot(W^T)^T, b' = b M: the layer's output comes out rotated, y M."""
    wd = work_dtype(linear.weight.dtype)
    _set(linear.weight, rot(linear.weight.detach().to(wd).T.contiguous()).T)
    if getattr(linear, "bias", None) is not None:
        _set(linear.bias, rot(linear.bias.detach().to(wd)))


@torch.no_grad()
def rotate_embedding(emb: nn.Embedding, rot: Rotation, device=None) -> None:
    """E' = E M (rows transformed on `device`)."""
    _map_rows(emb.weight, rot, device)


@torch.no_grad()
def rotate_heads_output(linear: nn.Module, h: torch.Tensor, head_dim: int) -> None:
    """Per head j (rows j*d:(j+1)*d of W): v_j' = v_j H, i.e. W_j' = H^T W_j, b_j' = b_j H."""
    h64 = h.to(linear.weight.device, torch.float64)
    w = linear.weight.detach().to(torch.float64)
    n_out, k = w.shape
    w = (h64.T @ w.reshape(n_out // head_dim, head_dim, k)).reshape(n_out, k)
    _set(linear.weight, w)
    if getattr(linear, "bias", None) is not None:
        b = linear.bias.detach().to(torch.float64).reshape(-1, head_dim) @ h64
        _set(linear.bias, b.reshape(-1))


@torch.no_grad()
def rotate_heads_input(linear: nn.Module, h: torch.Tensor, head_dim: int) -> None:
    """Per head j (columns j*d:(j+1)*d of W): reads a_j H, so W_j' = W_j H."""
    w = linear.weight.detach().to(torch.float64)
    n_out, k = w.shape
    w = (w.reshape(n_out, k // head_dim, head_dim) @ h.to(w.device, torch.float64)).reshape(n_out, k)
    _set(linear.weight, w)


def untie_lm_head(model: nn.Module, lm_head: nn.Module, embeddings: nn.Module) -> None:
    """Give lm_head its own weight (rotations fold different things into each) and keep it so."""
    if lm_head.weight is embeddings.weight:
        lm_head.weight = nn.Parameter(embeddings.weight.detach().clone(), requires_grad=False)
    for cfg in {id(c): c for c in (model.config, getattr(model.config, "get_text_config", lambda: None)())
                if c is not None}.values():
        cfg.tie_word_embeddings = False


def _kernel_hadamard(x: torch.Tensor, base: Optional[torch.Tensor]) -> torch.Tensor:
    import bisup.ops as ops

    return ops.hadamard(x.contiguous(), base)


def _signed_hadamard(x: torch.Tensor, base: Optional[torch.Tensor], signs: Optional[torch.Tensor],
                     transpose: bool, hadamard: Callable = reference.hadamard) -> torch.Tensor:
    """x M (transpose=False) or x M^T (transpose=True) for M = diag(signs) H^T, H = S_p / sqrt(p) (x) B:
    x M = hadamard(x * signs, B), x M^T = x H diag(signs) = hadamard(x, B^T) * signs (S_p is
    symmetric). `base` is B^T when transpose; `hadamard` is the reference or the kernel (no autograd)."""
    if signs is not None and not transpose:
        x = x * signs.to(x.dtype)
    y = hadamard(x, base)
    return y * signs.to(y.dtype) if signs is not None and transpose else y


class _HadamardFunction(torch.autograd.Function):
    """The kernel with autograd: M is orthogonal, so the gradient of x -> x M is dy -> dy M^T."""

    @staticmethod
    def forward(ctx, x, base, base_t, signs, transpose: bool):
        ctx.bases, ctx.signs, ctx.transpose = (base, base_t), signs, transpose
        return _signed_hadamard(x, base_t if transpose else base, signs, transpose, _kernel_hadamard)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        base, base_t = ctx.bases
        back = not ctx.transpose
        return _signed_hadamard(dy, base_t if back else base, ctx.signs, back, _kernel_hadamard), None, None, None, None


class HadamardTransform(nn.Module):
    """x -> hadamard(x * signs) along the last dim: x @ M, M = diag(signs) H^T with H = hadamard_matrix(n)
    (signs optional); `inverse(x)` = x @ M^T. Uses the bisup.ops kernel (CPU/CUDA) for fp32/fp16/bf16,
    differentiable through an autograd.Function (the gradient of x M is dy M^T), and the reference
    otherwise (float64 tests; differentiable through PyTorch)."""

    def __init__(self, n: int, signs: Optional[torch.Tensor] = None):
        super().__init__()
        self.n = n
        base = hadamard_base(n, torch.float64)
        # Plain attributes, not buffers: model.half() must not round the base matrix; moved to the
        # input's device on use (cached per device).
        self._base = base if base.shape[0] > 1 else None
        self._signs = None if signs is None else signs.to(torch.float64)
        self._cache: dict = {}

    def _on(self, device: torch.device):
        """((B, B^T) float64, (B, B^T) fp32 contiguous, signs float64) on device (None where absent)."""
        key = str(device)
        if key not in self._cache:
            b64 = None if self._base is None else self._base.to(device)
            pairs = [(None, None) if m is None else (m, m.T.contiguous())
                     for m in (b64, None if b64 is None else b64.to(torch.float32))]
            self._cache[key] = (*pairs, None if self._signs is None else self._signs.to(device))
        return self._cache[key]

    def to_config(self) -> dict:
        """JSON-able description (save_quantized); the base is rebuilt deterministically from n."""
        return {"n": self.n, "signs": None if self._signs is None else [int(v) for v in self._signs.tolist()]}

    @classmethod
    def from_config(cls, cfg: dict) -> "HadamardTransform":
        signs = cfg.get("signs")
        return cls(int(cfg["n"]), None if signs is None else torch.tensor(signs, dtype=torch.float32, device="cpu"))

    def matrix(self, dtype=torch.float64, device="cpu") -> torch.Tensor:
        """The dense n x n matrix M with forward(x) = x @ M, on `device` (tests and small orders only)."""
        return self.forward(torch.eye(self.n, dtype=dtype, device=device))

    def _rotate(self, x: torch.Tensor, transpose: bool) -> torch.Tensor:
        if x.shape[-1] != self.n:
            raise ValueError(f"HadamardTransform({self.n}) got last dim {x.shape[-1]}")
        base64, base32, signs = self._on(x.device)
        if x.dtype in (torch.float32, torch.float16, torch.bfloat16):
            return _HadamardFunction.apply(x, *base32, signs, transpose)
        return _signed_hadamard(x, base64[1] if transpose else base64[0], signs, transpose)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._rotate(x, transpose=False)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """x @ M^T (= x @ M^-1: M is orthogonal)."""
        return self._rotate(x, transpose=True)

    def extra_repr(self) -> str:
        return f"n={self.n}, base={1 if self._base is None else self._base.shape[0]}, signed={self._signs is not None}"


def random_hadamard_transform(n: int, seed: int) -> HadamardTransform:
    """x -> x Q with Q = random_hadamard(n, seed) (the residual-stream rotation)."""
    return HadamardTransform(n, random_signs(n, seed))


class RotateAfter(nn.Module):
    """Runs `inner` then rotates its output: for norms that act on a block's output before it is
    added to the residual stream (Gemma3's post-attention / post-feedforward norms), which cannot
    be folded into a linear layer."""

    def __init__(self, inner: nn.Module, rotation: Callable):
        super().__init__()
        self.inner = inner
        self.rotation = rotation

    @property
    def weight(self) -> torch.Tensor:  # code that inspects the norm's weight still finds it
        return self.inner.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rotation(self.inner(x))
