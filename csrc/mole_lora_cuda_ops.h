// Torch-level CUDA entry points of the fedamole_ext ops (compiled only with FEDAMOLE_WITH_CUDA, i.e. where torch has
// CUDA). They stack the weights, allocate outputs and call the torch-free launchers of csrc/cuda/.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace fedamole {

std::tuple<at::Tensor, at::Tensor, at::Tensor> mole_lora_fwd_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& expert_input, const at::Tensor& seg_offsets,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& router,
    const std::optional<at::Tensor>& shared_a, const std::optional<at::Tensor>& shared_b,
    const at::Tensor& expert_mask, int64_t top_k, double scaling, c10::string_view router_type);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mole_lora_bwd_cuda(
    const at::Tensor& grad_delta, const std::optional<at::Tensor>& grad_probs, const at::Tensor& x,
    const std::optional<at::Tensor>& expert_input, const at::Tensor& seg_offsets, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& router, const std::optional<at::Tensor>& shared_a,
    const std::optional<at::Tensor>& shared_b, const at::Tensor& expert_mask, const at::Tensor& probs,
    const at::Tensor& topk_idx, int64_t top_k, double scaling, c10::string_view router_type);

}  // namespace fedamole
