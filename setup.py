"""Build lora_kernels; the compiled extension ``lora_kernels._C`` is optional.

* C++ sources in csrc/ (``*.cpp``) are built for CPU wherever a compiler and torch are present.
* CUDA sources (``csrc/cuda/*.cu`` and their torch bindings ``csrc/cuda/*.cpp``) are added when nvcc and a CUDA
  build of torch are present.
* Any failure to build the extension leaves a pure-Python install that works (more slowly) and says so once
  at run time.  ``LORA_KERNELS_NO_EXT=1`` skips the extension entirely.

Install with ``pip install --no-build-isolation -e .`` so the build uses the torch already installed (an isolated
build environment would download a second, CUDA, torch).  pyproject.toml holds the package metadata and the
``[build-system]`` table that makes every pip build through PEP 517/660 (never ``setup.py develop``, which in
setuptools >= 80 re-runs pip with build isolation: no torch there, so no extension); this file only adds the extension.
"""

import glob
import os
import sys

from setuptools import setup


def get_extensions():
    if os.environ.get("LORA_KERNELS_NO_EXT", "0") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as exc:  # no torch at build time: pure-Python install
        print(f"lora_kernels: building without the C++ extension ({exc})", file=sys.stderr)
        return [], {}
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    cuda_cpp = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    if not cpp:
        return [], {}
    cxx_flags = ["-O3", "-std=c++17"]
    with_cuda = bool(cu) and torch.version.cuda is not None and CUDA_HOME is not None
    if os.environ.get("LORA_KERNELS_FORCE_CUDA", "0") == "1" and cu and CUDA_HOME is not None:
        with_cuda = True
    if with_cuda:
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
        nvcc = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]
        if not archs:
            nvcc += ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
        ext = CUDAExtension("lora_kernels._C", cpp + cuda_cpp + cu, define_macros=[("WITH_CUDA", None)],
                            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc})
    else:
        ext = CppExtension("lora_kernels._C", cpp, extra_compile_args={"cxx": cxx_flags})
    return [ext], {"build_ext": _OptionalBuildExt.with_base(BuildExtension)}


class _OptionalBuildExt:
    @staticmethod
    def with_base(base):
        class OptionalBuildExt(base):
            def run(self):
                try:
                    super().run()
                except Exception as exc:  # the package works without the extension
                    print(f"lora_kernels: C++ extension not built ({exc}); continuing without it", file=sys.stderr)

            def build_extension(self, ext):
                try:
                    super().build_extension(ext)
                except Exception as exc:
                    print(f"lora_kernels: C++ extension not built ({exc}); continuing without it", file=sys.stderr)

            def copy_file(self, infile, outfile, *args, **kwargs):
                # The editable build copies _C*.so into lora_kernels/.  Unlink the old one first: copying over it
                # in place would change the pages of a library that running processes have mapped (SIGBUS there).
                if os.path.isfile(outfile) and os.path.basename(outfile).startswith("_C."):
                    os.unlink(outfile)
                return super().copy_file(infile, outfile, *args, **kwargs)

        return OptionalBuildExt.with_options(use_ninja=True) if hasattr(OptionalBuildExt, "with_options") else OptionalBuildExt


ext_modules, cmdclass = get_extensions()

# Metadata (name, version, dependencies, packages) lives in pyproject.toml; passing any of it here too would conflict.
setup(ext_modules=ext_modules, cmdclass=cmdclass)
