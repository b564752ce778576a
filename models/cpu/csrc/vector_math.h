// Elementwise functions in a form the compiler vectorizes.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

// A function compiled for each level of x86-64 (v4: AVX-512; v3: AVX2 with FMA), the best one
// the CPU has chosen when the library loads. GCC's "avx2" target leaves out FMA: its clones
// would multiply and add apart.
#define TRANSFERLAB_VECTOR_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))

namespace transferlab {

// e^x on [-87, 88] to float precision (clamped outside).
inline float Exp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;  // round to nearest: 1.5·2²³
  const float r = x - n * 0.693145752f - n * 1.42860677e-6f;  // x − n·ln2, in two parts
  const float r2 = r * r;  // Taylor to r⁷ (|r| ≤ ln2/2) in Estrin's order: 4 dependent steps, not 7
  const float p = (1.0f + r) + r2 * ((0.5f + r * (1.0f / 6)) +
                  r2 * ((1.0f / 24 + r * (1.0f / 120)) + r2 * (1.0f / 720 + r * (1.0f / 5040))));
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// f(pre) recovered from an activation's output y = pre·f(pre): y/pre, and ½ where |pre| ≤ 1e-20
// (the sigmoid's and Φ's value at 0), branch-free.
inline float GateFromOutput(float y, float pre) {
  const float away = static_cast<float>(std::fabs(pre) > 1e-20f);
  return away * y / (pre + (1.0f - away)) + (1.0f - away) * 0.5f;
}

}  // namespace transferlab
