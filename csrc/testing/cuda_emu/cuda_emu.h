// CPU emulator of the CUDA surface our kernels use, so csrc/cuda/*.cu compile as plain C++
// (-DNFT_CUDA_EMU, included through csrc/cuda/compat.h) into nft_fast._cuda_emu and run on
// the CPU in CI, where there is no GPU.
//
// Execution model (cuda_emu.cpp): a launch runs synchronously on the calling thread,
// one block after another; inside a block every CUDA thread is a fiber with its own stack, and
// a round-robin scheduler resumes a fiber only once the barrier it waits on is complete:
//   __syncthreads*   every not-yet-exited thread of the block arrived (all at the same
//                    __syncthreads statement, else "divergent __syncthreads" is raised);
//   warp ops         (__shfl*_sync, __syncwarp, votes, __reduce_*_sync) every lane named in the
//                    mask that exists (a partial last warp has fewer lanes) arrived at a warp op
//                    with the same mask and kind; an exited lane never arrives.
// A pass in which no fiber can run raises "emulated kernel deadlock: ..." (no hang).
// Launches are serialised process-wide, so shared memory is one static arena and atomics are
// plain read-modify-writes (a fiber is never switched inside one).
//
// Race and init checks (what a GPU does differently from one fixed serial order):
//   schedule         set_schedule("forward" | "reverse" | "random", seed), or the environment
//                    variable NFT_FAST_CUDA_EMU_SCHEDULE=forward|reverse|random[:seed], sets the
//                    order in which blocks run and in which each pass resumes the block's runnable
//                    fibers (random: a fresh permutation per pass, from seed and launch number).
//                    A deterministic kernel gives bit-identical results under every schedule; one
//                    whose result changes has a race (a read and a write, or two writes, of one
//                    address between two barriers, in different threads or blocks).
//   shared memory    NFT_SHARED(T, name, dims) (csrc/cuda/compat.h) places each shared variable in
//                    one arena, and every variable a launch uses is filled with poison at the start
//                    of every block (0xff bytes: NaN / -1; random bytes under the random schedule),
//                    as a GPU gives a block undefined shared memory: a read before the block wrote
//                    it shows up in the result. A plain __shared__ declaration does not compile
//                    here: GCC silently drops a section attribute on a static local of a function
//                    template (which is how the emulator once found them), so the masked-BN
//                    reductions' shared arrays went unpoisoned.
//   racecheck        builds with the race checker (CMake NFT_FAST_CUDA_EMU_RACECHECK=ON; see
//                    cuda_emu.cpp) report the first unordered pair of accesses to one byte, at
//                    least one a write, in a launch with both source lines, whether or not it
//                    changed the result: set_racecheck(true) or NFT_FAST_CUDA_EMU_RACECHECK=1.
//
// Not emulated: dynamic (extern) shared memory, cooperative groups, clusters, inter-block
// synchronisation or spin-waits on memory another thread of the block writes (the spinning
// fiber never yields), interleavings finer than one barrier interval (only the race checker,
// not a run, sees a race there), the GPU memory model beyond barrier order,
// timing, nvcc's FMA contraction and --use_fast_math approximations/flush-to-zero (the module
// builds with -ffp-contract=off: only written fmaf/__fmaf_rn fuse).
#pragma once

#ifndef NFT_CUDA_EMU
#error "cuda_emu.h is the CPU emulator of CUDA: include csrc/cuda/compat.h with -DNFT_CUDA_EMU"
#endif

#include <math.h>

#include <cfloat>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <type_traits>
#include <utility>

// ------------------------------------------------------------------------------ qualifiers
#define __global__
#define __device__
#define __host__
#define __constant__
#define __managed__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __align__(n) alignas(n)
// Shared memory is declared with NFT_SHARED (below); a plain __shared__ is a compile error.
#define __shared__                                                                                         \
  static_assert(false, "__shared__ T name[n]; -> NFT_SHARED(T, name, [n]); (csrc/cuda/compat.h): the CUDA " \
                       "emulator poisons shared memory it can find, and GCC hides template statics");
// __restrict__ is a GNU C++ keyword already.

// ------------------------------------------------------------------------- vector types
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

#define NFT_EMU_VEC2(T, N, A)                                        \
  struct alignas(A) N {                                              \
    T x, y;                                                          \
  };                                                                 \
  inline N make_##N(T x, T y) { return N{x, y}; }
#define NFT_EMU_VEC3(T, N)                                           \
  struct N {                                                         \
    T x, y, z;                                                       \
  };                                                                 \
  inline N make_##N(T x, T y, T z) { return N{x, y, z}; }
#define NFT_EMU_VEC4(T, N, A)                                        \
  struct alignas(A) N {                                              \
    T x, y, z, w;                                                    \
  };                                                                 \
  inline N make_##N(T x, T y, T z, T w) { return N{x, y, z, w}; }

NFT_EMU_VEC2(short, short2, 4)
NFT_EMU_VEC2(unsigned short, ushort2, 4)
NFT_EMU_VEC2(int, int2, 8)
NFT_EMU_VEC2(unsigned int, uint2, 8)
NFT_EMU_VEC2(float, float2, 8)
NFT_EMU_VEC2(double, double2, 16)
NFT_EMU_VEC2(long long, longlong2, 16)
NFT_EMU_VEC2(unsigned long long, ulonglong2, 16)
NFT_EMU_VEC3(int, int3)
NFT_EMU_VEC3(float, float3)
NFT_EMU_VEC4(short, short4, 8)
NFT_EMU_VEC4(unsigned short, ushort4, 8)
NFT_EMU_VEC4(int, int4, 16)
NFT_EMU_VEC4(unsigned int, uint4, 16)
NFT_EMU_VEC4(float, float4, 16)
inline uint3 make_uint3(unsigned int x, unsigned int y, unsigned int z) { return uint3{x, y, z}; }
#undef NFT_EMU_VEC2
#undef NFT_EMU_VEC3
#undef NFT_EMU_VEC4

// -------------------------------------------------------------- built-in thread variables
// Set by the scheduler before it resumes a fiber (cuda_emu.cpp).
extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;
extern const int warpSize;  // 32; not a constant expression, as on the GPU

// ------------------------------------------------------------------------------ runtime
namespace nft_emu {
namespace detail {
enum WarpKind : int { kShfl = 0, kBallot, kAll, kAny, kSyncWarp, kRedAdd, kRedMin, kRedMax, kRedAnd, kRedOr, kRedXor };
enum BlockKind : int { kSync = 0, kCount, kAnd, kOr };
// Block barrier; returns the __syncthreads_{count,and,or} result (0 for plain).
int block_barrier(int kind, int pred, const char* file, int line);
// Warp op: deposits `size` bytes at `in`, waits for the lanes of `mask`, writes the result to
// `out`: for kShfl the value of lane `src` (own value when src does not take part/exist).
void warp_op(int kind, unsigned mask, int src, const void* in, void* out, int size, bool is_signed);
int lane_id();                 // linear thread index % 32
unsigned active_lanes();       // lanes of this warp that exist and have not exited
[[noreturn]] void trap(const char* what);
void run_kernel(const char* name, dim3 grid, dim3 block, void (*body)(void*), void* ctx);
void set_last_error(int err);
const char* switch_backend();      // "asm-x86_64" or "ucontext"
unsigned long long launch_count();  // launches run so far (valid configurations)
// Block and fiber order of later launches: "forward" (the default), "reverse" or "random"
// (seeded); throws std::invalid_argument on another name. schedule() names the current one.
void set_schedule(const char* kind, unsigned long long seed);
const char* schedule();
unsigned long long schedule_seed();
// Shared memory: a variable's place in the arena (set at its first use ever) and the launch
// that last used it. Constant-initialised, so a static one in a kernel template needs no guard.
struct SharedSlot {
  std::size_t offset = 0, size = 0;
  bool placed = false;
  unsigned long long launch = 0;
};
// The variable's memory; poisoned at its first use in a launch and at every later block start.
void* shared_slot(SharedSlot* slot, std::size_t size, std::size_t align);
// Race checker (racecheck builds only, see above): whether this build has it, on/off for later
// launches (throws std::logic_error where unavailable), and the hook the atomics report to.
bool racecheck_available();
void set_racecheck(bool on);
bool racecheck();
void racecheck_atomic(const void* addr, int size, const void* pc);
}  // namespace detail

// NFT_SHARED(T, name, dims): `T name dims` in block shared memory (one copy per block: blocks
// run one at a time). `name` is a reference to the array; every thread evaluates it.
#define NFT_SHARED(T, name, dims)                                                                     \
  using nft_shared_##name##_type = T dims;                                                            \
  static ::nft_emu::detail::SharedSlot nft_shared_##name##_slot;                                     \
  nft_shared_##name##_type& name = *static_cast<nft_shared_##name##_type*>(::nft_emu::detail::shared_slot( \
      &nft_shared_##name##_slot, sizeof(nft_shared_##name##_type), alignof(nft_shared_##name##_type)))

template <typename... P>
struct Launcher {
  const char* name;
  void (*kernel)(P...);
  dim3 grid, block;
  template <typename... A>
  void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "NFT_LAUNCH: argument count differs from the kernel's parameters");
    void (*k)(P...) = kernel;
    // Every CUDA thread gets its own copies of the arguments, converted as in a call.
    auto call = [&]() { k(args...); };
    using Call = decltype(call);
    detail::run_kernel(name, grid, block, [](void* c) { (*static_cast<Call*>(c))(); }, &call);
  }
};

template <typename... P, typename S>
Launcher<P...> launcher(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, const S&) {
  return Launcher<P...>{name, kernel, grid, block};
}
}  // namespace nft_emu

// --------------------------------------------------------------------- synchronisation
#define __syncthreads() ((void)::nft_emu::detail::block_barrier(::nft_emu::detail::kSync, 0, __FILE__, __LINE__))
#define __syncthreads_count(pred) \
  ::nft_emu::detail::block_barrier(::nft_emu::detail::kCount, (pred) ? 1 : 0, __FILE__, __LINE__)
#define __syncthreads_and(pred) \
  ::nft_emu::detail::block_barrier(::nft_emu::detail::kAnd, (pred) ? 1 : 0, __FILE__, __LINE__)
#define __syncthreads_or(pred) \
  ::nft_emu::detail::block_barrier(::nft_emu::detail::kOr, (pred) ? 1 : 0, __FILE__, __LINE__)

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::nft_emu::detail::warp_op(::nft_emu::detail::kSyncWarp, mask, 0, nullptr, nullptr, 0, false);
}
inline void __threadfence() { __asm__ __volatile__("" ::: "memory"); }
inline void __threadfence_block() { __asm__ __volatile__("" ::: "memory"); }
inline void __threadfence_system() { __asm__ __volatile__("" ::: "memory"); }
// The lanes of this warp that exist and have not exited: convergence is not modelled (a GPU
// reports only the lanes executing this call together).
inline unsigned __activemask() { return ::nft_emu::detail::active_lanes(); }
[[noreturn]] inline void __trap() { ::nft_emu::detail::trap("__trap() called"); }
inline void __nanosleep(unsigned) {}

// ------------------------------------------------------------------------ warp shuffles
namespace nft_emu {
namespace detail {
template <typename T>
inline T shfl_from(unsigned mask, T var, int src) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 16, "shuffled type: trivially copyable, <= 16 bytes");
  T out;
  warp_op(kShfl, mask, src, &var, &out, (int)sizeof(T), false);
  return out;
}
inline int check_width(int width) {
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) trap("shuffle width must be a power of 2 in [1, 32]");
  return width;
}
template <typename T>
inline T reduce(int kind, unsigned mask, T v) {
  static_assert(std::is_integral<T>::value && sizeof(T) == 4, "__reduce_*_sync takes int or unsigned");
  T out;
  warp_op(kind, mask, 0, &v, &out, 4, std::is_signed<T>::value);
  return out;
}
}  // namespace detail
}  // namespace nft_emu

template <typename T>
inline T __shfl_sync(unsigned mask, T var, int srcLane, int width = 32) {
  const int w = ::nft_emu::detail::check_width(width), lane = ::nft_emu::detail::lane_id();
  return ::nft_emu::detail::shfl_from(mask, var, (lane & ~(w - 1)) + (srcLane & (w - 1)));
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  const int w = ::nft_emu::detail::check_width(width), lane = ::nft_emu::detail::lane_id();
  const int d = (int)(delta & 31u);
  const int src = ((lane & (w - 1)) >= d) ? lane - d : lane;
  return ::nft_emu::detail::shfl_from(mask, var, src);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  const int w = ::nft_emu::detail::check_width(width), lane = ::nft_emu::detail::lane_id();
  const int d = (int)(delta & 31u);
  const int src = ((lane & (w - 1)) + d < w) ? lane + d : lane;
  return ::nft_emu::detail::shfl_from(mask, var, src);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = 32) {
  const int w = ::nft_emu::detail::check_width(width), lane = ::nft_emu::detail::lane_id();
  const int src = lane ^ (laneMask & 31);  // later groups of `width` lanes are out of reach: own value
  return ::nft_emu::detail::shfl_from(mask, var, src < (lane & ~(w - 1)) + w ? src : lane);
}

inline unsigned __ballot_sync(unsigned mask, int pred) {
  const int p = pred ? 1 : 0;
  unsigned out;
  ::nft_emu::detail::warp_op(::nft_emu::detail::kBallot, mask, 0, &p, &out, 4, false);
  return out;
}
inline int __all_sync(unsigned mask, int pred) {
  const int p = pred ? 1 : 0;
  int out;
  ::nft_emu::detail::warp_op(::nft_emu::detail::kAll, mask, 0, &p, &out, 4, false);
  return out;
}
inline int __any_sync(unsigned mask, int pred) {
  const int p = pred ? 1 : 0;
  int out;
  ::nft_emu::detail::warp_op(::nft_emu::detail::kAny, mask, 0, &p, &out, 4, false);
  return out;
}
inline unsigned __reduce_add_sync(unsigned mask, unsigned v) { return ::nft_emu::detail::reduce(::nft_emu::detail::kRedAdd, mask, v); }
inline int __reduce_add_sync(unsigned mask, int v) { return ::nft_emu::detail::reduce(::nft_emu::detail::kRedAdd, mask, v); }
inline unsigned __reduce_min_sync(unsigned mask, unsigned v) { return ::nft_emu::detail::reduce(::nft_emu::detail::kRedMin, mask, v); }
inline int __reduce_min_sync(unsigned mask, int v) { return ::nft_emu::detail::reduce(::nft_emu::detail::kRedMin, mask, v); }
inline unsigned __reduce_max_sync(unsigned mask, unsigned v) { return ::nft_emu::detail::reduce(::nft_emu::detail::kRedMax, mask, v); }
inline int __reduce_max_sync(unsigned mask, int v) { return ::nft_emu::detail::reduce(::nft_emu::detail::kRedMax, mask, v); }
inline unsigned __reduce_and_sync(unsigned mask, unsigned v) { return ::nft_emu::detail::reduce(::nft_emu::detail::kRedAnd, mask, v); }
inline unsigned __reduce_or_sync(unsigned mask, unsigned v) { return ::nft_emu::detail::reduce(::nft_emu::detail::kRedOr, mask, v); }
inline unsigned __reduce_xor_sync(unsigned mask, unsigned v) { return ::nft_emu::detail::reduce(::nft_emu::detail::kRedXor, mask, v); }

// ------------------------------------------------------------------------- alignment
namespace nft_emu {
namespace detail {
// NFT_CHECK_ALIGNED (compat.h): what a GPU's vector load/store would fault on.
inline void check_aligned(const void* p, std::size_t bytes, const char* file, int line) {
  if (reinterpret_cast<std::uintptr_t>(p) % bytes == 0) return;
  char msg[256];
  std::snprintf(msg, sizeof msg, "misaligned address: a %zu-byte vector access at %p (%s:%d)", bytes, p, file, line);
  trap(msg);
}
}  // namespace detail
}  // namespace nft_emu

// ----------------------------------------------------------------------- bit reinterprets
namespace nft_emu {
namespace detail {
template <typename To, typename From>
inline To bits(From v) {
  static_assert(sizeof(To) == sizeof(From), "size mismatch");
  To t;
  std::memcpy(&t, &v, sizeof(To));
  return t;
}
}  // namespace detail
}  // namespace nft_emu
inline int __float_as_int(float x) { return ::nft_emu::detail::bits<int>(x); }
inline unsigned __float_as_uint(float x) { return ::nft_emu::detail::bits<unsigned>(x); }
inline float __int_as_float(int x) { return ::nft_emu::detail::bits<float>(x); }
inline float __int_as_float(unsigned x) { return ::nft_emu::detail::bits<float>(x); }
inline float __uint_as_float(unsigned x) { return ::nft_emu::detail::bits<float>(x); }
inline long long __double_as_longlong(double x) { return ::nft_emu::detail::bits<long long>(x); }
inline double __longlong_as_double(long long x) { return ::nft_emu::detail::bits<double>(x); }
inline double __longlong_as_double(unsigned long long x) { return ::nft_emu::detail::bits<double>(x); }

// ---------------------------------------------------------------------------------- math
// Correctly rounded IEEE single ops (the GPU's _rn intrinsics); with -ffp-contract=off the
// compiler never fuses them. fmaf is libm's true fused multiply-add, as on the GPU.
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
// The GPU's approximate intrinsics: exact here (the GPU differs by a few ulp).
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float a) { return 1.0f / std::sqrt(a); }
inline double rsqrt(double a) { return 1.0 / std::sqrt(a); }
inline float __saturatef(float a) { return a != a ? 0.0f : (a < 0.0f ? 0.0f : (a > 1.0f ? 1.0f : a)); }
// glibc declares (without exporting) __expf & co.: macros, not redefinitions.
#define __expf(x) (::expf(x))
#define __exp10f(x) (::exp10f(x))
#define __logf(x) (::logf(x))
#define __log2f(x) (::log2f(x))
#define __log10f(x) (::log10f(x))
#define __powf(x, y) (::powf((x), (y)))
#define __sinf(x) (::sinf(x))
#define __cosf(x) (::cosf(x))
#define __tanf(x) (::tanf(x))

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
  x = ((x >> 8) & 0x00ff00ffu) | ((x & 0x00ff00ffu) << 8);
  return (x >> 16) | (x << 16);
}
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }
inline int __mulhi(int a, int b) { return (int)(((long long)a * b) >> 32); }
inline int __float2int_rn(float x) { return (int)std::nearbyint(x); }
inline int __float2int_rz(float x) { return (int)x; }
inline int __float2int_rd(float x) { return (int)std::floor(x); }
inline int __float2int_ru(float x) { return (int)std::ceil(x); }
inline float __int2float_rn(int x) { return (float)x; }

// CUDA's global min/max overloads.
#define NFT_EMU_MINMAX(T)                         \
  inline T min(T a, T b) { return b < a ? b : a; } \
  inline T max(T a, T b) { return a < b ? b : a; }
NFT_EMU_MINMAX(int)
NFT_EMU_MINMAX(unsigned int)
NFT_EMU_MINMAX(long)
NFT_EMU_MINMAX(unsigned long)
NFT_EMU_MINMAX(long long)
NFT_EMU_MINMAX(unsigned long long)
#undef NFT_EMU_MINMAX
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
inline double min(float a, double b) { return std::fmin((double)a, b); }
inline double max(float a, double b) { return std::fmax((double)a, b); }
inline double min(double a, float b) { return std::fmin(a, (double)b); }
inline double max(double a, float b) { return std::fmax(a, (double)b); }
inline unsigned min(unsigned a, int b) { return min(a, (unsigned)b); }
inline unsigned max(unsigned a, int b) { return max(a, (unsigned)b); }
inline unsigned min(int a, unsigned b) { return min((unsigned)a, b); }
inline unsigned max(int a, unsigned b) { return max((unsigned)a, b); }

// ------------------------------------------------------------------------- memory access
template <typename T>
inline T __ldg(const T* p) { return *p; }
template <typename T>
inline T __ldcg(const T* p) { return *p; }
template <typename T>
inline T __ldcs(const T* p) { return *p; }
template <typename T>
inline T __ldlu(const T* p) { return *p; }
template <typename T>
inline void __stcg(T* p, T v) { *p = v; }
template <typename T>
inline void __stcs(T* p, T v) { *p = v; }
template <typename T>
inline void __stwt(T* p, T v) { *p = v; }

// ------------------------------------------------------------------------------ bfloat16
namespace nft_emu {
namespace detail {
// Exactly cuda_bf16.hpp's host path (= cvt.rn.bf16.f32): round to nearest even, NaN -> 0x7fff.
inline unsigned short f2bf_rn(float f) {
  const unsigned x = bits<unsigned>(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
  const unsigned rem = x << 16;
  unsigned short r = (unsigned short)(x >> 16);
  if (rem > 0x80000000u || (rem == 0x80000000u && (r & 1u))) ++r;
  return r;
}
inline unsigned short f2bf_rz(float f) {
  const unsigned x = bits<unsigned>(f);
  return (x & 0x7fffffffu) > 0x7f800000u ? (unsigned short)0x7fffu : (unsigned short)(x >> 16);
}
// cuda_bf16.hpp's __double2bfloat16: round to float with round-to-odd, then to bf16 (one rounding).
inline unsigned short d2bf_rn(double x) {
  float f = (float)x;
  const double d = (double)f;
  unsigned u = bits<unsigned>(f);
  const bool not_nan = (u << 1) <= 0xff000000u;
  if (x > 0.0 && d > x) u--;
  if (x < 0.0 && d < x) u--;
  if (d != x && not_nan) u |= 1u;
  return f2bf_rn(bits<float>(u));
}
inline float bf2f(unsigned short h) { return bits<float>((unsigned)h << 16); }
}  // namespace detail
}  // namespace nft_emu

struct __nv_bfloat16_raw {
  unsigned short x;
};
struct alignas(2) __nv_bfloat16 {
  unsigned short __x;
  __nv_bfloat16() = default;
  constexpr __nv_bfloat16(const __nv_bfloat16_raw& r) : __x(r.x) {}
  __nv_bfloat16(float f) : __x(::nft_emu::detail::f2bf_rn(f)) {}
  __nv_bfloat16(double f) : __x(::nft_emu::detail::d2bf_rn(f)) {}
  __nv_bfloat16(int v) : __x(::nft_emu::detail::d2bf_rn((double)v)) {}
  __nv_bfloat16(unsigned int v) : __x(::nft_emu::detail::d2bf_rn((double)v)) {}
  __nv_bfloat16(long long v) : __x(::nft_emu::detail::d2bf_rn((double)v)) {}
  __nv_bfloat16(unsigned long long v) : __x(::nft_emu::detail::d2bf_rn((double)v)) {}
  __nv_bfloat16(long v) : __x(::nft_emu::detail::d2bf_rn((double)v)) {}
  __nv_bfloat16(unsigned long v) : __x(::nft_emu::detail::d2bf_rn((double)v)) {}
  operator float() const { return ::nft_emu::detail::bf2f(__x); }
  operator __nv_bfloat16_raw() const { return __nv_bfloat16_raw{__x}; }
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
  __nv_bfloat162() = default;
  constexpr __nv_bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) : x(a), y(b) {}
};
using nv_bfloat16 = __nv_bfloat16;
using nv_bfloat162 = __nv_bfloat162;

inline __nv_bfloat16 __nft_emu_bf(unsigned short b) { return __nv_bfloat16(__nv_bfloat16_raw{b}); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nft_emu_bf(::nft_emu::detail::f2bf_rn(f)); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nft_emu_bf(::nft_emu::detail::f2bf_rn(f)); }
inline __nv_bfloat16 __float2bfloat16_rz(float f) { return __nft_emu_bf(::nft_emu::detail::f2bf_rz(f)); }
inline __nv_bfloat16 __double2bfloat16(double d) { return __nft_emu_bf(::nft_emu::detail::d2bf_rn(d)); }
inline float __bfloat162float(__nv_bfloat16 h) { return ::nft_emu::detail::bf2f(h.__x); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline short __bfloat16_as_short(__nv_bfloat16 h) { return (short)h.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short b) { return __nft_emu_bf(b); }
inline __nv_bfloat16 __short_as_bfloat16(short b) { return __nft_emu_bf((unsigned short)b); }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return __nv_bfloat162(__float2bfloat16_rn(a), __float2bfloat16_rn(b));
}
inline __nv_bfloat162 __float2bfloat162_rn(float a) { return __floats2bfloat162_rn(a, a); }
inline __nv_bfloat162 __float22bfloat162_rn(float2 v) { return __floats2bfloat162_rn(v.x, v.y); }
inline float2 __bfloat1622float2(__nv_bfloat162 v) { return float2{__bfloat162float(v.x), __bfloat162float(v.y)}; }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat162(a, b); }
inline __nv_bfloat162 __bfloat162bfloat162(__nv_bfloat16 a) { return __nv_bfloat162(a, a); }
inline __nv_bfloat16 __low2bfloat16(__nv_bfloat162 v) { return v.x; }
inline __nv_bfloat16 __high2bfloat16(__nv_bfloat162 v) { return v.y; }
inline float __low2float(__nv_bfloat162 v) { return __bfloat162float(v.x); }
inline float __high2float(__nv_bfloat162 v) { return __bfloat162float(v.y); }
// bf16 arithmetic rounds once (as add/mul/fma.rn.bf16 on sm_80+): the double result of two
// bf16 operands is exact or cannot sit on a bf16 rounding tie.
inline __nv_bfloat16 __hadd(__nv_bfloat16 a, __nv_bfloat16 b) { return __double2bfloat16((double)(float)a + (double)(float)b); }
inline __nv_bfloat16 __hsub(__nv_bfloat16 a, __nv_bfloat16 b) { return __double2bfloat16((double)(float)a - (double)(float)b); }
inline __nv_bfloat16 __hmul(__nv_bfloat16 a, __nv_bfloat16 b) { return __double2bfloat16((double)(float)a * (double)(float)b); }
inline __nv_bfloat16 __hdiv(__nv_bfloat16 a, __nv_bfloat16 b) { return __double2bfloat16((double)(float)a / (double)(float)b); }
inline __nv_bfloat16 __hfma(__nv_bfloat16 a, __nv_bfloat16 b, __nv_bfloat16 c) {
  return __double2bfloat16(std::fma((double)(float)a, (double)(float)b, (double)(float)c));
}
inline __nv_bfloat16 __hneg(__nv_bfloat16 a) { return __nft_emu_bf((unsigned short)(a.__x ^ 0x8000u)); }
inline __nv_bfloat16 operator+(const __nv_bfloat16& a, const __nv_bfloat16& b) { return __hadd(a, b); }
inline __nv_bfloat16 operator-(const __nv_bfloat16& a, const __nv_bfloat16& b) { return __hsub(a, b); }
inline __nv_bfloat16 operator*(const __nv_bfloat16& a, const __nv_bfloat16& b) { return __hmul(a, b); }
inline __nv_bfloat16 operator/(const __nv_bfloat16& a, const __nv_bfloat16& b) { return __hdiv(a, b); }
inline __nv_bfloat16 operator-(const __nv_bfloat16& a) { return __hneg(a); }
inline __nv_bfloat16 operator+(const __nv_bfloat16& a) { return a; }
inline __nv_bfloat16& operator+=(__nv_bfloat16& a, const __nv_bfloat16& b) { return a = a + b; }
inline __nv_bfloat16& operator-=(__nv_bfloat16& a, const __nv_bfloat16& b) { return a = a - b; }
inline __nv_bfloat16& operator*=(__nv_bfloat16& a, const __nv_bfloat16& b) { return a = a * b; }
inline __nv_bfloat16& operator/=(__nv_bfloat16& a, const __nv_bfloat16& b) { return a = a / b; }
inline bool operator==(const __nv_bfloat16& a, const __nv_bfloat16& b) { return (float)a == (float)b; }
inline bool operator!=(const __nv_bfloat16& a, const __nv_bfloat16& b) { return (float)a != (float)b; }
inline bool operator<(const __nv_bfloat16& a, const __nv_bfloat16& b) { return (float)a < (float)b; }
inline bool operator<=(const __nv_bfloat16& a, const __nv_bfloat16& b) { return (float)a <= (float)b; }
inline bool operator>(const __nv_bfloat16& a, const __nv_bfloat16& b) { return (float)a > (float)b; }
inline bool operator>=(const __nv_bfloat16& a, const __nv_bfloat16& b) { return (float)a >= (float)b; }

// ------------------------------------------------------------------------------ atomics
// Fibers never switch inside these, and launches are serialised: plain read-modify-writes. In a
// racecheck build they are not instrumented but reported as atomic accesses (which race only
// with plain ones).
#if NFT_EMU_RACECHECK
#define NFT_EMU_ATOMIC_ATTR __attribute__((no_sanitize_thread, noinline))
#define NFT_EMU_ATOMIC_NOTE(a) \
  ::nft_emu::detail::racecheck_atomic((a), (int)sizeof(*(a)), __builtin_return_address(0))
#else
#define NFT_EMU_ATOMIC_ATTR
#define NFT_EMU_ATOMIC_NOTE(a) ((void)0)
#endif
#define NFT_EMU_ATOMIC(NAME, T, EXPR)            \
  NFT_EMU_ATOMIC_ATTR inline T NAME(T* a, T v) { \
    NFT_EMU_ATOMIC_NOTE(a);                      \
    const T old = *a;                            \
    *a = (EXPR);                                 \
    return old;                                  \
  }
NFT_EMU_ATOMIC(atomicAdd, int, old + v)
NFT_EMU_ATOMIC(atomicAdd, unsigned int, old + v)
NFT_EMU_ATOMIC(atomicAdd, unsigned long long, old + v)
NFT_EMU_ATOMIC(atomicAdd, float, old + v)
NFT_EMU_ATOMIC(atomicAdd, double, old + v)
NFT_EMU_ATOMIC(atomicAdd, __nv_bfloat16, old + v)
NFT_EMU_ATOMIC(atomicSub, int, old - v)
NFT_EMU_ATOMIC(atomicSub, unsigned int, old - v)
NFT_EMU_ATOMIC(atomicExch, int, v)
NFT_EMU_ATOMIC(atomicExch, unsigned int, v)
NFT_EMU_ATOMIC(atomicExch, unsigned long long, v)
NFT_EMU_ATOMIC(atomicExch, float, v)
NFT_EMU_ATOMIC(atomicMin, int, v < old ? v : old)
NFT_EMU_ATOMIC(atomicMin, unsigned int, v < old ? v : old)
NFT_EMU_ATOMIC(atomicMin, long long, v < old ? v : old)
NFT_EMU_ATOMIC(atomicMin, unsigned long long, v < old ? v : old)
NFT_EMU_ATOMIC(atomicMax, int, v > old ? v : old)
NFT_EMU_ATOMIC(atomicMax, unsigned int, v > old ? v : old)
NFT_EMU_ATOMIC(atomicMax, long long, v > old ? v : old)
NFT_EMU_ATOMIC(atomicMax, unsigned long long, v > old ? v : old)
NFT_EMU_ATOMIC(atomicAnd, int, old & v)
NFT_EMU_ATOMIC(atomicAnd, unsigned int, old & v)
NFT_EMU_ATOMIC(atomicAnd, unsigned long long, old & v)
NFT_EMU_ATOMIC(atomicOr, int, old | v)
NFT_EMU_ATOMIC(atomicOr, unsigned int, old | v)
NFT_EMU_ATOMIC(atomicOr, unsigned long long, old | v)
NFT_EMU_ATOMIC(atomicXor, int, old ^ v)
NFT_EMU_ATOMIC(atomicXor, unsigned int, old ^ v)
NFT_EMU_ATOMIC(atomicXor, unsigned long long, old ^ v)
NFT_EMU_ATOMIC(atomicInc, unsigned int, old >= v ? 0u : old + 1u)
NFT_EMU_ATOMIC(atomicDec, unsigned int, (old == 0u || old > v) ? v : old - 1u)
#undef NFT_EMU_ATOMIC
NFT_EMU_ATOMIC_ATTR inline float2 atomicAdd(float2* a, float2 v) {
  NFT_EMU_ATOMIC_NOTE(a);
  const float2 old = *a;
  *a = float2{old.x + v.x, old.y + v.y};
  return old;
}
NFT_EMU_ATOMIC_ATTR inline float4 atomicAdd(float4* a, float4 v) {
  NFT_EMU_ATOMIC_NOTE(a);
  const float4 old = *a;
  *a = float4{old.x + v.x, old.y + v.y, old.z + v.z, old.w + v.w};
  return old;
}
#define NFT_EMU_CAS(T)                                     \
  NFT_EMU_ATOMIC_ATTR inline T atomicCAS(T* a, T cmp, T v) { \
    NFT_EMU_ATOMIC_NOTE(a);                                  \
    const T old = *a;                                        \
    if (old == cmp) *a = v;                                  \
    return old;                                              \
  }
NFT_EMU_CAS(int)
NFT_EMU_CAS(unsigned int)
NFT_EMU_CAS(unsigned long long)
NFT_EMU_CAS(unsigned short)
#undef NFT_EMU_CAS

inline long long clock64() {
  static long long t = 0;
  return t += 1;
}

// ------------------------------------------------------------------------- runtime API
typedef struct CUstream_st* cudaStream_t;
enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
typedef enum cudaError cudaError_t;
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4
};
enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMultiProcessorCount = 16,
};
// The emulated device: 4 SMs (kernels that size grids by SM count get small grids),
// 1024 threads and 48 KiB of static shared memory per block, warp size 32.
constexpr int NFT_EMU_SM_COUNT = 4;

cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t err);
const char* cudaGetErrorName(cudaError_t err);
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *v = 1024; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *v = 48 * 1024; return cudaSuccess;
    case cudaDevAttrWarpSize: *v = 32; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *v = NFT_EMU_SM_COUNT; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
// Host-side helpers on (CPU) memory; the stream argument is accepted and ignored.
template <typename S = cudaStream_t>
inline cudaError_t cudaMemsetAsync(void* p, int value, std::size_t n, S = S()) {
  if (n) std::memset(p, value, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemset(void* p, int value, std::size_t n) { return cudaMemsetAsync(p, value, n); }
template <typename S = cudaStream_t>
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, std::size_t n, cudaMemcpyKind, S = S()) {
  if (n) std::memmove(dst, src, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void* dst, const void* src, std::size_t n, cudaMemcpyKind k) {
  return cudaMemcpyAsync(dst, src, n, k);
}
// __constant__ / __device__ variables are plain globals here.
template <typename T>
inline cudaError_t cudaMemcpyToSymbol(const T& symbol, const void* src, std::size_t n, std::size_t offset = 0,
                                      cudaMemcpyKind = cudaMemcpyHostToDevice) {
  if (n) std::memcpy(reinterpret_cast<char*>(const_cast<T*>(&symbol)) + offset, src, n);
  return cudaSuccess;
}
template <typename T, typename S = cudaStream_t>
inline cudaError_t cudaMemcpyToSymbolAsync(const T& symbol, const void* src, std::size_t n, std::size_t offset = 0,
                                           cudaMemcpyKind k = cudaMemcpyHostToDevice, S = S()) {
  return cudaMemcpyToSymbol(symbol, src, n, offset, k);
}

// ---------------------------------------------------------------------- math_constants.h
#define CUDART_INF_F __int_as_float(0x7f800000U)
#define CUDART_NAN_F __int_as_float(0x7fffffffU)
#define CUDART_MIN_DENORM_F __int_as_float(0x00000001U)
#define CUDART_MAX_NORMAL_F __int_as_float(0x7f7fffffU)
#define CUDART_NEG_ZERO_F __int_as_float(0x80000000U)
#define CUDART_ZERO_F 0.0F
#define CUDART_ONE_F 1.0F
#define CUDART_PI_F 3.141592654F
#define CUDART_L2E_F 1.442695041F
#define CUDART_LN2_F 0.693147181F
#define CUDART_SQRT_HALF_F 0.707106781F
#define CUDART_SQRT_2_OVER_PI_F 0.797884561F
#define CUDART_INF __longlong_as_double(0x7ff0000000000000ULL)
#define CUDART_NAN __longlong_as_double(0xfff8000000000000ULL)
#define CUDART_NEG_ZERO __longlong_as_double(0x8000000000000000ULL)
#define CUDART_ZERO 0.0
#define CUDART_ONE 1.0
#define CUDART_PI 3.1415926535897931e+0
