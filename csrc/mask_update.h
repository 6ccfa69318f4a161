#pragma once
#include <cstdint>

namespace nft_fast {
void mask_update_f32_cpu(float* m, const float* g, float* buf, const float* floor, int64_t n,
                         float lr, float momentum, float reg_scale);
#ifdef NFT_FAST_WITH_CUDA
void mask_update_f32_cuda(float* m, const float* g, float* buf, const float* floor, int64_t n,
                          float lr, float momentum, float reg_scale, std::uintptr_t stream);
#endif
}  // namespace nft_fast
