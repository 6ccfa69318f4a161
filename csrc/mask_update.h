#pragma once
#include <cstdint>

namespace nft_fast {
void mask_update_f32_cpu(float* m, const float* g, float* buf, const float* floor, int64_t n,
                         float lr, float momentum, float reg_scale);
#ifdef NFT_FAST_WITH_CUDA
// lr_p: a device float holding the learning rate (CUDA-graph safe), or null to use lr.
void mask_update_f32_cuda(float* m, const float* g, float* buf, const float* floor, int64_t n,
                          const float* lr_p, float lr, float momentum, float reg_scale, std::uintptr_t stream);
#endif
}  // namespace nft_fast
