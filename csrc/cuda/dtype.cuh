// fp32 / bf16 storage for the CUDA kernels: widen to fp32 on load, round to nearest even on store.
#pragma once
#include "compat.h"

namespace nft_fast {
namespace cuda_dtype {

using bf16 = __nv_bfloat16;

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(bf16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ bf16 from_f<bf16>(float v) { return __float2bfloat16_rn(v); }

}  // namespace cuda_dtype
}  // namespace nft_fast
