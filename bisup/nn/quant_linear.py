"""QuantLinear: a linear layer that really runs in W4A4 / W3A3 (bisup.ops.gemm).

Weights are stored packed (INT4 nibbles or the INT3 layout of docs/formats.md) with fp16 group
scales; every forward quantizes the input per token in groups (bisup.ops.quantize_pack) and calls
the GEMM: the C++ twin on CPU, the CUDA kernel on GPU, and the pure-PyTorch reference (with a
one-time warning) on devices without a kernel.

Atom-style outlier channels: the input channels in `outlier_idx` are taken out of the low-bit
GEMM and kept at INT8 (per-token activation scale, per-output-row weight scale), computed as the
GEMM's fused outlier segment. The remaining channels keep their original order and are grouped
by `group_size`; when their count is not a multiple of the group (or of the kernel's K
granularity) they are zero-padded, which leaves every group's scale and codes unchanged (zeros do
not move max|x|), so the last group acts as the shorter group of the fake-quant simulation.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bisup import ops, reference
from bisup.quant.formats import packed_row_bytes
from bisup.quant.groups import _fast_sym_grouped as fast_sym_grouped
from bisup.quant.quantizer import quantize_groups

_K_MULTIPLE = 32  # bisup.ops.gemm: K % 32 == 0
_K_MULTIPLE_INT3 = 128  # the CUDA kernel reads INT3 rows in 128-value tiles
_OUTLIER_MULTIPLE = 16
_warned_devices: set = set()


def _has_kernel(device: torch.device) -> bool:
    if device.type == "cpu":
        return True
    return device.type == "cuda" and ops.has_cuda_kernels()


def _padded_k(k_main: int, group_size: int, w_bits: int) -> int:
    g = _K_MULTIPLE if group_size == -1 else group_size
    step = math.lcm(g, _K_MULTIPLE_INT3 if w_bits == 3 else _K_MULTIPLE)
    return -(-k_main // step) * step


def _quantize_int8_rows(x: torch.Tensor):
    """Per-row symmetric INT8 codes (int8) and fp16 scales [rows] (quantize_groups' formula, through its
    bit-identical inference twin when no gradient is needed)."""
    if x.requires_grad and torch.is_grad_enabled():
        q, s, _ = quantize_groups(x, 8, -1, sym=True, scale_dtype=torch.float16)
    else:
        q, s = fast_sym_grouped(x, 8, x.shape[-1], 1.0)
    return q.reshape(x.shape).to(torch.int8), s.reshape(x.shape[:-1]).to(torch.float16)


class _ActivationMemo:
    """The quantized form of the last input one QuantLinear saw, for the next one reading the very same
    tensor (q/k/v share the attention-norm output, gate/up the MLP-norm output): one quantize_pack
    instead of three. Valid while the tensor object is the same one, unmodified (its version counter,
    shared by all its views, is unchanged); the key holds every setting the quantization depends on.
    It keeps a reference to that input until the next one replaces it."""

    def __init__(self):
        self.x = self.version = self.key = self.value = None

    def get(self, x: torch.Tensor, key: tuple):
        if self.x is x and self.version == x._version and self.key == key:
            return self.value
        return None

    def put(self, x: torch.Tensor, key: tuple, value) -> None:
        self.x, self.version, self.key, self.value = x, x._version, key, value

    def clear(self) -> None:
        self.__init__()


_memo = _ActivationMemo()


class QuantLinear(nn.Module):
    """y = x W^T + b with W at w_bits (groups of group_size along in_features) and x quantized to
    a_bits per token at run time. Build it with `from_float`; a bare constructor makes empty
    buffers of the right shapes for `load_state_dict`."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        w_bits: int = 4,
        a_bits: int = 4,
        group_size: int = 128,
        bias: bool = True,
        n_outliers: int = 0,
        a_clip: float = 1.0,
        device=None,
        bias_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if w_bits not in (3, 4) or a_bits not in (3, 4):
            raise ValueError(f"QuantLinear: w_bits and a_bits must be 3 or 4, got {w_bits}, {a_bits}")
        if group_size != -1 and (group_size <= 0 or group_size % _K_MULTIPLE):
            raise ValueError(f"QuantLinear: group_size must be -1 or a positive multiple of {_K_MULTIPLE}, got {group_size}")
        if n_outliers % _OUTLIER_MULTIPLE or not 0 <= n_outliers < in_features:
            raise ValueError(
                f"QuantLinear: the outlier count must be a multiple of {_OUTLIER_MULTIPLE} below in_features={in_features}, "
                f"got {n_outliers}"
            )
        self.in_features, self.out_features = in_features, out_features
        self.w_bits, self.a_bits, self.group_size, self.a_clip = w_bits, a_bits, group_size, a_clip
        self.k_main = in_features - n_outliers
        self.k_padded = _padded_k(self.k_main, group_size, w_bits)
        groups = 1 if group_size == -1 else self.k_padded // group_size
        packed_cols = packed_row_bytes(w_bits, self.k_padded)
        self.register_buffer("w_q", torch.zeros(out_features, packed_cols, dtype=torch.uint8, device=device))
        self.register_buffer("w_scale", torch.ones(out_features, groups, dtype=torch.float16, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None)
        self.register_buffer("outlier_idx", torch.zeros(n_outliers, dtype=torch.long, device=device))
        self.register_buffer("main_idx", torch.arange(self.k_main, dtype=torch.long, device=device))
        self.register_buffer("w_outlier", torch.zeros(out_features, n_outliers, dtype=torch.int8, device=device))
        self.register_buffer("w_outlier_scale", torch.ones(out_features, dtype=torch.float16, device=device))

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        w_bits: int = 4,
        a_bits: int = 4,
        group_size: int = 128,
        *,
        w_clip: float = 1.0,
        a_clip: float = 1.0,
        outlier_idx: Optional[Sequence[int]] = None,
        weight_q: Optional[torch.Tensor] = None,
        weight_scale: Optional[torch.Tensor] = None,
        w_outlier_q: Optional[torch.Tensor] = None,
        w_outlier_scale: Optional[torch.Tensor] = None,
    ) -> "QuantLinear":
        """Quantize `linear`'s weight by RTN (symmetric, fp16 scales, clip w_clip), or take given
        codes: weight_q int8 [N, K_main] (or [N, in_features], outlier columns then ignored) with
        weight_scale fp16 [N, ceil(K_main / group_size)] from a method such as GPTQ. outlier_idx:
        input channels kept at INT8 (count a multiple of 16); their weights are RTN INT8 per row
        unless w_outlier_q int8 [N, Ko] / w_outlier_scale fp16 [N] (or [N, 1]) are given."""
        weight = linear.weight.detach()
        n, k = weight.shape
        dev = weight.device
        idx = torch.as_tensor(list(outlier_idx) if outlier_idx is not None else [], dtype=torch.long, device=dev)
        if idx.numel() and (idx.unique().numel() != idx.numel() or int(idx.min()) < 0 or int(idx.max()) >= k):
            raise ValueError(f"QuantLinear: outlier_idx must hold distinct channel indices in [0, {k})")
        bias_dtype = linear.bias.dtype if linear.bias is not None and linear.bias.is_floating_point() else torch.float32
        layer = cls(k, n, w_bits, a_bits, group_size, linear.bias is not None, idx.numel(), a_clip, dev, bias_dtype)
        keep = torch.ones(k, dtype=torch.bool, device=dev)
        keep[idx] = False
        main_idx = keep.nonzero().flatten()
        layer.outlier_idx.copy_(idx)
        layer.main_idx.copy_(main_idx)
        pad = layer.k_padded - layer.k_main

        if weight_q is None:
            w_main = F.pad(weight[:, main_idx].float(), (0, pad))
            q, s, _ = quantize_groups(w_main, w_bits, group_size, sym=True, clip_ratio=w_clip, scale_dtype=torch.float16)
            q = q.reshape(n, layer.k_padded).to(torch.int8)
            s = s.reshape(n, -1).to(torch.float16)
        else:
            if weight_scale is None:
                raise ValueError("QuantLinear: weight_q needs weight_scale")
            q = weight_q.to(dev)
            if q.shape == (n, k) and idx.numel():
                q = q[:, main_idx]
            if q.shape != (n, layer.k_main):
                raise ValueError(f"QuantLinear: weight_q must be [{n}, {layer.k_main}] (or [{n}, {k}]), got {tuple(q.shape)}")
            q = F.pad(q.to(torch.int8), (0, pad))
            groups = layer.w_scale.shape[1]
            real_groups = 1 if group_size == -1 else -(-layer.k_main // group_size)
            if tuple(weight_scale.shape) != (n, real_groups):
                raise ValueError(f"QuantLinear: weight_scale must be [{n}, {real_groups}], got {tuple(weight_scale.shape)}")
            s = torch.ones(n, groups, dtype=torch.float16, device=dev)  # padding-only groups: scale 1, codes 0
            s[:, :real_groups] = weight_scale.to(dev, torch.float16)
        pack = reference.pack_int4 if w_bits == 4 else reference.pack_int3
        layer.w_q.copy_(pack(q))
        layer.w_scale.copy_(s)

        if idx.numel():
            if w_outlier_q is None:
                wo, so = _quantize_int8_rows(weight[:, idx].float())
            else:
                if w_outlier_scale is None:
                    raise ValueError("QuantLinear: w_outlier_q needs w_outlier_scale")
                wo, so = w_outlier_q.to(dev, torch.int8), w_outlier_scale.to(dev, torch.float16).reshape(-1)
            layer.w_outlier.copy_(wo)
            layer.w_outlier_scale.copy_(so)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        return layer

    # ------------------------------------------------------------------------------------------
    def _outlier_key(self) -> tuple:
        """The outlier channel set as a tuple (cached per version of the buffer)."""
        cached = getattr(self, "_outlier_key_cache", None)
        ver = (self.outlier_idx.data_ptr(), self.outlier_idx._version)
        if cached is None or cached[0] != ver:
            cached = (ver, tuple(self.outlier_idx.tolist()))
            self._outlier_key_cache = cached
        return cached[1]

    def _quantize_input(self, x: torch.Tensor, kernel: bool):
        """(a_q, a_scale, outlier kwargs) of the input x, shared with the previous QuantLinear when it
        read the same tensor with the same settings (_ActivationMemo)."""
        memo = not torch.compiler.is_compiling()  # a traced graph has no tensor identities to share by
        if memo:
            key = (self.in_features, self.a_bits, self.group_size, float(self.a_clip), self.k_padded, kernel,
                   self._outlier_key() if self.outlier_idx.numel() else ())
            hit = _memo.get(x, key)
            if hit is not None:
                return hit
        x2 = x.reshape(-1, self.in_features)
        xm = x2[:, self.main_idx] if self.outlier_idx.numel() else x2
        if self.k_padded != self.k_main:
            xm = F.pad(xm, (0, self.k_padded - self.k_main))
        if not xm.is_contiguous():
            xm = xm.contiguous()
        impl = ops if kernel else reference
        a_q, a_scale, _ = impl.quantize_pack(xm, self.a_bits, self.group_size, True, self.a_clip)
        outliers = None
        if self.outlier_idx.numel():
            ao, sao = _quantize_int8_rows(x2[:, self.outlier_idx].float())
            outliers = (ao.contiguous(), sao.contiguous())
        value = (a_q, a_scale, outliers)
        if memo:
            _memo.put(x, key, value)
        return value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantLinear: expected input [..., {self.in_features}], got {tuple(x.shape)}")
        lead = x.shape[:-1]
        out_dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float32
        kernel = _has_kernel(x.device)
        if not kernel and x.device.type not in _warned_devices:
            _warned_devices.add(x.device.type)
            warnings.warn(
                f"bisup QuantLinear: no GEMM kernel for device '{x.device.type}'; using the (slow) PyTorch reference",
                stacklevel=2,
            )
        impl = ops if kernel else reference
        a_q, a_scale, outl = self._quantize_input(x, kernel)
        outliers = {}
        if outl is not None:
            outliers = dict(a_outlier=outl[0], a_outlier_scale=outl[1], w_outlier=self.w_outlier,
                            w_outlier_scale=self.w_outlier_scale)
        y = impl.gemm(
            a_q, a_scale, self.w_q, self.w_scale,
            a_bits=self.a_bits, w_bits=self.w_bits, group_size=self.group_size,
            out_dtype=out_dtype, bias=self.bias, **outliers,
        )
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, w_bits={self.w_bits}, "
            f"a_bits={self.a_bits}, group_size={self.group_size}, outliers={self.outlier_idx.numel()}, "
            f"bias={self.bias is not None}"
        )
