// The problem description shared by every compiled entry point of `mole_lora` (CPU and CUDA kernels): the op's inputs
// and their derived sizes, built once per binding call by make_problem, which runs the one complete set of argument
// checks. Each op checks the rank, shape, dtype, device (and, where the kernels read raw pointers, contiguity) of every
// tensor it dereferences, whatever the caller checked before, so that no input reachable from Python reads or writes
// out of bounds. Failures raise ValueError (TypeError for a wrong dtype) in Python, naming the tensor.
//
// Values: the CPU kernels check seg_offsets and topk_idx on the host (a scan of S+1 and T*k integers); the CUDA
// kernels cannot without a device->host sync, so they clamp in-kernel and raise through a device flag instead.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace fedamole {

// top_k above E only pads topk_idx with -1; past this it is a mistake (the Python API has the same bound).
constexpr int64_t kMaxPaddedTopK = 64;

// Where a binding's kernels run: every tensor must be on `device` (on x's device, for CUDA), and contiguous when
// `contiguous` (the CUDA kernels read raw pointers; the CPU kernels make their own contiguous copies).
struct Backend {
  const char* who;  // names the op in messages, e.g. "mole_lora (cpu)"
  c10::DeviceType device;
  bool contiguous;
};

// The op's inputs (copies of the binding's arguments: a problem lives inside one call) and their sizes.
struct MoLEProblem {
  at::Tensor x, seg_offsets, lora_a, lora_b, router, expert_mask;
  std::optional<at::Tensor> expert_input, shared_a, shared_b;
  double scaling = 1.0;
  int64_t T = 0, S = 0, E = 0, r = 0, k = 0;
  int64_t D = 0;   // d_in
  int64_t O = 0;   // d_out
  int64_t R = 0;   // router rows at the top of Wc: r (embedding router) or E (linear router)
  int64_t Kr = 0;  // rows of Wc the routing needs on x: R + E*r (embedding) or R (linear)
  int64_t Ke = 0;  // expert rows of Wc, applied to x_e: E*r (+ r with a shared expert); also the columns of Bc
  int64_t Kc = 0;  // all rows of Wc: R + Ke
  bool embedding = true;  // router_type == "embedding" (else "linear")
  bool shared = false, has_xe = false;
};

// Ranks, shapes, dtypes and devices of the forward's arguments (values are the backend's business). Every float
// tensor must have x's dtype; seg_offsets int32 or int64; expert_mask bool; 1 <= top_k <= max(E, kMaxPaddedTopK);
// scaling finite; router_type 'embedding' or 'linear'.
MoLEProblem make_problem(const Backend& b, const at::Tensor& x, const std::optional<at::Tensor>& expert_input,
                         const at::Tensor& seg_offsets, const at::Tensor& lora_a, const at::Tensor& lora_b,
                         const at::Tensor& router, const std::optional<at::Tensor>& shared_a,
                         const std::optional<at::Tensor>& shared_b, const at::Tensor& expert_mask, int64_t top_k,
                         double scaling, c10::string_view router_type);

// The backward's extra arguments: grad_delta [T, O] in x's dtype, grad_probs [T, E] floating (or absent), probs
// [T, E] in `probs_dtype`, topk_idx [T, k] int64; all on the backend's device.
void check_backward_args(const Backend& b, const MoLEProblem& p, const at::Tensor& grad_delta,
                         const std::optional<at::Tensor>& grad_probs, const at::Tensor& probs,
                         at::ScalarType probs_dtype, const at::Tensor& topk_idx);

// Host tensors only. seg_offsets values: first 0, non-decreasing, last T. Returns them as int64.
std::vector<int64_t> check_offsets_values(const char* who, const at::Tensor& seg_offsets, int64_t T);

// Host tensors only. Every top-k id of token t (segment s) is -1 or an active slot of s (expert_mask[s, id]), and no
// slot appears twice in a row: the backward indexes its per-slot buffers with these ids.
void check_topk_values(const char* who, const int64_t* topk_idx, const bool* expert_mask,
                       const std::vector<int64_t>& offsets, int64_t E, int64_t k);

// Wc [S, Kc, D] = [router | A_1..A_E (E*r rows) | shared A] in `dtype`, a fresh contiguous buffer (callers mask it in
// place). Detached: the kernels run below autograd.
at::Tensor stack_down(const MoLEProblem& p, at::ScalarType dtype);

// Bc [S, O, Ke] = [B_1 .. B_E | shared B] in `dtype`, a fresh buffer written in one pass (permute-copy then cat was
// two).
at::Tensor stack_up(const MoLEProblem& p, at::ScalarType dtype);

}  // namespace fedamole
