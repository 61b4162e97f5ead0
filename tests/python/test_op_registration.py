"""Registration checks of every torch.ops.bisup.* op, and torch.compile of the README's promises.

`torch.library.opcheck` runs, per sample input:
  - test_schema: SchemaCheckMode (no undeclared input mutation, no output aliasing an input);
  - test_autograd_registration: only runs when an input requires grad, so it has its own test
    (test_opcheck_autograd_registration): the bisup ops have no Autograd kernel;
  - test_faketensor: CrossRefFakeMode, the register_fake impls of bisup/ops.py against the real
    CPU kernel (shapes, dtypes, strides, devices of every output);
  - test_aot_dispatch_dynamic: AOTAutograd tracing with dynamic shapes (the fake impls under
    symbolic sizes) and eager vs traced outputs compared.

Every op the extension registers must have sample inputs in SAMPLES: a new op without them fails
test_every_registered_op_has_samples. Arguments follow bisup/ops.py (positional, schema order).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import bisup
from bisup import ops, reference
from bisup.nn.quant_linear import QuantLinear
from bisup.rotation import hadamard_base

_bisup = torch.ops.bisup


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ints(shape, lo, hi, seed, dtype=torch.int8):
    """Uniform integers in [lo, hi] (both signs when lo < 0)."""
    return torch.randint(lo, hi + 1, shape, generator=_gen(seed), dtype=torch.int64).to(dtype)


def _randn(shape, seed, dtype=torch.float32, scale=1.0, shift=0.0):
    return (torch.randn(shape, generator=_gen(seed)) * scale + shift).to(dtype)


# --------------------------------------------------------------------------------------------
# sample inputs: op name -> {case id: () -> args (positional, schema order, as bisup/ops.py)}
# --------------------------------------------------------------------------------------------
def _pack_int4_cases():
    return {
        "signed_3d_k38": lambda: (_ints((3, 5, 38), -8, 7, 1), True),
        "unsigned_k2": lambda: (_ints((7, 2), 0, 15, 2), False),
    }


def _unpack_int4_cases():
    return {
        "signed_3d": lambda: (_ints((2, 5, 19), 0, 255, 3, torch.uint8), True),
        "unsigned_2d": lambda: (_ints((7, 48), 0, 255, 4, torch.uint8), False),
    }


def _pack_int3_cases():
    return {
        "signed_k64": lambda: (_ints((5, 64), -4, 3, 5), True),
        "unsigned_3d_k96": lambda: (_ints((2, 3, 96), 0, 7, 6), False),
    }


def _unpack_int3_cases():
    return {
        "signed_24B": lambda: (_ints((5, 24), 0, 255, 7, torch.uint8), True),
        "unsigned_3d_36B": lambda: (_ints((2, 3, 36), 0, 255, 8, torch.uint8), False),
    }


def _quantize_pack_cases():
    # (x, bits, group_size, sym, clip_ratio)
    return {
        "fp32_w4_g32_sym": lambda: (_randn((5, 96), 9, scale=2.0, shift=-0.3), 4, 32, True, 1.0),
        "fp16_w3_per_row_asym_clip": lambda: (_randn((2, 3, 64), 10, torch.float16), 3, -1, False, 0.9),
        "bf16_w4_g64_asym": lambda: (_randn((7, 128), 11, torch.bfloat16, shift=0.5), 4, 64, False, 1.0),
        "fp32_w2_g2_sym": lambda: (_randn((3, 6), 12), 2, 2, True, 1.0),
    }


def _dequantize_cases():
    # (q, scale, zero, group_size, out_dtype); q/scale/zero from the reference quantize_pack
    def sym():
        q, s, _ = reference.quantize_pack(_randn((5, 96), 13, scale=3.0), 4, 32, True)
        return q, s, None, 32, torch.float16

    def asym():
        q, s, z = reference.quantize_pack(_randn((2, 3, 64), 14, shift=0.7), 4, -1, False)
        return q, s, z, -1, torch.float32

    def asym_bf16():
        q, s, z = reference.quantize_pack(_randn((7, 128), 15), 3, 64, False, 0.9)
        return q, s, z, 64, torch.bfloat16

    return {"sym_g32_fp16": sym, "asym_per_row_fp32": asym, "asym_g64_bf16": asym_bf16}


def _kv_quantize_cases():
    # (x, bits, group_size): x [B, Hkv, S, D]
    return {
        "4bit_per_head": lambda: (_randn((2, 3, 5, 64), 16, scale=2.0, shift=-0.5), 4, -1),
        "8bit_g16": lambda: (_randn((2, 2, 7, 64), 17), 8, 16),
        "3bit_g32_fp16": lambda: (_randn((1, 2, 9, 128), 18, torch.float16), 3, 32),
        "4bit_g8_bf16": lambda: (_randn((3, 1, 64), 19, torch.bfloat16), 4, 8),
    }


def _kv_dequantize_cases():
    # (q, scale, zero, bits, group_size, out_dtype)
    def case(shape, bits, group, out_dtype, seed):
        return lambda: (*reference.kv_quantize(_randn(shape, seed, scale=2.0, shift=-0.5), bits, group),
                        bits, group, out_dtype)

    return {
        "4bit_per_head_fp32": case((2, 3, 5, 64), 4, -1, torch.float32, 20),
        "8bit_g16_fp16": case((2, 2, 7, 64), 8, 16, torch.float16, 21),
        "3bit_g32_bf16": case((1, 2, 9, 128), 3, 32, torch.bfloat16, 22),
    }


def _attention_inputs(p, s, tq, hq, hkv, d, bits, group, dtype, seq_lens, seed, batch=2):
    """(q, k_prompt, v_prompt, k_q, k_scale, k_zero, v_q, v_scale, v_zero) as the KV cache makes them."""
    gen = _gen(seed)
    q = torch.randn(batch, hq, tq, d, generator=gen).to(dtype)
    kp = torch.randn(batch, hkv, p, d, generator=gen).to(dtype)
    vp = torch.randn(batch, hkv, p, d, generator=gen).to(dtype)
    k = torch.randn(batch, hkv, s, d, generator=gen) * 2 - 0.5
    v = torch.randn(batch, hkv, s, d, generator=gen)
    lens = None if seq_lens is None else torch.tensor(seq_lens, dtype=torch.int64)
    return (q, kp, vp, *reference.kv_quantize(k, bits, group), *reference.kv_quantize(v, bits, group)), lens


def _attention_cases():
    # ops.attention order: 9 tensors, kv_bits, group_size, softmax_scale, causal, seq_lens
    def case(p, s, tq, hq, hkv, d, bits, group, dtype, softmax_scale, causal, seq_lens, seed):
        def build():
            tensors, lens = _attention_inputs(p, s, tq, hq, hkv, d, bits, group, dtype, seq_lens, seed)
            return (*tensors, bits, group, softmax_scale, causal, lens)

        return build

    return {
        "decode_gqa4_4bit": case(37, 29, 1, 8, 2, 64, 4, -1, torch.float32, None, True, None, 23),
        "prefill_ragged_8bit_g16": case(5, 19, 7, 6, 2, 64, 8, 16, torch.float32, 0.3, True, [19, 4], 24),
        "no_prompt_3bit_fp16_noncausal": case(0, 13, 3, 4, 4, 128, 3, 32, torch.float16, None, False, [13, 0], 25),
        "bf16_4bit_g32": case(3, 11, 4, 2, 1, 64, 4, 32, torch.bfloat16, None, True, None, 26),
    }


def _hadamard_cases():
    # (x, base)
    return {
        "pow2_no_base": lambda: (_randn((3, 5, 64), 27, scale=3.0), None),
        "n40_paley_base": lambda: (_randn((4, 40), 28), hadamard_base(40)),
        "n96_fp16": lambda: (_randn((2, 7, 96), 29, torch.float16), hadamard_base(96)),
        "bf16_no_base": lambda: (_randn((6, 128), 30, torch.bfloat16), None),
    }


def _gemm_cases():
    # ops.gemm order: a_q, a_scale, w_q, w_scale, a_bits, w_bits, group_size, out_dtype, bias,
    # a_outlier, a_outlier_scale, w_outlier, w_outlier_scale
    def case(m, n, k, a_bits, w_bits, group, out_dtype, bias, ko, seed):
        def build():
            a_q, a_scale, _ = reference.quantize_pack(_randn((m, k), seed, scale=2.0), a_bits, group, True)
            w = _randn((n, k), seed + 1, scale=0.05)
            wq, ws = _quantize_weight(w, w_bits, group)
            b = _randn((n,), seed + 2, torch.float32) if bias else None
            out = (None, None, None, None)
            if ko:
                a_o = _ints((m, ko), -127, 127, seed + 3)
                w_o = _ints((n, ko), -127, 127, seed + 4)
                out = (a_o, _randn((m,), seed + 5, torch.float16).abs() + 0.01, w_o,
                       _randn((n,), seed + 6, torch.float16).abs() + 0.01)
            return (a_q, a_scale, wq, ws, a_bits, w_bits, group, out_dtype, b, *out)

        return build

    return {
        "w4a4_g32_fp16": case(5, 19, 96, 4, 4, 32, torch.float16, False, 0, 31),
        "w4a4_per_row_bias_fp32": case(13, 24, 64, 4, 4, -1, torch.float32, True, 0, 32),
        "w3a3_g64_bf16": case(3, 7, 128, 3, 3, 64, torch.bfloat16, True, 0, 33),
        "w4a4_g32_outliers_fp32": case(6, 11, 64, 4, 4, 32, torch.float32, True, 16, 34),
    }


def _quantize_weight(w, bits, group):
    """Symmetric RTN codes of w [N, K] packed as gemm wants them (pack_int4 / pack_int3) and
    fp16 scales [N, G]: quantize_pack's nibbles are pack_int4 of the signed codes."""
    q, s, _ = reference.quantize_pack(w, bits, group, True)
    if bits == 3:
        q = reference.pack_int3(reference.unpack_int4(q))
    return q, s


SAMPLES = {
    "pack_int4": _pack_int4_cases(),
    "unpack_int4": _unpack_int4_cases(),
    "pack_int3": _pack_int3_cases(),
    "unpack_int3": _unpack_int3_cases(),
    "quantize_pack": _quantize_pack_cases(),
    "dequantize": _dequantize_cases(),
    "kv_quantize": _kv_quantize_cases(),
    "kv_dequantize": _kv_dequantize_cases(),
    "attention": _attention_cases(),
    "hadamard": _hadamard_cases(),
    "gemm": _gemm_cases(),
}

# Known defects opcheck finds in bisup/ops.py: {(op, case id): reason}; each becomes a strict xfail.
KNOWN_DEFECTS: dict = {}


def _registered_ops() -> list:
    """Every overload of the bisup namespace the dispatcher knows: 'name' or 'name.overload'."""
    bisup._ext.has_cuda_kernels()  # the extension is loaded (it registers the ops on import)
    return sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("bisup::"))


def _overload(name: str) -> torch._ops.OpOverload:
    base, _, overload = name.partition(".")
    return getattr(getattr(_bisup, base), overload or "default")


def _opcheck_params():
    params = []
    for op, cases in SAMPLES.items():
        for case in cases:
            marks = []
            if (op, case) in KNOWN_DEFECTS:
                marks.append(pytest.mark.xfail(strict=True, reason=KNOWN_DEFECTS[(op, case)]))
            params.append(pytest.param(op, case, id=f"{op}-{case}", marks=marks))
    return params


# --------------------------------------------------------------------------------------------
# opcheck
# --------------------------------------------------------------------------------------------
def test_every_registered_op_has_samples():
    registered = set(_registered_ops())
    assert registered, "no torch.ops.bisup.* op is registered: did the extension load?"
    missing = registered - set(SAMPLES)
    stale = set(SAMPLES) - registered
    assert not missing, f"ops registered by the extension without opcheck samples here: {sorted(missing)}"
    assert not stale, f"opcheck samples for ops the extension does not register: {sorted(stale)}"
    assert all(SAMPLES[op] for op in SAMPLES)


@pytest.mark.parametrize("op,case", _opcheck_params())
def test_opcheck(op, case):
    args = SAMPLES[op][case]()
    torch.library.opcheck(_overload(op), args)


# Ops with floating-point tensor inputs: they could carry requires_grad in user code.
_FLOAT_INPUT_OPS = {
    "quantize_pack": "fp32_w4_g32_sym",
    "kv_quantize": "4bit_per_head",
    "attention": "decode_gqa4_4bit",
    "hadamard": "n40_paley_base",
    "gemm": "w4a4_per_row_bias_fp32",  # through the float bias
}


def _requires_grad_args(op):
    args = [a.clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in SAMPLES[op][_FLOAT_INPUT_OPS[op]]()]
    assert any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
    return tuple(args)


@pytest.mark.parametrize("op", sorted(_FLOAT_INPUT_OPS))
def test_opcheck_autograd_registration(op):
    """No bisup op has an Autograd kernel (the differentiable path is bisup.reference), so
    opcheck's autograd_registration_check must find that no output requires grad when the
    autograd fallback does nothing: the backend kernels do not secretly build an autograd graph."""
    torch.library.opcheck(_overload(op), _requires_grad_args(op), test_utils="test_autograd_registration")


def test_float_outputs_do_not_require_grad():
    """The ops fall through the Autograd key (csrc/bindings.cpp): with an input that requires grad,
    outputs are plain tensors instead of requires_grad tensors whose backward silently gives nothing."""
    for op in sorted(_FLOAT_INPUT_OPS):
        outs = _overload(op)(*_requires_grad_args(op))
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        assert not any(o.requires_grad for o in outs), f"bisup::{op}: an output requires grad without a backward"


# --------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) on CPU vs eager
# --------------------------------------------------------------------------------------------
# Inductor compiles the glue around the custom ops (extern calls) with the local C++ compiler:
# it works offline, so the README's claim is checked with the real backend.
_BACKEND = "inductor"


def _compile(fn):
    """torch.compile(fn, fullgraph=True) through _BACKEND, recording the FX graphs Dynamo hands it."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend(_BACKEND)
    return torch.compile(fn, backend=counter, fullgraph=True), counter.graphs


def _assert_one_graph_with(graphs, op_names):
    """One graph (no recompile) that calls the bisup ops itself (they were traced, not run eagerly)."""
    assert len(graphs) == 1, f"expected one compiled graph, got {len(graphs)}"
    called = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
    for name in op_names:
        assert {f"bisup.{name}", f"bisup.{name}.default"} & called, f"bisup::{name} is not in the graph: {sorted(called)}"


def test_compile_quant_linear_fullgraph():
    torch.manual_seed(0)
    linear = nn.Linear(200, 72, bias=True)  # K=200: zero-padded to 256 inside QuantLinear
    layer = QuantLinear.from_float(linear, w_bits=4, a_bits=4, group_size=64).eval()
    x = _randn((3, 5, 200), 40, scale=2.0)
    with torch.no_grad():
        want = layer(x)
        compiled, graphs = _compile(layer)
        got = compiled(x)
    _assert_one_graph_with(graphs, {"quantize_pack", "gemm"})
    assert got.shape == want.shape == (3, 5, 72) and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_compile_attention_fullgraph():
    tensors, lens = _attention_inputs(5, 19, 4, 6, 2, 64, 4, 32, torch.float32, [19, 6], 41)

    def attend(q, kp, vp, kq, ks, kz, vq, vs, vz, seq_lens):
        return ops.attention(q, kp, vp, kq, ks, kz, vq, vs, vz, kv_bits=4, group_size=32, causal=True,
                             seq_lens=seq_lens)

    want = attend(*tensors, lens)
    compiled, graphs = _compile(attend)
    got = compiled(*tensors, lens)
    _assert_one_graph_with(graphs, {"attention"})
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)
