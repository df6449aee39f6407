"""Build turbokernels: the Python package, the Triton kernels and the optional C++/CUDA extension turbokernels._C.

What gets built (decided here, once, from the machine and two switches):
  * no torch importable, or no C++ compiler      -> pure-Python install (reference + Triton backends still work)
  * C++ compiler                                 -> _C with the CPU kernels in csrc/ (ops.cpp, cpu/*.cpp)
  * + nvcc and a CUDA build of torch             -> _C also holds csrc/cuda/*.cu
Switches (environment):
  TURBOKERNELS_CUDA=0/1      force the CUDA sources off / on (on: fail if nvcc or CUDA torch is missing)
  TURBOKERNELS_NO_EXT=1      skip _C entirely
  TURBOKERNELS_REQUIRE_EXT=1 a failed _C build fails the install (CI sets it; users get a warning and the fallbacks)
  TORCH_CUDA_ARCH_LIST       defaults to "8.0;8.6;8.9;9.0a" (there is no GPU to detect at build time)
Install with `pip install --no-build-isolation .` so that _C is compiled against the torch you will run.
Compiled objects are kept in build/ext/ (one folder per interpreter, torch and arch list), so a rebuild recompiles
only what changed, also under pip's editable install; `rm -rf build` (`make clean`) starts over.
"""
import glob
import hashlib
import os
import re
import shutil
import sys
import warnings

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGES = ["turbokernels", "turbokernels.kernels", "turbokernels.bench", "turbokernels.ops",
            "turbokernels.reference", "turbokernels.formats", "turbokernels.nn", "turbokernels.integrations",
            "turbokernels.compress"]
# kernels/ and bench/ live at the top of the repository and install as turbokernels.kernels / turbokernels.bench.
PACKAGE_DIR = {"turbokernels": "python/turbokernels", "turbokernels.kernels": "kernels", "turbokernels.bench": "bench"}
for sub in PACKAGES[3:]:
    PACKAGE_DIR[sub] = "python/" + sub.replace(".", "/")


def _flag(name):
    value = os.environ.get(name)
    return None if value in (None, "") else value not in ("0", "false", "False", "no")


def _extensions():
    if _flag("TURBOKERNELS_NO_EXT"):
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        warnings.warn("turbokernels: torch is not importable at build time; installing without turbokernels._C "
                      "(install torch first and use `pip install --no-build-isolation`)")
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        warnings.warn("turbokernels: no C++ compiler found; installing without turbokernels._C")
        return [], {}

    cpu_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp") + glob.glob("csrc/emu/*.cpp"))
    # csrc/cuda/*.cu hold the device code (nvcc, once per architecture, no torch headers where it can be helped);
    # csrc/cuda/*.cpp their torch side (the C++ compiler, once, with CUDA's include paths)
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    want_cuda = _flag("TURBOKERNELS_CUDA")
    cuda_home = os.environ.get("CUDA_HOME") or ("/usr/local/cuda" if os.path.isdir("/usr/local/cuda") else None)
    can_cuda = bool(torch.version.cuda) and cuda_home is not None and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))
    if want_cuda and not can_cuda:
        raise RuntimeError("TURBOKERNELS_CUDA=1 but nvcc (CUDA_HOME) or a CUDA build of torch is missing")
    use_cuda = bool(cuda_sources) and can_cuda and want_cuda is not False

    # No -std: torch.utils.cpp_extension adds the one the installed torch needs (c++17 up to 2.12, c++20 from
    # 2.13 on, whose headers refuse to compile as C++17).
    # -g0: Python's CFLAGS say -g, and debug info for torch's headers is most of the C++ compile time (2 min 07 s
    # instead of 3 min 39 s for the default build on 2 cores); it comes after CFLAGS, so it wins
    cxx = ["-O3", "-fopenmp", "-g0"]
    ext_kwargs = dict(
        name="turbokernels._C",
        sources=cpu_sources + (cuda_sources if use_cuda else []),
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx + (["-DTURBOKERNELS_WITH_CUDA"] if use_cuda else [])},
        extra_link_args=["-fopenmp"],
    )
    if use_cuda:
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home
        # No GPU to detect here: an explicit list, with 9.0a (not an extra -gencode: any flag with "arch" in it
        # makes torch ignore TORCH_CUDA_ARCH_LIST).
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;8.6;8.9;9.0a")
        import site
        for base in site.getsitepackages() + [site.getusersitepackages()]:
            inc = os.path.join(base, "nvidia", "cu13", "include")
            if os.path.isdir(inc):
                ext_kwargs["include_dirs"].append(inc)
        ext_kwargs["extra_compile_args"]["nvcc"] = ["-O3", "-lineinfo", "-DTURBOKERNELS_WITH_CUDA"]
        ext = cpp_extension.CUDAExtension(**ext_kwargs)
    else:
        ext = cpp_extension.CppExtension(**ext_kwargs)

    base = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    # The objects live in build/ext/<python>-<torch>-<archs>-<venv hash>/, one folder per interpreter and arch list,
    # so that ninja recompiles only what changed (a source, a header it includes, or the compile command).
    arch_key = re.sub(r"[^0-9A-Za-z.+]+", "_", os.environ["TORCH_CUDA_ARCH_LIST"]) if use_cuda else "cpu"
    build_temp = os.path.join(ROOT, "build", "ext", "-".join((
        sys.implementation.cache_tag, "torch" + torch.__version__, arch_key,
        hashlib.sha256(sys.prefix.encode()).hexdigest()[:8])))

    class OptionalBuildExt(base):
        """A failed _C build warns and installs without it, unless TURBOKERNELS_REQUIRE_EXT=1. Builds in the
        persistent build_temp above: pip's editable install (PEP 660) passes a new temporary build_temp and build_lib
        on every run, which made every `pip install -e .` compile everything again."""

        def finalize_options(self):
            super().finalize_options()
            self.build_temp = build_temp
            self.force = True  # always run the build: ninja, not the .so's mtime, decides what is out of date

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any compiler/linker failure
                if _flag("TURBOKERNELS_REQUIRE_EXT"):
                    raise
                warnings.warn(f"turbokernels: building turbokernels._C failed ({exc}); "
                              "installing without it (Triton and reference backends still work)")

    return [ext], {"build_ext": OptionalBuildExt}


ext_modules, cmdclass = _extensions()
setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
