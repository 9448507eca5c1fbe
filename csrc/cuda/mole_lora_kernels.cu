// CUDA kernels of `mole_lora`: segmented grouped GEMM (WMMA tensor cores for bf16/fp16) and fused routing forward /
// backward. Needs only the CUDA runtime; see mole_lora_kernels.cuh for the contracts.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cfloat>
#include <type_traits>

#include "mole_lora_kernels.cuh"

namespace fedamole {
namespace cuda {
namespace {

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// ---------------------------------------------------------------------------------------------------------------
// Segmented GEMM. 64x64 output tile per block of 128 threads, K step 32. Operands are staged through shared memory
// with generic strides (the same kernel serves x Wc^T, G Bc^T, g Bc, dH Wc, dH^T x and g^T G), loading along
// whichever dimension is contiguous so global reads coalesce.
constexpr int kBM = 64, kBN = 64, kBK = 32, kThreads = 128;
constexpr int kPadH = 8;  // 16-bit tiles: keeps WMMA leading dimensions multiples of 8 and spreads banks
constexpr int kPadF = 4;

struct SegView {
  int M, N, K;
  int64_t a_off, b_off, c_off;
};

// Segment s's token range, clamped to [0, T] (lo) and [lo, T] (hi): any seg_offsets values stay in bounds.
__device__ __forceinline__ void seg_bounds(const int64_t* offs, int s, int64_t num_tokens, int64_t* lo, int64_t* hi) {
  *lo = min(max(offs[s], int64_t(0)), num_tokens);
  *hi = min(max(offs[s + 1], *lo), num_tokens);
}

__device__ __forceinline__ SegView seg_view(const SegGemmParams& p, int s) {
  int64_t lo, hi;
  seg_bounds(p.seg_offsets, s, p.num_tokens, &lo, &hi);
  const int ntok = static_cast<int>(hi - lo);
  SegView v{p.m, p.n, p.k, 0, 0, 0};
  if (p.token_dim == 0) {
    v.M = ntok;
    v.a_off = lo * p.a_rs;
    v.c_off = lo * p.c_rs;
    v.b_off = s * p.b_seg;
  } else {
    v.K = ntok;
    v.a_off = lo * p.a_cs;
    v.b_off = lo * p.b_rs;
    v.c_off = s * p.c_seg;
  }
  return v;
}

// Loads the A tile (kBM x kBK) into sa[m][k] and the B tile (kBK x kBN) into sb[k][n], zero-filling out of range.
template <typename T, int LDA, int LDB>
__device__ __forceinline__ void load_tiles(const SegGemmParams& p, const T* A, const T* B, const SegView& v, int m0,
                                           int n0, int k0, T* sa, T* sb) {
  const T zero = from_f<T>(0.f);
  const bool a_k_fast = p.a_cs == 1;
  for (int e = threadIdx.x; e < kBM * kBK; e += kThreads) {
    const int mm = a_k_fast ? e / kBK : e % kBM;
    const int kk = a_k_fast ? e % kBK : e / kBM;
    const int gm = m0 + mm, gk = k0 + kk;
    sa[mm * LDA + kk] = (gm < v.M && gk < v.K) ? A[gm * p.a_rs + gk * p.a_cs] : zero;
  }
  const bool b_n_fast = p.b_cs == 1;
  for (int e = threadIdx.x; e < kBK * kBN; e += kThreads) {
    const int kk = b_n_fast ? e / kBN : e % kBK;
    const int nn = b_n_fast ? e % kBN : e / kBK;
    const int gk = k0 + kk, gn = n0 + nn;
    sb[kk * LDB + nn] = (gk < v.K && gn < v.N) ? B[gk * p.b_rs + gn * p.b_cs] : zero;
  }
}

template <typename OutT>
__device__ __forceinline__ void store_out(const SegGemmParams& p, OutT* C, int M, int N, int gm, int gn, float acc) {
  if (gm >= M || gn >= N) return;
  OutT* dst = C + gm * p.c_rs + gn;
  float v = p.alpha * acc;
  if (p.accumulate) v += to_f(*dst);
  *dst = from_f<OutT>(v);
}

// Tensor-core path: 4 warps in a 2x2 grid, each owning a 32x32 sub-tile = 2x2 WMMA 16x16x16 fragments, fp32 accumulate.
template <typename T, typename OutT>
__device__ void seg_gemm_tc(const SegGemmParams& p) {
  using namespace nvcuda;
  constexpr int LDA = kBK + kPadH, LDB = kBN + kPadH, LDC = kBN + kPadF;
  __shared__ __align__(32) T sa[kBM * LDA];
  __shared__ __align__(32) T sb[kBK * LDB];
  __shared__ __align__(32) float sc[kBM * LDC];
  const int s = blockIdx.z;
  const SegView v = seg_view(p, s);
  const int m0 = blockIdx.x * kBM, n0 = blockIdx.y * kBN;
  if (m0 >= v.M || n0 >= v.N) return;
  const T* A = static_cast<const T*>(p.a) + v.a_off;
  const T* B = static_cast<const T*>(p.b) + v.b_off;
  OutT* C = static_cast<OutT*>(p.c) + v.c_off;
  const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
  for (int k0 = 0; k0 < v.K; k0 += kBK) {
    load_tiles<T, LDA, LDB>(p, A, B, v, m0, n0, k0, sa, sb);
    __syncthreads();
    for (int kk = 0; kk < kBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[2];
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], sa + (wm * 32 + i * 16) * LDA + kk, LDA);
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], sb + kk * LDB + wn * 32 + j * 16, LDB);
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(sc + (wm * 32 + i * 16) * LDC + wn * 32 + j * 16, acc[i][j], LDC, wmma::mem_row_major);
  __syncthreads();
  for (int e = threadIdx.x; e < kBM * kBN; e += kThreads) {
    const int mm = e / kBN, nn = e % kBN;
    store_out<OutT>(p, C, v.M, v.N, m0 + mm, n0 + nn, sc[mm * LDC + nn]);
  }
}

// fp32 path on CUDA cores: each thread accumulates an 8x4 micro-tile (rows ty + 8*i, columns tx*4 + j).
__device__ void seg_gemm_f32(const SegGemmParams& p) {
  constexpr int LDA = kBK + kPadF, LDB = kBN + kPadF;
  __shared__ float sa[kBM * LDA];
  __shared__ float sb[kBK * LDB];
  const int s = blockIdx.z;
  const SegView v = seg_view(p, s);
  const int m0 = blockIdx.x * kBM, n0 = blockIdx.y * kBN;
  if (m0 >= v.M || n0 >= v.N) return;
  const float* A = static_cast<const float*>(p.a) + v.a_off;
  const float* B = static_cast<const float*>(p.b) + v.b_off;
  float* C = static_cast<float*>(p.c) + v.c_off;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float acc[8][4] = {};
  for (int k0 = 0; k0 < v.K; k0 += kBK) {
    load_tiles<float, LDA, LDB>(p, A, B, v, m0, n0, k0, sa, sb);
    __syncthreads();
    for (int kk = 0; kk < kBK; ++kk) {
      float a[8], b[4];
      for (int i = 0; i < 8; ++i) a[i] = sa[(ty + 8 * i) * LDA + kk];
      for (int j = 0; j < 4; ++j) b[j] = sb[kk * LDB + tx * 4 + j];
      for (int i = 0; i < 8; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 4; ++j) store_out<float>(p, C, v.M, v.N, m0 + ty + 8 * i, n0 + tx * 4 + j, acc[i][j]);
}

template <typename T, typename OutT>
__global__ void __launch_bounds__(kThreads) seg_gemm_kernel(const SegGemmParams p) {
  if constexpr (std::is_same<T, float>::value) {
    seg_gemm_f32(p);
  } else {
    seg_gemm_tc<T, OutT>(p);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Routing.

// Segment of token `tok`: the largest s with seg_offsets[s] <= tok (empty segments share bounds and are skipped).
__device__ __forceinline__ int find_segment(const int64_t* offs, int num_segments, int64_t tok) {
  int lo = 0, hi = num_segments;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (offs[mid] <= tok) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// One thread checks the offsets (S + 1 loads) and flags invalid ones; the GEMMs clamp them meanwhile.
__device__ __forceinline__ void flag_bad_offsets(const int64_t* offs, int num_segments, int64_t num_tokens,
                                                 int32_t* error) {
  bool bad = offs[0] != 0 || offs[num_segments] != num_tokens;
  for (int s = 0; s < num_segments && !bad; ++s) bad = offs[s + 1] < offs[s];
  if (bad) error[0] = 1;
}

template <typename T>
__global__ void route_forward_kernel(const RouteParams p) {
  const int64_t tok = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (tok == 0 && p.error != nullptr) flag_bad_offsets(p.seg_offsets, p.num_segments, p.num_tokens, p.error);
  if (tok >= p.num_tokens) return;
  const int s = find_segment(p.seg_offsets, p.num_segments, tok);
  const int E = p.num_slots, r = p.rank, Er = E * r;
  const bool* mask = p.mask + static_cast<int64_t>(s) * E;
  const float* row = p.h + tok * p.kc;
  float prob[kMaxSlots];
  float zmax = -FLT_MAX;
  bool any = false;
  const float inv_sqrt_r = rsqrtf(static_cast<float>(r));
  for (int i = 0; i < E; ++i) {
    float z;
    if (p.embedding) {
      z = 0.f;
      for (int j = 0; j < r; ++j) z = fmaf(row[p.router_rows + i * r + j], row[j], z);
      z *= inv_sqrt_r;
    } else {
      z = row[i];
    }
    prob[i] = z;
    if (mask[i] && (!any || z > zmax)) {
      zmax = z;
      any = true;
    }
  }
  float sum = 0.f;
  for (int i = 0; i < E; ++i) {
    prob[i] = (any && mask[i]) ? __expf(prob[i] - zmax) : 0.f;
    sum += prob[i];
  }
  const float inv_sum = any ? 1.f / sum : 0.f;
  for (int i = 0; i < E; ++i) {
    prob[i] *= inv_sum;
    p.probs[tok * E + i] = prob[i];
  }
  // Top-k by repeated arg-max; strict '>' keeps the lowest index on ties. A 64-bit mask marks taken slots.
  unsigned long long taken = 0ull;
  int idx[kMaxTopK];
  float picked = 0.f;
  for (int q = 0; q < p.top_k; ++q) {
    int best = -1;
    for (int i = 0; i < E; ++i) {
      if (mask[i] && !((taken >> i) & 1ull) && (best < 0 || prob[i] > prob[best])) best = i;
    }
    idx[q] = best;
    p.topk_idx[tok * p.top_k + q] = best;
    if (best >= 0) {
      taken |= 1ull << best;
      picked += prob[best];
      if (p.counts != nullptr) atomicAdd(p.counts + s * E + best, 1);
    }
  }
  if (p.gated == nullptr) return;
  const float norm = fmaxf(picked, FLT_MIN);
  const float* u = p.h_expert + tok * p.kc + p.router_rows;
  T* g = static_cast<T*>(p.gated) + tok * p.ke;
  for (int i = 0; i < E; ++i) {
    const bool on = (taken >> i) & 1ull;  // selected, not multiplied by a zero gate
    const float c = on ? prob[i] / norm * p.scaling : 0.f;
    for (int j = 0; j < r; ++j) g[i * r + j] = from_f<T>(on ? u[i * r + j] * c : 0.f);
  }
  if (p.shared) {
    for (int j = 0; j < r; ++j) g[Er + j] = from_f<T>(u[Er + j] * p.scaling);
  }
}

template <typename T>
__global__ void route_backward_kernel(const RouteBackwardParams p) {
  const int64_t tok = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (tok >= p.num_tokens) return;
  const int E = p.num_slots, r = p.rank, Er = E * r, R = p.router_rows, k = p.top_k;
  const float* prob = p.probs + tok * E;
  const int64_t* idx = p.topk_idx + tok * k;
  const float* hr = p.h + tok * p.kc;                 // t = hr[0:R), h = hr[R:R+Er)
  const float* u = p.h_expert + tok * p.kc + R;       // u = [0, Er), v = [Er, Ke)
  const float* gr = p.grank + tok * p.ke;
  T* G = static_cast<T*>(p.gated) + tok * p.ke;
  T* dH = static_cast<T*>(p.dh) + tok * p.kc;
  const bool split = p.dh_route != nullptr;
  T* dR = split ? static_cast<T*>(p.dh_route) + tok * p.kc : dH;

  // Top-k ids: only -1 or an active slot seen for the first time is used; anything else is flagged and skipped.
  const int s = find_segment(p.seg_offsets, p.num_segments, tok);
  const bool* mask = p.mask + static_cast<int64_t>(s) * E;
  int sel[kMaxTopK];
  unsigned long long taken = 0ull;
  for (int q = 0; q < k; ++q) {
    const int64_t raw = idx[q];
    sel[q] = -1;
    if (raw >= 0 && raw < E && mask[raw] && !((taken >> raw) & 1ull)) {
      sel[q] = static_cast<int>(raw);
      taken |= 1ull << raw;
    } else if (raw != -1 && p.error != nullptr) {
      p.error[1] = 1;
    }
  }
  // Masked means absent: masked slots' probs and grad_probs are selected to 0, never trusted to be 0.
  float pm[kMaxSlots];
  for (int i = 0; i < E; ++i) pm[i] = mask[i] ? prob[i] : 0.f;
  float picked = 0.f;
  for (int q = 0; q < k; ++q)
    if (sel[q] >= 0) picked += pm[sel[q]];
  const float norm = fmaxf(picked, FLT_MIN);
  float c[kMaxSlots], dp[kMaxSlots], dgate[kMaxTopK];
  for (int i = 0; i < E; ++i) {
    c[i] = 0.f;
    dp[i] = (p.grad_probs != nullptr && mask[i]) ? p.grad_probs[tok * E + i] : 0.f;
  }
  float s1 = 0.f;
  for (int q = 0; q < k; ++q) {
    dgate[q] = 0.f;
    if (sel[q] < 0) continue;
    const int i = sel[q];
    const float gate = pm[i] / norm;
    c[i] = gate * p.scaling;
    float acc = 0.f;
    for (int l = 0; l < r; ++l) acc = fmaf(gr[i * r + l], u[i * r + l], acc);
    dgate[q] = p.scaling * acc;
    s1 += dgate[q] * gate;
  }
  for (int q = 0; q < k; ++q)
    if (sel[q] >= 0) dp[sel[q]] += (dgate[q] - s1) / norm;
  float pdp = 0.f;
  for (int i = 0; i < E; ++i) pdp += pm[i] * dp[i];
  for (int i = 0; i < E; ++i) dp[i] = mask[i] ? pm[i] * (dp[i] - pdp) : 0.f;  // dp now holds dz

  const float inv_sqrt_r = rsqrtf(static_cast<float>(r));
  for (int i = 0; i < E; ++i) {
    for (int l = 0; l < r; ++l) {
      const int col = i * r + l;
      const bool on = (taken >> i) & 1ull;  // selected, not multiplied by a zero gate
      G[col] = from_f<T>(on ? u[col] * c[i] : 0.f);
      const float du = on ? gr[col] * c[i] : 0.f;
      const float dh = (p.embedding && mask[i]) ? dp[i] * hr[l] * inv_sqrt_r : 0.f;
      if (split) {
        dH[R + col] = from_f<T>(du);
        dR[R + col] = from_f<T>(dh);
      } else {
        dH[R + col] = from_f<T>(du + dh);
      }
    }
  }
  if (p.shared) {
    for (int l = 0; l < r; ++l) {
      G[Er + l] = from_f<T>(u[Er + l] * p.scaling);
      dH[R + Er + l] = from_f<T>(gr[Er + l] * p.scaling);
      if (split) dR[R + Er + l] = from_f<T>(0.f);
    }
  }
  // Router rows: dt = sum_i dz_i h_i / sqrt(r) (embedding) or dz (linear).
  for (int l = 0; l < R; ++l) {
    float dt;
    if (p.embedding) {
      dt = 0.f;
      for (int i = 0; i < E; ++i) {
        if (mask[i]) dt = fmaf(dp[i], hr[R + i * r + l], dt);
      }
      dt *= inv_sqrt_r;
    } else {
      dt = dp[l];
    }
    dR[l] = from_f<T>(dt);
    if (split) dH[l] = from_f<T>(0.f);
  }
}

template <typename T, typename OutT>
cudaError_t seg_gemm_typed(const SegGemmParams& p, cudaStream_t stream) {
  const int rows = p.token_dim == 0 ? p.max_seg_tokens : p.m;
  if (rows <= 0 || p.n <= 0 || p.num_segments <= 0) return cudaSuccess;
  const dim3 grid((rows + kBM - 1) / kBM, (p.n + kBN - 1) / kBN, p.num_segments);
  seg_gemm_kernel<T, OutT><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

constexpr int kRouteThreads = 128;

}  // namespace

cudaError_t launch_seg_gemm(const SegGemmParams& p, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return p.c_fp32 ? seg_gemm_typed<float, float>(p, stream) : cudaErrorInvalidValue;
    case DType::kFloat16:
      return p.c_fp32 ? seg_gemm_typed<__half, float>(p, stream) : seg_gemm_typed<__half, __half>(p, stream);
    case DType::kBFloat16:
      return p.c_fp32 ? seg_gemm_typed<__nv_bfloat16, float>(p, stream)
                      : seg_gemm_typed<__nv_bfloat16, __nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_route_forward(const RouteParams& p, DType dtype, cudaStream_t stream) {
  if (p.num_slots > kMaxSlots || p.top_k > kMaxTopK) return cudaErrorInvalidValue;
  if (p.num_tokens <= 0) return cudaSuccess;
  const int blocks = (p.num_tokens + kRouteThreads - 1) / kRouteThreads;
  switch (dtype) {
    case DType::kFloat32:
      route_forward_kernel<float><<<blocks, kRouteThreads, 0, stream>>>(p);
      break;
    case DType::kFloat16:
      route_forward_kernel<__half><<<blocks, kRouteThreads, 0, stream>>>(p);
      break;
    case DType::kBFloat16:
      route_forward_kernel<__nv_bfloat16><<<blocks, kRouteThreads, 0, stream>>>(p);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t launch_route_backward(const RouteBackwardParams& p, DType dtype, cudaStream_t stream) {
  if (p.num_slots > kMaxSlots || p.top_k > kMaxTopK) return cudaErrorInvalidValue;
  if (p.num_tokens <= 0) return cudaSuccess;
  const int blocks = (p.num_tokens + kRouteThreads - 1) / kRouteThreads;
  switch (dtype) {
    case DType::kFloat32:
      route_backward_kernel<float><<<blocks, kRouteThreads, 0, stream>>>(p);
      break;
    case DType::kFloat16:
      route_backward_kernel<__half><<<blocks, kRouteThreads, 0, stream>>>(p);
      break;
    case DType::kBFloat16:
      route_backward_kernel<__nv_bfloat16><<<blocks, kRouteThreads, 0, stream>>>(p);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fedamole
