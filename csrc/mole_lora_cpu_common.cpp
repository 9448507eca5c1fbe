// CPU backend of `mole_lora`: forward (mole_lora_cpu_fwd.cpp) and analytic backward (mole_lora_cpu_bwd.cpp);
// semantics: fedamole_kernels/reference.py. This file holds what both share.
//
// Per segment s the down-projections are stacked into one matrix Wc[s] = [router rows | A_1..A_E | A_shared]
// ([Kc, d_in]) and the up-projections into Bc[s] = [B_1..B_E | B_shared] ([d_out, Ke]), so that
//   forward:  H = x Wc^T (one GEMM gives router embedding t, expert embeddings h = u and shared v),
//             fused routing loop -> probs, top-k, gated rank activations G = [c_i u_i | s v],  delta = G Bc^T;
//   backward: H recomputed, GR = g Bc, fused routing-backward loop -> dH (same column layout as H),
//             grad_x = dH Wc, grad_Wc = dH^T x, grad_Bc = g^T G.
// All GEMMs go through ATen (MKL/oneDNN); math runs in float32 (float64 for float64 inputs).
//
// Small problems (few tokens, so at most one token block per segment) skip the stacking: one GEMM per part
// (router, A, shared A) on the weights in place, and the up-projections only for the experts some token of the block
// selected; their weight gradients are written straight into the outputs. At T=1, d=512, 1 thread, building Wc and Bc
// took ~33 us of a 50 us forward (the permute-copy of B alone 25 us), and the copies out of the stacked gradient
// buffers a similar share of the backward.
//
// The kernels turn autocast off for themselves: their buffers are in the compute dtype on purpose (an enclosing
// torch.autocast would recast their fp32 GEMMs).
//
// Determinism: token-wise work runs over (segment, fixed token block) items; reductions over tokens (weight grads)
// run over (segment, fixed column block) items, each reducing its whole segment in one GEMM. The partition never
// depends on the thread count, and when at::parallel_for fans out every GEMM inside it is single-threaded, so 1 and
// 2 threads give bitwise-identical results (tested). Known gap: when there is a single work item, parallel_for runs
// it inline and the BLAS library may thread that GEMM itself; with 3+ threads results then differ from 1 thread in
// the last bits (seen: 1e-7..1e-4 absolute at 3 and 8 threads on a 2-core machine, ASan session of 2026-11-24).

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <utility>

#include "mole_lora_cpu.h"
#include "mole_lora_cpu_impl.h"

namespace fedamole {
namespace cpu {
namespace {

// $FEDAMOLE_CPU_SPLIT_MAX_TOKENS and $FEDAMOLE_CPU_PARTIAL_BYTES are read once, at the first call, not by every call
// (they choose a path; a getenv per call is hidden global state on the hot path). Tests force a path per test by
// setting them at run time, so they must be reread then: fedamole_ext::cpu_tuning_reload() does, and
// tests/conftest.py's `monkeypatch` calls it whenever a test sets, deletes or restores a $FEDAMOLE_CPU_* variable
// (the forced-path tests then stay in-process and keep asserting on the path they force).
Tuning read_tuning() {
  Tuning t;
  if (const char* env = std::getenv("FEDAMOLE_CPU_SPLIT_MAX_TOKENS")) {
    t.split_override = true;
    t.split_max_tokens = std::min<int64_t>(std::atoll(env), kTokenBlock);
  }
  if (const char* env = std::getenv("FEDAMOLE_CPU_PARTIAL_BYTES")) t.partial_bytes = std::atoll(env);
  return t;
}

// Atomics: a reload may race with kernels running on other threads (each reads whichever values it sees).
struct TuningState {
  std::atomic<bool> split_override;
  std::atomic<int64_t> split_max_tokens, partial_bytes;
  explicit TuningState(const Tuning& t) { store(t); }
  void store(const Tuning& t) {
    split_override = t.split_override;
    split_max_tokens = t.split_max_tokens;
    partial_bytes = t.partial_bytes;
  }
};

TuningState& tuning_state() {
  static TuningState state(read_tuning());
  return state;
}

// Masked means absent: the rows (Wc, A, linear router) and columns (Bc, B) of slots that do not exist are zeroed
// before any product, so that whatever they hold (NaN, Inf) never meets a zero gate (0 * NaN = NaN would reach every
// token of the segment through the dense GEMMs). Nothing to do, and no copy, when every slot is active.
//
// In the fresh, contiguous buffer `t`, for every absent slot (s, i): `count` runs of `len` elements starting at
// element s * seg_stride + first + i * slot_stride + j * run_stride (j < count) are set to zero. Plain memsets: a
// broadcast masked_fill cost ~50 us at d=512 per weight, more than the whole T=1 forward.
void zero_absent(const Problem& P, at::Tensor& t, int64_t seg_stride, int64_t first, int64_t slot_stride,
                 int64_t count, int64_t run_stride, int64_t len) {
  const bool* m = P.mask.data_ptr<bool>();
  char* base = static_cast<char*>(t.data_ptr());
  const int64_t esz = static_cast<int64_t>(t.element_size());
  for (int64_t s = 0; s < P.S; ++s) {
    for (int64_t i = 0; i < P.E; ++i) {
      if (m[s * P.E + i]) continue;
      for (int64_t j = 0; j < count; ++j) {
        std::memset(base + (s * seg_stride + first + i * slot_stride + j * run_stride) * esz, 0,
                    static_cast<size_t>(len * esz));
      }
    }
  }
}

}  // namespace

Tuning tuning() {
  const TuningState& s = tuning_state();
  return {s.split_override.load(), s.split_max_tokens.load(), s.partial_bytes.load()};
}

std::vector<int64_t> reload_tuning() {
  const Tuning t = read_tuning();
  tuning_state().store(t);
  return {t.split_override ? t.split_max_tokens : -1, t.partial_bytes};
}

bool use_split(int64_t num_tokens, int64_t default_max) {
  const Tuning t = tuning();
  return num_tokens <= (t.split_override ? t.split_max_tokens : default_max);
}

Problem make_cpu_problem(MoLEProblem base, int64_t split_max) {
  Problem P;
  static_cast<MoLEProblem&>(P) = std::move(base);
  const auto dtype = P.x.scalar_type();
  switch (dtype) {
    case at::kFloat:
    case at::kBFloat16:
    case at::kHalf:
      P.cd = at::kFloat;
      break;
    case at::kDouble:
      P.cd = at::kDouble;
      break;
    default:
      TORCH_CHECK_TYPE(false, kWho, ": x has unsupported dtype ", dtype,
                       "; expected float32, bfloat16, float16 or float64");
  }
  P.offsets = check_offsets_values(kWho, P.seg_offsets, P.T);
  P.mask = P.expert_mask.contiguous();
  const bool* m = P.mask.data_ptr<bool>();
  P.all_active = std::all_of(m, m + P.S * P.E, [](bool b) { return b; });
  P.split = use_split(P.T, split_max);
  return P;
}

std::vector<Item> token_items(const Problem& P) {
  std::vector<Item> items;
  for (int64_t s = 0; s < P.S; ++s) {
    for (int64_t t0 = P.offsets[s]; t0 < P.offsets[s + 1]; t0 += kTokenBlock) {
      items.push_back({s, t0, std::min(t0 + kTokenBlock, P.offsets[s + 1])});
    }
  }
  return items;
}

// (The common case, already in the compute dtype and contiguous, is one op instead of three: at d=16, T=1 the ~110
// dispatcher ops of a forward are most of its cost.)
at::Tensor in_cd(const at::Tensor& t, at::ScalarType cd) {
  if (t.scalar_type() == cd && t.is_contiguous()) return t.detach();
  return t.detach().to(cd).contiguous();
}

// Only the products that would mix an absent slot's values into other results need the zeros: the forward's
// expand (G Bc^T, stacked: G is 0 there by selection, but 0 * NaN = NaN), and the backward's input gradient (dH Wc,
// dH selected to 0 there: the A rows and linear-router rows). Everything else reads an absent slot's columns only to
// select them away (routing, G, dH), and the split path never multiplies by an unselected slot's B.
Weights make_weights(const Problem& P, bool backward) {
  Weights W;
  const int64_t Er = P.E * P.r, D = P.D, r = P.r;
  if (!P.split) {
    W.wc = stack_down(P, P.cd);  // fresh buffers: masked in place
    W.bc = stack_up(P, P.cd);
    if (!P.all_active && backward) {
      zero_absent(P, W.wc, P.Kc * D, P.R * D, r * D, 1, 0, r * D);
      if (!P.embedding) zero_absent(P, W.wc, P.Kc * D, 0, D, 1, 0, D);
    }
    if (!P.all_active && !backward) zero_absent(P, W.bc, P.O * P.Ke, 0, r, P.O, P.Ke, r);
    return W;
  }
  W.router = in_cd(P.router, P.cd);
  W.a = in_cd(P.lora_a, P.cd).view({P.S, Er, D});
  W.b = in_cd(P.lora_b, P.cd);
  if (!P.all_active && backward) {  // the split path reads the weights in place: masked copies
    W.a = W.a.clone();
    zero_absent(P, W.a, Er * D, 0, r * D, 1, 0, r * D);
    if (!P.embedding) {
      W.router = W.router.clone();
      zero_absent(P, W.router, P.E * D, 0, D, 1, 0, D);
    }
  }
  if (P.shared) {
    W.sa = in_cd(*P.shared_a, P.cd);
    W.sb = in_cd(*P.shared_b, P.cd);
  }
  return W;
}

// Which slots the top-k of tokens [t0, t1) selected (the split path skips the others' up-projections).
std::vector<char> used_slots(const Problem& P, const int64_t* topk_idx, int64_t t0, int64_t t1) {
  std::vector<char> used(P.E, 0);
  for (int64_t q = t0 * P.k; q < t1 * P.k; ++q) {
    if (topk_idx[q] >= 0) used[topk_idx[q]] = 1;
  }
  return used;
}

Proj project(const Problem& P, const Weights& W, int64_t s, const at::Tensor& xb, const at::Tensor* xeb) {
  Proj pr;
  const int64_t Er = P.E * P.r;
  if (!P.split) {
    const at::Tensor wc_s = W.wc[s];
    if (xeb == nullptr) {
      pr.route = at::mm(xb, wc_s.t());
      pr.expert = pr.route;
      pr.ld_route = pr.ld_expert = P.Kc;
      pr.expert_col = P.R;
    } else {
      pr.route = at::mm(xb, wc_s.narrow(0, 0, P.Kr).t());
      pr.expert = at::mm(*xeb, wc_s.narrow(0, P.R, P.Ke).t());
      pr.ld_route = P.Kr;
      pr.ld_expert = P.Ke;
    }
    return pr;
  }
  // One GEMM per part, each into its columns of the same [nb, Kc] (or [nb, Kr] + [nb, Ke]) layout.
  const int64_t nb = xb.size(0);
  const at::Tensor router_t = W.router[s].t(), a_t = W.a[s].t();
  if (xeb == nullptr) {
    pr.route = at::empty({nb, P.Kc}, xb.options());
    at::Tensor h = pr.route;
    at::Tensor cols = h.narrow(1, 0, P.R);
    at::mm_out(cols, xb, router_t);
    cols = h.narrow(1, P.R, Er);
    at::mm_out(cols, xb, a_t);
    if (P.shared) {
      cols = h.narrow(1, P.R + Er, P.r);
      at::mm_out(cols, xb, W.sa[s].t());
    }
    pr.expert = pr.route;
    pr.ld_route = pr.ld_expert = P.Kc;
    pr.expert_col = P.R;
  } else {
    pr.route = at::empty({nb, P.Kr}, xb.options());
    at::Tensor cols = pr.route.narrow(1, 0, P.R);
    at::mm_out(cols, xb, router_t);
    if (P.embedding) {
      cols = pr.route.narrow(1, P.R, Er);
      at::mm_out(cols, xb, a_t);
    }
    pr.expert = at::empty({nb, P.Ke}, xb.options());
    cols = pr.expert.narrow(1, 0, Er);
    at::mm_out(cols, *xeb, a_t);
    if (P.shared) {
      cols = pr.expert.narrow(1, Er, P.r);
      at::mm_out(cols, *xeb, W.sa[s].t());
    }
    pr.ld_route = P.Kr;
    pr.ld_expert = P.Ke;
  }
  return pr;
}

}  // namespace cpu

std::vector<int64_t> cpu_tuning_reload() { return cpu::reload_tuning(); }

}  // namespace fedamole
