// Thin torch binding of the CUDA kernels (csrc/cuda/mole_lora_kernels.cu). The whole file compiles to nothing unless
// setup.py builds with CUDA (FEDAMOLE_WITH_CUDA), because CPU-only torch has no usable CUDA headers.
//
// Forward:  H = x Wc^T (fp32) -> fused routing (probs, top-k, gated G, usage counts) -> delta = G Bc^T.
// Backward: H recomputed, GR = g Bc -> fused routing backward (G, dH) -> grad_x = dH Wc, grad_Wc = dH^T x,
//           grad_Bc = g^T G. All GEMMs are one segmented launch each (grid over segment x tile); no host syncs.
#ifdef FEDAMOLE_WITH_CUDA

#include "mole_lora_cuda_ops.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <string>
#include <vector>

#include "cuda/mole_lora_kernels.cuh"

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

void check_input(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.is_cuda(), "mole_lora (cuda): ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == x.device(), "mole_lora (cuda): ", name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK(t.is_contiguous(), "mole_lora (cuda): ", name, " must be contiguous");
}

Dims make_dims(const at::Tensor& x, const std::optional<at::Tensor>& expert_input, const at::Tensor& seg_offsets,
               const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& router,
               const std::optional<at::Tensor>& shared_a, const at::Tensor& expert_mask, int64_t top_k,
               c10::string_view router_type) {
  Dims d{};
  TORCH_CHECK(x.is_cuda() && x.dim() == 2, "mole_lora (cuda): x must be a 2-D CUDA tensor");
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
      TORCH_CHECK(false, "mole_lora (cuda): x has unsupported dtype ", x.scalar_type(),
                  "; expected float32, float16 or bfloat16 (float64: use backend 'reference' or 'cpu')");
  }
  for (auto [t, name] : std::vector<std::pair<const at::Tensor*, const char*>>{
           {&x, "x"}, {&lora_a, "lora_a"}, {&lora_b, "lora_b"}, {&router, "router"}, {&expert_mask, "expert_mask"},
           {&seg_offsets, "seg_offsets"}}) {
    check_input(*t, name, x);
  }
  for (auto [t, name] : std::vector<std::pair<const at::Tensor*, const char*>>{
           {&lora_a, "lora_a"}, {&lora_b, "lora_b"}, {&router, "router"}}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "mole_lora (cuda): ", name, " has dtype ", t->scalar_type(),
                " but x has dtype ", x.scalar_type());
  }
  TORCH_CHECK(lora_a.dim() == 4, "mole_lora (cuda): lora_a must be [S, E, r, d_in], got ", lora_a.sizes());
  TORCH_CHECK(lora_b.dim() == 4, "mole_lora (cuda): lora_b must be [S, E, d_out, r], got ", lora_b.sizes());
  TORCH_CHECK(expert_mask.scalar_type() == at::kBool, "mole_lora (cuda): expert_mask must be bool");
  TORCH_CHECK(seg_offsets.scalar_type() == at::kLong, "mole_lora (cuda): seg_offsets must be int64 here");
  d.T = x.size(0);
  d.D = x.size(1);
  d.S = lora_a.size(0);
  d.E = lora_a.size(1);
  d.r = lora_a.size(2);
  d.O = lora_b.size(2);
  d.k = top_k;
  TORCH_CHECK(d.E <= cuda::kMaxSlots, "mole_lora (cuda): lora_a has E = ", d.E, " slots; at most ", cuda::kMaxSlots);
  TORCH_CHECK(top_k >= 1 && top_k <= cuda::kMaxTopK, "mole_lora (cuda): top_k must be in [1, ", cuda::kMaxTopK,
              "], got ", top_k);
  TORCH_CHECK(router_type == "embedding" || router_type == "linear",
              "mole_lora (cuda): router_type must be 'embedding' or 'linear', got '", std::string(router_type), "'");
  d.embedding = router_type == "embedding";
  d.R = d.embedding ? d.r : d.E;
  TORCH_CHECK(router.dim() == 3 && router.size(1) == d.R, "mole_lora (cuda): router must be [S, ", d.R,
              ", d_in], got ", router.sizes());
  d.shared = shared_a.has_value();
  d.has_xe = expert_input.has_value();
  if (d.has_xe) check_input(*expert_input, "expert_input", x);
  if (d.shared) check_input(*shared_a, "shared_a", x);
  d.Ke = d.E * d.r + (d.shared ? d.r : 0);
  d.Kc = d.R + d.Ke;
  return d;
}

at::Tensor stack_down(const Dims& d, const at::Tensor& router, const at::Tensor& lora_a,
                      const std::optional<at::Tensor>& shared_a) {
  std::vector<at::Tensor> parts{router, lora_a.reshape({d.S, d.E * d.r, d.D})};
  if (d.shared) parts.push_back(*shared_a);
  return at::cat(parts, 1).contiguous();
}

at::Tensor stack_up(const Dims& d, const at::Tensor& lora_b, const std::optional<at::Tensor>& shared_b) {
  at::Tensor b = lora_b.permute({0, 2, 1, 3}).reshape({d.S, d.O, d.E * d.r});
  if (d.shared) b = at::cat({b, *shared_b}, 2);
  return b.contiguous();
}

SegGemmParams token_gemm(const Dims& d, const at::Tensor& seg_offsets) {
  SegGemmParams p;
  p.seg_offsets = seg_offsets.data_ptr<int64_t>();
  p.num_segments = static_cast<int>(d.S);
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
  const Dims d = make_dims(x, expert_input, seg_offsets, lora_a, lora_b, router, shared_a, expert_mask, top_k,
                           router_type);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor wc = stack_down(d, router, lora_a, shared_a);
  const at::Tensor bc = stack_up(d, lora_b, shared_b);
  const at::Tensor h = project(d, x, wc, seg_offsets, stream);
  const at::Tensor he = d.has_xe ? project(d, *expert_input, wc, seg_offsets, stream) : h;

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
  const Dims d = make_dims(x, expert_input, seg_offsets, lora_a, lora_b, router, shared_a, expert_mask, top_k,
                           router_type);
  check_input(grad_delta, "grad_delta", x);
  check_input(probs, "probs", x);
  check_input(topk_idx, "topk_idx", x);
  TORCH_CHECK(grad_delta.scalar_type() == x.scalar_type(), "mole_lora (cuda): grad_delta must have x's dtype");
  TORCH_CHECK(probs.scalar_type() == at::kFloat, "mole_lora (cuda): probs must be float32");
  TORCH_CHECK(topk_idx.scalar_type() == at::kLong, "mole_lora (cuda): topk_idx must be int64");
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor wc = stack_down(d, router, lora_a, shared_a);
  const at::Tensor bc = stack_up(d, lora_b, shared_b);
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
  const at::Tensor fake_b = at::empty({lora_a.size(0), lora_a.size(1), 1, lora_a.size(2)}, lora_a.options());
  const Dims d = make_dims(x, std::nullopt, seg_offsets, lora_a, fake_b, router, std::nullopt, expert_mask, top_k,
                           router_type);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor wc = stack_down(d, router, lora_a, std::nullopt);
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
  return {probs, topk_idx, counts.to(at::kLong)};
}

}  // namespace fedamole

#endif  // FEDAMOLE_WITH_CUDA
