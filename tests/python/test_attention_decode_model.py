"""A Python model of the CUDA attention paths, run on the CPU (no GPU needed).

`decode_model` follows csrc/cuda/attention_decode.cuh statement by statement: the host's split
choice (attention.cu), the grid (split, batch * kv_head, row_tile), each block's rows / visible
lengths / key range, the shared-memory tile loader (prompt rows, dequant8's bit reads, zeros past
`end`), the warp's online softmax in fp32 (float4 dot products accumulated in order, xor-butterfly
reductions, the `continue` for rows that have seen no key yet), the partial outputs and the
log-sum-exp combine. Scratch buffers start as NaN, so an unwritten (split, row) shows up.
`prefill_model` rebuilds the fallback's mask with the same tensor ops as attention_prefill.

What it proves: the index math, masking and merge logic give the reference's result for every
decode case of test_attention.py under several SM counts (1 split ... one split per tile), and
the fp32 error of this summation order fits the tolerances the CUDA tests use. What it cannot:
compiler FMA contraction and expf/logf ulps (both at the 1e-7 level), races, or launch errors.
The kernel's sizes and limits are read from its sources (_kernel_constants), so the model follows
a change of them; its transcribed logic must be kept in step by hand.
"""
import math

import pytest
import torch

import _kernel_constants as kc
from _helpers import ATTENTION_CASES, ATTENTION_TOL as TOL, WINDOW_CASES, attention_inputs
from bisup import ops, reference

_SOURCES = ("pack_format.h", "cuda/cuda_utils.cuh", "cuda/attention_decode.cuh", "cuda/attention.cu")
(K_TILE, K_MAX_ROWS, K_KEY_PAD, K_FUSED_MAX_TQ, K_MAX_SPLITS, K_SPLIT_WAVES, K_MAX_SMEM_OPT_IN, K_SMEM_NO_OPT_IN,
 K_MAX_GRID_YZ, INT3_BLOCK_VALUES, INT3_BLOCK_BYTES) = kc.require(
    kc.constants(*_SOURCES), "kTile", "kMaxRows", "kKeyPad", "kFusedMaxTq", "kMaxSplits", "kSplitWaves",
    "kMaxSmemOptIn", "kSmemNoOptIn", "kMaxGridYZ", "kInt3BlockValues", "kInt3BlockBytes", source=", ".join(_SOURCES))
LANES = torch.arange(32)


def cdiv(a, b):
    return (a + b - 1) // b


def launch_shape(b, hq, hkv, tq, p, s, sms, window=0):
    """attention_decode's host math -> (splits, split_len, row_tiles, the kernel's window)."""
    total = p + s
    span = min(total, window + tq - 1) if window > 0 else total
    row_tiles = cdiv((hq // hkv) * tq, K_MAX_ROWS)
    tiles = max(cdiv(span, K_TILE), 1)
    base_blocks = b * hkv * row_tiles
    want = min(max(cdiv(K_SPLIT_WAVES * sms, base_blocks), 1), min(tiles, K_MAX_SPLITS))
    split_len = cdiv(tiles, want) * K_TILE
    splits = max(cdiv(span, split_len), 1)
    return splits, split_len, row_tiles, 0 if window >= total else window


def decode_smem_bytes(d):
    return (K_TILE * (d + K_KEY_PAD) + K_TILE * d + K_MAX_ROWS * d) * 4


def _le_u32(byte_rows, first):
    """The little-endian uint32 a vector load reads at byte offset `first` of each row."""
    w = byte_rows[..., first:first + 4].long()
    return w[..., 0] | (w[..., 1] << 8) | (w[..., 2] << 16) | (w[..., 3] << 24)


def dequant8_codes(row, d0, bits):
    """Codes of values d0..d0+7 of packed rows [..., bytes] as dequant8<BITS> reads them."""
    shifts = torch.arange(8)
    if bits == 8:  # one uint2: bytes d0..d0+3 in .x, d0+4..d0+7 in .y
        x, y = _le_u32(row, d0), _le_u32(row, d0 + 4)
        return torch.cat([(x[..., None] >> (8 * shifts[:4])) & 0xFF, (y[..., None] >> (8 * shifts[:4])) & 0xFF], -1)
    if bits == 4:  # one uint32 at byte d0 / 2, nibble i = value d0 + i
        return (_le_u32(row, d0 // 2)[..., None] >> (4 * shifts)) & 0xF
    # INT3: quads q, q + 1 of one block from its low word q / 4 and word 2 (pack_format.h int3_quad)
    blk = (d0 // INT3_BLOCK_VALUES) * INT3_BLOCK_BYTES
    q = (d0 % INT3_BLOCK_VALUES) // 4
    low, high = _le_u32(row, blk + 4 * (q >> 2)), _le_u32(row, blk + 8)

    def quad(s):
        return ((low >> (2 * (s & 3))) & 0x03030303) | (((high >> s) & 0x01010101) << 2)

    both = torch.stack([quad(q), quad(q + 1)], -1)  # [..., 2]: values d0..d0+3, d0+4..d0+7
    return ((both[..., None] >> (8 * shifts[:4])) & 0xFF).flatten(-2)


def dequant_rows(row, s, z, d, group, bits):
    """load_kv_tile's quantized branch for whole rows: (code - z) * s in fp32, 8 values at a time."""
    out = []
    for d0 in range(0, d, 8):
        g = d0 // group
        out.append((dequant8_codes(row, d0, bits).float() - z[..., g:g + 1].float()) * s[..., g:g + 1].float())
    return torch.cat(out, -1)


def _dot_f32(qs, ks):
    """dot += a.x*c.x + a.y*c.y + a.z*c.z + a.w*c.w over float4 chunks, fp32, in order:
    qs [R, D], ks [32, D] -> [R, 32]."""
    prod = qs[:, None, :] * ks[None]  # [R, 32, D] fp32
    c = prod.view(*prod.shape[:2], -1, 4)
    chunk = ((c[..., 0] + c[..., 1]) + c[..., 2]) + c[..., 3]
    dot = torch.zeros(chunk.shape[:2])
    for i in range(chunk.shape[-1]):
        dot = dot + chunk[..., i]
    return dot


def _warp_sum(v):
    """warp_sum: __shfl_xor_sync butterfly, as lane 0 ends up with it ([R, 32] -> [R])."""
    for o in (16, 8, 4, 2, 1):
        v = v + v[:, LANES ^ o]
    return v[:, 0]


def decode_model(q, kp, vp, kq, vq, *, bits, group, scale=None, causal=True, seq_lens=None, sms=132, window=0):
    """The CUDA decode path, modelled on the CPU. Returns (out in q's dtype, stats dict)."""
    (k_q, k_s, k_z), (v_q, v_s, v_z) = kq, vq
    b_, hq_, tq_, d = q.shape
    hkv_, p_ = kp.shape[1], kp.shape[2]
    s_ = k_q.shape[2]
    group = d if group == -1 else group
    scale = torch.tensor(d ** -0.5 if scale is None else scale, dtype=torch.float64).float()
    splits, split_len, row_tiles, window = launch_shape(b_, hq_, hkv_, tq_, p_, s_, sms, window)
    gqa, rows_total = hq_ // hkv_, b_ * hq_ * tq_
    assert splits <= 2**31 - 1 and b_ * hkv_ <= K_MAX_GRID_YZ and row_tiles <= K_MAX_GRID_YZ  # grid limits
    part_o = torch.full((splits, rows_total, d), float("nan"))
    part_lse = torch.full((splits, rows_total), float("nan"))
    qf = q.float().reshape(-1, d)
    # The logical K/V rows load_kv_tile produces (prompt rows converted, quantized rows through
    # dequant8), built once per call instead of once per tile; the tile loop slices them.
    k_all = torch.cat([kp.float(), dequant_rows(k_q, k_s, k_z, d, group, bits)], 2)
    v_all = torch.cat([vp.float(), dequant_rows(v_q, v_s, v_z, d, group, bits)], 2)
    empty_splits = 0

    for split in range(splits):  # blockIdx.x
        for bh in range(b_ * hkv_):  # blockIdx.y
            b, hkv = divmod(bh, hkv_)
            for rt in range(row_tiles):  # blockIdx.z
                row0 = rt * K_MAX_ROWS
                nrows = min(K_MAX_ROWS, gqa * tq_ - row0)
                length = p_ + (int(seq_lens[b]) if seq_lens is not None else s_)
                gr = row0 + torch.arange(nrows)
                hq, t = hkv * gqa + gr // tq_, gr % tq_
                orows = (b * hq_ + hq) * tq_ + t
                qs = qf[orows] * scale  # [nrows, D], pre-scaled like qs in shared memory
                at = length - tq_ + t  # the rows' logical positions
                visible = torch.minimum(torch.tensor(length), at + 1) if causal else torch.full((nrows,), length)
                first = (at - window + 1).clamp(min=0) if window > 0 else torch.zeros(nrows, dtype=torch.long)
                block_visible, block_first = int(visible.max()), min(int(first.min()), length)
                begin = block_first + split * split_len
                end = min(begin + split_len, block_visible)
                m = torch.full((nrows,), float("-inf"))
                l_ = torch.zeros(nrows)
                acc = torch.zeros(nrows, d)
                if begin >= end:
                    empty_splits += 1
                for t0 in range(begin, end, K_TILE):
                    # load_kv_tile: keys t0 .. t0 + 31, zeros at or past `end`
                    ks, vs = torch.zeros(K_TILE, d), torch.zeros(K_TILE, d)
                    stop = min(t0 + K_TILE, end)
                    ks[:stop - t0], vs[:stop - t0] = k_all[b, hkv, t0:stop], v_all[b, hkv, t0:stop]
                    n = min(K_TILE, end - t0)
                    pos = t0 + LANES
                    valid = (LANES < n)[None, :] & (pos[None, :] >= first[:, None]) & (pos[None, :] < visible[:, None])
                    s = torch.where(valid, _dot_f32(qs, ks), torch.tensor(float("-inf")))
                    m_new = torch.maximum(m, s.max(1).values)  # warp_max
                    live = m_new != float("-inf")  # the others `continue`: their state is untouched
                    if not live.any():
                        continue
                    alpha = torch.exp(m[live] - m_new[live])
                    pr = torch.exp(s[live] - m_new[live][:, None])
                    l_[live] = l_[live] * alpha + _warp_sum(pr)
                    m[live] = m_new[live]
                    a = acc[live] * alpha[:, None]
                    for j in range(n):
                        a = a + pr[:, j:j + 1] * vs[j]
                    acc[live] = a
                    assert not (a.isnan().any() or l_.isnan().any()), "NaN inside the online softmax"
                inv = torch.where(l_ > 0, 1.0 / l_, torch.zeros(()))
                part_o[split, orows] = acc * inv[:, None]
                part_lse[split, orows] = torch.where(l_ > 0, m + torch.log(l_), torch.tensor(float("-inf")))

    assert not part_o.isnan().any() and not part_lse.isnan().any(), "a (split, row) was never written"
    # combine_kernel
    mx = part_lse.max(0).values
    num, den = torch.zeros(rows_total, d), torch.zeros(rows_total)
    for split in range(splits):
        lse = part_lse[split]
        use = (mx != float("-inf")) & (lse != float("-inf"))
        w = torch.where(use, torch.exp(lse - torch.where(use, mx, torch.zeros(()))), torch.zeros(()))
        num = num + w[:, None] * part_o[split]
        den = den + w
    out = torch.where(den[:, None] > 0, num / den[:, None], torch.zeros(()))
    return out.view(q.shape).to(q.dtype), {"splits": splits, "split_len": split_len, "empty_splits": empty_splits}


def prefill_model(q, kp, vp, kq, vq, *, bits, group, scale=None, causal=True, seq_lens=None, window=0):
    """attention_prefill's tensor ops on the CPU: dequantize, cat, GQA repeat, mask, SDPA, zero blind rows."""
    b, hq, tq, d = q.shape
    hkv, p = kp.shape[1], kp.shape[2]
    s = kq[0].shape[2]
    k = torch.cat([kp, reference.kv_dequantize(*kq, bits, group, q.dtype)], 2).repeat_interleave(hq // hkv, 1)
    v = torch.cat([vp, reference.kv_dequantize(*vq, bits, group, q.dtype)], 2).repeat_interleave(hq // hkv, 1)
    lens = (torch.full((b,), s) if seq_lens is None else seq_lens.long()).view(b, 1, 1, 1) + p
    j = torch.arange(p + s).view(1, 1, 1, -1)
    allowed = j < lens
    at_pos = lens - tq + torch.arange(tq).view(1, 1, -1, 1)
    if causal:
        allowed = allowed & (j <= at_pos)
    if window > 0:
        allowed = allowed & (j > at_pos - window)
    allowed = allowed.expand(b, 1, tq, p + s)
    scale = d ** -0.5 if scale is None else scale
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    return out.masked_fill(allowed.logical_not().all(-1, True), 0), allowed


pytestmark = pytest.mark.usefixtures("one_thread")  # many tiny tensor ops
DECODE_CASES = [c for c in ATTENTION_CASES if c[2] <= K_FUSED_MAX_TQ and c[0] + c[1] > 0]
# SM counts: 1 (few splits), H200, and enough to give every tile its own split.
SMS = (1, 132, 100_000)


@pytest.mark.parametrize("p,s,tq,hq,hkv,d,causal,ragged,bits,group,dtype", DECODE_CASES)
def test_decode_model_matches_reference(gen, p, s, tq, hq, hkv, d, causal, ragged, bits, group, dtype):
    q, kp, vp, kq, vq, seq_lens = attention_inputs(p, s, tq, hq, hkv, d, ragged, bits, group, dtype, gen)
    kw = dict(bits=bits, group=group, causal=causal, seq_lens=seq_lens)
    want = reference.attention(q, kp, vp, *kq, *vq, kv_bits=bits, group_size=group, causal=causal, seq_lens=seq_lens)
    blind = ~reference.attention_mask(q.shape[0], tq, p, s, causal, seq_lens).any(-1)
    seen_splits = set()
    for sms in SMS:
        got, st = decode_model(q, kp, vp, kq, vq, sms=sms, **kw)
        seen_splits.add(st["splits"])
        torch.testing.assert_close(got.float(), want.float(), rtol=TOL[dtype], atol=TOL[dtype])
        assert bool((got[blind.unsqueeze(1).expand(-1, hq, -1)] == 0).all())
    assert max(seen_splits) == cdiv(p + s, K_TILE)  # the last SM count gives one split per tile


@pytest.mark.parametrize("p,s,tq,hq,hkv,d,causal,ragged,bits,group,dtype,window",
                         [c for c in WINDOW_CASES if c[2] <= K_FUSED_MAX_TQ])
def test_decode_model_sliding_window_matches_reference(gen, p, s, tq, hq, hkv, d, causal, ragged, bits, group, dtype,
                                                       window):
    """The window: each block splits only the keys its rows may see (from its first visible key), and
    masks keys before each row's first."""
    q, kp, vp, kq, vq, seq_lens = attention_inputs(p, s, tq, hq, hkv, d, ragged, bits, group, dtype, gen)
    kw = dict(bits=bits, group=group, causal=causal, seq_lens=seq_lens, window=window)
    want = reference.attention(q, kp, vp, *kq, *vq, kv_bits=bits, group_size=group, causal=causal, seq_lens=seq_lens,
                               window=window)
    for sms in SMS:
        got, st = decode_model(q, kp, vp, kq, vq, sms=sms, **kw)
        torch.testing.assert_close(got.float(), want.float(), rtol=TOL[dtype], atol=TOL[dtype])
        if 0 < window < p + s:  # the splits cover the window's keys, not the whole sequence
            assert st["splits"] <= cdiv(window + tq - 1, K_TILE)


def test_prefill_model_sliding_window(gen):
    q, kp, vp, kq, vq, seq_lens = attention_inputs(37, 40, 24, 4, 2, 64, True, 4, 32, torch.float32, gen)
    got, _ = prefill_model(q, kp, vp, kq, vq, bits=4, group=32, seq_lens=seq_lens, window=30)
    want = reference.attention(q, kp, vp, *kq, *vq, kv_bits=4, group_size=32, seq_lens=seq_lens, window=30)
    torch.testing.assert_close(got, want, rtol=TOL[torch.float32], atol=TOL[torch.float32])


def test_decode_model_edges(gen):
    """Splits that see no key (ragged lengths, causal rows before every key), a row tile boundary
    inside a GQA group, and the fp32 tolerance of the decode path against the CPU twin."""
    # Hq/Hkv = 6 and Tq = 3: 18 rows -> row tiles of 16 + 2, the second starting mid-group.
    q, kp, vp, kq, vq, _ = attention_inputs(3, 200, 3, 6, 1, 64, False, 4, 16, torch.float32, gen)
    seq_lens = torch.tensor([200, 2])  # batch 1: 5 keys, so most of its splits are empty
    want = reference.attention(q, kp, vp, *kq, *vq, kv_bits=4, group_size=16, seq_lens=seq_lens)
    got, st = decode_model(q, kp, vp, kq, vq, bits=4, group=16, seq_lens=seq_lens, sms=100_000)
    assert st["splits"] == 7 and st["empty_splits"] > 0
    torch.testing.assert_close(got, want, rtol=TOL[torch.float32], atol=TOL[torch.float32])
    cpu = ops.attention(q, kp, vp, *kq, *vq, kv_bits=4, group_size=16, seq_lens=seq_lens)
    torch.testing.assert_close(got, cpu, rtol=1e-5, atol=1e-5)
    # Tq > visible keys with causal masking: leading rows see nothing, their output is zero.
    q, kp, vp, kq, vq, _ = attention_inputs(0, 3, 8, 2, 2, 128, True, 8, -1, torch.float16, gen)
    got, _ = decode_model(q, kp, vp, kq, vq, bits=8, group=-1, seq_lens=torch.tensor([3, 0]), sms=100_000)
    want = reference.attention(q, kp, vp, *kq, *vq, kv_bits=8, seq_lens=torch.tensor([3, 0]))
    assert bool((got[:, :, :5] == 0).all()) and bool((got[1] == 0).all())
    torch.testing.assert_close(got.float(), want.float(), rtol=TOL[torch.float16], atol=TOL[torch.float16])


def test_decode_model_softmax_scale_vs_sdpa(gen):
    """test_attention_softmax_scale_and_dense_equivalence's case (atol 1e-5 vs CPU SDPA) through
    the decode model: the kernel's summation order must fit that tolerance too."""
    q, kp, vp, kq, vq, _ = attention_inputs(3, 20, 4, 4, 2, 64, False, 8, -1, torch.float32, gen)
    k = torch.cat([kp, reference.kv_dequantize(*kq, 8)], 2).repeat_interleave(2, 1)
    v = torch.cat([vp, reference.kv_dequantize(*vq, 8)], 2).repeat_interleave(2, 1)
    mask = reference.attention_mask(2, 4, 3, 20, True).unsqueeze(1)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    for sms in (1, 100_000):
        got, _ = decode_model(q, kp, vp, kq, vq, bits=8, group=-1, scale=0.3, sms=sms)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_dequant8_bit_reads_match_reference_unpack(gen, bits):
    """dequant8's vector reads (uint2 / uint32, little-endian) and INT3 byte reads give the codes
    the reference packs, and every vector load is aligned for all head dims the kernel takes."""
    for d in (64, 128, 256):
        codes = torch.randint(0, 1 << bits, (5, d), generator=gen)
        x = codes.float()  # integer values in [0, 2^b - 1]: kv_quantize keeps them as codes
        x[:, 0], x[:, 1] = 0, (1 << bits) - 1  # pin the range so scale = 1, zero = 0
        packed, s, z = reference.kv_quantize(x, bits)
        assert torch.equal(s, torch.ones_like(s)) and torch.equal(z, torch.zeros_like(z))
        got = torch.cat([dequant8_codes(packed, d0, bits) for d0 in range(0, d, 8)], -1)
        assert torch.equal(got, x.long())
        row_bytes = reference.kv_row_bytes(d, bits)
        if bits != 3:
            load = 8 if bits == 8 else 4
            offsets = [r * row_bytes + (d0 if bits == 8 else d0 // 2) for r in range(3) for d0 in range(0, d, 8)]
            assert all(o % load == 0 for o in offsets)


def test_launch_shapes_and_shared_memory():
    """Split choice for the bench and test shapes: whole tiles, no split past the keys, grid and
    shared memory within the limits attention.cu relies on."""
    for b, hq, hkv, tq, p, s in [(1, 32, 8, 1, 256, 32768 - 256), (16, 32, 8, 1, 256, 1024 - 256),
                                 (2, 8, 2, 16, 37, 255), (1, 4, 4, 1, 1, 0), (2, 64, 1, 16, 0, 5)]:
        for sms in SMS:
            splits, split_len, row_tiles, _ = launch_shape(b, hq, hkv, tq, p, s, sms)
            total = p + s
            assert split_len % K_TILE == 0 and 1 <= splits <= K_MAX_SPLITS
            assert splits * split_len >= total > (splits - 1) * split_len
            assert row_tiles * K_MAX_ROWS >= (hq // hkv) * tq and row_tiles <= K_MAX_GRID_YZ
            assert b * hkv <= K_MAX_GRID_YZ
    smem = {d: decode_smem_bytes(d) for d in (64, 128, 256)}
    assert smem[64] <= K_SMEM_NO_OPT_IN and smem[128] <= K_SMEM_NO_OPT_IN  # no opt-in needed
    assert K_SMEM_NO_OPT_IN < smem[256] <= K_MAX_SMEM_OPT_IN  # opt-in (cudaFuncSetAttribute); fits every sm_80+ part


@pytest.mark.parametrize("p,s,tq,causal,ragged,dtype", [
    (1, 37, 64, True, True, torch.float32), (1, 1, 64, True, False, torch.float32),
    (0, 40, 20, False, True, torch.float32), (5, 30, 17, True, True, torch.bfloat16)])
def test_prefill_model_mask_and_blind_rows(gen, p, s, tq, causal, ragged, dtype):
    """attention_prefill's mask equals reference.attention_mask, and SDPA + masked_fill gives the
    reference (blind rows zero, no NaN)."""
    q, kp, vp, kq, vq, seq_lens = attention_inputs(p, s, tq, 4, 2, 64, ragged, 4, -1, dtype, gen)
    got, allowed = prefill_model(q, kp, vp, kq, vq, bits=4, group=-1, causal=causal, seq_lens=seq_lens)
    want_mask = reference.attention_mask(2, tq, p, s, causal, seq_lens).unsqueeze(1)
    assert torch.equal(allowed, want_mask)
    want = reference.attention(q, kp, vp, *kq, *vq, kv_bits=4, causal=causal, seq_lens=seq_lens)
    assert not got.isnan().any()
    # prefill rounds dequantized K/V to q's dtype before SDPA, like an fp16 cache would
    tol = {torch.float32: 2e-5, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


def test_decode_model_error_stats(gen):
    """Measured, not asserted beyond TOL: the model's max error vs the float64 reference over the
    decode cases is well inside TOL (printed with -s for the report)."""
    worst = {}
    for case in DECODE_CASES:
        p, s, tq, hq, hkv, d, causal, ragged, bits, group, dtype = case
        if dtype != torch.float32:
            continue
        q, kp, vp, kq, vq, seq_lens = attention_inputs(p, s, tq, hq, hkv, d, ragged, bits, group, dtype, gen)
        want = reference.attention(q, kp, vp, *kq, *vq, kv_bits=bits, group_size=group, causal=causal,
                                   seq_lens=seq_lens)
        got, _ = decode_model(q, kp, vp, kq, vq, bits=bits, group=group, causal=causal, seq_lens=seq_lens, sms=132)
        worst[case[:6]] = (got - want).abs().max().item()
    print("decode model max abs error vs reference (fp32):", {k: f"{v:.1e}" for k, v in worst.items()})
    assert max(worst.values()) < TOL[torch.float32] / 4
    assert math.isfinite(max(worst.values()))
