"""Build for fedamole: pure Python always, the C++ (and CUDA) extension `fedamole_kernels._C` when possible.

Environment variables (see the README table):
  FEDAMOLE_SKIP_CPP_BUILD=1   pure-Python install, no extension.
  FEDAMOLE_CUDA_ARCHS="80;90a" CUDA architectures to compile for (default: 80;90a).
  MAX_JOBS=N                   parallel compile jobs (read by torch.utils.cpp_extension).
"""

import glob
import os
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _say(message: str) -> None:
    print(f"[fedamole setup] {message}", file=sys.stderr)


def _cuda_arch_flags() -> list[str]:
    archs = os.environ.get("FEDAMOLE_CUDA_ARCHS", "80;90a").replace(",", ";").split(";")
    flags = []
    for arch in (a.strip() for a in archs if a.strip()):
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return flags


def _extensions():
    if os.environ.get("FEDAMOLE_SKIP_CPP_BUILD", "0") not in ("", "0"):
        _say("FEDAMOLE_SKIP_CPP_BUILD is set: pure-Python install (no cpu/cuda backends).")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _say(
            "torch is not importable in the build environment: skipping the C++ extension "
            "(install torch first and use `pip install --no-build-isolation`)."
        )
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        _say("no C++ compiler found: skipping the C++ extension.")
        return [], {}

    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not cpp_sources:
        _say("csrc/ has no C++ sources yet: skipping the C++ extension.")
        return [], {}
    # torch >= 2.10 headers use C++20 features (bit-field initialisers); C++17 only draws warnings there.
    cxx_std = "-std=c++20" if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 10) else "-std=c++17"
    cxx_flags = ["-O3", cxx_std, "-fopenmp"]
    define_macros = []
    link_args = ["-fopenmp"]
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    use_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None and bool(cuda_sources)
    if use_cuda:
        define_macros.append(("FEDAMOLE_WITH_CUDA", "1"))
        ext = cpp_extension.CUDAExtension(
            "fedamole_kernels._C",
            cpp_sources + cuda_sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", *_cuda_arch_flags()]},
            extra_link_args=link_args,
        )
        _say(f"building the C++ + CUDA extension ({len(cpp_sources)} .cpp, {len(cuda_sources)} .cu).")
    else:
        why = "torch has no CUDA" if torch.version.cuda is None else "nvcc/CUDA_HOME not found"
        _say(f"building the C++ (CPU) extension only ({why}).")
        ext = cpp_extension.CppExtension(
            "fedamole_kernels._C",
            cpp_sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_args,
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
