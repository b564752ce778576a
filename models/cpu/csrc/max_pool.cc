// Max pooling and its gradient as XLA FFI handlers:
//
//   MaxPoolForward   x[N,H,W,C] -> y[N,OH,OW,C]
//   MaxPoolBackward  x[N,H,W,C], y[N,OH,OW,C], dy[N,OH,OW,C] -> dx[N,H,W,C]
//
// Taps in the padding hold -inf: they never win. The forward pass is one pass over x, NaN
// winning as in XLA's max. Each output's gradient goes to the first tap (row-major) of its
// window whose input equals the output, as PyTorch's MaxPool2d, in one pass over x and dy.
// Tasks are (image, block of channels) on OpenMP's threads: windows overlap in space only, so no two
// tasks write the same element.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <mutex>
#include <utility>
#include <vector>

#include "openmp_lock.h"
#include "vector_math.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kChannelBlock = 64;

struct Pool {
  int64_t h, w, c, oh, ow, window_h, window_w, stride_h, stride_w, pad_top, pad_left;
};

TRANSFERLAB_VECTOR_CLONES
void ImageBlock(const float* x, const float* y, const float* dy, const Pool& p, int64_t c0,
                int64_t lanes, float* dx) {
  float pending[kChannelBlock];  // 1 until the output's gradient has found its tap
  for (int64_t i = 0; i < p.h * p.w; ++i) {
    std::fill(dx + i * p.c + c0, dx + i * p.c + c0 + lanes, 0.0f);
  }
  for (int64_t oh = 0; oh < p.oh; ++oh) {
    for (int64_t ow = 0; ow < p.ow; ++ow) {
      const float* yo = y + (oh * p.ow + ow) * p.c + c0;
      const float* go = dy + (oh * p.ow + ow) * p.c + c0;
      std::fill(pending, pending + lanes, 1.0f);
      for (int64_t i = 0; i < p.window_h; ++i) {
        const int64_t ih = oh * p.stride_h + i - p.pad_top;
        if (ih < 0 || ih >= p.h) continue;
        for (int64_t j = 0; j < p.window_w; ++j) {
          const int64_t iw = ow * p.stride_w + j - p.pad_left;
          if (iw < 0 || iw >= p.w) continue;
          const float* xi = x + (ih * p.w + iw) * p.c + c0;
          float* di = dx + (ih * p.w + iw) * p.c + c0;
          for (int64_t k = 0; k < lanes; ++k) {  // branch-free, so that it vectorizes
            const bool wins = (xi[k] == yo[k]) & (pending[k] != 0.0f);
            di[k] += wins ? go[k] : 0.0f;
            pending[k] = wins ? 0.0f : pending[k];
          }
        }
      }
    }
  }
}

TRANSFERLAB_VECTOR_CLONES
void ForwardImageBlock(const float* x, const Pool& p, int64_t c0, int64_t lanes, float* y) {
  for (int64_t oh = 0; oh < p.oh; ++oh) {
    for (int64_t ow = 0; ow < p.ow; ++ow) {
      float* yo = y + (oh * p.ow + ow) * p.c + c0;
      std::fill(yo, yo + lanes, -std::numeric_limits<float>::infinity());
      for (int64_t i = 0; i < p.window_h; ++i) {
        const int64_t ih = oh * p.stride_h + i - p.pad_top;
        if (ih < 0 || ih >= p.h) continue;
        for (int64_t j = 0; j < p.window_w; ++j) {
          const int64_t iw = ow * p.stride_w + j - p.pad_left;
          if (iw < 0 || iw >= p.w) continue;
          const float* xi = x + (ih * p.w + iw) * p.c + c0;
          for (int64_t k = 0; k < lanes; ++k) {  // NaN wins, as in XLA's max
            yo[k] = (xi[k] > yo[k]) | (xi[k] != xi[k]) ? xi[k] : yo[k];
          }
        }
      }
    }
  }
}

// Tasks of (image, block of channels) on OpenMP's threads, each calling task(n, c0, lanes).
template <typename Task>
void ForEachImageBlock(int64_t images, int64_t channels, Task task) {
  const int64_t blocks = (channels + kChannelBlock - 1) / kChannelBlock;
  std::lock_guard<std::mutex> lock(transferlab::OpenMpLock());
#pragma omp parallel for collapse(2) schedule(dynamic)
  for (int64_t n = 0; n < images; ++n) {
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t c0 = b * kChannelBlock;
      task(n, c0, std::min(kChannelBlock, channels - c0));
    }
  }
}

ffi::Error MaxPoolForwardImpl(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y,
                              int64_t window_h, int64_t window_w, int64_t stride_h,
                              int64_t stride_w, int64_t pad_top, int64_t pad_left) {
  const auto xd = x.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || yd.size() != 4 || yd[0] != xd[0] || yd[3] != xd[3]) {
    return ffi::Error::InvalidArgument("max pool: wants x[N,H,W,C] -> y[N,OH,OW,C]");
  }
  const Pool p{xd[1], xd[2], xd[3], yd[1], yd[2], window_h, window_w,
               stride_h, stride_w, pad_top, pad_left};
  ForEachImageBlock(xd[0], p.c, [&](int64_t n, int64_t c0, int64_t lanes) {
    ForwardImageBlock(x.typed_data() + n * p.h * p.w * p.c, p, c0, lanes,
                      y->typed_data() + n * p.oh * p.ow * p.c);
  });
  return ffi::Error::Success();
}

ffi::Error MaxPoolBackwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> y,
                               ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dx,
                               int64_t window_h, int64_t window_w, int64_t stride_h,
                               int64_t stride_w, int64_t pad_top, int64_t pad_left) {
  const auto xd = x.dimensions(), yd = y.dimensions();
  if (xd.size() != 4 || yd.size() != 4 || yd[0] != xd[0] || yd[3] != xd[3] ||
      !std::equal(yd.begin(), yd.end(), dy.dimensions().begin(), dy.dimensions().end())) {
    return ffi::Error::InvalidArgument(
        "max pool gradient: wants x[N,H,W,C], y and dy[N,OH,OW,C] -> dx[N,H,W,C]");
  }
  const Pool p{xd[1], xd[2], xd[3], yd[1], yd[2], window_h, window_w,
               stride_h, stride_w, pad_top, pad_left};
  ForEachImageBlock(xd[0], p.c, [&](int64_t n, int64_t c0, int64_t lanes) {
    ImageBlock(x.typed_data() + n * p.h * p.w * p.c, y.typed_data() + n * p.oh * p.ow * p.c,
               dy.typed_data() + n * p.oh * p.ow * p.c, p, c0, lanes,
               dx->typed_data() + n * p.h * p.w * p.c);
  });
  return ffi::Error::Success();
}

// Both handlers' window, after their buffers: the arguments `Pool` is made of.
template <typename Binding>
auto WithPoolAttributes(Binding binding) {
  return std::move(binding)
      .template Attr<int64_t>("window_h")
      .template Attr<int64_t>("window_w")
      .template Attr<int64_t>("stride_h")
      .template Attr<int64_t>("stride_w")
      .template Attr<int64_t>("pad_top")
      .template Attr<int64_t>("pad_left");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MaxPoolForward, MaxPoolForwardImpl,
                              WithPoolAttributes(ffi::Ffi::Bind()
                                                     .Arg<ffi::Buffer<ffi::F32>>()
                                                     .Ret<ffi::Buffer<ffi::F32>>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MaxPoolBackward, MaxPoolBackwardImpl,
                              WithPoolAttributes(ffi::Ffi::Bind()
                                                     .Arg<ffi::Buffer<ffi::F32>>()
                                                     .Arg<ffi::Buffer<ffi::F32>>()
                                                     .Arg<ffi::Buffer<ffi::F32>>()
                                                     .Ret<ffi::Buffer<ffi::F32>>()));
