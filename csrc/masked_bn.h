#pragma once
#include <cstdint>

namespace nft_fast {
// Masked BatchNorm on the CPU: y = act((w * m) * x_hat + b [+ res]). x, res, y, dy, dx, dres are
// fp32, or bf16 when is_bf16 (arithmetic in fp32, sums in double, one rounding per stored value);
// w, m, b, the statistics and the parameter gradients are always fp32.
// Layouts (every tensor argument of one call shares it, dense, no offsets beyond the pointer):
//   rows_c = true : "rows x C", a row-major (M, C) matrix, M = N * S (channels_last 1d-3d, 2-D (N, C));
//   rows_c = false: (N, C, S) planes, S contiguous (NCHW / NCDHW / NCL).
// res, b may be null; y is read only with relu. In training mean/rstd/uvar are outputs (uvar: the
// unbiased variance for the running statistics), in eval mean/rstd are inputs and uvar is unused.
void masked_bn_fwd_cpu(const void* x, const void* res, const float* w, const float* m, const float* b, void* y,
                       float* mean, float* rstd, float* uvar, int64_t N, int64_t C, int64_t S, bool rows_c,
                       bool training, float eps, bool relu, bool is_bf16);
// dx / dres may be null (not wanted); dw, db, dm are always written (C floats each).
void masked_bn_bwd_cpu(const void* dy, const void* x, const void* y, const float* w, const float* m,
                       const float* mean, const float* rstd, void* dx, void* dres, float* dw, float* db, float* dm,
                       int64_t N, int64_t C, int64_t S, bool rows_c, bool training, bool relu, bool is_bf16);
}  // namespace nft_fast

namespace nft_fast {
// ---- CUDA (csrc/cuda/masked_bn.cu): the same semantics on device pointers, enqueued on `stream`.
// The training reduction is split into `chunks` row chunks (about 4 blocks per SM); `ws` is a
// device workspace of `workspace` floats from masked_bn_cuda_plan (same shape -> same plan).
struct MaskedBnPlan {
  int64_t chunks = 1, per_chunk = 1, workspace = 0;
};
MaskedBnPlan masked_bn_cuda_plan(int64_t N, int64_t C, int64_t S, bool rows_c, int sms);
void masked_bn_fwd_cuda(const void* x, const void* res, const float* w, const float* m, const float* b, void* y,
                        float* mean, float* rstd, float* uvar, float* ws, int64_t N, int64_t C, int64_t S, bool rows_c,
                        bool training, float eps, bool relu, bool is_bf16, int sms, std::uintptr_t stream);
void masked_bn_bwd_cuda(const void* dy, const void* x, const void* y, const float* w, const float* m,
                        const float* mean, const float* rstd, void* dx, void* dres, float* dw, float* db, float* dm,
                        float* ws, int64_t N, int64_t C, int64_t S, bool rows_c, bool training, bool relu,
                        bool is_bf16, int sms, std::uintptr_t stream);
}  // namespace nft_fast
