// CPU kernels of the `mole_lora` op (backend "cpu"); registered by csrc/bindings.cpp as fedamole_ext::*.
// Semantics: fedamole_kernels/reference.py (the oracle). Absent optional outputs are empty tensors.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace fedamole {

std::tuple<at::Tensor, at::Tensor, at::Tensor> mole_lora_fwd_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& expert_input, const at::Tensor& seg_offsets,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& router,
    const std::optional<at::Tensor>& shared_a, const std::optional<at::Tensor>& shared_b,
    const at::Tensor& expert_mask, int64_t top_k, double scaling, c10::string_view router_type);

// Returns grads of (x, expert_input, lora_a, lora_b, router, shared_a, shared_b); absent inputs get an empty tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mole_lora_bwd_cpu(
    const at::Tensor& grad_delta, const std::optional<at::Tensor>& grad_probs, const at::Tensor& x,
    const std::optional<at::Tensor>& expert_input, const at::Tensor& seg_offsets, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& router, const std::optional<at::Tensor>& shared_a,
    const std::optional<at::Tensor>& shared_b, const at::Tensor& expert_mask, const at::Tensor& probs,
    const at::Tensor& topk_idx, int64_t top_k, double scaling, c10::string_view router_type);

// fedamole_ext::cpu_tuning_reload: rereads $FEDAMOLE_CPU_SPLIT_MAX_TOKENS and $FEDAMOLE_CPU_PARTIAL_BYTES, which the
// CPU kernels otherwise read once (csrc/mole_lora_cpu_common.cpp); returns [split max tokens (-1: unset), budget].
std::vector<int64_t> cpu_tuning_reload();

// fedamole_ext::mole_lora (csrc/mole_lora_autograd.cpp): forward with a C++ autograd node whose backward is
// mole_lora_bwd; the Autograd kernel, and the kernel for dispatch below autograd (inference mode). Weights may also
// come without their segment dimension (one segment: lora_a [E, r, d_in], ..., expert_mask [E]); their gradients
// then have that shape too.
std::tuple<at::Tensor, at::Tensor, at::Tensor> mole_lora_autograd(
    const at::Tensor& x, const std::optional<at::Tensor>& expert_input, const at::Tensor& seg_offsets,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& router,
    const std::optional<at::Tensor>& shared_a, const std::optional<at::Tensor>& shared_b,
    const at::Tensor& expert_mask, int64_t top_k, double scaling, c10::string_view router_type);
std::tuple<at::Tensor, at::Tensor, at::Tensor> mole_lora_no_autograd(
    const at::Tensor& x, const std::optional<at::Tensor>& expert_input, const at::Tensor& seg_offsets,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& router,
    const std::optional<at::Tensor>& shared_a, const std::optional<at::Tensor>& shared_b,
    const at::Tensor& expert_mask, int64_t top_k, double scaling, c10::string_view router_type);

}  // namespace fedamole
