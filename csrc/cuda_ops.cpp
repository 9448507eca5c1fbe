// Thin torch binding of the CUDA kernels (csrc/cuda/mole_lora_kernels.cu). The whole file compiles to nothing unless
// setup.py builds with CUDA (FEDAMOLE_WITH_CUDA), because CPU-only torch has no usable CUDA headers.
//
// Forward:  H = x Wc^T (fp32) -> fused routing (probs, top-k, gated G, usage counts) -> delta = G Bc^T.
// Backward: H recomputed, GR = g Bc -> fused routing backward (G, dH) -> grad_x = dH Wc, grad_Wc = dH^T x,
//           grad_Bc = g^T G. All GEMMs are one segmented launch each (grid over segment x tile); no host syncs.
//
// Defence: every shape, dtype, device and contiguity is checked on the host (make_problem, shared with the CPU
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
#include "mole_lora_problem.h"

namespace fedamole {
namespace {

using cuda::DType;
using cuda::SegGemmParams;

constexpr const char* kWho = "mole_lora (cuda)";
constexpr Backend kCuda{kWho, c10::DeviceType::CUDA, /*contiguous=*/true};

// The shared problem plus the kernels' element type.
struct Dims : MoLEProblem {
  DType dtype = DType::kFloat32;
};

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "mole_lora (cuda): ", what, " failed: ", cudaGetErrorString(err));
}

// make_problem's checks, then what the kernels support: a 16- or 32-bit float dtype, int64 offsets, E <= kMaxSlots
// and top_k <= kMaxTopK.
Dims make_dims(MoLEProblem base) {
  Dims d;
  static_cast<MoLEProblem&>(d) = std::move(base);
  switch (d.x.scalar_type()) {
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
      TORCH_CHECK_TYPE(false, kWho, ": x has unsupported dtype ", d.x.scalar_type(),
                       "; expected float32, float16 or bfloat16 (float64: use backend 'reference' or 'cpu')");
  }
  TORCH_CHECK_TYPE(d.seg_offsets.scalar_type() == at::kLong, kWho, ": seg_offsets must be int64 here");
  TORCH_CHECK_VALUE(d.E <= cuda::kMaxSlots, kWho, ": lora_a has E = ", d.E, " slots; at most ", cuda::kMaxSlots);
  TORCH_CHECK_VALUE(d.k <= cuda::kMaxTopK, kWho, ": top_k must be in [1, ", cuda::kMaxTopK, "], got ", d.k);
  return d;
}

// Wc [S, Kc, D] and Bc [S, O, Ke] (stack_down / stack_up), masked slots' A rows, linear-router rows and B columns
// zeroed. `absent` = ~mask.
at::Tensor masked_down(const Dims& d, const at::Tensor& absent) {
  at::Tensor wc = stack_down(d, d.x.scalar_type());  // a fresh buffer: masked in place
  wc.narrow(1, d.R, d.E * d.r).view({d.S, d.E, d.r, d.D}).masked_fill_(absent.view({d.S, d.E, 1, 1}), 0);
  if (!d.embedding) wc.narrow(1, 0, d.R).masked_fill_(absent.view({d.S, d.E, 1}), 0);
  return wc;
}

at::Tensor masked_up(const Dims& d, const at::Tensor& absent) {
  at::Tensor bc = stack_up(d, d.x.scalar_type());
  bc.narrow(2, 0, d.E * d.r).view({d.S, d.O, d.E, d.r}).masked_fill_(absent.view({d.S, 1, d.E, 1}), 0);
  return bc;
}

// Raises once the kernels flagged invalid seg_offsets / topk_idx (no host sync; see the file comment).
void assert_no_error(const at::Tensor& error) {
  at::_assert_async(error.eq(0).all(),
                    "mole_lora (cuda): invalid seg_offsets (must be 0 = first <= ... <= last = T) or topk_idx (must "
                    "be -1 or active, distinct slots of the token's segment)");
}

// One GEMM operand: element (i, j) at data[i * rs + j * cs] (+ seg * s for a per-segment operand).
struct Operand {
  const void* data;
  int64_t rs, cs, seg;
};

// The one builder of the segmented GEMMs (SegGemmParams): C(m, n) = A(m, k) B(k, n) per segment, the segment's tokens
// being the rows M (token_dim 0: C[T, n], B per segment) or the reduction K (token_dim 2: C [S, m, n] at c_seg).
// Launches it; `c_fp32` and `accumulate` as in SegGemmParams.
void seg_gemm(const Dims& d, const at::Tensor& seg_offsets, int token_dim, Operand a, Operand b, void* c,
              int64_t c_rs, int64_t c_seg, int64_t m, int64_t n, int64_t k, bool c_fp32, bool accumulate,
              const char* what) {
  SegGemmParams p;
  p.seg_offsets = seg_offsets.data_ptr<int64_t>();
  p.num_segments = static_cast<int>(d.S);
  p.num_tokens = d.T;
  p.max_seg_tokens = static_cast<int>(d.T);  // an upper bound that needs no host sync
  p.token_dim = token_dim;
  p.a = a.data;
  p.a_rs = a.rs;
  p.a_cs = a.cs;
  p.a_seg = a.seg;
  p.b = b.data;
  p.b_rs = b.rs;
  p.b_cs = b.cs;
  p.b_seg = b.seg;
  p.c = c;
  p.c_rs = c_rs;
  p.c_seg = c_seg;
  p.m = static_cast<int>(m);
  p.n = static_cast<int>(n);
  p.k = static_cast<int>(k);
  p.c_fp32 = c_fp32;
  p.accumulate = accumulate;
  check_cuda(cuda::launch_seg_gemm(p, d.dtype, c10::cuda::getCurrentCUDAStream().stream()), what);
}

// H [T, Kc] fp32 = inp Wc[s]^T per segment.
at::Tensor project(const Dims& d, const at::Tensor& inp, const at::Tensor& wc) {
  at::Tensor h = at::empty({d.T, d.Kc}, inp.options().dtype(at::kFloat));
  seg_gemm(d, d.seg_offsets, 0, {inp.data_ptr(), d.D, 1, 0}, {wc.data_ptr(), 1, d.D, d.Kc * d.D}, h.data_ptr(), d.Kc,
           0, 0, d.Kc, d.D, /*c_fp32=*/true, false, "shrink GEMM");
  return h;
}

// The routing kernels' shared sizes.
template <typename Params>
void route_sizes(const Dims& d, Params& rp) {
  rp.seg_offsets = d.seg_offsets.data_ptr<int64_t>();
  rp.mask = d.expert_mask.data_ptr<bool>();
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
  rp.scaling = static_cast<float>(d.scaling);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> mole_lora_fwd_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& expert_input, const at::Tensor& seg_offsets,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& router,
    const std::optional<at::Tensor>& shared_a, const std::optional<at::Tensor>& shared_b,
    const at::Tensor& expert_mask, int64_t top_k, double scaling, c10::string_view router_type) {
  at::AutoDispatchBelowADInplaceOrView guard;
  const c10::cuda::CUDAGuard device_guard(x.device());
  const Dims d = make_dims(make_problem(kCuda, x, expert_input, seg_offsets, lora_a, lora_b, router, shared_a,
                                        shared_b, expert_mask, top_k, scaling, router_type));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor absent = expert_mask.logical_not();
  const at::Tensor wc = masked_down(d, absent);
  const at::Tensor bc = masked_up(d, absent);
  const at::Tensor h = project(d, x, wc);
  const at::Tensor he = d.has_xe ? project(d, *expert_input, wc) : h;
  const at::Tensor error = at::zeros({2}, x.options().dtype(at::kInt));

  at::Tensor probs = at::empty({d.T, d.E}, x.options().dtype(at::kFloat));
  at::Tensor topk_idx = at::empty({d.T, d.k}, x.options().dtype(at::kLong));
  at::Tensor gated = at::empty({d.T, d.Ke}, x.options());
  cuda::RouteParams rp;
  route_sizes(d, rp);
  rp.h = h.data_ptr<float>();
  rp.h_expert = he.data_ptr<float>();
  rp.probs = probs.data_ptr<float>();
  rp.topk_idx = topk_idx.data_ptr<int64_t>();
  rp.gated = gated.data_ptr();
  rp.error = error.data_ptr<int32_t>();
  check_cuda(cuda::launch_route_forward(rp, d.dtype, stream), "routing kernel");

  // delta [T, O] = G Bc[s]^T.
  at::Tensor delta = at::empty({d.T, d.O}, x.options());
  seg_gemm(d, seg_offsets, 0, {gated.data_ptr(), d.Ke, 1, 0}, {bc.data_ptr(), 1, d.Ke, d.O * d.Ke}, delta.data_ptr(),
           d.O, 0, 0, d.O, d.Ke, d.dtype == DType::kFloat32, false, "expand GEMM");
  assert_no_error(error);
  return {delta, probs, topk_idx};
}

namespace {

// The routing backward's outputs: G [T, Ke], and dH [T, Kc] (with expert_input: dh the expert part, dh_route the
// routing part; else one buffer).
struct RouteGrads {
  at::Tensor gated, dh, dh_route;
};

RouteGrads route_backward(const Dims& d, const at::Tensor& h, const at::Tensor& he, const at::Tensor& grank,
                          const at::Tensor& probs, const at::Tensor& topk_idx, const at::Tensor& gp,
                          const at::Tensor& error) {
  const at::TensorOptions opts = d.x.options();
  RouteGrads g{at::empty({d.T, d.Ke}, opts), at::empty({d.T, d.Kc}, opts), at::Tensor()};
  g.dh_route = d.has_xe ? at::empty({d.T, d.Kc}, opts) : g.dh;
  cuda::RouteBackwardParams rp;
  route_sizes(d, rp);
  rp.h = h.data_ptr<float>();
  rp.h_expert = he.data_ptr<float>();
  rp.grank = grank.data_ptr<float>();
  rp.probs = probs.data_ptr<float>();
  rp.topk_idx = topk_idx.data_ptr<int64_t>();
  rp.error = error.data_ptr<int32_t>();
  rp.grad_probs = gp.defined() ? gp.data_ptr<float>() : nullptr;
  rp.gated = g.gated.data_ptr();
  rp.dh = g.dh.data_ptr();
  rp.dh_route = d.has_xe ? g.dh_route.data_ptr() : nullptr;
  check_cuda(cuda::launch_route_backward(rp, d.dtype, c10::cuda::getCurrentCUDAStream().stream()),
             "routing backward kernel");
  return g;
}

// The seven gradients from the fp32 stacked weight grads gwc [S, Kc, D], gbc [S, O, Ke].
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gradients(
    const Dims& d, const at::Tensor& gx, const at::Tensor& gxe, const at::Tensor& gwc, const at::Tensor& gbc) {
  const auto dtype = d.x.scalar_type();
  const int64_t Er = d.E * d.r;
  auto cast = [&](const at::Tensor& t) { return t.to(dtype, false, /*copy=*/true).contiguous(); };
  const at::Tensor empty = at::empty({0}, d.x.options());
  return {gx,
          d.has_xe ? gxe : empty,
          cast(gwc.narrow(1, d.R, Er).reshape({d.S, d.E, d.r, d.D})),
          cast(gbc.narrow(2, 0, Er).reshape({d.S, d.O, d.E, d.r}).permute({0, 2, 1, 3})),
          cast(gwc.narrow(1, 0, d.R)),
          d.shared ? cast(gwc.narrow(1, d.R + Er, d.r)) : empty,
          d.shared ? cast(gbc.narrow(2, Er, d.r)) : empty};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mole_lora_bwd_cuda(
    const at::Tensor& grad_delta, const std::optional<at::Tensor>& grad_probs, const at::Tensor& x,
    const std::optional<at::Tensor>& expert_input, const at::Tensor& seg_offsets, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& router, const std::optional<at::Tensor>& shared_a,
    const std::optional<at::Tensor>& shared_b, const at::Tensor& expert_mask, const at::Tensor& probs,
    const at::Tensor& topk_idx, int64_t top_k, double scaling, c10::string_view router_type) {
  at::AutoDispatchBelowADInplaceOrView guard;
  const c10::cuda::CUDAGuard device_guard(x.device());
  const Dims d = make_dims(make_problem(kCuda, x, expert_input, seg_offsets, lora_a, lora_b, router, shared_a,
                                        shared_b, expert_mask, top_k, scaling, router_type));
  check_backward_args(kCuda, d, grad_delta, grad_probs, probs, at::kFloat, topk_idx);
  const at::Tensor absent = expert_mask.logical_not();
  const at::Tensor wc = masked_down(d, absent);
  const at::Tensor bc = masked_up(d, absent);
  const at::Tensor error = at::zeros({2}, x.options().dtype(at::kInt));
  const at::Tensor h = project(d, x, wc);
  const at::Tensor he = d.has_xe ? project(d, *expert_input, wc) : h;
  const at::Tensor gp = grad_probs.has_value() ? grad_probs->to(at::kFloat).contiguous() : at::Tensor();

  // GR [T, Ke] fp32 = g Bc[s].
  at::Tensor grank = at::empty({d.T, d.Ke}, x.options().dtype(at::kFloat));
  seg_gemm(d, seg_offsets, 0, {grad_delta.data_ptr(), d.O, 1, 0}, {bc.data_ptr(), d.Ke, 1, d.O * d.Ke},
           grank.data_ptr(), d.Ke, 0, 0, d.Ke, d.O, /*c_fp32=*/true, false, "GR GEMM");
  const RouteGrads rg = route_backward(d, h, he, grank, probs, topk_idx, gp, error);
  const bool f32 = d.dtype == DType::kFloat32;
  // grad of an input [T, D] = dH Wc[s].
  auto input_grad = [&](const at::Tensor& dmat) {
    at::Tensor out = at::empty({d.T, d.D}, x.options());
    seg_gemm(d, seg_offsets, 0, {dmat.data_ptr(), d.Kc, 1, 0}, {wc.data_ptr(), d.D, 1, d.Kc * d.D}, out.data_ptr(),
             d.D, 0, 0, d.D, d.Kc, f32, false, "input-gradient GEMM");
    return out;
  };
  at::Tensor gx = input_grad(rg.dh_route);
  at::Tensor gxe = d.has_xe ? input_grad(rg.dh) : at::Tensor();

  // Weight grads reduce over each segment's tokens (token_dim = 2), fp32 outputs.
  at::Tensor gwc = at::empty({d.S, d.Kc, d.D}, x.options().dtype(at::kFloat));
  auto down_grad = [&](const at::Tensor& dmat, const at::Tensor& inp, bool accumulate) {
    seg_gemm(d, seg_offsets, 2, {dmat.data_ptr(), 1, d.Kc, 0}, {inp.data_ptr(), d.D, 1, 0}, gwc.data_ptr(), d.D,
             d.Kc * d.D, d.Kc, d.D, 0, /*c_fp32=*/true, accumulate, "down-projection gradient GEMM");
  };
  down_grad(rg.dh_route, x, false);
  if (d.has_xe) down_grad(rg.dh, *expert_input, true);
  at::Tensor gbc = at::empty({d.S, d.O, d.Ke}, x.options().dtype(at::kFloat));
  seg_gemm(d, seg_offsets, 2, {grad_delta.data_ptr(), 1, d.O, 0}, {rg.gated.data_ptr(), d.Ke, 1, 0}, gbc.data_ptr(),
           d.Ke, d.O * d.Ke, d.O, d.Ke, 0, /*c_fp32=*/true, false, "up-projection gradient GEMM");
  assert_no_error(error);
  return gradients(d, gx, gxe, gwc, gbc);
}

}  // namespace fedamole

#endif  // FEDAMOLE_WITH_CUDA
