// CPU backend of `mole_lora`: forward and analytic backward (semantics: fedamole_kernels/reference.py).
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

#include "mole_lora_cpu.h"

#include "mole_lora_checks.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace fedamole {
namespace {

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

bool use_split(int64_t num_tokens, int64_t default_max) {
  const char* env = std::getenv("FEDAMOLE_CPU_SPLIT_MAX_TOKENS");
  const int64_t limit = env != nullptr ? std::min<int64_t>(std::atoll(env), kTokenBlock) : default_max;
  return num_tokens <= limit;
}

struct Problem {
  int64_t T = 0, S = 0, E = 0, r = 0, D = 0, O = 0, k = 0;
  int64_t R = 0;   // router rows at the top of Wc: r (embedding router) or E (linear router)
  int64_t Kr = 0;  // rows of Wc the routing needs on x: R + E*r (embedding) or R (linear)
  int64_t Ke = 0;  // expert rows of Wc, applied to x_e: E*r (+ r with a shared expert); also the columns of Bc
  int64_t Kc = 0;  // all rows: R + Ke
  bool embedding = true, shared = false, has_xe = false;
  at::ScalarType cd = at::kFloat;  // compute dtype
  bool split = false;              // small problem: weights used in place (see the file comment)
  bool all_active = true;          // no slot masked: the weights need no masking
  at::Tensor mask;                 // expert_mask, contiguous
  double scaling = 1.0;
  std::vector<int64_t> offsets;  // S + 1 segment bounds
};

struct Item {
  int64_t s, t0, t1;
};

constexpr const char* kWho = "mole_lora (cpu)";

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), kWho, ": ", name, " must be a CPU tensor, got device ", t.device());
}

// Every check the kernels rely on: shapes and dtypes (check_mole_args), devices, and the values of seg_offsets (a
// host scan of S+1 integers), so that no argument can make the kernels read or write out of bounds.
Problem make_problem(const at::Tensor& x, const std::optional<at::Tensor>& expert_input, const at::Tensor& seg_offsets,
                     const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& router,
                     const std::optional<at::Tensor>& shared_a, const std::optional<at::Tensor>& shared_b,
                     const at::Tensor& expert_mask, int64_t top_k, double scaling, c10::string_view router_type) {
  const MoLEDims d = check_mole_args(kWho, x, expert_input, seg_offsets, lora_a, lora_b, router, shared_a, shared_b,
                                     expert_mask, top_k, scaling, router_type);
  Problem P;
  const auto dtype = x.scalar_type();
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
      TORCH_CHECK_TYPE(false, kWho, ": x has unsupported dtype ", dtype, "; expected float32, bfloat16, float16 or float64");
  }
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&x, "x"}, {&seg_offsets, "seg_offsets"},
                                {&lora_a, "lora_a"}, {&lora_b, "lora_b"}, {&router, "router"},
                                {&expert_mask, "expert_mask"}}) {
    check_cpu(*t, name);
  }
  if (expert_input.has_value()) check_cpu(*expert_input, "expert_input");
  if (shared_a.has_value()) check_cpu(*shared_a, "shared_a");
  if (shared_b.has_value()) check_cpu(*shared_b, "shared_b");
  P.T = d.T;
  P.S = d.S;
  P.E = d.E;
  P.r = d.r;
  P.D = d.D;
  P.O = d.O;
  P.k = d.k;
  P.R = d.R;
  P.embedding = d.embedding;
  P.shared = d.shared;
  P.has_xe = d.has_xe;
  P.scaling = scaling;
  P.Kr = P.embedding ? P.R + P.E * P.r : P.R;
  P.Ke = P.E * P.r + (P.shared ? P.r : 0);
  P.Kc = P.R + P.Ke;
  P.offsets = check_offsets_values(kWho, seg_offsets, P.T);
  P.mask = expert_mask.contiguous();
  const bool* m = P.mask.data_ptr<bool>();
  P.all_active = std::all_of(m, m + P.S * P.E, [](bool b) { return b; });
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

// Wc [S, Kc, D] = [router | A (E*r rows) | shared A] in the compute dtype.
at::Tensor stack_down(const Problem& P, const at::Tensor& router, const at::Tensor& lora_a,
                      const std::optional<at::Tensor>& shared_a) {
  std::vector<at::Tensor> parts{router.to(P.cd), lora_a.to(P.cd).reshape({P.S, P.E * P.r, P.D})};
  if (P.shared) parts.push_back(shared_a->to(P.cd));
  return at::cat(parts, 1).contiguous();
}

// Bc [S, O, Ke] = [B_1 .. B_E | shared B] in the compute dtype, written in one pass (permute-copy then cat was two).
at::Tensor stack_up(const Problem& P, const at::Tensor& lora_b, const std::optional<at::Tensor>& shared_b) {
  at::Tensor bc = at::empty({P.S, P.O, P.Ke}, lora_b.options().dtype(P.cd));
  bc.narrow(2, 0, P.E * P.r).view({P.S, P.O, P.E, P.r}).copy_(lora_b.permute({0, 2, 1, 3}));
  if (P.shared) bc.narrow(2, P.E * P.r, P.r).copy_(*shared_b);
  return bc;
}

// The weights as the kernels read them: stacked (Wc, Bc) for large problems, in place (split) for small ones.
struct Weights {
  at::Tensor wc, bc;                  // stacked: [S, Kc, D], [S, O, Ke]
  at::Tensor router, a, sa, b, sb;    // split: [S, R, D], [S, E*r, D], [S, r, D], [S, E, O, r], [S, O, r]
};

// Inputs in the compute dtype, detached: kernels run below autograd, also on worker threads (whose grad mode is
// not the caller's).
// (The common case, already in the compute dtype and contiguous, is one op instead of three: at d=16, T=1 the ~110
// dispatcher ops of a forward are most of its cost.)
at::Tensor in_cd(const at::Tensor& t, at::ScalarType cd) {
  if (t.scalar_type() == cd && t.is_contiguous()) return t.detach();
  return t.detach().to(cd).contiguous();
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

// Only the products that would mix an absent slot's values into other results need the zeros: the forward's
// expand (G Bc^T, stacked: G is 0 there by selection, but 0 * NaN = NaN), and the backward's input gradient (dH Wc,
// dH selected to 0 there: the A rows and linear-router rows). Everything else reads an absent slot's columns only to
// select them away (routing, G, dH), and the split path never multiplies by an unselected slot's B.
Weights make_weights(const Problem& P, const at::Tensor& router, const at::Tensor& lora_a,
                     const std::optional<at::Tensor>& shared_a, const at::Tensor& lora_b,
                     const std::optional<at::Tensor>& shared_b, bool backward) {
  Weights W;
  const int64_t Er = P.E * P.r, D = P.D, r = P.r;
  if (!P.split) {
    W.wc = stack_down(P, router.detach(), lora_a.detach(), shared_a);  // fresh buffers: masked in place
    W.bc = stack_up(P, lora_b.detach(), shared_b);
    if (!P.all_active && backward) {
      zero_absent(P, W.wc, P.Kc * D, P.R * D, r * D, 1, 0, r * D);
      if (!P.embedding) zero_absent(P, W.wc, P.Kc * D, 0, D, 1, 0, D);
    }
    if (!P.all_active && !backward) zero_absent(P, W.bc, P.O * P.Ke, 0, r, P.O, P.Ke, r);
    return W;
  }
  W.router = in_cd(router, P.cd);
  W.a = in_cd(lora_a, P.cd).view({P.S, Er, D});
  W.b = in_cd(lora_b, P.cd);
  if (!P.all_active && backward) {  // the split path reads the weights in place: masked copies
    W.a = W.a.clone();
    zero_absent(P, W.a, Er * D, 0, r * D, 1, 0, r * D);
    if (!P.embedding) {
      W.router = W.router.clone();
      zero_absent(P, W.router, P.E * D, 0, D, 1, 0, D);
    }
  }
  if (P.shared) {
    W.sa = in_cd(*shared_a, P.cd);
    W.sb = in_cd(*shared_b, P.cd);
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

// Routing of one token: logits -> masked softmax -> top-k (ties to the lowest index; -1 padding when fewer active
// slots than k). Writes probs p[E] and idx[k]; returns the renormalisation denominator, clamped like the reference.
template <typename T>
T route_token(const Problem& P, const T* route_row, const bool* mask, T* p, int64_t* idx, T* z, char* taken) {
  const int64_t E = P.E, r = P.r;
  if (P.embedding) {
    const T sqrt_r = std::sqrt(static_cast<T>(r));
    const T* t = route_row;
    const T* h = route_row + P.R;
    for (int64_t i = 0; i < E; ++i) {
      T acc = 0;
      for (int64_t j = 0; j < r; ++j) acc += h[i * r + j] * t[j];
      z[i] = acc / sqrt_r;
    }
  } else {
    for (int64_t i = 0; i < E; ++i) z[i] = route_row[i];
  }
  T zmax = -std::numeric_limits<T>::infinity();
  bool any = false;
  for (int64_t i = 0; i < E; ++i) {
    if (mask[i] && (!any || z[i] > zmax)) {
      zmax = z[i];
      any = true;
    }
  }
  T sum = 0;
  for (int64_t i = 0; i < E; ++i) {
    p[i] = (any && mask[i]) ? std::exp(z[i] - zmax) : T(0);
    sum += p[i];
  }
  if (any) {
    for (int64_t i = 0; i < E; ++i) p[i] /= sum;
  }
  std::fill(taken, taken + E, 0);
  T picked = 0;
  for (int64_t q = 0; q < P.k; ++q) {
    int64_t best = -1;
    for (int64_t i = 0; i < E; ++i) {
      if (mask[i] && !taken[i] && (best < 0 || p[i] > p[best])) best = i;
    }
    idx[q] = best;
    if (best >= 0) {
      taken[best] = 1;
      picked += p[best];
    }
  }
  return std::max(picked, std::numeric_limits<T>::min());
}

// Renormalisation denominator of a token from the forward's probs and top-k (the backward never re-routes).
template <typename T>
T gate_norm(const Problem& P, const T* p, const int64_t* idx) {
  T picked = 0;
  for (int64_t q = 0; q < P.k; ++q) {
    if (idx[q] >= 0) picked += p[idx[q]];
  }
  return std::max(picked, std::numeric_limits<T>::min());
}

template <typename T>
void forward_impl(const Problem& P, const at::Tensor& xc, const at::Tensor& xec, const Weights& W, const bool* mask,
                  T* probs, int64_t* topk_idx, at::Tensor& delta_c) {
  const std::vector<Item> items = token_items(P);
  const int64_t E = P.E, r = P.r, Er = P.E * P.r, k = P.k;
  const T scaling = static_cast<T>(P.scaling);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<T> z(E), c(E);
    std::vector<char> taken(E);
    for (int64_t it = begin; it < end; ++it) {
      const Item& item = items[it];
      const int64_t nb = item.t1 - item.t0;
      const at::Tensor xb = xc.narrow(0, item.t0, nb);
      at::Tensor xeb;
      if (P.has_xe) xeb = xec.narrow(0, item.t0, nb);
      const Proj pr = project(P, W, item.s, xb, P.has_xe ? &xeb : nullptr);
      const T* route = pr.route.data_ptr<T>();
      const T* expert = pr.expert.data_ptr<T>() + pr.expert_col;
      at::Tensor gated = at::empty({nb, P.Ke}, xc.options());
      T* g = gated.data_ptr<T>();
      const bool* m = mask + item.s * E;
      for (int64_t q = 0; q < nb; ++q) {
        const int64_t tok = item.t0 + q;
        T* p = probs + tok * E;
        int64_t* idx = topk_idx + tok * k;
        const T norm = route_token<T>(P, route + q * pr.ld_route, m, p, idx, z.data(), taken.data());
        std::fill(c.begin(), c.end(), T(0));
        for (int64_t j = 0; j < k; ++j) {
          if (idx[j] >= 0) c[idx[j]] = p[idx[j]] / norm * scaling;
        }
        const T* u = expert + q * pr.ld_expert;
        T* grow = g + q * P.Ke;
        // Unselected and masked slots are selected away, not multiplied by their zero gate (taken = the top-k).
        for (int64_t i = 0; i < E; ++i) {
          for (int64_t j = 0; j < r; ++j) grow[i * r + j] = taken[i] ? u[i * r + j] * c[i] : T(0);
        }
        if (P.shared) {
          for (int64_t j = 0; j < r; ++j) grow[Er + j] = u[Er + j] * scaling;
        }
      }
      at::Tensor out = delta_c.narrow(0, item.t0, nb);
      if (!P.split) {
        at::mm_out(out, gated, W.bc[item.s].t());
        continue;
      }
      // Unselected slots have zero gates: their columns of `gated` are 0 and their B is never read.
      const std::vector<char> used = used_slots(P, topk_idx, item.t0, item.t1);
      const at::Tensor b_s = W.b[item.s];
      GemmSum sum{out};
      for (int64_t i = 0; i < E; ++i) {
        if (used[i]) sum.add(gated.narrow(1, i * r, r), b_s[i].t());
      }
      if (P.shared) sum.add(gated.narrow(1, Er, r), W.sb[item.s].t());
      sum.finish();
    }
  });
}

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
                                  const at::Tensor& dhe, at::Tensor gx_b, at::Tensor gxe_b) {
  const int64_t s = item.s, r = P.r, Er = P.E * P.r, R = P.R;
  const at::Tensor router_s = W.router[s], a_s = W.a[s];
  if (P.has_xe) {
    GemmSum sx{gx_b};
    sx.add(dhr.narrow(1, 0, R), router_s);
    if (P.embedding) sx.add(dhr.narrow(1, R, Er), a_s);
    sx.finish();
    GemmSum se{gxe_b};
    se.add(dhe.narrow(1, 0, Er), a_s);
    if (P.shared) se.add(dhe.narrow(1, Er, r), W.sa[s]);
    se.finish();
  } else {
    GemmSum sx{gx_b};
    sx.add(dhr.narrow(1, 0, R), router_s);
    sx.add(dhr.narrow(1, R, Er), a_s);
    if (P.shared) sx.add(dhr.narrow(1, R + Er, r), W.sa[s]);
    sx.finish();
  }
  at::Tensor out = sg.router[s];
  at::mm_out(out, dhr.narrow(1, 0, R).t(), xb);
  at::Tensor out_a = sg.a[s];
  if (!P.has_xe) {
    at::mm_out(out_a, dhr.narrow(1, R, Er).t(), xb);
    if (P.shared) {
      out = sg.sa[s];
      at::mm_out(out, dhr.narrow(1, R + Er, r).t(), xb);
    }
  } else {
    GemmSum sa{out_a};
    if (P.embedding) sa.add(dhr.narrow(1, R, Er).t(), xb);
    sa.add(dhe.narrow(1, 0, Er).t(), xeb);
    sa.finish();
    if (P.shared) {
      out = sg.sa[s];
      at::mm_out(out, dhe.narrow(1, Er, r).t(), xeb);
    }
  }
  // B grads of selected slots; the others keep the zeros sg.b was created with (zero gates: no gradient).
  const at::Tensor g_t = g.t(), b_s = sg.b[s];
  for (int64_t i = 0; i < P.E; ++i) {
    if (!used[i]) continue;
    at::Tensor out_b = b_s[i];
    at::mm_out(out_b, g_t, gated.narrow(1, i * r, r));
  }
  if (P.shared) {
    out = sg.sb[s];
    at::mm_out(out, g_t, gated.narrow(1, Er, r));
  }
}

template <typename T>
void backward_impl(const Problem& P, const at::Tensor& xc, const at::Tensor& xec, const at::Tensor& gc,
                   const T* grad_probs, const Weights& W, const T* probs, const int64_t* topk_idx, at::Tensor& gx,
                   at::Tensor& gxe, at::Tensor& gwc, at::Tensor& gbc, SplitGrads* sg) {
  const std::vector<Item> items = token_items(P);
  const int64_t E = P.E, r = P.r, Er = P.E * P.r, k = P.k;
  const T scaling = static_cast<T>(P.scaling);
  const T inv_sqrt_r = T(1) / std::sqrt(static_cast<T>(r));
  // Token-wise buffers kept for the weight-gradient reductions: gated activations G and the grads of H.
  at::Tensor gated = at::empty({P.T, P.Ke}, xc.options());
  at::Tensor dh_route, dh_expert;  // without expert_input both views alias one [T, Kc] buffer
  if (P.has_xe) {
    dh_route = at::empty({P.T, P.Kr}, xc.options());
    dh_expert = at::empty({P.T, P.Ke}, xc.options());
  } else {
    dh_route = at::empty({P.T, P.Kc}, xc.options());
  }
  T* gated_p = gated.data_ptr<T>();
  T* dhr_p = dh_route.data_ptr<T>();
  T* dhe_p = P.has_xe ? dh_expert.data_ptr<T>() : dhr_p + P.R;
  const int64_t ld_dhr = P.has_xe ? P.Kr : P.Kc;
  const int64_t ld_dhe = P.has_xe ? P.Ke : P.Kc;

  // Weight grads. While few enough token blocks, each block also writes its partial dH^T x and g^T G while its rows
  // of x and g are still in cache, and a fixed-order sum over the blocks follows (deterministic, and it saves two
  // passes over the [T, d] inputs). For very large T, a second pass instead reduces each segment in one GEMM per
  // column block. The choice depends on the shapes only, never on the thread count.
  const int64_t n_items = static_cast<int64_t>(items.size());
  const int64_t part_w_numel = P.Kc * P.D, part_b_numel = P.O * P.Ke;
  // $FEDAMOLE_CPU_PARTIAL_BYTES overrides the 64 MiB budget (tests set 0 to exercise the two-pass path).
  const char* budget_env = std::getenv("FEDAMOLE_CPU_PARTIAL_BYTES");
  const int64_t partial_budget = budget_env != nullptr ? std::atoll(budget_env) : (int64_t(64) << 20);
  const bool fused_wgrad =
      !P.split && n_items * (part_w_numel + part_b_numel) * static_cast<int64_t>(sizeof(T)) <= partial_budget;
  at::Tensor part_w, part_b;
  if (fused_wgrad) {
    part_w = at::empty({n_items, P.Kc, P.D}, xc.options());
    part_b = at::empty({n_items, P.O, P.Ke}, xc.options());
  }

  // Phase 1: token blocks. Recompute H, GR = g Bc, fused routing backward, then grad_x = dH Wc (+ partial weight grads).
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<T> c(E), gates(k), dgate(k), dp(E), dz(E), pv(E);
    std::vector<char> on(E);  // slots in the token's top-k
    T* p = pv.data();
    for (int64_t it = begin; it < end; ++it) {
      const Item& item = items[it];
      const int64_t nb = item.t1 - item.t0;
      const at::Tensor xb = xc.narrow(0, item.t0, nb);
      at::Tensor xeb;
      if (P.has_xe) xeb = xec.narrow(0, item.t0, nb);
      const Proj pr = project(P, W, item.s, xb, P.has_xe ? &xeb : nullptr);
      const at::Tensor gb_rows = gc.narrow(0, item.t0, nb);
      at::Tensor grank;  // [nb, Ke] = g Bc
      std::vector<char> used;
      if (!P.split) {
        grank = at::mm(gb_rows, W.bc[item.s]);
      } else {
        // Only selected slots (zero gates elsewhere) and the shared expert need g B; the rest stays 0.
        used = used_slots(P, topk_idx, item.t0, item.t1);
        grank = at::zeros({nb, P.Ke}, xc.options());
        const at::Tensor b_s = W.b[item.s];
        for (int64_t i = 0; i < E; ++i) {
          if (!used[i]) continue;
          at::Tensor cols = grank.narrow(1, i * r, r);
          at::mm_out(cols, gb_rows, b_s[i]);
        }
        if (P.shared) {
          at::Tensor cols = grank.narrow(1, Er, r);
          at::mm_out(cols, gb_rows, W.sb[item.s]);
        }
      }
      const T* route = pr.route.data_ptr<T>();
      const T* expert = pr.expert.data_ptr<T>() + pr.expert_col;
      const T* gr = grank.data_ptr<T>();
      // Masked means absent: masked slots get p = 0, dp = 0, dz = 0 and G = dH = 0 by selection (never a product
      // with their values, which may be NaN; the caller's probs and grad_probs are not trusted to be 0 there).
      const bool* m = P.mask.data_ptr<bool>() + item.s * E;
      for (int64_t q = 0; q < nb; ++q) {
        const int64_t tok = item.t0 + q;
        for (int64_t i = 0; i < E; ++i) p[i] = m[i] ? probs[tok * E + i] : T(0);
        const int64_t* idx = topk_idx + tok * k;
        const T* rrow = route + q * pr.ld_route;
        const T* u = expert + q * pr.ld_expert;
        const T* grow = gr + q * P.Ke;
        T* G = gated_p + tok * P.Ke;
        T* dhr = dhr_p + tok * ld_dhr;  // [dt | dh (embedding router)]
        T* dhe = dhe_p + tok * ld_dhe;  // [du | dv]

        const T norm = gate_norm<T>(P, p, idx);
        std::fill(c.begin(), c.end(), T(0));
        std::fill(on.begin(), on.end(), 0);
        T s1 = 0;
        for (int64_t j = 0; j < k; ++j) {
          gates[j] = 0;
          dgate[j] = 0;
          if (idx[j] < 0) continue;
          const int64_t i = idx[j];
          on[i] = 1;
          gates[j] = p[i] / norm;
          c[i] = gates[j] * scaling;
          T acc = 0;
          for (int64_t l = 0; l < r; ++l) acc += grow[i * r + l] * u[i * r + l];
          dgate[j] = scaling * acc;
          s1 += dgate[j] * gates[j];
        }
        // d loss / d probs: through the renormalised gates, plus the caller's grad of probs.
        for (int64_t i = 0; i < E; ++i) dp[i] = (grad_probs != nullptr && m[i]) ? grad_probs[tok * E + i] : T(0);
        for (int64_t j = 0; j < k; ++j) {
          if (idx[j] >= 0) dp[idx[j]] += (dgate[j] - s1) / norm;
        }
        T pdp = 0;
        for (int64_t i = 0; i < E; ++i) pdp += p[i] * dp[i];
        for (int64_t i = 0; i < E; ++i) dz[i] = m[i] ? p[i] * (dp[i] - pdp) : T(0);

        // Expert path: G = [c_i u_i | s v] for grad_B; du = c_i (g B_i), dv = s (g B_shared).
        for (int64_t i = 0; i < E; ++i) {
          for (int64_t l = 0; l < r; ++l) {
            G[i * r + l] = on[i] ? u[i * r + l] * c[i] : T(0);
            dhe[i * r + l] = on[i] ? grow[i * r + l] * c[i] : T(0);
          }
        }
        if (P.shared) {
          for (int64_t l = 0; l < r; ++l) {
            G[Er + l] = u[Er + l] * scaling;
            dhe[Er + l] = grow[Er + l] * scaling;
          }
        }
        // Router path. Without expert_input the dh columns alias du, so they accumulate onto it.
        if (P.embedding) {
          const T* t = rrow;
          const T* h = rrow + P.R;
          T* dh = dhr + P.R;
          for (int64_t l = 0; l < r; ++l) {
            T acc = 0;
            for (int64_t i = 0; i < E; ++i) {
              if (m[i]) acc += dz[i] * h[i * r + l];
            }
            dhr[l] = acc * inv_sqrt_r;
          }
          for (int64_t i = 0; i < E; ++i) {
            for (int64_t l = 0; l < r; ++l) {
              const T v = m[i] ? dz[i] * t[l] * inv_sqrt_r : T(0);
              dh[i * r + l] = P.has_xe ? v : dh[i * r + l] + v;
            }
          }
        } else {
          for (int64_t i = 0; i < E; ++i) dhr[i] = m[i] ? dz[i] : T(0);
        }
      }
      at::Tensor gx_b = gx.narrow(0, item.t0, nb);
      if (P.split) {
        split_input_and_weight_grads(P, W, *sg, item, used, xb, xeb, gb_rows, gated.narrow(0, item.t0, nb),
                                     dh_route.narrow(0, item.t0, nb),
                                     P.has_xe ? dh_expert.narrow(0, item.t0, nb) : at::Tensor(), gx_b,
                                     P.has_xe ? gxe.narrow(0, item.t0, nb) : at::Tensor());
        continue;
      }
      const at::Tensor wc_s = W.wc[item.s];
      if (P.has_xe) {
        at::mm_out(gx_b, dh_route.narrow(0, item.t0, nb), wc_s.narrow(0, 0, P.Kr));
        at::Tensor gxe_b = gxe.narrow(0, item.t0, nb);
        at::mm_out(gxe_b, dh_expert.narrow(0, item.t0, nb), wc_s.narrow(0, P.R, P.Ke));
      } else {
        at::mm_out(gx_b, dh_route.narrow(0, item.t0, nb), wc_s);
      }
      if (fused_wgrad) {
        at::Tensor pw = part_w[it];
        if (P.has_xe) {
          // Routing rows [0, Kr) come from x, expert rows [R, Kc) from x_e; the A rows [R, Kr) get both.
          pw.zero_();
          at::Tensor top = pw.narrow(0, 0, P.Kr);
          at::mm_out(top, dh_route.narrow(0, item.t0, nb).t(), xb);
          pw.narrow(0, P.R, P.Ke).addmm_(dh_expert.narrow(0, item.t0, nb).t(), xeb);
        } else {
          at::mm_out(pw, dh_route.narrow(0, item.t0, nb).t(), xb);
        }
        at::Tensor pb = part_b[it];
        at::mm_out(pb, gc.narrow(0, item.t0, nb).t(), gated.narrow(0, item.t0, nb));
      }
    }
  });

  if (P.split) return;  // weight grads already written, per item
  if (fused_wgrad) {
    // Items are ordered by segment: items [first[s], first[s + 1]) belong to segment s.
    std::vector<int64_t> first(P.S + 1, n_items);
    for (int64_t it = n_items - 1; it >= 0; --it) first[items[it].s] = it;
    for (int64_t s = P.S - 1; s >= 0; --s) first[s] = std::min(first[s], first[s + 1]);
    constexpr int64_t kChunk = 8192;
    auto reduce = [&](const at::Tensor& parts, at::Tensor& out, int64_t numel) {
      const T* src = parts.data_ptr<T>();
      T* dst = out.data_ptr<T>();
      const int64_t chunks = (numel + kChunk - 1) / kChunk;
      at::parallel_for(0, P.S * chunks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t w = begin; w < end; ++w) {
          const int64_t s = w / chunks, c0 = (w % chunks) * kChunk, c1 = std::min(c0 + kChunk, numel);
          if (first[s] == first[s + 1]) continue;  // empty segment: its grads stay 0
          T* d = dst + s * numel;
          const T* p0 = src + first[s] * numel;
          for (int64_t e = c0; e < c1; ++e) d[e] = p0[e];
          for (int64_t it = first[s] + 1; it < first[s + 1]; ++it) {
            const T* pi = src + it * numel;
            for (int64_t e = c0; e < c1; ++e) d[e] += pi[e];
          }
        }
      });
    };
    reduce(part_w, gwc, part_w_numel);
    reduce(part_b, gbc, part_b_numel);
    return;
  }

  // Phase 2: weight grads, each a reduction over a whole segment's tokens in a single GEMM per column block.
  struct WItem {
    int64_t s, kind, c0, c1;  // kind 0: columns [c0, c1) of grad_Wc (d_in); kind 1: rows [c0, c1) of grad_Bc (d_out)
  };
  std::vector<WItem> witems;
  for (int64_t s = 0; s < P.S; ++s) {
    if (P.offsets[s + 1] == P.offsets[s]) continue;  // empty segment: its grads stay 0
    for (int64_t c0 = 0; c0 < P.D; c0 += kColBlock) witems.push_back({s, 0, c0, std::min(c0 + kColBlock, P.D)});
    for (int64_t c0 = 0; c0 < P.O; c0 += kColBlock) witems.push_back({s, 1, c0, std::min(c0 + kColBlock, P.O)});
  }
  at::parallel_for(0, static_cast<int64_t>(witems.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const WItem& w = witems[it];
      const int64_t lo = P.offsets[w.s], n = P.offsets[w.s + 1] - lo, width = w.c1 - w.c0;
      if (w.kind == 0) {
        at::Tensor out = gwc[w.s].narrow(1, w.c0, width);
        const at::Tensor xs = xc.narrow(0, lo, n).narrow(1, w.c0, width);
        if (P.has_xe) {
          const at::Tensor xes = xec.narrow(0, lo, n).narrow(1, w.c0, width);
          out.narrow(0, 0, P.Kr).copy_(at::mm(dh_route.narrow(0, lo, n).t(), xs));
          out.narrow(0, P.R, P.Ke).add_(at::mm(dh_expert.narrow(0, lo, n).t(), xes));
        } else {
          out.copy_(at::mm(dh_route.narrow(0, lo, n).t(), xs));
        }
      } else {
        at::Tensor out = gbc[w.s].narrow(0, w.c0, width);
        out.copy_(at::mm(gc.narrow(0, lo, n).narrow(1, w.c0, width).t(), gated.narrow(0, lo, n)));
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> mole_lora_fwd_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& expert_input, const at::Tensor& seg_offsets,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& router,
    const std::optional<at::Tensor>& shared_a, const std::optional<at::Tensor>& shared_b,
    const at::Tensor& expert_mask, int64_t top_k, double scaling, c10::string_view router_type) {
  at::AutoDispatchBelowADInplaceOrView guard;
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  Problem P = make_problem(x, expert_input, seg_offsets, lora_a, lora_b, router, shared_a, shared_b, expert_mask,
                           top_k, scaling, router_type);
  P.split = use_split(P.T, kSplitMaxTokensFwd);
  const at::Tensor xc = in_cd(x, P.cd);
  const at::Tensor xec = P.has_xe ? in_cd(*expert_input, P.cd) : at::Tensor();
  const Weights W = make_weights(P, router, lora_a, shared_a, lora_b, shared_b, /*backward=*/false);
  const at::Tensor& mask = P.mask;
  at::Tensor delta_c = at::empty({P.T, P.O}, xc.options());
  at::Tensor probs = at::zeros({P.T, P.E}, xc.options());
  at::Tensor topk_idx = at::full({P.T, P.k}, -1, x.options().dtype(at::kLong));
  if (P.cd == at::kDouble) {
    forward_impl<double>(P, xc, xec, W, mask.data_ptr<bool>(), probs.data_ptr<double>(), topk_idx.data_ptr<int64_t>(),
                         delta_c);
  } else {
    forward_impl<float>(P, xc, xec, W, mask.data_ptr<bool>(), probs.data_ptr<float>(), topk_idx.data_ptr<int64_t>(),
                        delta_c);
  }
  return {delta_c.to(x.scalar_type()), probs, topk_idx};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mole_lora_bwd_cpu(
    const at::Tensor& grad_delta, const std::optional<at::Tensor>& grad_probs, const at::Tensor& x,
    const std::optional<at::Tensor>& expert_input, const at::Tensor& seg_offsets, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& router, const std::optional<at::Tensor>& shared_a,
    const std::optional<at::Tensor>& shared_b, const at::Tensor& expert_mask, const at::Tensor& probs,
    const at::Tensor& topk_idx, int64_t top_k, double scaling, c10::string_view router_type) {
  at::AutoDispatchBelowADInplaceOrView guard;
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  Problem P = make_problem(x, expert_input, seg_offsets, lora_a, lora_b, router, shared_a, shared_b, expert_mask,
                           top_k, scaling, router_type);
  P.split = use_split(P.T, kSplitMaxTokensBwd);
  const MoLEDims d{P.T, P.S, P.E, P.r, P.D, P.O, P.k, P.R, P.embedding, P.shared, P.has_xe};
  check_mole_bwd_args(kWho, d, x, grad_delta, grad_probs, probs, P.cd, topk_idx);
  check_cpu(grad_delta, "grad_delta");
  check_cpu(probs, "probs");
  check_cpu(topk_idx, "topk_idx");
  // The backward indexes per-slot buffers with the top-k ids: every id is checked (a scan of T*k integers).
  const at::Tensor ic = topk_idx.contiguous();
  check_topk_values(kWho, ic.data_ptr<int64_t>(), P.mask.data_ptr<bool>(), P.offsets, P.E, P.k);
  at::Tensor gp;
  if (grad_probs.has_value()) {
    check_cpu(*grad_probs, "grad_probs");
    gp = in_cd(*grad_probs, P.cd);
  }
  const at::Tensor xc = in_cd(x, P.cd);
  const at::Tensor xec = P.has_xe ? in_cd(*expert_input, P.cd) : at::Tensor();
  const at::Tensor gc = in_cd(grad_delta, P.cd);
  const Weights W = make_weights(P, router, lora_a, shared_a, lora_b, shared_b, /*backward=*/true);
  const at::Tensor pc = probs.detach().contiguous();
  const auto dtype = x.scalar_type();
  const int64_t Er = P.E * P.r;
  const at::TensorOptions opts = xc.options();

  at::Tensor gx = at::empty({P.T, P.D}, opts);
  at::Tensor gxe = P.has_xe ? at::empty({P.T, P.D}, opts) : at::Tensor();
  at::Tensor gwc, gbc;
  SplitGrads sg;
  if (P.split) {
    sg.router = at::empty({P.S, P.R, P.D}, opts);
    sg.a = at::empty({P.S, Er, P.D}, opts);
    sg.b = at::zeros({P.S, P.E, P.O, P.r}, opts);  // unselected slots: one fill rather than one zero_() each
    if (P.shared) {
      sg.sa = at::empty({P.S, P.r, P.D}, opts);
      sg.sb = at::empty({P.S, P.O, P.r}, opts);
    }
  } else {
    gwc = at::zeros({P.S, P.Kc, P.D}, opts);
    gbc = at::zeros({P.S, P.O, P.Ke}, opts);
  }
  if (P.cd == at::kDouble) {
    backward_impl<double>(P, xc, xec, gc, gp.defined() ? gp.data_ptr<double>() : nullptr, W, pc.data_ptr<double>(),
                          ic.data_ptr<int64_t>(), gx, gxe, gwc, gbc, &sg);
  } else {
    backward_impl<float>(P, xc, xec, gc, gp.defined() ? gp.data_ptr<float>() : nullptr, W, pc.data_ptr<float>(),
                         ic.data_ptr<int64_t>(), gx, gxe, gwc, gbc, &sg);
  }
  const at::Tensor empty = at::empty({0}, x.options());
  at::Tensor g_router, g_a, g_b, g_sa, g_sb;
  if (P.split) {
    for (int64_t s = 0; s < P.S; ++s) {
      if (P.offsets[s + 1] > P.offsets[s]) continue;
      for (at::Tensor* t : {&sg.router, &sg.a, &sg.b, &sg.sa, &sg.sb}) {
        if (t->defined()) (*t)[s].zero_();  // empty segment: no gradient
      }
    }
    // Fresh buffers in the compute dtype: returned as they are when that is x's dtype.
    g_router = sg.router.to(dtype);
    g_a = sg.a.view({P.S, P.E, P.r, P.D}).to(dtype);
    g_b = sg.b.to(dtype);
    g_sa = P.shared ? sg.sa.to(dtype) : empty;
    g_sb = P.shared ? sg.sb.to(dtype) : empty;
  } else {
    // Weight grads are slices of two buffers: copy them out (one pass each), since op outputs must not alias each
    // other.
    auto cast = [&](const at::Tensor& t) {
      at::Tensor out = at::empty(t.sizes(), x.options().dtype(dtype));
      out.copy_(t);
      return out;
    };
    g_router = cast(gwc.narrow(1, 0, P.R));
    g_a = cast(gwc.narrow(1, P.R, Er).view({P.S, P.E, P.r, P.D}));
    g_b = cast(gbc.narrow(2, 0, Er).view({P.S, P.O, P.E, P.r}).permute({0, 2, 1, 3}));
    g_sa = P.shared ? cast(gwc.narrow(1, P.R + Er, P.r)) : empty;
    g_sb = P.shared ? cast(gbc.narrow(2, Er, P.r)) : empty;
  }
  return {gx.to(dtype), P.has_xe ? gxe.to(dtype) : empty, g_a, g_b, g_router, g_sa, g_sb};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mole_route_cpu(const at::Tensor& x, const at::Tensor& seg_offsets,
                                                              const at::Tensor& lora_a, const at::Tensor& router,
                                                              const at::Tensor& expert_mask, int64_t top_k,
                                                              c10::string_view router_type) {
  at::AutoDispatchBelowADInplaceOrView guard;
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  TORCH_CHECK_VALUE(lora_a.defined() && lora_a.dim() == 4, kWho, ": lora_a must be 4-D, got shape ", lora_a.sizes());
  // Routing never reads B: a [S, E, 1, r] stand-in satisfies the shape checks without touching memory.
  const at::Tensor fake_b = at::empty({lora_a.size(0), lora_a.size(1), 1, lora_a.size(2)}, lora_a.options());
  Problem P = make_problem(x, std::nullopt, seg_offsets, lora_a, fake_b, router, std::nullopt, std::nullopt,
                           expert_mask, top_k, 1.0, router_type);
  const at::Tensor xc = in_cd(x, P.cd);
  const at::Tensor wc = stack_down(P, router.detach(), lora_a.detach(), std::nullopt).narrow(1, 0, P.Kr).contiguous();
  const at::Tensor mask = expert_mask.contiguous();
  at::Tensor probs = at::zeros({P.T, P.E}, xc.options());
  at::Tensor topk_idx = at::full({P.T, P.k}, -1, x.options().dtype(at::kLong));
  const std::vector<Item> items = token_items(P);
  auto run = [&](auto zero) {
    using T = decltype(zero);
    T* probs_p = probs.data_ptr<T>();
    int64_t* idx_p = topk_idx.data_ptr<int64_t>();
    const bool* mask_p = mask.data_ptr<bool>();
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
      std::vector<T> z(P.E);
      std::vector<char> taken(P.E);
      for (int64_t it = begin; it < end; ++it) {
        const Item& item = items[it];
        const at::Tensor h = at::mm(xc.narrow(0, item.t0, item.t1 - item.t0), wc[item.s].t());
        const T* hp = h.data_ptr<T>();
        for (int64_t tok = item.t0; tok < item.t1; ++tok) {
          route_token<T>(P, hp + (tok - item.t0) * P.Kr, mask_p + item.s * P.E, probs_p + tok * P.E,
                         idx_p + tok * P.k, z.data(), taken.data());
        }
      }
    });
  };
  if (P.cd == at::kDouble) {
    run(double(0));
  } else {
    run(float(0));
  }
  // Counts: a sequential pass (S*T*k integer adds) keeps this trivially deterministic.
  at::Tensor counts = at::zeros({P.S, P.E}, x.options().dtype(at::kLong));
  int64_t* cnt = counts.data_ptr<int64_t>();
  const int64_t* idx_p = topk_idx.data_ptr<int64_t>();
  for (int64_t s = 0; s < P.S; ++s) {
    for (int64_t tok = P.offsets[s]; tok < P.offsets[s + 1]; ++tok) {
      for (int64_t j = 0; j < P.k; ++j) {
        if (idx_p[tok * P.k + j] >= 0) ++cnt[s * P.E + idx_p[tok * P.k + j]];
      }
    }
  }
  return {probs, topk_idx, counts};
}

}  // namespace fedamole
