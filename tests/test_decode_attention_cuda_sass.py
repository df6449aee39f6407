"""The CUDA C++ decode attention kernels (csrc/cuda/decode_attention.cuh), statically, in CI without a GPU: for
every architecture the built turbokernels._C holds, the SASS of the 12 split kernels (fp16/bf16 x head_dim 64/128 x
1, 2 or 4 m16 row tiles) runs q.K^T and P.V on tensor cores (HMMA.16816 with the dtype's suffix, exactly the count
one 64-key tile needs: the main loop is not unrolled), reads K with ldmatrix and V with ldmatrix .trans, uses the
ex2 unit, and no local memory; the 4 combine kernels are there; registers and the dynamic shared memory fit. The .so
handling (which architectures, skip/fail rules) is the sparse24 SASS test's."""
import re

import pytest
import torch

from turbokernels import _ext
from test_sparse24_mm_cuda_sass import _built_archs, _dump, _per_arch_functions

# decode_attention_kernel<T, D, WARPS_M>, decode_attention_combine_kernel<T, D>
SPLIT = re.compile(r"decode_attention_kernelIN7tk_arch(3F16|4BF16)ELi(\d+)ELi(\d+)E")
COMBINE = re.compile(r"decode_attention_combine_kernelIN7tk_arch(3F16|4BF16)ELi(\d+)E")
DTYPES = ("3F16", "4BF16")
SPLITS = {(dt, d, wm) for dt in DTYPES for d in (64, 128) for wm in (1, 2, 4)}
COMBINES = {(dt, d) for dt in DTYPES for d in (64, 128)}
MNEMONIC = {"3F16": r"HMMA\.16816\.F32", "4BF16": r"HMMA\.16816\.F32\.BF16"}
SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_86": 99 * 1024, "sm_89": 99 * 1024, "sm_90": 227 * 1024,
                "sm_90a": 227 * 1024}


def _kernels(per_arch, arch):
    splits, combines = {}, {}
    for name, body in per_arch.get(arch, {}).items():
        if "decode_attention_combine_kernel" in name:
            m = COMBINE.search(name)
            assert m, f"{arch}: unexpected combine kernel name {name}"
            combines[(m[1], int(m[2]))] = body
        elif "decode_attention_kernel" in name:
            m = SPLIT.search(name)
            assert m, f"{arch}: unexpected decode kernel name {name}"
            splits[(m[1], int(m[2]), int(m[3]))] = body
    return splits, combines


def test_decode_kernels_run_on_tensor_cores():
    archs = _built_archs()
    per_arch = _per_arch_functions(_dump("--dump-sass"))
    for arch in archs:
        splits, combines = _kernels(per_arch, arch)
        assert set(splits) == SPLITS and set(combines) == COMBINES, f"{arch}: {sorted(splits)} {sorted(combines)}"
        for (dt, d, wm), body in splits.items():
            mma = re.findall(r"\bHMMA\.[A-Z0-9.]+", body)
            # a warp: one m16 row tile x 16 * wm keys; q.K^T 2 wm n8 tiles x d/16 k steps, P.V wm k steps x d/8
            expected = wm * d // 4
            wanted = [m for m in mma if re.fullmatch(MNEMONIC[dt], m)]
            assert len(wanted) == len(mma) == expected, f"{arch} {dt} d={d} wm={wm}: {sorted(mma)}, want {expected}"
            assert re.search(r"\bLDSM\.16\.M88\.4\b", body) and re.search(r"\bLDSM\.16\.MT88\.4\b", body), \
                f"{arch} {dt} d={d}: ldmatrix for K and ldmatrix .trans for V"
            assert re.search(r"\bMUFU\.EX2\b", body), f"{arch}: no ex2"
        for key, body in combines.items():
            assert not re.search(r"\bHMMA\b", body), f"{arch} combine {key}: unexpected HMMA"


def test_decode_kernels_use_no_local_memory_and_fit():
    archs = _built_archs()
    per_arch = _per_arch_functions(_dump("--dump-resource-usage"))
    _ext.available()
    shared = torch.ops.turbokernels_C.decode_attention_mma_shared_bytes
    for arch in archs:
        splits, combines = _kernels(per_arch, arch)
        assert set(splits) == SPLITS and set(combines) == COMBINES
        for key, body in list(splits.items()) + list(combines.items()):
            usage = dict(re.findall(r"\b([A-Z]+(?:\[\d+\])?):(\d+)", body))
            assert usage.get("LOCAL") == "0" and usage.get("STACK") == "0", f"{arch} {key}: spills {usage}"
            assert 0 < int(usage["REG"]) <= 255 and int(usage.get("SHARED", 0)) == 0, f"{arch} {key}: {usage}"
        for d in (64, 128):
            assert 0 < shared(d) <= SHARED_LIMIT.get(arch, 99 * 1024), f"{arch} d={d}: {shared(d)} B of shared"


@pytest.mark.skipif(not _ext.available(), reason="turbokernels._C is not built")
def test_shared_memory_figures():
    # stages (4 at d=64, 2 at d=128) x a K and a V tile of 64 keys x (d + 8) halves
    shared = torch.ops.turbokernels_C.decode_attention_mma_shared_bytes
    assert shared(64) == 4 * 2 * 64 * 72 * 2 and shared(128) == 2 * 2 * 64 * 136 * 2
