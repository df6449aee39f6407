"""GPTQ (compress/gptq.py): the blocked implementation against a plain column-by-column one written from the paper,
and the point of it: a smaller layer-output error than round-to-nearest on the calibration inputs."""
import pytest
import torch

import turbokernels as tk
from turbokernels.compress import HessianAccumulator, gptq_quantize, hessian_of


def _correlated_inputs(n, K, seed=0):
    """Activations with features of very different sizes and strong correlations, as a transformer's are."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(K, K, generator=g) / K ** 0.5 + torch.eye(K)
    return (torch.randn(n, K, generator=g) @ mix) * torch.logspace(-1, 1, K)[torch.randperm(K, generator=g)]


def _naive_gptq(W, H, gs, symmetric, act_order, damp=0.01):
    """One column at a time (no lazy blocks), float64, the paper's Algorithm 1 with its grid per group taken when
    the walk reaches the group. Returns the dequantized weight in the original column order."""
    W, H = W.double().clone(), H.double().clone()
    N, K = W.shape
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else torch.arange(K)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.diagonal(H).mean() * torch.eye(K, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    out = torch.zeros_like(W)
    for j in range(K):
        if j % gs == 0:
            grp = W[:, j:j + gs]
            if symmetric:
                s = (grp.abs().amax(1) / 7).float().double()
                o = -8 * s
            else:
                lo, hi = grp.amin(1), grp.amax(1)
                s, o = ((hi - lo) / 15).float().double(), lo.float().double()
        q = torch.clamp(torch.round((W[:, j] - o) / s), 0, 15)
        out[:, j] = q * s + o
        err = (W[:, j] - out[:, j]) / U[j, j]
        W[:, j:] -= err[:, None] * U[j, j:][None, :]
    result = torch.empty_like(out)
    result[:, perm] = out
    return result


@pytest.mark.parametrize("gs", [32, 128, -1])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
def test_matches_the_plain_algorithm(gs, symmetric, act_order):
    N, K = 24, 256
    W = torch.randn(N, K) * 0.05
    X = _correlated_inputs(512, K)
    H = hessian_of(X)
    w = gptq_quantize(W, H, group_size=gs, symmetric=symmetric, act_order=act_order, block_size=48)
    ref = _naive_gptq(W, H, K if gs == -1 else gs, symmetric, act_order)
    ours = w.dequantize(torch.float64)
    assert (w.perm is not None) == act_order
    # the two walks round in the same order; fp32 vs fp64 arithmetic may flip a rare tie
    differ = ((ours - ref).abs() > 1e-5).float().mean().item()
    assert differ < 0.01, differ
    torch.testing.assert_close(X.double() @ ours.t(), X.double() @ ref.t(), rtol=0.02, atol=0.02 * X.abs().max())


@pytest.mark.parametrize("gs", [32, 128])
@pytest.mark.parametrize("symmetric", [False, True])
def test_lower_output_error_than_round_to_nearest(gs, symmetric):
    N, K = 64, 384
    W = torch.randn(N, K) * 0.05
    X = _correlated_inputs(1024, K, seed=1)
    H = hessian_of(X)
    exact = X.double() @ W.double().t()
    rtn = X.double() @ tk.quantize_int4(W, group_size=gs, symmetric=symmetric).dequantize(torch.float64).t()
    errs = {}
    for act_order in (False, True):
        w = gptq_quantize(W, H, group_size=gs, symmetric=symmetric, act_order=act_order)
        errs[act_order] = (X.double() @ w.dequantize(torch.float64).t() - exact).norm().item()
        # and it is an ordinary Int4Weight: the op runs it
        y = tk.int4_linear(X[:5], w)
        torch.testing.assert_close(y.double(), X[:5].double() @ w.dequantize(torch.float64).t(), rtol=1e-4,
                                   atol=1e-4)
    rtn_err = (rtn - exact).norm().item()
    # measured on these inputs: ~0.8x RTN's error in column order, ~0.62x with act-order
    assert errs[False] < 0.9 * rtn_err and errs[True] < 0.75 * rtn_err, (errs, rtn_err)


def test_accumulator_and_dead_inputs():
    K = 64
    X = torch.randn(300, K)
    X[:, 5] = 0  # an input that never fires
    acc = HessianAccumulator(K)
    for chunk in X.split(77):
        acc.add(chunk.reshape(1, -1, K))
    torch.testing.assert_close(acc.hessian(), X.double().t() @ X.double() / 300)
    w = gptq_quantize(torch.randn(8, K), acc.hessian(), group_size=32)
    assert torch.all(w.dequantize()[:, 5].abs() <= w.scales.abs().max() * 8)  # column 5: weight 0, as rounded


def test_bad_arguments():
    W, H = torch.randn(8, 64), torch.eye(64)
    with pytest.raises(TypeError, match=r"gptq_quantize\(weight\)"):
        gptq_quantize(W.long(), H)
    with pytest.raises(ValueError, match=r"gptq_quantize\(hessian\): expected a float \(64, 64\)"):
        gptq_quantize(W, torch.eye(32))
    with pytest.raises(ValueError, match=r"gptq_quantize\(group_size\)"):
        gptq_quantize(W, H, group_size=0)
    with pytest.raises(ValueError, match=r"gptq_quantize\(damp\)"):
        gptq_quantize(W, H, damp=0)
    with pytest.raises(ValueError, match=r"gptq_quantize\(weight, hessian\): must be finite"):
        gptq_quantize(W, H * float("nan"))
