// bf16 storage for the C++ CPU kernels: bf16 is the upper half of an fp32's bits. Loads widen
// to fp32 (exact); stores round to nearest even, NaN to 0x7FC0, as c10::BFloat16 does. Integer
// ops only, so the loops that use them vectorise.
#pragma once
#include <cstdint>
#include <cstring>

namespace nft_fast {
namespace cpu_bf16 {

using bf16 = uint16_t;

inline __attribute__((always_inline)) float ld(float v) { return v; }
inline __attribute__((always_inline)) float ld(bf16 v) {
  const uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __attribute__((always_inline)) void st(float* p, float v) { *p = v; }
inline __attribute__((always_inline)) void st(bf16* p, float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  *p = static_cast<bf16>((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : r);
}

}  // namespace cpu_bf16
}  // namespace nft_fast
