"""The compiled extension, imported once and never required.

`HAS_CPU_EXT` is True when `fedamole_kernels._C` was built (the C++ CPU kernels); `HAS_CUDA_EXT` when it was
built with its CUDA kernels. Importing this module never initialises CUDA: the extension only registers ops.
"""

from __future__ import annotations

import os

import torch  # noqa: F401  (loads libc10/libtorch, which the extension links against)

EXT_IMPORT_ERROR: str | None = None
_C = None

if os.environ.get("FEDAMOLE_DISABLE_EXT", "0") in ("", "0"):
    try:
        from fedamole_kernels import _C  # noqa: F811
    except ImportError as exc:  # pure-Python install, or a build for another torch
        EXT_IMPORT_ERROR = str(exc)
else:
    EXT_IMPORT_ERROR = "disabled by FEDAMOLE_DISABLE_EXT"

HAS_CPU_EXT: bool = _C is not None
HAS_CUDA_EXT: bool = bool(_C is not None and getattr(_C, "WITH_CUDA", False))
