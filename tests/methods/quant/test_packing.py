import pytest
import torch

from effdiff.methods.quant.packing import pack, unpack


@pytest.mark.parametrize(("bits", "qmin"), [(4, -8), (4, 0), (2, -2), (8, -128), (3, -4)])
def test_round_trips_every_code(bits, qmin):
    codes = torch.arange(qmin, qmin + 2**bits).repeat(3)
    packed = pack(codes, bits, qmin)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-codes.numel() // (8 // bits if 8 % bits == 0 else 1))
    assert torch.equal(unpack(packed, bits, qmin, codes.numel()), codes.to(torch.int16))


def test_int4_is_two_codes_per_byte_low_nibble_first():
    assert pack(torch.tensor([-8, 7]), 4, -8).tolist() == [0 | (15 << 4)]
