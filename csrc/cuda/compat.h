// The one header every csrc/cuda/*.cu includes first. It lets the same kernel source build
//   - with nvcc into nft_fast._C (real CUDA: __CUDACC__ defined, NFT_CUDA_EMU not), and
//   - with the host C++ compiler into nft_fast._cuda_emu (-DNFT_CUDA_EMU): the kernels then run
//     on the CPU under the fiber emulator of csrc/testing/cuda_emu/cuda_emu.h (CI has no GPU).
//
// Launch kernels only through NFT_LAUNCH and check with NFT_CHECK_LAUNCH:
//   NFT_LAUNCH(my_kernel, blocks, threads, stream, a, b, n);
//   NFT_CHECK_LAUNCH("my_launcher");
// `blocks`/`threads` are dim3 or integers, `stream` a std::uintptr_t (0: default stream).
// A template kernel is written in parentheses, or through a local pointer/alias:
//   NFT_LAUNCH((my_kernel<float, true>), grid, block, stream, ...);
//   auto k = &my_kernel<float, true>;  NFT_LAUNCH(k, grid, block, stream, ...);
// (a one-argument template-id, my_kernel<float>, also works without parentheses).
// Shared memory: NFT_SHARED(T, name, dims) declares `__shared__ T name dims` (on the emulator an
// array reference into its poisoned shared arena; a plain __shared__ does not compile there), e.g.
//   NFT_SHARED(float, sh, [8][32]);   // T must be one token: use an alias for a template type
// No dynamic shared memory (the launch passes 0 bytes).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#if defined(NFT_CUDA_EMU)

#include "../testing/cuda_emu/cuda_emu.h"

// Runs the whole grid synchronously on the calling thread; a launch with an invalid
// configuration sets the error NFT_CHECK_LAUNCH reports, a failing kernel throws.
#define NFT_LAUNCH(kernel, grid, block, stream, ...) \
  ::nft_emu::launcher(#kernel, (kernel), (grid), (block), (stream))(__VA_ARGS__)

#elif defined(__CUDACC__)

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math_constants.h>  // CUDART_INF_F & co. (the emulator defines them too)

#define NFT_LAUNCH(kernel, grid, block, stream, ...) \
  kernel<<<(grid), (block), 0, reinterpret_cast<cudaStream_t>(stream)>>>(__VA_ARGS__)
#define NFT_SHARED(T, name, dims) __shared__ T name dims

#else
#error "csrc/cuda/*.cu: compile with nvcc, or as C++ with -DNFT_CUDA_EMU (the CPU emulator)"
#endif

// A vector access (float4, a 16-byte Pack) at p needs p aligned to its size: a GPU faults with
// "misaligned address", the emulator's CPU would not, so the emulator traps. No code on the GPU.
#if defined(NFT_CUDA_EMU)
#define NFT_CHECK_ALIGNED(p, bytes) ::nft_emu::detail::check_aligned((const void*)(p), (bytes), __FILE__, __LINE__)
#else
#define NFT_CHECK_ALIGNED(p, bytes) ((void)0)
#endif

// Throws std::runtime_error("<what>: <CUDA error string>") when the last launch failed.
#define NFT_CHECK_LAUNCH(what)                                                                 \
  do {                                                                                         \
    const cudaError_t nft_launch_err_ = cudaGetLastError();                                    \
    if (nft_launch_err_ != cudaSuccess)                                                        \
      throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(nft_launch_err_)); \
  } while (0)
