// The only binding file of fedamole_kernels._C: registers the fedamole_ext::* ops (CPU kernels always, CUDA kernels
// when built with FEDAMOLE_WITH_CUDA) and defines the Python module, whose one attribute WITH_CUDA tells
// fedamole_kernels._ext whether the CUDA kernels are in. The module is plain C API (no pybind11): the ops are reached
// through torch.ops, and skipping pybind keeps the build fast.

#include <Python.h>
#include <torch/library.h>

#include "mole_lora_cpu.h"
#ifdef FEDAMOLE_WITH_CUDA
#include "mole_lora_cuda_ops.h"
#endif

TORCH_LIBRARY(fedamole_ext, m) {
  m.def(
      "mole_lora_fwd(Tensor x, Tensor? expert_input, Tensor seg_offsets, Tensor lora_a, Tensor lora_b, "
      "Tensor router, Tensor? shared_a, Tensor? shared_b, Tensor expert_mask, int top_k, float scaling, "
      "str router_type) -> (Tensor, Tensor, Tensor)");
  m.def(
      "mole_lora_bwd(Tensor grad_delta, Tensor? grad_probs, Tensor x, Tensor? expert_input, Tensor seg_offsets, "
      "Tensor lora_a, Tensor lora_b, Tensor router, Tensor? shared_a, Tensor? shared_b, Tensor expert_mask, "
      "Tensor probs, Tensor topk_idx, int top_k, float scaling, str router_type) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Forward with a C++ autograd node (backward: mole_lora_bwd): one dispatcher call per eager forward.
  m.def(
      "mole_lora(Tensor x, Tensor? expert_input, Tensor seg_offsets, Tensor lora_a, Tensor lora_b, "
      "Tensor router, Tensor? shared_a, Tensor? shared_b, Tensor expert_mask, int top_k, float scaling, "
      "str router_type) -> (Tensor, Tensor, Tensor)");
  // Test hook: the CPU kernels read their $FEDAMOLE_CPU_* tuning variables once; this rereads them (see
  // csrc/mole_lora_cpu_common.cpp).
  m.def("cpu_tuning_reload() -> int[]", &fedamole::cpu_tuning_reload);
}

TORCH_LIBRARY_IMPL(fedamole_ext, CPU, m) {
  m.impl("mole_lora_fwd", &fedamole::mole_lora_fwd_cpu);
  m.impl("mole_lora_bwd", &fedamole::mole_lora_bwd_cpu);
}

// Device-agnostic: both call mole_lora_fwd through the dispatcher (the Autograd kernel records the node; the other
// serves dispatch below autograd, e.g. inference mode).
TORCH_LIBRARY_IMPL(fedamole_ext, Autograd, m) { m.impl("mole_lora", &fedamole::mole_lora_autograd); }
TORCH_LIBRARY_IMPL(fedamole_ext, CompositeExplicitAutograd, m) {
  m.impl("mole_lora", &fedamole::mole_lora_no_autograd);
}

#ifdef FEDAMOLE_WITH_CUDA
TORCH_LIBRARY_IMPL(fedamole_ext, CUDA, m) {
  m.impl("mole_lora_fwd", &fedamole::mole_lora_fwd_cuda);
  m.impl("mole_lora_bwd", &fedamole::mole_lora_bwd_cuda);
}
#define FEDAMOLE_WITH_CUDA_VALUE Py_True
#else
#define FEDAMOLE_WITH_CUDA_VALUE Py_False
#endif

static struct PyModuleDef fedamole_c_module = {PyModuleDef_HEAD_INIT, "fedamole_kernels._C",
                                               "fedamole C++/CUDA kernels (ops under torch.ops.fedamole_ext)", -1,
                                               nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&fedamole_c_module);
  if (module == nullptr) return nullptr;
  Py_INCREF(FEDAMOLE_WITH_CUDA_VALUE);
  if (PyModule_AddObject(module, "WITH_CUDA", FEDAMOLE_WITH_CUDA_VALUE) < 0) {
    Py_DECREF(FEDAMOLE_WITH_CUDA_VALUE);
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
