// CUDA kernels of `mole_lora` (backend "cuda"): torch-free launchers on raw pointers and a cudaStream_t, so that
// every .cu compiles with nothing but the CUDA toolkit (CI compiles them for sm_80 and sm_90a on CPU machines).
// The torch binding (csrc/cuda_ops.cpp) stacks the weights, allocates outputs and calls these launchers.
//
// Layout conventions (the same as the CPU backend, csrc/mole_lora_cpu_common.cpp):
//   Wc [S, Kc, D]  stacked down-projections [router rows R | A_1..A_E (E*r) | shared A (r)]
//   Bc [S, O, Ke]  stacked up-projections   [B_1..B_E | shared B],  Ke = E*r (+ r)
//   H  [T, Kc]     fp32 projections x Wc^T; routing reads columns [0, R + E*r), experts read [R, Kc)
//
// Bounds: seg_offsets and topk_idx are device data that the host never reads (no syncs). The kernels clamp every
// segment to [0, T] and use only top-k ids that are -1 or an active, not yet seen slot, so no value reads or writes
// out of bounds; invalid values set error[0] (seg_offsets) / error[1] (topk_idx), which the binding turns into an
// error after the kernels (csrc/cuda_ops.cpp). Masked slots are absent: the binding zeroes their weights in the
// stacked Wc / Bc, and the routing kernels select their probabilities and gradients to 0.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fedamole {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Most routed slots per segment the routing kernels support (per-thread register/local arrays).
constexpr int kMaxSlots = 64;
constexpr int kMaxTopK = 16;

// Segmented (grouped) GEMM:  C(m, n) = alpha * sum_k A(m, k) * B(k, n)  (+ C(m, n) if accumulate), per segment s.
// Exactly one of the dimensions varies per segment: the token range [seg_offsets[s], seg_offsets[s+1]) is
//   token_dim = 0: the M rows (A and C rows are tokens; B is per segment at b_seg * s), or
//   token_dim = 2: the K reduction (A columns and B rows are tokens; C is per segment at c_seg * s).
// Element addressing: A(m, k) = A[m * a_rs + k * a_cs], B(k, n) = B[k * b_rs + n * b_cs], C(m, n) = C[m * c_rs + n].
// bf16/fp16 inputs run on tensor cores (WMMA 16x16x16, fp32 accumulation); fp32 inputs on CUDA cores.
// C is fp32 when c_fp32, else the input dtype.
struct SegGemmParams {
  const void* a = nullptr;
  const void* b = nullptr;
  void* c = nullptr;
  const int64_t* seg_offsets = nullptr;  // device, S + 1 entries
  int num_segments = 0;
  int64_t num_tokens = 0;  // T: segment bounds are clamped to [0, T]
  int max_seg_tokens = 0;  // host-known upper bound of a segment's tokens (sizes the grid); T is always safe
  int m = 0, n = 0, k = 0;  // the token dimension's entry is ignored
  int token_dim = 0;
  int64_t a_rs = 0, a_cs = 0, b_rs = 0, b_cs = 0, c_rs = 0;
  int64_t a_seg = 0, b_seg = 0, c_seg = 0;
  float alpha = 1.f;
  bool accumulate = false;
  bool c_fp32 = true;
};

cudaError_t launch_seg_gemm(const SegGemmParams& p, DType dtype, cudaStream_t stream);

// Fused routing forward, one thread per token: scores (embedding: z_i = h_i . t / sqrt(r); linear: z = H[:, :E]),
// masked softmax, top-k (ties to the lowest index, -1 padding), renormalisation, gated rank activations
// G [T, Ke] = [c_i u_i | scaling * v] in the input dtype, and per-segment usage counts [S, E] (integer atomics, so the
// counts are deterministic). `gated` or `counts` may be null (routing only / no counts).
struct RouteParams {
  const float* h = nullptr;         // [T, Kc] fp32 projections of x (routing columns)
  const float* h_expert = nullptr;  // [T, Kc] projections of x_e (expert columns); == h without expert_input
  const int64_t* seg_offsets = nullptr;
  const bool* mask = nullptr;   // [S, E]
  float* probs = nullptr;       // [T, E]
  int64_t* topk_idx = nullptr;  // [T, k]
  void* gated = nullptr;        // [T, Ke] input dtype, or null
  int32_t* counts = nullptr;    // [S, E], zeroed by the caller, or null
  int32_t* error = nullptr;     // [2], zeroed by the caller: error[0] = 1 for invalid seg_offsets
  int num_tokens = 0, num_segments = 0, num_slots = 0, rank = 0, top_k = 0;
  int router_rows = 0;  // R
  int kc = 0, ke = 0;
  bool embedding = true, shared = false;
  float scaling = 1.f;
};

cudaError_t launch_route_forward(const RouteParams& p, DType dtype, cudaStream_t stream);

// Fused routing backward, one thread per token, from the forward's probs/top-k (never re-routed). In: H (fp32),
// GR = g Bc (fp32 [T, Ke]). Out, in the input dtype for the tensor-core gradient GEMMs: G [T, Ke] (for grad_Bc) and
// dH [T, Kc] in the column layout of H: [dt | du + dh | dv]. With expert_input the routing grads (dt, dh) belong to x
// and the expert grads (du, dv) to x_e: then `dh_route` [T, Kc] gets [dt | dh | 0] and `dh` gets [0 | du | dv].
struct RouteBackwardParams {
  const float* h = nullptr;         // [T, Kc] projections of x
  const float* h_expert = nullptr;  // [T, Kc] projections of x_e; == h without expert_input
  const float* grank = nullptr;     // [T, Ke]
  const float* probs = nullptr;     // [T, E]
  const int64_t* topk_idx = nullptr;
  const int64_t* seg_offsets = nullptr;  // S + 1 entries
  const bool* mask = nullptr;            // [S, E]
  int32_t* error = nullptr;              // [2], zeroed by the caller: error[1] = 1 for invalid topk_idx
  const float* grad_probs = nullptr;  // [T, E] or null
  void* gated = nullptr;              // [T, Ke]
  void* dh = nullptr;                 // [T, Kc]
  void* dh_route = nullptr;           // [T, Kc] or null
  int num_tokens = 0, num_segments = 0, num_slots = 0, rank = 0, top_k = 0, router_rows = 0, kc = 0, ke = 0;
  bool embedding = true, shared = false;
  float scaling = 1.f;
};

cudaError_t launch_route_backward(const RouteBackwardParams& p, DType dtype, cudaStream_t stream);

}  // namespace cuda
}  // namespace fedamole
