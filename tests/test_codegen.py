"""Static code generation, no GPU needed: every shipped Triton config compiles for its architecture with the
matrix instructions we expect, no register spills, and shared memory within the part's limit."""
import pytest

from turbokernels.testing import CodegenJob, compile_triton, skip_reason_no_ptxas

pytestmark = pytest.mark.skipif(skip_reason_no_ptxas() is not None, reason=str(skip_reason_no_ptxas()))

INT4_KERNEL = "turbokernels.kernels.int4_mm:int4_mm_kernel"
INT4_SIGNATURE = {
    "x_ptr": "*{dt}", "qweight_ptr": "*i32", "scales_ptr": "*{dt}", "offsets_ptr": "*fp32", "bias_ptr": "*{dt}",
    "out_ptr": "*{dt}",
    "M": "i32", "N": "i32", "K": "i32", "group_size": "i32", "stride_xm": "i32", "stride_os": "i32",
    "stride_om": "i32", "k_per_split": "i32",
}
INT4_ALIGNED = ("x_ptr", "qweight_ptr", "scales_ptr", "offsets_ptr", "bias_ptr", "out_ptr", "N", "stride_xm",
                "stride_om")


def int4_cases():
    """(id, capability, config, job): fp16 with one scale row per K tile (g128), bf16 with per-k scales, both with
    a bias; the GEMM configs also fp16 without one (the decode configs split K, where the kernel leaves the bias to
    the launcher: the same code either way)."""
    from turbokernels.kernels.int4_mm import CONFIGS
    for cap, table in sorted(CONFIGS.items()):
        for kind in ("decode", "gemm"):
            for cfg in table[kind]:
                variants = (("fp16", True, True), ("bf16", False, True))
                if cfg.SPLIT_K == 1:
                    variants += (("fp16", True, False),)
                for dt, one_group, has_bias in variants:
                    constexprs = dict(BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
                                      GROUP_M=cfg.GROUP_M, ONE_GROUP_PER_TILE=one_group, SPLIT_K=cfg.SPLIT_K,
                                      HAS_BIAS=has_bias, UPCAST=False,
                                      stride_xk=1, stride_on=1)  # unit strides: JIT specializes
                    job = CodegenJob(INT4_KERNEL, tuple((k, v.format(dt=dt)) for k, v in INT4_SIGNATURE.items()),
                                     tuple(constexprs.items()), cap, cfg.num_warps, cfg.num_stages, INT4_ALIGNED)
                    name = (f"sm{cap}-{kind}-{cfg.BLOCK_M}x{cfg.BLOCK_N}x{cfg.BLOCK_K}-s{cfg.SPLIT_K}"
                            f"-w{cfg.num_warps}-p{cfg.num_stages}-{dt}{'' if one_group else '-perk'}"
                            f"{'' if has_bias else '-nobias'}")
                    yield name, cap, cfg, job


INT4_CASES = list(int4_cases())


@pytest.fixture(scope="module")
def int4_reports():
    return dict(zip([c[0] for c in INT4_CASES], compile_triton([c[3] for c in INT4_CASES])))


@pytest.mark.parametrize("name,cap,cfg", [c[:3] for c in INT4_CASES], ids=[c[0] for c in INT4_CASES])
def test_int4_mm_codegen(int4_reports, name, cap, cfg):
    from turbokernels.kernels.int4_mm import SHARED_MEMORY_LIMIT
    report = int4_reports[name]
    assert report.spill_bytes == 0, f"register spills: {report.ptxas_log}"
    assert report.shared_bytes <= SHARED_MEMORY_LIMIT[cap], f"{report.shared_bytes} B shared memory"
    if cap >= 90 and cfg.BLOCK_M >= 64:
        assert report.uses_wgmma and report.count(r"HGMMA", in_sass=True) > 0, "expected wgmma on sm_90"
    else:
        assert report.uses_mma and report.count(r"HMMA", in_sass=True) > 0, "expected mma.sync tensor-core ops"
        assert not report.uses_wgmma
