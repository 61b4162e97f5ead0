"""bisup.ops.gemm (W4A4 / W3A3 group-scaled GEMM) against bisup.reference.gemm.

Error bound (fp32 output): the kernels compute every group dot exactly in int32 and then do, per
output, G + 1 products (float(dot) * (sa * sw), sa * sw exact) and G + 2 additions (groups,
outlier, bias) in fp32, each rounding once with relative error <= u = 2^-24. The standard
recursive-summation bound gives |y - y_ref| <= (2G + 4) * u * S, S = sum of the absolute values of
all terms; fp16 / bf16 outputs add one final rounding (|y_ref| * 2^-11 or 2^-8). The reference
is float64 on exact integers. CPU and CUDA fix the same operation order, so they must agree bit
for bit.
"""
import pytest
import torch

from _helpers import make_gemm_case as make_case
from bisup import ops, reference
from conftest import poison_like

U32 = 2.0**-24
OUT_ROUNDING = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}

# (M, N, K, group_size, w_bits, a_bits, outlier count Ko, bias)
CASES = [
    (1, 40, 256, 32, 4, 4, 0, False),
    (3, 72, 384, 64, 3, 3, 0, True),
    (17, 136, 256, 128, 4, 3, 16, True),
    (64, 256, 512, -1, 3, 4, 32, False),
    (129, 96, 384, 128, 3, 3, 48, True),
    (64, 200, 96, 32, 4, 4, 0, True),  # K not a multiple of the 128-wide K tile
    (129, 257, 512, 64, 4, 4, 128, True),  # odd N
    (17, 64, 128, -1, 4, 4, 0, False),
]


def abs_term_sum(qa, qw, args, kw):
    """S[m, n]: sum of |every fp32 term| of the output (see the module docstring)."""
    k = qa.shape[1]
    g = k if kw["group_size"] == -1 else kw["group_size"]
    a = qa.double().reshape(qa.shape[0], k // g, g)
    w = qw.double().reshape(qw.shape[0], k // g, g)
    dots = torch.einsum("mgk,ngk->mng", a, w).abs()
    s = (dots * args["a_scale"].double()[:, None, :] * args["w_scale"].double()[None, :, :]).sum(-1)
    if "a_outlier" in kw:
        od = (kw["a_outlier"].double() @ kw["w_outlier"].double().T).abs()
        s += od * kw["a_outlier_scale"].double()[:, None] * kw["w_outlier_scale"].double()
    if "bias" in kw:
        s += kw["bias"].double().abs()
    return s, k // g


def to_device(d, device):
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in d.items()}


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "M{}-N{}-K{}-g{}-w{}a{}-o{}-b{}".format(*c))
def test_gemm_matches_reference(device, gen, monkeypatch, case, out_dtype):
    qa, qw, args, kw = make_case(*case, gen)
    kw["out_dtype"] = out_dtype
    ref = reference.gemm(**args, **{**kw, "out_dtype": torch.float64})
    s, groups = abs_term_sum(qa, qw, args, kw)
    bound = (2 * groups + 4) * U32 * s + OUT_ROUNDING[out_dtype] * ref.abs() + 2.0**-24
    y_cpu = ops.gemm(**args, **kw)
    assert y_cpu.dtype == out_dtype and y_cpu.shape == (case[0], case[1])
    err = (y_cpu.double() - ref).abs()
    assert torch.isfinite(y_cpu).all()
    assert (err <= bound).all(), f"max err {err.max():.3g}, worst err/bound {(err / bound).max():.3g}"
    if device.type == "cpu":
        return
    dargs, dkw = to_device(args, device), to_device(kw, device)
    for mma in ("s4", "s8"):  # both MMA paths (s4 falls back to s8 where it does not apply)
        monkeypatch.setenv("BISUP_GEMM_MMA", mma)
        # Poison the caching allocator: the output block likely reuses this NaN-filled memory.
        poison = poison_like(torch.empty(case[0] * case[1] * 4 + 1024, device=device))
        del poison
        y = ops.gemm(**dargs, **dkw)
        torch.cuda.synchronize()
        assert torch.isfinite(y).all(), mma
        assert torch.equal(y.cpu(), y_cpu), f"{mma}: CUDA differs from the CPU twin, max {(y.cpu().double() - y_cpu.double()).abs().max():.3g}"


@pytest.mark.parametrize("w_bits", [4, 3])
@pytest.mark.parametrize("m,n,k", [(1, 4096, 4096), (33, 14336, 4096), (16, 4096, 14336), (300, 1024, 4096)])
def test_gemm_llama3_shapes_cuda(gen, monkeypatch, m, n, k, w_bits):
    """Llama-3-8B layer shapes (q/o: 4096x4096, up/gate: 14336x4096, down: 4096x14336), CUDA vs CPU twin."""
    if not torch.cuda.is_available() or not ops.has_cuda_kernels():
        pytest.skip("needs a CUDA GPU")
    qa, qw, args, kw = make_case(m, n, k, 128, w_bits, 4, 128, True, gen)
    y_cpu = ops.gemm(**args, **kw)
    for mma in ("s4", "s8"):
        monkeypatch.setenv("BISUP_GEMM_MMA", mma)
        y = ops.gemm(**to_device(args, "cuda"), **to_device(kw, "cuda"))
        assert torch.equal(y.cpu(), y_cpu), mma


def test_gemm_cuda_tall_a_runs_in_row_slices(gen):
    """M beyond 65535 M tiles of the large config (the gridDim.y limit): gemm.cu launches row
    slices with offset A / scale / outlier / output pointers. ~0.5 GB of host and device memory."""
    if not torch.cuda.is_available() or not ops.has_cuda_kernels():
        pytest.skip("needs a CUDA GPU")
    m, n, k, ko = 65535 * 128 + 200, 8, 32, 16
    args = dict(
        a_q=torch.randint(0, 256, (m, k // 2), generator=gen, dtype=torch.uint8),
        a_scale=(torch.rand(m, 1, generator=gen) + 0.5).half(),
        w_q=torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8),
        w_scale=(torch.rand(n, 1, generator=gen) + 0.5).half(),
    )
    kw = dict(a_bits=4, w_bits=4, group_size=-1, out_dtype=torch.float16,
              a_outlier=torch.randint(-128, 128, (m, ko), generator=gen, dtype=torch.int8),
              a_outlier_scale=(torch.rand(m, generator=gen) * 1e-3).half(),
              w_outlier=torch.randint(-128, 128, (n, ko), generator=gen, dtype=torch.int8),
              w_outlier_scale=(torch.rand(n, generator=gen) * 1e-3).half())
    y = ops.gemm(**to_device(args, "cuda"), **to_device(kw, "cuda")).cpu()
    assert torch.equal(y, ops.gemm(**args, **kw))


# ------------------------------------------------------------------------------------------------
# CPU paths (csrc/cpu/gemm.cpp): every ISA this CPU has, forced with BISUP_CPU_GEMM_ISA
# ------------------------------------------------------------------------------------------------
CPU_ISAS = ["avx512vnni", "avxvnni", "avx2", "scalar"]
# Shapes aimed at the CPU kernel's edges: M = 1, 2, 3, 5, 7 (its 4 / 2 / 1-row dot kernels), M past
# one 64-row task (130), N not a multiple of 16 or 8 lanes, groups of 32 / 96 / 160 / 384 and -1
# (more than one 256-value K-chunk per group, and a partial last chunk), INT3 blocks.
CPU_CASES = CASES + [
    (2, 33, 384, 384, 4, 4, 0, False),
    (3, 17, 320, 160, 3, 3, 16, True),
    (5, 9, 1056, -1, 4, 4, 0, True),
    (7, 31, 192, 96, 3, 4, 0, False),
    (130, 47, 256, 64, 4, 4, 16, False),
    (1, 5, 64, 32, 3, 3, 0, True),
]


def _force_isa(monkeypatch, isa):
    if isa not in ops.cpu_gemm_isas():
        pytest.skip(f"this CPU lacks {isa} (it has {', '.join(ops.cpu_gemm_isas())})")
    monkeypatch.setenv("BISUP_CPU_GEMM_ISA", isa)
    assert ops.cpu_gemm_isa() == isa


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: "M{}-N{}-K{}-g{}-w{}a{}-o{}-b{}".format(*c))
@pytest.mark.parametrize("isa", CPU_ISAS)
def test_cpu_gemm_paths_match_reference_and_scalar(gen, monkeypatch, isa, case, out_dtype):
    """Each SIMD path within the bound of the reference and bit-identical to the scalar path
    (same integer dots, same fp32 operation order)."""
    qa, qw, args, kw = make_case(*case, gen)
    kw["out_dtype"] = out_dtype
    _force_isa(monkeypatch, isa)
    poison = poison_like(torch.empty(case[0] * case[1] + 64))  # freed NaNs the output may reuse
    del poison
    y = ops.gemm(**args, **kw)
    ref = reference.gemm(**args, **{**kw, "out_dtype": torch.float64})
    s, groups = abs_term_sum(qa, qw, args, kw)
    bound = (2 * groups + 4) * U32 * s + OUT_ROUNDING[out_dtype] * ref.abs() + 2.0**-24
    assert y.dtype == out_dtype and y.shape == (case[0], case[1]) and torch.isfinite(y).all()
    err = (y.double() - ref).abs()
    assert (err <= bound).all(), f"{isa}: max err {err.max():.3g}, worst err/bound {(err / bound).max():.3g}"
    monkeypatch.setenv("BISUP_CPU_GEMM_ISA", "scalar")
    assert torch.equal(y, ops.gemm(**args, **kw)), f"{isa} differs from the scalar path"


def test_cpu_gemm_isa_selection(monkeypatch, gen):
    supported = ops.cpu_gemm_isas()
    assert supported[-1] == "scalar" and set(supported) <= set(CPU_ISAS)
    monkeypatch.delenv("BISUP_CPU_GEMM_ISA", raising=False)
    assert ops.cpu_gemm_isa() == supported[0]  # the best path by default
    args, kw = _valid(gen)
    monkeypatch.setenv("BISUP_CPU_GEMM_ISA", "avx1024")
    with pytest.raises(RuntimeError, match="must be one of avx512vnni, avxvnni, avx2, scalar or auto"):
        ops.gemm(**args, **kw)
    missing = [isa for isa in CPU_ISAS if isa not in supported]
    if not missing:
        pytest.skip("this CPU has every path: no unsupported one to force")
    monkeypatch.setenv("BISUP_CPU_GEMM_ISA", missing[0])
    with pytest.raises(RuntimeError, match=f"lacks {missing[0]}; this CPU supports: {supported[0]}"):
        ops.gemm(**args, **kw)
    with pytest.raises(RuntimeError, match="this CPU supports"):
        ops.cpu_gemm_isa()


def _valid(gen, w_bits=4):
    _, _, args, kw = make_case(4, 16, 128, 32, w_bits, 4, 16, True, gen)
    return args, kw


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda a, k: k.update(a_bits=5), "a_bits 3 or 4"),
        (lambda a, k: k.update(w_bits=2), "w_bits 3 or 4"),
        (lambda a, k: a.update(a_q=a["a_q"][:, :8].contiguous()), "multiple of 32"),
        (lambda a, k: a.update(a_q=a["a_q"].T.contiguous().T), "contiguous"),
        (lambda a, k: a.update(a_q=a["a_q"].view(torch.int8)), "dtype"),
        (lambda a, k: a.update(w_q=a["w_q"][:, :48].contiguous()), "expects w_q of shape"),
        (lambda a, k: k.update(w_bits=3), "expects w_q of shape"),
        (lambda a, k: k.update(group_size=48), "multiple of group_size"),
        (lambda a, k: k.update(group_size=0), "group_size must be -1 or positive"),
        (lambda a, k: a.update(a_scale=a["a_scale"][:, :2].contiguous()), "a_scale must have shape"),
        (lambda a, k: a.update(w_scale=a["w_scale"].float()), "dtype"),
        (lambda a, k: k.update(bias=k["bias"][:5]), "bias must have shape"),
        (lambda a, k: k.update(out_dtype=torch.int32), "out_dtype must be"),
        (lambda a, k: k.pop("w_outlier"), "all four outlier tensors"),
        (lambda a, k: k.update(a_outlier=k["a_outlier"][:, :8].contiguous()), "w_outlier must have shape"),
        (
            lambda a, k: k.update(a_outlier=k["a_outlier"][:, :8].contiguous(), w_outlier=k["w_outlier"][:, :8].contiguous()),
            "multiple of 16",
        ),
        (lambda a, k: k.update(a_outlier_scale=k["a_outlier_scale"][:2]), "a_outlier_scale must have shape"),
    ],
)
def test_gemm_rejects_bad_arguments(gen, change, match):
    args, kw = _valid(gen)
    change(args, kw)
    with pytest.raises(RuntimeError, match=match):
        ops.gemm(**args, **kw)


def test_gemm_group_limit_and_reference_errors(gen):
    qa = torch.zeros(1, 131072, dtype=torch.int8)
    qw = torch.zeros(1, 131072, dtype=torch.int8)
    args = dict(a_q=reference.pack_int4(qa), a_scale=torch.ones(1, 1).half(), w_q=reference.pack_int4(qw),
                w_scale=torch.ones(1, 1).half())
    with pytest.raises(RuntimeError, match="group size must be <="):
        ops.gemm(**args, a_bits=4, w_bits=4, group_size=-1)
    with pytest.raises(ValueError, match="all four outlier tensors"):
        reference.gemm(**args, a_bits=4, w_bits=4, group_size=-1, a_outlier=torch.zeros(1, 16, dtype=torch.int8))


def test_gemm_cuda_specific_errors(gen):
    if not torch.cuda.is_available() or not ops.has_cuda_kernels():
        pytest.skip("needs a CUDA GPU")
    _, _, args, kw = make_case(4, 16, 160, 32, 3, 4, 0, False, gen)
    with pytest.raises(RuntimeError, match="multiple of 128"):
        ops.gemm(**to_device(args, "cuda"), **kw)
    args, kw = _valid(gen)
    mixed = to_device(args, "cuda")
    mixed["w_scale"] = args["w_scale"]
    with pytest.raises(RuntimeError, match="is on"):
        ops.gemm(**mixed, **to_device(kw, "cuda"))
    misaligned = to_device(args, "cuda")
    misaligned["a_q"] = torch.zeros(4 * 64 + 1, dtype=torch.uint8, device="cuda")[1:].view(4, 64)
    with pytest.raises(RuntimeError, match="16-byte aligned"):
        ops.gemm(**misaligned, **to_device(kw, "cuda"))
