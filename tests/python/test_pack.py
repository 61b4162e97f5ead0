"""INT4 / INT3 packing: CPU and CUDA against the reference, exact round trips, errors."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bisup import ops
from bisup import reference as ref

SHAPES = [(1, 32), (3, 64), (17, 96), (2, 5, 128), (129, 32)]


def random_codes(shape, bits, is_signed, gen):
    lo, hi = (-(1 << (bits - 1)), 1 << (bits - 1)) if is_signed else (0, 1 << bits)
    return torch.randint(lo, hi, shape, generator=gen, dtype=torch.int8)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("is_signed", [True, False])
@pytest.mark.parametrize("bits", [4, 3])
def test_pack_matches_reference(device, gen, shape, is_signed, bits):
    pack, unpack = (ops.pack_int4, ops.unpack_int4) if bits == 4 else (ops.pack_int3, ops.unpack_int3)
    rpack = ref.pack_int4 if bits == 4 else ref.pack_int3
    q = random_codes(shape, bits, is_signed, gen)
    q[0, ..., :8] = 0  # a zero run
    expected = rpack(q, is_signed)
    packed = pack(q.to(device), is_signed)
    assert packed.dtype == torch.uint8 and packed.device.type == device.type
    assert torch.equal(packed.cpu(), expected)
    assert torch.equal(unpack(packed, is_signed).cpu(), q)


@pytest.mark.parametrize("bits", [4, 3])
def test_extreme_values_round_trip(device, bits):
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    q = torch.tensor([[lo, hi] * 16, [hi, lo] * 16], dtype=torch.int8)
    pack, unpack = (ops.pack_int4, ops.unpack_int4) if bits == 4 else (ops.pack_int3, ops.unpack_int3)
    assert torch.equal(unpack(pack(q.to(device))).cpu(), q)


def test_int4_nibble_order():
    # element 0 -> low nibble, element 1 -> high nibble (docs/formats.md)
    q = torch.tensor([1, -1, -8, 7], dtype=torch.int8)
    assert ops.pack_int4(q).tolist() == [0xF1, 0x78]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: ops.pack_int4(torch.zeros(4, dtype=torch.int32)), "dtype"),
        (lambda: ops.pack_int4(torch.zeros(3, dtype=torch.int8)), "even"),
        (lambda: ops.pack_int4(torch.tensor([8, 0], dtype=torch.int8)), r"\[-8, 7\]"),
        (lambda: ops.pack_int4(torch.tensor([-1, 0], dtype=torch.int8), False), r"\[0, 15\]"),
        (lambda: ops.pack_int4(torch.zeros(4, 4, dtype=torch.int8).t()), "contiguous"),
        (lambda: ops.pack_int3(torch.zeros(2, 48, dtype=torch.int8)), "multiple of 32"),
        (lambda: ops.pack_int3(torch.full((32,), 4, dtype=torch.int8)), r"\[-4, 3\]"),
        (lambda: ops.unpack_int3(torch.zeros(2, 10, dtype=torch.uint8)), "multiple of 12"),
        (lambda: ops.unpack_int4(torch.zeros(4, dtype=torch.int8)), "dtype"),
    ],
)
def test_pack_errors(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


def test_unpack_int3_cuda_rejects_misaligned_view(gen):
    if not torch.cuda.is_available() or not ops.has_cuda_kernels():
        pytest.skip("needs a CUDA GPU")
    packed = ref.pack_int3(random_codes((2, 32), 3, True, gen)).cuda()
    view = torch.cat([torch.zeros(1, dtype=torch.uint8, device="cuda"), packed.view(-1)])[1:].view(2, 12)
    with pytest.raises(RuntimeError, match="4-byte aligned"):
        ops.unpack_int3(view)
    assert torch.equal(ops.unpack_int3(view.clone()).cpu(), ref.unpack_int3(packed.cpu()))


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 5),
    blocks=st.integers(1, 4),
    is_signed=st.booleans(),
    bits=st.sampled_from([3, 4]),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_fuzz(rows, blocks, is_signed, bits, seed):
    g = torch.Generator().manual_seed(seed)
    q = random_codes((rows, 32 * blocks), bits, is_signed, g)
    pack, unpack = (ops.pack_int4, ops.unpack_int4) if bits == 4 else (ops.pack_int3, ops.unpack_int3)
    packed = pack(q, is_signed)
    assert packed.shape[-1] == (16 if bits == 4 else 12) * blocks
    assert torch.equal(unpack(packed, is_signed), q)
    assert torch.equal(ref.unpack_int4(packed, is_signed) if bits == 4 else ref.unpack_int3(packed, is_signed), q)
