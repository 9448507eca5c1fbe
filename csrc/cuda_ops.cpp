// Thin torch binding of the CUDA kernels (csrc/cuda/mole_lora_kernels.cu). The whole file compiles to nothing unless
// setup.py builds with CUDA (FEDAMOLE_WITH_CUDA), because CPU-only torch has no usable CUDA headers.
//
// Forward:  H = x Wc^T (fp32) -> fused routing (probs, top-k, gated G, usage counts) -> delta = G Bc^T.
// Backward: H recomputed, GR = g Bc -> fused routing backward (G, dH) -> grad_x = dH Wc, grad_Wc = dH^T x,
//           grad_Bc = g^T G. All GEMMs are one segmented launch each (grid over segment x tile); no host syncs.
//
// Defence: every shape, dtype, device and contiguity is checked on the host (check_mole_args, shared with the CPU
// op); seg_offsets and topk_idx values cannot be read without a sync, so the kernels clamp them and set a device
// error flag, and at::_assert_async raises after the kernels when it is set (a device-side assert: the CUDA context
// is then unusable, but nothing runs on with out-of-bounds accesses or garbage). Masked slots are absent: their
// rows of Wc and columns of Bc are zeroed, so NaN/Inf there never meets a zero gate.
#ifdef FEDAMOLE_WITH_CUDA

#include "mole_lora_cuda_ops.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <string>
#include <vector>

#include "cuda/mole_lora_kernels.cuh"
#include "mole_lora_checks.h"

namespace fedamole {
namespace {

using cuda::DType;
using cuda::SegGemmParams;

struct Dims {
  int64_t T, S, E, r, D, O, k, R, Kc, Ke;
  bool embedding, shared, has_xe;
  DType dtype;
};

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "mole_lora (cuda): ", what, " failed: ", cudaGetErrorString(err));
}

constexpr const char* kWho = "mole_lora (cuda)";

void check_input(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.is_cuda(), kWho, ": ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK_VALUE(t.device() == x.device(), kWho, ": ", name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), kWho, ": ", name, " must be contiguous");
}

Dims make_dims(const at::Tensor& x, const std::optional<at::Tensor>& expert_input, const at::Tensor& seg_offsets,
               const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& router,
               const std::optional<at::Tensor>& shared_a, const std::optional<at::Tensor>& shared_b,
               const at::Tensor& expert_mask, int64_t top_k, double scaling, c10::string_view router_type) {
  const MoLEDims m = check_mole_args(kWho, x, expert_input, seg_offsets, lora_a, lora_b, router, shared_a, shared_b,
                                     expert_mask, top_k, scaling, router_type);
  Dims d{};
  switch (x.scalar_type()) {
    case at::kFloat:
      d.dtype = DType::kFloat32;
      break;
    case at::kHalf:
      d.dtype = DType::kFloat16;
      break;
    case at::kBFloat16:
      d.dtype = DType::kBFloat16;
      break;
    default:
      TORCH_CHECK_TYPE(false, kWho, ": x has unsupported dtype ", x.scalar_type(),
                       "; expected float32, float16 or bfloat16 (float64: use backend 'reference' or 'cpu')");
  }
  for (auto [t, name] : std::vector<std::pair<const at::Tensor*, const char*>>{
           {&x, "x"}, {&lora_a, "lora_a"}, {&lora_b, "lora_b"}, {&router, "router"}, {&expert_mask, "expert_mask"},
           {&seg_offsets, "seg_offsets"}}) {
    check_input(*t, name, x);
  }
  if (expert_input.has_value()) check_input(*expert_input, "expert_input", x);
  if (shared_a.has_value()) check_input(*shared_a, "shared_a", x);
  if (shared_b.has_value()) check_input(*shared_b, "shared_b", x);
  TORCH_CHECK_TYPE(seg_offsets.scalar_type() == at::kLong, kWho, ": seg_offsets must be int64 here");
  TORCH_CHECK_VALUE(m.E <= cuda::kMaxSlots, kWho, ": lora_a has E = ", m.E, " slots; at most ", cuda::kMaxSlots);
  TORCH_CHECK_VALUE(m.k <= cuda::kMaxTopK, kWho, ": top_k must be in [1, ", cuda::kMaxTopK, "], got ", m.k);
  d.T = m.T;
  d.D = m.D;
  d.S = m.S;
  d.E = m.E;
  d.r = m.r;
  d.O = m.O;
  d.k = m.k;
  d.R = m.R;
  d.embedding = m.embedding;
  d.shared = m.shared;
  d.has_xe = m.has_xe;
  d.Ke = d.E * d.r + (d.shared ? d.r : 0);
  d.Kc = d.R + d.Ke;
  return d;
}

// Wc [S, Kc, D] = [router | A | shared A], masked slots' A rows (and linear-router rows) zeroed. `absent` = ~mask.
at::Tensor stack_down(const Dims& d, const at::Tensor& router, const at::Tensor& lora_a,
                      const std::optional<at::Tensor>& shared_a, const at::Tensor& absent) {
  std::vector<at::Tensor> parts{router, lora_a.reshape({d.S, d.E * d.r, d.D})};
  if (d.shared) parts.push_back(*shared_a);
  at::Tensor wc = at::cat(parts, 1);  // a fresh buffer: masked in place
  wc.narrow(1, d.R, d.E * d.r).view({d.S, d.E, d.r, d.D}).masked_fill_(absent.view({d.S, d.E, 1, 1}), 0);
  if (!d.embedding) wc.narrow(1, 0, d.R).masked_fill_(absent.view({d.S, d.E, 1}), 0);
  return wc;
}

// Bc [S, O, Ke] = [B_1 .. B_E | shared B], masked slots' columns zeroed.
at::Tensor stack_up(const Dims& d, const at::Tensor& lora_b, const std::optional<at::Tensor>& shared_b,
                    const at::Tensor& absent) {
  at::Tensor bc = at::empty({d.S, d.O, d.Ke}, lora_b.options());
  at::Tensor experts = bc.narrow(2, 0, d.E * d.r).view({d.S, d.O, d.E, d.r});
  experts.copy_(lora_b.permute({0, 2, 1, 3}));
  experts.masked_fill_(absent.view({d.S, 1, d.E, 1}), 0);
  if (d.shared) bc.narrow(2, d.E * d.r, d.r).copy_(*shared_b);
  return bc;
}

// Raises once the kernels flagged invalid seg_offsets / topk_idx (no host sync; see the file comment).
void assert_no_error(const at::Tensor& error) {
  at::_assert_async(error.eq(0).all(),
                    "mole_lora (cuda): invalid seg_offsets (must be 0 = first <= ... <= last = T) or topk_idx (must "
                    "be -1 or active, distinct slots of the token's segment)");
}

SegGemmParams token_gemm(const Dims& d, const at::Tensor& seg_offsets) {
  SegGemmParams p;
  p.seg_offsets = seg_offsets.data_ptr<int64_t>();
  p.num_segments = static_cast<int>(d.S);
  p.num_tokens = d.T;
  p.max_seg_tokens = static_cast<int>(d.T);  // an upper bound that needs no host sync
  p.token_dim = 0;
  return p;
}

// H [T, Kc] fp32 = inp Wc[s]^T per segment.
at::Tensor project(const Dims& d, const at::Tensor& inp, const at::Tensor& wc, const at::Tensor& offs,
                   cudaStream_t stream) {
  at::Tensor h = at::empty({d.T, d.Kc}, inp.options().dtype(at::kFloat));
  SegGemmParams p = token_gemm(d, offs);
  p.a = inp.data_ptr();
  p.a_rs = d.D;
  p.a_cs = 1;
  p.b = wc.data_ptr();
  p.b_rs = 1;
  p.b_cs = d.D;
  p.b_seg = d.Kc * d.D;
  p.c = h.data_ptr();
  p.c_rs = d.Kc;
  p.n = static_cast<int>(d.Kc);
  p.k = static_cast<int>(d.D);
  check_cuda(cuda::launch_seg_gemm(p, d.dtype, stream), "shrink GEMM");
  return h;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> mole_lora_fwd_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& expert_input, const at::Tensor& seg_offsets,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& router,
    const std::optional<at::Tensor>& shared_a, const std::optional<at::Tensor>& shared_b,
    const at::Tensor& expert_mask, int64_t top_k, double scaling, c10::string_view router_type) {
  at::AutoDispatchBelowADInplaceOrView guard;
  const c10::cuda::CUDAGuard device_guard(x.device());
  const Dims d = make_dims(x, expert_input, seg_offsets, lora_a, lora_b, router, shared_a, shared_b, expert_mask,
                           top_k, scaling, router_type);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor absent = expert_mask.logical_not();
  const at::Tensor wc = stack_down(d, router, lora_a, shared_a, absent);
  const at::Tensor bc = stack_up(d, lora_b, shared_b, absent);
  const at::Tensor h = project(d, x, wc, seg_offsets, stream);
  const at::Tensor he = d.has_xe ? project(d, *expert_input, wc, seg_offsets, stream) : h;
  const at::Tensor error = at::zeros({2}, x.options().dtype(at::kInt));

  at::Tensor probs = at::empty({d.T, d.E}, x.options().dtype(at::kFloat));
  at::Tensor topk_idx = at::empty({d.T, d.k}, x.options().dtype(at::kLong));
  at::Tensor gated = at::empty({d.T, d.Ke}, x.options());
  cuda::RouteParams rp;
  rp.h = h.data_ptr<float>();
  rp.h_expert = he.data_ptr<float>();
  rp.seg_offsets = seg_offsets.data_ptr<int64_t>();
  rp.mask = expert_mask.data_ptr<bool>();
  rp.probs = probs.data_ptr<float>();
  rp.topk_idx = topk_idx.data_ptr<int64_t>();
  rp.gated = gated.data_ptr();
  rp.error = error.data_ptr<int32_t>();
  rp.num_tokens = static_cast<int>(d.T);
  rp.num_segments = static_cast<int>(d.S);
  rp.num_slots = static_cast<int>(d.E);
  rp.rank = static_cast<int>(d.r);
  rp.top_k = static_cast<int>(d.k);
  rp.router_rows = static_cast<int>(d.R);
  rp.kc = static_cast<int>(d.Kc);
  rp.ke = static_cast<int>(d.Ke);
  rp.embedding = d.embedding;
  rp.shared = d.shared;
  rp.scaling = static_cast<float>(scaling);
  check_cuda(cuda::launch_route_forward(rp, d.dtype, stream), "routing kernel");

  at::Tensor delta = at::empty({d.T, d.O}, x.options());
  SegGemmParams p = token_gemm(d, seg_offsets);
  p.a = gated.data_ptr();
  p.a_rs = d.Ke;
  p.a_cs = 1;
  p.b = bc.data_ptr();
  p.b_rs = 1;
  p.b_cs = d.Ke;
  p.b_seg = d.O * d.Ke;
  p.c = delta.data_ptr();
  p.c_rs = d.O;
  p.c_fp32 = d.dtype == DType::kFloat32;
  p.n = static_cast<int>(d.O);
  p.k = static_cast<int>(d.Ke);
  check_cuda(cuda::launch_seg_gemm(p, d.dtype, stream), "expand GEMM");
  assert_no_error(error);
  return {delta, probs, topk_idx};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mole_lora_bwd_cuda(
    const at::Tensor& grad_delta, const std::optional<at::Tensor>& grad_probs, const at::Tensor& x,
    const std::optional<at::Tensor>& expert_input, const at::Tensor& seg_offsets, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& router, const std::optional<at::Tensor>& shared_a,
    const std::optional<at::Tensor>& shared_b, const at::Tensor& expert_mask, const at::Tensor& probs,
    const at::Tensor& topk_idx, int64_t top_k, double scaling, c10::string_view router_type) {
  at::AutoDispatchBelowADInplaceOrView guard;
  const c10::cuda::CUDAGuard device_guard(x.device());
  const Dims d = make_dims(x, expert_input, seg_offsets, lora_a, lora_b, router, shared_a, shared_b, expert_mask,
                           top_k, scaling, router_type);
  const MoLEDims m{d.T, d.S, d.E, d.r, d.D, d.O, d.k, d.R, d.embedding, d.shared, d.has_xe};
  check_mole_bwd_args(kWho, m, x, grad_delta, grad_probs, probs, at::kFloat, topk_idx);
  check_input(grad_delta, "grad_delta", x);
  check_input(probs, "probs", x);
  check_input(topk_idx, "topk_idx", x);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor absent = expert_mask.logical_not();
  const at::Tensor wc = stack_down(d, router, lora_a, shared_a, absent);
  const at::Tensor bc = stack_up(d, lora_b, shared_b, absent);
  const at::Tensor error = at::zeros({2}, x.options().dtype(at::kInt));
  const at::Tensor h = project(d, x, wc, seg_offsets, stream);
  const at::Tensor he = d.has_xe ? project(d, *expert_input, wc, seg_offsets, stream) : h;
  at::Tensor gp;
  if (grad_probs.has_value()) {
    check_input(*grad_probs, "grad_probs", x);
    gp = grad_probs->to(at::kFloat).contiguous();
  }

  // GR [T, Ke] fp32 = g Bc[s].
  at::Tensor grank = at::empty({d.T, d.Ke}, x.options().dtype(at::kFloat));
  {
    SegGemmParams p = token_gemm(d, seg_offsets);
    p.a = grad_delta.data_ptr();
    p.a_rs = d.O;
    p.a_cs = 1;
    p.b = bc.data_ptr();
    p.b_rs = d.Ke;
    p.b_cs = 1;
    p.b_seg = d.O * d.Ke;
    p.c = grank.data_ptr();
    p.c_rs = d.Ke;
    p.n = static_cast<int>(d.Ke);
    p.k = static_cast<int>(d.O);
    check_cuda(cuda::launch_seg_gemm(p, d.dtype, stream), "GR GEMM");
  }
  at::Tensor gated = at::empty({d.T, d.Ke}, x.options());
  at::Tensor dh = at::empty({d.T, d.Kc}, x.options());
  at::Tensor dh_route = d.has_xe ? at::empty({d.T, d.Kc}, x.options()) : dh;
  {
    cuda::RouteBackwardParams rp;
    rp.h = h.data_ptr<float>();
    rp.h_expert = he.data_ptr<float>();
    rp.grank = grank.data_ptr<float>();
    rp.probs = probs.data_ptr<float>();
    rp.topk_idx = topk_idx.data_ptr<int64_t>();
    rp.seg_offsets = seg_offsets.data_ptr<int64_t>();
    rp.mask = expert_mask.data_ptr<bool>();
    rp.error = error.data_ptr<int32_t>();
    rp.num_segments = static_cast<int>(d.S);
    rp.grad_probs = gp.defined() ? gp.data_ptr<float>() : nullptr;
    rp.gated = gated.data_ptr();
    rp.dh = dh.data_ptr();
    rp.dh_route = d.has_xe ? dh_route.data_ptr() : nullptr;
    rp.num_tokens = static_cast<int>(d.T);
    rp.num_slots = static_cast<int>(d.E);
    rp.rank = static_cast<int>(d.r);
    rp.top_k = static_cast<int>(d.k);
    rp.router_rows = static_cast<int>(d.R);
    rp.kc = static_cast<int>(d.Kc);
    rp.ke = static_cast<int>(d.Ke);
    rp.embedding = d.embedding;
    rp.shared = d.shared;
    rp.scaling = static_cast<float>(scaling);
    check_cuda(cuda::launch_route_backward(rp, d.dtype, stream), "routing backward kernel");
  }
  const bool f32 = d.dtype == DType::kFloat32;
  // grad of an input [T, D] = dH Wc[s].
  auto input_grad = [&](const at::Tensor& dmat) {
    at::Tensor out = at::empty({d.T, d.D}, x.options());
    SegGemmParams p = token_gemm(d, seg_offsets);
    p.a = dmat.data_ptr();
    p.a_rs = d.Kc;
    p.a_cs = 1;
    p.b = wc.data_ptr();
    p.b_rs = d.D;
    p.b_cs = 1;
    p.b_seg = d.Kc * d.D;
    p.c = out.data_ptr();
    p.c_rs = d.D;
    p.c_fp32 = f32;
    p.n = static_cast<int>(d.D);
    p.k = static_cast<int>(d.Kc);
    check_cuda(cuda::launch_seg_gemm(p, d.dtype, stream), "input-gradient GEMM");
    return out;
  };
  at::Tensor gx = input_grad(dh_route);
  at::Tensor gxe = d.has_xe ? input_grad(dh) : at::Tensor();

  // Weight grads reduce over each segment's tokens (token_dim = 2), fp32 outputs.
  at::Tensor gwc = at::empty({d.S, d.Kc, d.D}, x.options().dtype(at::kFloat));
  auto down_grad = [&](const at::Tensor& dmat, const at::Tensor& inp, bool accumulate) {
    SegGemmParams p;
    p.seg_offsets = seg_offsets.data_ptr<int64_t>();
    p.num_segments = static_cast<int>(d.S);
    p.num_tokens = d.T;
    p.token_dim = 2;
    p.a = dmat.data_ptr();
    p.a_rs = 1;
    p.a_cs = d.Kc;
    p.b = inp.data_ptr();
    p.b_rs = d.D;
    p.b_cs = 1;
    p.c = gwc.data_ptr();
    p.c_rs = d.D;
    p.c_seg = d.Kc * d.D;
    p.m = static_cast<int>(d.Kc);
    p.n = static_cast<int>(d.D);
    p.accumulate = accumulate;
    check_cuda(cuda::launch_seg_gemm(p, d.dtype, stream), "down-projection gradient GEMM");
  };
  down_grad(dh_route, x, false);
  if (d.has_xe) down_grad(dh, *expert_input, true);
  at::Tensor gbc = at::empty({d.S, d.O, d.Ke}, x.options().dtype(at::kFloat));
  {
    SegGemmParams p;
    p.seg_offsets = seg_offsets.data_ptr<int64_t>();
    p.num_segments = static_cast<int>(d.S);
    p.num_tokens = d.T;
    p.token_dim = 2;
    p.a = grad_delta.data_ptr();
    p.a_rs = 1;
    p.a_cs = d.O;
    p.b = gated.data_ptr();
    p.b_rs = d.Ke;
    p.b_cs = 1;
    p.c = gbc.data_ptr();
    p.c_rs = d.Ke;
    p.c_seg = d.O * d.Ke;
    p.m = static_cast<int>(d.O);
    p.n = static_cast<int>(d.Ke);
    check_cuda(cuda::launch_seg_gemm(p, d.dtype, stream), "up-projection gradient GEMM");
  }
  assert_no_error(error);
  const auto dtype = x.scalar_type();
  const int64_t Er = d.E * d.r;
  auto cast = [&](const at::Tensor& t) { return t.to(dtype, false, /*copy=*/true).contiguous(); };
  const at::Tensor empty = at::empty({0}, x.options());
  return {gx,
          d.has_xe ? gxe : empty,
          cast(gwc.narrow(1, d.R, Er).reshape({d.S, d.E, d.r, d.D})),
          cast(gbc.narrow(2, 0, Er).reshape({d.S, d.O, d.E, d.r}).permute({0, 2, 1, 3})),
          cast(gwc.narrow(1, 0, d.R)),
          d.shared ? cast(gwc.narrow(1, d.R + Er, d.r)) : empty,
          d.shared ? cast(gbc.narrow(2, Er, d.r)) : empty};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mole_route_cuda(const at::Tensor& x, const at::Tensor& seg_offsets,
                                                               const at::Tensor& lora_a, const at::Tensor& router,
                                                               const at::Tensor& expert_mask, int64_t top_k,
                                                               c10::string_view router_type) {
  at::AutoDispatchBelowADInplaceOrView guard;
  const c10::cuda::CUDAGuard device_guard(x.device());
  TORCH_CHECK_VALUE(lora_a.defined() && lora_a.dim() == 4, kWho, ": lora_a must be 4-D, got shape ", lora_a.sizes());
  const at::Tensor fake_b = at::empty({lora_a.size(0), lora_a.size(1), 1, lora_a.size(2)}, lora_a.options());
  const Dims d = make_dims(x, std::nullopt, seg_offsets, lora_a, fake_b, router, std::nullopt, std::nullopt,
                           expert_mask, top_k, 1.0, router_type);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor wc = stack_down(d, router, lora_a, std::nullopt, expert_mask.logical_not());
  const at::Tensor error = at::zeros({2}, x.options().dtype(at::kInt));
  const at::Tensor h = project(d, x, wc, seg_offsets, stream);
  at::Tensor probs = at::empty({d.T, d.E}, x.options().dtype(at::kFloat));
  at::Tensor topk_idx = at::empty({d.T, d.k}, x.options().dtype(at::kLong));
  at::Tensor counts = at::zeros({d.S, d.E}, x.options().dtype(at::kInt));
  cuda::RouteParams rp;
  rp.h = h.data_ptr<float>();
  rp.h_expert = rp.h;
  rp.seg_offsets = seg_offsets.data_ptr<int64_t>();
  rp.mask = expert_mask.data_ptr<bool>();
  rp.probs = probs.data_ptr<float>();
  rp.topk_idx = topk_idx.data_ptr<int64_t>();
  rp.counts = counts.data_ptr<int32_t>();
  rp.error = error.data_ptr<int32_t>();
  rp.num_tokens = static_cast<int>(d.T);
  rp.num_segments = static_cast<int>(d.S);
  rp.num_slots = static_cast<int>(d.E);
  rp.rank = static_cast<int>(d.r);
  rp.top_k = static_cast<int>(d.k);
  rp.router_rows = static_cast<int>(d.R);
  rp.kc = static_cast<int>(d.Kc);
  rp.ke = static_cast<int>(d.Ke);
  rp.embedding = d.embedding;
  check_cuda(cuda::launch_route_forward(rp, d.dtype, stream), "routing kernel");
  assert_no_error(error);
  return {probs, topk_idx, counts.to(at::kLong)};
}

}  // namespace fedamole

#endif  // FEDAMOLE_WITH_CUDA
