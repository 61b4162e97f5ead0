"""quantize_pack / dequantize: CPU and CUDA bit-exact against the reference, and errors."""
import pytest
import torch

from bisup import ops
from bisup import reference as ref

from conftest import poison_like


def make_input(shape, dtype, gen, group):
    x = torch.randn(shape, generator=gen) * torch.rand(shape[:-1] + (1,), generator=gen) * 4
    x[..., :group] = 0  # an all-zero group
    if shape[-1] >= 2 * group:
        x[..., group : 2 * group] = -x[..., group : 2 * group].abs()  # an all-negative group
    x[..., -1] = 1e-9  # tiny values must not produce NaN scales
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape, group_size", [((1, 64), 32), ((3, 128), 64), ((17, 192), 64), ((5, 96), -1),
                                               ((2, 3, 256), 128), ((7, 40), 8)])
@pytest.mark.parametrize("bits, sym", [(4, True), (3, True), (4, False), (2, False)])
@pytest.mark.parametrize("clip", [1.0, 0.85])
def test_quantize_pack_matches_reference(device, gen, dtype, shape, group_size, bits, sym, clip):
    g = shape[-1] if group_size == -1 else group_size
    x = make_input(shape, dtype, gen, g)
    eq, es, ez = ref.quantize_pack(x, bits, group_size, sym, clip)
    q, s, z = ops.quantize_pack(x.to(device), bits, group_size, sym, clip)
    assert torch.equal(q.cpu(), eq)
    assert torch.equal(s.cpu(), es)
    assert (z is None) == sym
    if not sym:
        assert torch.equal(z.cpu(), ez)
    assert torch.isfinite(s).all() and (s > 0).all()
    # dequantize agrees too, and the error is bounded by half a step (plus clipping)
    out = ops.dequantize(q, s, z, group_size, torch.float32)
    assert torch.equal(out.cpu(), ref.dequantize(eq, es, None if sym else ez, group_size, torch.float32))
    if clip == 1.0:
        step = es.float().repeat_interleave(g, dim=-1)
        err = (out.cpu() - x.float()).abs()
        assert (err <= step * 0.5 + 1e-6 + x.float().abs() * 1e-3).all()


def test_dequantize_output_written(device, gen):
    x = torch.randn(4, 64, generator=gen)
    q, s, z = ops.quantize_pack(x.to(device), 4, 32)
    # NaN-fill a block of the output's size and free it: the output likely reuses that memory.
    poison = poison_like(torch.empty(4 * 64, dtype=torch.float16, device=device))
    del poison
    out = ops.dequantize(q, s, z, 32, torch.float16)
    assert torch.isfinite(out).all() and out.dtype == torch.float16
    assert torch.equal(out.cpu(), ref.dequantize(q.cpu(), s.cpu(), None, 32, torch.float16))


# (hi, lo) float32 values whose asymmetric 4-bit scale at clip 0.85 changes in fp16 when
# clip * hi - clip * lo is evaluated as one FMA (either way round) instead of two rounded products:
# found by a search over 2M random pairs. Guards the explicit __fmul_rn in csrc/cuda/quantize.cu.
FMA_SENSITIVE = [
    (float.fromhex("0x1.200028p+0"), float.fromhex("-0x1.6e374p-3")),
    (float.fromhex("0x1.0fa0d8p+1"), float.fromhex("-0x1.f9ab6p+1")),
]


def test_asym_scale_rounds_both_products(device):
    hi, lo = torch.tensor(FMA_SENSITIVE).unbind(1)  # exact float32 values
    x = torch.zeros(len(FMA_SENSITIVE), 32)
    x[:, 3], x[:, 17] = hi, lo
    clip = torch.tensor(0.85)
    unfused = ((clip * hi - clip * lo) / 15).half()
    for fused in ((clip.double() * hi.double() - (clip * lo).double()).float(),
                  ((clip * hi).double() - clip.double() * lo.double()).float()):
        assert not torch.equal((fused / 15).half(), unfused)  # the case really tells the two apart
    _, s, _ = ops.quantize_pack(x.to(device), 4, 32, sym=False, clip_ratio=0.85)
    assert torch.equal(s.cpu(), unfused[:, None])
    assert torch.equal(s.cpu(), ref.quantize_pack(x, 4, 32, False, 0.85)[1])


def test_all_zero_rows_give_unit_scale():
    q, s, z = ops.quantize_pack(torch.zeros(3, 64), 4, 32, sym=False)
    assert torch.equal(s, torch.ones_like(s)) and torch.equal(z, torch.zeros_like(z))
    assert torch.equal(ops.dequantize(q, s, z, 32, torch.float32), torch.zeros(3, 64))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: ops.quantize_pack(torch.randn(2, 64, dtype=torch.float64), 4, 32), "float16, bfloat16 or float32"),
        (lambda: ops.quantize_pack(torch.randn(2, 64), 5, 32), r"bits must be in \[2, 4\]"),
        (lambda: ops.quantize_pack(torch.randn(2, 64), 4, 24), "multiple of group_size"),
        (lambda: ops.quantize_pack(torch.randn(2, 63), 4, -1), "even"),
        (lambda: ops.quantize_pack(torch.randn(64, 2).t(), 4, -1), "contiguous"),
        (lambda: ops.quantize_pack(torch.randn(2, 64), 4, 32, True, 1.5), "clip_ratio"),
        (lambda: ops.dequantize(torch.zeros(2, 32, dtype=torch.uint8), torch.ones(2, 3, dtype=torch.float16), None, 32),
         "scale must have shape"),
        (lambda: ops.dequantize(torch.zeros(2, 32, dtype=torch.uint8), torch.ones(2, 2), None, 32), "dtype"),
    ],
)
def test_quantize_errors(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU to mix devices")
def test_dequantize_rejects_mixed_devices():
    with pytest.raises(RuntimeError, match="device"):
        ops.dequantize(torch.zeros(2, 32, dtype=torch.uint8, device="cuda"), torch.ones(2, 2, dtype=torch.float16), None, 32)
