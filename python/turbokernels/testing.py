"""Test helpers shared by tests/ and bench/: the tolerance rule and the static code-generation check.

Tolerance (as FlashAttention tests it): against a float64 golden result, our error may be at most twice the error
PyTorch itself makes in the same dtype, plus one unit of rounding noise:

    max|ours - golden| <= 2 * max|torch_same_dtype - golden| + atol,   atol = eps(dtype) * scale

with scale = max(1, max|golden|) by default. For reductions pass the magnitude of the summed terms (for a matmul,
max(|x| @ |W|)): when a few outputs happen to cancel, torch's error can be near 0 by luck, and any other summation
order would fail a bound that has no room for one rounding of the terms' size.

Code generation, without a GPU: a Triton kernel is compiled ahead of time for a GPUTarget (sm_80, sm_90) and
ptxas (shipped with triton) reports registers and spills; the PTX and the SASS tell which matrix instructions the
compiler chose (mma.sync / HMMA on sm_80, wgmma / HGMMA on sm_90).
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tempfile
from typing import Optional

import torch


# ---- tolerance -------------------------------------------------------------------------------------------------
def error_bound(baseline: torch.Tensor, golden: torch.Tensor, dtype: torch.dtype, factor: float = 2.0,
                scale: float | None = None) -> float:
    golden = golden.to(torch.float64)
    base_err = (baseline.to(torch.float64) - golden).abs().max().item() if golden.numel() else 0.0
    if scale is None:
        scale = max(1.0, golden.abs().max().item()) if golden.numel() else 1.0
    return factor * base_err + torch.finfo(dtype).eps * scale


def matmul_noise_scale(x: torch.Tensor, w_kn: torch.Tensor) -> float:
    """max(|x| @ |W|): the size of the terms a matmul sums, the scale of one rounding in any summation order."""
    if x.numel() == 0 or w_kn.numel() == 0:
        return 1.0
    return max(1.0, (x.abs().double() @ w_kn.abs().double()).max().item())


def assert_close(ours: torch.Tensor, golden: torch.Tensor, baseline: torch.Tensor, *, factor: float = 2.0,
                 scale: float | None = None, what: str = "") -> None:
    """Assert `ours` is within `factor` x the error of `baseline` (torch in ours' dtype) against `golden`."""
    assert ours.shape == golden.shape, f"{what}: shape {tuple(ours.shape)} != expected {tuple(golden.shape)}"
    assert not torch.isnan(ours).any(), f"{what}: NaN in the output"
    if ours.numel() == 0:
        return
    bound = error_bound(baseline, golden, ours.dtype, factor, scale)
    err = (ours.to(torch.float64) - golden.to(torch.float64)).abs().max().item()
    assert err <= bound, (f"{what}: max error {err:.3g} exceeds {factor}x torch's same-dtype error + 1 ulp "
                          f"({bound:.3g}); dtype {ours.dtype}")


# ---- static code generation --------------------------------------------------------------------------------------
def _triton_bin(name: str) -> str:
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} is not shipped with this triton ({path})")
    return path


@dataclasses.dataclass
class CodegenReport:
    capability: int
    ptx: str
    sass: str
    registers: int
    spill_bytes: int          # spill stores + spill loads reported by ptxas
    shared_bytes: int         # static + dynamic shared memory the launch needs
    ptxas_log: str

    def count(self, pattern: str, in_sass: bool = False) -> int:
        return len(re.findall(pattern, self.sass if in_sass else self.ptx))

    @property
    def uses_wgmma(self) -> bool:
        return "wgmma.mma_async" in self.ptx

    @property
    def uses_mma(self) -> bool:
        return re.search(r"\bmma\.sync\.aligned", self.ptx) is not None


@dataclasses.dataclass(frozen=True)
class CodegenJob:
    kernel: str                 # "module:function" of a @triton.jit kernel, e.g. "turbokernels.kernels.int4_mm:int4_mm_kernel"
    signature: tuple            # ((arg, type), ...) for the runtime arguments, e.g. ("x_ptr", "*fp16")
    constexprs: tuple           # ((arg, value), ...)
    capability: int             # 80, 86, 89, 90 ...
    num_warps: int = 4
    num_stages: int = 3
    divisible_by_16: tuple = ()  # arguments the launcher's JIT would see as multiples of 16


def _compile_one(job: CodegenJob) -> CodegenReport:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    module, name = job.kernel.split(":")
    fn = getattr(importlib.import_module(module), name)
    constexprs = dict(job.constexprs)
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in job.divisible_by_16}
    src = ASTSource(fn=fn, signature={**dict(job.signature), **{k: "constexpr" for k in constexprs}},
                    constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", job.capability, 32)
    options = make_backend(target).parse_options({"num_warps": job.num_warps,
                                                  "num_stages": job.num_stages}).__dict__
    kernel = triton.compile(src, target=target, options=options)
    ptx = kernel.asm["ptx"]
    arch = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path, cubin_path = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx_path, "w") as f:
            f.write(ptx)
        log = subprocess.run([_triton_bin("ptxas"), "-v", f"--gpu-name={arch}", ptx_path, "-o", cubin_path],
                             capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([_triton_bin("cuobjdump"), "--dump-sass", cubin_path],
                              capture_output=True, text=True, check=True).stdout
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return CodegenReport(capability=job.capability, ptx=ptx, sass=sass, registers=registers, spill_bytes=spills,
                         shared_bytes=int(kernel.metadata.shared), ptxas_log=log)


def compile_triton(jobs: list[CodegenJob]) -> list[CodegenReport]:
    """Compile kernels for their targets without a GPU. Under TRITON_INTERPRET=1 this process's @triton.jit
    functions are interpreter objects, so the compilation runs in one child process without it."""
    from .backends import triton_interpreting
    if not triton_interpreting():
        return [_compile_one(job) for job in jobs]
    import pickle
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        path_in, path_out = os.path.join(tmp, "jobs.pkl"), os.path.join(tmp, "reports.pkl")
        with open(path_in, "wb") as f:
            pickle.dump(jobs, f)
        code = ("import pickle, sys; from turbokernels.testing import _compile_one; "
                "jobs = pickle.load(open(sys.argv[1], 'rb')); "
                "pickle.dump([_compile_one(j) for j in jobs], open(sys.argv[2], 'wb'))")
        subprocess.run([sys.executable, "-c", code, path_in, path_out], env=env, check=True)
        with open(path_out, "rb") as f:
            return pickle.load(f)


def cuda_available() -> bool:
    return torch.cuda.is_available()


def skip_reason_no_ptxas() -> Optional[str]:
    try:
        _triton_bin("ptxas")
        _triton_bin("cuobjdump")
    except (ImportError, FileNotFoundError) as exc:
        return str(exc)
    return None
