// The per-channel sums of a training-mode batch norm, each in one pass, as XLA FFI handlers:
//
//   BatchNormSums                x[N,...,C]                  -> s[N,2,C]: Σ x, Σ x²
//   BatchNormGradSums            x, dy[N,...,C], affine[3,C] -> s[N,2,C]: Σ dy, Σ dy·(x−mean)
//   BatchNormActivationGradSums  x, y, dy[N,...,C], affine[3,C]
//                                  -> s[N,2,C]: Σ g, Σ g·(x − mean); g[N,...,C]
//
// where affine = (a, b, mean) with a = scale·rstd, b = bias − mean·a, y = act(a·x + b) as the
// forward pass computed it, and g = dy · act'(a·x + b), the gradient at the normalized value of
// the activation (`activation`: 1 relu, 2 relu6, 3 silu, 4 hard_swish). SiLU's derivative
// comes from y, without an exponential. g is written out for the input's gradient: a
// streaming pass over x and g then (XLA:CPU reduces each sum in its own pass).
// Sums run per image (the caller adds the images up, so a mesh can shard the batch) and per
// chunk of rows on OpenMP's threads, in float over 64 rows, then in double.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <cstring>
#include <type_traits>
#include <vector>

#include <omp.h>

#include "openmp_lock.h"
#include "vector_math.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

enum Activation : int64_t { kNone, kRelu, kRelu6, kSilu, kHardSwish };

constexpr int64_t kBlockRows = 64;

// act'(pre), given out = act(pre) as the forward pass computed it. Written without branches
// (comparisons as 0 or 1): GCC leaves a select of constants a branch without AVX-512's masks,
// and the loop scalar.
template <Activation kAct>
inline __attribute__((always_inline)) float Derivative(float pre, float out) {
  if constexpr (kAct == kRelu) return static_cast<float>(pre > 0.0f);
  if constexpr (kAct == kRelu6) {
    return static_cast<float>(pre > 0.0f) * static_cast<float>(pre < 6.0f);
  }
  if constexpr (kAct == kSilu) {  // σ(pre) = out/pre (½ at 0), silu' = σ + out·(1 − σ)
    const float sigmoid = transferlab::GateFromOutput(out, pre);
    return sigmoid + out * (1.0f - sigmoid);
  }
  if constexpr (kAct == kHardSwish) {  // 0 below -3, 1 above 3, (2·pre + 3)/6 between
    const float inside = static_cast<float>(pre >= -3.0f), above = static_cast<float>(pre > 3.0f);
    return inside * (above + (1.0f - above) * (2.0f * pre + 3.0f) / 6.0f);
  }
  return 1.0f;
}

struct Rows {
  int64_t n, rows, c;  // images, rows (pixels) per image, channels
};

// Adds image n's rows [begin, end) into first[c] and second[c] (double).
template <Activation kAct, bool kGrad>
inline __attribute__((always_inline)) void SumRows(const float* x, const float* y,
                                                   const float* dy, float* grad_out,
                                                   const float* affine, const Rows& g,
                                                   int64_t n, int64_t begin, int64_t end,
                                                   float* acc, double* first, double* second) {
  const int64_t c = g.c;
  const float *a = affine, *b = affine + c, *mean = affine + 2 * c;
  for (int64_t r0 = begin; r0 < end; r0 += kBlockRows) {
    std::fill(acc, acc + 2 * c, 0.0f);
    for (int64_t r = r0; r < std::min(end, r0 + kBlockRows); ++r) {
      const float* xr = x + (n * g.rows + r) * c;
      if constexpr (kGrad) {
        const int64_t offset = (n * g.rows + r) * c;
        const float* dyr = dy + offset;
        for (int64_t k = 0; k < c; ++k) {
          float out = 0.0f;  // y and grad_out are null without an activation: never touched then
          if constexpr (kAct == kSilu) out = y[offset + k];
          const float grad = dyr[k] * Derivative<kAct>(a[k] * xr[k] + b[k], out);
          if constexpr (kAct != kNone) grad_out[offset + k] = grad;  // else g is dy
          acc[k] += grad;
          acc[c + k] += grad * (xr[k] - mean[k]);
        }
      } else {
        for (int64_t k = 0; k < c; ++k) {
          acc[k] += xr[k];
          acc[c + k] += xr[k] * xr[k];
        }
      }
    }
    for (int64_t k = 0; k < c; ++k) {
      first[k] += acc[k];
      second[k] += acc[c + k];
    }
  }
}

TRANSFERLAB_VECTOR_CLONES
void SumChunk(const float* x, const float* y, const float* dy, float* grad_out,
              const float* affine, int64_t activation, const Rows& g, int64_t n,
              int64_t begin, int64_t end, double* first, double* second) {
  std::vector<float> acc(2 * g.c);
  const auto run = [&](auto act, auto grad) {
    SumRows<decltype(act)::value, decltype(grad)::value>(x, y, dy, grad_out, affine, g, n,
                                                         begin, end, acc.data(), first, second);
  };
  using Stats = std::false_type;
  using Grad = std::true_type;
  switch (dy == nullptr ? -1 : activation) {
    case -1: return run(std::integral_constant<Activation, kNone>(), Stats());
    case kNone: return run(std::integral_constant<Activation, kNone>(), Grad());
    case kRelu: return run(std::integral_constant<Activation, kRelu>(), Grad());
    case kRelu6: return run(std::integral_constant<Activation, kRelu6>(), Grad());
    case kSilu: return run(std::integral_constant<Activation, kSilu>(), Grad());
    case kHardSwish: return run(std::integral_constant<Activation, kHardSwish>(), Grad());
    default: return;  // refused by the handler
  }
}

ffi::Error Sums(const float* x, const float* y, const float* dy, float* grad_out,
                const float* affine, int64_t activation, ffi::Span<const int64_t> dims,
                ffi::ResultBuffer<ffi::F32> out) {
  const int64_t c = dims.back(), n = dims.front();
  int64_t rows = 1;
  for (size_t d = 1; d + 1 < dims.size(); ++d) rows *= dims[d];
  const Rows g{n, rows, c};
  // enough chunks for every thread, each of at least a few blocks
  const int64_t chunks = std::max<int64_t>(
      1, std::min((4 * omp_get_max_threads() + n - 1) / n, rows / (4 * kBlockRows)));
  const int64_t per_chunk = (rows + chunks - 1) / chunks;
  std::vector<double> partial(n * chunks * 2 * c, 0.0);
  std::lock_guard<std::mutex> lock(transferlab::OpenMpLock());
#pragma omp parallel for collapse(2) schedule(dynamic)
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t k = 0; k < chunks; ++k) {
      double* p = partial.data() + (i * chunks + k) * 2 * c;
      SumChunk(x, y, dy, grad_out, affine, activation, g, i, k * per_chunk,
               std::min(rows, (k + 1) * per_chunk), p, p + c);
    }
  }
  float* o = out->typed_data();
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < 2 * c; ++j) {
      double total = 0.0;
      for (int64_t k = 0; k < chunks; ++k) total += partial[(i * chunks + k) * 2 * c + j];
      o[i * 2 * c + j] = static_cast<float>(total);
    }
  }
  return ffi::Error::Success();
}

bool SumsShape(ffi::Span<const int64_t> dims, ffi::Span<const int64_t> out) {
  return dims.size() >= 2 && out.size() == 3 && out[0] == dims.front() && out[1] == 2 &&
         out[2] == dims.back();
}

ffi::Error BatchNormSumsImpl(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> out) {
  if (!SumsShape(x.dimensions(), out->dimensions())) {
    return ffi::Error::InvalidArgument("batch norm sums: wants x[N,...,C] -> s[N,2,C]");
  }
  return Sums(x.typed_data(), nullptr, nullptr, nullptr, nullptr, kNone, x.dimensions(), out);
}

bool SameShapes(ffi::Span<const int64_t> x, ffi::Span<const int64_t> y) {
  return std::equal(x.begin(), x.end(), y.begin(), y.end());
}

ffi::Error GradSums(ffi::Buffer<ffi::F32> x, const float* y, ffi::Buffer<ffi::F32> dy,
                    ffi::Buffer<ffi::F32> affine, ffi::ResultBuffer<ffi::F32> out, float* grad_out,
                    int64_t activation) {
  const auto xd = x.dimensions(), ad = affine.dimensions();
  if (!SumsShape(xd, out->dimensions()) || !SameShapes(xd, dy.dimensions()) || ad.size() != 2 ||
      ad[0] != 3 || ad[1] != xd.back()) {
    return ffi::Error::InvalidArgument(
        "batch norm gradient sums: wants x, dy[N,...,C], affine[3,C] -> s[N,2,C]");
  }
  return Sums(x.typed_data(), y, dy.typed_data(), grad_out, affine.typed_data(), activation, xd,
              out);
}

ffi::Error BatchNormGradSumsImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                                 ffi::Buffer<ffi::F32> affine, ffi::ResultBuffer<ffi::F32> out) {
  return GradSums(x, nullptr, dy, affine, out, nullptr, kNone);
}

ffi::Error BatchNormActivationGradSumsImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> y,
                                           ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> affine,
                                           ffi::ResultBuffer<ffi::F32> out,
                                           ffi::ResultBuffer<ffi::F32> grad, int64_t activation) {
  if (activation < kRelu || activation > kHardSwish) {
    return ffi::Error::InvalidArgument("batch norm gradient sums: activation must be 1-4");
  }
  if (!SameShapes(x.dimensions(), y.dimensions()) ||
      !SameShapes(x.dimensions(), grad->dimensions())) {
    return ffi::Error::InvalidArgument("batch norm gradient sums: y and g must have x's shape");
  }
  return GradSums(x, y.typed_data(), dy, affine, out, grad->typed_data(), activation);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BatchNormSums, BatchNormSumsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(BatchNormGradSums, BatchNormGradSumsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(BatchNormActivationGradSums, BatchNormActivationGradSumsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("activation"));
