// The gradient of the exact GELU at a Dense layer's output, float32, as an XLA FFI handler:
//
//   GeluBackward  x, bias[C], y, dy[N,...,C] -> du[N,...,C], sums[N,C]
//
// u = x + bias (the bias added on the fly: the forward pass need not write u), y = gelu(u) =
// u·Φ(u) the forward pass's output (kept anyway: the next layer's input), Φ the standard
// normal's distribution function. du = dy·(Φ(u) + u·φ(u)) takes Φ(u) = y/u (½
// where |u| ≤ 1e-20) and the density φ(u) = exp(−u²/2)/√(2π): one exponential, where XLA's
// gradient computes erf and an exponential. sums holds each image's Σ du over its rows (the
// bias's gradient, which the caller sums over the images, so that a mesh can shard the
// batch). One pass over memory on OpenMP's threads.
#include <cmath>
#include <cstdint>

#include "row_chunks.h"
#include "vector_math.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr float kInvSqrt2Pi = 0.39894228f;

// du for rows [begin, end), added up into sums[0:c].
TRANSFERLAB_VECTOR_CLONES
void GradientRows(const float* x, const float* bias, const float* y, const float* dy, float* du,
                  float* sums, int64_t begin, int64_t end, int64_t c) {
  for (int64_t i = begin * c; i < end * c; i += c) {
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) {
      const float pre = x[i + j] + bias[j], cdf = transferlab::GateFromOutput(y[i + j], pre);
      // φ is 0 past |u| = 13 (below e⁻⁸⁴): Exp's clamp at e⁻⁸⁷ would leave u·φ(u) far from 0
      // for huge u.
      const float near = static_cast<float>(std::fabs(pre) < 13.0f);
      const float density = near * transferlab::Exp(-0.5f * pre * pre) * kInvSqrt2Pi;
      du[i + j] = dy[i + j] * (cdf + pre * density);
      sums[j] += du[i + j];
    }
  }
}

ffi::Error Backward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> bias,
                    ffi::Buffer<ffi::F32> y, ffi::Buffer<ffi::F32> dy,
                    ffi::ResultBuffer<ffi::F32> du, ffi::ResultBuffer<ffi::F32> sums) {
  const auto ud = x.dimensions(), sd = sums->dimensions(), bd = bias.dimensions();
  if (ud.size() < 2 || bd.size() != 1 || bd[0] != ud.back() ||
      !transferlab::SameDims(ud, y.dimensions()) ||
      !transferlab::SameDims(ud, dy.dimensions()) || sd.size() != 2 || sd[0] != ud.front() ||
      sd[1] != ud.back()) {
    return ffi::Error::InvalidArgument(
        "gelu gradient: wants x, y, dy[N,...,C], bias[C] -> du[N,...,C], sums[N,C]");
  }
  const transferlab::Rows r = transferlab::RowsOf(ud);
  transferlab::PerImageSums(r, r.c, sums->typed_data(),
                            [&](int64_t begin, int64_t end, float* partial) {
    GradientRows(x.typed_data(), bias.typed_data(), y.typed_data(), dy.typed_data(),
                 du->typed_data(), partial, begin, end, r.c);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GeluBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
