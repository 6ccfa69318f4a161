// Masked BatchNorm (+ residual + ReLU) on the CPU, fp32 or bf16 storage with fp32 arithmetic and
// double sums (see nft_fast/ops/masked_bn.py for the semantics and csrc/masked_bn.h for the layouts).
//
// Statistics: sums of (x - K) and (x - K)^2 in double (fp32 activations; bf16 ones sum each
// chunk in fp32 -- far below bf16's own rounding -- and combine the chunks in double), K = the channel's first value (a shift
// that keeps the sums small when |mean| >> std), so the variance matches torch's double
// accumulation. The rows are cut into a number of chunks that depends only on the shape, each
// chunk has its own partial sums and the partials are added in chunk order: the result does
// not depend on the thread count or schedule. Backward: one pass for sum(dz) and
// sum(dz * (x - mean)) (dz = dy * [y > 0] with ReLU), one pass for dx (and dres = dz).
//
// The inner kernels are compiled for AVX-512 / AVX2 / baseline and picked at load time
// (target_clones): the package is built without -march flags.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "masked_bn.h"
#include "cpu/bf16.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define NFT_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define NFT_CLONES
#endif

namespace nft_fast {
namespace {

constexpr int64_t kMaxChunks = 64;       // row chunks of the rows x C reductions
constexpr int64_t kMinChunkRows = 8;
constexpr int64_t kParallelWork = 32768;  // elements below which one thread does it all

using cpu_bf16::bf16;  // fp32/bf16 loads and stores: csrc/cpu/bf16.h
using cpu_bf16::ld;
using cpu_bf16::st;

// Per-chunk accumulator: double for fp32 data (matches torch's double accumulation); fp32 for
// bf16 data, whose 8-bit mantissa makes a chunk's fp32 sum error (< 1e-4 relative over the
// <= M/64 rows of a chunk) irrelevant, at twice the SIMD width.
template <typename T>
using acc_t = typename std::conditional<std::is_same<T, bf16>::value, float, double>::type;

// dy where y > 0, else 0 (ReLU backward), with integer ops: GCC does not if-convert a float
// compare-and-select in these loops. A positive float's bits are a positive int32 (y is finite).
inline __attribute__((always_inline)) float relu_grad(float g, float y) {
  int32_t gb, yb;
  std::memcpy(&gb, &g, 4);
  std::memcpy(&yb, &y, 4);
  gb &= -static_cast<int32_t>(yb > 0);
  float out;
  std::memcpy(&out, &gb, 4);
  return out;
}

// max(v, 0) with NaN kept (torch's relu), in integer ops for the same reason: a float select here
// compiles to a branch per element (15x slower on random-signed bf16 data, 1.8x on fp32).
inline __attribute__((always_inline)) float relu_f(float v) {
  int32_t b;
  std::memcpy(&b, &v, 4);
  const int32_t neg = b >> 31;                                               // all ones if the sign is set
  const int32_t nan = -static_cast<int32_t>((b & 0x7FFFFFFF) > 0x7F800000);  // all ones for a NaN
  b &= ~(neg & ~nan);
  float out;
  std::memcpy(&out, &b, 4);
  return out;
}

// ------------------------------------------------- kernel bodies, templated on the storage type
// (inlined into one target_clones function per type below).

template <typename T>
inline __attribute__((always_inline)) void rows_stats_t(const T* x, int64_t r0, int64_t r1, int64_t C,
                                                        const acc_t<T>* K, acc_t<T>* s1, acc_t<T>* s2) {
  using A = acc_t<T>;
  for (int64_t c = 0; c < C; ++c) s1[c] = s2[c] = 0;
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const A d = static_cast<A>(ld(xr[c])) - K[c];
      s1[c] += d;
      s2[c] += d * d;
    }
  }
}

// y = act((x - mean) * scale + shift [+ res]) over n values; PLANE: one channel (scalars at [0]).
template <typename T, bool RES, bool RELU, bool PLANE>
inline __attribute__((always_inline)) void apply_span(const T* xr, const T* rr, T* yr, int64_t n, const float* mean,
                                                      const float* scale, const float* shift) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = PLANE ? 0 : i;
    float v = (ld(xr[i]) - mean[c]) * scale[c] + shift[c];
    if (RES) v += ld(rr[i]);
    if (RELU) v = relu_f(v);
    st(yr + i, v);
  }
}

template <typename T, bool PLANE>
inline __attribute__((always_inline)) void apply_rows_t(const T* x, const T* res, T* y, int64_t r0, int64_t r1,
                                                        int64_t C, const float* mean, const float* scale,
                                                        const float* shift, bool relu) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t o = r * C;
    if (res != nullptr) {
      if (relu) apply_span<T, true, true, PLANE>(x + o, res + o, y + o, C, mean, scale, shift);
      else apply_span<T, true, false, PLANE>(x + o, res + o, y + o, C, mean, scale, shift);
    } else if (relu) {
      apply_span<T, false, true, PLANE>(x + o, nullptr, y + o, C, mean, scale, shift);
    } else {
      apply_span<T, false, false, PLANE>(x + o, nullptr, y + o, C, mean, scale, shift);
    }
  }
}

template <typename T>
inline __attribute__((always_inline)) void rows_bwd_sums_t(const T* dy, const T* x, const T* y, int64_t r0,
                                                           int64_t r1, int64_t C, const acc_t<T>* mean, acc_t<T>* s_dz,
                                                           acc_t<T>* s_dzx) {
  using A = acc_t<T>;
  for (int64_t c = 0; c < C; ++c) s_dz[c] = s_dzx[c] = 0;
  for (int64_t r = r0; r < r1; ++r) {
    const T* dr = dy + r * C;
    const T* xr = x + r * C;
    if (y != nullptr) {
      const T* yr = y + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const A dz = relu_grad(ld(dr[c]), ld(yr[c]));
        s_dz[c] += dz;
        s_dzx[c] += dz * (static_cast<A>(ld(xr[c])) - mean[c]);
      }
    } else {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const A dz = ld(dr[c]);
        s_dz[c] += dz;
        s_dzx[c] += dz * (static_cast<A>(ld(xr[c])) - mean[c]);
      }
    }
  }
}

template <typename T>
inline __attribute__((always_inline)) void plane_stats_t(const T* x, int64_t S, acc_t<T> K, acc_t<T>* out) {
  using A = acc_t<T>;
  A s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
  for (int64_t i = 0; i < S; ++i) {
    const A d = static_cast<A>(ld(x[i])) - K;
    s1 += d;
    s2 += d * d;
  }
  out[0] = s1;
  out[1] = s2;
}

template <typename T>
inline __attribute__((always_inline)) void plane_bwd_sums_t(const T* dy, const T* x, const T* y, int64_t S,
                                                            acc_t<T> mean, acc_t<T>* out) {
  using A = acc_t<T>;
  A s1 = 0, s2 = 0;
  if (y != nullptr) {
#pragma omp simd reduction(+ : s1, s2)
    for (int64_t i = 0; i < S; ++i) {
      const A dz = relu_grad(ld(dy[i]), ld(y[i]));
      s1 += dz;
      s2 += dz * (static_cast<A>(ld(x[i])) - mean);
    }
  } else {
#pragma omp simd reduction(+ : s1, s2)
    for (int64_t i = 0; i < S; ++i) {
      const A dz = ld(dy[i]);
      s1 += dz;
      s2 += dz * (static_cast<A>(ld(x[i])) - mean);
    }
  }
  out[0] = s1;
  out[1] = s2;
}

// dx = a * (dz - mdz - x_hat * mdzx) in training, a * dz in eval; dres = dz. One instance per
// flag combination (inlined into each target clone) so that the loops have no branches.
template <typename T, bool RELU, bool DX, bool DRES, bool TRAIN, bool PLANE>
inline __attribute__((always_inline)) void dx_span(const T* dr, const T* xr, const T* yr, T* dxr, T* dqr, int64_t n,
                                                   const float* mean, const float* rstd, const float* a,
                                                   const float* mdz, const float* mdzx) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = PLANE ? 0 : i;  // a plane has one channel: its parameters are scalars
    const float dz = RELU ? relu_grad(ld(dr[i]), ld(yr[i])) : ld(dr[i]);
    if (DRES) st(dqr + i, dz);
    if (DX) st(dxr + i, TRAIN ? a[c] * (dz - mdz[c] - ((ld(xr[i]) - mean[c]) * rstd[c]) * mdzx[c]) : a[c] * dz);
  }
}

template <typename T, bool RELU, bool DX, bool DRES, bool TRAIN, bool PLANE>
inline __attribute__((always_inline)) void dx_rows(const T* dy, const T* x, const T* y, T* dx, T* dres, int64_t r0,
                                                   int64_t r1, int64_t C, const float* mean, const float* rstd,
                                                   const float* a, const float* mdz, const float* mdzx) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t o = r * C;
    dx_span<T, RELU, DX, DRES, TRAIN, PLANE>(dy + o, x + o, RELU ? y + o : nullptr, DX ? dx + o : nullptr,
                                             DRES ? dres + o : nullptr, C, mean, rstd, a, mdz, mdzx);
  }
}

#define NFT_DX_CASE(R, X, Q, T_)                                                                         \
  case (R) * 8 + (X) * 4 + (Q) * 2 + (T_):                                                               \
    dx_rows<T, R, X, Q, T_, PLANE>(dy, x, y, dx, dres, r0, r1, C, mean, rstd, a, mdz, mdzx);             \
    break;

// Rows [r0, r1) of the rows x C layout (y only with ReLU; dx / dres null when not wanted); a
// plane is the same with one "row" of S values and the channel's scalars at mean[0] etc.
template <typename T, bool PLANE>
inline __attribute__((always_inline)) void dx_t(const T* dy, const T* x, const T* y, T* dx, T* dres, int64_t r0,
                                                int64_t r1, int64_t C, const float* mean, const float* rstd,
                                                const float* a, const float* mdz, const float* mdzx, bool training) {
  switch ((y != nullptr) * 8 + (dx != nullptr) * 4 + (dres != nullptr) * 2 + (training ? 1 : 0)) {
    NFT_DX_CASE(0, 0, 1, 0) NFT_DX_CASE(0, 0, 1, 1) NFT_DX_CASE(0, 1, 0, 0) NFT_DX_CASE(0, 1, 0, 1)
    NFT_DX_CASE(0, 1, 1, 0) NFT_DX_CASE(0, 1, 1, 1) NFT_DX_CASE(1, 0, 1, 0) NFT_DX_CASE(1, 0, 1, 1)
    NFT_DX_CASE(1, 1, 0, 0) NFT_DX_CASE(1, 1, 0, 1) NFT_DX_CASE(1, 1, 1, 0) NFT_DX_CASE(1, 1, 1, 1)
    default: break;
  }
}
#undef NFT_DX_CASE

// ------------------------------------ one target_clones entry per kernel and storage type

#define NFT_KERNELS(T)                                                                                              \
  NFT_CLONES void rows_stats(const T* x, int64_t r0, int64_t r1, int64_t C, const acc_t<T>* K, acc_t<T>* s1,        \
                             acc_t<T>* s2) {                                                                        \
    rows_stats_t<T>(x, r0, r1, C, K, s1, s2);                                                                       \
  }                                                                                                                 \
  NFT_CLONES void rows_apply(const T* x, const T* res, T* y, int64_t r0, int64_t r1, int64_t C, const float* mean,  \
                             const float* scale, const float* shift, bool relu) {                                   \
    apply_rows_t<T, false>(x, res, y, r0, r1, C, mean, scale, shift, relu);                                         \
  }                                                                                                                 \
  NFT_CLONES void plane_apply(const T* x, const T* res, T* y, int64_t S, const float* mean, const float* scale,     \
                              const float* shift, bool relu) {                                                      \
    apply_rows_t<T, true>(x, res, y, 0, 1, S, mean, scale, shift, relu);                                            \
  }                                                                                                                 \
  NFT_CLONES void rows_bwd_sums(const T* dy, const T* x, const T* y, int64_t r0, int64_t r1, int64_t C,             \
                                const acc_t<T>* mean, acc_t<T>* s_dz, acc_t<T>* s_dzx) {                            \
    rows_bwd_sums_t<T>(dy, x, y, r0, r1, C, mean, s_dz, s_dzx);                                                     \
  }                                                                                                                 \
  NFT_CLONES void plane_stats(const T* x, int64_t S, acc_t<T> K, acc_t<T>* out) { plane_stats_t<T>(x, S, K, out); } \
  NFT_CLONES void plane_bwd_sums(const T* dy, const T* x, const T* y, int64_t S, acc_t<T> mean, acc_t<T>* out) {    \
    plane_bwd_sums_t<T>(dy, x, y, S, mean, out);                                                                    \
  }                                                                                                                 \
  NFT_CLONES void rows_dx(const T* dy, const T* x, const T* y, T* dx, T* dres, int64_t r0, int64_t r1, int64_t C,   \
                          const float* mean, const float* rstd, const float* a, const float* mdz, const float* mdzx, \
                          bool training) {                                                                          \
    dx_t<T, false>(dy, x, y, dx, dres, r0, r1, C, mean, rstd, a, mdz, mdzx, training);                              \
  }                                                                                                                 \
  NFT_CLONES void plane_dx(const T* dy, const T* x, const T* y, T* dx, T* dres, int64_t S, const float* mean,       \
                           const float* rstd, const float* a, const float* mdz, const float* mdzx, bool training) {  \
    dx_t<T, true>(dy, x, y, dx, dres, 0, 1, S, mean, rstd, a, mdz, mdzx, training);                                 \
  }

NFT_KERNELS(float)
NFT_KERNELS(bf16)
#undef NFT_KERNELS

// Row chunks of the rows x C reductions: a function of M only (deterministic sums).
int64_t chunk_rows(int64_t M) {
  return std::max(kMinChunkRows, (M + kMaxChunks - 1) / kMaxChunks);
}

// Rows [r0, r1) of thread t's even share of M rows.
#ifdef _OPENMP
#define NFT_THREAD_ROWS(M)                                                                   \
  const int64_t T_ = omp_get_num_threads(), t_ = omp_get_thread_num();                       \
  const int64_t per = ((M) + T_ - 1) / T_, r0 = std::min((M), t_ * per), r1 = std::min((M), r0 + per);
#else
#define NFT_THREAD_ROWS(M) const int64_t r0 = 0, r1 = (M);
#endif

template <typename T>
void fwd(const T* x, const T* res, const float* w, const float* m, const float* b, T* y, float* mean, float* rstd,
         float* uvar, int64_t N, int64_t C, int64_t S, bool rows_c, bool training, float eps, bool relu) {
  const int64_t M = N * S;
  const bool par = M * C > kParallelWork;
  if (training) {
    // Per channel: the shift, then (sum d, sum d^2) partials, then the ordered combination.
    using A = acc_t<T>;
    std::vector<A> K(C);
    std::vector<double> s1(C, 0.0), s2(C, 0.0);
    for (int64_t c = 0; c < C; ++c) K[c] = ld(rows_c ? x[c] : x[c * S]);
    if (rows_c) {
      const int64_t rpc = chunk_rows(M), P = (M + rpc - 1) / rpc;
      std::vector<A> part(2 * P * C);
#pragma omp parallel for schedule(static) if (par)
      for (int64_t p = 0; p < P; ++p) {
        rows_stats(x, p * rpc, std::min(M, (p + 1) * rpc), C, K.data(), &part[2 * p * C], &part[(2 * p + 1) * C]);
      }
      for (int64_t p = 0; p < P; ++p) {
        for (int64_t c = 0; c < C; ++c) {
          s1[c] += part[2 * p * C + c];
          s2[c] += part[(2 * p + 1) * C + c];
        }
      }
    } else {
      std::vector<A> part(2 * N * C);
#pragma omp parallel for schedule(static) if (par)
      for (int64_t i = 0; i < N * C; ++i) plane_stats(x + i * S, S, K[i % C], &part[2 * i]);
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t c = 0; c < C; ++c) {
          s1[c] += part[2 * (n * C + c)];
          s2[c] += part[2 * (n * C + c) + 1];
        }
      }
    }
    const double inv_m = 1.0 / static_cast<double>(M);
    for (int64_t c = 0; c < C; ++c) {
      const double d = s1[c] * inv_m;
      const double m2 = std::max(s2[c] - s1[c] * d, 0.0);
      mean[c] = static_cast<float>(static_cast<double>(K[c]) + d);
      rstd[c] = static_cast<float>(1.0 / std::sqrt(m2 * inv_m + static_cast<double>(eps)));
      uvar[c] = static_cast<float>(m2 / static_cast<double>(std::max<int64_t>(M - 1, 1)));
    }
  }
  // y = (x - mean) * (w * m * rstd) + b: the subtraction first (no cancellation when |mean| >> std).
  std::vector<float> scale(C), shift(C, 0.0f);
  for (int64_t c = 0; c < C; ++c) {
    scale[c] = (w[c] * m[c]) * rstd[c];
    if (b != nullptr) shift[c] = b[c];
  }
  if (rows_c) {
#pragma omp parallel if (par)
    {
      NFT_THREAD_ROWS(M)
      if (r0 < r1) rows_apply(x, res, y, r0, r1, C, mean, scale.data(), shift.data(), relu);
    }
  } else {
#pragma omp parallel for schedule(static) if (par)
    for (int64_t i = 0; i < N * C; ++i) {
      const int64_t c = i % C;
      plane_apply(x + i * S, res != nullptr ? res + i * S : nullptr, y + i * S, S, mean + c, scale.data() + c,
                  shift.data() + c, relu);
    }
  }
}

template <typename T>
void bwd(const T* dy, const T* x, const T* y, const float* w, const float* m, const float* mean, const float* rstd,
         T* dx, T* dres, float* dw, float* db, float* dm, int64_t N, int64_t C, int64_t S, bool rows_c, bool training,
         bool relu) {
  const int64_t M = N * S;
  const bool par = M * C > kParallelWork;
  const T* yr = relu ? y : nullptr;
  using A = acc_t<T>;
  std::vector<A> meand(mean, mean + C);
  std::vector<double> s_dz(C, 0.0), s_dzx(C, 0.0);
  if (rows_c) {
    const int64_t rpc = chunk_rows(M), P = (M + rpc - 1) / rpc;
    std::vector<A> part(2 * P * C);
#pragma omp parallel for schedule(static) if (par)
    for (int64_t p = 0; p < P; ++p) {
      rows_bwd_sums(dy, x, yr, p * rpc, std::min(M, (p + 1) * rpc), C, meand.data(), &part[2 * p * C],
                    &part[(2 * p + 1) * C]);
    }
    for (int64_t p = 0; p < P; ++p) {
      for (int64_t c = 0; c < C; ++c) {
        s_dz[c] += part[2 * p * C + c];
        s_dzx[c] += part[(2 * p + 1) * C + c];
      }
    }
  } else {
    std::vector<A> part(2 * N * C);
#pragma omp parallel for schedule(static) if (par)
    for (int64_t i = 0; i < N * C; ++i) {
      plane_bwd_sums(dy + i * S, x + i * S, yr != nullptr ? yr + i * S : nullptr, S, meand[i % C], &part[2 * i]);
    }
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t c = 0; c < C; ++c) {
        s_dz[c] += part[2 * (n * C + c)];
        s_dzx[c] += part[2 * (n * C + c) + 1];
      }
    }
  }
  // sum(dz * x_hat) = rstd * sum(dz * (x - mean)); d(w*m) = that sum -> dm = w * it, dw = m * it.
  std::vector<float> a(C), mdz(C), mdzx(C);
  const double inv_m = 1.0 / static_cast<double>(M);
  for (int64_t c = 0; c < C; ++c) {
    const double sx = s_dzx[c] * static_cast<double>(rstd[c]);
    const float sxf = static_cast<float>(sx);
    dm[c] = w[c] * sxf;
    dw[c] = m[c] * sxf;
    db[c] = static_cast<float>(s_dz[c]);
    a[c] = (w[c] * m[c]) * rstd[c];
    mdz[c] = static_cast<float>(s_dz[c] * inv_m);
    mdzx[c] = static_cast<float>(sx * inv_m);
  }
  if (dx == nullptr && dres == nullptr) return;
  if (rows_c) {
#pragma omp parallel if (par)
    {
      NFT_THREAD_ROWS(M)
      if (r0 < r1) rows_dx(dy, x, yr, dx, dres, r0, r1, C, mean, rstd, a.data(), mdz.data(), mdzx.data(), training);
    }
  } else {
#pragma omp parallel for schedule(static) if (par)
    for (int64_t i = 0; i < N * C; ++i) {
      const int64_t c = i % C, o = i * S;
      plane_dx(dy + o, x + o, yr != nullptr ? yr + o : nullptr, dx != nullptr ? dx + o : nullptr,
               dres != nullptr ? dres + o : nullptr, S, mean + c, rstd + c, a.data() + c, mdz.data() + c,
               mdzx.data() + c, training);
    }
  }
}
#undef NFT_THREAD_ROWS

}  // namespace

void masked_bn_fwd_cpu(const void* x, const void* res, const float* w, const float* m, const float* b, void* y,
                       float* mean, float* rstd, float* uvar, int64_t N, int64_t C, int64_t S, bool rows_c,
                       bool training, float eps, bool relu, bool is_bf16) {
  if (is_bf16) {
    fwd(static_cast<const bf16*>(x), static_cast<const bf16*>(res), w, m, b, static_cast<bf16*>(y), mean, rstd, uvar,
        N, C, S, rows_c, training, eps, relu);
  } else {
    fwd(static_cast<const float*>(x), static_cast<const float*>(res), w, m, b, static_cast<float*>(y), mean, rstd,
        uvar, N, C, S, rows_c, training, eps, relu);
  }
}

void masked_bn_bwd_cpu(const void* dy, const void* x, const void* y, const float* w, const float* m,
                       const float* mean, const float* rstd, void* dx, void* dres, float* dw, float* db, float* dm,
                       int64_t N, int64_t C, int64_t S, bool rows_c, bool training, bool relu, bool is_bf16) {
  if (is_bf16) {
    bwd(static_cast<const bf16*>(dy), static_cast<const bf16*>(x), static_cast<const bf16*>(y), w, m, mean, rstd,
        static_cast<bf16*>(dx), static_cast<bf16*>(dres), dw, db, dm, N, C, S, rows_c, training, relu);
  } else {
    bwd(static_cast<const float*>(dy), static_cast<const float*>(x), static_cast<const float*>(y), w, m, mean, rstd,
        static_cast<float*>(dx), static_cast<float*>(dres), dw, db, dm, N, C, S, rows_c, training, relu);
  }
}

}  // namespace nft_fast
