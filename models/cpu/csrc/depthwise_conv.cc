// The kernel gradient of a depthwise convolution as an XLA FFI handler:
//
//   DepthwiseBackwardWeights x[N,H,W,C], dy[N,OH,OW,C] -> dw[KH,KW,1,C]
//
// oneDNN 2.6 has a depthwise kernel-gradient kernel for 3x3 windows only; other sizes (the
// 5x5 of EfficientNet and MobileNetV3) fall to its grouped kernel, which works on 16x16
// channel blocks of which a depthwise convolution uses the diagonal.
// Here each (image, block of 16 channels) is one task on OpenMP's threads: for every tap of the
// window, one sweep over the valid output pixels accumulates x * dy in a 16-lane vector; the
// image's slices of x and dy stay in the L2 cache across the taps. The images' partial sums are
// added in order, so the result does not depend on the number of threads.
#include <algorithm>
#include <cstdint>
#include <mutex>
#include <vector>

#include "openmp_lock.h"
#include "vector_math.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 16;

struct Window {
  int64_t n, h, w, c, oh, ow, kh, kw, stride_h, stride_w, pad_top, pad_left;
};

// The output positions o whose input position o * stride + k - pad lies in [0, size).
std::pair<int64_t, int64_t> ValidOutputs(int64_t k, int64_t stride, int64_t pad, int64_t size,
                                         int64_t outputs) {
  const int64_t first = std::max<int64_t>(0, (pad - k + stride - 1) / stride);
  const int64_t last = std::min<int64_t>(outputs, (size - 1 + pad - k) / stride + 1);
  return {first, std::max(first, last)};
}

template <int64_t kWidth>
inline __attribute__((always_inline)) void AccumulateTap(const float* x, const float* dy,
                                                         const Window& g, int64_t i, int64_t j,
                                                         int64_t lanes, float* out) {
  float acc[kWidth] = {};
  const auto [oh0, oh1] = ValidOutputs(i, g.stride_h, g.pad_top, g.h, g.oh);
  const auto [ow0, ow1] = ValidOutputs(j, g.stride_w, g.pad_left, g.w, g.ow);
  for (int64_t oh = oh0; oh < oh1; ++oh) {
    const float* x_row = x + ((oh * g.stride_h + i - g.pad_top) * g.w) * g.c;
    const float* dy_row = dy + oh * g.ow * g.c;
    for (int64_t ow = ow0; ow < ow1; ++ow) {
      const float* xp = x_row + (ow * g.stride_w + j - g.pad_left) * g.c;
      const float* dp = dy_row + ow * g.c;
      if constexpr (kWidth == kLanes) {
        for (int64_t l = 0; l < kLanes; ++l) acc[l] += xp[l] * dp[l];
      } else {
        for (int64_t l = 0; l < lanes; ++l) acc[l] += xp[l] * dp[l];
      }
    }
  }
  std::copy(acc, acc + lanes, out);
}

// partial[n][tap][c]: image n's share of the gradient.
TRANSFERLAB_VECTOR_CLONES
void ImageBlock(const float* x, const float* dy, const Window& g, int64_t n, int64_t block,
                float* partial) {
  const int64_t c0 = block * kLanes, lanes = std::min(kLanes, g.c - c0);
  const float* xn = x + n * g.h * g.w * g.c + c0;
  const float* dyn = dy + n * g.oh * g.ow * g.c + c0;
  for (int64_t i = 0; i < g.kh; ++i) {
    for (int64_t j = 0; j < g.kw; ++j) {
      float* out = partial + (n * g.kh * g.kw + i * g.kw + j) * g.c + c0;
      if (lanes == kLanes) {
        AccumulateTap<kLanes>(xn, dyn, g, i, j, lanes, out);
      } else {
        AccumulateTap<kLanes - 1>(xn, dyn, g, i, j, lanes, out);
      }
    }
  }
}

ffi::Error DepthwiseBackwardWeightsImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                                        ffi::ResultBuffer<ffi::F32> dw, int64_t stride_h,
                                        int64_t stride_w, int64_t pad_top, int64_t pad_bottom,
                                        int64_t pad_left, int64_t pad_right, int64_t groups,
                                        int64_t winograd) {
  const auto xd = x.dimensions(), dyd = dy.dimensions(), wd = dw->dimensions();
  if (xd.size() != 4 || dyd.size() != 4 || wd.size() != 4 || wd[2] != 1 || wd[3] != xd[3] ||
      groups != xd[3] || dyd[3] != xd[3] || dyd[0] != xd[0]) {
    return ffi::Error::InvalidArgument(
        "depthwise kernel gradient: wants x[N,H,W,C], dy[N,OH,OW,C], dw[KH,KW,1,C], groups C");
  }
  const Window g{xd[0], xd[1], xd[2], xd[3], dyd[1], dyd[2], wd[0], wd[1],
                 stride_h, stride_w, pad_top, pad_left};
  const int64_t taps = g.kh * g.kw, blocks = (g.c + kLanes - 1) / kLanes;
  std::vector<float> partial(g.n * taps * g.c);
  std::lock_guard<std::mutex> lock(transferlab::OpenMpLock());
#pragma omp parallel for collapse(2) schedule(dynamic)
  for (int64_t n = 0; n < g.n; ++n) {
    for (int64_t b = 0; b < blocks; ++b) {
      ImageBlock(x.typed_data(), dy.typed_data(), g, n, b, partial.data());
    }
  }
  float* out = dw->typed_data();
  std::fill(out, out + taps * g.c, 0.0f);
  for (int64_t n = 0; n < g.n; ++n) {
    const float* p = partial.data() + n * taps * g.c;
    for (int64_t k = 0; k < taps * g.c; ++k) out[k] += p[k];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DepthwiseBackwardWeights, DepthwiseBackwardWeightsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride_h")
                                  .Attr<int64_t>("stride_w")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_bottom")
                                  .Attr<int64_t>("pad_left")
                                  .Attr<int64_t>("pad_right")
                                  .Attr<int64_t>("groups")
                                  .Attr<int64_t>("winograd"));
