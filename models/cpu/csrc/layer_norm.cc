// Layer normalization over the last axis, float32, as XLA FFI handlers:
//
//   LayerNormForward   x[N,...,C], scale[C], bias[C] -> y[N,...,C]
//   LayerNormBackward  x, scale, dy[N,...,C]         -> dx[N,...,C], sums[N,2,C]
//
// y = x̂·scale + bias with x̂ = (x − mean)/√(var + epsilon) over each row of C values; the
// gradient recomputes each row's statistics from x (the row is in L1) and writes dx =
// (g − mean(g) − x̂·mean(g·x̂))/√(var + epsilon) with g = dy·scale, and per image the sums
// Σ dy·x̂ and Σ dy (the caller adds the images up into the scale's and bias's gradients, so a
// mesh can shard the batch). One pass over memory each way, where XLA's formulation makes
// several. Rows are split into chunks on OpenMP's threads.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <mutex>

#include <omp.h>

#include "openmp_lock.h"
#include "row_chunks.h"
#include "vector_math.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using transferlab::Rows;
using transferlab::RowsOf;
using transferlab::SameDims;

namespace {

// The mean and 1/√(var + epsilon) of one row (two passes: the row is in L1).
__attribute__((always_inline)) inline void Statistics(const float* x, int64_t c, float epsilon,
                                                      float& mean, float& rstd) {
  float sum = 0.0f, squares = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < c; ++j) sum += x[j];
  mean = sum / c;
#pragma omp simd reduction(+ : squares)
  for (int64_t j = 0; j < c; ++j) squares += (x[j] - mean) * (x[j] - mean);
  rstd = 1.0f / std::sqrt(squares / c + epsilon);
}

TRANSFERLAB_VECTOR_CLONES
void NormalizeRows(const float* x, const float* scale, const float* bias, float* y,
                   int64_t begin, int64_t end, int64_t c, float epsilon) {
  for (int64_t i = begin; i < end; ++i) {
    const float* row = x + i * c;
    float* out = y + i * c;
    float mean, rstd;
    Statistics(row, c, epsilon, mean, rstd);
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) out[j] = (row[j] - mean) * rstd * scale[j] + bias[j];
  }
}

// dx for rows [begin, end), and their Σ dy·x̂ and Σ dy added into sums[0:c] and sums[c:2c].
TRANSFERLAB_VECTOR_CLONES
void GradientRows(const float* x, const float* scale, const float* dy, float* dx, float* sums,
                  int64_t begin, int64_t end, int64_t c, float epsilon) {
  float* scale_sum = sums;
  float* bias_sum = sums + c;
  for (int64_t i = begin; i < end; ++i) {
    const float *row = x + i * c, *grad = dy + i * c;
    float* out = dx + i * c;
    float mean, rstd, g_sum = 0.0f, gx_sum = 0.0f;
    Statistics(row, c, epsilon, mean, rstd);
#pragma omp simd reduction(+ : g_sum, gx_sum)
    for (int64_t j = 0; j < c; ++j) {
      const float normalized = (row[j] - mean) * rstd, g = grad[j] * scale[j];
      g_sum += g;
      gx_sum += g * normalized;
      scale_sum[j] += grad[j] * normalized;
      bias_sum[j] += grad[j];
    }
    const float g_mean = g_sum / c, gx_mean = gx_sum / c;
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) {
      const float normalized = (row[j] - mean) * rstd;
      out[j] = (grad[j] * scale[j] - g_mean - normalized * gx_mean) * rstd;
    }
  }
}

bool Fits(ffi::Span<const int64_t> x, ffi::Span<const int64_t> vector) {
  return x.size() >= 2 && vector.size() == 1 && vector[0] == x.back();
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                   ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y, float epsilon) {
  if (!Fits(x.dimensions(), scale.dimensions()) || !Fits(x.dimensions(), bias.dimensions())) {
    return ffi::Error::InvalidArgument("layer norm: wants x[N,...,C], scale[C], bias[C]");
  }
  const Rows r = RowsOf(x.dimensions());
  const int64_t total = r.images * r.rows, chunk = 64;
  std::lock_guard<std::mutex> lock(transferlab::OpenMpLock());
#pragma omp parallel for schedule(dynamic)
  for (int64_t begin = 0; begin < total; begin += chunk) {
    NormalizeRows(x.typed_data(), scale.typed_data(), bias.typed_data(), y->typed_data(),
                  begin, std::min(total, begin + chunk), r.c, epsilon);
  }
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                    ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dx,
                    ffi::ResultBuffer<ffi::F32> sums, float epsilon) {
  const auto xd = x.dimensions(), sd = sums->dimensions();
  if (!Fits(xd, scale.dimensions()) || !SameDims(xd, dy.dimensions()) || sd.size() != 3 ||
      sd[0] != xd.front() || sd[1] != 2 || sd[2] != xd.back()) {
    return ffi::Error::InvalidArgument(
        "layer norm gradient: wants x, dy[N,...,C], scale[C] -> dx[N,...,C], sums[N,2,C]");
  }
  const Rows r = RowsOf(xd);
  transferlab::PerImageSums(r, 2 * r.c, sums->typed_data(),
                            [&](int64_t begin, int64_t end, float* partial) {
    GradientRows(x.typed_data(), scale.typed_data(), dy.typed_data(), dx->typed_data(), partial,
                 begin, end, r.c, epsilon);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LayerNormForward, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("epsilon"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(LayerNormBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("epsilon"));
