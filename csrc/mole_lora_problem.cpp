// The problem description and argument checks shared by the CPU and CUDA entry points of `mole_lora` (see
// mole_lora_problem.h). Wrong dtypes raise TypeError in Python (TORCH_CHECK_TYPE), everything else ValueError
// (TORCH_CHECK_VALUE), as the Python API does.

#include "mole_lora_problem.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <string>

namespace fedamole {
namespace {

void check_rank(const char* who, const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK_VALUE(t.defined(), who, ": ", name, " is undefined");
  TORCH_CHECK_VALUE(t.dim() == dim, who, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
}

void check_float(const char* who, const at::Tensor& t, const char* name, int64_t dim, at::ScalarType dtype) {
  check_rank(who, t, name, dim);
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, who, ": ", name, " has dtype ", t.scalar_type(), " but x has dtype ", dtype,
              "; all float inputs must match x");
}

void check_shape(const char* who, const at::Tensor& t, const char* name, at::IntArrayRef shape, const char* meaning) {
  TORCH_CHECK_VALUE(t.sizes() == shape, who, ": ", name, " must have shape ", shape, " (", meaning, "), got ", t.sizes());
}

// Device (and contiguity) of one tensor the kernels read.
void check_placement(const Backend& b, const at::Tensor& t, const char* name, const at::Tensor& x) {
  if (b.device == c10::DeviceType::CPU) {
    TORCH_CHECK_VALUE(t.device().is_cpu(), b.who, ": ", name, " must be a CPU tensor, got device ", t.device());
  } else {
    TORCH_CHECK_VALUE(t.device().type() == b.device, b.who, ": ", name, " must be a ", c10::DeviceTypeName(b.device),
                      " tensor, got ", t.device());
    TORCH_CHECK_VALUE(t.device() == x.device(), b.who, ": ", name, " is on ", t.device(), " but x is on ", x.device());
  }
  if (b.contiguous) TORCH_CHECK_VALUE(t.is_contiguous(), b.who, ": ", name, " must be contiguous");
}

// x and the weights: sizes into p.
void check_weights(const char* who, MoLEProblem& p, c10::string_view router_type) {
  const at::Tensor& x = p.x;
  check_rank(who, x, "x", 2);
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), who, ": x has unsupported dtype ", x.scalar_type(),
                   "; expected a floating dtype");
  const auto dtype = x.scalar_type();
  p.T = x.size(0);
  p.D = x.size(1);
  TORCH_CHECK_VALUE(p.D >= 1, who, ": x must have d_in >= 1 features, got shape ", x.sizes());
  check_float(who, p.lora_a, "lora_a", 4, dtype);
  p.S = p.lora_a.size(0);
  p.E = p.lora_a.size(1);
  p.r = p.lora_a.size(2);
  TORCH_CHECK_VALUE(p.S >= 1 && p.E >= 1 && p.r >= 1, who, ": lora_a must have S, E, r >= 1, got shape ",
                    p.lora_a.sizes());
  // x and lora_a disagree on d_in: x is the tensor that varies per call, so name it.
  TORCH_CHECK_VALUE(p.lora_a.size(3) == p.D, who, ": x must have shape [T, d_in=", p.lora_a.size(3),
                    "] (d_in of lora_a [S, E, r, d_in] = ", p.lora_a.sizes(), "), got ", x.sizes());
  check_float(who, p.lora_b, "lora_b", 4, dtype);
  p.O = p.lora_b.size(2);
  check_shape(who, p.lora_b, "lora_b", {p.S, p.E, p.O, p.r}, "[S, E, d_out, r]");
  TORCH_CHECK_VALUE(p.O >= 1, who, ": lora_b must have d_out >= 1, got shape ", p.lora_b.sizes());
  TORCH_CHECK_VALUE(router_type == "embedding" || router_type == "linear", who,
                    ": router_type must be 'embedding' or 'linear', got '", std::string(router_type), "'");
  p.embedding = router_type == "embedding";
  p.R = p.embedding ? p.r : p.E;
  check_float(who, p.router, "router", 3, dtype);
  check_shape(who, p.router, "router", {p.S, p.R, p.D},
              p.embedding ? "[S, r, d_in] for router_type='embedding'" : "[S, E, d_in] for router_type='linear'");
  TORCH_CHECK_VALUE(p.shared_a.has_value() == p.shared_b.has_value(), who,
                    ": shared_a and shared_b must be given together");
  p.shared = p.shared_a.has_value();
  if (p.shared) {
    check_float(who, *p.shared_a, "shared_a", 3, dtype);
    check_shape(who, *p.shared_a, "shared_a", {p.S, p.r, p.D}, "[S, r, d_in]");
    check_float(who, *p.shared_b, "shared_b", 3, dtype);
    check_shape(who, *p.shared_b, "shared_b", {p.S, p.O, p.r}, "[S, d_out, r]");
  }
  p.has_xe = p.expert_input.has_value();
  if (p.has_xe) {
    check_float(who, *p.expert_input, "expert_input", 2, dtype);
    check_shape(who, *p.expert_input, "expert_input", {p.T, p.D}, "[T, d_in], like x");
  }
  p.Kr = p.embedding ? p.R + p.E * p.r : p.R;
  p.Ke = p.E * p.r + (p.shared ? p.r : 0);
  p.Kc = p.R + p.Ke;
}

}  // namespace

MoLEProblem make_problem(const Backend& b, const at::Tensor& x, const std::optional<at::Tensor>& expert_input,
                         const at::Tensor& seg_offsets, const at::Tensor& lora_a, const at::Tensor& lora_b,
                         const at::Tensor& router, const std::optional<at::Tensor>& shared_a,
                         const std::optional<at::Tensor>& shared_b, const at::Tensor& expert_mask, int64_t top_k,
                         double scaling, c10::string_view router_type) {
  const char* who = b.who;
  MoLEProblem p{x, seg_offsets, lora_a, lora_b, router, expert_mask, expert_input, shared_a, shared_b, scaling};
  check_weights(who, p, router_type);
  check_rank(who, expert_mask, "expert_mask", 2);
  TORCH_CHECK_TYPE(expert_mask.scalar_type() == at::kBool, who, ": expert_mask must be bool, got ",
                   expert_mask.scalar_type());
  check_shape(who, expert_mask, "expert_mask", {p.S, p.E}, "[S, E]");
  check_rank(who, seg_offsets, "seg_offsets", 1);
  TORCH_CHECK_TYPE(seg_offsets.scalar_type() == at::kLong || seg_offsets.scalar_type() == at::kInt, who,
                   ": seg_offsets must be int32 or int64, got ", seg_offsets.scalar_type());
  check_shape(who, seg_offsets, "seg_offsets", {p.S + 1}, "[S+1] with S = lora_a.shape[0]");
  TORCH_CHECK_VALUE(top_k >= 1 && top_k <= std::max(p.E, kMaxPaddedTopK), who, ": top_k must be in [1, max(E, ",
                    kMaxPaddedTopK, ")] (E = ", p.E, " slots), got ", top_k);
  TORCH_CHECK_VALUE(std::isfinite(scaling), who, ": scaling must be finite, got ", scaling);
  p.k = top_k;
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&x, "x"}, {&seg_offsets, "seg_offsets"},
                                {&lora_a, "lora_a"}, {&lora_b, "lora_b"}, {&router, "router"},
                                {&expert_mask, "expert_mask"}}) {
    check_placement(b, *t, name, x);
  }
  if (expert_input.has_value()) check_placement(b, *expert_input, "expert_input", x);
  if (shared_a.has_value()) check_placement(b, *shared_a, "shared_a", x);
  if (shared_b.has_value()) check_placement(b, *shared_b, "shared_b", x);
  return p;
}

void check_backward_args(const Backend& b, const MoLEProblem& p, const at::Tensor& grad_delta,
                         const std::optional<at::Tensor>& grad_probs, const at::Tensor& probs,
                         at::ScalarType probs_dtype, const at::Tensor& topk_idx) {
  const char* who = b.who;
  check_float(who, grad_delta, "grad_delta", 2, p.x.scalar_type());
  check_shape(who, grad_delta, "grad_delta", {p.T, p.O}, "[T, d_out], like delta");
  check_rank(who, probs, "probs", 2);
  TORCH_CHECK_TYPE(probs.scalar_type() == probs_dtype, who, ": probs must have dtype ", probs_dtype, ", got ",
                   probs.scalar_type());
  check_shape(who, probs, "probs", {p.T, p.E}, "[T, E], the forward's probs");
  check_rank(who, topk_idx, "topk_idx", 2);
  TORCH_CHECK_TYPE(topk_idx.scalar_type() == at::kLong, who, ": topk_idx must be int64, got ", topk_idx.scalar_type());
  check_shape(who, topk_idx, "topk_idx", {p.T, p.k}, "[T, top_k], the forward's topk_idx");
  if (grad_probs.has_value()) {
    check_rank(who, *grad_probs, "grad_probs", 2);
    TORCH_CHECK_TYPE(at::isFloatingType(grad_probs->scalar_type()), who, ": grad_probs must be floating, got ",
                     grad_probs->scalar_type());
    check_shape(who, *grad_probs, "grad_probs", {p.T, p.E}, "[T, E], like probs");
  }
  check_placement(b, grad_delta, "grad_delta", p.x);
  check_placement(b, probs, "probs", p.x);
  check_placement(b, topk_idx, "topk_idx", p.x);
  if (grad_probs.has_value()) check_placement(b, *grad_probs, "grad_probs", p.x);
}

std::vector<int64_t> check_offsets_values(const char* who, const at::Tensor& seg_offsets, int64_t T) {
  const at::Tensor offs = seg_offsets.to(at::kLong).contiguous();
  const int64_t* o = offs.data_ptr<int64_t>();
  std::vector<int64_t> v(o, o + offs.numel());
  const int64_t S = static_cast<int64_t>(v.size()) - 1;
  TORCH_CHECK_VALUE(v[0] == 0, who, ": seg_offsets must start at 0, got seg_offsets[0] = ", v[0]);
  TORCH_CHECK_VALUE(v[S] == T, who, ": seg_offsets must end at T = x.shape[0] = ", T, ", got ", v[S]);
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK_VALUE(v[s] <= v[s + 1], who, ": seg_offsets must be non-decreasing, got seg_offsets[", s, "] = ", v[s],
                " > seg_offsets[", s + 1, "] = ", v[s + 1]);
  }
  return v;
}

void check_topk_values(const char* who, const int64_t* topk_idx, const bool* expert_mask,
                       const std::vector<int64_t>& offsets, int64_t E, int64_t k) {
  const int64_t S = static_cast<int64_t>(offsets.size()) - 1;
  for (int64_t s = 0; s < S; ++s) {
    const bool* m = expert_mask + s * E;
    for (int64_t t = offsets[s]; t < offsets[s + 1]; ++t) {
      const int64_t* row = topk_idx + t * k;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t i = row[j];
        if (i == -1) continue;
        TORCH_CHECK_VALUE(i >= 0 && i < E, who, ": topk_idx[", t, ", ", j, "] = ", i, " is out of range: ids are -1 or in [0, E = ",
                    E, ")");
        TORCH_CHECK_VALUE(m[i], who, ": topk_idx[", t, ", ", j, "] = ", i, " is a masked slot of segment ", s,
                    " (expert_mask[", s, ", ", i, "] is False)");
        for (int64_t q = 0; q < j; ++q) {
          TORCH_CHECK_VALUE(row[q] != i, who, ": topk_idx[", t, "] holds slot ", i, " twice");
        }
      }
    }
  }
}

at::Tensor stack_down(const MoLEProblem& p, at::ScalarType dtype) {
  std::vector<at::Tensor> parts{p.router.detach().to(dtype), p.lora_a.detach().to(dtype).reshape({p.S, p.E * p.r, p.D})};
  if (p.shared) parts.push_back(p.shared_a->detach().to(dtype));
  return at::cat(parts, 1).contiguous();
}

at::Tensor stack_up(const MoLEProblem& p, at::ScalarType dtype) {
  at::Tensor bc = at::empty({p.S, p.O, p.Ke}, p.lora_b.options().dtype(dtype));
  bc.narrow(2, 0, p.E * p.r).view({p.S, p.O, p.E, p.r}).copy_(p.lora_b.detach().permute({0, 2, 1, 3}));
  if (p.shared) bc.narrow(2, p.E * p.r, p.r).copy_(p.shared_b->detach());
  return bc;
}

}  // namespace fedamole
