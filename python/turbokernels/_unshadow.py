"""Keep this repository's top-level kernels/ folder from shadowing Hugging Face's `kernels` package.

Our Triton sources live in <checkout>/kernels/ (installed as turbokernels.kernels). When a checkout's root is on
sys.path -- `python -m pytest` or `python -m turbokernels.cli` run from the root, the bench scripts -- a plain
`import kernels` finds that folder first. transformers >= 5.25 imports Hugging Face's `kernels` package, so it would
get ours and fail (ImportError: cannot import name 'CUDAProperties' from 'kernels'). Imported before transformers,
turbokernels puts the real package under that name; nothing changes when no checkout is on sys.path or when
Hugging Face's package is not installed.
"""
import importlib.machinery
import importlib.util
import os
import sys


def _is_our_checkout_kernels(origin: str) -> bool:
    folder = os.path.dirname(origin)
    root = os.path.dirname(folder)
    return (os.path.basename(folder) == "kernels" and os.path.isfile(os.path.join(root, "setup.py"))
            and os.path.isdir(os.path.join(root, "python", "turbokernels")))


def unshadow_hf_kernels() -> None:
    if "kernels" in sys.modules:
        return
    ours = importlib.machinery.PathFinder.find_spec("kernels")
    if ours is None or ours.origin is None or not _is_our_checkout_kernels(ours.origin):
        return
    root = os.path.realpath(os.path.dirname(os.path.dirname(ours.origin)))
    others = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != root]
    theirs = importlib.machinery.PathFinder.find_spec("kernels", others)
    if theirs is None or theirs.loader is None:
        return
    module = importlib.util.module_from_spec(theirs)
    sys.modules["kernels"] = module
    try:
        theirs.loader.exec_module(module)
    except Exception:  # a broken third-party package must not break turbokernels' import
        sys.modules.pop("kernels", None)
