"""SparseGPT 2:4 (compress/sparsegpt.py): the blocked walk against a plain column-by-column one written from the
paper and the reference code (IST-DASLab/sparsegpt, fasterprune with prunen=2, prunem=4), and the point of it: a
smaller layer-output error on the calibration inputs than magnitude and Wanda pruning, and, pruned and quantized in
one walk, than Wanda then round-to-nearest int4."""
import pytest
import torch

import turbokernels as tk
from turbokernels.compress import hessian_of, is_24_sparse, prune_24, sparsegpt_24, sparsegpt_24_int4
from turbokernels.compress.sparsegpt import _walk


def _inputs(n, K):
    """Correlated activations X = Z @ A (A random, columns of very different sizes, as a transformer's features
    are), so that the Hessian X^T X is far from diagonal and matters."""
    A = (torch.randn(K, K) / K ** 0.5 + torch.eye(K)) * torch.logspace(-1, 1, K)[torch.randperm(K)]
    return torch.randn(n, K) @ A


def _err(X, W, Ws):
    return (X.double() @ (W.double() - Ws.double()).t()).norm().item()


def _naive(W, H, damp=0.01, kept_group=None, symmetric=False, scale_dtype=torch.float32):
    """One column at a time, float64, no lazy blocks: the mask of each group of 4 by w^2 / [H^-1]_kk^2 when the walk
    reaches it (keep 2, ties to the lower column); with kept_group, each grid from the kept values under the masks
    chosen at its first group of 4 (later ones provisional) and each kept weight rounded on it."""
    W, H = W.double().clone(), H.double().clone()
    N, K = W.shape
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.diagonal(H).mean() * torch.eye(K, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    d2 = torch.diagonal(U) ** 2

    def mask(vals, lo):
        order = (vals ** 2 / d2[lo:lo + vals.shape[1]]).view(N, -1, 4).argsort(dim=-1, descending=True, stable=True)
        return torch.zeros(N, vals.shape[1] // 4, 4, dtype=torch.bool).scatter_(2, order[..., :2], True).view(N, -1)

    out, keep = torch.zeros_like(W), torch.zeros(N, K, dtype=torch.bool)
    grid = {}
    for j in range(K):
        if j % 4 == 0:
            keep[:, j:j + 4] = mask(W[:, j:j + 4], j)
            for k in (j // 2, j // 2 + 1):
                if kept_group and k % kept_group == 0:
                    last = min(k + kept_group, K // 2) - 1
                    end = (last // 2 + 1) * 4
                    kp = torch.cat([keep[:, j:j + 4], mask(W[:, j + 4:end], j + 4)], 1)
                    kidx = 2 * (torch.arange(j, end) // 4) + kp.view(N, -1, 4).cumsum(-1).view(N, -1) - 1
                    sel = kp & (kidx >= k) & (kidx <= last)
                    lo = torch.where(sel, W[:, j:end], torch.inf).amin(1)
                    hi = torch.where(sel, W[:, j:end], -torch.inf).amax(1)
                    if symmetric:
                        s = (torch.maximum(lo.abs(), hi.abs()) / 7).to(scale_dtype).double()
                        grid[k // kept_group] = (s, -8 * s)
                    else:
                        grid[k // kept_group] = (((hi - lo) / 15).to(scale_dtype).double(), lo.to(scale_dtype).double())
        v = torch.where(keep[:, j], W[:, j], 0)
        if kept_group:
            kidx = 2 * (j // 4) + keep[:, j - j % 4:j].sum(1)
            g = torch.clamp(kidx // kept_group, max=len(grid) - 1)
            s = torch.stack([grid[int(gi)][0][r] for r, gi in enumerate(g)])
            o = torch.stack([grid[int(gi)][1][r] for r, gi in enumerate(g)])
            v = torch.where(keep[:, j], torch.clamp(torch.round((W[:, j] - o) / s), 0, 15) * s + o, 0)
        out[:, j] = v
        err = (W[:, j] - v) / U[j, j]
        W[:, j:] -= err[:, None] * U[j, j:][None, :]
    return out, keep


@pytest.mark.parametrize("block_size", [6, 48, 128])
def test_matches_the_plain_algorithm(block_size):
    """6: groups of 4 straddle lazy blocks."""
    N, K = 24, 192
    W, X = torch.randn(N, K) * 0.05, _inputs(512, K)
    H = hessian_of(X)
    ours = sparsegpt_24(W, H, block_size=block_size)
    ref, keep = _naive(W, H)
    assert is_24_sparse(ours)
    # fp32 vs fp64 arithmetic may flip a rare near-tie of the mask
    assert ((ours != 0) != keep).float().mean().item() < 0.01
    assert abs(_err(X, W, ours) - _err(X, W, ref)) < 0.02 * _err(X, W, ref)


@pytest.mark.parametrize("gs,symmetric,block_size", [(16, False, 6), (32, True, 48), (-1, False, 128),
                                                     (6, True, 48)])
def test_joint_matches_the_plain_algorithm(gs, symmetric, block_size):
    """gs=6: grids of 3 kept values, which start in the middle of a group of 4."""
    N, K = 16, 128
    W, X = torch.randn(N, K) * 0.05, _inputs(512, K)
    H = hessian_of(X)
    w = sparsegpt_24_int4(W, H, group_size=gs, symmetric=symmetric, block_size=block_size)
    ref, keep = _naive(W, H, kept_group=K // 2 if gs == -1 else gs // 2, symmetric=symmetric)
    ours = w.dequantize(torch.float64)
    assert w.group_size == gs and is_24_sparse(ours)
    assert ((ours - ref).abs() > 1e-5).float().mean().item() < 0.02
    assert abs(_err(X, W, ours) - _err(X, W, ref)) < 0.02 * _err(X, W, ref)


def test_lower_output_error_than_magnitude_and_wanda():
    N, K = 64, 256
    W, X = torch.randn(N, K) * 0.05, _inputs(1024, K)
    Wc = W.clone()
    sparse = sparsegpt_24(W, hessian_of(X))
    assert torch.equal(W, Wc) and sparse.dtype == W.dtype and is_24_sparse(sparse)
    ours = _err(X, W, sparse)
    magnitude = _err(X, W, prune_24(W))
    wanda = _err(X, W, prune_24(W, "wanda", X.norm(dim=0)))
    # measured on these inputs over 25 seeds: 0.31-0.41x magnitude's error, 0.80-0.91x Wanda's
    assert ours < 0.5 * magnitude and ours < 0.95 * wanda, (ours, magnitude, wanda)


@pytest.mark.parametrize("gs,symmetric", [(32, False), (128, True), (-1, False)])
def test_joint_lower_error_than_wanda_then_round_to_nearest(gs, symmetric):
    N, K = 64, 256
    W, X = torch.randn(N, K) * 0.05, _inputs(1024, K)
    H = hessian_of(X)
    w = sparsegpt_24_int4(W, H, group_size=gs, symmetric=symmetric)
    assert isinstance(w, tk.Sparse24Int4Weight) and w.shape == (N, K) and w.group_size == gs
    # exactly the weight the walk produced
    walked = _walk(W, H, 0.01, 128, "t", K // 2 if gs == -1 else gs // 2, symmetric)[0]
    assert torch.equal(w.dequantize(), walked)
    wanda = prune_24(W, "wanda", X.norm(dim=0))
    rtn = tk.Sparse24Int4Weight.from_dense(wanda, group_size=gs, symmetric=symmetric).dequantize()
    ours, theirs = _err(X, W, w.dequantize()), _err(X, W, rtn)
    # measured on these inputs over 25 seeds (these three settings): 0.81-0.90x the error of Wanda then
    # round-to-nearest
    assert ours < 0.95 * theirs, (ours, theirs)
    # and it is an ordinary Sparse24Int4Weight: the op runs it
    y = tk.sparse24_int4_linear(X[:5], w)
    torch.testing.assert_close(y.double(), X[:5].double() @ w.dequantize(torch.float64).t(), rtol=1e-4, atol=1e-4)


def test_kept_values_that_round_to_zero_keep_the_walks_mask():
    """Symmetric per-channel grids round many small kept weights to exactly 0; the metadata is the walk's mask
    (a dequantize-then-compress path would choose other columns for those groups)."""
    N, K = 32, 64
    W, X = torch.randn(N, K) * 0.05, _inputs(256, K)
    H = hessian_of(X)
    w = sparsegpt_24_int4(W, H, group_size=-1, symmetric=True)
    walked, keep = _walk(W, H, 0.01, 128, "t", K // 2, True)[:2]
    assert torch.equal(w.dequantize(), walked)
    assert bool((keep & (walked == 0)).any())  # the case happened
    from turbokernels.reference.sparse24_mm import meta_indices
    idx0, idx1 = meta_indices(w.meta, K // 4)
    k4 = keep.view(N, K // 4, 4)
    assert torch.equal(k4.gather(2, idx0[..., None]), torch.ones_like(idx0[..., None], dtype=torch.bool))
    assert torch.equal(k4.gather(2, idx1[..., None]), torch.ones_like(idx1[..., None], dtype=torch.bool))


def test_identity_hessian_is_magnitude_pruning_with_its_ties():
    """No correlations, equal diagonal: nothing to move errors onto; SparseGPT's score is |w|, ties to the lower
    column as prune_24's."""
    W = torch.randint(-2, 3, (9, 32)).float()
    out = sparsegpt_24(W, torch.eye(32))
    assert torch.equal(out, prune_24(W)) and torch.equal(out, sparsegpt_24(W, torch.eye(32)))


@pytest.mark.parametrize("N,K", [(1, 4), (17, 20), (1, 20), (17, 4)])
@pytest.mark.parametrize("gs", [8, -1, 2, 6])
def test_odd_shapes(N, K, gs):
    W, X = torch.randn(N, K), _inputs(64, K)
    H = hessian_of(X)
    sparse = sparsegpt_24(W, H, block_size=3)
    assert sparse.shape == (N, K) and is_24_sparse(sparse)
    w = sparsegpt_24_int4(W, H, group_size=gs, block_size=3)
    walked = _walk(W, H, 0.01, 3, "t", K // 2 if gs == -1 else gs // 2)[0]
    assert w.shape == (N, K) and torch.equal(w.dequantize(), walked) and is_24_sparse(walked)


def test_dead_inputs():
    K = 32
    X = _inputs(200, K)
    X[:, 5] = 0  # an input that never fires
    W = torch.randn(8, K)
    H = hessian_of(X)
    out = sparsegpt_24(W, H)
    assert is_24_sparse(out) and torch.all(out[:, 5] == 0)
    assert torch.all(sparsegpt_24_int4(W, H, group_size=16).dequantize()[:, 5] == 0)  # pruned first: score 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_weights(dtype):
    N, K = 32, 128
    W, X = (torch.randn(N, K) * 0.05).to(dtype), _inputs(512, K)
    H = hessian_of(X)
    out = sparsegpt_24(W, H)
    assert out.dtype == dtype and is_24_sparse(out)
    assert _err(X, W, out) < 0.95 * _err(X, W, prune_24(W, "wanda", X.norm(dim=0)))
    w = sparsegpt_24_int4(W, H, group_size=32)
    assert w.scales.dtype == dtype and is_24_sparse(w.dequantize())
    assert torch.equal(w.dequantize(), _walk(W, H, 0.01, 128, "t", 16, False, dtype)[0])


def test_bad_arguments():
    W, H = torch.randn(8, 64), torch.eye(64)
    for fn in (sparsegpt_24, sparsegpt_24_int4):
        name = fn.__name__
        with pytest.raises(TypeError, match=rf"{name}\(weight\): expected a 2-D float"):
            fn(W.long(), H)
        with pytest.raises(TypeError, match=rf"{name}\(weight\)"):
            fn(W[None], H)
        with pytest.raises(ValueError, match=rf"{name}\(weight\): in_features=62 must be a multiple of 4"):
            fn(W[:, :62], H[:62, :62])
        with pytest.raises(ValueError, match=rf"{name}\(hessian\): expected a float \(64, 64\)"):
            fn(W, torch.eye(32))
        with pytest.raises(ValueError, match=rf"{name}\(hessian\): expected a float \(64, 64\)"):
            fn(W, torch.eye(64, dtype=torch.int64))
        bad = W.clone()
        bad[2, 3] = float("nan")
        with pytest.raises(ValueError, match=rf"{name}\(weight\): must be finite, got 1 NaN"):
            fn(bad, H)
        with pytest.raises(ValueError, match=rf"{name}\(hessian\): must be finite"):
            fn(W, H * float("nan"))
        with pytest.raises(ValueError, match=rf"{name}\(hessian\): not positive definite"):
            fn(W, -H)
        with pytest.raises(ValueError, match=rf"{name}\(damp\)"):
            fn(W, H, damp=0)
        with pytest.raises(ValueError, match=rf"{name}\(block_size\)"):
            fn(W, H, block_size=0)
    with pytest.raises(ValueError, match=r"sparsegpt_24_int4\(group_size\)"):
        sparsegpt_24_int4(W, H, group_size=0)
    with pytest.raises(ValueError, match=r"sparsegpt_24_int4\(group_size\): counts dense columns"):
        sparsegpt_24_int4(W, H, group_size=3)
    with pytest.raises(ValueError, match=r"sparsegpt_24_int4\(weight\): must not be empty"):
        sparsegpt_24_int4(torch.randn(0, 64), H)
    assert sparsegpt_24(torch.randn(0, 64), H).shape == (0, 64)
