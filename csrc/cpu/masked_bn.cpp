// Masked BatchNorm (+ residual + ReLU) on the CPU, fp32 (see nft_fast/ops/masked_bn.py for the
// semantics and csrc/masked_bn.h for the layouts).
//
// Statistics: sums of (x - K) and (x - K)^2 in double, K = the channel's first value (a shift
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
#include <vector>

#include "masked_bn.h"

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

// ---------------------------------------------------------------- rows x C kernels (row range)

NFT_CLONES void rows_stats(const float* x, int64_t r0, int64_t r1, int64_t C, const double* K, double* s1,
                           double* s2) {
  for (int64_t c = 0; c < C; ++c) s1[c] = s2[c] = 0.0;
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const double d = static_cast<double>(xr[c]) - K[c];
      s1[c] += d;
      s2[c] += d * d;
    }
  }
}

NFT_CLONES void rows_apply(const float* x, const float* res, float* y, int64_t r0, int64_t r1, int64_t C,
                           const float* mean, const float* scale, const float* shift, bool relu) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * C;
    float* yr = y + r * C;
    if (res != nullptr) {
      const float* rr = res + r * C;
      if (relu) {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) yr[c] = std::max((xr[c] - mean[c]) * scale[c] + shift[c] + rr[c], 0.0f);
      } else {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) yr[c] = (xr[c] - mean[c]) * scale[c] + shift[c] + rr[c];
      }
    } else if (relu) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) yr[c] = std::max((xr[c] - mean[c]) * scale[c] + shift[c], 0.0f);
    } else {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) yr[c] = (xr[c] - mean[c]) * scale[c] + shift[c];
    }
  }
}

NFT_CLONES void rows_bwd_sums(const float* dy, const float* x, const float* y, int64_t r0, int64_t r1, int64_t C,
                              const double* mean, double* s_dz, double* s_dzx) {
  for (int64_t c = 0; c < C; ++c) s_dz[c] = s_dzx[c] = 0.0;
  for (int64_t r = r0; r < r1; ++r) {
    const float* dr = dy + r * C;
    const float* xr = x + r * C;
    if (y != nullptr) {
      const float* yr = y + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const double dz = relu_grad(dr[c], yr[c]);
        s_dz[c] += dz;
        s_dzx[c] += dz * (static_cast<double>(xr[c]) - mean[c]);
      }
    } else {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const double dz = dr[c];
        s_dz[c] += dz;
        s_dzx[c] += dz * (static_cast<double>(xr[c]) - mean[c]);
      }
    }
  }
}

// dx = a * (dz - mdz - x_hat * mdzx) in training, a * dz in eval; dres = dz. One instance per
// flag combination (inlined into each target clone) so that the loops have no branches.
template <bool RELU, bool DX, bool DRES, bool TRAIN, bool PLANE>
inline __attribute__((always_inline)) void dx_span(const float* dr, const float* xr, const float* yr, float* dxr,
                                                   float* dqr, int64_t n, const float* mean, const float* rstd,
                                                   const float* a, const float* mdz, const float* mdzx) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = PLANE ? 0 : i;  // a plane has one channel: its parameters are scalars
    const float dz = RELU ? relu_grad(dr[i], yr[i]) : dr[i];
    if (DRES) dqr[i] = dz;
    if (DX) dxr[i] = TRAIN ? a[c] * (dz - mdz[c] - ((xr[i] - mean[c]) * rstd[c]) * mdzx[c]) : a[c] * dz;
  }
}

template <bool RELU, bool DX, bool DRES, bool TRAIN, bool PLANE>
inline __attribute__((always_inline)) void dx_rows(const float* dy, const float* x, const float* y, float* dx,
                                                   float* dres, int64_t r0, int64_t r1, int64_t C, const float* mean,
                                                   const float* rstd, const float* a, const float* mdz,
                                                   const float* mdzx) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t o = r * C;
    dx_span<RELU, DX, DRES, TRAIN, PLANE>(dy + o, x + o, RELU ? y + o : nullptr, DX ? dx + o : nullptr,
                                          DRES ? dres + o : nullptr, C, mean, rstd, a, mdz, mdzx);
  }
}

#define NFT_DX_CASE(R, X, Q, T)                                                                          \
  case (R) * 8 + (X) * 4 + (Q) * 2 + (T):                                                                \
    dx_rows<R, X, Q, T, PLANE_ARG>(dy, x, y, dx, dres, r0, r1, C, mean, rstd, a, mdz, mdzx);             \
    break;
#define NFT_DX_SWITCH                                                                                     \
  switch ((y != nullptr) * 8 + (dx != nullptr) * 4 + (dres != nullptr) * 2 + (training ? 1 : 0)) {      \
    NFT_DX_CASE(0, 0, 1, 0) NFT_DX_CASE(0, 0, 1, 1) NFT_DX_CASE(0, 1, 0, 0) NFT_DX_CASE(0, 1, 0, 1)      \
    NFT_DX_CASE(0, 1, 1, 0) NFT_DX_CASE(0, 1, 1, 1) NFT_DX_CASE(1, 0, 1, 0) NFT_DX_CASE(1, 0, 1, 1)      \
    NFT_DX_CASE(1, 1, 0, 0) NFT_DX_CASE(1, 1, 0, 1) NFT_DX_CASE(1, 1, 1, 0) NFT_DX_CASE(1, 1, 1, 1)      \
    default: break;                                                                                       \
  }

// Rows [r0, r1) of the rows x C layout (y only with ReLU; dx / dres null when not wanted).
NFT_CLONES void rows_dx(const float* dy, const float* x, const float* y, float* dx, float* dres, int64_t r0,
                        int64_t r1, int64_t C, const float* mean, const float* rstd, const float* a, const float* mdz,
                        const float* mdzx, bool training) {
#define PLANE_ARG false
  NFT_DX_SWITCH
#undef PLANE_ARG
}

// Planes: the same kernel with one "row" of S values and the channel's scalars at mean[0] etc.
NFT_CLONES void plane_dx(const float* dy, const float* x, const float* y, float* dx, float* dres, int64_t S,
                         const float* mean, const float* rstd, const float* a, const float* mdz, const float* mdzx,
                         bool training) {
  const int64_t r0 = 0, r1 = 1, C = S;
#define PLANE_ARG true
  NFT_DX_SWITCH
#undef PLANE_ARG
}

// ---------------------------------------------------------------- plane kernels (one (n, c) plane)

NFT_CLONES void plane_stats(const float* x, int64_t S, double K, double* out) {
  double s1 = 0.0, s2 = 0.0;
#pragma omp simd reduction(+ : s1, s2)
  for (int64_t i = 0; i < S; ++i) {
    const double d = static_cast<double>(x[i]) - K;
    s1 += d;
    s2 += d * d;
  }
  out[0] = s1;
  out[1] = s2;
}

NFT_CLONES void plane_apply(const float* x, const float* res, float* y, int64_t S, float mean, float scale,
                            float shift, bool relu) {
  if (res != nullptr) {
    if (relu) {
#pragma omp simd
      for (int64_t i = 0; i < S; ++i) y[i] = std::max((x[i] - mean) * scale + shift + res[i], 0.0f);
    } else {
#pragma omp simd
      for (int64_t i = 0; i < S; ++i) y[i] = (x[i] - mean) * scale + shift + res[i];
    }
  } else if (relu) {
#pragma omp simd
    for (int64_t i = 0; i < S; ++i) y[i] = std::max((x[i] - mean) * scale + shift, 0.0f);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < S; ++i) y[i] = (x[i] - mean) * scale + shift;
  }
}

NFT_CLONES void plane_bwd_sums(const float* dy, const float* x, const float* y, int64_t S, double mean,
                               double* out) {
  double s1 = 0.0, s2 = 0.0;
  if (y != nullptr) {
#pragma omp simd reduction(+ : s1, s2)
    for (int64_t i = 0; i < S; ++i) {
      const double dz = relu_grad(dy[i], y[i]);
      s1 += dz;
      s2 += dz * (static_cast<double>(x[i]) - mean);
    }
  } else {
#pragma omp simd reduction(+ : s1, s2)
    for (int64_t i = 0; i < S; ++i) {
      const double dz = dy[i];
      s1 += dz;
      s2 += dz * (static_cast<double>(x[i]) - mean);
    }
  }
  out[0] = s1;
  out[1] = s2;
}

// Row chunks of the rows x C reductions: a function of M only (deterministic sums).
int64_t chunk_rows(int64_t M) {
  return std::max(kMinChunkRows, (M + kMaxChunks - 1) / kMaxChunks);
}

}  // namespace

void masked_bn_fwd_f32_cpu(const float* x, const float* res, const float* w, const float* m, const float* b,
                           float* y, float* mean, float* rstd, float* uvar, int64_t N, int64_t C, int64_t S,
                           bool rows_c, bool training, float eps, bool relu) {
  const int64_t M = N * S;
  const bool par = M * C > kParallelWork;
  if (training) {
    // Per channel: the shift, then (sum d, sum d^2) partials, then the ordered combination.
    std::vector<double> K(C), s1(C, 0.0), s2(C, 0.0);
    for (int64_t c = 0; c < C; ++c) K[c] = rows_c ? x[c] : x[c * S];
    if (rows_c) {
      const int64_t rpc = chunk_rows(M), P = (M + rpc - 1) / rpc;
      std::vector<double> part(2 * P * C);
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
      std::vector<double> part(2 * N * C);
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
      mean[c] = static_cast<float>(K[c] + d);
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
#ifdef _OPENMP
      const int64_t T = omp_get_num_threads(), t = omp_get_thread_num();
#else
      const int64_t T = 1, t = 0;
#endif
      const int64_t per = (M + T - 1) / T, r0 = std::min(M, t * per), r1 = std::min(M, r0 + per);
      if (r0 < r1) rows_apply(x, res, y, r0, r1, C, mean, scale.data(), shift.data(), relu);
    }
  } else {
#pragma omp parallel for schedule(static) if (par)
    for (int64_t i = 0; i < N * C; ++i) {
      const int64_t c = i % C;
      plane_apply(x + i * S, res != nullptr ? res + i * S : nullptr, y + i * S, S, mean[c], scale[c], shift[c], relu);
    }
  }
}

void masked_bn_bwd_f32_cpu(const float* dy, const float* x, const float* y, const float* w, const float* m,
                           const float* mean, const float* rstd, float* dx, float* dres, float* dw, float* db,
                           float* dm, int64_t N, int64_t C, int64_t S, bool rows_c, bool training, bool relu) {
  const int64_t M = N * S;
  const bool par = M * C > kParallelWork;
  const float* yr = relu ? y : nullptr;
  std::vector<double> meand(mean, mean + C), s_dz(C, 0.0), s_dzx(C, 0.0);
  if (rows_c) {
    const int64_t rpc = chunk_rows(M), P = (M + rpc - 1) / rpc;
    std::vector<double> part(2 * P * C);
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
    std::vector<double> part(2 * N * C);
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
#ifdef _OPENMP
      const int64_t T = omp_get_num_threads(), t = omp_get_thread_num();
#else
      const int64_t T = 1, t = 0;
#endif
      const int64_t per = (M + T - 1) / T, r0 = std::min(M, t * per), r1 = std::min(M, r0 + per);
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

}  // namespace nft_fast
