// MixUp on the CPU: the mixed batch (with the NCHW <-> channels_last conversion fused into the
// same pass) and the two-label cross-entropy forward with its logit gradient (csrc/mixup.h).
//
// Batch: per sample, out = fl(fl(lam * x[b]) + fl(oml * x[perm[b]])) read and written once;
// the build's -ffp-contract=off keeps the two products rounded separately, so fp32 results
// are bit-equal to torch's `lam * x + (1 - lam) * x[perm]` and bf16 ones to its fp32 result
// cast to bf16 (round to nearest even). Transposed outputs with few rows (R = C <= 4, the
// image case; or Q = C <= 4 the other way) vectorise with interleaved stores (loads); others
// go through 32 x 32 tiles.
//
// CE: one row at a time, three sweeps over the row while it sits in L1: max, exp(z - max)
// (a Cephes-style fp32 exp, ~1 ulp) stored into dlogits and summed (fp32 lanes, double blocks), then the scale
// to softmax / B with the two label terms. Row losses are kept per row and added in row order,
// so the loss does not depend on the thread count.
//
// The kernels are compiled for AVX-512 / AVX2 / baseline and picked at load time
// (target_clones): the package is built without -march flags.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "mixup.h"
#include "cpu/bf16.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define NFT_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define NFT_CLONES
#endif
#define NFT_INLINE inline __attribute__((always_inline))

namespace nft_fast {
namespace {

using cpu_bf16::bf16;
using cpu_bf16::ld;
using cpu_bf16::st;

constexpr int64_t kParallelWork = 32768;  // elements below which one thread does it all
constexpr int64_t kChunk = 16384;         // elements per work item of the batch mix
constexpr int64_t kTile = 32;             // transpose tile edge (general case)

// ------------------------------------------------------------------------------- batch mix

template <typename TI, typename TO>
NFT_INLINE void mix_span_t(const TI* a, const TI* b, TO* o, int64_t n, float lam, float oml) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float u = lam * ld(a[i]);
    const float v = oml * ld(b[i]);
    st(o + i, u + v);
  }
}

// out (Q, R) from a, b (R, Q): rows q in [q0, q1), R fixed at compile time.
template <typename TI, typename TO, int R>
NFT_INLINE void mix_small_t(const TI* a, const TI* b, TO* o, int64_t Q, int64_t q0, int64_t q1, float lam,
                            float oml) {
#pragma omp simd
  for (int64_t q = q0; q < q1; ++q) {
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const float u = lam * ld(a[r * Q + q]);
      const float v = oml * ld(b[r * Q + q]);
      st(o + q * R + r, u + v);
    }
  }
}

// out (Q, R) from a, b (R, Q): rows r in [r0, r1), Q fixed at compile time (channels_last -> NCHW).
template <typename TI, typename TO, int Q>
NFT_INLINE void mix_small_rev_t(const TI* a, const TI* b, TO* o, int64_t R, int64_t r0, int64_t r1, float lam,
                                float oml) {
#pragma omp simd
  for (int64_t r = r0; r < r1; ++r) {
#pragma GCC unroll 4
    for (int q = 0; q < Q; ++q) {
      const float u = lam * ld(a[r * Q + q]);
      const float v = oml * ld(b[r * Q + q]);
      st(o + q * R + r, u + v);
    }
  }
}

// out (Q, R) from a, b (R, Q): one tile [r0, r1) x [q0, q1), mixed into a buffer along q, then
// written along r.
template <typename TI, typename TO>
NFT_INLINE void mix_tile_t(const TI* a, const TI* b, TO* o, int64_t R, int64_t Q, int64_t r0, int64_t r1, int64_t q0,
                           int64_t q1, float lam, float oml) {
  float tmp[kTile][kTile];
  const int64_t nq = q1 - q0, nr = r1 - r0;
  for (int64_t r = 0; r < nr; ++r) mix_span_t(a + (r0 + r) * Q + q0, b + (r0 + r) * Q + q0, tmp[r], nq, lam, oml);
  for (int64_t q = 0; q < nq; ++q) {
    TO* orow = o + (q0 + q) * R + r0;
#pragma omp simd
    for (int64_t r = 0; r < nr; ++r) st(orow + r, tmp[r][q]);
  }
}

// One target_clones entry per kernel and (input, output) storage type.
#define NFT_MIX_KERNELS(TI, TO, NAME)                                                                              \
  NFT_CLONES void mix_span_##NAME(const TI* a, const TI* b, TO* o, int64_t n, float lam, float oml) {              \
    mix_span_t(a, b, o, n, lam, oml);                                                                              \
  }                                                                                                                \
  NFT_CLONES void mix_small_##NAME(const TI* a, const TI* b, TO* o, int64_t R, int64_t Q, int64_t q0, int64_t q1,  \
                                   float lam, float oml) {                                                         \
    if (R == 2) mix_small_t<TI, TO, 2>(a, b, o, Q, q0, q1, lam, oml);                                              \
    else if (R == 3) mix_small_t<TI, TO, 3>(a, b, o, Q, q0, q1, lam, oml);                                         \
    else mix_small_t<TI, TO, 4>(a, b, o, Q, q0, q1, lam, oml);                                                     \
  }                                                                                                                \
  NFT_CLONES void mix_small_rev_##NAME(const TI* a, const TI* b, TO* o, int64_t R, int64_t Q, int64_t r0,          \
                                       int64_t r1, float lam, float oml) {                                         \
    if (Q == 2) mix_small_rev_t<TI, TO, 2>(a, b, o, R, r0, r1, lam, oml);                                          \
    else if (Q == 3) mix_small_rev_t<TI, TO, 3>(a, b, o, R, r0, r1, lam, oml);                                     \
    else mix_small_rev_t<TI, TO, 4>(a, b, o, R, r0, r1, lam, oml);                                                 \
  }                                                                                                                \
  NFT_CLONES void mix_tile_##NAME(const TI* a, const TI* b, TO* o, int64_t R, int64_t Q, int64_t r0, int64_t r1,   \
                                  int64_t q0, int64_t q1, float lam, float oml) {                                  \
    mix_tile_t(a, b, o, R, Q, r0, r1, q0, q1, lam, oml);                                                           \
  }                                                                                                                \
  inline void mix_span(const TI* a, const TI* b, TO* o, int64_t n, float lam, float oml) {                        \
    mix_span_##NAME(a, b, o, n, lam, oml);                                                                         \
  }                                                                                                                \
  inline void mix_small(const TI* a, const TI* b, TO* o, int64_t R, int64_t Q, int64_t q0, int64_t q1, float lam, \
                        float oml) {                                                                               \
    mix_small_##NAME(a, b, o, R, Q, q0, q1, lam, oml);                                                             \
  }                                                                                                                \
  inline void mix_small_rev(const TI* a, const TI* b, TO* o, int64_t R, int64_t Q, int64_t r0, int64_t r1,        \
                            float lam, float oml) {                                                                \
    mix_small_rev_##NAME(a, b, o, R, Q, r0, r1, lam, oml);                                                         \
  }                                                                                                                \
  inline void mix_tile(const TI* a, const TI* b, TO* o, int64_t R, int64_t Q, int64_t r0, int64_t r1, int64_t q0,  \
                       int64_t q1, float lam, float oml) {                                                         \
    mix_tile_##NAME(a, b, o, R, Q, r0, r1, q0, q1, lam, oml);                                                      \
  }
NFT_MIX_KERNELS(float, float, f32_f32)
NFT_MIX_KERNELS(float, bf16, f32_bf16)
NFT_MIX_KERNELS(bf16, float, bf16_f32)
NFT_MIX_KERNELS(bf16, bf16, bf16_bf16)
#undef NFT_MIX_KERNELS

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// perm as int64, each index checked against [0, B).
std::vector<int64_t> read_perm(const void* perm, bool perm_i32, int64_t B, const char* who) {
  std::vector<int64_t> p(B);
  for (int64_t i = 0; i < B; ++i) {
    p[i] = perm_i32 ? static_cast<const int32_t*>(perm)[i] : static_cast<const int64_t*>(perm)[i];
    if (p[i] < 0 || p[i] >= B) {
      throw std::out_of_range(std::string(who) + ": perm[" + std::to_string(i) + "] = " + std::to_string(p[i]) +
                              " is outside [0, " + std::to_string(B) + ")");
    }
  }
  return p;
}

template <typename TI, typename TO>
void batch(const TI* x, const int64_t* src, TO* out, int64_t B, int64_t R, int64_t Q, bool transpose, float lam,
           float oml) {
  const int64_t N = R * Q;
  const bool par = B * N > kParallelWork;
  if (!transpose || R == 1 || Q == 1) {  // same layout: one flat span per sample
    const int64_t nc = cdiv(N, kChunk);
#pragma omp parallel for schedule(static) if (par)
    for (int64_t it = 0; it < B * nc; ++it) {
      const int64_t b = it / nc, i0 = (it % nc) * kChunk, n = std::min(kChunk, N - i0);
      mix_span(x + b * N + i0, x + src[b] * N + i0, out + b * N + i0, n, lam, oml);
    }
  } else if (R <= 4) {  // few channels: vectorised along Q, interleaved stores
    const int64_t qc = kChunk / 4, nc = cdiv(Q, qc);
#pragma omp parallel for schedule(static) if (par)
    for (int64_t it = 0; it < B * nc; ++it) {
      const int64_t b = it / nc, q0 = (it % nc) * qc, q1 = std::min(Q, q0 + qc);
      mix_small(x + b * N, x + src[b] * N, out + b * N, R, Q, q0, q1, lam, oml);
    }
  } else if (Q <= 4) {  // few channels the other way (channels_last -> NCHW): vectorised along R
    const int64_t rc = kChunk / 4, nc = cdiv(R, rc);
#pragma omp parallel for schedule(static) if (par)
    for (int64_t it = 0; it < B * nc; ++it) {
      const int64_t b = it / nc, r0 = (it % nc) * rc, r1 = std::min(R, r0 + rc);
      mix_small_rev(x + b * N, x + src[b] * N, out + b * N, R, Q, r0, r1, lam, oml);
    }
  } else {
    const int64_t nr = cdiv(R, kTile), nq = cdiv(Q, kTile), nt = nr * nq;
#pragma omp parallel for schedule(static) if (par)
    for (int64_t it = 0; it < B * nt; ++it) {
      const int64_t b = it / nt, t = it % nt, r0 = (t / nq) * kTile, q0 = (t % nq) * kTile;
      mix_tile(x + b * N, x + src[b] * N, out + b * N, R, Q, r0, std::min(R, r0 + kTile), q0,
               std::min(Q, q0 + kTile), lam, oml);
    }
  }
}

// ------------------------------------------------------------------------------------- CE

// exp(x) for x <= 0 (z - max): Cody-Waite reduction by ln 2 and Cephes' expf polynomial,
// ~1 ulp; 0 below -87.3 (where exp(x) < 2^-126; torch gives a subnormal there). NaN stays NaN.
NFT_INLINE float exp_nonpos(float x) {
  const float xc = std::max(x, -87.3f);  // NaN stays NaN
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const float r2 = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  const int32_t k = static_cast<int32_t>(n);
  const uint32_t sbits = static_cast<uint32_t>(k + 127) << 23;
  float s;
  std::memcpy(&s, &sbits, 4);
  // 0 where x < -87.3 (an integer mask, so the loop stays branch- and mask-free)
  const float v = p * s;
  uint32_t vb;
  std::memcpy(&vb, &v, 4);
  vb &= -static_cast<uint32_t>(!(x < -87.3f));
  float out;
  std::memcpy(&out, &vb, 4);
  return out;
}

// Rows are swept in chunks of kLanes values with fixed-length inner loops (one vector register
// at AVX-512), the partial chunk at the end through a buffer padded with -inf (exp -> 0): short
// rows (K = 10) cost one masked-free vector step instead of a scalar epilogue.
constexpr int kLanes = 16;
constexpr int64_t kSumChunks = 16;  // chunks per fp32 lane sum; the sums of these blocks add in double

template <typename T>
NFT_INLINE void load_tail(const T* z, int64_t n, float* buf) {
#pragma omp simd
  for (int l = 0; l < kLanes; ++l) buf[l] = l < n ? ld(z[l]) : -INFINITY;
}

template <typename T>
NFT_INLINE float row_max(const T* z, int64_t K) {
  float mv[kLanes], buf[kLanes];
#pragma omp simd
  for (int l = 0; l < kLanes; ++l) mv[l] = -INFINITY;
  int64_t j = 0;
  for (; j + kLanes <= K; j += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) mv[l] = std::max(mv[l], ld(z[j + l]));
  }
  if (j < K) {
    load_tail(z + j, K - j, buf);
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) mv[l] = std::max(mv[l], buf[l]);
  }
  float m = mv[0];
  for (int l = 1; l < kLanes; ++l) m = std::max(m, mv[l]);
  return m;
}

// Sum of exp(z - m) (fp32 lanes over blocks of kSumChunks chunks, the blocks added in double);
// the exps are stored into e when it is not null.
template <typename T>
NFT_INLINE double row_expsum(const T* z, int64_t K, float m, float* e) {
  float acc[kLanes], buf[kLanes];
  double s = 0.0;
  int64_t j = 0, chunks = 0;
#pragma omp simd
  for (int l = 0; l < kLanes; ++l) acc[l] = 0.0f;
  for (; j + kLanes <= K; j += kLanes) {
    float v[kLanes];
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) v[l] = exp_nonpos(ld(z[j + l]) - m);
    if (e != nullptr) {
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) e[j + l] = v[l];
    }
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) acc[l] += v[l];
    if (++chunks == kSumChunks) {
      float t = 0.0f;
      for (int l = 0; l < kLanes; ++l) t += acc[l];
      s += static_cast<double>(t);
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) acc[l] = 0.0f;
      chunks = 0;
    }
  }
  if (j < K) {
    load_tail(z + j, K - j, buf);
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) buf[l] = exp_nonpos(buf[l] - m);
    if (e != nullptr) {
#pragma omp simd
      for (int64_t l = 0; l < K - j; ++l) e[j + l] = buf[l];
    }
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) acc[l] += buf[l];
  }
  float t = 0.0f;
  for (int l = 0; l < kLanes; ++l) t += acc[l];
  return s + static_cast<double>(t);
}

// Rows [r0, r1): row losses into rl, gradients (when d is not null) into d.
template <typename T>
NFT_INLINE void ce_rows_t(const T* z, const int64_t* y, const int64_t* src, float* d, double* rl, int64_t r0,
                          int64_t r1, int64_t K, double lam, double oml, double inv_b) {
  for (int64_t i = r0; i < r1; ++i) {
    const T* zi = z + i * K;
    float* di = d != nullptr ? d + i * K : nullptr;
    const int64_t ya = y[i], yb = y[src[i]];
    const float m = row_max(zi, K);
    const double s = row_expsum(zi, K, m, di);
    const double lse = static_cast<double>(m) + std::log(s);
    rl[i] = lse - lam * static_cast<double>(ld(zi[ya])) - oml * static_cast<double>(ld(zi[yb]));
    if (di == nullptr) continue;
    const double ea = di[ya], eb = di[yb];  // exp values, before the scaling below
    const float sc = static_cast<float>(inv_b / s);
#pragma omp simd
    for (int64_t j = 0; j < K; ++j) di[j] = di[j] * sc;
    // The label entries in double: softmax - lam (- oml), then / B, one rounding.
    if (ya == yb) {
      di[ya] = static_cast<float>((ea / s - lam - oml) * inv_b);
    } else {
      di[ya] = static_cast<float>((ea / s - lam) * inv_b);
      di[yb] = static_cast<float>((eb / s - oml) * inv_b);
    }
  }
}

NFT_CLONES void ce_rows_f32(const float* z, const int64_t* y, const int64_t* src, float* d, double* rl, int64_t r0,
                            int64_t r1, int64_t K, double lam, double oml, double inv_b) {
  ce_rows_t(z, y, src, d, rl, r0, r1, K, lam, oml, inv_b);
}
NFT_CLONES void ce_rows_bf16(const bf16* z, const int64_t* y, const int64_t* src, float* d, double* rl, int64_t r0,
                             int64_t r1, int64_t K, double lam, double oml, double inv_b) {
  ce_rows_t(z, y, src, d, rl, r0, r1, K, lam, oml, inv_b);
}

}  // namespace

void mixup_batch_cpu(const void* x, bool x_bf16, const void* perm, bool perm_i32, void* out, bool out_bf16,
                     int64_t B, int64_t R, int64_t Q, bool transpose, float lam, float oml) {
  const std::vector<int64_t> src = read_perm(perm, perm_i32, B, "mixup_batch");
  if (B * R * Q == 0) return;
  const int64_t* s = src.data();
  if (x_bf16) {
    const bf16* xi = static_cast<const bf16*>(x);
    if (out_bf16) batch(xi, s, static_cast<bf16*>(out), B, R, Q, transpose, lam, oml);
    else batch(xi, s, static_cast<float*>(out), B, R, Q, transpose, lam, oml);
  } else {
    const float* xi = static_cast<const float*>(x);
    if (out_bf16) batch(xi, s, static_cast<bf16*>(out), B, R, Q, transpose, lam, oml);
    else batch(xi, s, static_cast<float*>(out), B, R, Q, transpose, lam, oml);
  }
}

void mixup_ce_fwd_cpu(const void* z, bool z_bf16, const int64_t* y, const void* perm, bool perm_i32, float* dlogits,
                      float* loss, int64_t B, int64_t K, double lam, double oml) {
  const std::vector<int64_t> src = read_perm(perm, perm_i32, B, "mixup_cross_entropy");
  for (int64_t i = 0; i < B; ++i) {
    if (y[i] < 0 || y[i] >= K) {
      throw std::out_of_range("mixup_cross_entropy: y[" + std::to_string(i) + "] = " + std::to_string(y[i]) +
                              " is outside [0, " + std::to_string(K) + ")");
    }
  }
  std::vector<double> rl(B);
  const double inv_b = 1.0 / static_cast<double>(B);
  const bool par = B * K > kParallelWork / 2 && B > 1;
  // Row blocks of a fixed size: which thread runs a row does not change any result.
  const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(64, kChunk / std::max<int64_t>(K, 1)));
  const int64_t nb = cdiv(B, rows);
#pragma omp parallel for schedule(static) if (par)
  for (int64_t blk = 0; blk < nb; ++blk) {
    const int64_t r0 = blk * rows, r1 = std::min(B, r0 + rows);
    if (z_bf16) ce_rows_bf16(static_cast<const bf16*>(z), y, src.data(), dlogits, rl.data(), r0, r1, K, lam, oml, inv_b);
    else ce_rows_f32(static_cast<const float*>(z), y, src.data(), dlogits, rl.data(), r0, r1, K, lam, oml, inv_b);
  }
  double total = 0.0;
  for (int64_t i = 0; i < B; ++i) total += rl[i];
  *loss = static_cast<float>(total * inv_b);
}

}  // namespace nft_fast
