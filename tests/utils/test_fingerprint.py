import torch
import torch.nn as nn

from monai_effq.utils.fingerprint import fingerprint_json, fingerprint_state, fingerprint_tensors


def test_equal_tensors_have_equal_fingerprints_and_one_changed_bit_changes_it():
    a = torch.linspace(-1, 1, 100)
    assert fingerprint_tensors([a]) == fingerprint_tensors([a.clone()])
    b = a.clone()
    b.view(torch.int32)[7] ^= 1
    assert fingerprint_tensors([a]) != fingerprint_tensors([b])


def test_dtype_shape_and_names_are_part_of_the_fingerprint():
    a = torch.zeros(4)
    assert fingerprint_tensors([a]) != fingerprint_tensors([a.reshape(2, 2)])
    assert fingerprint_tensors([a]) != fingerprint_tensors([a.double()])
    assert fingerprint_tensors({"x": a}) != fingerprint_tensors({"y": a})


def test_network_fingerprint_follows_its_weights():
    torch.manual_seed(0)
    net = nn.Conv3d(2, 3, 3)
    before = fingerprint_state(net)
    assert fingerprint_state(net) == before
    with torch.no_grad():
        net.weight[0, 0, 0, 0, 0] += 1e-3
    assert fingerprint_state(net) != before


def test_json_fingerprint_ignores_key_order_but_not_values():
    assert fingerprint_json({"a": 1, "b": [2, 3]}) == fingerprint_json({"b": [2, 3], "a": 1})
    assert fingerprint_json({"a": 1}) != fingerprint_json({"a": True})
    assert len(fingerprint_json({})) == 16
