import pytest
import torch

from monai_effq.quant import pack_codes, packed_nbytes, unpack_codes


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5, 3, 3, 3), (64, 33)])
def test_packing_round_trips_bit_exactly(bits, shape):
    codes = torch.randint(0, 1 << bits, shape)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_nbytes(codes.numel(), bits)
    assert torch.equal(unpack_codes(packed, bits, shape), codes)


def test_two_bit_codes_take_a_quarter_byte_each():
    assert pack_codes(torch.zeros(1000, dtype=torch.long), 2).numel() == 250
    assert pack_codes(torch.zeros(1000, dtype=torch.long), 4).numel() == 500


def test_known_layout_is_most_significant_bit_first():
    assert pack_codes(torch.tensor([3, 0, 1, 2]), 2).tolist() == [0b11000110]


def test_codes_that_do_not_fit_are_rejected():
    with pytest.raises(ValueError, match="codes must lie"):
        pack_codes(torch.tensor([4]), 2)


def test_unpacking_the_wrong_number_of_bytes_is_rejected():
    packed = pack_codes(torch.zeros(10, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="corrupt"):
        unpack_codes(packed, 4, (11,))
