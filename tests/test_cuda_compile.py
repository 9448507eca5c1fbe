"""Every CUDA source compiles for sm_80 and sm_90a with the machine's nvcc (the kernels cannot run on CPU machines).

The .cu files are torch-free by design (csrc/cuda/mole_lora_kernels.cuh), so nothing but the CUDA toolkit is needed.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CU_FILES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
NVCC = shutil.which("nvcc") or (
    shutil.which("/usr/local/cuda/bin/nvcc") if Path("/usr/local/cuda/bin/nvcc").exists() else None
)


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: p.name)
def test_cu_compiles_for_sm80_and_sm90a(source, tmp_path):
    cmd = [
        NVCC,
        "-std=c++17",
        "-O3",
        "-Werror",
        "all-warnings",
        "-gencode",
        "arch=compute_80,code=sm_80",
        "-gencode",
        "arch=compute_90a,code=sm_90a",
        "-I",
        str(ROOT / "csrc"),
        "-c",
        str(source),
        "-o",
        str(tmp_path / (source.stem + ".o")),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"nvcc failed for {source.name}:\n{result.stdout}\n{result.stderr}"


def test_cuda_sources_exist():
    assert CU_FILES, "csrc/cuda/ has no .cu files"
