"""The Makefile's up-to-date check for `make install` (no torch import: it runs on every `make`).

    python tools/install_stamp.py [--record] VAR...

prints the stamp file that stands for "installed, for this interpreter and these build variables", or with --record
(after a successful install) writes it.

The stamp's name is a hash of what an install depends on besides the files Make already compares by time (setup.py,
pyproject.toml, the Makefile, csrc/): the interpreter and its environment (sys.prefix, the Python version, every
installed distribution with its version, where turbokernels is installed from) and the values of the variables
named (the Makefile's BUILD_ENV: TORCH_CUDA_ARCH_LIST, TURBOKERNELS_*, CFLAGS...). The stamp holds the mtime and
size of the in-place turbokernels/_C*.so that install produced: if another build replaced or removed it (another
venv with the same Python version, a manual `pip install -e .`), the printed name ends in `.stale`, which does not
exist, and Make installs again.
"""
import hashlib
import importlib.metadata
import os
import site
import sys
import sysconfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _key(env_names) -> str:
    parts = [sys.prefix, sys.executable, sys.version]
    parts += [f"{name}={os.environ.get(name, '')}" for name in env_names]
    dirs = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
    for d in dirs:
        if os.path.isdir(d):
            parts += sorted(n for n in os.listdir(d) if n.endswith((".dist-info", ".egg-info", ".egg-link", ".pth")))
    try:
        parts.append(importlib.metadata.distribution("turbokernels").read_text("direct_url.json") or "")
    except importlib.metadata.PackageNotFoundError:
        parts.append("turbokernels not installed")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _so_state() -> str:
    so = os.path.join(ROOT, "python", "turbokernels", "_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    try:
        st = os.stat(so)
    except OSError:
        return "no _C\n"
    return f"{so} {st.st_mtime_ns} {st.st_size}\n"


def main() -> None:
    record = sys.argv[1:2] == ["--record"]
    stamp = os.path.join(ROOT, "build", "stamps", "install-" + _key(sys.argv[1 + record:]))
    if record:
        os.makedirs(os.path.dirname(stamp), exist_ok=True)
        with open(stamp, "w") as f:
            f.write(_so_state())
        return
    try:
        with open(stamp) as f:
            fresh = f.read() == _so_state()
    except OSError:
        fresh = True  # no stamp: Make sees a missing target and installs
    print(stamp if fresh else stamp + ".stale")


if __name__ == "__main__":
    main()
