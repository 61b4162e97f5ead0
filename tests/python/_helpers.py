"""Test inputs shared by several test modules (import them from here, never from another test
module). One section per op family; add new helpers in their own section."""
import torch

from bisup import reference


# ------------------------------------------------------------------------------------------------
# GEMM (test_gemm.py, test_gemm_kernel_model.py)
# ------------------------------------------------------------------------------------------------
def make_gemm_case(m, n, k, group_size, w_bits, a_bits, ko, with_bias, gen):
    """Random codes, packed operands and fp16 scales of one gemm call: (qa, qw, args, kw), where
    ops.gemm(**args, **kw) is the call (kw: bits, group_size, optional bias and outliers)."""
    g = k if group_size == -1 else group_size
    qa = torch.randint(-(1 << (a_bits - 1)), 1 << (a_bits - 1), (m, k), generator=gen, dtype=torch.int8)
    qw = torch.randint(-(1 << (w_bits - 1)), 1 << (w_bits - 1), (n, k), generator=gen, dtype=torch.int8)
    qa[0, :g] = 0  # zero groups
    qw[-1, -g:] = 0
    # Scales over a few binades (fp16), so group terms differ in magnitude.
    sa = (2.0 ** torch.randint(-6, 1, (m, k // g), generator=gen) * (1 + torch.rand(m, k // g, generator=gen))).half()
    sw = (2.0 ** torch.randint(-6, 1, (n, k // g), generator=gen) * (1 + torch.rand(n, k // g, generator=gen))).half()
    args = dict(
        a_q=reference.pack_int4(qa),
        a_scale=sa,
        w_q=reference.pack_int4(qw) if w_bits == 4 else reference.pack_int3(qw),
        w_scale=sw,
    )
    kw = dict(a_bits=a_bits, w_bits=w_bits, group_size=group_size)
    if with_bias:
        kw["bias"] = torch.randn(n, generator=gen)
    if ko:
        kw["a_outlier"] = torch.randint(-128, 128, (m, ko), generator=gen, dtype=torch.int8)
        kw["w_outlier"] = torch.randint(-128, 128, (n, ko), generator=gen, dtype=torch.int8)
        kw["a_outlier_scale"] = (torch.rand(m, generator=gen) * 2e-3 + 1e-4).half()
        kw["w_outlier_scale"] = (torch.rand(n, generator=gen) * 2e-3 + 1e-4).half()
    return qa, qw, args, kw


# ------------------------------------------------------------------------------------------------
# Mixed-precision attention (test_attention.py, test_attention_decode_model.py)
# ------------------------------------------------------------------------------------------------
# The grid (P in {0, 1, 37}, S in {0, 1, 255}, Tq in {1, 5, 64}, GQA 1/3/4, head_dim
# 64/128, ragged lengths, causal on/off) paired up rather than crossed, so it runs in seconds;
# plus 3/8-bit, groups, head_dim 256 and every dtype.
ATTENTION_CASES = [
    # P,  S,  Tq, Hq, Hkv, D, causal, ragged, bits, group, dtype
    (37, 255, 1, 8, 2, 128, True, False, 4, -1, torch.float32),
    (0, 255, 5, 6, 2, 64, True, True, 4, 32, torch.float32),
    (1, 1, 64, 4, 4, 64, True, False, 4, -1, torch.float32),
    (37, 0, 5, 8, 2, 128, False, False, 4, -1, torch.float32),
    (0, 1, 1, 3, 1, 64, False, True, 8, 16, torch.float32),
    (1, 255, 64, 6, 2, 128, False, True, 8, -1, torch.float16),
    (37, 1, 1, 4, 1, 64, True, True, 3, 32, torch.float16),
    (0, 0, 5, 4, 4, 64, True, False, 4, -1, torch.float32),  # no keys at all: zeros
    (37, 255, 5, 4, 1, 128, True, True, 4, 64, torch.bfloat16),
    (1, 37, 64, 8, 2, 64, True, True, 3, -1, torch.float32),
    (37, 40, 1, 4, 2, 256, True, False, 8, 32, torch.float16),
    (5, 70, 16, 2, 2, 256, True, True, 4, -1, torch.float32),  # largest fused Tq on CUDA
]
# Sliding-window cases (P, S, Tq, Hq, Hkv, D, causal, ragged, bits, group, dtype, window): windows
# inside the prompt segment, across the segment boundary, under ragged lengths, of 1, wider than the
# sequence, not a multiple of any tile; long ones that split the keys.
WINDOW_CASES = [
    (37, 255, 1, 8, 2, 128, True, False, 4, -1, torch.float32, 20),
    (37, 255, 5, 6, 2, 64, True, True, 4, 32, torch.float32, 40),   # the prompt slid out of the window
    (37, 20, 16, 4, 1, 64, True, False, 8, 16, torch.float16, 45),  # the window starts inside the prompt
    (1, 37, 64, 4, 4, 64, True, True, 3, -1, torch.float32, 9),
    (5, 70, 16, 2, 2, 256, True, True, 4, -1, torch.bfloat16, 1),    # each query sees itself only
    (0, 40, 3, 4, 2, 64, False, True, 4, 32, torch.float32, 7),      # window without the causal mask
    (37, 40, 1, 4, 2, 256, True, False, 8, 32, torch.float16, 1000),  # wider than everything: no effect
    (3, 700, 2, 4, 1, 64, True, True, 4, 32, torch.float32, 333),    # split-K within the window
    (300, 500, 1, 8, 1, 128, True, False, 4, -1, torch.float32, 512),
]
ATTENTION_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def attention_inputs(p, s, tq, hq, hkv, d, ragged, bits, group, dtype, gen, batch=2):
    """(q, k_prompt, v_prompt, kv_quantize(k), kv_quantize(v), seq_lens or None) of one case."""
    q = torch.randn(batch, hq, tq, d, generator=gen).to(dtype)
    kp = torch.randn(batch, hkv, p, d, generator=gen).to(dtype)
    vp = torch.randn(batch, hkv, p, d, generator=gen).to(dtype)
    k = torch.randn(batch, hkv, s, d, generator=gen) * 2 - 0.5
    v = torch.randn(batch, hkv, s, d, generator=gen)
    if s:
        k[:, :, 0, :8] = 0.0  # a zero group
    kq = reference.kv_quantize(k, bits, group)
    vq = reference.kv_quantize(v, bits, group)
    seq_lens = torch.tensor([s, max(s - 7, 0)][:batch]) if ragged else None
    if ragged and s == 1:
        seq_lens = torch.tensor([1, 0])
    return q, kp, vp, kq, vq, seq_lens
