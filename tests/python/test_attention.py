"""bisup.ops.attention (FP16 prompt segment + quantized segment): CPU and CUDA vs the reference."""
import pytest
import torch

from _helpers import ATTENTION_CASES as CASES, ATTENTION_TOL as TOL, WINDOW_CASES, attention_inputs as _inputs
from bisup import ops, reference


def _poison_cuda_allocator(device):
    """Leave NaNs in freed CUDA memory so an output element a kernel never writes shows up.

    torch's caching allocator serves requests of at most 1 MiB from a separate pool of 2 MiB
    segments, best fit: one large NaN block never reaches the outputs and split scratch of these
    small cases, so poison blocks of 1 MiB down to 512 B as well."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        blocks = [torch.full((1 << 24,), float("nan"), device=device)]  # 64 MiB: the large pool
        for shift in range(18, 6, -1):  # 2^shift fp32 values: 1 MiB ... 512 B, the small pool
            blocks += [torch.full((1 << shift,), float("nan"), device=device) for _ in range(4)]
        torch.cuda.synchronize(device)
        del blocks


@pytest.mark.parametrize("p,s,tq,hq,hkv,d,causal,ragged,bits,group,dtype", CASES)
def test_attention_matches_reference(device, gen, p, s, tq, hq, hkv, d, causal, ragged, bits, group, dtype):
    q, kp, vp, kq, vq, seq_lens = _inputs(p, s, tq, hq, hkv, d, ragged, bits, group, dtype, gen)
    kwargs = dict(kv_bits=bits, group_size=group, causal=causal, seq_lens=seq_lens)
    want = reference.attention(q, kp, vp, *kq, *vq, **kwargs)
    _poison_cuda_allocator(device)
    on = lambda t: t.to(device)  # noqa: E731
    got = ops.attention(on(q), on(kp), on(vp), *map(on, kq), *map(on, vq), kv_bits=bits, group_size=group,
                        causal=causal, seq_lens=None if seq_lens is None else on(seq_lens))
    assert got.dtype == dtype and got.shape == q.shape
    assert not got.isnan().any()
    torch.testing.assert_close(got.cpu().float(), want.float(), rtol=TOL[dtype], atol=TOL[dtype])
    # rows that see no key are exactly zero
    blind = ~reference.attention_mask(q.shape[0], tq, p, s, causal, seq_lens).any(-1)  # [B, Tq]
    assert bool((got.cpu()[blind.unsqueeze(1).expand(-1, hq, -1)] == 0).all())


@pytest.mark.parametrize("p,s,tq,hq,hkv,d,causal,ragged,bits,group,dtype,window", WINDOW_CASES)
def test_attention_sliding_window_matches_reference(device, gen, p, s, tq, hq, hkv, d, causal, ragged, bits, group,
                                                    dtype, window):
    """window > 0: a query at logical position i sees keys j > i - window, in the FP prompt segment and
    the quantized segment alike (Gemma3's local layers)."""
    q, kp, vp, kq, vq, seq_lens = _inputs(p, s, tq, hq, hkv, d, ragged, bits, group, dtype, gen)
    kwargs = dict(kv_bits=bits, group_size=group, causal=causal, seq_lens=seq_lens)
    want = reference.attention(q, kp, vp, *kq, *vq, window=window, **kwargs)
    full = reference.attention(q, kp, vp, *kq, *vq, **kwargs)
    mask = reference.attention_mask(q.shape[0], tq, p, s, causal, seq_lens, window=window)
    narrower = not bool(mask.equal(reference.attention_mask(q.shape[0], tq, p, s, causal, seq_lens)))
    assert narrower == (window < p + s), "the case's window must change the mask unless it covers every key"
    assert narrower == (not torch.equal(want, full))
    _poison_cuda_allocator(device)
    on = lambda t: t.to(device)  # noqa: E731
    got = ops.attention(*map(on, (q, kp, vp, *kq, *vq)), kv_bits=bits, group_size=group, causal=causal,
                        seq_lens=None if seq_lens is None else on(seq_lens), window=window)
    assert got.dtype == dtype and not got.isnan().any()
    torch.testing.assert_close(got.cpu().float(), want.float(), rtol=TOL[dtype], atol=TOL[dtype])
    blind = ~mask.any(-1)
    assert bool((got.cpu()[blind.unsqueeze(1).expand(-1, hq, -1)] == 0).all())


def test_attention_window_mask_by_hand():
    """P = 2 prompt keys, S = 3 quantized keys, Tq = 2 (logical positions 3, 4), window 3: query 3
    sees keys 1..3 (one prompt key), query 4 sees keys 2..4 (the prompt has slid out)."""
    m = reference.attention_mask(1, 2, 2, 3, True, window=3)[0]
    assert m.tolist() == [[False, True, True, True, False], [False, False, True, True, True]]
    with pytest.raises(ValueError, match="window must be >= 0"):
        reference.attention_mask(1, 2, 2, 3, True, window=-1)


@pytest.mark.parametrize("p,s,tq,bits,group,dtype", [
    (37, 700, 1, 4, -1, torch.float32),
    (0, 900, 3, 4, 32, torch.float16),
    (5, 650, 2, 3, 32, torch.float32),
    (300, 0, 1, 8, 16, torch.bfloat16),
])
def test_attention_long_single_head_splits_keys(device, gen, p, s, tq, bits, group, dtype):
    """B = 1, one KV head and hundreds of keys: the CPU twin splits the keys into ranges (split-K)
    and merges their partial softmax states; a ragged length and causal rows cut the ranges."""
    q, kp, vp, kq, vq, _ = _inputs(p, s, tq, 4, 1, 64, False, bits, group, dtype, gen, batch=1)
    seq_lens = torch.tensor([max(s - 11, 0)])
    kwargs = dict(kv_bits=bits, group_size=group, causal=True, seq_lens=seq_lens)
    want = reference.attention(q, kp, vp, *kq, *vq, **kwargs)
    on = lambda t: t.to(device)  # noqa: E731
    got = ops.attention(*map(on, (q, kp, vp, *kq, *vq)), kv_bits=bits, group_size=group, causal=True,
                        seq_lens=on(seq_lens))
    assert not got.isnan().any()
    torch.testing.assert_close(got.cpu().float(), want.float(), rtol=TOL[dtype], atol=TOL[dtype])


def test_attention_softmax_scale_and_dense_equivalence(device, gen):
    """With 8-bit K/V the op is ordinary attention over the dequantized keys: check against SDPA."""
    q, kp, vp, kq, vq, _ = _inputs(3, 20, 4, 4, 2, 64, False, 8, -1, torch.float32, gen)
    k = torch.cat([kp, reference.kv_dequantize(*kq, 8)], 2).repeat_interleave(2, 1)
    v = torch.cat([vp, reference.kv_dequantize(*vq, 8)], 2).repeat_interleave(2, 1)
    mask = reference.attention_mask(2, 4, 3, 20, True).unsqueeze(1)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    got = ops.attention(*(t.to(device) for t in (q, kp, vp, *kq, *vq)), kv_bits=8, softmax_scale=0.3)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)


def test_attention_errors(device, gen):
    q, kp, vp, kq, vq, _ = _inputs(2, 3, 1, 4, 2, 64, False, 4, -1, torch.float32, gen)
    q, kp, vp, kq, vq = q.to(device), kp.to(device), vp.to(device), [t.to(device) for t in kq], [t.to(device) for t in vq]
    with pytest.raises(RuntimeError, match="must have q's dtype"):
        ops.attention(q, kp.half(), vp.half(), *kq, *vq, kv_bits=4)
    with pytest.raises(RuntimeError, match=r"query heads \(3\) must be a multiple of the number of KV heads \(2\)"):
        ops.attention(q[:, :3].contiguous(), kp, vp, *kq, *vq, kv_bits=4)
    with pytest.raises(RuntimeError, match="bytes hold 32 values at 8 bits, but head_dim is 64"):
        ops.attention(q, kp, vp, *kq, *vq, kv_bits=8)
    with pytest.raises(RuntimeError, match="must have 4 dims"):
        ops.attention(q[0], kp, vp, *kq, *vq, kv_bits=4)
    with pytest.raises(RuntimeError, match="v_q must have k_q's shape"):
        ops.attention(q, kp, vp, *kq, *ops.kv_quantize(torch.randn(2, 2, 2, 64, device=device), 4), kv_bits=4)
    with pytest.raises(RuntimeError, match=r"seq_lens .* must be in \[0, S=3\]"):
        ops.attention(q, kp, vp, *kq, *vq, kv_bits=4, seq_lens=torch.tensor([4, 0], device=device))
    with pytest.raises(RuntimeError, match=r"seq_lens must have shape \[B=2\]"):
        ops.attention(q, kp, vp, *kq, *vq, kv_bits=4, seq_lens=torch.tensor([1], device=device))
    with pytest.raises(RuntimeError, match="k_prompt must be contiguous"):
        ops.attention(q, kp.transpose(2, 3).contiguous().transpose(2, 3), vp, *kq, *vq, kv_bits=4)
    with pytest.raises(RuntimeError, match="float16, bfloat16 or float32"):
        ops.attention(q.double(), kp.double(), vp.double(), *kq, *vq, kv_bits=4)
    with pytest.raises(RuntimeError, match=r"window must be >= 0 \(0: no sliding window\), got -2"):
        ops.attention(q, kp, vp, *kq, *vq, kv_bits=4, window=-2)
    if device.type == "cuda":
        with pytest.raises(RuntimeError, match="every tensor on q's device"):
            ops.attention(q, kp.cpu(), vp, *kq, *vq, kv_bits=4)
        with pytest.raises(RuntimeError, match="head_dim 64, 128 or 256"):
            q2, kp2, vp2, kq2, vq2, _ = _inputs(2, 3, 1, 2, 2, 96, False, 4, -1, torch.float32, gen)
            ops.attention(*(t.to(device) for t in (q2, kp2, vp2, *kq2, *vq2)), kv_bits=4)
