// Masked BatchNorm (+ residual + ReLU) on the GPU, fp32 or bf16 activations, fp32 parameters and
// statistics (semantics: nft_fast/ops/masked_bn.py; layouts: csrc/masked_bn.h).
//
// Training forward: (1) a split reduction: block (channel tile, row chunk) -> per-thread Welford
// over its rows, merged across the warp with shuffles / across the block in shared memory (Chan's
// formula, fixed order), one partial (n, mean, M2) per (chunk, channel); (2) one thread per channel
// merges its P partials in chunk order, in double: mean, rstd, unbiased variance; (3) the
// elementwise y = act((x - mean) * (w * m * rstd) + b [+ res]). Backward: (1) the same split for
// sum(dz) and sum(dz * (x - mean)) (dz = dy masked by y > 0 with ReLU), (2) per channel dm = w * S,
// dw = m * S, db, the dx coefficients, (3) the elementwise dx (and dres = dz). Every reduction has
// an order fixed by the shape: results do not depend on scheduling. 16-byte vector loads (4 fp32 /
// 8 bf16) whenever the channel tile (channels_last) or the plane (NCHW) allows them.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>

#include "compat.h"
#include "dtype.cuh"
#include "../masked_bn.h"

namespace nft_fast {
namespace {

using cuda_dtype::bf16;
using cuda_dtype::from_f;
using cuda_dtype::to_f;

// VEC consecutive elements, one aligned load / store when VEC > 1.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};
template <typename T, int VEC>
__device__ __forceinline__ void load(const T* __restrict__ p, float (&out)[VEC]) {
  NFT_CHECK_ALIGNED(p, sizeof(Pack<T, VEC>));
  const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int j = 0; j < VEC; ++j) out[j] = to_f(pk.v[j]);
}
template <typename T, int VEC>
__device__ __forceinline__ void store(T* __restrict__ p, const float (&in)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int j = 0; j < VEC; ++j) pk.v[j] = from_f<T>(in[j]);
  NFT_CHECK_ALIGNED(p, sizeof(Pack<T, VEC>));
  *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
}

// ------------------------------------------------------------------------------ accumulators

// Welford (n, mean, M2) with Chan's merge. Plain structs (no initialisers): they live in
// __shared__ arrays, which take no dynamic initialisation.
struct Welford {
  float n, mean, m2;
  __device__ __forceinline__ static Welford zero() { return Welford{0.f, 0.f, 0.f}; }
  __device__ __forceinline__ void add(float x) {
    n += 1.f;
    const float d = x - mean;
    mean += d / n;
    m2 += d * (x - mean);
  }
  __device__ __forceinline__ void merge(const Welford& o) {
    const float nn = n + o.n;
    if (o.n == 0.f) return;
    if (n == 0.f) { *this = o; return; }
    const float d = o.mean - mean, r = o.n / nn;
    mean += d * r;
    m2 += o.m2 + d * d * n * r;
    n = nn;
  }
  __device__ __forceinline__ Welford shfl_xor(int lane_mask) const {
    Welford o;
    o.n = __shfl_xor_sync(0xffffffffu, n, lane_mask);
    o.mean = __shfl_xor_sync(0xffffffffu, mean, lane_mask);
    o.m2 = __shfl_xor_sync(0xffffffffu, m2, lane_mask);
    return o;
  }
  __device__ __forceinline__ void put(float* out, int64_t i, int64_t stride) const {
    out[i] = n;
    out[i + stride] = mean;
    out[i + 2 * stride] = m2;
  }
};

// (sum dz, sum dz * (x - mean)) for the backward.
struct Sums {
  float dz, dzx;
  __device__ __forceinline__ static Sums zero() { return Sums{0.f, 0.f}; }
  __device__ __forceinline__ void merge(const Sums& o) {
    dz += o.dz;
    dzx += o.dzx;
  }
  __device__ __forceinline__ Sums shfl_xor(int lane_mask) const {
    Sums o;
    o.dz = __shfl_xor_sync(0xffffffffu, dz, lane_mask);
    o.dzx = __shfl_xor_sync(0xffffffffu, dzx, lane_mask);
    return o;
  }
  __device__ __forceinline__ void put(float* out, int64_t i, int64_t stride) const {
    out[i] = dz;
    out[i + stride] = dzx;
  }
};

// What one element contributes: the forward reads x; the backward dy, x (and y with ReLU).
template <typename T>
struct StatsIn {
  const T* x;
  template <int VEC>
  __device__ __forceinline__ void add(int64_t off, Welford* acc, bool one_channel, const float*, int) const {
    float v[VEC];
    load<T, VEC>(x + off, v);
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[one_channel ? 0 : j].add(v[j]);
  }
};

template <typename T>
struct BwdIn {
  const T* dy;
  const T* x;
  const T* y;  // null without ReLU
  template <int VEC>
  __device__ __forceinline__ void add(int64_t off, Sums* acc, bool one_channel, const float* mean, int c0) const {
    float g[VEC], xv[VEC], yv[VEC];
    load<T, VEC>(dy + off, g);
    load<T, VEC>(x + off, xv);
    if (y != nullptr) {
      load<T, VEC>(y + off, yv);
#pragma unroll
      for (int j = 0; j < VEC; ++j) g[j] = yv[j] > 0.f ? g[j] : 0.f;
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int k = one_channel ? 0 : j;
      acc[k].dz += g[j];
      acc[k].dzx += g[j] * (xv[j] - __ldg(mean + c0 + k));
    }
  }
};

// a / b for a, b >= 0, in 32-bit arithmetic when both fit (64-bit division is a long
// instruction sequence on the GPU, and these run once per vector in memory-bound loops).
__device__ __forceinline__ int64_t div_small(int64_t a, int64_t b) {
  return (a <= 0xffffffffLL && b <= 0xffffffffLL) ? (int64_t)((uint32_t)a / (uint32_t)b) : a / b;
}

constexpr int kRowsTx = 32;  // channel lanes of a rows-layout reduction block
constexpr int kRowsTy = 8;   // row lanes
constexpr int kThreads = 256;

// rows x C: block (blockIdx.x: a tile of 32 * VEC channels, blockIdx.y: a chunk of rows). Thread
// (tx, ty) owns channels c0..c0+VEC-1 and rows r0 + ty, r0 + ty + 8, ...; the 8 row lanes merge in
// shared memory in ty order. Output: out[k * P * C + p * C + c] for the K fields of Acc.
template <class Acc, class In, int VEC>
__global__ void __launch_bounds__(kRowsTx * kRowsTy)
    reduce_rows(In in, const float* __restrict__ mean, int64_t M, int C, int64_t rows_per_chunk, float* out) {
  NFT_SHARED(Acc, sh, [kRowsTy][kRowsTx * VEC]);
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int c0 = (blockIdx.x * kRowsTx + tx) * VEC;
  const int64_t p = blockIdx.y, P = gridDim.y;
  const int64_t r0 = p * rows_per_chunk, r1 = r0 + rows_per_chunk < M ? r0 + rows_per_chunk : M;
  Acc acc[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) acc[j] = Acc::zero();
  if (c0 < C) {
    for (int64_t r = r0 + ty; r < r1; r += kRowsTy) in.template add<VEC>(r * C + c0, acc, false, mean, c0);
  }
#pragma unroll
  for (int j = 0; j < VEC; ++j) sh[ty][tx * VEC + j] = acc[j];
  __syncthreads();
  if (ty == 0 && c0 < C) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      Acc a = sh[0][tx * VEC + j];
      for (int k = 1; k < kRowsTy; ++k) a.merge(sh[k][tx * VEC + j]);
      a.put(out, p * C + c0 + j, P * C);
    }
  }
}

// (N, C, S) planes: block (blockIdx.x: channel c, blockIdx.y: a chunk of the channel's N * S
// elements, VEC at a time inside one plane). Warp merge by xor shuffles, then the 8 warps in order.
template <class Acc, class In, int VEC>
__global__ void __launch_bounds__(kThreads)
    reduce_planes(In in, const float* __restrict__ mean, int C, int64_t S, int64_t M, int64_t elems_per_chunk,
                  float* out) {
  NFT_SHARED(Acc, sh, [kThreads / 32]);
  const int c = blockIdx.x;
  const int64_t p = blockIdx.y, P = gridDim.y;
  const int64_t e0 = p * elems_per_chunk, e1 = e0 + elems_per_chunk < M ? e0 + elems_per_chunk : M;
  Acc acc[1] = {Acc::zero()};
  for (int64_t e = e0 + (int64_t)threadIdx.x * VEC; e < e1; e += (int64_t)kThreads * VEC) {
    const int64_t n = div_small(e, S), s = e - n * S;
    in.template add<VEC>((n * C + c) * S + s, acc, true, mean, c);
  }
  Acc a = acc[0];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) a.merge(a.shfl_xor(o));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) sh[warp] = a;
  __syncthreads();
  if (threadIdx.x == 0) {
    Acc t = sh[0];
    for (int k = 1; k < kThreads / 32; ++k) t.merge(sh[k]);
    t.put(out, p * C + c, P * C);
  }
}

// One thread per channel: the P partials in chunk order, in double.
__global__ void finalize_stats(const float* __restrict__ part, int64_t P, int C, float eps, float* __restrict__ mean,
                               float* __restrict__ rstd, float* __restrict__ uvar) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const int64_t PC = P * C;
  double n = 0.0, mu = 0.0, m2 = 0.0;
  for (int64_t p = 0; p < P; ++p) {
    const double nb = part[p * C + c];
    if (nb == 0.0) continue;
    const double mb = part[PC + p * C + c], m2b = part[2 * PC + p * C + c];
    const double nn = n + nb, d = mb - mu, r = nb / nn;
    mu += d * r;
    m2 += m2b + d * d * n * r;
    n = nn;
  }
  mean[c] = (float)mu;
  rstd[c] = (float)(1.0 / sqrt(m2 / n + (double)eps));
  uvar[c] = (float)(m2 / (n > 1.0 ? n - 1.0 : 1.0));
}

// dm, dw, db and the dx coefficients (coef: a, mean(dz), mean(dz * x_hat); 3 x C).
__global__ void finalize_bwd(const float* __restrict__ part, int64_t P, int C, int64_t M, const float* __restrict__ w,
                             const float* __restrict__ m, const float* __restrict__ rstd, float* __restrict__ dw,
                             float* __restrict__ db, float* __restrict__ dm, float* __restrict__ coef) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const int64_t PC = P * C;
  double sdz = 0.0, sdzx = 0.0;
  for (int64_t p = 0; p < P; ++p) {
    sdz += part[p * C + c];
    sdzx += part[PC + p * C + c];
  }
  const double sx = sdzx * (double)rstd[c];
  const float sxf = (float)sx;
  dm[c] = w[c] * sxf;
  dw[c] = m[c] * sxf;
  db[c] = (float)sdz;
  coef[c] = (w[c] * m[c]) * rstd[c];
  coef[C + c] = (float)(sdz / (double)M);
  coef[2 * C + c] = (float)(sx / (double)M);
}

// Channel of the first of VEC consecutive elements at vector index v (ROWS: c fastest; else planes).
template <bool ROWS, int VEC>
__device__ __forceinline__ int channel_of(int64_t v, int C, int64_t S) {
  const int64_t e = v * VEC;
  int64_t q = e;
  if (!ROWS) q = div_small(e, S);
  return q <= 0xffffffffLL ? (int)((uint32_t)q % (uint32_t)C) : (int)(q % C);
}

template <typename T, bool ROWS, int VEC>
__global__ void __launch_bounds__(kThreads)
    apply_fwd(const T* __restrict__ x, const T* __restrict__ res, const float* __restrict__ w,
              const float* __restrict__ m, const float* __restrict__ b, const float* __restrict__ mean,
              const float* __restrict__ rstd, T* __restrict__ y, int64_t nvec, int C, int64_t S, bool relu) {
  for (int64_t v = blockIdx.x * (int64_t)kThreads + threadIdx.x; v < nvec; v += (int64_t)gridDim.x * kThreads) {
    const int c0 = channel_of<ROWS, VEC>(v, C, S);
    float xv[VEC], rv[VEC], out[VEC];
    load<T, VEC>(x + v * VEC, xv);
    if (res != nullptr) load<T, VEC>(res + v * VEC, rv);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int c = ROWS ? c0 + j : c0;
      const float scale = (__ldg(w + c) * __ldg(m + c)) * __ldg(rstd + c);
      float o = (xv[j] - __ldg(mean + c)) * scale + (b != nullptr ? __ldg(b + c) : 0.f);
      if (res != nullptr) o += rv[j];
      out[j] = relu && o < 0.f ? 0.f : o;  // NaN stays NaN, as torch's relu (fmaxf would drop it)
    }
    store<T, VEC>(y + v * VEC, out);
  }
}

template <typename T, bool ROWS, int VEC>
__global__ void __launch_bounds__(kThreads)
    apply_bwd(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ y,
              const float* __restrict__ mean, const float* __restrict__ rstd, const float* __restrict__ coef,
              T* __restrict__ dx, T* __restrict__ dres, int64_t nvec, int C, int64_t S, bool training) {
  for (int64_t v = blockIdx.x * (int64_t)kThreads + threadIdx.x; v < nvec; v += (int64_t)gridDim.x * kThreads) {
    const int c0 = channel_of<ROWS, VEC>(v, C, S);
    float g[VEC], xv[VEC], yv[VEC], out[VEC];
    load<T, VEC>(dy + v * VEC, g);
    if (y != nullptr) {
      load<T, VEC>(y + v * VEC, yv);
#pragma unroll
      for (int j = 0; j < VEC; ++j) g[j] = yv[j] > 0.f ? g[j] : 0.f;
    }
    if (dres != nullptr) store<T, VEC>(dres + v * VEC, g);
    if (dx == nullptr) continue;
    if (training) load<T, VEC>(x + v * VEC, xv);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int c = ROWS ? c0 + j : c0;
      const float a = __ldg(coef + c);
      out[j] = training ? a * (g[j] - __ldg(coef + C + c) -
                               ((xv[j] - __ldg(mean + c)) * __ldg(rstd + c)) * __ldg(coef + 2 * C + c))
                        : a * g[j];
    }
    store<T, VEC>(dx + v * VEC, out);
  }
}

// ------------------------------------------------------------------------------ host side

bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

int ew_blocks(int64_t nvec, int sms) {
  const int64_t want = (nvec + kThreads - 1) / kThreads;
  return (int)std::max<int64_t>(1, std::min<int64_t>(want, (int64_t)sms * 16));
}

// VEC (16 bytes of T) when the layout keeps VEC consecutive elements in one row (channel tile) or
// one plane and every pointer is 16-byte aligned; else 1.
template <typename T>
bool can_vec(bool rows_c, int64_t C, int64_t S, std::initializer_list<const void*> ptrs) {
  constexpr int V = 16 / sizeof(T);
  if ((rows_c ? C : S) % V != 0) return false;
  for (const void* p : ptrs)
    if (p != nullptr && !aligned16(p)) return false;
  return true;
}

}  // namespace

MaskedBnPlan masked_bn_cuda_plan(int64_t N, int64_t C, int64_t S, bool rows_c, int sms) {
  const int64_t M = N * S, want = std::max<int64_t>(1, (int64_t)sms * 4);
  MaskedBnPlan pl;
  if (rows_c) {
    const int64_t tiles = (C + kRowsTx - 1) / kRowsTx;  // at VEC = 1: the most blocks
    int64_t P = std::min<int64_t>((want + tiles - 1) / tiles, (M + 63) / 64);
    P = std::max<int64_t>(1, std::min<int64_t>(P, 65535));
    pl.per_chunk = (M + P - 1) / P;
  } else {
    int64_t P = std::min<int64_t>((want + C - 1) / C, (M + 4095) / 4096);
    P = std::max<int64_t>(1, std::min<int64_t>(P, 65535));
    pl.per_chunk = ((M + P - 1) / P + 7) / 8 * 8;  // a multiple of every VEC
  }
  pl.chunks = (M + pl.per_chunk - 1) / pl.per_chunk;
  pl.workspace = 3 * pl.chunks * C + 3 * C;
  return pl;
}

namespace {

template <typename T, int VEC>
void fwd_impl(const T* x, const T* res, const float* w, const float* m, const float* b, T* y, float* mean,
              float* rstd, float* uvar, float* ws, int64_t N, int C, int64_t S, bool rows_c, bool training, float eps,
              bool relu, int sms, std::uintptr_t stream) {
  const int64_t M = N * S;
  if (training) {
    const MaskedBnPlan pl = masked_bn_cuda_plan(N, C, S, rows_c, sms);
    StatsIn<T> in{x};
    if (rows_c) {
      const dim3 grid((unsigned)((C + kRowsTx * VEC - 1) / (kRowsTx * VEC)), (unsigned)pl.chunks);
      auto k = &reduce_rows<Welford, StatsIn<T>, VEC>;
      NFT_LAUNCH(k, grid, dim3(kRowsTx, kRowsTy), stream, in, nullptr, M, C, pl.per_chunk, ws);
    } else {
      auto k = &reduce_planes<Welford, StatsIn<T>, VEC>;
      NFT_LAUNCH(k, dim3((unsigned)C, (unsigned)pl.chunks), kThreads, stream, in, nullptr, C, S, M, pl.per_chunk, ws);
    }
    NFT_CHECK_LAUNCH("masked_bn_fwd_cuda (statistics)");
    NFT_LAUNCH(finalize_stats, (C + kThreads - 1) / kThreads, kThreads, stream, ws, pl.chunks, C, eps, mean, rstd,
               uvar);
    NFT_CHECK_LAUNCH("masked_bn_fwd_cuda (finalize)");
  }
  const int64_t nvec = N * C * S / VEC;
  auto k = rows_c ? &apply_fwd<T, true, VEC> : &apply_fwd<T, false, VEC>;
  NFT_LAUNCH(k, ew_blocks(nvec, sms), kThreads, stream, x, res, w, m, b, mean, rstd, y, nvec, C, S, relu);
  NFT_CHECK_LAUNCH("masked_bn_fwd_cuda (apply)");
}

template <typename T, int VEC>
void bwd_impl(const T* dy, const T* x, const T* y, const float* w, const float* m, const float* mean,
              const float* rstd, T* dx, T* dres, float* dw, float* db, float* dm, float* ws, int64_t N, int C,
              int64_t S, bool rows_c, bool training, bool relu, int sms, std::uintptr_t stream) {
  const int64_t M = N * S;
  const MaskedBnPlan pl = masked_bn_cuda_plan(N, C, S, rows_c, sms);
  BwdIn<T> in{dy, x, relu ? y : nullptr};
  if (rows_c) {
    const dim3 grid((unsigned)((C + kRowsTx * VEC - 1) / (kRowsTx * VEC)), (unsigned)pl.chunks);
    auto k = &reduce_rows<Sums, BwdIn<T>, VEC>;
    NFT_LAUNCH(k, grid, dim3(kRowsTx, kRowsTy), stream, in, mean, M, C, pl.per_chunk, ws);
  } else {
    auto k = &reduce_planes<Sums, BwdIn<T>, VEC>;
    NFT_LAUNCH(k, dim3((unsigned)C, (unsigned)pl.chunks), kThreads, stream, in, mean, C, S, M, pl.per_chunk, ws);
  }
  NFT_CHECK_LAUNCH("masked_bn_bwd_cuda (sums)");
  float* coef = ws + 3 * pl.chunks * C;
  NFT_LAUNCH(finalize_bwd, (C + kThreads - 1) / kThreads, kThreads, stream, ws, pl.chunks, C, M, w, m, rstd, dw, db,
             dm, coef);
  NFT_CHECK_LAUNCH("masked_bn_bwd_cuda (finalize)");
  if (dx == nullptr && dres == nullptr) return;
  const int64_t nvec = N * C * S / VEC;
  const T* yr = relu ? y : nullptr;
  auto k = rows_c ? &apply_bwd<T, true, VEC> : &apply_bwd<T, false, VEC>;
  NFT_LAUNCH(k, ew_blocks(nvec, sms), kThreads, stream, dy, x, yr, mean, rstd, coef, dx, dres, nvec, C, S, training);
  NFT_CHECK_LAUNCH("masked_bn_bwd_cuda (dx)");
}

template <typename T>
void fwd_t(const void* x, const void* res, const float* w, const float* m, const float* b, void* y, float* mean,
           float* rstd, float* uvar, float* ws, int64_t N, int64_t C, int64_t S, bool rows_c, bool training, float eps,
           bool relu, int sms, std::uintptr_t stream) {
  constexpr int V = 16 / sizeof(T);
  const T *xt = static_cast<const T*>(x), *rt = static_cast<const T*>(res);
  T* yt = static_cast<T*>(y);
  if (can_vec<T>(rows_c, C, S, {x, res, y}))
    fwd_impl<T, V>(xt, rt, w, m, b, yt, mean, rstd, uvar, ws, N, (int)C, S, rows_c, training, eps, relu, sms, stream);
  else
    fwd_impl<T, 1>(xt, rt, w, m, b, yt, mean, rstd, uvar, ws, N, (int)C, S, rows_c, training, eps, relu, sms, stream);
}

template <typename T>
void bwd_t(const void* dy, const void* x, const void* y, const float* w, const float* m, const float* mean,
           const float* rstd, void* dx, void* dres, float* dw, float* db, float* dm, float* ws, int64_t N, int64_t C,
           int64_t S, bool rows_c, bool training, bool relu, int sms, std::uintptr_t stream) {
  constexpr int V = 16 / sizeof(T);
  const T *dyt = static_cast<const T*>(dy), *xt = static_cast<const T*>(x), *yt = static_cast<const T*>(y);
  T *dxt = static_cast<T*>(dx), *dqt = static_cast<T*>(dres);
  if (can_vec<T>(rows_c, C, S, {dy, x, relu ? y : nullptr, dx, dres}))
    bwd_impl<T, V>(dyt, xt, yt, w, m, mean, rstd, dxt, dqt, dw, db, dm, ws, N, (int)C, S, rows_c, training, relu, sms,
                   stream);
  else
    bwd_impl<T, 1>(dyt, xt, yt, w, m, mean, rstd, dxt, dqt, dw, db, dm, ws, N, (int)C, S, rows_c, training, relu, sms,
                   stream);
}

}  // namespace

void masked_bn_fwd_cuda(const void* x, const void* res, const float* w, const float* m, const float* b, void* y,
                        float* mean, float* rstd, float* uvar, float* ws, int64_t N, int64_t C, int64_t S, bool rows_c,
                        bool training, float eps, bool relu, bool is_bf16, int sms, std::uintptr_t stream) {
  if (N * C * S == 0) return;
  if (is_bf16)
    fwd_t<bf16>(x, res, w, m, b, y, mean, rstd, uvar, ws, N, C, S, rows_c, training, eps, relu, sms, stream);
  else
    fwd_t<float>(x, res, w, m, b, y, mean, rstd, uvar, ws, N, C, S, rows_c, training, eps, relu, sms, stream);
}

void masked_bn_bwd_cuda(const void* dy, const void* x, const void* y, const float* w, const float* m,
                        const float* mean, const float* rstd, void* dx, void* dres, float* dw, float* db, float* dm,
                        float* ws, int64_t N, int64_t C, int64_t S, bool rows_c, bool training, bool relu,
                        bool is_bf16, int sms, std::uintptr_t stream) {
  if (N * C * S == 0) return;
  if (is_bf16)
    bwd_t<bf16>(dy, x, y, w, m, mean, rstd, dx, dres, dw, db, dm, ws, N, C, S, rows_c, training, relu, sms, stream);
  else
    bwd_t<float>(dy, x, y, w, m, mean, rstd, dx, dres, dw, db, dm, ws, N, C, S, rows_c, training, relu, sms, stream);
}

}  // namespace nft_fast
