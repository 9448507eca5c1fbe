// Input and weight gradients of the CPU backend's split path (small problems: one token block per segment, weights
// used in place; design: mole_lora_cpu_common.cpp). Called by the backward in mole_lora_cpu_bwd.cpp.

#include <vector>

#include "mole_lora_cpu_impl.h"

namespace fedamole {
namespace cpu {

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

}  // namespace cpu
}  // namespace fedamole
