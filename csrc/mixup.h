#pragma once
#include <cstdint>

namespace nft_fast {
// MixUp on the CPU (nft_fast/ops/mixup.py has the semantics). Storage fp32 or bf16 (x_bf16 /
// out_bf16), arithmetic fp32: out = fl(fl(lam * x) + fl(oml * x[perm])), the two rounded
// products of torch's `lam * x + (1 - lam) * x[perm]` (no fma), bf16 stores rounded to nearest
// even like torch's cast. perm holds B int64 (or int32 with perm_i32) indices; one outside
// [0, B) throws std::out_of_range before anything is written.
// Per sample x is a dense row-major (R, Q) matrix; out is the same matrix (transpose = false)
// or its (Q, R) transpose (true: NCHW -> channels_last with R = C, Q = H*W, or the reverse).
void mixup_batch_cpu(const void* x, bool x_bf16, const void* perm, bool perm_i32, void* out, bool out_bf16,
                     int64_t B, int64_t R, int64_t Q, bool transpose, float lam, float oml);

// Two-label MixUp cross-entropy over logits z (B, K) row-major (fp32 or bf16), labels y (B,)
// int64, perm as above: *loss (fp32) = mean_i [lse_i - lam * z[i, y_i] - oml * z[i, y[perm_i]]]
// and, unless dlogits is null, dlogits (B, K) fp32 = (softmax(z_i) - lam * onehot(y_i)
// - oml * onehot(y[perm_i])) / B. exp sums in fp32 lanes, 256-value blocks and the row losses
// added in double in a fixed order (deterministic, independent of the thread count).
// A label outside [0, K) or a perm index outside [0, B) throws std::out_of_range.
void mixup_ce_fwd_cpu(const void* z, bool z_bf16, const int64_t* y, const void* perm, bool perm_i32, float* dlogits,
                      float* loss, int64_t B, int64_t K, double lam, double oml);
}  // namespace nft_fast

namespace nft_fast {
// ---- CUDA (csrc/cuda/mixup.cu), enqueued on `stream`. lam_p: a device float read by the kernel
// (CUDA-graph safe) or null (then lam / one_minus = 1 - lam are used). x contiguous (B, C, S);
// out (B, C, S) or, with channels_last, (B, S, C) in memory. perm (and y) int64 on the device,
// not range-checked (that would need a host sync). mixup_ce: row_loss is a B-float workspace.
void mixup_batch_cuda(const void* x, bool x_bf16, const int64_t* perm, const float* lam_p, float lam,
                      float one_minus, void* out, bool out_bf16, int64_t B, int64_t C, int64_t S, bool channels_last,
                      int sms, std::uintptr_t stream);
void mixup_ce_fwd_cuda(const void* logits, bool bf16_logits, const int64_t* y, const int64_t* perm,
                       const float* lam_p, float lam, float one_minus, int64_t B, int64_t K, float* dlogits,
                       float* row_loss, float* loss, std::uintptr_t stream);
}  // namespace nft_fast
