// MixUp for one NFT step on the GPU (semantics: nft_fast/ops/mixup.py).
//
// mixup_batch: out = lam * x + (1 - lam) * x[perm] in fp32 (two rounded products and a rounded
// sum, no fma: torch's rounding), written in the output dtype and layout (contiguous or
// channels_last) in the same pass: one thread per output element, so the writes are coalesced.
// mixup_ce_fwd: one warp per row: max, sum of exp, the two-label loss and the logit gradient
// (softmax - lam * onehot(y) - (1 - lam) * onehot(y[perm])) / B; the row losses are summed in row
// order by one block (deterministic). lam comes from a device pointer when one is given (a
// captured CUDA graph then reads fresh values on every replay), else from the float argument.
#include <cstdint>

#include "compat.h"
#include "dtype.cuh"
#include "../mixup.h"

namespace nft_fast {
namespace {

using cuda_dtype::bf16;
using cuda_dtype::from_f;
using cuda_dtype::to_f;

constexpr int kThreads = 256;

// x: contiguous (B, C, S) (S = product of the dims after C; rank-2 inputs have S = 1).
// channels_last: out is (B, S, C) in memory, else (B, C, S).
template <typename Ti, typename To>
__global__ void __launch_bounds__(kThreads)
    mixup_batch_kernel(const Ti* __restrict__ x, const int64_t* __restrict__ perm, const float* __restrict__ lam_p,
                       float lam_f, float one_minus_f, To* __restrict__ out, int64_t B, int64_t C, int64_t S,
                       bool channels_last) {
  const float lam = lam_p != nullptr ? *lam_p : lam_f;
  const float oml = lam_p != nullptr ? 1.0f - lam : one_minus_f;
  const int64_t per = C * S, n = B * per;
  for (int64_t o = blockIdx.x * (int64_t)kThreads + threadIdx.x; o < n; o += (int64_t)gridDim.x * kThreads) {
    const int64_t b = o / per, r = o - b * per;
    int64_t c, s;
    if (channels_last) {
      s = r / C;
      c = r - s * C;
    } else {
      c = r / S;
      s = r - c * S;
    }
    const int64_t in = c * S + s;
    const float a = to_f(x[b * per + in]), p = to_f(x[__ldg(perm + b) * per + in]);
    out[o] = from_f<To>(__fadd_rn(__fmul_rn(lam, a), __fmul_rn(oml, p)));
  }
}

// One warp per row of logits (B, K); row_loss[i] = lam * CE(i, y_i) + (1 - lam) * CE(i, y_perm_i).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    mixup_ce_rows(const T* __restrict__ z, const int64_t* __restrict__ y, const int64_t* __restrict__ perm,
                  const float* __restrict__ lam_p, float lam_f, float one_minus_f, int64_t B, int64_t K,
                  float* __restrict__ dz, float* __restrict__ row_loss) {
  const float lam = lam_p != nullptr ? *lam_p : lam_f;
  const float oml = lam_p != nullptr ? 1.0f - lam : one_minus_f;
  const int lane = threadIdx.x % 32;
  const int64_t row = blockIdx.x * (int64_t)(kThreads / 32) + threadIdx.x / 32;
  if (row >= B) return;  // a whole warp leaves together
  const T* zr = z + row * K;
  float mx = -CUDART_INF_F;
  for (int64_t k = lane; k < K; k += 32) mx = fmaxf(mx, to_f(zr[k]));
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  float se = 0.f;
  for (int64_t k = lane; k < K; k += 32) se += expf(to_f(zr[k]) - mx);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) se += __shfl_xor_sync(0xffffffffu, se, o);
  const float lse = mx + logf(se);
  const int64_t ya = y[row], yb = y[perm[row]];
  const float inv_b = 1.0f / (float)B;
  for (int64_t k = lane; k < K; k += 32) {
    float g = expf(to_f(zr[k]) - lse);
    if (k == ya) g -= lam;
    if (k == yb) g -= oml;
    dz[row * K + k] = g * inv_b;
  }
  if (lane == 0) row_loss[row] = lam * (lse - to_f(zr[ya])) + oml * (lse - to_f(zr[yb]));
}

// loss = sum(row_loss) / B, one block, rows in a fixed order (per-thread strided sums, then a tree).
__global__ void __launch_bounds__(kThreads) mixup_ce_mean(const float* __restrict__ row_loss, int64_t B,
                                                           float* __restrict__ loss) {
  NFT_SHARED(float, sh, [kThreads]);
  float s = 0.f;
  for (int64_t i = threadIdx.x; i < B; i += kThreads) s += row_loss[i];
  sh[threadIdx.x] = s;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w >>= 1) {
    if ((int)threadIdx.x < w) sh[threadIdx.x] += sh[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) *loss = sh[0] / (float)B;
}

int blocks_for(int64_t n, int sms) {
  const int64_t want = (n + kThreads - 1) / kThreads;
  const int64_t cap = (int64_t)sms * 16;
  return (int)(want < 1 ? 1 : (want < cap ? want : cap));
}

template <typename Ti, typename To>
void batch_t(const void* x, const int64_t* perm, const float* lam_p, float lam, float one_minus, void* out, int64_t B,
             int64_t C, int64_t S, bool channels_last, int sms, std::uintptr_t stream) {
  auto k = &mixup_batch_kernel<Ti, To>;
  NFT_LAUNCH(k, blocks_for(B * C * S, sms), kThreads, stream, static_cast<const Ti*>(x), perm, lam_p, lam, one_minus,
             static_cast<To*>(out), B, C, S, channels_last);
  NFT_CHECK_LAUNCH("mixup_batch_cuda");
}

}  // namespace

void mixup_batch_cuda(const void* x, bool x_bf16, const int64_t* perm, const float* lam_p, float lam,
                      float one_minus, void* out, bool out_bf16, int64_t B, int64_t C, int64_t S, bool channels_last,
                      int sms, std::uintptr_t stream) {
  if (B * C * S == 0) return;
  if (x_bf16 && out_bf16)
    batch_t<bf16, bf16>(x, perm, lam_p, lam, one_minus, out, B, C, S, channels_last, sms, stream);
  else if (x_bf16)
    batch_t<bf16, float>(x, perm, lam_p, lam, one_minus, out, B, C, S, channels_last, sms, stream);
  else if (out_bf16)
    batch_t<float, bf16>(x, perm, lam_p, lam, one_minus, out, B, C, S, channels_last, sms, stream);
  else
    batch_t<float, float>(x, perm, lam_p, lam, one_minus, out, B, C, S, channels_last, sms, stream);
}

void mixup_ce_fwd_cuda(const void* logits, bool bf16_logits, const int64_t* y, const int64_t* perm,
                       const float* lam_p, float lam, float one_minus, int64_t B, int64_t K, float* dlogits,
                       float* row_loss, float* loss, std::uintptr_t stream) {
  const int rows_per_block = kThreads / 32;
  const int64_t blocks = (B + rows_per_block - 1) / rows_per_block;
  if (bf16_logits) {
    auto k = &mixup_ce_rows<bf16>;
    NFT_LAUNCH(k, (unsigned)blocks, kThreads, stream, static_cast<const bf16*>(logits), y, perm, lam_p, lam,
               one_minus, B, K, dlogits, row_loss);
  } else {
    auto k = &mixup_ce_rows<float>;
    NFT_LAUNCH(k, (unsigned)blocks, kThreads, stream, static_cast<const float*>(logits), y, perm, lam_p, lam,
               one_minus, B, K, dlogits, row_loss);
  }
  NFT_CHECK_LAUNCH("mixup_ce_fwd_cuda (rows)");
  NFT_LAUNCH(mixup_ce_mean, 1, kThreads, stream, row_loss, B, loss);
  NFT_CHECK_LAUNCH("mixup_ce_fwd_cuda (mean)");
}

}  // namespace nft_fast
