"""turbokernels.testing.assert_close itself: rule (1) and FlashAttention's 2x check each fail where they should.
The kernels' tests rely on it; tests/mutations.py and tests/rule_comparison.py show it catching wrong kernels."""
import pytest
import torch

from turbokernels.testing import MIN_ELEMENTS_2X, Allowance, assert_close, half_ulp


def outputs(n, dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    # fp32 values in [0.5, 1.5): torch converts float64 to fp16/bf16 through fp32, a double rounding, which
    # fp32 goldens avoid; `golden.to(dtype)` is then the correctly rounded result
    golden = (torch.rand(n, generator=g) + 0.5).double()
    return golden, golden.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_one_rounding_passes_and_two_fail(dtype):
    golden, rounded = outputs(4097, dtype)
    assert_close(rounded, golden, what="rounded once")
    ulp = 2 * half_ulp(golden, dtype)
    with pytest.raises(AssertionError, match="exceed the derived bound"):  # one element an ulp off
        assert_close(rounded + torch.where(torch.arange(4097) == 17, ulp, 0).to(dtype), golden)
    with pytest.raises(AssertionError, match="exceed the derived bound"):
        assert_close((golden * 1.01).to(dtype), golden)


def test_allowance_widens_rule_1_per_element():
    golden, _ = outputs(64)
    ours = (golden.float() + 3e-3).to(torch.float16)  # one rounding, from fp32
    with pytest.raises(AssertionError, match="exceed the derived bound"):
        assert_close(ours, golden)
    assert_close(ours, golden, allowance=Allowance(accumulation=torch.full((64,), 3.01e-3, dtype=torch.float64)))
    wide_only_at_0 = torch.zeros(64, dtype=torch.float64)
    wide_only_at_0[0] = 3.01e-3
    with pytest.raises(AssertionError, match="63 of 64 elements"):
        assert_close(ours, golden, allowance=Allowance(accumulation=wide_only_at_0))


@pytest.mark.parametrize("n", [MIN_ELEMENTS_2X - 1, MIN_ELEMENTS_2X, 4097])
def test_twice_torch_check_from_min_elements(n):
    """An operand allowance lets rule (1) pass a result 3e-3 off; the 2x check still fails it against a baseline
    that is correctly rounded, from MIN_ELEMENTS_2X elements on (below, a maximum is one draw of noise)."""
    golden, baseline = outputs(n)
    ours = (golden.float() + 3e-3).to(torch.float16)  # one rounding, from fp32
    allowance = Allowance(operand=3.01e-3)  # the shift, plus its fp32 rounding
    if n < MIN_ELEMENTS_2X:
        assert_close(ours, golden, baseline, allowance=allowance)
    else:
        with pytest.raises(AssertionError, match="torch's same-dtype error"):
            assert_close(ours, golden, baseline, allowance=allowance)
    assert_close(ours, golden, ours, allowance=allowance)  # torch as far off: within 2x
    assert_close((golden + 3e-3).float(), golden, baseline.float(), allowance=allowance)  # fp32: rule (1) alone


def test_non_finite_must_match_exactly():
    golden = torch.tensor([1.0, float("-inf"), 2.0], dtype=torch.float64)
    assert_close(golden.float(), golden)
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close(torch.tensor([1.0, -1e30, 2.0]), golden)
    with pytest.raises(AssertionError, match="NaN"):
        assert_close(torch.tensor([1.0, float("nan"), 2.0]), golden)
