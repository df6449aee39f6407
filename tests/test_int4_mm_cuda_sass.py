"""The CUDA C++ int4 kernel (csrc/cuda/int4_mm.cuh), statically, in CI without a GPU: for every architecture the
built turbokernels._C holds, the SASS of its 12 instantiations (fp16/bf16 x half/float/zero-point dequantization x the decode
16 x 128 and GEMM 64 x 128 tiles) runs on tensor cores (HMMA.16816 with the dtype's suffix, exactly the count one k
tile needs: fewer would mean a lost step or tile), loads x with ldmatrix, and uses no local memory; registers and
the dynamic shared memory fit the architecture. The .so handling (which architectures, skip/fail rules) is the
sparse24 SASS test's."""
import re

import pytest
import torch

from turbokernels import _ext
from test_sparse24_mm_cuda_sass import _built_archs, _dump, _per_arch_functions

# int4_mm_kernel<T, DQ, BM, BN, WARPS_M, WARPS_N>, mangled: ...int4_mm_kernelIN7tk_arch3F16ELi0ELi16ELi128...
KERNEL = re.compile(r"int4_mm_kernelIN7tk_arch(3F16|4BF16)ELi([012])ELi(\d+)ELi(\d+)ELi(\d+)ELi(\d+)E")
HALF, FLOAT, ZERO = 0, 1, 2  # the dequantization modes (csrc/cuda/int4_mm_layout.h, Dequant)
INSTANCES = {(dt, dq, *tile) for dt in ("3F16", "4BF16") for dq in (HALF, FLOAT, ZERO)
             for tile in ((16, 128, 1, 4), (64, 128, 2, 2))}
# mma.sync.m16n8k16.row.col.f32.{f16,bf16} as nvcc 13.0 writes it for sm_80..sm_90a
MNEMONIC = {"3F16": r"HMMA\.16816\.F32", "4BF16": r"HMMA\.16816\.F32\.BF16"}
STEPS = 4  # k16 steps per 64-deep k tile, unrolled
# dynamic shared memory per block each architecture allows (bytes)
SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_86": 99 * 1024, "sm_89": 99 * 1024, "sm_90": 227 * 1024,
                "sm_90a": 227 * 1024}


def _instances(per_arch, arch):
    found = {}
    for name, body in per_arch.get(arch, {}).items():
        if "7tk_int4" in name and "int4_mm_kernel" in name:  # namespace tk_int4 (not sparse24_int4_mm's)
            m = KERNEL.search(name)
            assert m, f"{arch}: unexpected int4 kernel name {name}"
            found[(m[1], int(m[2]), *(int(v) for v in m.groups()[2:]))] = body
    return found


def test_int4_kernels_run_on_tensor_cores():
    archs = _built_archs()
    per_arch = _per_arch_functions(_dump("--dump-sass"))
    for arch in archs:
        kernels = _instances(per_arch, arch)
        assert set(kernels) == INSTANCES, f"{arch}: int4 kernels {sorted(kernels)}, expected {sorted(INSTANCES)}"
        for (dt, dq, bm, bn, wm, wn), body in kernels.items():
            mma = re.findall(r"\bHMMA\.[A-Z0-9.]+", body)
            per_step = (bm // wm // 16) * (bn // wn // 16) * 2  # m16 tiles x n16 blocks x two n8 mma
            wanted = [m for m in mma if re.fullmatch(MNEMONIC[dt], m)]
            assert len(wanted) == len(mma) == STEPS * per_step, (
                f"{arch} {dt} dq={dq} {bm}x{bn}: expected {STEPS * per_step} {MNEMONIC[dt]}, found {sorted(mma)}")
            ldsm = re.findall(r"\bLDSM\.16\.M88\.4\b", body)
            assert len(ldsm) == STEPS * (bm // wm // 16), f"{arch} {dt} {bm}x{bn}: ldmatrix.x4 count {len(ldsm)}"
            assert re.search(r"\bLDGSTS\.E\.BYPASS(\.LTC128B)?\.128\b", body), f"{arch}: no 16-byte cp.async.cg"
            if dq != FLOAT:  # half and zero modes: one lop3 (mask 0x000f000f, magic exponent) per B register
                lop3 = re.findall(r"\bLOP3\.LUT\b[^;]*\b0xf000f\b", body)
                assert len(lop3) == STEPS * (bn // wn // 16) * 4, f"{arch} {dt} {bm}x{bn}: {len(lop3)} dequant lop3"


def test_int4_kernels_use_no_local_memory_and_fit():
    archs = _built_archs()
    per_arch = _per_arch_functions(_dump("--dump-resource-usage"))
    _ext.available()
    shared = torch.ops.turbokernels_C.int4_mm_mma_shared_bytes
    for arch in archs:
        kernels = _instances(per_arch, arch)
        assert set(kernels) == INSTANCES, f"{arch}: int4 kernels {sorted(kernels)}"
        for (dt, dq, bm, bn, wm, wn), body in kernels.items():
            usage = dict(re.findall(r"\b([A-Z]+(?:\[\d+\])?):(\d+)", body))
            assert usage.get("LOCAL") == "0" and usage.get("STACK") == "0", f"{arch} {dt} {bm}: spills {usage}"
            assert 0 < int(usage["REG"]) <= 255, f"{arch}: registers {usage}"  # 128 threads: any count launches
            assert int(usage.get("SHARED", 0)) == 0, f"{arch}: static shared memory {usage} (all of it is dynamic)"
            need = shared(bm, dq == FLOAT)
            assert 0 < need <= SHARED_LIMIT.get(arch, 99 * 1024), f"{arch} {bm}x{bn} dq={dq}: {need} B of shared"


@pytest.mark.skipif(not _ext.available(), reason="turbokernels._C is not built")
def test_shared_memory_figures():
    # 4 stages x (x 16 or 64 rows of 144 B + 4 k16 steps x 8 blocks x 128 B + 2 x 4 rows x 128 scales) + 16
    shared = torch.ops.turbokernels_C.int4_mm_mma_shared_bytes
    assert shared(1, False) == 4 * (16 * 144 + 4096 + 2 * 4 * 128 * 2) + 16
    assert shared(16, True) == 4 * (16 * 144 + 4096 + 2 * 4 * 128 * 4) + 16
    assert shared(17, False) == 4 * (64 * 144 + 4096 + 2 * 4 * 128 * 2) + 16
