// fedamole_ext::mole_lora: forward + backward of `mole_lora` as one op with a C++ autograd node, so that an eager
// call from Python is a single dispatcher call and its backward runs no Python at all. Measured at d=16, T=1, 1
// thread: the Python autograd.Function around the same kernels cost ~35 us per forward and ~40 us per backward.
//
// The node calls fedamole_ext::mole_lora_fwd / mole_lora_bwd through the dispatcher, so it serves every device those
// ops have kernels for (CPU; CUDA when built with it). Not traceable by torch.compile (no fake kernel): compiled code
// goes through the Python custom ops fedamole::mole_lora_fwd / _bwd instead. Not twice differentiable.
//
// Weights may also come without their segment dimension (one segment: lora_a [E, r, d_in], ..., expert_mask [E], the
// `MoLEExperts` layout): the leading 1 is added here (views) and dropped from their gradients, so the caller creates
// no tracked views per call.

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>

#include <string>

#include "mole_lora_cpu.h"

namespace fedamole {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using FwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const at::Tensor&, int64_t,
    double, c10::string_view);
using BwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const std::optional<at::Tensor>&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double,
    c10::string_view);

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_fwd(
    const at::Tensor& x, const std::optional<at::Tensor>& expert_input, const at::Tensor& seg_offsets,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& router,
    const std::optional<at::Tensor>& shared_a, const std::optional<at::Tensor>& shared_b,
    const at::Tensor& expert_mask, int64_t top_k, double scaling, c10::string_view router_type) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fedamole_ext::mole_lora_fwd", "").typed<FwdSig>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(x, expert_input, seg_offsets, lora_a, lora_b, router, shared_a, shared_b, expert_mask, top_k,
                 scaling, router_type);
}

std::optional<at::Tensor> optional_of(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// The leading segment dimension of one-segment weights (undefined stays undefined).
at::Tensor lead(const at::Tensor& t, bool add) { return add && t.defined() ? t.unsqueeze(0) : t; }
std::optional<at::Tensor> lead(const std::optional<at::Tensor>& t, bool add) {
  return add && t.has_value() ? std::optional<at::Tensor>(t->unsqueeze(0)) : t;
}
at::Tensor unlead(const at::Tensor& t, bool drop) { return drop && t.defined() && t.dim() > 0 ? t.squeeze(0) : t; }

class MoLEFunction : public torch::autograd::Function<MoLEFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const std::optional<at::Tensor>& expert_input,
                               const at::Tensor& seg_offsets, const at::Tensor& lora_a, const at::Tensor& lora_b,
                               const at::Tensor& router, const std::optional<at::Tensor>& shared_a,
                               const std::optional<at::Tensor>& shared_b, const at::Tensor& expert_mask,
                               int64_t top_k, double scaling, c10::string_view router_type) {
    const bool one = lora_a.dim() == 3;
    auto [delta, probs, topk_idx] =
        call_fwd(x, expert_input, seg_offsets, lead(lora_a, one), lead(lora_b, one), lead(router, one),
                 lead(shared_a, one), lead(shared_b, one), lead(expert_mask, one), top_k, scaling, router_type);
    ctx->save_for_backward({x, expert_input.value_or(at::Tensor()), seg_offsets, lora_a, lora_b, router,
                            shared_a.value_or(at::Tensor()), shared_b.value_or(at::Tensor()), expert_mask, probs,
                            topk_idx});
    ctx->saved_data["top_k"] = top_k;
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["router_type"] = std::string(router_type);
    ctx->mark_non_differentiable({topk_idx});
    ctx->set_materialize_grads(false);
    return {delta, probs, topk_idx};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("fedamole_ext::mole_lora_bwd", "").typed<BwdSig>();
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const bool one = saved[3].dim() == 3;
    const at::Tensor lora_b = lead(saved[4], one);
    at::Tensor grad_delta = grad_outputs[0];
    if (!grad_delta.defined()) grad_delta = at::zeros({x.size(0), lora_b.size(-2)}, x.options());
    const at::Tensor& grad_probs = grad_outputs[1];
    const std::string router_type = ctx->saved_data["router_type"].toStringRef();
    auto grads = [&] {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      return op.call(grad_delta.contiguous(),
                     grad_probs.defined() ? std::optional<at::Tensor>(grad_probs.contiguous()) : std::nullopt, x,
                     optional_of(saved[1]), saved[2], lead(saved[3], one), lora_b, lead(saved[5], one),
                     optional_of(lead(saved[6], one)), optional_of(lead(saved[7], one)), lead(saved[8], one), saved[9],
                     saved[10], ctx->saved_data["top_k"].toInt(),
                     ctx->saved_data["scaling"].toDouble(), router_type);
    }();
    auto& [g_x, g_xe, g_a, g_b, g_r, g_sa, g_sb] = grads;
    // One entry per forward argument: (x, expert_input, seg_offsets, lora_a, lora_b, router, shared_a, shared_b,
    // expert_mask, top_k, scaling, router_type); absent inputs get undefined gradients.
    return {g_x,
            saved[1].defined() ? g_xe : at::Tensor(),
            at::Tensor(),
            unlead(g_a, one),
            unlead(g_b, one),
            unlead(g_r, one),
            saved[6].defined() ? unlead(g_sa, one) : at::Tensor(),
            saved[7].defined() ? unlead(g_sb, one) : at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor()};
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> mole_lora_autograd(
    const at::Tensor& x, const std::optional<at::Tensor>& expert_input, const at::Tensor& seg_offsets,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& router,
    const std::optional<at::Tensor>& shared_a, const std::optional<at::Tensor>& shared_b,
    const at::Tensor& expert_mask, int64_t top_k, double scaling, c10::string_view router_type) {
  variable_list out = MoLEFunction::apply(x, expert_input, seg_offsets, lora_a, lora_b, router, shared_a, shared_b,
                                          expert_mask, top_k, scaling, router_type);
  return {out[0], out[1], out[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mole_lora_no_autograd(
    const at::Tensor& x, const std::optional<at::Tensor>& expert_input, const at::Tensor& seg_offsets,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& router,
    const std::optional<at::Tensor>& shared_a, const std::optional<at::Tensor>& shared_b,
    const at::Tensor& expert_mask, int64_t top_k, double scaling, c10::string_view router_type) {
  const bool one = lora_a.dim() == 3;
  return call_fwd(x, expert_input, seg_offsets, lead(lora_a, one), lead(lora_b, one), lead(router, one),
                  lead(shared_a, one), lead(shared_b, one), lead(expert_mask, one), top_k, scaling, router_type);
}

}  // namespace fedamole
