// The tile transforms of Winograd's F(4x4, 3x3) convolution (Lavin & Gray, 2015) as XLA FFI
// handlers, for CPUs where oneDNN has no Winograd kernels (those without AVX-512); the products
// between them are batched matrix products (models/cpu/winograd.py):
//
//   WinogradInput   x[N,H,W,C]       -> v[36,T,C]: Bᵀ·d·B of each 6x6 input tile d
//   WinogradOutput  m[36,T,O]        -> y[N,OH,OW,O]: Aᵀ·m·A, the 4x4 output tile
//   WinogradGrad    dy[N,OH,OW,O]    -> z[36,T,O]: A·g·Aᵀ of each 4x4 output-gradient tile g
//
// Tiles are T = N·tiles_h·tiles_w, row-major; tile (i, j) of an image covers outputs
// [4i, 4i+4) x [4j, 4j+4) and inputs from (4i - pad_top, 4j - pad_left), 6x6; what falls outside
// the arrays reads as zero (padding) and is not written. Channels stay innermost, so each
// transform is vector arithmetic over a block of channels. Tasks are (image, tile row) on
// OpenMP's threads.
#include <algorithm>
#include <cstdint>
#include <mutex>

#include "openmp_lock.h"
#include "vector_math.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 16;  // channels per block
constexpr int64_t kAlpha = 6, kTile = 4;

using Lanes = float[kLanes];

// out[k] = (Bᵀ·in)[k] for the six rows of a tile, lane by lane.
inline __attribute__((always_inline)) void ApplyBt(const float* const in[6],
                                                   float* const out[6]) {
  for (int64_t l = 0; l < kLanes; ++l) {
    const float d0 = in[0][l], d1 = in[1][l], d2 = in[2][l], d3 = in[3][l], d4 = in[4][l],
                d5 = in[5][l];
    out[0][l] = 4.0f * d0 - 5.0f * d2 + d4;
    out[1][l] = -4.0f * (d1 + d2) + d3 + d4;
    out[2][l] = 4.0f * (d1 - d2) - d3 + d4;
    out[3][l] = 2.0f * (d3 - d1) - d2 + d4;
    out[4][l] = 2.0f * (d1 - d3) - d2 + d4;
    out[5][l] = 4.0f * d1 - 5.0f * d3 + d5;
  }
}

// out[a] = (Aᵀ·in)[a]: six values to four.
inline __attribute__((always_inline)) void ApplyAt(const float* const in[6],
                                                   float* const out[4]) {
  for (int64_t l = 0; l < kLanes; ++l) {
    const float m0 = in[0][l], m1 = in[1][l], m2 = in[2][l], m3 = in[3][l], m4 = in[4][l],
                m5 = in[5][l];
    const float s12 = m1 + m2, d12 = m1 - m2, s34 = m3 + m4, d34 = m3 - m4;
    out[0][l] = m0 + s12 + s34;
    out[1][l] = d12 + 2.0f * d34;
    out[2][l] = s12 + 4.0f * s34;
    out[3][l] = d12 + 8.0f * d34 + m5;
  }
}

// out[k] = (A·in)[k]: four values to six.
inline __attribute__((always_inline)) void ApplyA(const float* const in[4],
                                                  float* const out[6]) {
  for (int64_t l = 0; l < kLanes; ++l) {
    const float g0 = in[0][l], g1 = in[1][l], g2 = in[2][l], g3 = in[3][l];
    const float s02 = g0 + g2, s13 = g1 + g3, t02 = g0 + 4.0f * g2, t13 = 2.0f * g1 + 8.0f * g3;
    out[0][l] = g0;
    out[1][l] = s02 + s13;
    out[2][l] = s02 - s13;
    out[3][l] = t02 + t13;
    out[4][l] = t02 - t13;
    out[5][l] = g3;
  }
}

struct Tiling {
  int64_t n, h, w, c;         // the spatial array (x, or y and dy)
  int64_t tiles_h, tiles_w;   // per image
  int64_t row0, col0;         // the tile's first row and column: 4·i − row0, 4·j − col0
  int64_t tiles() const { return n * tiles_h * tiles_w; }
};

// Copies the size x size patch at (r, s) of image `image`, channels [c0, c0 + lanes), into
// `patch` (zeros outside the array and beyond `lanes`).
template <int64_t kSize>
inline void Load(const float* x, const Tiling& t, int64_t image, int64_t r, int64_t s,
                 int64_t c0, int64_t lanes, Lanes patch[kSize][kSize]) {
  for (int64_t i = 0; i < kSize; ++i) {
    for (int64_t j = 0; j < kSize; ++j) {
      float* p = patch[i][j];
      const int64_t row = r + i, col = s + j;
      if (row < 0 || row >= t.h || col < 0 || col >= t.w) {
        std::fill(p, p + kLanes, 0.0f);
        continue;
      }
      const float* src = x + ((image * t.h + row) * t.w + col) * t.c + c0;
      std::copy(src, src + lanes, p);
      std::fill(p + lanes, p + kLanes, 0.0f);
    }
  }
}

// Stores the 36 transformed values of tile `tile` into out[36, T, C].
inline void Store36(Lanes values[kAlpha][kAlpha], const Tiling& t, int64_t tile, int64_t c0,
                    int64_t lanes, float* out) {
  for (int64_t k = 0; k < kAlpha * kAlpha; ++k) {
    const float* v = values[k / kAlpha][k % kAlpha];
    std::copy(v, v + lanes, out + (k * t.tiles() + tile) * t.c + c0);
  }
}

TRANSFERLAB_VECTOR_CLONES
void InputTile(const float* x, const Tiling& t, int64_t image, int64_t i, int64_t j,
               int64_t c0, int64_t lanes, float* v) {
  Lanes d[kAlpha][kAlpha], rows[kAlpha][kAlpha], out[kAlpha][kAlpha];
  Load<kAlpha>(x, t, image, kTile * i - t.row0, kTile * j - t.col0, c0, lanes, d);
  for (int64_t col = 0; col < kAlpha; ++col) {
    const float* in[6] = {d[0][col], d[1][col], d[2][col], d[3][col], d[4][col], d[5][col]};
    float* o[6] = {rows[0][col], rows[1][col], rows[2][col], rows[3][col], rows[4][col],
                   rows[5][col]};
    ApplyBt(in, o);
  }
  for (int64_t r = 0; r < kAlpha; ++r) {
    const float* in[6] = {rows[r][0], rows[r][1], rows[r][2], rows[r][3], rows[r][4],
                          rows[r][5]};
    float* o[6] = {out[r][0], out[r][1], out[r][2], out[r][3], out[r][4], out[r][5]};
    ApplyBt(in, o);
  }
  Store36(out, t, (image * t.tiles_h + i) * t.tiles_w + j, c0, lanes, v);
}

TRANSFERLAB_VECTOR_CLONES
void OutputTile(const float* m, const Tiling& t, int64_t image, int64_t i, int64_t j,
                int64_t c0, int64_t lanes, float* y) {
  Lanes in[kAlpha][kAlpha], rows[kTile][kAlpha], out[kTile][kTile];
  const int64_t tile = (image * t.tiles_h + i) * t.tiles_w + j;
  for (int64_t k = 0; k < kAlpha * kAlpha; ++k) {
    const float* src = m + (k * t.tiles() + tile) * t.c + c0;
    std::copy(src, src + lanes, in[k / kAlpha][k % kAlpha]);
  }
  for (int64_t col = 0; col < kAlpha; ++col) {
    const float* a[6] = {in[0][col], in[1][col], in[2][col], in[3][col], in[4][col],
                         in[5][col]};
    float* o[4] = {rows[0][col], rows[1][col], rows[2][col], rows[3][col]};
    ApplyAt(a, o);
  }
  for (int64_t r = 0; r < kTile; ++r) {
    const float* a[6] = {rows[r][0], rows[r][1], rows[r][2], rows[r][3], rows[r][4],
                         rows[r][5]};
    float* o[4] = {out[r][0], out[r][1], out[r][2], out[r][3]};
    ApplyAt(a, o);
  }
  for (int64_t r = 0; r < kTile; ++r) {
    const int64_t row = kTile * i + r;
    for (int64_t s = 0; s < kTile; ++s) {
      const int64_t col = kTile * j + s;
      if (row >= t.h || col >= t.w) continue;
      std::copy(out[r][s], out[r][s] + lanes, y + ((image * t.h + row) * t.w + col) * t.c + c0);
    }
  }
}

TRANSFERLAB_VECTOR_CLONES
void GradTile(const float* dy, const Tiling& t, int64_t image, int64_t i, int64_t j,
              int64_t c0, int64_t lanes, float* z) {
  Lanes g[kTile][kTile], rows[kAlpha][kTile], out[kAlpha][kAlpha];
  Load<kTile>(dy, t, image, kTile * i, kTile * j, c0, lanes, g);
  for (int64_t col = 0; col < kTile; ++col) {
    const float* a[4] = {g[0][col], g[1][col], g[2][col], g[3][col]};
    float* o[6] = {rows[0][col], rows[1][col], rows[2][col], rows[3][col], rows[4][col],
                   rows[5][col]};
    ApplyA(a, o);
  }
  for (int64_t r = 0; r < kAlpha; ++r) {
    const float* a[4] = {rows[r][0], rows[r][1], rows[r][2], rows[r][3]};
    float* o[6] = {out[r][0], out[r][1], out[r][2], out[r][3], out[r][4], out[r][5]};
    ApplyA(a, o);
  }
  Store36(out, t, (image * t.tiles_h + i) * t.tiles_w + j, c0, lanes, z);
}

using TileFn = void (*)(const float* src, const Tiling& t, int64_t image, int64_t i, int64_t j,
                       int64_t c0, int64_t lanes, float* dst);

// Applies `tile` to every tile and block of channels, (image, tile row) pairs spread over
// OpenMP's threads.
ffi::Error ForEachTile(TileFn tile, const Tiling& t, const float* src, float* dst) {
  std::lock_guard<std::mutex> lock(transferlab::OpenMpLock());
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t image = 0; image < t.n; ++image) {
    for (int64_t i = 0; i < t.tiles_h; ++i) {
      for (int64_t j = 0; j < t.tiles_w; ++j) {
        for (int64_t c0 = 0; c0 < t.c; c0 += kLanes) {
          tile(src, t, image, i, j, c0, std::min(kLanes, t.c - c0), dst);
        }
      }
    }
  }
  return ffi::Error::Success();
}

// Whether `spatial` is [N,H,W,C] and `transformed` its tiles' [36, N·tiles_h·tiles_w, C].
bool Fits(ffi::Span<const int64_t> spatial, ffi::Span<const int64_t> transformed,
          int64_t tiles_h, int64_t tiles_w) {
  return spatial.size() == 4 && transformed.size() == 3 && transformed[0] == kAlpha * kAlpha &&
         transformed[1] == spatial[0] * tiles_h * tiles_w && transformed[2] == spatial[3];
}

ffi::Error InputImpl(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> v, int64_t tiles_h,
                     int64_t tiles_w, int64_t pad_top, int64_t pad_left) {
  const auto d = x.dimensions();
  if (!Fits(d, v->dimensions(), tiles_h, tiles_w)) {
    return ffi::Error::InvalidArgument("Winograd input: wants x[N,H,W,C] -> v[36,N*TH*TW,C]");
  }
  return ForEachTile(InputTile, {d[0], d[1], d[2], d[3], tiles_h, tiles_w, pad_top, pad_left},
                     x.typed_data(), v->typed_data());
}

ffi::Error OutputImpl(ffi::Buffer<ffi::F32> m, ffi::ResultBuffer<ffi::F32> y, int64_t tiles_h,
                      int64_t tiles_w) {
  const auto d = y->dimensions();
  if (!Fits(d, m.dimensions(), tiles_h, tiles_w) || d[1] > kTile * tiles_h ||
      d[2] > kTile * tiles_w) {
    return ffi::Error::InvalidArgument("Winograd output: wants m[36,N*TH*TW,O] -> y[N,OH,OW,O]");
  }
  return ForEachTile(OutputTile, {d[0], d[1], d[2], d[3], tiles_h, tiles_w, 0, 0},
                     m.typed_data(), y->typed_data());
}

ffi::Error GradImpl(ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> z, int64_t tiles_h,
                    int64_t tiles_w) {
  const auto d = dy.dimensions();
  if (!Fits(d, z->dimensions(), tiles_h, tiles_w)) {
    return ffi::Error::InvalidArgument("Winograd gradient: wants dy[N,OH,OW,O] -> z[36,N*TH*TW,O]");
  }
  return ForEachTile(GradTile, {d[0], d[1], d[2], d[3], tiles_h, tiles_w, 0, 0},
                     dy.typed_data(), z->typed_data());
}

}  // namespace

// One array in, one out, and the tiles per image: what every transform's binding starts with.
#define WINOGRAD_TRANSFORM_BINDING    \
  ffi::Ffi::Bind()                    \
      .Arg<ffi::Buffer<ffi::F32>>()   \
      .Ret<ffi::Buffer<ffi::F32>>()   \
      .Attr<int64_t>("tiles_h")       \
      .Attr<int64_t>("tiles_w")

XLA_FFI_DEFINE_HANDLER_SYMBOL(WinogradInput, InputImpl,
                              WINOGRAD_TRANSFORM_BINDING.Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(WinogradOutput, OutputImpl, WINOGRAD_TRANSFORM_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(WinogradGrad, GradImpl, WINOGRAD_TRANSFORM_BINDING);
