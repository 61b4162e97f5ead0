"""CPU-runnable models of the CUDA GEMM kernel (csrc/cuda/gemm_kernel.cuh, gemm_ptx.cuh, gemm.cu).

No GPU needed: they check the kernel's layout and bookkeeping logic against the PTX ISA semantics
and the CPU twin, so CI guards what only a GPU run would otherwise catch. The kernel itself is
checked on a GPU by the CUDA cases of test_gemm.py.
"""
import numpy as np
import pytest
import torch

import _kernel_constants as kc
from _helpers import make_gemm_case
from bisup import ops, reference

# The kernel's sizes, read from its sources (fails at import if one is missing).
_SOURCES = ("pack_format.h", "cuda/cuda_utils.cuh", "cuda/gemm_kernel.cuh")
(TILE_BYTES, TILE_K, INT3_TILE_BYTES, INT3_TILE_CHUNKS, INT3_BLOCK_VALUES, INT3_BLOCK_BYTES,
 MAX_GRID_YZ) = kc.require(kc.constants(*_SOURCES), "kTileBytes", "kTileK", "kInt3TileBytes", "kInt3TileChunks",
                           "kInt3BlockValues", "kInt3BlockBytes", "kMaxGridYZ", source=", ".join(_SOURCES))
TILE_CONFIGS = kc.tile_configs("cuda/gemm.cu")  # name -> (BM, BN, WARPS_M, WARPS_N, STAGES)
CHUNK = 16  # bytes per cp.async / per ldmatrix row (PTX)


# ------------------------------------------------------------------------------------------------
# A bit-level model of the CUDA INT8-unpack path (csrc/cuda/gemm_ptx.cuh), runnable without a GPU:
# per lane it takes the bytes ldmatrix / 32-bit loads deliver, applies the same unpack formulas,
# places the bytes where the mma.m16n8k32 fragment layout says they belong and checks that the
# product is 256 (W4) or 512 (W3) times the true INT dot. Guards the layout reasoning and the
# INT3 format against drifting apart; the kernel itself is checked by the CUDA cases of test_gemm.py.
# ------------------------------------------------------------------------------------------------
def _s8(x):
    x &= 0xFF
    return x - 256 if x >= 128 else x


def _bytes(u):
    return [_s8(u >> (8 * j)) for j in range(4)]


def _u32(row, off):
    return int.from_bytes(bytes(row[off : off + 4]), "little")


def _prmt(x, y, sel):
    """PTX prmt.b32 (default mode) / __byte_perm: byte i of the result is byte (sel >> 4i) & 7 of
    {y, x}; if bit 3 of that selector nibble is set, the chosen byte's sign bit replicated instead.
    Works on Python ints and numpy uint32 arrays."""
    src = [(x >> (8 * j)) & 0xFF for j in range(4)] + [(y >> (8 * j)) & 0xFF for j in range(4)]
    out = 0
    for i in range(4):
        nib = (sel >> (4 * i)) & 0xF
        byte = src[nib & 7]
        if nib & 8:
            byte = ((byte >> 7) & 1) * 0xFF
        out = out | (byte << (8 * i))
    return out


def _even_x16(p):  # gemm_ptx.cuh int4_even_x16
    return (p << 4) & 0xF0F0F0F0


def _odd_x16(p):  # gemm_ptx.cuh int4_odd_x16
    return p & 0xF0F0F0F0


def _int3_quad(lo, hi, s):  # gemm_ptx.cuh int3_quad_x32: pack_format.h int3_quad << 5
    return ((((lo >> (2 * (s & 3))) & 0x03030303) << 5) | (((hi >> s) & 0x01010101) << 7)) & 0xFFFFFFFF


@pytest.mark.parametrize("w_bits", [4, 3])
def test_int8_unpack_fragment_model(gen, w_bits):
    even, odd = _even_x16, _odd_x16
    qa = torch.randint(-8, 8, (16, 32), generator=gen, dtype=torch.int8)
    qw = torch.randint(-(1 << (w_bits - 1)), 1 << (w_bits - 1), (8, 32), generator=gen, dtype=torch.int8)
    pa = reference.pack_int4(qa).tolist()
    pw = (reference.pack_int4(qw) if w_bits == 4 else reference.pack_int3(qw)).tolist()
    a_tile = torch.zeros(16, 32, dtype=torch.int64)
    b_tile = torch.zeros(32, 8, dtype=torch.int64)
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        pg, pg8 = _u32(pa[g], 4 * t), _u32(pa[g + 8], 4 * t)  # ldmatrix: bytes 4t..4t+3 of rows g, g+8
        a = [even(pg), even(pg8), odd(pg), odd(pg8)]
        if w_bits == 4:
            pb = _u32(pw[g], 4 * t)
            b = [even(pb), odd(pb)]
        else:
            lo, hi = _u32(pw[g], 4 * (t >> 1)), _u32(pw[g], 8)
            q0, q1 = _int3_quad(lo, hi, 2 * t), _int3_quad(lo, hi, 2 * t + 1)
            b = [_prmt(q0, q1, 0x6420), _prmt(q0, q1, 0x7531)]
        for j in range(4):  # mma.m16n8k32 .s8 fragment positions
            a_tile[g, 4 * t + j], a_tile[g + 8, 4 * t + j] = _bytes(a[0])[j], _bytes(a[1])[j]
            a_tile[g, 16 + 4 * t + j], a_tile[g + 8, 16 + 4 * t + j] = _bytes(a[2])[j], _bytes(a[3])[j]
            b_tile[4 * t + j, g], b_tile[16 + 4 * t + j, g] = _bytes(b[0])[j], _bytes(b[1])[j]
    factor = 256 if w_bits == 4 else 512
    assert torch.equal(a_tile @ b_tile, factor * (qa.long() @ qw.long().T))


# ------------------------------------------------------------------------------------------------
# A lane-level emulator of the whole CUDA kernel (csrc/cuda/gemm_kernel.cuh and the launch in
# csrc/cuda/gemm.cu), runnable without a GPU. The PTX instructions are modelled from the PTX ISA
# definitions, independently of the kernel's own comments: the mma.m16n8k32 .s8 / m16n8k64 .s4
# fragment tables (element i of a lane -> matrix row / column), ldmatrix .x4 (lanes 8i..8i+7 give
# the row addresses of matrix i; lane 4g+t receives bytes 4t..4t+3 of row g), cp.async with
# src-size zero fill, commit_group / wait_group N counting (copies land only when a wait retires
# their group; reading bytes with a copy in flight fails), prmt. The kernel's index math is
# transcribed line by line: swizzle, ldmatrix addresses, the pairing of n8 tiles, the INT4 / INT3
# unpacks, the group-fold schedule, scale indexing and clamping, tails, epilogue, and the host's
# M slicing. Shared memory starts as garbage and the output as NaN, every global access is
# bounds-checked, every output must be written exactly once, and the result must equal the CPU
# twin bit for bit. Tile configs, tile sizes and byte counts are read from the kernel sources
# (_kernel_constants); keep the transcribed logic in step with the kernel when the kernel changes.
# ------------------------------------------------------------------------------------------------


def _mma_maps(kind):
    """PTX ISA fragment tables. Returns (a_row, a_col, b_k, b_n, c_row, c_col) as [32, elements]
    arrays (element e of a lane sits in register e // (32 / bits) at bit (e % (32 / bits)) * bits)."""
    lane = np.arange(32)[:, None]
    g, t = lane >> 2, lane & 3
    if kind == "s8":  # mma.m16n8k32.row.col.s32.s8.s8.s32
        i = np.arange(16)[None, :]
        a_row = np.where((i < 4) | ((8 <= i) & (i < 12)), g, g + 8)
        a_col = t * 4 + (i & 3) + 16 * (i >= 8)
        j = np.arange(8)[None, :]
        b_k = t * 4 + (j & 3) + 16 * (j >= 4)
    else:  # mma.m16n8k64.row.col.s32.s4.s4.s32
        i = np.arange(32)[None, :]
        a_row = np.where((i < 8) | ((16 <= i) & (i < 24)), g, g + 8)
        a_col = t * 8 + (i & 7) + 32 * (i >= 16)
        j = np.arange(16)[None, :]
        b_k = t * 8 + (j & 7) + 32 * (j >= 8)
    b_n = np.broadcast_to(g, b_k.shape)
    c = np.arange(4)[None, :]
    return a_row, a_col, b_k, b_n, np.where(c < 2, g, g + 8), t * 2 + (c & 1)


_MMA = {kind: _mma_maps(kind) for kind in ("s8", "s4")}
_MMA_BITS, _MMA_K = {"s8": 8, "s4": 4}, {"s8": 32, "s4": 64}


def _elements(regs, bits):
    """Signed elements of [32, R] uint32 registers, element e in register e // (32 / bits)."""
    per = 32 // bits
    e = np.arange(regs.shape[1] * per)
    v = (regs[:, e // per].astype(np.int64) >> ((e % per) * bits)) & ((1 << bits) - 1)
    return np.where(v >= 1 << (bits - 1), v - (1 << bits), v)


def _mma(c, a, b, kind):
    """c [32, 4] int64 += A * B, from per-lane registers a [32, 4] and b [32, 2] (uint32)."""
    a_row, a_col, b_k, b_n, c_row, c_col = _MMA[kind]
    bits, k = _MMA_BITS[kind], _MMA_K[kind]
    am = np.zeros((16, k), np.int64)
    bm = np.zeros((k, 8), np.int64)
    am[a_row, a_col] = _elements(a, bits)
    bm[b_k, b_n] = _elements(b, bits)
    c += (am @ bm)[c_row, c_col]
    assert np.abs(c).max() < 2**31, "int32 accumulator overflow"


def _int3_lane_x32(low, high, t):  # gemm_ptx.cuh int3_lane_x32
    q0, q1 = _int3_quad(low, high, 2 * t), _int3_quad(low, high, 2 * t + 1)
    return _prmt(q0, q1, 0x6420), _prmt(q0, q1, 0x7531)


class _Ptr:
    """A typed global pointer: a flat numpy array and an element offset; reads are bounds-checked."""

    def __init__(self, arr, off=0):
        self.arr, self.off = arr, off

    def __add__(self, d):
        return _Ptr(self.arr, self.off + d)

    def index(self, i):
        i = self.off + np.asarray(i)
        assert (i >= 0).all() and (i < len(self.arr)).all(), "global access out of bounds"
        return i

    def __getitem__(self, i):
        return self.arr[self.index(i)]


class _Smem:
    """Dynamic shared memory with cp.async groups: copies land when wait_group retires them."""

    def __init__(self, nbytes, rng):
        self.mem = rng.integers(0, 256, nbytes, dtype=np.uint8)  # garbage, as on the device
        self.inflight = np.zeros(nbytes, np.int32)
        self.open, self.groups = [], []

    def cp_async16(self, dst, src, src_bytes):  # cp.async.cg.shared.global [dst], [src], 16, src_bytes
        assert dst % CHUNK == 0 and src.off % CHUNK == 0, "cp.async needs 16-byte aligned addresses"
        data = np.zeros(CHUNK, np.uint8)
        if src_bytes:
            data[:src_bytes] = src[np.arange(src_bytes)]
        self.open.append((dst, data))
        self.inflight[dst : dst + CHUNK] += 1

    def commit(self):
        self.groups.append(self.open)
        self.open = []

    def wait(self, pending):
        while len(self.groups) > pending:
            for dst, data in self.groups.pop(0):
                self.mem[dst : dst + CHUNK] = data
                self.inflight[dst : dst + CHUNK] -= 1

    def _check(self, addrs, width):
        assert (addrs % width == 0).all(), "misaligned shared load"
        assert (addrs >= 0).all() and (addrs + width <= len(self.mem)).all(), "shared load out of bounds"
        span = addrs[:, None] + np.arange(width)
        assert not self.inflight[span].any(), "read of shared bytes whose cp.async has not been waited for"

    def ld32(self, addrs):
        self._check(addrs, 4)
        b = self.mem[addrs[:, None] + np.arange(4)].astype(np.uint32)
        return b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16) | (b[:, 3] << 24)

    def ldmatrix_x4(self, addrs):  # ldmatrix.sync.aligned.m8n8.x4.shared.b16, addrs: [32] per lane
        self._check(addrs, 16)
        for i in range(4):  # each matrix's 8 rows in 8 distinct 16-byte bank groups: conflict-free
            assert len(set((addrs[8 * i : 8 * i + 8] // 16) % 8)) == 8, "ldmatrix bank conflict"
        lane = np.arange(32)
        g, t = lane >> 2, lane & 3
        return np.stack([self.ld32(addrs[8 * i + g] + 4 * t) for i in range(4)], axis=1)


def _swizzle(row, chunk):  # gemm_kernel.cuh swizzle
    return row * TILE_BYTES + ((chunk ^ ((row >> 1) & 3)) << 4)


def _load_rows64(sm, dst, src, row0, rows_total, row_bytes, byte0, rows):
    for c in range(rows * 4):
        row, chunk = c >> 2, c & 3
        gr, gb = row0 + row, byte0 + CHUNK * chunk
        ok = gr < rows_total and gb < row_bytes
        sm.cp_async16(dst + _swizzle(row, chunk), src + (gr * row_bytes + gb) if ok else src, CHUNK if ok else 0)


def _load_rows48(sm, dst, src, row0, rows_total, row_bytes, byte0, rows):
    for c in range(rows * INT3_TILE_CHUNKS):
        row, chunk = c // INT3_TILE_CHUNKS, c % INT3_TILE_CHUNKS
        gr = row0 + row
        ok = gr < rows_total
        sm.cp_async16(dst + row * INT3_TILE_BYTES + CHUNK * chunk,
                      src + (gr * row_bytes + byte0 + CHUNK * chunk) if ok else src, CHUNK if ok else 0)


def _emulate_cta(cfg, path, w_bits, p, bx, by, rng):
    """One CTA of gemm_kernel<Cfg, path, w_bits>, all warps; writes p['out'] (float32 values)."""
    bm, bn, warps_m, warps_n, stages = cfg
    wm, wn = bm // warps_m, bn // warps_n
    mt, nt = wm // 16, wn // 8
    stage_bytes = (bm + bn) * TILE_BYTES
    unpack_scale = np.float32(1.0 if path == "s4" else (1 / 256 if w_bits == 4 else 1 / 512))
    lane = np.arange(32)
    g, t = lane >> 2, lane & 3
    m, n, k, group, groups, ko = (p[x] for x in ("m", "n", "k", "group", "groups", "ko"))
    m0, n0 = by * bm, bx * bn
    a_row_bytes = k // 2
    w_row_bytes = k // 2 if w_bits == 4 else k // INT3_BLOCK_VALUES * INT3_BLOCK_BYTES
    tiles_main = -(-k // TILE_K)
    tiles_total = tiles_main + -(-ko // TILE_BYTES)
    sm = _Smem(stages * stage_bytes, rng)

    def load_tile(stage, tile):
        as_ = stage * stage_bytes
        ws = as_ + bm * TILE_BYTES
        if tile < tiles_main:
            _load_rows64(sm, as_, p["a"], m0, m, a_row_bytes, tile * TILE_BYTES, bm)
            if w_bits == 4:
                _load_rows64(sm, ws, p["w"], n0, n, w_row_bytes, tile * TILE_BYTES, bn)
            else:
                _load_rows48(sm, ws, p["w"], n0, n, w_row_bytes, tile * INT3_TILE_BYTES, bn)
        else:
            byte0 = (tile - tiles_main) * TILE_BYTES
            _load_rows64(sm, as_, p["ao"], m0, m, ko, byte0, bm)
            _load_rows64(sm, ws, p["wo"], n0, n, ko, byte0, bn)

    class Warp:
        def __init__(self, warp):
            self.wm0, self.wn0 = (warp // warps_n) * wm, (warp % warps_n) * wn
            self.acc_i = np.zeros((mt, nt, 32, 4), np.int64)
            self.acc_f = np.zeros((mt, nt, 32, 4), np.float32)
            self.next_group = 0
            self.prefetch_scales(0)

        def row_of(self, i, h):
            return m0 + self.wm0 + i * 16 + g + 8 * h

        def col_of(self, j, c):
            return n0 + self.wn0 + j * 8 + 2 * t + c

        def prefetch_scales(self, grp):
            self.sa_next = [[p["sa"][np.minimum(self.row_of(i, h), m - 1) * groups + grp] for h in range(2)] for i in range(mt)]
            self.sw_next = [[p["sw"][np.minimum(self.col_of(j, c), n - 1) * groups + grp] for c in range(2)] for j in range(nt)]

        def maybe_fold(self, k_end):
            if k_end % group != 0 or k_end > k:
                return
            for i in range(mt):
                for j in range(nt):
                    for r in range(4):
                        sa_f = self.sa_next[i][r >> 1].astype(np.float32) * unpack_scale
                        s = sa_f * self.sw_next[j][r & 1].astype(np.float32)  # gemm_scale_product
                        prod = self.acc_i[i, j, :, r].astype(np.float32) * s  # gemm_accumulate: two roundings
                        self.acc_f[i, j, :, r] = self.acc_f[i, j, :, r] + prod
                        self.acc_i[i, j, :, r] = 0
            self.next_group += 1
            if self.next_group < groups:
                self.prefetch_scales(self.next_group)

        def compute_tile(self, stage, tile):
            as_ = stage * stage_bytes
            ws = as_ + bm * TILE_BYTES
            main = tile < tiles_main
            for kc in range(2):
                a = []
                for i in range(mt):
                    row = self.wm0 + i * 16 + (lane & 7) + ((lane >> 3) & 1) * 8
                    a.append(sm.ldmatrix_x4(as_ + _swizzle(row, 2 * kc + (lane >> 4))))
                b = [[None, None] for _ in range(nt)]
                if w_bits == 4 or not main:
                    for j in range(0, nt, 2):
                        row = self.wn0 + j * 8 + (lane & 7) + (lane >> 4) * 8
                        r = sm.ldmatrix_x4(ws + _swizzle(row, 2 * kc + ((lane >> 3) & 1)))
                        b[j][0], b[j][1], b[j + 1][0], b[j + 1][1] = r[:, 0], r[:, 1], r[:, 2], r[:, 3]
                if not main:
                    for i in range(mt):
                        for j in range(nt):
                            _mma(self.acc_i[i, j], a[i], np.stack(b[j], axis=1), "s8")
                    continue
                k_chunk0 = tile * TILE_K + kc * 64
                if path == "s4":
                    for i in range(mt):
                        for j in range(nt):
                            _mma(self.acc_i[i, j], a[i], np.stack(b[j], axis=1), "s4")
                    self.maybe_fold(k_chunk0 + 64)
                    continue
                for step in range(2):
                    a8 = [
                        np.stack([_even_x16(a[i][:, 2 * step]), _even_x16(a[i][:, 2 * step + 1]),
                                  _odd_x16(a[i][:, 2 * step]), _odd_x16(a[i][:, 2 * step + 1])], axis=1)
                        for i in range(mt)
                    ]
                    b8 = []
                    for j in range(nt):
                        if w_bits == 4:
                            b8.append(np.stack([_even_x16(b[j][step]), _odd_x16(b[j][step])], axis=1))
                        else:
                            blk = ws + (self.wn0 + j * 8 + g) * INT3_TILE_BYTES + (2 * kc + step) * INT3_BLOCK_BYTES
                            even, odd = _int3_lane_x32(sm.ld32(blk + 4 * (t >> 1)), sm.ld32(blk + 8), t)
                            b8.append(np.stack([even, odd], axis=1))
                    for i in range(mt):
                        for j in range(nt):
                            _mma(self.acc_i[i, j], a8[i], b8[j], "s8")
                    self.maybe_fold(k_chunk0 + 32 * (step + 1))

        def epilogue(self):
            out = p["out"]
            for i in range(mt):
                for j in range(nt):
                    for r in range(4):
                        row, col = self.row_of(i, r >> 1), self.col_of(j, r & 1)
                        ok = (row < m) & (col < n)
                        y = self.acc_f[i, j, :, r].copy()
                        if ko > 0:
                            so_m = p["sao"][np.minimum(row, m - 1)].astype(np.float32)
                            so_n = p["swo"][np.minimum(col, n - 1)].astype(np.float32)
                            y = y + self.acc_i[i, j, :, r].astype(np.float32) * (so_m * so_n)
                        if p["bias"] is not None:
                            y = y + p["bias"][np.where(ok, col, 0)]
                        idx = out.index((row * n + col)[ok])
                        out.arr[idx] = p["convert"](y[ok])
                        p["written"][idx] += 1

    warps = [Warp(w) for w in range(warps_m * warps_n)]
    for s in range(stages - 1):
        if s < tiles_total:
            load_tile(s, s)
        sm.commit()
    for tile in range(tiles_total):
        sm.wait(stages - 2)
        # __syncthreads(): every warp finished tile - 1 before the next copies are issued
        ahead = tile + stages - 1
        if ahead < tiles_total:
            load_tile(ahead % stages, ahead)
        sm.commit()
        for w in warps:
            w.compute_tile(tile % stages, tile)
    sm.wait(0)
    for w in warps:
        w.epilogue()


def _emulate_gemm(cfg, path, w_bits, args, kw, rows_per_launch=None):
    """gemm_cuda's launch (M sliced into launches of at most MAX_GRID_YZ M tiles) over emulated CTAs."""
    m, k = args["a_q"].shape[0], args["a_q"].shape[1] * 2
    n = args["w_q"].shape[0]
    group = k if kw["group_size"] == -1 else kw["group_size"]
    ko = kw["a_outlier"].shape[1] if "a_outlier" in kw else 0
    flat = lambda x: _Ptr(x.contiguous().view(-1).numpy())  # noqa: E731
    dtype = kw.get("out_dtype", torch.float16)
    convert = {
        torch.float32: lambda y: y,
        torch.float16: lambda y: y.astype(np.float16).astype(np.float32),
        torch.bfloat16: lambda y: torch.from_numpy(y).to(torch.bfloat16).float().numpy(),
    }[dtype]
    out = np.full(m * n, np.nan, np.float32)
    written = np.zeros(m * n, np.int32)
    p = dict(m=m, n=n, k=k, group=group, groups=k // group, ko=ko, a=flat(args["a_q"]), w=flat(args["w_q"]),
             sa=flat(args["a_scale"]), sw=flat(args["w_scale"]), out=_Ptr(out), written=written, convert=convert,
             bias=flat(kw["bias"].float()) if "bias" in kw else None)
    if ko:
        p.update(ao=flat(kw["a_outlier"].view(torch.uint8)), wo=flat(kw["w_outlier"].view(torch.uint8)),
                 sao=flat(kw["a_outlier_scale"]), swo=flat(kw["w_outlier_scale"]))
    bm, bn = cfg[0], cfg[1]
    rows_per_launch = rows_per_launch or MAX_GRID_YZ * bm
    rng = np.random.default_rng(0)
    for r0 in range(0, m, rows_per_launch):
        q = dict(p, m=min(m - r0, rows_per_launch), a=p["a"] + r0 * (k // 2), sa=p["sa"] + r0 * p["groups"],
                 out=p["out"] + r0 * n)
        if ko:
            q.update(ao=p["ao"] + r0 * ko, sao=p["sao"] + r0)
        assert -(-q["m"] // bm) <= MAX_GRID_YZ, "gridDim.y limit"
        for by in range(-(-q["m"] // bm)):
            for bx in range(-(-n // bn)):
                _emulate_cta(cfg, path, w_bits, q, bx, by, rng)
    assert (written == 1).all(), "every output must be written exactly once"
    return torch.from_numpy(out.reshape(m, n))


def test_mma_fragment_tables_are_bijections():
    for kind in ("s8", "s4"):
        a_row, a_col, b_k, b_n, c_row, c_col = _MMA[kind]
        k = _MMA_K[kind]
        assert len(set(zip(a_row.ravel(), a_col.ravel()))) == 16 * k == a_row.size
        assert len(set(zip(b_k.ravel(), b_n.ravel()))) == k * 8 == b_k.size
        assert len(set(zip(c_row.ravel(), c_col.ravel()))) == 16 * 8 == c_row.size


# (tile config, MMA path, M, N, K, group_size, w_bits, a_bits, Ko, bias, out dtype, rows per launch)
EMULATED = [
    ("SmallTile", "s4", 9, 40, 192, 64, 4, 4, 16, True, torch.float16, None),  # K tail in the K tile, N tail
    ("SmallTile", "s8", 9, 40, 192, 64, 4, 4, 16, True, torch.float16, None),
    ("SmallTile", "s8", 16, 24, 256, 32, 3, 3, 0, False, torch.bfloat16, None),  # W3, 4 groups per K tile
    ("SmallTile", "s8", 40, 32, 128, -1, 4, 3, 80, True, torch.float32, 16),  # sliced M: 3 launches; Ko tail
    ("MediumTile", "s4", 70, 72, 512, 256, 4, 4, 0, True, torch.float32, None),  # group spans 2 K tiles
    ("MediumTile", "s8", 70, 72, 512, 256, 3, 4, 48, False, torch.float16, None),
    ("LargeTile", "s8", 100, 136, 256, 128, 3, 3, 16, True, torch.bfloat16, None),
    ("LargeTile", "s4", 100, 136, 256, 128, 4, 4, 16, True, torch.float32, None),
]


def test_emulated_cases_cover_the_kernel_edges():
    """With the tile sizes read from the sources, EMULATED still covers every tile config of
    gemm.cu, K / N / outlier tails, groups smaller and larger than a K tile, W3 and M slicing."""
    assert {c[0] for c in EMULATED} == set(TILE_CONFIGS)
    assert any(c[4] % TILE_K for c in EMULATED)  # K tail inside the last K tile
    assert any(c[3] % TILE_CONFIGS[c[0]][1] for c in EMULATED)  # N tail
    assert any(c[8] % TILE_BYTES for c in EMULATED if c[8])  # outlier tail
    groups = [(c[4] if c[5] == -1 else c[5], c[6]) for c in EMULATED]
    assert any(g < TILE_K and w == 3 for g, w in groups) and any(g > TILE_K for g, _ in groups)
    assert any(c[11] for c in EMULATED)  # M sliced into several launches


def test_kernel_constants_fail_loudly(monkeypatch):
    monkeypatch.setattr(kc, "read_source", lambda rel: "constexpr int kTileK = kUnknown * 2;\n")
    with pytest.raises(kc.KernelConstantError, match="kTileK"):
        kc.require(kc.constants("cuda/gemm_kernel.cuh"), "kTileK", source="cuda/gemm_kernel.cuh")
    with pytest.raises(kc.KernelConstantError, match="TileConfig"):
        kc.tile_configs("cuda/gemm.cu")


@pytest.mark.parametrize("case", EMULATED, ids=lambda c: "{}-{}-M{}-N{}-K{}-g{}-w{}a{}-o{}-b{}-{}-r{}".format(*c))
def test_kernel_emulation_matches_cpu_twin(gen, case):
    cfg_name, path, m, n, k, group_size, w_bits, a_bits, ko, bias, out_dtype, rows_per_launch = case
    _, _, args, kw = make_gemm_case(m, n, k, group_size, w_bits, a_bits, ko, bias, gen)
    kw["out_dtype"] = out_dtype
    assert path == "s8" or (w_bits == 4 and (k if group_size == -1 else group_size) % 64 == 0)  # choose_s4
    y_emu = _emulate_gemm(TILE_CONFIGS[cfg_name], path, w_bits, args, kw, rows_per_launch)
    y_cpu = ops.gemm(**args, **kw).float()
    assert torch.equal(y_emu, y_cpu), f"max diff {(y_emu - y_cpu).abs().max():.3g}"
