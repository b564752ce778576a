// Rows of a float32 array [N, ..., C] (every axis between the first and the last merged), cut
// into chunks for OpenMP's threads, and the per-image sums a gradient pass adds up over them.
#pragma once

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <vector>

#include <omp.h>

#include "openmp_lock.h"
#include "xla/ffi/api/ffi.h"

namespace transferlab {

struct Rows {
  int64_t images, rows, c;  // rows per image, values per row
};

inline Rows RowsOf(xla::ffi::Span<const int64_t> dims) {
  int64_t rows = 1;
  for (size_t d = 1; d + 1 < dims.size(); ++d) rows *= dims[d];
  return {dims.front(), rows, dims.back()};
}

inline bool SameDims(xla::ffi::Span<const int64_t> a, xla::ffi::Span<const int64_t> b) {
  return std::equal(a.begin(), a.end(), b.begin(), b.end());
}

// pass(begin, end, sums) for chunks of each image's rows [begin, end) (numbered over all the
// images) on OpenMP's threads, enough chunks for every thread, each of at least 64 rows; each
// chunk adds its `width` sums into a zeroed buffer of its own, and out[i, 0:width] gets image
// i's total.
template <typename Pass>
void PerImageSums(const Rows& r, int64_t width, float* out, Pass pass) {
  const int64_t wanted = (4 * omp_get_max_threads() + r.images - 1) / r.images;
  const int64_t chunks = std::max<int64_t>(1, std::min(wanted, r.rows / 64));
  const int64_t per_chunk = (r.rows + chunks - 1) / chunks;
  std::vector<float> partial(r.images * chunks * width, 0.0f);
  std::lock_guard<std::mutex> lock(OpenMpLock());
#pragma omp parallel for collapse(2) schedule(dynamic)
  for (int64_t i = 0; i < r.images; ++i) {
    for (int64_t k = 0; k < chunks; ++k) {
      pass(i * r.rows + k * per_chunk, i * r.rows + std::min(r.rows, (k + 1) * per_chunk),
           partial.data() + (i * chunks + k) * width);
    }
  }
  for (int64_t i = 0; i < r.images; ++i) {
    for (int64_t j = 0; j < width; ++j) {
      float total = 0.0f;
      for (int64_t k = 0; k < chunks; ++k) total += partial[(i * chunks + k) * width + j];
      out[i * width + j] = total;
    }
  }
}

}  // namespace transferlab
