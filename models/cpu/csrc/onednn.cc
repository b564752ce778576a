// oneDNN's convolutions and batched matrix products as XLA FFI handlers, float32.
//
// Convolutions: NHWC activations, HWIO kernels (I the input channels of a group), any groups
// (depthwise too), strides and explicit (asymmetric) padding, no dilation.
//
//   OnednnConvForward        x[N,H,W,I], w[KH,KW,I,O]  -> y[N,OH,OW,O]
//   OnednnConvBackwardData   dy[N,OH,OW,O], w          -> dx[N,H,W,I]
//   OnednnConvBackwardWeights x, dy                     -> dw[KH,KW,I,O]
//
//   OnednnMatmul             a, b -> c, rank 4: c'[i,j] = a'[i,j] @ b'[i,j] over two batch
//                            axes, where each operand x' is a view of its buffer x with
//                            x'.shape[d] = x.shape[x_axes[d]] (`a_axes`, `b_axes`, `out_axes`):
//                            attention's products read and write (batch, tokens, heads, depth)
//                            activations in place, and a product's gradients need no transposed
//                            copies.
//
// Activations stay in the buffers' NHWC layout; the kernel takes the layout oneDNN
// prefers, reordered on each call. With the `winograd` attribute set, a 3x3 stride-1
// ungrouped convolution runs oneDNN's Winograd F(4x4, 3x3) kernels (in their own blocked
// layout; errors about 3e-6 of the largest output), falling back to direct where oneDNN has
// none for the machine.
// Primitives are built once per shape and cached; all calls are serialised, each using oneDNN's
// own (OpenMP) threads, and they share a user scratchpad (XLA calls from any of its threads,
// and oneDNN's library scratchpad belongs to a thread) and one buffer per reordered operand.
#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <tuple>

#include "attention.h"
#include "oneapi/dnnl/dnnl.hpp"
#include "openmp_lock.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;
using Tag = memory::format_tag;
using Dims4 = std::array<int64_t, 4>;

enum class Pass { kForward, kBackwardData, kBackwardWeights };

struct Geometry {
  Dims4 a, b, out;  // the handler's two operands and its result, as XLA lays them out
  // stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right, groups, winograd
  std::array<int64_t, 8> window;
  bool operator<(const Geometry& o) const {
    return std::tie(a, b, out, window) < std::tie(o.a, o.b, o.out, o.window);
  }
};

// A primitive operand: the XLA buffer, and where oneDNN wants another layout, its own
// memory with the reorder between the two.
dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

// A buffer that grows to the largest request. The primitives share one per role: calls are
// serialised, and a primitive's reordered operands and scratchpads live only for its call.
class Arena {
 public:
  void* Get(size_t bytes) {
    if (bytes > size_) {
      size_ = (bytes + 63) / 64 * 64;
      data_.reset(static_cast<char*>(std::aligned_alloc(64, size_)));
      if (!data_) throw std::bad_alloc();
    }
    return data_.get();
  }

 private:
  std::unique_ptr<char, decltype(&std::free)> data_{nullptr, &std::free};
  size_t size_ = 0;
};

void Place(memory& m, Arena& arena) {
  const size_t bytes = m.get_desc().get_size();
  if (bytes > 0) m.set_data_handle(arena.Get(bytes));
}

struct Operand {
  int arg = 0;
  memory buffer, internal, scratchpad;
  dnnl::reorder reorder;
  bool reordered = false;

  void Set(int arg_id, const memory::desc& buffer_md, const memory::desc& wanted,
           bool output, const dnnl::engine& engine) {
    arg = arg_id;
    buffer = memory(buffer_md, engine, DNNL_MEMORY_NONE);
    reordered = wanted != buffer_md;
    if (!reordered) return;
    internal = memory(wanted, engine, DNNL_MEMORY_NONE);
    dnnl::reorder::primitive_desc pd = output
        ? dnnl::reorder::primitive_desc(internal, buffer, UserScratchpad())
        : dnnl::reorder::primitive_desc(buffer, internal, UserScratchpad());
    reorder = dnnl::reorder(pd);
    scratchpad = memory(pd.scratchpad_desc(), engine, DNNL_MEMORY_NONE);
  }
  void PlaceIn(Arena& internal_arena, Arena& scratchpad_arena) {
    if (!reordered) return;
    Place(internal, internal_arena);
    Place(scratchpad, scratchpad_arena);
  }
  void Reorder(const dnnl::stream& stream, bool output) {
    reorder.execute(stream, {{DNNL_ARG_FROM, output ? internal : buffer},
                             {DNNL_ARG_TO, output ? buffer : internal},
                             {DNNL_ARG_SCRATCHPAD, scratchpad}});
  }
  memory& used() { return reordered ? internal : buffer; }
};

struct Primitive {
  dnnl::primitive primitive;
  std::string implementation;  // oneDNN's name for the kernel, e.g. "jit_wino_4x3:avx512_core"
  Operand in0, in1, out;
  memory scratchpad;
};

// A product: each operand's buffer dimensions and the buffer axis of each view dimension.
using Dims4x2 = std::array<Dims4, 2>;
using MatmulKey = std::array<Dims4x2, 3>;

struct State {
  dnnl::engine engine{dnnl::engine::kind::cpu, 0};
  dnnl::stream stream{engine};
  std::map<std::pair<Pass, Geometry>, std::unique_ptr<Primitive>> cache;
  std::map<MatmulKey, std::unique_ptr<Primitive>> matmuls;
  Arena in0, in1, out, scratchpad, reorder_scratchpad;
};

State& state() {
  static State* s = new State();
  return *s;
}

memory::dims Nchw(const Dims4& nhwc) { return {nhwc[0], nhwc[3], nhwc[1], nhwc[2]}; }
// oneDNN's weights dimensions: (O, I, KH, KW), or (G, O / G, I, KH, KW) for groups > 1, which
// an HWIO buffer lays out as hwigo.
memory::dims WeightDims(const Dims4& hwio, int64_t groups) {
  if (groups == 1) return {hwio[3], hwio[2], hwio[0], hwio[1]};
  return {groups, hwio[3] / groups, hwio[2], hwio[0], hwio[1]};
}

std::unique_ptr<Primitive> Build(Pass pass, const Geometry& g, bool winograd) {
  State& s = state();
  const bool fwd = pass == Pass::kForward, data = pass == Pass::kBackwardData;
  const memory::dims src = Nchw(data ? g.out : g.a);
  const memory::dims dst = Nchw(fwd ? g.out : data ? g.a : g.b);
  const int64_t groups = g.window[6];
  const memory::dims weights = WeightDims(pass == Pass::kBackwardWeights ? g.out : g.b, groups);
  const memory::dims strides = {g.window[0], g.window[1]};
  const memory::dims pad_lo = {g.window[2], g.window[4]}, pad_hi = {g.window[3], g.window[5]};
  const auto f32 = memory::data_type::f32;
  const memory::desc src_md(src, f32, Tag::nhwc), dst_md(dst, f32, Tag::nhwc);
  const memory::desc w_md(weights, f32, groups == 1 ? Tag::hwio : Tag::hwigo);
  const memory::desc w_any(weights, f32, Tag::any);
  // Winograd's kernels work in a blocked layout of their own: `any` for the activations too.
  const memory::desc src_any(src, f32, winograd ? Tag::any : Tag::nhwc);
  const memory::desc dst_any(dst, f32, winograd ? Tag::any : Tag::nhwc);
  const auto algorithm = winograd ? dnnl::algorithm::convolution_winograd
                                  : dnnl::algorithm::convolution_direct;
  const dnnl::primitive_attr attr = UserScratchpad();

  dnnl::convolution_forward::primitive_desc forward(
      dnnl::convolution_forward::desc(dnnl::prop_kind::forward_training, algorithm, src_any,
                                      w_any, dst_any, strides, pad_lo, pad_hi),
      attr, s.engine);
  auto p = std::make_unique<Primitive>();
  if (fwd) {
    p->primitive = dnnl::convolution_forward(forward);
    p->implementation = forward.impl_info_str();
    p->in0.Set(DNNL_ARG_SRC, src_md, forward.src_desc(), false, s.engine);
    p->in1.Set(DNNL_ARG_WEIGHTS, w_md, forward.weights_desc(), false, s.engine);
    p->out.Set(DNNL_ARG_DST, dst_md, forward.dst_desc(), true, s.engine);
    p->scratchpad = memory(forward.scratchpad_desc(), s.engine, DNNL_MEMORY_NONE);
  } else if (data) {
    dnnl::convolution_backward_data::primitive_desc pd(
        dnnl::convolution_backward_data::desc(algorithm, src_any, w_any, dst_any, strides,
                                              pad_lo, pad_hi),
        attr, s.engine, forward);
    p->primitive = dnnl::convolution_backward_data(pd);
    p->implementation = pd.impl_info_str();
    p->in0.Set(DNNL_ARG_DIFF_DST, dst_md, pd.diff_dst_desc(), false, s.engine);
    p->in1.Set(DNNL_ARG_WEIGHTS, w_md, pd.weights_desc(), false, s.engine);
    p->out.Set(DNNL_ARG_DIFF_SRC, src_md, pd.diff_src_desc(), true, s.engine);
    p->scratchpad = memory(pd.scratchpad_desc(), s.engine, DNNL_MEMORY_NONE);
  } else {
    dnnl::convolution_backward_weights::primitive_desc pd(
        dnnl::convolution_backward_weights::desc(algorithm, src_any, w_any, dst_any, strides,
                                                 pad_lo, pad_hi),
        attr, s.engine, forward);
    p->primitive = dnnl::convolution_backward_weights(pd);
    p->implementation = pd.impl_info_str();
    p->in0.Set(DNNL_ARG_SRC, src_md, pd.src_desc(), false, s.engine);
    p->in1.Set(DNNL_ARG_DIFF_DST, dst_md, pd.diff_dst_desc(), false, s.engine);
    p->out.Set(DNNL_ARG_DIFF_WEIGHTS, w_md, pd.diff_weights_desc(), true, s.engine);
    p->scratchpad = memory(pd.scratchpad_desc(), s.engine, DNNL_MEMORY_NONE);
  }
  return p;
}

std::unique_ptr<Primitive> BuildPreferred(Pass pass, const Geometry& g) {
  if (g.window[7]) {
    try {
      return Build(pass, g, true);
    } catch (const dnnl::error&) {  // no Winograd kernel for this machine or shape
    }
  }
  return Build(pass, g, false);
}

Dims4 DimsOf(ffi::Span<const int64_t> d) { return {d[0], d[1], d[2], d[3]}; }

// Runs the primitive cached under `key` (built by `build` on first use) on XLA's buffers,
// reordering operands to and from the layouts it wants; calls are serialised.
template <typename Key, typename Build>
ffi::Error Execute(const char* what, std::map<Key, std::unique_ptr<Primitive>>& cache,
                   const Key& key, Build build, ffi::Buffer<ffi::F32> a,
                   ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> out) {
  State& s = state();
  std::lock_guard<std::mutex> lock(transferlab::OpenMpLock());
  try {
    auto it = cache.find(key);
    if (it == cache.end()) it = cache.emplace(key, build()).first;
    Primitive& p = *it->second;
    p.in0.buffer.set_data_handle(a.typed_data());
    p.in1.buffer.set_data_handle(b.typed_data());
    p.out.buffer.set_data_handle(out->typed_data());
    p.in0.PlaceIn(s.in0, s.reorder_scratchpad);
    p.in1.PlaceIn(s.in1, s.reorder_scratchpad);
    p.out.PlaceIn(s.out, s.reorder_scratchpad);
    Place(p.scratchpad, s.scratchpad);
    for (Operand* in : {&p.in0, &p.in1}) {
      if (in->reordered) in->Reorder(s.stream, false);
    }
    p.primitive.execute(s.stream, {{p.in0.arg, p.in0.used()},
                                   {p.in1.arg, p.in1.used()},
                                   {p.out.arg, p.out.used()},
                                   {DNNL_ARG_SCRATCHPAD, p.scratchpad}});
    if (p.out.reordered) p.out.Reorder(s.stream, true);
    s.stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string(what) + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error Run(Pass pass, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
               ffi::ResultBuffer<ffi::F32> out, int64_t stride_h, int64_t stride_w,
               int64_t pad_top, int64_t pad_bottom, int64_t pad_left, int64_t pad_right,
               int64_t groups, int64_t winograd) {
  if (a.dimensions().size() != 4 || b.dimensions().size() != 4 ||
      out->dimensions().size() != 4) {
    return ffi::Error::InvalidArgument("oneDNN convolution: operands must have rank 4");
  }
  const Geometry g{DimsOf(a.dimensions()), DimsOf(b.dimensions()), DimsOf(out->dimensions()),
                   {stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right, groups,
                    winograd}};
  const auto key = std::make_pair(pass, g);
  return Execute("oneDNN convolution: ", state().cache, key,
                 [&] { return BuildPreferred(pass, g); }, a, b, out);
}

template <Pass kPass>
ffi::Error Handler(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                   ffi::ResultBuffer<ffi::F32> out, int64_t stride_h, int64_t stride_w,
                   int64_t pad_top, int64_t pad_bottom, int64_t pad_left, int64_t pad_right,
                   int64_t groups, int64_t winograd) {
  return Run(kPass, a, b, out, stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right,
             groups, winograd);
}

// The view of a row-major buffer whose dimension d is the buffer's axis axes[d].
memory::desc ViewDesc(const Dims4x2& buffer) {
  const auto& [dims, axes] = buffer;
  Dims4 strides;
  strides[3] = 1;
  for (int d = 2; d >= 0; --d) strides[d] = strides[d + 1] * dims[d + 1];
  memory::dims view_dims(4), view_strides(4);
  for (int d = 0; d < 4; ++d) {
    view_dims[d] = dims[axes[d]];
    view_strides[d] = strides[axes[d]];
  }
  return memory::desc(view_dims, memory::data_type::f32, view_strides);
}

std::unique_ptr<Primitive> BuildMatmul(const MatmulKey& key) {
  State& s = state();
  const memory::desc a_md = ViewDesc(key[0]), b_md = ViewDesc(key[1]), c_md = ViewDesc(key[2]);
  dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a_md, b_md, c_md), UserScratchpad(),
                                  s.engine);
  auto p = std::make_unique<Primitive>();
  p->primitive = dnnl::matmul(pd);
  p->implementation = pd.impl_info_str();
  p->in0.Set(DNNL_ARG_SRC, a_md, a_md, false, s.engine);
  p->in1.Set(DNNL_ARG_WEIGHTS, b_md, b_md, false, s.engine);
  p->out.Set(DNNL_ARG_DST, c_md, c_md, true, s.engine);
  p->scratchpad = memory(pd.scratchpad_desc(), s.engine, DNNL_MEMORY_NONE);
  return p;
}

bool ToDims4(ffi::Span<const int64_t> values, Dims4& out) {
  if (values.size() != 4) return false;
  std::copy(values.begin(), values.end(), out.begin());
  return true;
}

ffi::Error Matmul(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                  ffi::ResultBuffer<ffi::F32> out, ffi::Span<const int64_t> a_axes,
                  ffi::Span<const int64_t> b_axes, ffi::Span<const int64_t> out_axes) {
  MatmulKey key;
  if (!ToDims4(a.dimensions(), key[0][0]) || !ToDims4(a_axes, key[0][1]) ||
      !ToDims4(b.dimensions(), key[1][0]) || !ToDims4(b_axes, key[1][1]) ||
      !ToDims4(out->dimensions(), key[2][0]) || !ToDims4(out_axes, key[2][1])) {
    return ffi::Error::InvalidArgument("oneDNN matmul: operands and axes must have rank 4");
  }
  return Execute("oneDNN matmul: ", state().matmuls, key, [&] { return BuildMatmul(key); },
                 a, b, out);
}

}  // namespace

// The kernels of the primitives built so far, one "pass implementation" line each, written
// into `out` (NUL-terminated, truncated to `size`); returns the length of the whole text.
extern "C" size_t OnednnConvImplementations(char* out, size_t size) {
  static const char* const kPassNames[] = {"forward", "backward_data", "backward_weights"};
  State& s = state();
  std::lock_guard<std::mutex> lock(transferlab::OpenMpLock());
  std::string text;
  for (const auto& [key, primitive] : s.cache) {
    text += std::string(kPassNames[static_cast<int>(key.first)]) + " " +
            primitive->implementation + "\n";
  }
  for (const auto& entry : s.matmuls) text += "matmul " + entry.second->implementation + "\n";
  text += transferlab::AttentionImplementations();
  if (size > 0) {
    const size_t n = std::min(size - 1, text.size());
    text.copy(out, n);
    out[n] = '\0';
  }
  return text.size();
}

#define ONEDNN_CONV_BINDING            \
  ffi::Ffi::Bind()                     \
      .Arg<ffi::Buffer<ffi::F32>>()    \
      .Arg<ffi::Buffer<ffi::F32>>()    \
      .Ret<ffi::Buffer<ffi::F32>>()    \
      .Attr<int64_t>("stride_h")       \
      .Attr<int64_t>("stride_w")       \
      .Attr<int64_t>("pad_top")        \
      .Attr<int64_t>("pad_bottom")     \
      .Attr<int64_t>("pad_left")       \
      .Attr<int64_t>("pad_right")      \
      .Attr<int64_t>("groups")         \
      .Attr<int64_t>("winograd")

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvForward, Handler<Pass::kForward>, ONEDNN_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBackwardData, Handler<Pass::kBackwardData>,
                              ONEDNN_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBackwardWeights, Handler<Pass::kBackwardWeights>,
                              ONEDNN_CONV_BINDING);

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<ffi::Span<const int64_t>>("a_axes")
                                  .Attr<ffi::Span<const int64_t>>("b_axes")
                                  .Attr<ffi::Span<const int64_t>>("out_axes"));
