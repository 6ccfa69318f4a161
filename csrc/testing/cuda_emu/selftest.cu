// Self-test kernels of the CUDA emulator (tests/cuda_emu/test_emulator.py). Kept out of csrc/cuda/,
// so only nft_fast._cuda_emu compiles them (never the real CUDA build), but valid CUDA all the
// same: `nvcc -c -arch=sm_80 csrc/testing/cuda_emu/selftest.cu` compiles it.
#include <cstdint>

#include "../../cuda/compat.h"
#include "selftest.h"

namespace nft_fast {
namespace emu_selftest {
namespace {

constexpr unsigned kFull = 0xffffffffu;

__global__ void __launch_bounds__(1024) block_sum_kernel(const float* __restrict__ x, float* __restrict__ out, int n) {
  NFT_SHARED(float, s, [1024]);
  const int t = threadIdx.x + threadIdx.y * blockDim.x;
  const int nt = blockDim.x * blockDim.y;
  float acc = 0.0f;
  for (int i = blockIdx.x * nt + t; i < n; i += gridDim.x * nt) acc += x[i];
  s[t] = acc;
  __syncthreads();
  for (int h = nt / 2; h > 0; h >>= 1) {
    if (t < h) s[t] += s[t + h];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = s[0];
}

template <typename T>
__global__ void shfl_probe_kernel(const T* __restrict__ x, T* __restrict__ out, int mode, int arg, int width) {
  const T v = x[threadIdx.x];
  T r;
  switch (mode) {
    case 0: r = __shfl_sync(kFull, v, arg, width); break;
    case 1: r = __shfl_up_sync(kFull, v, (unsigned)arg, width); break;
    case 2: r = __shfl_down_sync(kFull, v, (unsigned)arg, width); break;
    default: r = __shfl_xor_sync(kFull, v, arg, width); break;
  }
  out[threadIdx.x] = r;
}

__global__ void warp_sums_kernel(const float* __restrict__ x, float* __restrict__ out_xor,
                                 float* __restrict__ out_down, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const float v = i < n ? x[i] : 0.0f;
  float a = v, b = v;
  for (int o = warpSize / 2; o > 0; o >>= 1) {
    a += __shfl_xor_sync(kFull, a, o);
    b += __shfl_down_sync(kFull, b, o);
  }
  out_xor[i] = a;
  if ((threadIdx.x & 31) == 0) out_down[i / 32] = b;
}

__global__ void votes_kernel(const int* __restrict__ pred, unsigned* __restrict__ ballot, int* __restrict__ all,
                             int* __restrict__ any, int* __restrict__ red, int* __restrict__ bcount,
                             int* __restrict__ band, int* __restrict__ bor) {
  const int t = threadIdx.x;
  const int p = pred[t];
  __syncwarp();
  ballot[t] = __ballot_sync(kFull, p);
  all[t] = __all_sync(kFull, p);
  any[t] = __any_sync(kFull, p);
  red[t] = __reduce_add_sync(kFull, p);
  bcount[t] = __syncthreads_count(p);
  band[t] = __syncthreads_and(p);
  bor[t] = __syncthreads_or(p);
}

__global__ void half_masks_kernel(const int* __restrict__ x, int* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const unsigned m = lane < 16 ? 0x0000ffffu : 0xffff0000u;
  int v = x[threadIdx.x];
  v += __shfl_xor_sync(m, v, 1);
  out[threadIdx.x] = v + __shfl_sync(m, v, lane < 16 ? 0 : 16);
}

__global__ void atomics_kernel(const float* __restrict__ x, int n, float* fsum, int* icount, int* imax,
                               unsigned long long* usum, double* dsum) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    atomicAdd(fsum, x[i]);
    atomicAdd(icount, 1);
    atomicMax(imax, (int)x[i]);
    atomicAdd(usum, (unsigned long long)x[i]);
    atomicAdd(dsum, (double)x[i]);
  }
}

__global__ void bf16_kernel(const float* __restrict__ x, std::uint16_t* __restrict__ bits, float* __restrict__ back,
                            std::uint16_t* __restrict__ bits2, float* __restrict__ back2, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    const __nv_bfloat16 b = __float2bfloat16(x[i]);
    const __nv_bfloat16 c = __float2bfloat16_rn(x[i]);
    bits[i] = __bfloat16_as_ushort(b) == __bfloat16_as_ushort(c) ? __bfloat16_as_ushort(b) : (std::uint16_t)0xdead;
    back[i] = __bfloat162float(b);
    if ((i & 1) == 0 && i + 1 < n) {
      const __nv_bfloat162 p = __floats2bfloat162_rn(x[i], x[i + 1]);
      const float2 f = __bfloat1622float2(p);
      bits2[i] = __bfloat16_as_ushort(p.x);
      bits2[i + 1] = __bfloat16_as_ushort(p.y);
      back2[i] = f.x;
      back2[i + 1] = f.y;
    }
  }
}

__global__ void barrier_kernel(float* __restrict__ out, int barriers) {
  NFT_SHARED(float, s, [1024]);
  const int t = threadIdx.x, nt = blockDim.x;
  float v = (float)t;
  for (int r = 0; r < barriers; ++r) {
    if ((r & 1) == 0)
      s[t] = v;
    else
      v += s[(t + 1) % nt];
    __syncthreads();
  }
  out[blockIdx.x * nt + t] = v;
}

template <typename T, int K>
__global__ void axpy_kernel(T* __restrict__ y, const T* __restrict__ x, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) y[i] += T(K) * x[i];
}
template <typename T>
__global__ void add_kernel(T* __restrict__ y, const T* __restrict__ x, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) y[i] += x[i];
}

__global__ void noop_kernel(int) {}

// A little of everything else the emulated surface offers (also a compile check under nvcc).
__global__ void math_kernel(const float* __restrict__ in, float* __restrict__ out) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  const float a = in[0], c = in[1];
  out[0] = fmaf(a, a, c);                     // one rounding
  out[1] = __fmaf_rn(a, a, c);
  out[2] = __fadd_rn(__fmul_rn(a, a), c);     // two roundings
  out[3] = rsqrtf(4.0f) + __expf(0.0f) + __fdividef(1.0f, 4.0f) + sqrtf(9.0f) + fabsf(-1.0f);
  out[4] = CUDART_INF_F;
  out[5] = (float)isfinite(CUDART_INF_F) + 2.0f * (float)isfinite(1.0f);
  out[6] = max(2.0f, 3.0f) + (float)min(2, -3) + fminf(1.0f, CUDART_NAN_F);
  const float4 v = __ldg(reinterpret_cast<const float4*>(in) + 1);
  const float2 w = make_float2(v.x + v.y, v.z + v.w);
  out[7] = w.x + w.y;
  out[8] = __bfloat162float(__float2bfloat16(1.00390625f)) + __bfloat162float(__float2bfloat16_rn(1.01171875f));
  out[9] = (float)(__popc(0xf0f0u) + __ffs(8) + __clz(1));
  out[10] = __int_as_float(__float_as_int(2.5f));
  __nv_bfloat16 h = __float2bfloat16(1.5f);
  h = h * __float2bfloat16(2.0f) + __float2bfloat16(0.25f);
  out[11] = __bfloat162float(h);
  out[12] = (float)__popc(__activemask());  // convergence is not modelled: lanes alive (1..32)
}

__global__ void deadlock_kernel(float* out) {
  float v = (float)threadIdx.x;
  if ((threadIdx.x & 31) == 0)
    __syncthreads();
  else
    v = __shfl_xor_sync(kFull, v, 1);
  out[threadIdx.x] = v;
}

__global__ void shfl_after_exit_kernel(const float* __restrict__ x, float* __restrict__ out, int n) {
  const int i = threadIdx.x;
  if (i >= n) return;
  float v = x[i];
  v += __shfl_xor_sync(kFull, v, 1);
  out[i] = v;
}

__global__ void divergent_sync_kernel(float* out) {
  NFT_SHARED(float, s, [1024]);
  const int t = threadIdx.x;
  if (t < 16) {
    s[t] = 1.0f;
    __syncthreads();
  } else {
    s[t] = 2.0f;
    __syncthreads();
  }
  out[t] = s[blockDim.x - 1 - t];
}

__global__ void trap_kernel_impl(int who) {
  if ((int)threadIdx.x == who) __trap();
}

// Deliberately racy: thread t writes s[t] and, with no barrier, reads its neighbour's slot; the
// result depends on which thread ran first (the emulator's schedule; on a GPU, on timing).
__global__ void racy_neighbour_kernel(const float* __restrict__ x, float* __restrict__ out) {
  NFT_SHARED(float, s, [1024]);
  const int t = threadIdx.x;
  s[t] = x[blockIdx.x * blockDim.x + t];
  out[blockIdx.x * blockDim.x + t] = s[(t + 1) % blockDim.x];  // missing __syncthreads()
}

// Reads shared memory nobody in the block wrote: undefined on a GPU, poison on the emulator. A
// template, as the masked-BN reductions: their shared arrays once escaped the poison.
template <typename T>
__global__ void uninit_shared_kernel(T* __restrict__ out) {
  NFT_SHARED(T, s, [1024]);
  const int t = threadIdx.x;
  if (t % 2 == 0) s[t] = T(1);
  __syncthreads();
  out[blockIdx.x * blockDim.x + t] = s[t | 1];  // odd slots: never written
}

// Reads one element past the end of x (thread 0): an AddressSanitizer build of the emulator
// must report it (tests/tools/test_asan.py).
__global__ void oob_read_kernel(const float* __restrict__ x, int n, float* __restrict__ out) {
  if (threadIdx.x == 0) out[0] = x[n];
}

// out[t] = x[off + 4t .. off + 4t + 3] summed, through float4 loads: needs x + off 16-byte aligned.
__global__ void vec_load_kernel(const float* __restrict__ x, int off, float* __restrict__ out) {
  const float* p = x + off + 4 * threadIdx.x;
  NFT_CHECK_ALIGNED(p, sizeof(float4));
  const float4 v = *reinterpret_cast<const float4*>(p);
  out[threadIdx.x] = v.x + v.y + v.z + v.w;
}

// Cross-block race on global memory: every block writes its id to *last.
__global__ void last_block_kernel(int* __restrict__ last) {
  if (threadIdx.x == 0) *last = (int)blockIdx.x;
}

// Lane t writes s[t], then reads lane t ^ 1's slot: ordered by the __syncwarp when `sync`, else a
// race (the race checker's warp-level case, tests/cuda_emu/test_racecheck.py).
__global__ void warp_handoff_kernel(const float* __restrict__ x, float* __restrict__ out, int sync) {
  NFT_SHARED(float, s, [32]);
  const int t = threadIdx.x;
  s[t] = x[t];
  if (sync) __syncwarp();
  out[t] = s[t ^ 1];
}

// Every thread atomicAdds 1 to *p; with `plain`, thread 0 stores to it instead: atomics are ordered
// only among themselves, so the store races with them.
__global__ void atomic_vs_plain_kernel(int* p, int plain) {
  if (plain && threadIdx.x == 0)
    *p = 7;
  else
    atomicAdd(p, 1);
}

}  // namespace

void block_sum(const float* x, float* out, int n, int blocks, int bx, int by) {
  NFT_LAUNCH(block_sum_kernel, blocks, dim3(bx, by), 0, x, out, n);
  NFT_CHECK_LAUNCH("block_sum");
}

void shfl_probe(const void* x, void* out, bool is64, int threads, int mode, int arg, int width) {
  if (is64)
    NFT_LAUNCH(shfl_probe_kernel<double>, 1, threads, 0, static_cast<const double*>(x), static_cast<double*>(out),
               mode, arg, width);
  else
    NFT_LAUNCH(shfl_probe_kernel<int>, 1, threads, 0, static_cast<const int*>(x), static_cast<int*>(out), mode, arg,
               width);
  NFT_CHECK_LAUNCH("shfl_probe");
}

void warp_sums(const float* x, float* out_xor, float* out_down, int n, int blocks, int threads) {
  NFT_LAUNCH(warp_sums_kernel, blocks, threads, 0, x, out_xor, out_down, n);
  NFT_CHECK_LAUNCH("warp_sums");
}

void votes(const int* pred, unsigned* ballot, int* all, int* any, int* red, int* bcount, int* band, int* bor,
           int threads) {
  NFT_LAUNCH(votes_kernel, 1, threads, 0, pred, ballot, all, any, red, bcount, band, bor);
  NFT_CHECK_LAUNCH("votes");
}

void half_masks(const int* x, int* out, int threads) {
  NFT_LAUNCH(half_masks_kernel, 1, threads, 0, x, out);
  NFT_CHECK_LAUNCH("half_masks");
}

void atomics(const float* x, int n, float* fsum, int* icount, int* imax, unsigned long long* usum, double* dsum,
             int blocks, int threads) {
  NFT_LAUNCH(atomics_kernel, blocks, threads, 0, x, n, fsum, icount, imax, usum, dsum);
  NFT_CHECK_LAUNCH("atomics");
}

void bf16_roundtrip(const float* x, std::uint16_t* bits, float* back, std::uint16_t* bits2, float* back2, int n) {
  NFT_LAUNCH(bf16_kernel, 7, 96, 0, x, bits, back, bits2, back2, n);
  NFT_CHECK_LAUNCH("bf16_roundtrip");
}

void barrier_bench(float* out, int blocks, int threads, int barriers) {
  NFT_LAUNCH(barrier_kernel, blocks, threads, 0, out, barriers);
  NFT_CHECK_LAUNCH("barrier_bench");
}

void template_launches(float* y, const float* x, int n) {
  const std::uintptr_t stream = 0;
  NFT_LAUNCH((axpy_kernel<float, 3>), 3, 64, stream, y, x, n);
  NFT_CHECK_LAUNCH("axpy<float, 3>");
  auto k = &axpy_kernel<float, 2>;
  NFT_LAUNCH(k, dim3(2), dim3(32), stream, y, x, n);
  NFT_CHECK_LAUNCH("axpy<float, 2>");
  NFT_LAUNCH(add_kernel<float>, 1, 128, stream, y, x, n);
  NFT_CHECK_LAUNCH("add<float>");
}

void math(const float* in, float* out) {
  NFT_LAUNCH(math_kernel, 1, 32, 0, in, out);
  NFT_CHECK_LAUNCH("math");
}

void config_launch(int blocks, int threads) {
  NFT_LAUNCH(noop_kernel, blocks, threads, 0, 0);
  NFT_CHECK_LAUNCH("config_launch");
}

void deadlock_shfl_vs_sync(float* out, int threads) {
  NFT_LAUNCH(deadlock_kernel, 1, threads, 0, out);
  NFT_CHECK_LAUNCH("deadlock_shfl_vs_sync");
}

void shfl_after_exit(const float* x, float* out, int n, int threads) {
  NFT_LAUNCH(shfl_after_exit_kernel, 1, threads, 0, x, out, n);
  NFT_CHECK_LAUNCH("shfl_after_exit");
}

void divergent_sync(float* out, int threads) {
  NFT_LAUNCH(divergent_sync_kernel, 1, threads, 0, out);
  NFT_CHECK_LAUNCH("divergent_sync");
}

void racy_neighbour(const float* x, float* out, int blocks, int threads) {
  NFT_LAUNCH(racy_neighbour_kernel, blocks, threads, 0, x, out);
  NFT_CHECK_LAUNCH("racy_neighbour");
}

void uninit_shared(float* out, int blocks, int threads) {
  NFT_LAUNCH(uninit_shared_kernel<float>, blocks, threads, 0, out);
  NFT_CHECK_LAUNCH("uninit_shared");
}

void oob_read(const float* x, int n, float* out) {
  NFT_LAUNCH(oob_read_kernel, 1, 32, 0, x, n, out);
  NFT_CHECK_LAUNCH("oob_read");
}

void vec_load(const float* x, int off, float* out, int threads) {
  NFT_LAUNCH(vec_load_kernel, 1, threads, 0, x, off, out);
  NFT_CHECK_LAUNCH("vec_load");
}

void last_block(int* last, int blocks) {
  NFT_LAUNCH(last_block_kernel, blocks, 32, 0, last);
  NFT_CHECK_LAUNCH("last_block");
}

void warp_handoff(const float* x, float* out, bool sync) {
  NFT_LAUNCH(warp_handoff_kernel, 1, 32, 0, x, out, sync ? 1 : 0);
  NFT_CHECK_LAUNCH("warp_handoff");
}

void atomic_vs_plain(int* p, int threads, bool plain) {
  NFT_LAUNCH(atomic_vs_plain_kernel, 1, threads, 0, p, plain ? 1 : 0);
  NFT_CHECK_LAUNCH("atomic_vs_plain");
}

void trap_kernel(int threads) {
  NFT_LAUNCH(trap_kernel_impl, 1, threads, 0, 5);
  NFT_CHECK_LAUNCH("trap_kernel");
}

}  // namespace emu_selftest
}  // namespace nft_fast
