"""The CUDA C++ int4 + 2:4 kernel (csrc/cuda/sparse24_int4_mm.cuh), statically, in CI without a GPU: for every
architecture the built turbokernels._C holds, the SASS of its 8 instantiations (fp16/bf16 x half/float
dequantization x the decode 128 x 16 and GEMM 64 x 64 tiles) runs on sparse tensor cores (HMMA.SP.16832 with the
dtype's suffix, exactly the count one k tile needs: fewer would mean a lost step or tile, and no dense HMMA), loads x
with ldmatrix, uses no local memory; registers and the dynamic shared memory fit the architecture. The .so handling
(which architectures, skip/fail rules) is the sparse24 SASS test's."""
import re

import pytest
import torch

from turbokernels import _ext
from test_sparse24_mm_cuda_sass import MNEMONIC as SPARSE_MNEMONIC
from test_sparse24_mm_cuda_sass import _built_archs, _dump, _per_arch_functions

# sparse24_int4_mm_kernel<T, FLOAT_DQ, BN, BM, WARPS_N, WARPS_M>, mangled:
# _ZN8tk_s24i43gpu23sparse24_int4_mm_kernelIN7tk_arch3F16ELb0ELi64ELi64ELi2ELi2EEEvNS_6ParamsE
KERNEL = re.compile(r"sparse24_int4_mm_kernelIN7tk_arch(3F16|4BF16)ELb([01])ELi(\d+)ELi(\d+)ELi(\d+)ELi(\d+)E")
INSTANCES = {(dt, fq, *tile) for dt in ("3F16", "4BF16") for fq in (0, 1) for tile in ((128, 16, 4, 1),
                                                                                       (64, 64, 2, 2))}
MNEMONIC = {"3F16": SPARSE_MNEMONIC["F16"], "4BF16": SPARSE_MNEMONIC["BF16"]}
STEPS = 2  # k32 steps per 64-deep k tile, unrolled
# dynamic shared memory per block each architecture allows (bytes)
SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_86": 99 * 1024, "sm_89": 99 * 1024, "sm_90": 227 * 1024,
                "sm_90a": 227 * 1024}


def _instances(per_arch, arch):
    found = {}
    for name, body in per_arch.get(arch, {}).items():
        if "sparse24_int4_mm_kernel" in name:
            m = KERNEL.search(name)
            assert m, f"{arch}: unexpected sparse24_int4 kernel name {name}"
            found[(m[1], int(m[2]), *(int(v) for v in m.groups()[2:]))] = body
    return found


def test_sparse24_int4_kernels_run_on_sparse_tensor_cores():
    archs = _built_archs()
    per_arch = _per_arch_functions(_dump("--dump-sass"))
    for arch in archs:
        kernels = _instances(per_arch, arch)
        assert set(kernels) == INSTANCES, f"{arch}: kernels {sorted(kernels)}, expected {sorted(INSTANCES)}"
        for (dt, fq, bn, bm, wn, wm), body in kernels.items():
            mi, nj = bn // wn // 16, bm // wm // 8  # m16 tiles along N, n8 tiles along M per warp
            mma = re.findall(r"\bHMMA\.[A-Z0-9.]+", body)
            wanted = [m for m in mma if re.fullmatch(MNEMONIC[dt], m)]
            assert len(wanted) == len(mma) == STEPS * mi * nj, (
                f"{arch} {dt} fq={fq} {bn}x{bm}: expected {STEPS * mi * nj} {MNEMONIC[dt]}, found {sorted(mma)}")
            ldsm = re.findall(r"\bLDSM\.16\.M88\.4\b", body)
            assert len(ldsm) == STEPS * nj, f"{arch} {dt} {bn}x{bm}: ldmatrix.x4 count {len(ldsm)}"
            assert re.search(r"\bLDGSTS\.E\.BYPASS(\.LTC128B)?\.128\b", body), f"{arch}: no 16-byte cp.async.cg"
            if not fq:  # half mode: one lop3 (mask 0x000f000f, magic exponent) per A register, nothing else
                lop3 = re.findall(r"\bLOP3\.LUT\b[^;]*\b0xf000f\b", body)
                assert len(lop3) == STEPS * mi * 4, f"{arch} {dt} {bn}x{bm}: {len(lop3)} dequant lop3"


def test_sparse24_int4_kernels_use_no_local_memory_and_fit():
    archs = _built_archs()
    per_arch = _per_arch_functions(_dump("--dump-resource-usage"))
    _ext.available()
    shared = torch.ops.turbokernels_C.sparse24_int4_mm_mma_shared_bytes
    for arch in archs:
        kernels = _instances(per_arch, arch)
        assert set(kernels) == INSTANCES, f"{arch}: kernels {sorted(kernels)}"
        for (dt, fq, bn, bm, wn, wm), body in kernels.items():
            usage = dict(re.findall(r"\b([A-Z]+(?:\[\d+\])?):(\d+)", body))
            assert usage.get("LOCAL") == "0" and usage.get("STACK") == "0", f"{arch} {dt} {bn}x{bm}: spills {usage}"
            assert 0 < int(usage["REG"]) <= 255, f"{arch}: registers {usage}"  # 128 threads: any count launches
            assert int(usage.get("SHARED", 0)) == 0, f"{arch}: static shared memory {usage} (all of it is dynamic)"
            need = shared(bm, bool(fq))
            assert 0 < need <= SHARED_LIMIT.get(arch, 99 * 1024), f"{arch} {bn}x{bm} fq={fq}: {need} B of shared"


@pytest.mark.skipif(not _ext.available(), reason="turbokernels._C is not built")
def test_shared_memory_figures():
    # 4 stages x (x BM rows of 144 B + 2 k32 steps x BN/16 blocks x 128 B + BN meta rows of 8 B + 2 x 2 steps x BN
    # scales) + 16
    shared = torch.ops.turbokernels_C.sparse24_int4_mm_mma_shared_bytes
    assert shared(1, False) == 4 * (16 * 144 + 2 * 8 * 128 + 128 * 8 + 2 * 2 * 128 * 2) + 16
    assert shared(16, True) == 4 * (16 * 144 + 2 * 8 * 128 + 128 * 8 + 2 * 2 * 128 * 4) + 16
    assert shared(17, False) == 4 * (64 * 144 + 2 * 4 * 128 + 64 * 8 + 2 * 2 * 64 * 2) + 16
    assert shared(17, True) <= 48 * 1024
