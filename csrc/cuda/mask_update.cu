// Fused NFT mask update on the GPU: one thread per mask element, grid-stride loop. The learning
// rate is read from a device float when lr_p is given (a captured CUDA graph then follows the
// schedule without re-capture), else taken by value.
#include <cstdint>

#include "compat.h"
#include "../mask_update.h"

namespace nft_fast {

__global__ void mask_update_f32_kernel(float* __restrict__ m, const float* __restrict__ g,
                                       float* __restrict__ buf, const float* __restrict__ floor,
                                       int64_t n, const float* __restrict__ lr_p, float lr_v, float momentum,
                                       float reg_scale) {
  const float lr = lr_p != nullptr ? *lr_p : lr_v;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    const float mi = m[i];
    const float s = (mi > 1.0f) ? 1.0f : ((mi < 1.0f) ? -1.0f : 0.0f);
    const float b = __fadd_rn(__fmul_rn(momentum, buf[i]), fmaf(reg_scale, s, g[i]));
    buf[i] = b;
    // clamp to [floor, 1] keeping NaN, as torch.maximum / clamp_ (fmaxf/fminf would drop it)
    const float u = fmaf(-lr, b, mi), fl = floor[i];
    const float v = u < fl ? fl : u;
    m[i] = v > 1.0f ? 1.0f : v;
  }
}

void mask_update_f32_cuda(float* m, const float* g, float* buf, const float* floor, int64_t n,
                          const float* lr_p, float lr, float momentum, float reg_scale, std::uintptr_t stream) {
  if (n == 0) return;
  const int threads = 256;
  const int64_t want = (n + threads - 1) / threads;
  const int blocks = (int)(want < 4096 ? want : 4096);
  NFT_LAUNCH(mask_update_f32_kernel, blocks, threads, stream, m, g, buf, floor, n, lr_p, lr, momentum, reg_scale);
  NFT_CHECK_LAUNCH("mask_update_f32_cuda");
}

}  // namespace nft_fast
