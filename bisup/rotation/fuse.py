"""Folding RMSNorm scales and orthogonal rotations into linear layers (QuaRot's model surgery).

Row-vector convention: a linear computes y = x W^T + b. With the residual stream rotated,
h' = h Q (Q orthogonal), the model computes the same function when
  - embeddings:                      E' = E Q
  - layers reading the stream:       W' = W Q          (after the norm scale is folded into W)
  - layers writing into the stream:  W' = Q^T W, b' = b Q
because RMSNorm(h Q) = RMSNorm(h) Q once its elementwise scale is gone (folded into the readers).
A rotation is passed as a callable rot(x) = x @ M applied along the last dim (a fast Hadamard
transform, O(n log n) per row, instead of a dense n x n product); all products are computed in
float64 and cast back to the parameter's dtype.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

import bisup.reference as reference
from bisup.rotation.hadamard import hadamard_base, random_signs

Rotation = Callable[[torch.Tensor], torch.Tensor]


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data = value.to(dtype=param.dtype, device=param.device).contiguous()


@torch.no_grad()
def fold_norm_into(norm: nn.Module, linears, offset: float = 0.0) -> None:
    """Fold norm's elementwise scale (weight + offset) into the input columns of `linears`, then
    make the norm an identity scale (weight = 1 - offset, i.e. 0 for Gemma's (1 + w) norms)."""
    scale = norm.weight.detach().to(torch.float64) + offset
    for lin in linears:
        _set(lin.weight, lin.weight.detach().to(torch.float64) * scale.to(lin.weight.device)[None, :])
    norm.weight.data.fill_(1.0 - offset)


@torch.no_grad()
def rotate_input(linear: nn.Module, rot: Rotation) -> None:
    """W' = W M: the layer reads a rotated input x M (rot(x) = x @ M)."""
    _set(linear.weight, rot(linear.weight.detach().to(torch.float64)))


@torch.no_grad()
def rotate_output(linear: nn.Module, rot: Rotation) -> None:
    """W' = M^T W = rot(W^T)^T, b' = b M: the layer's output comes out rotated, y M."""
    _set(linear.weight, rot(linear.weight.detach().to(torch.float64).T.contiguous()).T)
    if getattr(linear, "bias", None) is not None:
        _set(linear.bias, rot(linear.bias.detach().to(torch.float64)))


@torch.no_grad()
def rotate_embedding(emb: nn.Embedding, rot: Rotation) -> None:
    """E' = E M."""
    _set(emb.weight, rot(emb.weight.detach().to(torch.float64)))


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


class HadamardTransform(nn.Module):
    """x -> hadamard(x * signs) along the last dim: x @ diag(signs) H^T with H = hadamard_matrix(n)
    (signs optional). Uses the bisup.ops kernel (CPU/CUDA) for fp32/fp16/bf16 and the reference
    otherwise (float64 tests)."""

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
        key = str(device)
        if key not in self._cache:
            b, s = self._base, self._signs
            self._cache[key] = (None if b is None else b.to(device), None if b is None else b.to(device, torch.float32),
                                None if s is None else s.to(device))
        return self._cache[key]

    def to_config(self) -> dict:
        """JSON-able description (save_quantized); the base is rebuilt deterministically from n."""
        return {"n": self.n, "signs": None if self._signs is None else [int(v) for v in self._signs.tolist()]}

    @classmethod
    def from_config(cls, cfg: dict) -> "HadamardTransform":
        signs = cfg.get("signs")
        return cls(int(cfg["n"]), None if signs is None else torch.tensor(signs, dtype=torch.float32, device="cpu"))

    def matrix(self, dtype=torch.float64, device="cpu") -> torch.Tensor:
        """The dense n x n matrix M with forward(x) = x @ M, on `device`."""
        return self.forward(torch.eye(self.n, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.n:
            raise ValueError(f"HadamardTransform({self.n}) got last dim {x.shape[-1]}")
        base64, base32, signs = self._on(x.device)
        if signs is not None:
            x = x * signs.to(x.dtype)
        if x.dtype in (torch.float32, torch.float16, torch.bfloat16):
            import bisup.ops as ops

            return ops.hadamard(x.contiguous(), base32)
        return reference.hadamard(x, base64)

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
