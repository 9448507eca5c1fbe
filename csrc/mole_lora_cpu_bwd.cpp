// Analytic backward of the CPU backend of `mole_lora` (design: mole_lora_cpu_common.cpp): per token block, H
// recomputed, GR = g Bc, the fused routing-backward loop -> dH (the column layout of H) and G, grad_x = dH Wc; then the
// weight gradients grad_Wc = dH^T x, grad_Bc = g^T G by one of three strategies, chosen once per call (WGrad).

#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "mole_lora_cpu.h"
#include "mole_lora_cpu_impl.h"

namespace fedamole {
namespace cpu {
namespace {

// Weight grads. Split: each (small) problem's one block per segment writes them straight into the outputs. Fused:
// while few enough token blocks, each block also writes its partial dH^T x and g^T G while its rows of x and g are
// still in cache, and a fixed-order sum over the blocks follows (deterministic, and it saves two passes over the
// [T, d] inputs). Two-pass: for very large T, a second pass instead reduces each segment in one GEMM per column block.
// The choice depends on the shapes only, never on the thread count.
enum class WGrad { kSplit, kFused, kTwoPass };

WGrad choose_wgrad(const Problem& P, int64_t n_items) {
  if (P.split) return WGrad::kSplit;
  const int64_t elem = P.cd == at::kDouble ? 8 : 4;
  // $FEDAMOLE_CPU_PARTIAL_BYTES overrides the 64 MiB budget (tests set 0 to exercise the two-pass path).
  const int64_t partials = n_items * (P.Kc * P.D + P.O * P.Ke) * elem;
  return partials <= tuning().partial_bytes ? WGrad::kFused : WGrad::kTwoPass;
}

// The backward's operands in the compute dtype, and its outputs (also in the compute dtype).
struct BwdIn {
  at::Tensor xc, xec, gc;  // x, expert_input (or undefined), grad_delta
  const void* grad_probs;  // [T, E] or null
  const void* probs;       // [T, E]
  const int64_t* topk_idx;
};

struct BwdOut {
  at::Tensor gx, gxe;  // [T, D]
  at::Tensor gwc, gbc;  // stacked weight grads [S, Kc, D], [S, O, Ke] (fused and two-pass strategies)
  SplitGrads sg;        // split strategy
};

// Token-wise buffers kept for the weight-gradient reductions: gated activations G [T, Ke] and the grads of H,
// dh_route [T, Kr] and dh_expert [T, Ke] with expert_input, else dh_route [T, Kc] alone (its columns [R, Kc) are dH's
// expert columns).
struct Acts {
  at::Tensor gated, dh_route, dh_expert;
  int64_t ld_dhr = 0, ld_dhe = 0;
};

Acts make_acts(const Problem& P, const at::TensorOptions& opts) {
  Acts a;
  a.gated = at::empty({P.T, P.Ke}, opts);
  if (P.has_xe) {
    a.dh_route = at::empty({P.T, P.Kr}, opts);
    a.dh_expert = at::empty({P.T, P.Ke}, opts);
  } else {
    a.dh_route = at::empty({P.T, P.Kc}, opts);
  }
  a.ld_dhr = P.has_xe ? P.Kr : P.Kc;
  a.ld_dhe = P.has_xe ? P.Ke : P.Kc;
  return a;
}

// Per-thread scratch of the routing backward.
template <typename T>
struct Scratch {
  std::vector<T> c, gates, dgate, dp, dz, p;
  std::vector<char> on;  // slots in the token's top-k
  Scratch(int64_t E, int64_t k) : c(E), gates(k), dgate(k), dp(E), dz(E), p(E), on(E) {}
};

// Renormalisation denominator of a token from the forward's probs and top-k (the backward never re-routes).
template <typename T>
T gate_norm(const Problem& P, const T* p, const int64_t* idx) {
  T picked = 0;
  for (int64_t q = 0; q < P.k; ++q) {
    if (idx[q] >= 0) picked += p[idx[q]];
  }
  return std::max(picked, std::numeric_limits<T>::min());
}

// One token's routing backward. In: its probs and grad_probs rows (probs_row/gp_row; gp_row may be null), top-k ids,
// projections (rrow: routing columns, u: expert columns) and GR row. Out: its G row and dH rows (dhr: [dt | dh],
// dhe: [du | dv]).
template <typename T>
void route_backward_token(const Problem& P, const bool* m, const T* probs_row, const T* gp_row, const int64_t* idx,
                          const T* rrow, const T* u, const T* grow, T* G, T* dhr, T* dhe, Scratch<T>& sc) {
  const int64_t E = P.E, r = P.r, Er = P.E * P.r, k = P.k;
  const T scaling = static_cast<T>(P.scaling);
  const T inv_sqrt_r = T(1) / std::sqrt(static_cast<T>(r));
  T* p = sc.p.data();
  std::vector<T>&c = sc.c, &gates = sc.gates, &dgate = sc.dgate, &dp = sc.dp, &dz = sc.dz;
  std::vector<char>& on = sc.on;
  for (int64_t i = 0; i < E; ++i) p[i] = m[i] ? probs_row[i] : T(0);
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
  for (int64_t i = 0; i < E; ++i) dp[i] = (gp_row != nullptr && m[i]) ? gp_row[i] : T(0);
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

// Phase 1 of one token block: recompute H, GR = g Bc, then the routing backward of each token into acts' rows.
// Returns the slots the block selected (split path; empty otherwise).
template <typename T>
std::vector<char> backward_block(const Problem& P, const Weights& W, const BwdIn& in, const Acts& acts,
                                 const Item& item, Scratch<T>& sc) {
  const int64_t E = P.E, r = P.r, Er = P.E * P.r, k = P.k, nb = item.t1 - item.t0;
  const at::Tensor xb = in.xc.narrow(0, item.t0, nb);
  at::Tensor xeb;
  if (P.has_xe) xeb = in.xec.narrow(0, item.t0, nb);
  const Proj pr = project(P, W, item.s, xb, P.has_xe ? &xeb : nullptr);
  const at::Tensor gb_rows = in.gc.narrow(0, item.t0, nb);
  at::Tensor grank;  // [nb, Ke] = g Bc
  std::vector<char> used;
  if (!P.split) {
    grank = at::mm(gb_rows, W.bc[item.s]);
  } else {
    // Only selected slots (zero gates elsewhere) and the shared expert need g B; the rest stays 0.
    used = used_slots(P, in.topk_idx, item.t0, item.t1);
    grank = at::zeros({nb, P.Ke}, in.xc.options());
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
  T* dhr_p = acts.dh_route.data_ptr<T>();
  T* dhe_p = P.has_xe ? acts.dh_expert.data_ptr<T>() : dhr_p + P.R;
  const T* probs = static_cast<const T*>(in.probs);
  const T* grad_probs = static_cast<const T*>(in.grad_probs);
  // Masked means absent: masked slots get p = 0, dp = 0, dz = 0 and G = dH = 0 by selection (never a product
  // with their values, which may be NaN; the caller's probs and grad_probs are not trusted to be 0 there).
  const bool* m = P.mask.data_ptr<bool>() + item.s * E;
  for (int64_t q = 0; q < nb; ++q) {
    const int64_t tok = item.t0 + q;
    route_backward_token<T>(P, m, probs + tok * E, grad_probs != nullptr ? grad_probs + tok * E : nullptr,
                            in.topk_idx + tok * k, route + q * pr.ld_route, expert + q * pr.ld_expert, gr + q * P.Ke,
                            acts.gated.data_ptr<T>() + tok * P.Ke, dhr_p + tok * acts.ld_dhr,
                            dhe_p + tok * acts.ld_dhe, sc);
  }
  return used;
}

// Stacked weights: grad_x = dH Wc (and grad_x_e), one GEMM per input.
void stacked_input_grads(const Problem& P, const Weights& W, const Acts& acts, const Item& item, BwdOut& out) {
  const int64_t nb = item.t1 - item.t0;
  at::Tensor gx_b = out.gx.narrow(0, item.t0, nb);
  const at::Tensor wc_s = W.wc[item.s];
  if (P.has_xe) {
    at::mm_out(gx_b, acts.dh_route.narrow(0, item.t0, nb), wc_s.narrow(0, 0, P.Kr));
    at::Tensor gxe_b = out.gxe.narrow(0, item.t0, nb);
    at::mm_out(gxe_b, acts.dh_expert.narrow(0, item.t0, nb), wc_s.narrow(0, P.R, P.Ke));
  } else {
    at::mm_out(gx_b, acts.dh_route.narrow(0, item.t0, nb), wc_s);
  }
}

// Fused strategy, one block: its partial dH^T x and g^T G into part_w[it], part_b[it].
void write_partials(const Problem& P, const BwdIn& in, const Acts& acts, const Item& item, const at::Tensor& part_w,
                    const at::Tensor& part_b, int64_t it) {
  const int64_t nb = item.t1 - item.t0;
  const at::Tensor xb = in.xc.narrow(0, item.t0, nb);
  at::Tensor pw = part_w[it];
  if (P.has_xe) {
    // Routing rows [0, Kr) come from x, expert rows [R, Kc) from x_e; the A rows [R, Kr) get both.
    pw.zero_();
    at::Tensor top = pw.narrow(0, 0, P.Kr);
    at::mm_out(top, acts.dh_route.narrow(0, item.t0, nb).t(), xb);
    pw.narrow(0, P.R, P.Ke).addmm_(acts.dh_expert.narrow(0, item.t0, nb).t(), in.xec.narrow(0, item.t0, nb));
  } else {
    at::mm_out(pw, acts.dh_route.narrow(0, item.t0, nb).t(), xb);
  }
  at::Tensor pb = part_b[it];
  at::mm_out(pb, in.gc.narrow(0, item.t0, nb).t(), acts.gated.narrow(0, item.t0, nb));
}

// Fused strategy, after phase 1: each segment's weight grads = the fixed-order sum of its blocks' partials.
template <typename T>
void reduce_partials(const Problem& P, const std::vector<Item>& items, const at::Tensor& part_w,
                     const at::Tensor& part_b, BwdOut& out) {
  const int64_t n_items = static_cast<int64_t>(items.size());
  const int64_t part_w_numel = P.Kc * P.D, part_b_numel = P.O * P.Ke;
  // Items are ordered by segment: items [first[s], first[s + 1]) belong to segment s.
  std::vector<int64_t> first(P.S + 1, n_items);
  for (int64_t it = n_items - 1; it >= 0; --it) first[items[it].s] = it;
  for (int64_t s = P.S - 1; s >= 0; --s) first[s] = std::min(first[s], first[s + 1]);
  constexpr int64_t kChunk = 8192;
  auto reduce = [&](const at::Tensor& parts, at::Tensor& sum, int64_t numel) {
    const T* src = parts.data_ptr<T>();
    T* dst = sum.data_ptr<T>();
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
  reduce(part_w, out.gwc, part_w_numel);
  reduce(part_b, out.gbc, part_b_numel);
}

// Two-pass strategy: weight grads, each a reduction over a whole segment's tokens in a single GEMM per column block.
void two_pass_weight_grads(const Problem& P, const BwdIn& in, const Acts& acts, BwdOut& grads) {
  const at::Tensor &xc = in.xc, &xec = in.xec, &gc = in.gc, &gated = acts.gated;
  const at::Tensor &dh_route = acts.dh_route, &dh_expert = acts.dh_expert;
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
        at::Tensor out = grads.gwc[w.s].narrow(1, w.c0, width);
        const at::Tensor xs = xc.narrow(0, lo, n).narrow(1, w.c0, width);
        if (P.has_xe) {
          const at::Tensor xes = xec.narrow(0, lo, n).narrow(1, w.c0, width);
          out.narrow(0, 0, P.Kr).copy_(at::mm(dh_route.narrow(0, lo, n).t(), xs));
          out.narrow(0, P.R, P.Ke).add_(at::mm(dh_expert.narrow(0, lo, n).t(), xes));
        } else {
          out.copy_(at::mm(dh_route.narrow(0, lo, n).t(), xs));
        }
      } else {
        at::Tensor out = grads.gbc[w.s].narrow(0, w.c0, width);
        out.copy_(at::mm(gc.narrow(0, lo, n).narrow(1, w.c0, width).t(), gated.narrow(0, lo, n)));
      }
    }
  });
}

template <typename T>
void backward_impl(const Problem& P, const BwdIn& in, const Weights& W, BwdOut& out) {
  const std::vector<Item> items = token_items(P);
  const int64_t n_items = static_cast<int64_t>(items.size());
  const WGrad strategy = choose_wgrad(P, n_items);
  const Acts acts = make_acts(P, in.xc.options());
  at::Tensor part_w, part_b;
  if (strategy == WGrad::kFused) {
    part_w = at::empty({n_items, P.Kc, P.D}, in.xc.options());
    part_b = at::empty({n_items, P.O, P.Ke}, in.xc.options());
  }
  // Phase 1: token blocks. Recompute H, GR = g Bc, fused routing backward, then grad_x = dH Wc (+ partial weight grads).
  at::parallel_for(0, n_items, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> sc(P.E, P.k);
    for (int64_t it = begin; it < end; ++it) {
      const Item& item = items[it];
      const std::vector<char> used = backward_block<T>(P, W, in, acts, item, sc);
      if (strategy == WGrad::kSplit) {
        const int64_t nb = item.t1 - item.t0;
        split_input_and_weight_grads(
            P, W, out.sg, item, used, in.xc.narrow(0, item.t0, nb),
            P.has_xe ? in.xec.narrow(0, item.t0, nb) : at::Tensor(), in.gc.narrow(0, item.t0, nb),
            acts.gated.narrow(0, item.t0, nb), acts.dh_route.narrow(0, item.t0, nb),
            P.has_xe ? acts.dh_expert.narrow(0, item.t0, nb) : at::Tensor(), out.gx.narrow(0, item.t0, nb),
            P.has_xe ? out.gxe.narrow(0, item.t0, nb) : at::Tensor());
        continue;
      }
      stacked_input_grads(P, W, acts, item, out);
      if (strategy == WGrad::kFused) write_partials(P, in, acts, item, part_w, part_b, it);
    }
  });
  if (strategy == WGrad::kFused) reduce_partials<T>(P, items, part_w, part_b, out);
  if (strategy == WGrad::kTwoPass) two_pass_weight_grads(P, in, acts, out);
}

// Outputs of the split strategy: fresh buffers in the compute dtype, returned as they are when that is x's dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> split_outputs(const Problem& P, SplitGrads& sg,
                                                                                    at::ScalarType dtype,
                                                                                    const at::Tensor& empty) {
  for (int64_t s = 0; s < P.S; ++s) {
    if (P.offsets[s + 1] > P.offsets[s]) continue;
    for (at::Tensor* t : {&sg.router, &sg.a, &sg.b, &sg.sa, &sg.sb}) {
      if (t->defined()) (*t)[s].zero_();  // empty segment: no gradient
    }
  }
  return {sg.a.view({P.S, P.E, P.r, P.D}).to(dtype), sg.b.to(dtype), sg.router.to(dtype),
          P.shared ? sg.sa.to(dtype) : empty, P.shared ? sg.sb.to(dtype) : empty};
}

// Outputs of the stacked strategies: weight grads are slices of two buffers, copied out (one pass each), since op
// outputs must not alias each other.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> stacked_outputs(const Problem& P,
                                                                                      const BwdOut& out,
                                                                                      at::ScalarType dtype,
                                                                                      const at::Tensor& empty) {
  const int64_t Er = P.E * P.r;
  auto cast = [&](const at::Tensor& t) {
    at::Tensor c = at::empty(t.sizes(), P.x.options().dtype(dtype));
    c.copy_(t);
    return c;
  };
  return {cast(out.gwc.narrow(1, P.R, Er).view({P.S, P.E, P.r, P.D})),
          cast(out.gbc.narrow(2, 0, Er).view({P.S, P.O, P.E, P.r}).permute({0, 2, 1, 3})),
          cast(out.gwc.narrow(1, 0, P.R)), P.shared ? cast(out.gwc.narrow(1, P.R + Er, P.r)) : empty,
          P.shared ? cast(out.gbc.narrow(2, Er, P.r)) : empty};
}

BwdOut allocate_grads(const Problem& P, const at::TensorOptions& opts) {
  BwdOut out;
  out.gx = at::empty({P.T, P.D}, opts);
  if (P.has_xe) out.gxe = at::empty({P.T, P.D}, opts);
  if (P.split) {
    SplitGrads& sg = out.sg;
    sg.router = at::empty({P.S, P.R, P.D}, opts);
    sg.a = at::empty({P.S, P.E * P.r, P.D}, opts);
    sg.b = at::zeros({P.S, P.E, P.O, P.r}, opts);  // unselected slots: one fill rather than one zero_() each
    if (P.shared) {
      sg.sa = at::empty({P.S, P.r, P.D}, opts);
      sg.sb = at::empty({P.S, P.O, P.r}, opts);
    }
  } else {
    out.gwc = at::zeros({P.S, P.Kc, P.D}, opts);
    out.gbc = at::zeros({P.S, P.O, P.Ke}, opts);
  }
  return out;
}

}  // namespace
}  // namespace cpu

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mole_lora_bwd_cpu(
    const at::Tensor& grad_delta, const std::optional<at::Tensor>& grad_probs, const at::Tensor& x,
    const std::optional<at::Tensor>& expert_input, const at::Tensor& seg_offsets, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& router, const std::optional<at::Tensor>& shared_a,
    const std::optional<at::Tensor>& shared_b, const at::Tensor& expert_mask, const at::Tensor& probs,
    const at::Tensor& topk_idx, int64_t top_k, double scaling, c10::string_view router_type) {
  using namespace cpu;
  at::AutoDispatchBelowADInplaceOrView guard;
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  Problem P = make_cpu_problem(make_problem(kCpu, x, expert_input, seg_offsets, lora_a, lora_b, router, shared_a,
                                            shared_b, expert_mask, top_k, scaling, router_type),
                               kSplitMaxTokensBwd);
  check_backward_args(kCpu, P, grad_delta, grad_probs, probs, P.cd, topk_idx);
  // The backward indexes per-slot buffers with the top-k ids: every id is checked (a scan of T*k integers).
  const at::Tensor ic = topk_idx.contiguous();
  check_topk_values(kWho, ic.data_ptr<int64_t>(), P.mask.data_ptr<bool>(), P.offsets, P.E, P.k);
  const at::Tensor gp = grad_probs.has_value() ? in_cd(*grad_probs, P.cd) : at::Tensor();
  const at::Tensor pc = probs.detach().contiguous();
  const BwdIn in{in_cd(x, P.cd), P.has_xe ? in_cd(*expert_input, P.cd) : at::Tensor(), in_cd(grad_delta, P.cd),
                 gp.defined() ? gp.data_ptr() : nullptr, pc.data_ptr(), ic.data_ptr<int64_t>()};
  const Weights W = make_weights(P, /*backward=*/true);
  BwdOut out = allocate_grads(P, in.xc.options());
  switch (P.cd) {
    case at::kDouble:
      backward_impl<double>(P, in, W, out);
      break;
    case at::kFloat:
      backward_impl<float>(P, in, W, out);
      break;
    default:
      TORCH_CHECK_TYPE(false, kWho, ": no backward kernel for compute dtype ", P.cd);
  }
  const auto dtype = x.scalar_type();
  const at::Tensor empty = at::empty({0}, x.options());
  auto [g_a, g_b, g_router, g_sa, g_sb] =
      P.split ? split_outputs(P, out.sg, dtype, empty) : stacked_outputs(P, out, dtype, empty);
  return {out.gx.to(dtype), P.has_xe ? out.gxe.to(dtype) : empty, g_a, g_b, g_router, g_sa, g_sb};
}

}  // namespace fedamole
