// Multi-head self-attention (no mask, no dropout), float32, as XLA FFI handlers:
//
//   AttentionForward   qkv[B,T,3,H,D], bias[3,H,D]              -> o[B,T,H,D], p[B,H,T,T]
//   AttentionBackward  qkv, bias, p, do[B,T,H,D]                -> dqkv[B,T,3,H,D],
//                                                                  sums[B,3,H,D]
//
// o = p·v with p = softmax(q·kᵀ/√D) for each image and head, q, k and v read in place from
// the one array a Dense layer with the three kernels side by side writes, their biases added
// on the way (and their gradients written likewise, for the product back through those
// kernels, with each image's Σ over its tokens: the biases' gradients). p, the probabilities,
// goes to memory once for the gradient, which then recomputes neither the logits' product nor
// the exponentials. Each (image, head) is one task on OpenMP's threads, its T×T arrays in
// the core's cache from one product to the next: the gradient's dv = pᵀ·do, dp = do·vᵀ,
// ds = p⊙(dp − Σ dp⊙p)/√D, dq = ds·k and dk = dsᵀ·q likewise, where XLA's formulation makes
// a pass over memory for each step. The products are oneDNN's matmul primitives, built once
// per shape, single-threaded in the tasks, on contiguous copies of the head's rows (oneDNN
// runs its brgemm kernels on those with AVX-512, its jit gemm with AVX2).
#include "attention.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include <omp.h>

#include "oneapi/dnnl/dnnl.hpp"
#include "openmp_lock.h"
#include "vector_math.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;

struct Heads {
  int64_t t, h, d;  // tokens, heads, depth
  bool operator<(const Heads& o) const { return std::tie(t, h, d) < std::tie(o.t, o.h, o.d); }
};

// A rows × cols matrix inside a buffer, with the given row and column strides.
memory::desc Matrix(int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride) {
  return memory::desc({1, rows, cols}, memory::data_type::f32,
                      {rows * cols, row_stride, col_stride});
}

struct Product {
  dnnl::matmul primitive;
  memory::desc a, b, c, scratchpad;
  std::string implementation;
};

// The three products of a head: x·yᵀ (t×d by d×t, the logits q·kᵀ and dp = do·vᵀ), p·y
// (t×t by t×d: o = p·v, dq = ds·k) and pᵀ·y (t×t by t×d: dv = pᵀ·do, dk = dsᵀ·q).
struct Products {
  Product scores, mix, mix_transposed;
};

// One thread's buffers: its scratchpad, a task's dp (then ds), and the task's rows of q, k, v,
// do and of the results (o; dq, dk, dv), each contiguous.
struct Worker {
  dnnl::stream stream;
  std::vector<char> scratchpad;
  std::vector<float> grad, q, k, v, dout, out, dq, dk, dv;
};

struct State {
  dnnl::engine engine{dnnl::engine::kind::cpu, 0};
  std::map<Heads, std::unique_ptr<Products>> products;
  std::vector<std::unique_ptr<Worker>> workers;
};

State& state() {
  static State* s = new State();
  return *s;
}

Product MakeProduct(const memory::desc& a, const memory::desc& b, const memory::desc& c) {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a, b, c), attr, state().engine);
  return {dnnl::matmul(pd), a, b, c, pd.scratchpad_desc(), pd.impl_info_str()};
}

Products& ProductsFor(const Heads& x) {
  auto& cache = state().products;
  auto it = cache.find(x);
  if (it != cache.end()) return *it->second;
  const memory::desc rows = Matrix(x.t, x.d, x.d, 1), rows_t = Matrix(x.d, x.t, 1, x.d);
  const memory::desc p = Matrix(x.t, x.t, x.t, 1), p_t = Matrix(x.t, x.t, 1, x.t);
  auto products = std::make_unique<Products>(Products{
      MakeProduct(rows, rows_t, p), MakeProduct(p, rows, rows), MakeProduct(p_t, rows, rows)});
  return *cache.emplace(x, std::move(products)).first->second;
}

// One worker per OpenMP thread, each with room for the largest scratchpad and one task's dp.
std::vector<std::unique_ptr<Worker>>& Workers(const Products& p, const Heads& x) {
  auto& workers = state().workers;
  while (static_cast<int>(workers.size()) < omp_get_max_threads()) {
    workers.push_back(std::make_unique<Worker>(Worker{dnnl::stream(state().engine), {}, {}}));
  }
  size_t scratchpad = 0;
  for (const Product* q : {&p.scores, &p.mix, &p.mix_transposed}) {
    scratchpad = std::max(scratchpad, q->scratchpad.get_size());
  }
  for (auto& w : workers) {
    if (w->scratchpad.size() < scratchpad) w->scratchpad.resize(scratchpad);
    if (w->grad.size() < static_cast<size_t>(x.t * x.t)) w->grad.resize(x.t * x.t);
    for (auto* buffer : {&w->q, &w->k, &w->v, &w->dout, &w->out, &w->dq, &w->dk, &w->dv}) {
      if (buffer->size() < static_cast<size_t>(x.t * x.d)) buffer->resize(x.t * x.d);
    }
  }
  return workers;
}

void Multiply(const Product& p, Worker& w, const float* a, const float* b, float* c) {
  const dnnl::engine& e = state().engine;
  memory am(p.a, e, const_cast<float*>(a)), bm(p.b, e, const_cast<float*>(b)), cm(p.c, e, c);
  memory sm(p.scratchpad, e, w.scratchpad.data());
  p.primitive.execute(w.stream, {{DNNL_ARG_SRC, am}, {DNNL_ARG_WEIGHTS, bm},
                                 {DNNL_ARG_DST, cm}, {DNNL_ARG_SCRATCHPAD, sm}});
}

// A head's rows × depth values, `stride` apart, copied to or from a contiguous buffer.
void Gather(const float* head, int64_t rows, int64_t depth, int64_t stride, float* out) {
  for (int64_t r = 0; r < rows; ++r) std::memcpy(out + r * depth, head + r * stride, depth * 4);
}

// Gather's copy, plus a depth-long bias to each row.
void GatherBiased(const float* head, const float* bias, int64_t rows, int64_t depth,
                  int64_t stride, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
    for (int64_t c = 0; c < depth; ++c) out[r * depth + c] = head[r * stride + c] + bias[c];
  }
}

// The sum of a contiguous rows × depth buffer's rows.
void SumRows(const float* in, int64_t rows, int64_t depth, float* out) {
  std::fill(out, out + depth, 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
    for (int64_t c = 0; c < depth; ++c) out[c] += in[r * depth + c];
  }
}

void Scatter(const float* in, int64_t rows, int64_t depth, int64_t stride, float* head) {
  for (int64_t r = 0; r < rows; ++r) std::memcpy(head + r * stride, in + r * depth, depth * 4);
}

// Where head j of image i starts: its q in qkv (k and v follow, `width` = H·D apart; rows
// `3·width` apart) and in dqkv, its q's bias (k's and v's follow, `width` apart), its sums
// (likewise, in image i's), its o in o and do (rows `width` apart), and its p.
struct Head {
  int64_t width, qkv, bias, sums, o, p;
};

Head HeadAt(const Heads& x, int64_t i, int64_t j) {
  const int64_t width = x.h * x.d;
  return {width, i * x.t * 3 * width + j * x.d, j * x.d, i * 3 * width + j * x.d,
          i * x.t * width + j * x.d, (i * x.h + j) * x.t * x.t};
}

// The head's rows of q, k and v, their biases added, in the worker's contiguous buffers.
void GatherQkv(const Heads& x, const Head& at, const float* qkv, const float* bias, Worker& w) {
  const float *q = qkv + at.qkv, *b = bias + at.bias;
  GatherBiased(q, b, x.t, x.d, 3 * at.width, w.q.data());
  GatherBiased(q + at.width, b + at.width, x.t, x.d, 3 * at.width, w.k.data());
  GatherBiased(q + 2 * at.width, b + 2 * at.width, x.t, x.d, 3 * at.width, w.v.data());
}

// Each row of `p` (rows × cols) replaced by softmax(scale · row).
TRANSFERLAB_VECTOR_CLONES
void SoftmaxRows(float* p, int64_t rows, int64_t cols, float scale) {
  for (int64_t i = 0; i < rows; ++i) {
    float* row = p + i * cols;
    float top = row[0], sum = 0.0f;
#pragma omp simd reduction(max : top)  // a comparison: GCC leaves std::max's reduction scalar
    for (int64_t j = 0; j < cols; ++j) top = row[j] > top ? row[j] : top;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < cols; ++j) {
      row[j] = transferlab::Exp((row[j] - top) * scale);
      sum += row[j];
    }
    const float inverse = 1.0f / sum;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) row[j] *= inverse;
  }
}

// dp (the gradient at the softmax's output) replaced by scale · p ⊙ (dp − Σ_row dp ⊙ p): the
// gradient at q·kᵀ.
TRANSFERLAB_VECTOR_CLONES
void SoftmaxGradRows(const float* p, float* dp, int64_t rows, int64_t cols, float scale) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* y = p + i * cols;
    float* g = dp + i * cols;
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < cols; ++j) dot += g[j] * y[j];
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) g[j] = scale * y[j] * (g[j] - dot);
  }
}

// Runs task(worker, image, head) for every (image, head) on OpenMP's threads.
template <typename Task>
ffi::Error ForEachHead(const char* what, int64_t images, const Heads& x, Task task) {
  std::lock_guard<std::mutex> lock(transferlab::OpenMpLock());
  std::string error;
  try {
    Products& products = ProductsFor(x);
    auto& workers = Workers(products, x);
#pragma omp parallel for schedule(dynamic)
    for (int64_t n = 0; n < images * x.h; ++n) {
      try {
        task(products, *workers[omp_get_thread_num()], n / x.h, n % x.h);
      } catch (const dnnl::error& e) {
#pragma omp critical
        error = e.what();
      }
    }
  } catch (const dnnl::error& e) {
    error = e.what();
  }
  if (!error.empty()) return ffi::Error::Internal(std::string(what) + error);
  return ffi::Error::Success();
}

// The heads of qkv[B,T,3,H,D], or false if the shape does not fit.
bool HeadsOf(ffi::Span<const int64_t> qkv, Heads& x) {
  if (qkv.size() != 5 || qkv[2] != 3) return false;
  x = {qkv[1], qkv[3], qkv[4]};
  return true;
}

// Whether `o` is qkv's [B,T,H,D] (the attention's output, or its gradient), `p` its
// [B,H,T,T] and `bias` its [3,H,D].
bool FitsQkv(ffi::Span<const int64_t> qkv, ffi::Span<const int64_t> bias,
             ffi::Span<const int64_t> o, ffi::Span<const int64_t> p) {
  const int64_t b = qkv[0], t = qkv[1], h = qkv[3], d = qkv[4];
  return o.size() == 4 && o[0] == b && o[1] == t && o[2] == h && o[3] == d && p.size() == 4 &&
         p[0] == b && p[1] == h && p[2] == t && p[3] == t &&
         std::equal(bias.begin(), bias.end(), qkv.begin() + 2, qkv.end());
}

ffi::Error Forward(ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> bias,
                   ffi::ResultBuffer<ffi::F32> o, ffi::ResultBuffer<ffi::F32> probabilities) {
  Heads x;
  if (!HeadsOf(qkv.dimensions(), x) || !FitsQkv(qkv.dimensions(), bias.dimensions(),
                                                o->dimensions(), probabilities->dimensions())) {
    return ffi::Error::InvalidArgument(
        "attention: wants qkv[B,T,3,H,D], bias[3,H,D] -> o[B,T,H,D], p[B,H,T,T]");
  }
  const float scale = 1.0f / std::sqrt(static_cast<float>(x.d));
  const float *in = qkv.typed_data(), *biases = bias.typed_data();
  float *od = o->typed_data(), *pd = probabilities->typed_data();
  return ForEachHead("attention: ", qkv.dimensions()[0], x,
                     [&](const Products& m, Worker& w, int64_t i, int64_t j) {
    const Head at = HeadAt(x, i, j);
    float* p = pd + at.p;
    GatherQkv(x, at, in, biases, w);
    Multiply(m.scores, w, w.q.data(), w.k.data(), p);
    SoftmaxRows(p, x.t, x.t, scale);
    Multiply(m.mix, w, p, w.v.data(), w.out.data());
    Scatter(w.out.data(), x.t, x.d, at.width, od + at.o);
  });
}

ffi::Error Backward(ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> bias,
                    ffi::Buffer<ffi::F32> probabilities, ffi::Buffer<ffi::F32> dout,
                    ffi::ResultBuffer<ffi::F32> dqkv, ffi::ResultBuffer<ffi::F32> sums) {
  Heads x;
  const auto dims = qkv.dimensions(), grad_dims = dqkv->dimensions();
  const auto sum_dims = sums->dimensions();
  if (!HeadsOf(dims, x) ||
      !FitsQkv(dims, bias.dimensions(), dout.dimensions(), probabilities.dimensions()) ||
      !std::equal(dims.begin(), dims.end(), grad_dims.begin(), grad_dims.end()) ||
      sum_dims.size() != 4 || sum_dims[0] != dims[0] ||
      !std::equal(sum_dims.begin() + 1, sum_dims.end(), dims.begin() + 2, dims.end())) {
    return ffi::Error::InvalidArgument(
        "attention gradient: wants qkv[B,T,3,H,D], bias[3,H,D], p[B,H,T,T], do[B,T,H,D] -> "
        "dqkv[B,T,3,H,D], sums[B,3,H,D]");
  }
  const float scale = 1.0f / std::sqrt(static_cast<float>(x.d));
  const float *in = qkv.typed_data(), *biases = bias.typed_data(),
              *pd = probabilities.typed_data(), *dod = dout.typed_data();
  float *grads = dqkv->typed_data(), *bias_grads = sums->typed_data();
  return ForEachHead("attention gradient: ", dims[0], x,
                     [&](const Products& m, Worker& w, int64_t i, int64_t j) {
    const Head at = HeadAt(x, i, j);
    const float* p = pd + at.p;
    float *grad = w.grad.data(), *qc = w.q.data(), *kc = w.k.data(), *vc = w.v.data(),
          *doc = w.dout.data();
    GatherQkv(x, at, in, biases, w);
    Gather(dod + at.o, x.t, x.d, at.width, doc);
    Multiply(m.mix_transposed, w, p, doc, w.dv.data());
    Multiply(m.scores, w, doc, vc, grad);
    SoftmaxGradRows(p, grad, x.t, x.t, scale);
    Multiply(m.mix, w, grad, kc, w.dq.data());
    Multiply(m.mix_transposed, w, grad, qc, w.dk.data());
    float *dq = grads + at.qkv, *dq_sum = bias_grads + at.sums;
    const float* results[] = {w.dq.data(), w.dk.data(), w.dv.data()};
    for (int part = 0; part < 3; ++part) {
      Scatter(results[part], x.t, x.d, 3 * at.width, dq + part * at.width);
      SumRows(results[part], x.t, x.d, dq_sum + part * at.width);
    }
  });
}

}  // namespace

namespace transferlab {

std::string AttentionImplementations() {
  std::string text;
  for (const auto& entry : state().products) {
    const Products& p = *entry.second;
    for (const Product* q : {&p.scores, &p.mix, &p.mix_transposed}) {
      text += "attention " + q->implementation + "\n";
    }
  }
  return text;
}

}  // namespace transferlab

XLA_FFI_DEFINE_HANDLER_SYMBOL(AttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(AttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
