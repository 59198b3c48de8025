// crossattn CUDA backend: fused cross-attention forward (output + log-sum-exp) and the
// attention-weights pass ("full" per head, "mean" over heads), on tensor cores through WMMA
// (fp16 / bf16, sm_80+). Key and query padding, per-head temperature and the compact
// kept-block layout of block pruning; both directions of a bidirectional call in one launch.
//
// Semantics are crossattn/reference.py's: logits s = q.k * scale / T[h]; a row with no valid
// key gets output 0 and LSE +inf; pruned key blocks get weight 0 and cost no matrix work.
//
// Written against PyTorch's stable ABI (torch/csrc/stable): the op is registered with
// STABLE_TORCH_LIBRARY as crossattn_cuda::xattn_fwd; Python adds the fake implementation
// and autograd (the backward reuses the Triton kernels through the saved LSE).
//
// Design: one warp per CTA owns 16 query rows of one (batch, head, direction): Q in shared
// memory, key tiles of BN keys streamed through shared memory, S = Q K^T and O += P V on
// tensor cores (16x16x16 WMMA), online softmax in registers (two lanes per row). Small
// CTAs keep launch-to-result latency low at the small inference shapes this backend is for
// (B = 1, T <= 64, A <= 500), where the Triton launcher's Python overhead dominates.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

namespace crossattn_cuda {

using torch::stable::Tensor;
using torch::headeronly::ScalarType;
namespace wmma = nvcuda::wmma;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kRows = 16;  // query rows per CTA (one warp, one WMMA row tile)

struct DirParams {
  const void* q;
  const void* k;
  const void* v;
  void* o;            // [B, H, Lq, Dv] contiguous
  float* lse;         // [B, H, Lq] contiguous
  void* w;            // [B, H, Lq, Lk] ("full") or [B, Lq, Lk] ("mean"), or null
  const uint8_t* qv;  // [B, Lq] query valid, or null
  const uint8_t* kv;  // [B, Lk] key valid, or null
  const float* temp;  // [H] temperature, or null
  const int32_t* layout;  // [B, H, nqb, 1 + nkb] kept key blocks (count, indices), or null
  const uint8_t* dense;   // [B, H, nqb, nkb] kept mask (weights pass), or null
  int64_t sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd;
  int Lq, Lk, nqb, nkb, qtiles, ktiles;
  float scale;
};

struct Params {
  DirParams dir[2];
  int B, H, D, Dv;
  int block_q, block_k;
  int prune;
  int tiles0;      // tiles of direction 0
  int tiles;       // tiles of both directions; the 1-D grid is (batch[*head]) x tiles, so that
                   // no grid dimension limit (65 535 on y) caps batch * heads
};

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// rows x DMAX tile of a [*, L, D] operand (row stride sr, column stride sc) into shared
// memory, zero outside [r0, r_end) x [0, D).
template <typename T, int DMAX>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int rows, int r0, int r_end, int D,
                                          int64_t sr, int64_t sc, int lane) {
  for (int idx = lane; idx < rows * DMAX; idx += 32) {
    const int r = idx / DMAX, c = idx % DMAX;
    const int gr = r0 + r;
    dst[idx] = (gr < r_end && c < D) ? src[gr * sr + c * sc] : from_float<T>(0.f);
  }
}

// S[16, BN] = Q[16, D] K[BN, D]^T on tensor cores, into shared memory (fp32, ld BN).
template <typename T, int DMAX, int BN>
__device__ __forceinline__ void qk_tile(float* sS, const T* sQ, const T* sK, int D) {
#pragma unroll
  for (int nt = 0; nt < BN / 16; ++nt) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.f);
    for (int kt = 0; kt * 16 < D; ++kt) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
      wmma::load_matrix_sync(a, sQ + kt * 16, DMAX);
      wmma::load_matrix_sync(b, sK + nt * 16 * DMAX + kt * 16, DMAX);
      wmma::mma_sync(acc, a, b, acc);
    }
    wmma::store_matrix_sync(sS + nt * 16, acc, BN, wmma::mem_row_major);
  }
}

template <typename T, int DMAX, int BN>
__global__ void __launch_bounds__(32) xattn_fwd_kernel(const Params p) {
  __shared__ __align__(32) T sQ[kRows * DMAX];
  __shared__ __align__(32) T sK[BN * DMAX];
  __shared__ __align__(32) T sV[BN * DMAX];
  __shared__ __align__(32) float sS[kRows * BN];
  __shared__ __align__(32) T sP[kRows * BN];
  __shared__ __align__(32) float sT[16 * 16];

  const int lane = threadIdx.x;
  const int pid = static_cast<int>(blockIdx.x % p.tiles);
  const int bh = static_cast<int>(blockIdx.x / p.tiles), b = bh / p.H, h = bh % p.H;
  const int dir = pid < p.tiles0 ? 0 : 1;
  const int tile = dir == 0 ? pid : pid - p.tiles0;
  const DirParams& P = p.dir[dir];
  const int row0 = tile * kRows;
  const T* q = static_cast<const T*>(P.q) + b * P.sqb + h * P.sqh;
  const T* k = static_cast<const T*>(P.k) + b * P.skb + h * P.skh;
  const T* v = static_cast<const T*>(P.v) + b * P.svb + h * P.svh;

  load_tile<T, DMAX>(sQ, q, kRows, row0, P.Lq, p.D, P.sqm, P.sqd, lane);

  // Two lanes per query row: lane owns row r, columns [half * BN/2, (half + 1) * BN/2) of a
  // score tile and columns [half * 8, half * 8 + 8) of every 16-wide output tile.
  const int r = lane >> 1, half = lane & 1;
  const int grow = row0 + r;
  bool row_ok = grow < P.Lq;
  if (row_ok && P.qv != nullptr) row_ok = P.qv[static_cast<int64_t>(b) * P.Lq + grow] != 0;
  const float coef2 = P.scale * kLog2e / (P.temp != nullptr ? P.temp[h] : 1.f);
  float m_i = -INFINITY, l_i = 0.f;
  float o[DMAX / 2];
#pragma unroll
  for (int i = 0; i < DMAX / 2; ++i) o[i] = 0.f;

  auto step = [&](int c0, int c_end) {
    __syncwarp();
    load_tile<T, DMAX>(sK, k, BN, c0, c_end, p.D, P.skn, P.skd, lane);
    load_tile<T, DMAX>(sV, v, BN, c0, c_end, p.Dv, P.svn, P.svd, lane);
    __syncwarp();
    qk_tile<T, DMAX, BN>(sS, sQ, sK, p.D);
    __syncwarp();
    float s[BN / 2];
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < BN / 2; ++j) {
      const int jj = half * (BN / 2) + j, col = c0 + jj;
      bool ok = row_ok && col < c_end;
      if (ok && P.kv != nullptr) ok = P.kv[static_cast<int64_t>(b) * P.Lk + col] != 0;
      s[j] = ok ? sS[r * BN + jj] * coef2 : -INFINITY;
      mx = fmaxf(mx, s[j]);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    const float m_new = fmaxf(m_i, mx);
    const float m_safe = m_new == -INFINITY ? 0.f : m_new;  // no valid key yet: no NaN
    const float alpha = exp2f(m_i - m_safe);
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < BN / 2; ++j) {
      const float pj = exp2f(s[j] - m_safe);
      sum += pj;
      sP[r * BN + half * (BN / 2) + j] = from_float<T>(pj);
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    l_i = l_i * alpha + sum;
    m_i = m_new;
    __syncwarp();
#pragma unroll
    for (int dt = 0; dt < DMAX / 16; ++dt) {
      if (dt * 16 >= p.Dv) break;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
#pragma unroll
      for (int kt = 0; kt < BN / 16; ++kt) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bv;
        wmma::load_matrix_sync(a, sP + kt * 16, BN);
        wmma::load_matrix_sync(bv, sV + kt * 16 * DMAX + dt * 16, DMAX);
        wmma::mma_sync(acc, a, bv, acc);
      }
      wmma::store_matrix_sync(sT, acc, 16, wmma::mem_row_major);
      __syncwarp();
#pragma unroll
      for (int i = 0; i < 8; ++i) o[dt * 8 + i] = o[dt * 8 + i] * alpha + sT[r * 16 + half * 8 + i];
      __syncwarp();
    }
  };

  if (p.prune) {
    // Only the kept key blocks of this query block (block_q >= 16: one pruning row per CTA).
    const int32_t* lay = P.layout + ((static_cast<int64_t>(b) * p.H + h) * P.nqb + row0 / p.block_q) *
                                        static_cast<int64_t>(P.nkb + 1);
    const int count = lay[0];
    for (int e = 0; e < count; ++e) {
      const int start = lay[1 + e] * p.block_k;
      const int end = min(start + p.block_k, P.Lk);
      for (int c0 = start; c0 < end; c0 += BN) step(c0, end);
    }
  } else {
    for (int c0 = 0; c0 < P.Lk; c0 += BN) step(c0, P.Lk);
  }

  if (grow < P.Lq) {
    const bool has = l_i > 0.f;
    const float inv = has ? 1.f / l_i : 0.f;
    T* out = static_cast<T*>(P.o) + (static_cast<int64_t>(bh) * P.Lq + grow) * p.Dv;
#pragma unroll
    for (int dt = 0; dt < DMAX / 16; ++dt) {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int col = dt * 16 + half * 8 + i;
        if (col < p.Dv) out[col] = from_float<T>(o[dt * 8 + i] * inv);
      }
    }
    if (half == 0) P.lse[static_cast<int64_t>(bh) * P.Lq + grow] = has ? (m_i + log2f(l_i)) * kLn2 : INFINITY;
  }
}

// Weights from the stored LSE: P = exp(S - LSE) per (16-row, BN-column) tile; "mean" loops
// the heads in the CTA (grid.y = B) and writes the average. Pruned tiles: zeros, no matrix work.
template <typename T, int DMAX, int BN>
__global__ void __launch_bounds__(32) xattn_weights_kernel(const Params p, const int mean) {
  __shared__ __align__(32) T sQ[kRows * DMAX];
  __shared__ __align__(32) T sK[BN * DMAX];
  __shared__ __align__(32) float sS[kRows * BN];

  const int lane = threadIdx.x;
  const int pid = static_cast<int>(blockIdx.x % p.tiles);
  const int slab = static_cast<int>(blockIdx.x / p.tiles);  // b ("mean") or b * H + h
  const int dir = pid < p.tiles0 ? 0 : 1;
  const int tile = dir == 0 ? pid : pid - p.tiles0;
  const DirParams& P = p.dir[dir];
  const int row0 = (tile / P.ktiles) * kRows, c0 = (tile % P.ktiles) * BN;
  const int r = lane >> 1, half = lane & 1;
  const int grow = row0 + r;
  const int b = mean ? slab : slab / p.H;
  const int h_lo = mean ? 0 : slab % p.H, h_hi = mean ? p.H : h_lo + 1;
  bool row_ok = grow < P.Lq;
  if (row_ok && P.qv != nullptr) row_ok = P.qv[static_cast<int64_t>(b) * P.Lq + grow] != 0;
  float acc[BN / 2];
#pragma unroll
  for (int j = 0; j < BN / 2; ++j) acc[j] = 0.f;

  for (int h = h_lo; h < h_hi; ++h) {
    const int64_t bh = static_cast<int64_t>(b) * p.H + h;
    bool any = true;
    if (p.prune) {  // any kept pruning block under this tile? (a tile may span several)
      any = false;
      const uint8_t* row = P.dense + (bh * P.nqb + row0 / p.block_q) * P.nkb;
      for (int kb = c0 / p.block_k; kb * p.block_k < min(c0 + BN, P.Lk); ++kb) any = any || row[kb] != 0;
    }
    if (!any) continue;
    __syncwarp();
    load_tile<T, DMAX>(sQ, static_cast<const T*>(P.q) + b * P.sqb + h * P.sqh, kRows, row0, P.Lq, p.D,
                       P.sqm, P.sqd, lane);
    load_tile<T, DMAX>(sK, static_cast<const T*>(P.k) + b * P.skb + h * P.skh, BN, c0, P.Lk, p.D,
                       P.skn, P.skd, lane);
    __syncwarp();
    qk_tile<T, DMAX, BN>(sS, sQ, sK, p.D);
    __syncwarp();
    const float coef2 = P.scale * kLog2e / (P.temp != nullptr ? P.temp[h] : 1.f);
    const float lse2 = grow < P.Lq ? P.lse[bh * P.Lq + grow] * kLog2e : INFINITY;
#pragma unroll
    for (int j = 0; j < BN / 2; ++j) {
      const int jj = half * (BN / 2) + j, col = c0 + jj;
      bool ok = row_ok && col < P.Lk;
      if (ok && P.kv != nullptr) ok = P.kv[static_cast<int64_t>(b) * P.Lk + col] != 0;
      if (ok && p.prune) ok = P.dense[(bh * P.nqb + row0 / p.block_q) * P.nkb + col / p.block_k] != 0;
      if (ok) acc[j] += exp2f(sS[r * BN + jj] * coef2 - lse2);
    }
  }
  if (grow >= P.Lq) return;
  const float norm = mean ? 1.f / p.H : 1.f;
  T* w = static_cast<T*>(P.w) + (static_cast<int64_t>(slab) * P.Lq + grow) * P.Lk;
#pragma unroll
  for (int j = 0; j < BN / 2; ++j) {
    const int col = c0 + half * (BN / 2) + j;
    if (col < P.Lk) w[col] = from_float<T>(acc[j] * norm);
  }
}

// --------------------------------------------------------------------------- host side
namespace {

template <typename T>
const T* opt_ptr(const std::optional<Tensor>& t) {
  return t.has_value() && t->defined() && t->numel() > 0 ? static_cast<const T*>(t->data_ptr()) : nullptr;
}

void check_input(const Tensor& t, const char* name, ScalarType dtype, int dims) {
  STD_TORCH_CHECK(t.is_cuda(), "crossattn_cuda::xattn_fwd: ", name, " must be a CUDA tensor");
  STD_TORCH_CHECK(t.scalar_type() == dtype, "crossattn_cuda::xattn_fwd: ", name, " has the wrong dtype");
  STD_TORCH_CHECK(t.dim() == dims, "crossattn_cuda::xattn_fwd: ", name, " must be ", dims, "-D, got ", t.dim());
}

struct Direction {
  Tensor q, k, v;
  std::optional<Tensor> qv, kv, temp, layout, dense;
  double scale;
};

template <typename T, int DMAX, int BN>
void launch(Params& prm, int ndir, int weights, cudaStream_t stream) {
  const dim3 block(32);
  prm.tiles0 = prm.dir[0].qtiles;
  prm.tiles = prm.tiles0 + (ndir == 2 ? prm.dir[1].qtiles : 0);
  const int64_t programs = static_cast<int64_t>(prm.tiles) * prm.B * prm.H;
  STD_TORCH_CHECK(programs < (int64_t{1} << 31), "crossattn_cuda: too many query tiles for one launch");
  if (programs > 0) {
    xattn_fwd_kernel<T, DMAX, BN><<<dim3(static_cast<unsigned>(programs)), block, 0, stream>>>(prm);
    const cudaError_t err = cudaGetLastError();
    STD_TORCH_CHECK(err == cudaSuccess, "crossattn_cuda: forward launch failed: ", cudaGetErrorString(err));
  }
  if (weights != 0) {
    Params wp = prm;
    wp.tiles0 = prm.dir[0].qtiles * prm.dir[0].ktiles;
    wp.tiles = wp.tiles0 + (ndir == 2 ? prm.dir[1].qtiles * prm.dir[1].ktiles : 0);
    const int64_t wprograms = static_cast<int64_t>(wp.tiles) * (weights == 2 ? prm.B : prm.B * prm.H);
    STD_TORCH_CHECK(wprograms < (int64_t{1} << 31), "crossattn_cuda: too many weight tiles for one launch");
    if (wprograms > 0) {
      xattn_weights_kernel<T, DMAX, BN><<<dim3(static_cast<unsigned>(wprograms)), block, 0, stream>>>(wp, weights == 2);
      const cudaError_t err = cudaGetLastError();
      STD_TORCH_CHECK(err == cudaSuccess, "crossattn_cuda: weights launch failed: ", cudaGetErrorString(err));
    }
  }
}

// Makes q's device current for the launch (restored on scope exit).
class DeviceGuard {
 public:
  explicit DeviceGuard(int32_t index) {
    STD_TORCH_CHECK(aoti_torch_create_cuda_guard(index, &guard_) == AOTI_TORCH_SUCCESS,
                    "crossattn_cuda: cannot select CUDA device ", index);
  }
  ~DeviceGuard() { aoti_torch_delete_cuda_guard(guard_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  CUDAGuardHandle guard_ = nullptr;
};

template <typename T>
void dispatch(Params& prm, int ndir, int weights, cudaStream_t stream) {
  const int widest = prm.D > prm.Dv ? prm.D : prm.Dv;
  if (widest <= 64) {
    launch<T, 64, 64>(prm, ndir, weights, stream);
  } else if (widest <= 128) {
    launch<T, 128, 64>(prm, ndir, weights, stream);
  } else {
    STD_TORCH_CHECK(widest <= 256, "crossattn_cuda: head dims up to 256 are supported, got ", widest);
    launch<T, 256, 32>(prm, ndir, weights, stream);  // BN 32 keeps shared memory under 48 KB
  }
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> xattn_fwd(
    Tensor q0, Tensor k0, Tensor v0, std::optional<Tensor> qv0, std::optional<Tensor> kv0,
    std::optional<Tensor> t0, std::optional<Tensor> layout0, std::optional<Tensor> dense0, double scale0,
    std::optional<Tensor> q1, std::optional<Tensor> k1, std::optional<Tensor> v1, std::optional<Tensor> qv1,
    std::optional<Tensor> kv1, std::optional<Tensor> t1, std::optional<Tensor> layout1,
    std::optional<Tensor> dense1, double scale1, int64_t weights, int64_t block_q, int64_t block_k) {
  const ScalarType dtype = q0.scalar_type();
  STD_TORCH_CHECK(dtype == ScalarType::Half || dtype == ScalarType::BFloat16,
                  "crossattn_cuda::xattn_fwd: float16 or bfloat16 inputs only");
  STD_TORCH_CHECK(weights >= 0 && weights <= 2, "crossattn_cuda::xattn_fwd: weights must be 0, 1 or 2");
  std::vector<Direction> dirs;
  dirs.push_back({q0, k0, v0, qv0, kv0, t0, layout0, dense0, scale0});
  if (q1.has_value()) {
    STD_TORCH_CHECK(k1.has_value() && v1.has_value(), "crossattn_cuda::xattn_fwd: q1 needs k1 and v1");
    dirs.push_back({*q1, *k1, *v1, qv1, kv1, t1, layout1, dense1, scale1});
  }
  const int64_t B = q0.size(0), H = q0.size(1), D = q0.size(3), Dv = v0.size(3);
  const bool prune = layout0.has_value() && layout0->numel() > 0;
  STD_TORCH_CHECK(!prune || (block_q >= 16 && block_k >= 16),
                  "crossattn_cuda::xattn_fwd: pruning blocks must be at least 16 wide");

  Params prm{};
  prm.B = static_cast<int>(B);
  prm.H = static_cast<int>(H);
  prm.D = static_cast<int>(D);
  prm.Dv = static_cast<int>(Dv);
  prm.block_q = static_cast<int>(block_q);
  prm.block_k = static_cast<int>(block_k);
  prm.prune = prune ? 1 : 0;
  std::vector<Tensor> outs, lses, ws;
  const int bn = (D > Dv ? D : Dv) > 128 ? 32 : 64;
  for (size_t i = 0; i < dirs.size(); ++i) {
    Direction& d = dirs[i];
    check_input(d.q, "q", dtype, 4);
    check_input(d.k, "k", dtype, 4);
    check_input(d.v, "v", dtype, 4);
    const int64_t Lq = d.q.size(2), Lk = d.k.size(2);
    STD_TORCH_CHECK(d.q.size(0) == B && d.q.size(1) == H && d.q.size(3) == D && d.k.size(3) == D &&
                        d.v.size(3) == Dv && d.k.size(0) == B && d.v.size(2) == Lk,
                    "crossattn_cuda::xattn_fwd: inconsistent shapes between directions");
    STD_TORCH_CHECK(prune == (d.layout.has_value() && d.layout->numel() > 0),
                    "crossattn_cuda::xattn_fwd: give a block layout for both directions or neither");
    outs.push_back(torch::stable::new_empty(d.q, {B, H, Lq, Dv}));
    lses.push_back(torch::stable::new_empty(d.q, {B, H, Lq}, ScalarType::Float));
    ws.push_back(weights == 0   ? torch::stable::new_empty(d.q, {0})
                 : weights == 1 ? torch::stable::new_empty(d.q, {B, H, Lq, Lk})
                                : torch::stable::new_empty(d.q, {B, Lq, Lk}));
    DirParams& P = prm.dir[i];
    P.q = d.q.data_ptr();
    P.k = d.k.data_ptr();
    P.v = d.v.data_ptr();
    P.o = outs.back().data_ptr();
    P.lse = static_cast<float*>(lses.back().data_ptr());
    P.w = weights ? ws.back().data_ptr() : nullptr;
    P.qv = opt_ptr<uint8_t>(d.qv);
    P.kv = opt_ptr<uint8_t>(d.kv);
    P.temp = opt_ptr<float>(d.temp);
    P.layout = opt_ptr<int32_t>(d.layout);
    P.dense = opt_ptr<uint8_t>(d.dense);
    P.sqb = d.q.stride(0), P.sqh = d.q.stride(1), P.sqm = d.q.stride(2), P.sqd = d.q.stride(3);
    P.skb = d.k.stride(0), P.skh = d.k.stride(1), P.skn = d.k.stride(2), P.skd = d.k.stride(3);
    P.svb = d.v.stride(0), P.svh = d.v.stride(1), P.svn = d.v.stride(2), P.svd = d.v.stride(3);
    P.Lq = static_cast<int>(Lq);
    P.Lk = static_cast<int>(Lk);
    P.nqb = prune ? static_cast<int>((Lq + block_q - 1) / block_q) : 1;
    P.nkb = prune ? static_cast<int>((Lk + block_k - 1) / block_k) : 1;
    P.qtiles = static_cast<int>((Lq + kRows - 1) / kRows);
    P.ktiles = static_cast<int>((Lk + bn - 1) / bn);
    P.scale = static_cast<float>(d.scale);
    if (weights != 0 && prune) {
      STD_TORCH_CHECK(P.dense != nullptr, "crossattn_cuda::xattn_fwd: pruned weights need the dense block mask");
    }
  }
  if (dirs.size() == 1) prm.dir[1] = prm.dir[0];

  const DeviceGuard guard(q0.get_device_index());
  void* stream_ptr = nullptr;
  STD_TORCH_CHECK(aoti_torch_get_current_cuda_stream(q0.get_device_index(), &stream_ptr) == AOTI_TORCH_SUCCESS,
                  "crossattn_cuda: cannot get the current CUDA stream");
  const auto stream = static_cast<cudaStream_t>(stream_ptr);
  const int ndir = static_cast<int>(dirs.size());
  if (dtype == ScalarType::Half) {
    dispatch<__half>(prm, ndir, static_cast<int>(weights), stream);
  } else {
    dispatch<__nv_bfloat16>(prm, ndir, static_cast<int>(weights), stream);
  }
  if (dirs.size() == 1) {  // outputs must not alias: three distinct empty tensors
    outs.push_back(torch::stable::new_empty(q0, {0}));
    lses.push_back(torch::stable::new_empty(q0, {0}, ScalarType::Float));
    ws.push_back(torch::stable::new_empty(q0, {0}));
  }
  return {outs[0], lses[0], ws[0], outs[1], lses[1], ws[1]};
}

}  // namespace crossattn_cuda

STABLE_TORCH_LIBRARY(crossattn_cuda, m) {
  m.def(
      "xattn_fwd(Tensor q0, Tensor k0, Tensor v0, Tensor? qv0, Tensor? kv0, Tensor? t0, Tensor? layout0, "
      "Tensor? dense0, float scale0, Tensor? q1, Tensor? k1, Tensor? v1, Tensor? qv1, Tensor? kv1, "
      "Tensor? t1, Tensor? layout1, Tensor? dense1, float scale1, int weights, int block_q, int block_k) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

STABLE_TORCH_LIBRARY_IMPL(crossattn_cuda, CUDA, m) {
  m.impl("xattn_fwd", TORCH_BOX(&crossattn_cuda::xattn_fwd));
}
