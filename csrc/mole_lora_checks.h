// Argument checks shared by every compiled entry point of `mole_lora` (CPU and CUDA kernels): each op checks the rank,
// shape and dtype of every tensor it dereferences, whatever the caller checked before, so that no input reachable
// from Python reads or writes out of bounds. Failures raise ValueError (TypeError for a wrong dtype) in Python, naming the tensor.
//
// Values: the CPU kernels check seg_offsets and topk_idx on the host (a scan of S+1 and T*k integers); the CUDA
// kernels cannot without a device->host sync, so they clamp in-kernel and raise through a device flag instead.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace fedamole {

// top_k above E only pads topk_idx with -1; past this it is a mistake (the Python API has the same bound).
constexpr int64_t kMaxPaddedTopK = 64;

struct MoLEDims {
  int64_t T = 0, S = 0, E = 0, r = 0, D = 0, O = 0, k = 0;
  int64_t R = 0;  // router rows: r (embedding router) or E (linear router)
  bool embedding = true, shared = false, has_xe = false;
};

// Ranks, shapes and dtypes of the forward's arguments (devices and values are the backend's business). `who` names
// the op in messages, e.g. "mole_lora (cpu)". Every float tensor must have x's dtype; seg_offsets int32 or int64;
// expert_mask bool; 1 <= top_k <= max(E, kMaxPaddedTopK); scaling finite.
MoLEDims check_mole_args(const char* who, const at::Tensor& x, const std::optional<at::Tensor>& expert_input,
                         const at::Tensor& seg_offsets, const at::Tensor& lora_a, const at::Tensor& lora_b,
                         const at::Tensor& router, const std::optional<at::Tensor>& shared_a,
                         const std::optional<at::Tensor>& shared_b, const at::Tensor& expert_mask, int64_t top_k,
                         double scaling, c10::string_view router_type);

// The backward's extra arguments: grad_delta [T, O] in x's dtype, grad_probs [T, E] floating (or absent), probs
// [T, E] in `probs_dtype`, topk_idx [T, k] int64.
void check_mole_bwd_args(const char* who, const MoLEDims& d, const at::Tensor& x, const at::Tensor& grad_delta,
                         const std::optional<at::Tensor>& grad_probs, const at::Tensor& probs,
                         at::ScalarType probs_dtype, const at::Tensor& topk_idx);

// Host tensors only. seg_offsets values: first 0, non-decreasing, last T. Returns them as int64.
std::vector<int64_t> check_offsets_values(const char* who, const at::Tensor& seg_offsets, int64_t T);

// Host tensors only. Every top-k id of token t (segment s) is -1 or an active slot of s (expert_mask[s, id]), and no
// slot appears twice in a row: the backward indexes its per-slot buffers with these ids.
void check_topk_values(const char* who, const int64_t* topk_idx, const bool* expert_mask,
                       const std::vector<int64_t>& offsets, int64_t E, int64_t k);

}  // namespace fedamole
