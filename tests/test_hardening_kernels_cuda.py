"""The CUDA op binding (csrc/cuda_ops.cpp) compiles against this torch's headers, checked on CPU machines.

The binding is built only where torch has CUDA, so without this check an error in its argument checks would first
show on a GPU machine. A CPU build of torch ships the c10/cuda headers but not the generated
c10/cuda/impl/cuda_cmake_macros.h; an empty stand-in is enough for a syntax-only compile.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[1]
CUDA_INCLUDE = Path("/usr/local/cuda/include")
TORCH_INCLUDES = cpp_extension.include_paths()


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found")
@pytest.mark.skipif(not (CUDA_INCLUDE / "cuda_runtime.h").exists(), reason="CUDA toolkit headers not found")
@pytest.mark.skipif(
    not (Path(TORCH_INCLUDES[0]) / "c10" / "cuda" / "CUDAStream.h").exists(), reason="torch has no c10/cuda headers"
)
def test_cuda_binding_compiles(tmp_path):
    shim = tmp_path / "c10" / "cuda" / "impl"
    shim.mkdir(parents=True)
    (shim / "cuda_cmake_macros.h").write_text("#pragma once\n")
    cmd = [
        "g++",
        "-std=c++20",
        "-fsyntax-only",
        "-Wall",
        "-Werror",
        "-DFEDAMOLE_WITH_CUDA",
        f"-I{tmp_path}",
        *(f"-I{p}" for p in TORCH_INCLUDES),
        f"-I{CUDA_INCLUDE}",
        f"-I{ROOT / 'csrc'}",
        str(ROOT / "csrc" / "cuda_ops.cpp"),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"cuda_ops.cpp does not compile:\n{result.stderr[-4000:]}"
