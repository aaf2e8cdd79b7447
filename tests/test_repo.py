"""The README's test command is exactly what CI runs; the package imports without a GPU and without _C."""

import os
import re

from tests.helpers import REPO_ROOT as ROOT


def test_ci_runs_the_readme_test_command():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    assert len(blocks) == 2, "the README gives exactly two commands for a fresh machine"
    test_cmd = blocks[1].strip()
    assert "pytest" in test_cmd and "TRITON_INTERPRET=1" in test_cmd
    ci_lines = [ln.strip() for ln in ci.splitlines() if ln.strip() and not ln.startswith("#")]
    assert test_cmd in ci_lines


def test_has_extension_is_a_bool():
    import lora_kernels

    assert isinstance(lora_kernels.has_extension(), bool)


def test_bench_scripts_run_from_a_plain_checkout():
    """Every bench script that imports lora_kernels puts the checkout on sys.path first, so a failed or missing
    install does not stop it with an ImportError."""
    import glob

    root = ROOT
    scripts = glob.glob(os.path.join(root, "bench", "*.py")) + glob.glob(os.path.join(root, "bench", "*", "*.py"))
    for path in scripts:
        src = open(path, encoding="utf-8").read()
        first = re.search(r"(?m)^(from lora_kernels|import lora_kernels)", src)
        if first is None:
            continue
        head = src[:first.start()]
        assert "sys.path[:0]" in head or "sys.path.insert(0, os.path.dirname(os.path.dirname(" in head, (
            f"{os.path.relpath(path, root)} imports lora_kernels before putting the checkout on sys.path")
