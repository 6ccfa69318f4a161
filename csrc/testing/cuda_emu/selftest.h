// Launchers of the CUDA emulator's self-test kernels (selftest.cu), bound in
// nft_fast._cuda_emu only and exercised by tests/cuda_emu/test_emulator.py. All run on stream 0.
#pragma once
#include <cstdint>

namespace nft_fast {
namespace emu_selftest {
// Per-block sums: grid-stride partial sums, then a shared-memory tree (__syncthreads); bx*by a power of 2.
void block_sum(const float* x, float* out, int n, int blocks, int bx, int by);
// out[t] = shuffle of x[t] in a `threads`-thread block: mode 0 __shfl_sync(arg), 1 up, 2 down,
// 3 xor; 64-bit (double) values when is64, else int.
void shfl_probe(const void* x, void* out, bool is64, int threads, int mode, int arg, int width);
// Warp sums: out_xor[i] = xor-butterfly total of i's warp, out_down[warp] = shfl_down total.
void warp_sums(const float* x, float* out_xor, float* out_down, int n, int blocks, int threads);
// Votes of one block: per thread ballot/all/any/__reduce_add_sync of pred, and
// __syncthreads_count/and/or of pred.
void votes(const int* pred, unsigned* ballot, int* all, int* any, int* red, int* bcount, int* band, int* bor,
           int threads);
// Lanes 0-15 and 16-31 of each warp shuffle under their own half-warp masks.
void half_masks(const int* x, int* out, int threads);
void atomics(const float* x, int n, float* fsum, int* icount, int* imax, unsigned long long* usum, double* dsum,
             int blocks, int threads);
// bits[i] / back[i]: __float2bfloat16(x[i]) and back to float; bits2: the same through
// __floats2bfloat162_rn / __bfloat1622float2 pairs (n even); back2 the pair's floats.
void bf16_roundtrip(const float* x, std::uint16_t* bits, float* back, std::uint16_t* bits2, float* back2, int n);
// `barriers` __syncthreads per block; out[b * threads + t]: v_t <- v_t + v_{t+1 mod threads}, once per 2.
void barrier_bench(float* out, int blocks, int threads, int barriers);
// y += 3 x (parenthesised template), 2 x (pointer alias), 1 x (one-argument template-id).
void template_launches(float* y, const float* x, int n);
// Math intrinsics, vector loads, bf16 ops on in[0..7] (see math_kernel) into out[0..12].
void math(const float* in, float* out);
// A launch with this configuration, then NFT_CHECK_LAUNCH (throws on an invalid one).
void config_launch(int blocks, int threads);
// Deliberately broken kernels: each must raise, never hang.
void deadlock_shfl_vs_sync(float* out, int threads);  // lane 0 at __syncthreads, lanes 1-31 at a shuffle
void shfl_after_exit(const float* x, float* out, int n, int threads);  // full-mask shuffle after `if (i >= n) return`
void divergent_sync(float* out, int threads);  // two different __syncthreads statements
void trap_kernel(int threads);                 // __trap() in thread 5
// Deliberately racy or undefined kernels: results that depend on the schedule / show the poison.
void racy_neighbour(const float* x, float* out, int blocks, int threads);  // s[t] = x; out = s[t+1], no barrier
void uninit_shared(float* out, int blocks, int threads);  // out[t] = s[t | 1], odd slots never written
void last_block(int* last, int blocks);  // every block writes its index to *last
void warp_handoff(const float* x, float* out, bool sync);  // out[t] = s[t ^ 1] after s[t] = x[t], __syncwarp if sync
void atomic_vs_plain(int* p, int threads, bool plain);  // atomicAdd(p, 1); with plain, thread 0 stores instead
// Memory errors (tests/tools/test_asan.py) and alignment traps.
void oob_read(const float* x, int n, float* out);                 // out[0] = x[n]: one past the end
void vec_load(const float* x, int off, float* out, int threads);  // float4 loads at x + off: off % 4 == 0
}  // namespace emu_selftest
}  // namespace nft_fast
