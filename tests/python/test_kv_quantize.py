"""kv_quantize / kv_dequantize: CPU (and CUDA when present) against bisup.reference, bit for bit."""
import pytest
import torch

from bisup import ops, reference

CASES = [
    # (shape [B, H, T, D], bits, group_size, dtype)
    ((2, 3, 5, 64), 4, -1, torch.float32),
    ((1, 2, 7, 128), 4, 32, torch.float16),
    ((2, 1, 3, 64), 8, -1, torch.bfloat16),
    ((1, 3, 9, 128), 8, 16, torch.float32),
    ((2, 2, 4, 64), 3, -1, torch.float16),
    ((1, 1, 6, 96), 3, 32, torch.float32),
    ((1, 2, 5, 40), 8, 8, torch.float32),  # head_dim not a power of two
    ((1, 2, 0, 64), 4, -1, torch.float32),  # no tokens
]


def _data(shape, dtype, gen):
    x = torch.randn(shape, generator=gen) * 3
    if x.numel():
        x[..., 0, :8] = 0.0  # a zero group (scale 1)
        x[..., -1, :] = x[..., -1, :].abs() + 0.5  # one-sided rows (zero point outside the code range)
    return x.to(dtype)


@pytest.mark.parametrize("shape,bits,group,dtype", CASES)
def test_kv_quantize_matches_reference(device, gen, shape, bits, group, dtype):
    x = _data(shape, dtype, gen)
    q, s, z = ops.kv_quantize(x.to(device), bits, group)
    rq, rs, rz = reference.kv_quantize(x, bits, group)
    assert q.dtype == torch.uint8 and q.shape[-1] == reference.kv_row_bytes(shape[-1], bits)
    assert torch.equal(q.cpu(), rq)
    assert torch.equal(s.cpu(), rs) and torch.equal(z.cpu(), rz)
    for out_dtype in (torch.float32, dtype):
        deq = ops.kv_dequantize(q, s, z, bits, group, out_dtype)
        assert deq.dtype == out_dtype and deq.shape == x.shape
        torch.testing.assert_close(deq.cpu(), reference.kv_dequantize(rq, rs, rz, bits, group, out_dtype), rtol=0, atol=0)
    if x.numel() and bits == 8:  # 8-bit error: half a step, plus the fp16 rounding of scale / zero
        err = (ops.kv_dequantize(q, s, z, bits, group).cpu() - x.float()).abs()
        step = s.cpu().float().repeat_interleave(shape[-1] // s.shape[-1], dim=-1)
        assert bool((err <= step + 1e-6).all())


def test_kv_quantize_4bit_is_quantize_pack(device, gen):
    x = torch.randn(3, 2, 5, 64, generator=gen).to(device)
    for group in (-1, 16):
        kv = ops.kv_quantize(x, 4, group)
        qp = ops.quantize_pack(x, 4, group, sym=False)
        for a, b in zip(kv, qp):
            assert torch.equal(a, b)


def test_kv_quantize_errors(device):
    x = torch.randn(1, 1, 2, 64, device=device)
    with pytest.raises(RuntimeError, match="kv bits must be 3, 4 or 8, got 5"):
        ops.kv_quantize(x, 5)
    with pytest.raises(RuntimeError, match="multiple of 8"):
        ops.kv_quantize(x, 4, 4)
    with pytest.raises(RuntimeError, match="multiple of group_size"):
        ops.kv_quantize(x, 4, 48)
    with pytest.raises(RuntimeError, match="3-bit KV needs head_dim to be a multiple of 32"):
        ops.kv_quantize(torch.randn(1, 40, device=device), 3)
    with pytest.raises(RuntimeError, match="float16, bfloat16 or float32"):
        ops.kv_quantize(x.to(torch.int32), 4)
    q, s, z = ops.kv_quantize(x, 4)
    with pytest.raises(RuntimeError, match="scale must have shape"):
        ops.kv_dequantize(q, s[..., :1, :], z, 4)
    with pytest.raises(RuntimeError, match="zero must have the shape of scale"):
        ops.kv_dequantize(q, s, z[..., :1, :], 4)
    with pytest.raises(RuntimeError, match="must have dtype"):
        ops.kv_dequantize(q, s.float(), z, 4)
