// Float32 matrix products on Intel MKL's sgemm (the kernels PyTorch's Linear layers run on the
// CPU), as an XLA FFI handler; built only where the `mkl` wheel is installed:
//
//   MklSgemm  a, b -> c: c = op(a)·op(b), each operand taken as a matrix (all axes but the
//             last merged into rows), op(x) = xᵀ where `transpose_a` / `transpose_b` is set.
//
// A Dense layer's three passes are its three forms: x·w, g·wᵀ and xᵀ·g, the transposed
// operands read in place. MKL runs on GNU OpenMP's threads (the team oneDNN's calls use), one
// call at a time under the OpenMP lock.
#include <cstdint>
#include <mutex>

#include "openmp_lock.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

extern "C" {
// From MKL's mkl_cblas.h and mkl_service.h (the wheel ships no headers).
void cblas_sgemm(int layout, int transa, int transb, int m, int n, int k, float alpha,
                 const float* a, int lda, const float* b, int ldb, float beta, float* c,
                 int ldc);
int MKL_Set_Threading_Layer(int layer);
}

namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kThreadingGnu = 3;

struct Matrix {
  int64_t rows, cols;
};

Matrix MatrixOf(ffi::Span<const int64_t> dims) {
  int64_t rows = 1;
  for (size_t d = 0; d + 1 < dims.size(); ++d) rows *= dims[d];
  return {rows, dims.size() == 0 ? 1 : dims.back()};
}

ffi::Error Sgemm(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> c,
                 bool transpose_a, bool transpose_b) {
  const Matrix am = MatrixOf(a.dimensions()), bm = MatrixOf(b.dimensions());
  const Matrix cm = MatrixOf(c->dimensions());
  const int64_t m = transpose_a ? am.cols : am.rows, k = transpose_a ? am.rows : am.cols;
  const int64_t n = transpose_b ? bm.rows : bm.cols;
  if ((transpose_b ? bm.cols : bm.rows) != k || cm.rows != m || cm.cols != n) {
    return ffi::Error::InvalidArgument("MKL sgemm: the operands' shapes do not multiply");
  }
  static std::once_flag threading;
  std::call_once(threading, [] { MKL_Set_Threading_Layer(kThreadingGnu); });
  std::lock_guard<std::mutex> lock(transferlab::OpenMpLock());
  cblas_sgemm(kRowMajor, transpose_a ? kTrans : kNoTrans, transpose_b ? kTrans : kNoTrans, m, n,
              k, 1.0f, a.typed_data(), am.cols, b.typed_data(), bm.cols, 0.0f,
              c->typed_data(), cm.cols);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MklSgemm, Sgemm,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b"));
