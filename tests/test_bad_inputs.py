"""Every public entry rejects bad input with an error that names the argument; nothing is half-modified."""
import pytest
import torch

import turbokernels as tk
from _int4_cases import make_weight


@pytest.fixture
def weight():
    return make_weight(32, 64, 32)


@pytest.mark.parametrize("group_size,exc,match", [
    (0, ValueError, "group_size"), (-2, ValueError, "group_size"), (1.5, TypeError, "group_size"),
    (True, TypeError, "group_size"),
])
def test_quantize_rejects_bad_group_size(group_size, exc, match):
    with pytest.raises(exc, match=match):
        tk.quantize_int4(torch.randn(8, 64), group_size=group_size)


@pytest.mark.parametrize("w,exc,match", [
    (torch.randn(64), ValueError, "2-D"),
    (torch.randint(0, 5, (8, 64)), TypeError, "float16, bfloat16 or float32"),
    (torch.randn(8, 64, dtype=torch.float64), TypeError, "float16, bfloat16 or float32"),
    (torch.empty(0, 64), ValueError, "empty"),
    (torch.tensor([[float("nan")] * 8]), ValueError, "NaN"),
    ([[1.0]], TypeError, "torch.Tensor"),
])
def test_quantize_rejects_bad_weights(w, exc, match):
    with pytest.raises(exc, match=match):
        tk.quantize_int4(w)


def test_int4_linear_rejects_bad_x(weight):
    with pytest.raises(TypeError, match=r"int4_linear\(x\): dtype"):
        tk.int4_linear(torch.randn(2, 64, dtype=torch.float64), weight)
    with pytest.raises(TypeError, match=r"int4_linear\(x\): dtype"):
        tk.int4_linear(torch.ones(2, 64, dtype=torch.int32), weight)
    with pytest.raises(ValueError, match=r"in_features=64"):
        tk.int4_linear(torch.randn(2, 63), weight)
    with pytest.raises(ValueError, match=r"in_features=64"):
        tk.int4_linear(torch.tensor(1.0), weight)
    with pytest.raises(TypeError, match=r"int4_linear\(x\)"):
        tk.int4_linear([1.0] * 64, weight)
    with pytest.raises(TypeError, match=r"int4_linear\(weight\)"):
        tk.int4_linear(torch.randn(2, 64), torch.randn(32, 64))


def test_int4_linear_rejects_bad_bias(weight):
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match=r"int4_linear\(bias\): expected shape \(32,\)"):
        tk.int4_linear(x, weight, torch.randn(31))
    with pytest.raises(TypeError, match=r"int4_linear\(bias\): dtype"):
        tk.int4_linear(x, weight, torch.randn(32, dtype=torch.float16))


def test_int4_linear_rejects_device_mismatch(weight):
    meta_x = torch.randn(2, 64, device="meta")
    with pytest.raises(ValueError, match="x is on meta"):
        tk.int4_linear(meta_x, weight)


@pytest.mark.parametrize("field,value,exc,match", [
    ("qweight", torch.zeros(8, 32, dtype=torch.int64), TypeError, "qweight must be int32"),
    ("qweight", torch.zeros(7, 32, dtype=torch.int32), ValueError, "qweight has 7 rows"),
    ("qweight", torch.zeros(8, dtype=torch.int32), ValueError, "qweight must be 2-D"),
    ("scales", torch.ones(3, 32), ValueError, r"scales must have shape \(num_groups, out_features\) = \(2, 32\)"),
    ("offsets", torch.ones(2, 31), ValueError, r"offsets must have shape"),
    ("scales", torch.ones(2, 32, dtype=torch.float64), TypeError, "scales must be float16"),
    ("scales", torch.ones(2, 32, device="meta"), ValueError, "scales is on meta"),
    ("perm", torch.arange(63), ValueError, r"perm must be an int64 tensor of shape \(64,\)"),
])
def test_int4_weight_rejects_corrupt_packed_tensors(weight, field, value, exc, match):
    fields = dict(qweight=weight.qweight, scales=weight.scales, offsets=weight.offsets, perm=None)
    fields[field] = value
    with pytest.raises(exc, match=match):
        tk.Int4Weight(fields["qweight"], fields["scales"], fields["offsets"], 32, 64, perm=fields["perm"])


def test_int4_weight_rejects_bad_group_size_and_in_features(weight):
    with pytest.raises(ValueError, match="group_size"):
        tk.Int4Weight(weight.qweight, weight.scales, weight.offsets, 0, 64)
    with pytest.raises(ValueError, match="in_features"):
        tk.Int4Weight(weight.qweight, weight.scales, weight.offsets, 32, 0)


def test_module_constructors_reject_bad_input():
    with pytest.raises(TypeError, match="from_linear"):
        tk.nn.Int4Linear.from_linear(torch.nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="group_size"):
        tk.nn.Int4Linear.from_linear(torch.nn.Linear(64, 8), group_size=-4)
    with pytest.raises(TypeError, match="dtype"):
        tk.nn.Int4Linear(64, 8, dtype=torch.int8)
    lin = torch.nn.Linear(64, 8)
    before = lin.weight.clone()
    tk.nn.Int4Linear.from_linear(lin)
    assert torch.equal(lin.weight, before)  # the source layer is never modified
