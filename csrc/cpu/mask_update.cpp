// Fused NFT mask update on the CPU (see nft_fast/ops/mask_update.py for the semantics).
#include <cstdint>
#include <algorithm>
#include <cmath>

#include "mask_update.h"

// Hardware fma (x86-64-v3 has FMA3) picked at load time: the package is built without -march
// flags, and std::fma without the instruction is a slow library call.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define NFT_FMA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define NFT_FMA_CLONES
#endif

namespace nft_fast {

NFT_FMA_CLONES void mask_update_f32_cpu(float* m, const float* g, float* buf, const float* floor, int64_t n,
                         float lr, float momentum, float reg_scale) {
#pragma omp parallel for simd schedule(static) if (n > 65536)
  for (int64_t i = 0; i < n; ++i) {
    const float mi = m[i];
    // d|1-m|/dm = sign(m - 1): 0 at m == 1, as torch's abs gradient.
    const float s = (mi > 1.0f) ? 1.0f : ((mi < 1.0f) ? -1.0f : 0.0f);
    // Rounding as torch's SGD on the CPU: buf.mul_(momentum).add_(g) rounds twice,
    // p.add_(buf, alpha=-lr) is one fused multiply-add.
    const float gi = std::fma(reg_scale, s, g[i]);
    const float b = momentum * buf[i] + gi;
    buf[i] = b;
    const float upd = std::fma(-lr, b, mi);
    m[i] = std::min(std::max(upd, floor[i]), 1.0f);
  }
}

}  // namespace nft_fast
