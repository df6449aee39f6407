"""Address offsets that can pass 2^31 elements are 64-bit in the attention kernels.

A (1M tokens, 32 heads, 128) tensor has 4.3e9 elements: a row index times the row stride overflows int32 there. The
kernels compute such offsets in int64, either as a vector of row offsets per block or as a 64-bit block base plus
32-bit offsets inside the block (BLOCK x stride stays small: kernels/_launch.py int32_tile_offsets makes sure of it),
whichever compiled without register spills for the shipped configs.

Proved two ways:
  * statically, here on the CPU: every kernel is compiled ahead of time as its launcher would see it (int32
    stride arguments) and its Triton IR is checked by testing.int32_stride_products: no stride argument scales a
    32-bit value in a multiply unless that value is a tile index bounded at compile time (tt.make_range and
    constants only); everywhere else the stride is sign-extended to i64 first.
  * on a GPU (@pytest.mark.gpu): forward, backward and decode with K/V of 2^31 + 17 * 1024 elements, compared with a
    float64 golden computed on the GPU one head at a time, with the tests' tolerance rule.
"""
import pytest
import torch

from turbokernels.testing import CodegenJob, compile_triton, int32_stride_products, skip_reason_no_ptxas

import test_attention
import test_attention_bwd
import test_decode_attention


# ---- static: the Triton IR of every attention kernel -------------------------------------------------------------
def _fwd_jobs():
    sig = tuple((k, v.format(dt="fp16")) for k, v in test_attention.FWD_SIGNATURE.items())
    for full in (False, True):
        consts = dict(HEAD_DIM=128, HEAD_DIM_PAD=128, BLOCK_M=128, BLOCK_N=64, RIGHT_BOUNDED=True, LEFT_BOUNDED=full,
                      HAS_SOFTCAP=full, HAS_ALIBI=full, VARLEN=full, SEQ_CHUNK=64, UPCAST=False)
        yield (f"fwd-{'varlen-window-softcap-alibi' if full else 'causal'}",
               CodegenJob(test_attention.FWD_KERNEL, sig, tuple(consts.items()), 90, 8, 2, test_attention.FWD_ALIGNED))


def _bwd_jobs():
    mod = test_attention_bwd
    pre_sig = {"out_ptr": "*fp16", "dout_ptr": "*fp16", "delta_ptr": "*fp32", "cu_q_ptr": "*i32",
               "seqlen_q": "i32", "head_dim": "i32",
               **{f"stride_{t}{s}": "i32" for t in ("o", "do") for s in "bmh"},
               "stride_deltab": "i32", "stride_deltah": "i32", "stride_deltam": "i32"}
    for varlen in (False, True):
        consts = dict(stride_od=1, stride_dod=1, BLOCK_M=64, BLOCK_D=128, VARLEN=varlen)
        # the argument order of the kernel: the unit strides sit between the others
        yield (f"bwd-preprocess{'-varlen' if varlen else ''}",
               CodegenJob(f"{mod.MODULE}:attention_bwd_preprocess_kernel", tuple(pre_sig.items()),
                          tuple(consts.items()), 90, 4, 1))
    for kernel, full, atomic in (("dkdv", False, True), ("dkdv", True, True), ("dkdv", True, False),
                                 ("dq", False, False), ("dq", True, False)):
        flags = dict(VARLEN=full, WINDOW=True, SOFTCAP=full, ALIBI=full, UPCAST=False, GROUP=2, BLOCK_D=128,
                     **mod.UNIT)
        consts = dict(flags, BLOCK_M=16, BLOCK_N=32, **({"ATOMIC_DQ": atomic} if kernel == "dkdv" else {}))
        sig = mod._signature(kernel, "fp16")
        aligned = tuple(a for a in mod.ALIGNED if a in dict(sig))
        name = f"bwd-{kernel}-{'full' if full else 'causal'}{'-atomic' if atomic else ''}"
        yield name, CodegenJob(f"{mod.MODULE}:attention_bwd_{kernel}_kernel", sig, tuple(consts.items()), 90, 8, 2,
                               aligned)


def _decode_jobs():
    mod = test_decode_attention
    for paged, block_m in ((False, 16), (True, 16), (True, 32)):
        consts = dict(stride_qd=1, BLOCK_M=block_m, BLOCK_N=64, BLOCK_D=128, EVEN_D=True, PAGED=paged,
                      PAGE_PER_TILE=paged and block_m == 16, SPLIT=not paged, SOFTCAP=paged, WINDOW=not paged,
                      HAS_ALIBI=not paged, UPCAST=False, **mod.PLAIN)
        sig = dict(mod.SIGNATURE, out_ptr="*fp32" if not paged else "*{dt}")
        name = "decode-" + ("paged-" + ("pagetile" if block_m == 16 else "pagerow") if paged else "split")
        yield name, CodegenJob(mod.KERNEL, tuple((k, v.format(dt="fp16")) for k, v in sig.items()),
                               tuple(consts.items()), 90, 4, 3, mod.ALIGNED)
    options = [job for name, cap, _, job in mod.CODEGEN_CASES if cap == 90 and name.endswith("-batchidx-lse")][0]
    yield "decode-noncausal-leftpad-batchidx-lse", options  # the batch-index row and left pad in int64 too
    combine = [job for name, _, _, job in mod.CODEGEN_CASES if name == "sm90-combine-d128-leftpad-lse"][0]
    yield "decode-combine", combine


STATIC_JOBS = [*_fwd_jobs(), *_bwd_jobs(), *_decode_jobs()]


@pytest.fixture(scope="module")
def ttir_reports():
    reason = skip_reason_no_ptxas()
    if reason is not None:
        pytest.skip(reason)
    return dict(zip([n for n, _ in STATIC_JOBS], compile_triton([j for _, j in STATIC_JOBS])))


def runtime_args(job: CodegenJob) -> list[str]:
    """The kernel's arguments that are not constexpr, in order: what TTIR numbers %arg0, %arg1..."""
    import importlib
    module, name = job.kernel.split(":")
    fn = getattr(importlib.import_module(module), name)
    consts = dict(job.constexprs)
    return [a for a in fn.arg_names if a not in consts]


@pytest.mark.parametrize("name,job", STATIC_JOBS, ids=[n for n, _ in STATIC_JOBS])
def test_no_int32_stride_products(ttir_reports, name, job):
    """Every stride argument is widened to i64 before it scales a position; only compile-time-bounded tile indices
    (in-block offsets) are multiplied by a stride in 32 bits."""
    found = int32_stride_products(ttir_reports[name].ttir, runtime_args(job))
    assert not found, f"{name}: {len(found)} 32-bit products of strides:\n" + "\n".join(found)


def test_checker_catches_an_int32_product():
    """The checker itself: a position times a stride in i32 is reported, the widened form and a bounded tile
    index are not."""
    header = "  tt.func public @k(%p: !tt.ptr<f16>, %stride_s: i32, %n0: i32) {"
    bad = header + """
    %r = tt.make_range {end = 64 : i32, start = 0 : i32} : tensor<64xi32>
    %s = tt.splat %n0 : i32 -> tensor<64xi32>
    %o = arith.addi %s, %r : tensor<64xi32>
    %t = tt.splat %stride_s : i32 -> tensor<64xi32>
    %x = arith.muli %o, %t : tensor<64xi32>"""
    good = header + """
    %r = tt.make_range {end = 64 : i32, start = 0 : i32} : tensor<64xi32>
    %w = arith.extsi %stride_s : i32 to i64
    %n = arith.extsi %n0 : i32 to i64
    %b = arith.muli %n, %w : i64
    %t = tt.splat %stride_s : i32 -> tensor<64xi32>
    %x = arith.muli %r, %t : tensor<64xi32>"""
    assert len(int32_stride_products(bad, [])) == 1
    assert int32_stride_products(good, []) == []
    numbered = good.replace("%p:", "%arg0:").replace("%stride_s", "%arg1").replace("%n0", "%arg2")
    assert int32_stride_products(numbered, ["p", "stride_s", "n0"]) == []
    assert len(int32_stride_products(bad.replace("%stride_s", "%arg1").replace("%p:", "%arg0:")
                                     .replace("%n0", "%arg2"), ["p", "stride_s", "n0"])) == 1


def test_int32_tile_offsets_copies_only_views_it_cannot_address():
    """The launchers' guard: a tile of 128 rows x 256 head-dim lanes must be addressable with int32 offsets from
    the block base; a contiguous tensor always is, a view with a row stride of 2^25 elements is copied."""
    from turbokernels.kernels._launch import int32_tile_offsets
    ok = torch.empty((1, 300, 4, 128), device="meta")
    assert int32_tile_offsets(ok, (0, 128, 0, 128)) is ok
    huge = torch.empty_strided((1, 300, 4, 128), (0, 2 ** 25, 128, 1), device="meta")
    copied = int32_tile_offsets(huge, (0, 128, 0, 128))
    assert copied is not huge and copied.is_contiguous()
    # the 64-bit block base carries the row stride of the block start: one row is always fine
    assert int32_tile_offsets(huge, (0, 1, 0, 128)) is huge


# ---- GPU: tensors past 2^31 elements ----------------------------------------------------------------------------
# K and V of (1, 2^21 + 17, 8, 128) fp16: 2^31 + 17 * 1024 elements (4.3 GB each); key n of head h sits at element
# n * 1024 + h * 128, past 2^31 from key 2^21 on. "Hot" keys there (and at the very end) are made to dominate the
# softmax of some query rows (k = ALPHA * q: a score near 17, ~90% of the weight), so reading them from a wrapped
# address cannot go unnoticed; every other key is random. The float64 golden and the allowance of the tests'
# tolerance rule are computed on the GPU one head at a time (a float64 copy of one head's K is 2.1 GB).
BIG_SK = 2 ** 21 + 17
BIG_H, BIG_D = 8, 128
ALPHA = 1.5


def _free_gib() -> float:
    return torch.cuda.mem_get_info()[0] / 2 ** 30


def _needs(gib: float):
    if _free_gib() < gib:
        pytest.skip(f"needs {gib} GiB of free GPU memory, {_free_gib():.1f} GiB free")


def _big_qkv(sq, dtype=torch.float16, hot_rows=None):
    """q (1, sq, H, D), k, v (1, BIG_SK, H, D) with hot keys past 2^31 elements: (key, query row it targets)."""
    q = torch.randn(1, sq, BIG_H, BIG_D, device="cuda", dtype=dtype)
    k = torch.randn(1, BIG_SK, BIG_H, BIG_D, device="cuda", dtype=dtype)
    v = torch.randn(1, BIG_SK, BIG_H, BIG_D, device="cuda", dtype=dtype)
    hot = hot_rows or [(2 ** 21, 0), (2 ** 21 + 9, min(1, sq - 1)), (BIG_SK - 1, sq - 1)]
    for key, row in hot:
        k[0, key] = (ALPHA * q[0, row].float()).to(dtype)
    return q, k, v


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gpu_forward_past_2_31_elements(causal):
    import turbokernels as tk
    from turbokernels.reference import attention as ref
    from turbokernels.testing import assert_close, attention_allowance, operand_dtype
    _needs(24)
    q, k, v = _big_qkv(3)
    with tk.backend("triton"):
        out, lse = tk.attention(q, k, v, causal=causal, return_lse=True)
    torch.cuda.synchronize()
    for h in range(BIG_H):  # heads are independent problems: one at a time
        qh, kh, vh = (t[:, :, h:h + 1] for t in (q, k, v))
        golden, golden_lse = ref.attention(qh.double(), kh.double(), vh.double(), causal=causal)
        baseline, baseline_lse = ref.attention(qh, kh, vh, causal=causal, compute_dtype=q.dtype)
        a_out, a_lse = attention_allowance(qh, kh, vh, causal=causal,
                                           operand_dtype=operand_dtype("triton", q.dtype))
        what = f"sk={BIG_SK} causal={causal} head {h}"
        assert_close(out[:, :, h:h + 1], golden, baseline, allowance=a_out, what=what)
        assert_close(lse[:, h:h + 1], golden_lse, baseline_lse, allowance=a_lse, what=f"{what} lse")
        del golden, baseline, a_out, a_lse


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic-dq", "deterministic"])
def test_gpu_backward_past_2_31_elements(deterministic):
    """K, V, dK, dV of 2^31 + 17 * 1024 elements each (17 GB) plus one head's float64 golden and allowance."""
    import turbokernels as tk
    from turbokernels.reference import attention as ref
    from turbokernels.testing import assert_close, attention_bwd_allowance, operand_dtype
    _needs(48)
    q, k, v = _big_qkv(3)
    dout = torch.randn_like(q)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    with tk.backend("triton"):
        out, lse = tk.attention(*leaves, causal=True, deterministic=deterministic, return_lse=True)
        dq, dk, dv = torch.autograd.grad(out, leaves, dout)
    torch.cuda.synchronize()
    q, k, v, out = (t.detach() for t in (q, k, v, out))
    scale = BIG_D ** -0.5
    for h in range(BIG_H):
        sl = slice(h, h + 1)
        qh, kh, vh, doh, oh = (t[:, :, sl] for t in (q, k, v, dout, out))
        golden = ref.attention_bwd(doh.double(), qh.double(), kh.double(), vh.double(), None, None, None, None,
                                   None, scale, True, -1, -1, 0.0, True)
        allowance = attention_bwd_allowance(qh, kh, vh, doh, oh, lse[:, sl], causal=True,
                                            operand_dtype=operand_dtype("triton", q.dtype))
        for name, ours, gold, a in zip(("dq", "dk", "dv"), (dq, dk, dv), golden, allowance):
            assert_close(ours[:, :, sl], gold, allowance=a,
                         what=f"sk={BIG_SK} deterministic={deterministic} head {h} {name}")
        del golden, allowance


@pytest.mark.gpu
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged64"])
def test_gpu_decode_past_2_31_elements(paged):
    """decode_attention over a cache of 2^31+ elements: contiguous (1, 2^21 + 17, 8, 128), or 32832 pages of 64
    tokens (page p at element p * 65536: the last 64 pages lie past 2^31) in a shuffled block table."""
    import turbokernels as tk
    from turbokernels.reference.decode_attention import decode_attention as reference
    from turbokernels.testing import assert_close, decode_allowance, operand_dtype
    _needs(24)
    T, Hq, dtype = 2, 16, torch.float16
    group = Hq // BIG_H
    q = torch.randn(1, T, Hq, BIG_D, device="cuda", dtype=dtype)
    if paged:
        page_size, num_pages = 64, 2 ** 15 + 64
        shape = (num_pages, page_size, BIG_H, BIG_D)
        block_table = torch.randperm(num_pages, device="cuda").to(torch.int32)[None]
        capacity = num_pages * page_size
        far = (block_table[0] >= 2 ** 15).nonzero()[:2, 0].tolist()  # logical pages stored past 2^31
        hot = [p * page_size + 13 for p in far]
    else:
        page_size, shape, block_table, capacity = None, (1, BIG_SK, BIG_H, BIG_D), None, BIG_SK
        hot = [2 ** 21, 2 ** 21 + 9]
    seqlen = capacity - 3
    hot.append(seqlen - 1)
    k_cache = torch.randn(shape, device="cuda", dtype=dtype)
    v_cache = torch.randn(shape, device="cuda", dtype=dtype)
    for key in hot:  # the last new token of the first q head of each kv head gets these keys
        page, slot = (int(block_table[0, key // page_size]), key % page_size) if paged else (0, key)
        k_cache[page, slot] = (ALPHA * q[0, T - 1, ::group].float()).to(dtype)
    seqlens = torch.tensor([seqlen], dtype=torch.int32, device="cuda")
    with tk.backend("triton"):
        out = tk.decode_attention(q, k_cache, v_cache, seqlens, block_table=block_table)
    torch.cuda.synchronize()
    scale = BIG_D ** -0.5
    for hq in range(Hq):  # one query head (and its kv head) at a time
        qh = q[:, :, hq:hq + 1]
        kc, vc = (c[:, :, hq // group:hq // group + 1] for c in (k_cache, v_cache))
        args = (seqlens, block_table, None, scale, -1, -1, 0.0)
        golden = reference(qh.double(), kc.double(), vc.double(), *args)
        baseline = reference(qh, kc, vc, *args)
        allowance = decode_allowance(qh, kc, vc, *args, operand_dtype=operand_dtype("triton", dtype))
        assert_close(out[:, :, hq:hq + 1], golden, baseline, allowance=allowance,
                     what=f"decode paged={paged} seqlen={seqlen} q head {hq}")
        del golden, baseline, allowance
