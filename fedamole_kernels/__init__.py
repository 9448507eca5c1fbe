"""fedamole_kernels: fused top-k routed mixture-of-LoRA-experts ops (reference, Triton, C++ and CUDA backends).

    from fedamole_kernels import mole_lora, available_backends
    delta, probs, topk_idx = mole_lora(x, seg_offsets, lora_a, lora_b, router, top_k=2, scaling=2.0)

Importing this package never initialises CUDA and never requires the compiled extension.
"""

from fedamole_kernels._ext import HAS_CPU_EXT, HAS_CUDA_EXT
from fedamole_kernels.backends import available_backends, resolve_backend
from fedamole_kernels.mole_lora import mole_lora

__all__ = ["HAS_CPU_EXT", "HAS_CUDA_EXT", "available_backends", "mole_lora", "resolve_backend"]
__version__ = "0.1.0"
