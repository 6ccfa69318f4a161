#pragma once
#include <cstdint>

namespace nft_fast {
// Masked BatchNorm, fp32, on the CPU: y = act((w * m) * x_hat + b [+ res]).
// Layouts (every tensor argument of one call shares it, dense, no offsets beyond the pointer):
//   rows_c = true : "rows x C", a row-major (M, C) matrix, M = N * S (channels_last 1d-3d, 2-D (N, C));
//   rows_c = false: (N, C, S) planes, S contiguous (NCHW / NCDHW / NCL).
// res, b may be null; y is read only with relu. In training mean/rstd/uvar are outputs (uvar: the
// unbiased variance for the running statistics), in eval mean/rstd are inputs and uvar is unused.
void masked_bn_fwd_f32_cpu(const float* x, const float* res, const float* w, const float* m, const float* b,
                           float* y, float* mean, float* rstd, float* uvar, int64_t N, int64_t C, int64_t S,
                           bool rows_c, bool training, float eps, bool relu);
// dx / dres may be null (not wanted); dw, db, dm are always written (C floats each).
void masked_bn_bwd_f32_cpu(const float* dy, const float* x, const float* y, const float* w, const float* m,
                           const float* mean, const float* rstd, float* dx, float* dres, float* dw, float* db,
                           float* dm, int64_t N, int64_t C, int64_t S, bool rows_c, bool training, bool relu);
}  // namespace nft_fast
