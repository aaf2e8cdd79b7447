"""The build: the compiled extension ``lora_kernels._C`` is there wherever it can be built, and its absence is said.

``setup.py`` builds ``lora_kernels._C`` wherever a C++ compiler exists and quietly leaves a working pure-Python
install when the build fails.  Quietly is the danger: a pip that took the ``setup.py develop`` route re-ran pip with
build isolation, found no torch and installed without the extension, and nothing failed.  So here a missing ``_C``
where a C++ compiler exists is a test failure.

``LORA_KERNELS_NO_EXT=1`` (the same switch ``setup.py`` reads to skip the extension) marks an install made without
the extension on purpose: with it set, the compiler check is skipped.  Without the extension everything still
works; where that is slower (rsvd's k×k SVD on CUDA, or ``LORA_KERNELS_SMALL_SVD=jacobi``) it is said once in the
log, and a built extension that does not load is said once at import.
"""

import ast
import contextlib
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch

import lora_kernels
from lora_kernels import _backend, _extension, rsvd

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def _cxx_compiler():
    """The C++ compiler the build would use (torch's cpp_extension: $CXX, else c++), or another one on PATH."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name.split()[0]):
            return shutil.which(name.split()[0])
    return None


def test_extension_is_built_where_a_compiler_exists():
    if os.environ.get("LORA_KERNELS_NO_EXT", "0") == "1":
        pytest.skip("LORA_KERNELS_NO_EXT=1: installed without the extension on purpose")
    cxx = _cxx_compiler()
    if cxx is None:
        pytest.skip("no C++ compiler on PATH: the pure-Python install is the expected one")
    python_h = os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h"))
    assert lora_kernels.has_extension("cpu"), (
        f"a C++ compiler exists ({cxx}) but lora_kernels._C is missing: {_extension.unavailable_reason()}. "
        f"Python.h {'found' if python_h else 'NOT found (install the Python headers)'}. Reinstall with "
        "`python3 -m pip install --no-build-isolation -e . -v` and read the build log, or set LORA_KERNELS_NO_EXT=1 "
        "if this install is meant to go without the extension.")


def test_missing_extension_is_said_once_and_everything_works(monkeypatch, caplog):
    monkeypatch.setattr(_extension, "_C", None)
    # The path that would use _C on CPU: LORA_KERNELS_SMALL_SVD=jacobi (read at import by lora_kernels.settings).
    monkeypatch.setenv("LORA_KERNELS_SMALL_SVD", "jacobi")
    try:
        from lora_kernels import settings
        jacobi = settings.override(small_svd="jacobi")
    except ImportError:
        jacobi = contextlib.nullcontext()
    _backend._say_once.cache_clear()
    assert not lora_kernels.has_extension("cpu") and not lora_kernels.has_extension("cuda")
    A = torch.randn(3, 40, 10, dtype=torch.float64) @ torch.randn(3, 10, 30, dtype=torch.float64)  # rank 10 < k
    want = torch.linalg.svdvals(A)[..., :4]
    try:
        with caplog.at_level("WARNING", logger="lora_kernels"), jacobi:
            for _ in range(3):
                U, S, V = rsvd(A, 4)
                assert torch.allclose(S, want, rtol=1e-8, atol=0)
    finally:
        _backend._say_once.cache_clear()
    said = [r for r in caplog.records if r.name == "lora_kernels" and "lora_kernels._C" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in caplog.records]


_IMPORT_FROM_COPY = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]  # not the installed package
sys.path.insert(0, sys.argv[1])
import lora_kernels
from lora_kernels import _extension
assert lora_kernels.__file__.startswith(sys.argv[1]), lora_kernels.__file__
print("has_extension", lora_kernels.has_extension("cpu"))
print("reason", _extension.unavailable_reason())
"""


@pytest.mark.parametrize("broken", [False, True], ids=["not-built", "built-but-broken"])
def test_extension_that_does_not_load_is_said_once_at_import(tmp_path, broken):
    """A copy of the package without _C imports silently; with a _C that does not load it says so once."""
    shutil.copytree(os.path.join(ROOT, "lora_kernels"), tmp_path / "lora_kernels",
                    ignore=shutil.ignore_patterns("__pycache__", "_C.*"))
    if broken:
        (tmp_path / "lora_kernels" / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))).write_bytes(b"not a library")
    out = subprocess.run([sys.executable, "-c", _IMPORT_FROM_COPY, str(tmp_path)], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, out.stderr
    assert "has_extension False" in out.stdout
    said = [ln for ln in out.stderr.splitlines() if "lora_kernels._C" in ln]
    if broken:
        assert len(said) == 1 and "does not load" in said[0], out.stderr
    else:
        assert said == [] and "reason lora_kernels._C was not built" in out.stdout, out.stderr


def test_build_config_is_in_one_place():
    """pyproject.toml forces the PEP 517/660 build (never `setup.py develop`) and holds all metadata; setup.py only
    adds the extension; pytest is configured once."""
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        cfg = tomllib.load(f)
    bs = cfg["build-system"]
    assert bs["build-backend"] == "setuptools.build_meta"
    assert any(r.replace(" ", "").startswith("setuptools>=") for r in bs["requires"])
    assert not any(r.startswith("torch") for r in bs["requires"]), "an isolated build would fetch a second torch"
    assert cfg["project"]["name"] == "lora_kernels" and "version" in cfg["project"]["dynamic"]
    assert cfg["tool"]["pytest"]["ini_options"]["testpaths"] == ["tests"]
    tree = ast.parse(open(os.path.join(ROOT, "setup.py"), encoding="utf-8").read())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "setup"]
    assert len(calls) == 1 and {k.arg for k in calls[0].keywords} <= {"ext_modules", "cmdclass"}
    for other in ("setup.cfg", "pytest.ini", "tox.ini"):
        path = os.path.join(ROOT, other)
        assert not os.path.exists(path) or "pytest" not in open(path, encoding="utf-8").read(), other


def test_ci_sets_omp_threads_before_the_tests():
    lines = [ln.strip() for ln in open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8")
             if ln.strip() and not ln.lstrip().startswith("#")]
    omp = [i for i, ln in enumerate(lines) if ln.startswith("export OMP_NUM_THREADS=") and "nproc" in ln]
    test = [i for i, ln in enumerate(lines) if "pytest" in ln]
    assert omp and test and omp[0] < test[0]
