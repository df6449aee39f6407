"""Keep this repository's top-level kernels/ folder from shadowing Hugging Face's `kernels` package.

Our Triton sources live in <checkout>/kernels/ (installed as turbokernels.kernels). When a checkout's root is on
sys.path -- `python -m pytest` or `python -m turbokernels.cli` run from the root, the bench scripts -- a plain
`import kernels` finds that folder first. transformers >= 5.25 imports Hugging Face's `kernels` package, so it would
get ours and fail (ImportError: cannot import name 'CUDAProperties' from 'kernels'). `import turbokernels` adds a
finder that, for the name `kernels` only, looks past a checkout's root; it acts at the time of that import (whenever
the root was put on sys.path), and changes nothing when no checkout is on sys.path or Hugging Face's package is not
installed (then the usual search finds what it always found).
"""
import importlib.abc
import importlib.machinery
import os
import sys


def _is_our_checkout_kernels(origin: str) -> bool:
    folder = os.path.dirname(origin)
    root = os.path.dirname(folder)
    return (os.path.basename(folder) == "kernels" and os.path.isfile(os.path.join(root, "setup.py"))
            and os.path.isdir(os.path.join(root, "python", "turbokernels")))


class _PastCheckoutKernels(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "kernels":
            return None
        first = importlib.machinery.PathFinder.find_spec("kernels")
        if first is None or first.origin is None or not _is_our_checkout_kernels(first.origin):
            return None
        root = os.path.realpath(os.path.dirname(os.path.dirname(first.origin)))
        others = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != root]
        return importlib.machinery.PathFinder.find_spec("kernels", others)


def unshadow_hf_kernels() -> None:
    if not any(isinstance(f, _PastCheckoutKernels) for f in sys.meta_path):
        sys.meta_path.insert(0, _PastCheckoutKernels())
