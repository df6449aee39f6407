"""A checkout's top-level kernels/ (our Triton sources) must not hide Hugging Face's `kernels` package once
turbokernels is imported: transformers >= 5.25 imports it, and 9 tests failed on a fresh clone when it found ours.
Each case runs in a fresh interpreter, since the fix acts on sys.modules at import time."""
import os
import subprocess
import sys
import textwrap

def _fake_checkout(tmp_path):
    root = tmp_path / "checkout"
    (root / "kernels").mkdir(parents=True)
    (root / "kernels" / "__init__.py").write_text("WHO = 'checkout'\n")
    (root / "python" / "turbokernels").mkdir(parents=True)
    (root / "setup.py").write_text("")
    return root


def _fake_site(tmp_path, body):
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text(body)
    return site


def _who(cwd, front):
    """Import turbokernels with `front` ahead of sys.path (as `python -m` from a checkout puts its root), then
    `kernels`; returns kernels.WHO."""
    code = textwrap.dedent(f"""
        import sys
        sys.path[:0] = {[str(p) for p in front]!r}
        import turbokernels, kernels
        print(kernels.WHO)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def test_hugging_face_kernels_wins_over_a_checkout_root(tmp_path):
    root = _fake_checkout(tmp_path)
    site = _fake_site(tmp_path, "WHO = 'hf'\n")
    assert _who(root, [root, site]) == "hf"


def test_checkout_kernels_untouched_without_hugging_face_package(tmp_path):
    """Hugging Face's package may be installed here (transformers >= 5.25 requires it): the interpreter drops every
    sys.path entry holding a `kernels` after turbokernels is imported."""
    root = _fake_checkout(tmp_path)
    code = textwrap.dedent(f"""
        import os, sys
        import turbokernels
        sys.modules.pop("kernels", None)
        sys.path[:] = [{str(root)!r}] + [p for p in sys.path if not os.path.exists(os.path.join(p or ".", "kernels"))]
        import kernels
        print(kernels.WHO)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "checkout"


def test_root_put_on_sys_path_after_importing_turbokernels(tmp_path):
    """A script that imports turbokernels and then adds a checkout's root (as a notebook might)."""
    root = _fake_checkout(tmp_path)
    site = _fake_site(tmp_path, "WHO = 'hf'\n")
    code = textwrap.dedent(f"""
        import sys
        import turbokernels
        sys.path[:0] = [{str(root)!r}, {str(site)!r}]
        import kernels
        print(kernels.WHO)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "hf"


def test_not_a_checkout_is_left_alone(tmp_path):
    """A folder named kernels that is not our checkout's (no setup.py / python/turbokernels beside it) is the user's."""
    plain = tmp_path / "project"
    (plain / "kernels").mkdir(parents=True)
    (plain / "kernels" / "__init__.py").write_text("WHO = 'user'\n")
    site = _fake_site(tmp_path, "WHO = 'hf'\n")
    assert _who(plain, [plain, site]) == "user"
