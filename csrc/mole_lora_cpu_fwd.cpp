// Forward of the CPU backend of `mole_lora` (design: mole_lora_cpu_common.cpp): per token block, H = x Wc^T, the
// fused routing loop (probs, top-k, gated rank activations G), then delta = G Bc^T.

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

}  // namespace
}  // namespace cpu

std::tuple<at::Tensor, at::Tensor, at::Tensor> mole_lora_fwd_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& expert_input, const at::Tensor& seg_offsets,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& router,
    const std::optional<at::Tensor>& shared_a, const std::optional<at::Tensor>& shared_b,
    const at::Tensor& expert_mask, int64_t top_k, double scaling, c10::string_view router_type) {
  using namespace cpu;
  at::AutoDispatchBelowADInplaceOrView guard;
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const Problem P = make_cpu_problem(make_problem(kCpu, x, expert_input, seg_offsets, lora_a, lora_b, router, shared_a,
                                                  shared_b, expert_mask, top_k, scaling, router_type),
                                     kSplitMaxTokensFwd);
  const at::Tensor xc = in_cd(x, P.cd);
  const at::Tensor xec = P.has_xe ? in_cd(*expert_input, P.cd) : at::Tensor();
  const Weights W = make_weights(P, /*backward=*/false);
  const bool* mask = P.mask.data_ptr<bool>();
  at::Tensor delta_c = at::empty({P.T, P.O}, xc.options());
  at::Tensor probs = at::zeros({P.T, P.E}, xc.options());
  at::Tensor topk_idx = at::full({P.T, P.k}, -1, x.options().dtype(at::kLong));
  switch (P.cd) {
    case at::kDouble:
      forward_impl<double>(P, xc, xec, W, mask, probs.data_ptr<double>(), topk_idx.data_ptr<int64_t>(), delta_c);
      break;
    case at::kFloat:
      forward_impl<float>(P, xc, xec, W, mask, probs.data_ptr<float>(), topk_idx.data_ptr<int64_t>(), delta_c);
      break;
    default:
      TORCH_CHECK_TYPE(false, kWho, ": no forward kernel for compute dtype ", P.cd);
  }
  return {delta_c.to(x.scalar_type()), probs, topk_idx};
}

}  // namespace fedamole
