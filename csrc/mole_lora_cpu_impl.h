// Internal to the CPU backend of `mole_lora` (mole_lora_cpu_{common,fwd,bwd}.cpp): the CPU view of the problem, its
// work items, the weights as the kernels read them, and the helpers the forward and backward share. The design
// (stacked vs split weights, determinism, masking) is described in mole_lora_cpu_common.cpp.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "mole_lora_problem.h"

namespace fedamole {
namespace cpu {

constexpr const char* kWho = "mole_lora (cpu)";
inline constexpr Backend kCpu{kWho, c10::DeviceType::CPU, /*contiguous=*/false};

// Token rows per work item: large enough for efficient GEMMs, small enough to spread 2k tokens over many threads.
constexpr int64_t kTokenBlock = 128;
// Output columns per weight-gradient work item.
constexpr int64_t kColBlock = 256;
// Largest T run on the unstacked weights, forward and backward (at most kTokenBlock: one item per segment).
// $FEDAMOLE_CPU_SPLIT_MAX_TOKENS overrides both (tests use it to run either path at any T). Measured, E=8, r=8,
// 1 thread, d=512 | 2048: the split forward wins up to T=16 (T=16: 62 vs 76 us | 215 vs 259 us) and ties at T=32;
// the split backward wins up to T=4 (113 vs 125 | 376 vs 486 us) and loses from T=8 (161 vs 140 | 623 vs 507 us),
// its per-expert GEMMs with N = r being slow in BLAS.
constexpr int64_t kSplitMaxTokensFwd = 16;
constexpr int64_t kSplitMaxTokensBwd = 4;
static_assert(kSplitMaxTokensFwd <= kTokenBlock && kSplitMaxTokensBwd <= kTokenBlock,
              "the split path writes weight grads per item: one item per segment");

// The tuning knobs read from the environment (see tuning() in mole_lora_cpu_common.cpp).
struct Tuning {
  bool split_override = false;       // $FEDAMOLE_CPU_SPLIT_MAX_TOKENS is set
  int64_t split_max_tokens = 0;      // its value, at most kTokenBlock
  int64_t partial_bytes = 64 << 20;  // $FEDAMOLE_CPU_PARTIAL_BYTES, default 64 MiB
};
// The values read at the first call (or the last reload_tuning()).
Tuning tuning();
// Rereads the environment: fedamole_ext::cpu_tuning_reload, for tests that change it at run time.
std::vector<int64_t> reload_tuning();

bool use_split(int64_t num_tokens, int64_t default_max);

// The shared problem plus what the CPU kernels derive from it.
struct Problem : MoLEProblem {
  at::ScalarType cd = at::kFloat;  // compute dtype
  bool split = false;              // small problem: weights used in place (see mole_lora_cpu_common.cpp)
  bool all_active = true;          // no slot masked: the weights need no masking
  at::Tensor mask;                 // expert_mask, contiguous
  std::vector<int64_t> offsets;    // S + 1 segment bounds
};

// The CPU checks on top of make_problem's: a supported dtype and the values of seg_offsets (a host scan of S+1
// integers), so that no argument can make the kernels read or write out of bounds. `split_max` is the default
// largest T of the split path (forward or backward).
Problem make_cpu_problem(MoLEProblem base, int64_t split_max);

struct Item {
  int64_t s, t0, t1;
};
std::vector<Item> token_items(const Problem& P);

// The weights as the kernels read them: stacked (Wc, Bc) for large problems, in place (split) for small ones.
struct Weights {
  at::Tensor wc, bc;                // stacked: [S, Kc, D], [S, O, Ke]
  at::Tensor router, a, sa, b, sb;  // split: [S, R, D], [S, E*r, D], [S, r, D], [S, E, O, r], [S, O, r]
};
Weights make_weights(const Problem& P, bool backward);

// Inputs in the compute dtype, detached: kernels run below autograd, also on worker threads (whose grad mode is
// not the caller's).
at::Tensor in_cd(const at::Tensor& t, at::ScalarType cd);

// Which slots the top-k of tokens [t0, t1) selected (the split path skips the others' up-projections).
std::vector<char> used_slots(const Problem& P, const int64_t* topk_idx, int64_t t0, int64_t t1);

// out = sum over parts of lhs_i @ rhs_i (the first writes, the others accumulate; no parts: zeros).
struct GemmSum {
  at::Tensor& out;
  bool first = true;
  void add(const at::Tensor& lhs, const at::Tensor& rhs) {
    if (first) {
      at::mm_out(out, lhs, rhs);
      first = false;
    } else {
      out.addmm_(lhs, rhs);
    }
  }
  void finish() {
    if (first) out.zero_();
  }
};

// Down-projections of one token block: routing columns (t, and h for the embedding router) and expert columns
// (u, then v). Without expert_input one GEMM yields both (the A rows are shared between routing and experts).
struct Proj {
  at::Tensor route, expert;
  int64_t ld_route = 0, ld_expert = 0, expert_col = 0;
};
Proj project(const Problem& P, const Weights& W, int64_t s, const at::Tensor& xb, const at::Tensor* xeb);

// Weight gradients of the split path, in the compute dtype: [S, R, D], [S, E*r, D], [S, r, D], [S, E, O, r], [S, O, r].
struct SplitGrads {
  at::Tensor router, a, sa, b, sb;
};

// Split path, one token block (the only one of its segment): grad_x (and grad_x_e) from the unstacked weights, then
// the segment's weight gradients straight into `sg`. dhr: [nb, Kc] without expert_input (dH, the A columns holding
// both the routing and the expert terms), else [nb, Kr]; dhe: [nb, Ke] with expert_input.
void split_input_and_weight_grads(const Problem& P, const Weights& W, SplitGrads& sg, const Item& item,
                                  const std::vector<char>& used, const at::Tensor& xb, const at::Tensor& xeb,
                                  const at::Tensor& g, const at::Tensor& gated, const at::Tensor& dhr,
                                  const at::Tensor& dhe, at::Tensor gx_b, at::Tensor gxe_b);

}  // namespace cpu
}  // namespace fedamole
