// The book's LeNet-5 training step (forward, mean cross-entropy, backward, SGD) in one call,
// fp32 on the CPU: sigmoid or ReLU, average or max pooling (exercise 1's "modern" LeNet), label
// smoothing, momentum (plain or Nesterov) and weight decay as torch.optim.SGD computes them.
// Built and documented by lenet/fused.py; see its docstring for the numbers this file is
// checked against.
//
// Why one call: at batch 128 on a few cores PyTorch autograd spends most of a step on per-op
// dispatch and on full-size passes over the 600k conv1 activations; here every image stays in
// cache from conv1 to pool1, conv2 runs on 8 images at a time, one per vector lane, and nothing
// large is allocated per step.
//
// Layout (all fp32, row-major):
//   conv1 1->6 5x5 pad 2 (direct AVX2, one image's row in the lanes), act, pool 2 -> P1
//   [6][14][14]
//   conv2 6->16 5x5 (direct, register-tiled AVX2, 8 images in the lanes: P1 [1176][8]), act,
//   pool 2
//   flatten -> F [400], fc 400->120->84 (act) -> C logits, as sgemm on groups of 64 images.
// The activation and the pooling are template parameters (Relu, Max), so the hot loops carry
// no per-element branches.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

// MKL's sgemm, which libtorch_cpu exports: the chunk GEMMs here are too small for at::mm's
// dispatch and allocation overhead to pay off.
extern "C" void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
                       const float*, const int*, const float*, const int*, const float*, float*,
                       const int*);

namespace {

// Image geometry of the book network.
constexpr int kImg = 28, kImgPixels = kImg * kImg;
constexpr int XW = 40;  // padded input row stride: 32 rows x 40, image at [2..29][2..29]; the
                        // extra columns let 16-wide vector loads run past the edge safely
constexpr int AW = 32;  // conv1 output row stride: 28 valid + 4 never-read lanes
constexpr int kA1 = 6 * 28 * AW;   // conv1 activations per image
constexpr int kP1 = 6 * 14 * 14;   // pool1 output per image
constexpr int kA2 = 16 * 100;      // conv2 activations per image (10x10)
constexpr int kFeat = 400;         // pool2 output, flattened
constexpr int kH3 = 120, kH4 = 84;
constexpr int kCols = 150;         // conv2 taps: 6 channels x 5 x 5

// Gradient layout = parameter order; the conv part first, so per-chunk partial sums of the
// conv gradients are one contiguous prefix.
constexpr int kW1 = 150, kB1 = 6, kW2 = 2400, kB2 = 16;
constexpr int kConvGrads = kW1 + kB1 + kW2 + kB2;

// ---------------------------------------------------------------------------------------------
// Small numeric helpers

// Row-major C[M,N] = alpha op(A)[M,K] op(B)[K,N] + beta C, through column-major sgemm by
// computing C^T = op(B)^T op(A)^T.
void gemm(bool ta, bool tb, int M, int N, int K, float alpha, const float* A, int lda,
          const float* B, int ldb, float beta, float* C, int ldc) {
  const char tA = tb ? 'T' : 'N', tB = ta ? 'T' : 'N';
  sgemm_(&tA, &tB, &N, &M, &K, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
}

// Cephes-style exp: ~1 ulp over the clamped range. The clamp keeps x as the second operand
// of min/max so a NaN passes through (min/max return their second operand on NaN) and a
// diverged run still shows a NaN loss instead of a saturated, finite one.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_set1_ps(88.3762626647949f), x);
  x = _mm256_max_ps(_mm256_set1_ps(-88.3762626647949f), x);
  __m256 fx = _mm256_floor_ps(
      _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);  // ln 2 split in two for accuracy
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x);
  y = _mm256_add_ps(y, _mm256_set1_ps(1.0f));
  __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// A true division rather than rcp + Newton: it costs a few percent of the step and keeps the
// activations within ~1 ulp of torch.sigmoid, so training curves match autograd's.
inline __m256 sigmoid8(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  return _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

inline float sigmoid1(float x) { return 1.f / (1.f + std::exp(-x)); }

// The activation, and its derivative from the activation's output (what is saved):
// sigmoid' = a (1 - a); relu' = 1 where a > 0, else 0, as torch's threshold_backward. ReLU as
// max(0, x) with x second, so a NaN passes through as in torch.relu.
template <bool Relu>
inline __m256 act8(__m256 x) {
  return Relu ? _mm256_max_ps(_mm256_setzero_ps(), x) : sigmoid8(x);
}
template <bool Relu>
inline float act1(float x) {
  return Relu ? (std::isnan(x) ? x : std::max(0.f, x)) : sigmoid1(x);
}
template <bool Relu>
inline __m256 act_grad8(__m256 a) {
  const __m256 one = _mm256_set1_ps(1.f);
  return Relu ? _mm256_and_ps(_mm256_cmp_ps(a, _mm256_setzero_ps(), _CMP_GT_OQ), one)
              : _mm256_mul_ps(a, _mm256_sub_ps(one, a));
}
template <bool Relu>
inline float act_grad1(float a) {
  return Relu ? (a > 0.f ? 1.f : 0.f) : a * (1.f - a);
}

// Elementwise max that keeps a NaN from either side (max_ps alone returns its second operand
// when either is NaN): a diverged run shows a NaN loss rather than a finite one.
inline __m256 nanmax8(__m256 a, __m256 b) {
  return _mm256_blendv_ps(_mm256_max_ps(a, b), a, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Per-thread scratch that lives across calls: re-allocating megabytes per step showed up as
// page faults costing more than conv1 itself.
// 64-byte aligned, so no 8-wide load of a lane group's pixel straddles two cache lines
// (malloc's large blocks start 16 bytes into a page, which put every other one across).
float* scratch(int which, size_t n) {
  thread_local std::vector<float> bufs[6];
  if (bufs[which].size() < n + 16) bufs[which].resize(n + 16);
  const auto at = reinterpret_cast<uintptr_t>(bufs[which].data());
  return reinterpret_cast<float*>((at + 63) & ~uintptr_t{63});
}

// ---------------------------------------------------------------------------------------------
// Pointers into the caller's tensors

struct Params {
  const float *w1, *b1, *w2, *b2, *w3, *b3, *w4, *b4, *w5, *b5;
  int classes;
};

// What the forward keeps for the backward, one row per image.
struct Saved {
  float *A1, *P1, *A2, *F, *H3, *H4, *L;
};

// ---------------------------------------------------------------------------------------------
// conv1 + pool1, one image at a time (stays in L1)

// The batch's images: float32 pixels, or uint8 ones that the kernel scales itself, x / 255
// as torch computes it (a true division), while padding: a byte batch is a quarter of the
// memory traffic, and the trainer saves a conversion pass per step.
struct Images {
  const float* f;    // (N, 28, 28) float32, or
  const uint8_t* b;  // (N, 28, 28) uint8

  // Image n, zero-padded to 32 rows x XW.
  void pad(int64_t n, float* xp) const {
    std::memset(xp, 0, sizeof(float) * 32 * XW);
    if (f) {
      const float* x = f + n * kImgPixels;
      for (int i = 0; i < kImg; i++) std::memcpy(xp + (i + 2) * XW + 2, x + i * kImg, kImg * 4);
      return;
    }
    const uint8_t* x = b + n * kImgPixels;
    const __m256 k255 = _mm256_set1_ps(255.f);
    for (int i = 0; i < kImg; i++) {
      const uint8_t* r = x + i * kImg;
      float* o = xp + (i + 2) * XW + 2;
      for (int j = 0; j < 24; j += 8) {
        const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(r + j));
        _mm256_storeu_ps(o + j, _mm256_div_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)), k255));
      }
      int32_t last;  // the row's last 4 bytes (a wider load could read past the tensor)
      std::memcpy(&last, r + 24, 4);
      const __m128i v = _mm_cvtepu8_epi32(_mm_cvtsi32_si128(last));
      _mm_storeu_ps(o + 24, _mm_div_ps(_mm_cvtepi32_ps(v), _mm256_castps256_ps128(k255)));
    }
  }
};

// 12 accumulators (6 channels x 16 columns) fit the 16 ymm registers with room for the input.
template <bool Relu>
void conv1_forward(const float* xp, const float* w, const float* b, float* a1) {
  for (int i = 0; i < 28; i++)
    for (int h = 0; h < 2; h++) {
      __m256 acc[6][2];
      for (int c = 0; c < 6; c++) acc[c][0] = acc[c][1] = _mm256_set1_ps(b[c]);
      for (int ki = 0; ki < 5; ki++)
        for (int kj = 0; kj < 5; kj++) {
          const float* xr = xp + (i + ki) * XW + h * 16 + kj;
          const __m256 x0 = _mm256_loadu_ps(xr), x1 = _mm256_loadu_ps(xr + 8);
          for (int c = 0; c < 6; c++) {
            const __m256 wv = _mm256_set1_ps(w[c * 25 + ki * 5 + kj]);
            acc[c][0] = _mm256_fmadd_ps(wv, x0, acc[c][0]);
            acc[c][1] = _mm256_fmadd_ps(wv, x1, acc[c][1]);
          }
        }
      for (int c = 0; c < 6; c++) {
        float* o = a1 + c * 28 * AW + i * AW + h * 16;
        _mm256_storeu_ps(o, act8<Relu>(acc[c][0]));
        _mm256_storeu_ps(o + 8, act8<Relu>(acc[c][1]));
      }
    }
}

// 16 columns of one row -> their 8 column pairs combined by `op`, in order.
template <typename Op>
inline __m256 pairs16(const float* r, Op op) {
  const __m256 v0 = _mm256_loadu_ps(r), v1 = _mm256_loadu_ps(r + 8);
  const __m256 even = _mm256_shuffle_ps(v0, v1, _MM_SHUFFLE(2, 0, 2, 0));
  const __m256 odd = _mm256_shuffle_ps(v0, v1, _MM_SHUFFLE(3, 1, 3, 1));
  return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(op(even, odd)), 0xD8));
}

// Vectorised, 8 windows at a time, in the scalar pool4's order of operations (each row's
// pair first, then the two rows), so the result does not depend on the vector width.
template <bool Max>
void pool1_forward(const float* a1, float* p1) {
  const __m256i six = _mm256_setr_epi32(-1, -1, -1, -1, -1, -1, 0, 0);
  const __m256 quarter = _mm256_set1_ps(0.25f);
  const auto max = [](__m256 a, __m256 b) { return nanmax8(a, b); };
  const auto add = [](__m256 a, __m256 b) { return _mm256_add_ps(a, b); };
  for (int c = 0; c < 6; c++)
    for (int i = 0; i < 14; i++) {
      const float* r0 = a1 + c * 28 * AW + 2 * i * AW;
      const float* r1 = r0 + AW;
      float* o = p1 + c * 196 + i * 14;
      for (int h = 0; h < 2; h++) {
        __m256 m;
        if (Max) {
          m = nanmax8(pairs16(r0 + 16 * h, max), pairs16(r1 + 16 * h, max));
        } else {
          m = _mm256_mul_ps(quarter, _mm256_add_ps(pairs16(r0 + 16 * h, add),
                                                   pairs16(r1 + 16 * h, add)));
        }
        if (h == 0) _mm256_storeu_ps(o, m);
        else _mm256_maskstore_ps(o + 8, six, m);  // columns 28..31 are padding
      }
    }
}

// ---------------------------------------------------------------------------------------------
// conv2 with the images in the vector lanes. A lane group holds 8 images side by side: value k
// of image l at [k * 8 + l]. Every conv2 operand is then a plain 8-wide vector at a fixed
// offset (a tap of P1 for output position (oi, oj) is P1 lanes [ci][oi + ki][oj + kj]), so the
// three products run straight from P1 and dZ2 with no im2col or col2im copies, and pool2 and
// its backward are vertical operations. conv1 and pool1 keep one image in the lanes (its rows
// are 28 wide); the images cross between the layouts by 8x8 transposes.
constexpr int kLanes = 8;

inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; i++) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// The first `width` values (a multiple of 8) of n <= 8 rows into lanes; missing images are 0.
void to_lanes(const float* rows, int64_t stride, int n, int width, float* out) {
  for (int k = 0; k < width; k += 8) {
    __m256 r[8];
    for (int l = 0; l < 8; l++)
      r[l] = l < n ? _mm256_loadu_ps(rows + l * stride + k) : _mm256_setzero_ps();
    transpose8(r);
    for (int l = 0; l < 8; l++) _mm256_storeu_ps(out + (k + l) * kLanes, r[l]);
  }
}

// The inverse, for the first n images.
void from_lanes(const float* in, int width, int n, float* rows, int64_t stride) {
  for (int k = 0; k < width; k += 8) {
    __m256 r[8];
    for (int l = 0; l < 8; l++) r[l] = _mm256_loadu_ps(in + (k + l) * kLanes);
    transpose8(r);
    for (int l = 0; l < n; l++) _mm256_storeu_ps(rows + l * stride + k, r[l]);
  }
}

// Where conv2's im2col row k = (ci, ki, kj) starts in a P1 image: ci * 196 + ki * 14 + kj.
struct TapOffsets {
  int at[kCols];
  TapOffsets() {
    for (int k = 0; k < kCols; k++) at[k] = k / 25 * 196 + k / 5 % 5 * 14 + k % 5;
  }
};
const TapOffsets kTap;

// Z2 (16 channels, 100 positions) of a lane group = W2 (16, 150) applied to P1 lanes, without
// the bias: NC channels x 2 neighbouring positions per tile, each a sum over k = 0..149 in order.
template <int NC>
inline void conv2_forward_tile(const float* w2, const float* p1, int c0, int oi, int oj,
                               float* z) {
  __m256 acc[NC][2];
  for (auto& r : acc) r[0] = r[1] = _mm256_setzero_ps();
  for (int ci = 0; ci < 6; ci++)
    for (int ki = 0; ki < 5; ki++) {
      const float* row = p1 + (ci * 196 + (oi + ki) * 14 + oj) * kLanes;
      const float* w = w2 + c0 * kCols + ci * 25 + ki * 5;
#pragma GCC unroll 5
      for (int kj = 0; kj < 5; kj++) {
        const __m256 x0 = _mm256_loadu_ps(row + kj * kLanes);
        const __m256 x1 = _mm256_loadu_ps(row + (kj + 1) * kLanes);
        for (int c = 0; c < NC; c++) {
          const __m256 wv = _mm256_broadcast_ss(w + c * kCols + kj);
          acc[c][0] = _mm256_fmadd_ps(wv, x0, acc[c][0]);
          acc[c][1] = _mm256_fmadd_ps(wv, x1, acc[c][1]);
        }
      }
    }
  for (int c = 0; c < NC; c++) {
    float* o = z + ((c0 + c) * 100 + oi * 10 + oj) * kLanes;
    _mm256_storeu_ps(o, acc[c][0]);
    _mm256_storeu_ps(o + kLanes, acc[c][1]);
  }
}

void conv2_forward(const float* w2, const float* p1, float* z) {
  for (int oi = 0; oi < 10; oi++)
    for (int oj = 0; oj < 10; oj += 2) {
      conv2_forward_tile<6>(w2, p1, 0, oi, oj, z);
      conv2_forward_tile<6>(w2, p1, 6, oi, oj, z);
      conv2_forward_tile<4>(w2, p1, 12, oi, oj, z);
    }
}

// The maximum of 8 2x2 windows side by side, their four values v given in torch's scan order,
// by torch's max_pool2d rule: a value replaces the running maximum when greater, or when it is
// NaN; `won` gets which of the four it was (0..3, as floats).
inline __m256 max_scan(const __m256 v[4], __m256* won = nullptr) {
  __m256 m = v[0], k = _mm256_setzero_ps();
  for (int t = 1; t < 4; t++) {
    const __m256 up = _mm256_or_ps(_mm256_cmp_ps(v[t], m, _CMP_GT_OQ),
                                   _mm256_cmp_ps(v[t], v[t], _CMP_UNORD_Q));
    m = _mm256_blendv_ps(m, v[t], up);
    k = _mm256_blendv_ps(k, _mm256_set1_ps((float)t), up);
  }
  if (won) *won = k;
  return m;
}

// 8 2x2 windows' pooled values: the mean (avg; each row's pair first, then the rows) or the
// maximum (max).
template <bool Max>
inline __m256 pool4v(const __m256 v[4]) {
  if (Max) return max_scan(v);
  return _mm256_mul_ps(_mm256_set1_ps(0.25f),
                       _mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3])));
}

// The four positions of pool2 window (i, j) in a channel's 10x10 lanes, in torch's scan order.
inline int window_at(int c, int i, int j, int t) {
  return (c * 100 + (2 * i + (t >> 1)) * 10 + 2 * j + (t & 1)) * kLanes;
}

// Bias and activation on Z2 (into A2, the saved activations, or in place), then pool2 into the
// features' lanes FL (400).
template <bool Relu, bool Max>
void conv2_epilogue(float* z2, const float* b2, float* a2_saved, float* fl) {
  float* a2 = a2_saved ? a2_saved : z2;
  for (int c = 0; c < 16; c++) {
    const __m256 bv = _mm256_set1_ps(b2[c]);
    for (int q = c * 100 * kLanes; q < (c + 1) * 100 * kLanes; q += kLanes)
      _mm256_storeu_ps(a2 + q, act8<Relu>(_mm256_add_ps(_mm256_loadu_ps(z2 + q), bv)));
    for (int i = 0; i < 5; i++)
      for (int j = 0; j < 5; j++) {
        __m256 v[4];
        for (int t = 0; t < 4; t++) v[t] = _mm256_loadu_ps(a2 + window_at(c, i, j, t));
        _mm256_storeu_ps(fl + (c * 25 + i * 5 + j) * kLanes, pool4v<Max>(v));
      }
  }
}

// Lane groups per chunk of `block` images, and the images the interleaved saved buffers hold.
int64_t groups_per_chunk(int64_t N, int block) {
  return (std::min<int64_t>(block, N) + kLanes - 1) / kLanes;
}
int64_t num_chunks(int64_t N, int block) { return (N + block - 1) / block; }
int64_t lane_images(int64_t N, int block) {
  return num_chunks(N, block) * groups_per_chunk(N, block) * kLanes;
}

// A thread's scratch for its chunks, the same buffers forward (values) and backward (their
// gradients): a padded image, one image's conv1 map, the chunk's pool1 maps one image after
// another, and one lane group's pool1, conv2 and feature lanes.
struct ChunkScratch {
  float *xp, *image, *pool1, *pool1_lanes, *conv2_lanes, *feature_lanes;
  explicit ChunkScratch(int block)
      : xp(scratch(0, 32 * XW)),
        image(scratch(1, kA1)),
        pool1(scratch(2, (size_t)block * kP1)),
        pool1_lanes(scratch(3, (size_t)kP1 * kLanes)),
        conv2_lanes(scratch(4, (size_t)kA2 * kLanes)),
        feature_lanes(scratch(5, (size_t)kFeat * kLanes)) {}
};

// Features F of the images of chunks [c0, c1); with `saved`, also what the backward needs.
template <bool Relu, bool Max>
void conv_forward_chunks(const Images& x, int64_t N, const Params& p, float* F,
                         const Saved* saved, int block, int64_t c0, int64_t c1) {
  const int64_t gpc = groups_per_chunk(N, block);
  const ChunkScratch s(block);
  for (int64_t ch = c0; ch < c1; ch++) {
    const int64_t n0 = ch * block;
    const int bs = (int)std::min<int64_t>(block, N - n0);
    for (int nb = 0; nb < bs; nb++) {
      float* a1 = saved ? saved->A1 + (n0 + nb) * kA1 : s.image;
      x.pad(n0 + nb, s.xp);
      conv1_forward<Relu>(s.xp, p.w1, p.b1, a1);
      pool1_forward<Max>(a1, s.pool1 + nb * kP1);
    }
    for (int g = 0; g * kLanes < bs; g++) {
      const int n = std::min(kLanes, bs - g * kLanes);
      const int64_t at = (ch * gpc + g) * kLanes;
      float* p1l = saved ? saved->P1 + at * kP1 : s.pool1_lanes;
      to_lanes(s.pool1 + g * kLanes * kP1, kP1, n, kP1, p1l);
      conv2_forward(p.w2, p1l, s.conv2_lanes);
      conv2_epilogue<Relu, Max>(s.conv2_lanes, p.b2, saved ? saved->A2 + at * kA2 : nullptr,
                                s.feature_lanes);
      from_lanes(s.feature_lanes, kFeat, n, F + (n0 + g * kLanes) * kFeat, kFeat);
    }
  }
}

// Features F (N, 400) of every image; with `saved`, also what the backward needs.
template <bool Relu, bool Max>
void conv_forward(const Images& x, int64_t N, const Params& p, float* F, const Saved* saved,
                  int block) {
  at::parallel_for(0, num_chunks(N, block), 1, [&](int64_t c0, int64_t c1) {
    conv_forward_chunks<Relu, Max>(x, N, p, F, saved, block, c0, c1);
  });
}

// ---------------------------------------------------------------------------------------------
// Conv backward, per chunk. Each chunk writes its own partial gradient; they are summed in
// chunk order afterwards, so the result never depends on which thread ran which chunk.

// Max pooling's backward for 4 windows side by side: their two rows a0, a1 (8 values each;
// each lane pair is one window's two columns) and their gradients g8 (duplicated on each
// lane pair). The gradient goes to the window's first maximum in torch's scan order (row 0
// left, right; row 1 left, right), times act'; the other three positions get 0. A window
// holding a NaN matches nothing and gets no gradient (the run has diverged anyway).
template <bool Relu>
inline void max_windows_backward(__m256 a0, __m256 a1, __m256 g8, __m256& d0, __m256& d1) {
  const __m256 odd = _mm256_castsi256_ps(_mm256_setr_epi32(0, -1, 0, -1, 0, -1, 0, -1));
  const __m256 m = _mm256_max_ps(_mm256_max_ps(a0, _mm256_permute_ps(a0, 0xB1)),
                                 _mm256_max_ps(a1, _mm256_permute_ps(a1, 0xB1)));
  const __m256 eq0 = _mm256_cmp_ps(a0, m, _CMP_EQ_OQ);
  const __m256 eq0_pair = _mm256_permute_ps(eq0, 0xB1);
  const __m256 eq1 = _mm256_cmp_ps(a1, m, _CMP_EQ_OQ);
  const __m256 sel0 = _mm256_andnot_ps(_mm256_and_ps(odd, eq0_pair), eq0);
  const __m256 sel1 = _mm256_andnot_ps(
      _mm256_or_ps(_mm256_or_ps(eq0, eq0_pair), _mm256_and_ps(odd, _mm256_permute_ps(eq1, 0xB1))),
      eq1);
  d0 = _mm256_and_ps(_mm256_mul_ps(g8, act_grad8<Relu>(a0)), sel0);
  d1 = _mm256_and_ps(_mm256_mul_ps(g8, act_grad8<Relu>(a1)), sel1);
}

// dZ2 lanes (16, 100) = the features' gradient lanes DFL (400) spread back over each 2x2
// window (a quarter to each position, or all to the window's first maximum in torch's scan
// order) times act'; the conv2 bias gradient accumulates in db2 (16 vectors).
template <bool Relu, bool Max>
void pool2_act_backward(const float* dfl, const float* a2, float* dz2, __m256* db2) {
  const __m256 quarter = _mm256_set1_ps(0.25f);
  for (int c = 0; c < 16; c++) {
    __m256 s = db2[c];  // local: __m256 may alias the float stores
    for (int i = 0; i < 5; i++)
      for (int j = 0; j < 5; j++) {
        const __m256 g = _mm256_loadu_ps(dfl + (c * 25 + i * 5 + j) * kLanes);
        __m256 a[4];
        for (int t = 0; t < 4; t++) a[t] = _mm256_loadu_ps(a2 + window_at(c, i, j, t));
        __m256 d[4];
        if (!Max) {
          const __m256 gq = _mm256_mul_ps(quarter, g);
          for (int t = 0; t < 4; t++) d[t] = _mm256_mul_ps(gq, act_grad8<Relu>(a[t]));
        } else {
          __m256 k;
          const __m256 m = max_scan(a, &k);
          const __m256 v = _mm256_mul_ps(g, act_grad8<Relu>(m));
          for (int t = 0; t < 4; t++)
            d[t] = _mm256_and_ps(_mm256_cmp_ps(k, _mm256_set1_ps((float)t), _CMP_EQ_OQ), v);
        }
        for (int t = 0; t < 4; t++) {
          _mm256_storeu_ps(dz2 + window_at(c, i, j, t), d[t]);
          s = _mm256_add_ps(s, d[t]);
        }
      }
    db2[c] = s;
  }
}

// dW2 (16, 150) lanes += dZ2 lanes (16, 100) x P1 lanes' taps, summed over the 100 positions:
// tiles of 4 channels x 3 taps; dw2 holds one vector per weight (summed across once a chunk).
void conv2_weight_grad(const float* dz2, const float* p1, __m256* dw2) {
  for (int c0 = 0; c0 < 16; c0 += 4)
    for (int k0 = 0; k0 < kCols; k0 += 3) {
      __m256 acc[4][3];
      for (auto& r : acc)
        for (auto& v : r) v = _mm256_setzero_ps();
      const float* src[3];
      for (int b = 0; b < 3; b++) src[b] = p1 + kTap.at[k0 + b] * kLanes;
      for (int oi = 0; oi < 10; oi++)
        for (int oj = 0; oj < 10; oj++) {
          const int q = (oi * 14 + oj) * kLanes, pos = (oi * 10 + oj) * kLanes;
          __m256 x[3];
          for (int b = 0; b < 3; b++) x[b] = _mm256_loadu_ps(src[b] + q);
          for (int a = 0; a < 4; a++) {
            const __m256 g = _mm256_loadu_ps(dz2 + (c0 + a) * 100 * kLanes + pos);
            for (int b = 0; b < 3; b++) acc[a][b] = _mm256_fmadd_ps(g, x[b], acc[a][b]);
          }
        }
      for (int a = 0; a < 4; a++)
        for (int b = 0; b < 3; b++) {
          __m256& t = dw2[(c0 + a) * kCols + k0 + b];
          t = _mm256_add_ps(t, acc[a][b]);
        }
    }
}

// dP1 lanes (zeroed by the caller) += W2^T dZ2, scattered back to the taps' pixels: tiles of one
// kernel row's 5 taps (ci, ki) x 2 neighbouring positions, each a sum over the 16 channels. Tap
// kj at position p + 1 and tap kj + 1 at p read the same pixel, so the tile's 10 sums fold into
// its row's 6 pixels in registers before one add each to memory.
void conv2_input_grad(const float* w2, const float* dz2, float* dp1) {
  for (int oi = 0; oi < 10; oi++)
    for (int oj = 0; oj < 10; oj += 2) {
      const int pos = (oi * 10 + oj) * kLanes;
      for (int r = 0; r < 30; r++) {  // r = ci * 5 + ki
        __m256 acc[5][2];
        for (auto& v : acc) v[0] = v[1] = _mm256_setzero_ps();
        for (int c = 0; c < 16; c++) {
          const __m256 g0 = _mm256_loadu_ps(dz2 + c * 100 * kLanes + pos);
          const __m256 g1 = _mm256_loadu_ps(dz2 + c * 100 * kLanes + pos + kLanes);
          const float* w = w2 + c * kCols + r * 5;
          for (int kj = 0; kj < 5; kj++) {
            const __m256 wv = _mm256_broadcast_ss(w + kj);
            acc[kj][0] = _mm256_fmadd_ps(wv, g0, acc[kj][0]);
            acc[kj][1] = _mm256_fmadd_ps(wv, g1, acc[kj][1]);
          }
        }
        float* d = dp1 + ((r / 5) * 196 + (oi + r % 5) * 14 + oj) * kLanes;
        for (int t = 0; t < 6; t++) {
          __m256 v = t < 5 ? acc[t][0] : acc[4][1];
          if (t > 0 && t < 5) v = _mm256_add_ps(acc[t - 1][1], v);
          _mm256_storeu_ps(d + t * kLanes, _mm256_add_ps(_mm256_loadu_ps(d + t * kLanes), v));
        }
      }
    }
}

// dZ1 (6, 28, AW) of one image = dP1 spread back over each 2x2 window, times act'; the 4
// padding lanes of each row are zero so conv1's weight gradient can use whole 8-wide loads.
template <bool Relu, bool Max>
void pool1_act_backward(const float* a1, const float* dp1, float* dz1, __m256* db1) {
  const __m256i dup = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
  const __m256 keep4 = _mm256_castsi256_ps(_mm256_setr_epi32(-1, -1, -1, -1, 0, 0, 0, 0));
  if (Max) {
    for (int c = 0; c < 6; c++) {
      __m256 sum = db1[c];  // local, as below
      for (int i = 0; i < 14; i++) {
        const float* r0 = a1 + c * 28 * AW + 2 * i * AW;
        const float* r1 = r0 + AW;
        const float* gr = dp1 + c * 196 + i * 14;
        float* d0 = dz1 + c * 28 * AW + 2 * i * AW;
        float* d1 = d0 + AW;
        for (int v = 0; v < 4; v++) {
          const __m256 g8 =
              _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(gr + 4 * v)), dup);
          __m256 g0, g1;
          max_windows_backward<Relu>(_mm256_loadu_ps(r0 + 8 * v), _mm256_loadu_ps(r1 + 8 * v),
                                     g8, g0, g1);
          if (v == 3) g0 = _mm256_and_ps(g0, keep4), g1 = _mm256_and_ps(g1, keep4);
          _mm256_storeu_ps(d0 + 8 * v, g0);
          _mm256_storeu_ps(d1 + 8 * v, g1);
          sum = _mm256_add_ps(sum, _mm256_add_ps(g0, g1));
        }
      }
      db1[c] = sum;
    }
    return;
  }
  const __m256 quarter = _mm256_set1_ps(0.25f);
  for (int c = 0; c < 6; c++) {
    // A local sum: __m256 may alias the float stores, so db1[c] itself would make every
    // addition wait on a store and a reload.
    __m256 sum = db1[c];
    for (int i = 0; i < 28; i++) {
      const float* ar = a1 + c * 28 * AW + i * AW;
      const float* gr = dp1 + c * 196 + (i >> 1) * 14;
      float* dr = dz1 + c * 28 * AW + i * AW;
      for (int v = 0; v < 4; v++) {
        const __m256 g8 =
            _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(gr + 4 * v)), dup);
        const __m256 av = _mm256_loadu_ps(ar + 8 * v);
        __m256 d = _mm256_mul_ps(_mm256_mul_ps(quarter, g8), act_grad8<Relu>(av));
        if (v == 3) d = _mm256_and_ps(d, keep4);
        _mm256_storeu_ps(dr + 8 * v, d);
        sum = _mm256_add_ps(sum, d);
      }
    }
    db1[c] = sum;
  }
}

// conv1's weight gradient as 150 running vector sums (horizontal sums once per chunk).
// conv1 needs no input gradient, so this is all of its backward.
void conv1_weight_backward(const float* xp, const float* dz1, __m256* dw1) {
  for (int ki = 0; ki < 5; ki++)
    for (int kj = 0; kj < 5; kj++) {
      __m256 s[6];
      for (int c = 0; c < 6; c++) s[c] = _mm256_setzero_ps();
      for (int i = 0; i < 28; i++) {
        const float* xr = xp + (i + ki) * XW + kj;
        for (int v = 0; v < 4; v++) {
          const __m256 xv = _mm256_loadu_ps(xr + v * 8);
          for (int c = 0; c < 6; c++)
            s[c] = _mm256_fmadd_ps(_mm256_loadu_ps(dz1 + c * 28 * AW + i * AW + v * 8), xv, s[c]);
        }
      }
      for (int c = 0; c < 6; c++) {
        __m256& acc = dw1[c * 25 + ki * 5 + kj];
        acc = _mm256_add_ps(acc, s[c]);
      }
    }
}

// The conv gradients of chunk ch, images [n0, n0+bs), into `part` (kConvGrads floats,
// overwritten).
template <bool Relu, bool Max>
void conv_backward_chunk(const Images& x, int64_t ch, int64_t n0, int bs, int64_t gpc,
                         const float* dF, const Saved& sv, const float* w2, int block,
                         float* part) {
  float* dw1 = part;
  float* db1 = dw1 + kW1;
  float* dw2 = db1 + kB1;
  float* db2 = dw2 + kW2;
  const ChunkScratch s(block);  // here dF's, dZ2's, dP1's and dZ1's values
  thread_local std::vector<__m256> w2acc(kW2);

  __m256 b2acc[kB2];
  for (auto& v : b2acc) v = _mm256_setzero_ps();
  std::fill(w2acc.begin(), w2acc.end(), _mm256_setzero_ps());
  for (int g = 0; g * kLanes < bs; g++) {
    const int n = std::min(kLanes, bs - g * kLanes);
    const int64_t at = (ch * gpc + g) * kLanes;
    to_lanes(dF + (n0 + g * kLanes) * kFeat, kFeat, n, kFeat, s.feature_lanes);
    pool2_act_backward<Relu, Max>(s.feature_lanes, sv.A2 + at * kA2, s.conv2_lanes, b2acc);
    conv2_weight_grad(s.conv2_lanes, sv.P1 + at * kP1, w2acc.data());
    std::memset(s.pool1_lanes, 0, sizeof(float) * kP1 * kLanes);
    conv2_input_grad(w2, s.conv2_lanes, s.pool1_lanes);
    from_lanes(s.pool1_lanes, kP1, n, s.pool1 + g * kLanes * kP1, kP1);
  }
  for (int t = 0; t < kW2; t++) dw2[t] = hsum8(w2acc[t]);
  for (int c = 0; c < kB2; c++) db2[c] = hsum8(b2acc[c]);

  __m256 w1acc[kW1], b1acc[kB1];
  for (auto& v : w1acc) v = _mm256_setzero_ps();
  for (auto& v : b1acc) v = _mm256_setzero_ps();
  for (int nb = 0; nb < bs; nb++) {
    pool1_act_backward<Relu, Max>(sv.A1 + (n0 + nb) * kA1, s.pool1 + nb * kP1, s.image, b1acc);
    x.pad(n0 + nb, s.xp);
    conv1_weight_backward(s.xp, s.image, w1acc);
  }
  for (int t = 0; t < kW1; t++) dw1[t] = hsum8(w1acc[t]);
  for (int c = 0; c < kB1; c++) db1[c] = hsum8(b1acc[c]);
}

// The conv gradients of chunks [c0, c1), each into its own kConvGrads floats of `parts`.
template <bool Relu, bool Max>
void conv_backward_chunks(const Images& x, int64_t N, const float* dF, const Saved& sv,
                          const float* w2, int block, int64_t c0, int64_t c1, float* parts) {
  const int64_t gpc = groups_per_chunk(N, block);
  for (int64_t ch = c0; ch < c1; ch++) {
    const int64_t n0 = ch * block;
    const int bs = (int)std::min<int64_t>(block, N - n0);
    conv_backward_chunk<Relu, Max>(x, ch, n0, bs, gpc, dF, sv, w2, block,
                                   parts + ch * kConvGrads);
  }
}

// ---------------------------------------------------------------------------------------------
// Dense layers on the whole batch

template <bool Relu>
void add_bias_act(float* o, int64_t rows, int width, const float* b) {
  for (int64_t r = 0; r < rows; r++) {
    float* p = o + r * width;
    int k = 0;
    for (; k + 8 <= width; k += 8) {
      const __m256 z = _mm256_add_ps(_mm256_loadu_ps(p + k), _mm256_loadu_ps(b + k));
      _mm256_storeu_ps(p + k, act8<Relu>(z));
    }
    for (; k < width; k++) p[k] = act1<Relu>(p[k] + b[k]);
  }
}

template <bool Relu>
void dense_forward(int n, const Params& p, const float* F, float* H3, float* H4, float* L) {
  const int C = p.classes;
  gemm(false, true, n, kH3, kFeat, 1.f, F, kFeat, p.w3, kFeat, 0.f, H3, kH3);
  add_bias_act<Relu>(H3, n, kH3, p.b3);
  gemm(false, true, n, kH4, kH3, 1.f, H3, kH3, p.w4, kH3, 0.f, H4, kH4);
  add_bias_act<Relu>(H4, n, kH4, p.b4);
  gemm(false, true, n, C, kH4, 1.f, H4, kH4, p.w5, kH4, 0.f, L, C);
  for (int64_t r = 0; r < n; r++)
    for (int k = 0; k < C; k++) L[r * C + k] += p.b5[k];
}

// torch.argmax's rule: the first maximum, and a NaN counts as the maximum.
int argmax_row(const float* l, int C) {
  int best = 0;
  for (int k = 1; k < C; k++)
    if (!std::isnan(l[best]) && (l[k] > l[best] || std::isnan(l[k]))) best = k;
  return best;
}

// Summed cross-entropy of `rows` images and the count of right argmax predictions; the
// logits are replaced by d(mean loss)/d(logits) = (softmax - target) / N, N the whole batch.
// With label smoothing eps, as torch's cross_entropy: loss = (1 - eps) (-log p_t) + eps/C
// sum_k (-log p_k), target = (1 - eps) onehot + eps/C.
std::pair<double, int64_t> softmax_cross_entropy(float* L, const int64_t* y, int64_t rows, int C,
                                                 float eps, int64_t N) {
  double loss = 0;
  int64_t right = 0;
  const float invN = 1.f / (float)N;
  const float spread = eps / (float)C * invN, hit = (1.f - eps) * invN;
  for (int64_t r = 0; r < rows; r++) {
    float* l = L + r * C;
    const int64_t t = y[r];
    right += argmax_row(l, C) == t;
    float m = l[0];
    for (int k = 1; k < C; k++) m = std::max(m, l[k]);
    float s = 0;
    for (int k = 0; k < C; k++) s += std::exp(l[k] - m);
    const float lse = m + std::log(s);
    if (eps == 0.f) {
      loss += (double)(lse - l[t]);
    } else {
      float sum = 0;
      for (int k = 0; k < C; k++) sum += l[k];
      loss += (1.0 - eps) * (double)(lse - l[t]) + eps / (double)C * ((double)C * lse - sum);
    }
    const float scale = invN / s;
    for (int k = 0; k < C; k++) l[k] = std::exp(l[k] - m) * scale - spread;
    l[t] -= hit;
  }
  return {loss, right};
}

void column_sums(const float* g, int64_t rows, int width, float* out) {
  std::fill(out, out + width, 0.f);
  for (int64_t r = 0; r < rows; r++)
    for (int k = 0; k < width; k++) out[k] += g[r * width + k];
}

template <bool Relu>
void times_act_grad(float* g, const float* h, int64_t n) {
  for (int64_t i = 0; i < n; i++) g[i] *= act_grad1<Relu>(h[i]);
}

// Gradient pointers in parameter order, carved from one flat buffer.
struct Grads {
  float *w1, *w3, *b3, *w4, *b4, *w5, *b5;  // (w1, b1, w2, b2 are the conv prefix)
};

Grads carve_grads(float* g, int C) {
  Grads r;
  r.w1 = g;
  r.w3 = g + kConvGrads;
  r.b3 = r.w3 + kH3 * kFeat;
  r.w4 = r.b3 + kH3;
  r.b4 = r.w4 + kH4 * kH3;
  r.w5 = r.b4 + kH4;
  r.b5 = r.w5 + C * kH4;
  return r;
}

int64_t num_grads(int C) { return kConvGrads + kH3 * kFeat + kH3 + kH4 * kH3 + kH4 + C * kH4 + C; }

// dL (n, C) back to dF (n, 400): dense gradients into g; G4, G3 are scratch.
template <bool Relu>
void dense_backward(int n, const Params& p, const Saved& sv, const Grads& g, float* G4, float* G3,
                    float* dF) {
  const int C = p.classes;
  gemm(true, false, C, kH4, n, 1.f, sv.L, C, sv.H4, kH4, 0.f, g.w5, kH4);
  column_sums(sv.L, n, C, g.b5);
  gemm(false, false, n, kH4, C, 1.f, sv.L, C, p.w5, kH4, 0.f, G4, kH4);
  times_act_grad<Relu>(G4, sv.H4, (int64_t)n * kH4);
  gemm(true, false, kH4, kH3, n, 1.f, G4, kH4, sv.H3, kH3, 0.f, g.w4, kH3);
  column_sums(G4, n, kH4, g.b4);
  gemm(false, false, n, kH3, kH4, 1.f, G4, kH4, p.w4, kH3, 0.f, G3, kH3);
  times_act_grad<Relu>(G3, sv.H3, (int64_t)n * kH3);
  gemm(true, false, kH3, kFeat, n, 1.f, G3, kH3, sv.F, kFeat, 0.f, g.w3, kFeat);
  column_sums(G3, n, kH3, g.b3);
  gemm(false, false, n, kFeat, kH3, 1.f, G3, kH3, p.w3, kFeat, 0.f, dF, kFeat);
}

// The dense layers and the loss run on groups of kGroup images in parallel, each group's GEMMs
// on one thread: at batch 128 MKL threads these small GEMMs poorly, and the bias, activation
// and column-sum passes around them would otherwise run on one thread. The groups' dense
// gradients are summed in group order afterwards; a fixed group size keeps the result
// independent of the number of threads.
constexpr int kGroup = 64;

int64_t num_groups(int64_t N) { return (N + kGroup - 1) / kGroup; }

// The dense layers, loss and dense backward of group k (images [64k, 64k + 64) of N): its
// summed loss and number right; its dense gradients into g (group 0) or `parts` (group k at
// (k - 1) * num_grads(C)); dF filled for the conv backward.
template <bool Relu>
std::pair<double, int64_t> dense_group(int64_t k, const int64_t* y, int64_t N, const Params& p,
                                       const Saved& sv, float* G3, float* G4, float* dF,
                                       float* g, float* parts, float eps) {
  const int C = p.classes;
  const int64_t r0 = k * kGroup;
  const int n = (int)std::min<int64_t>(kGroup, N - r0);
  Saved s = sv;
  s.F += r0 * kFeat, s.H3 += r0 * kH3, s.H4 += r0 * kH4, s.L += r0 * C;
  dense_forward<Relu>(n, p, s.F, s.H3, s.H4, s.L);
  const auto res = softmax_cross_entropy(s.L, y + r0, n, C, eps, N);
  float* gk = k == 0 ? g : parts + (k - 1) * num_grads(C);
  dense_backward<Relu>(n, p, s, carve_grads(gk, C), G4 + r0 * kH4, G3 + r0 * kH3,
                       dF + r0 * kFeat);
  return res;
}

// ---------------------------------------------------------------------------------------------
// Checks and bindings

const int64_t kShapes[10][4] = {{6, 1, 5, 5}, {6}, {16, 6, 5, 5}, {16}, {kH3, kFeat},
                                {kH3},        {kH4, kH3}, {kH4}, {-1, kH4}, {-1}};

Params check_params(const std::vector<torch::Tensor>& P) {
  TORCH_CHECK(P.size() == 10, "fused LeNet: expected the book's 10 parameter tensors, got ",
              P.size());
  const int64_t C = P[9].dim() == 1 ? P[9].size(0) : -1;
  TORCH_CHECK(C >= 1, "fused LeNet: the output bias must be 1-D");
  for (int k = 0; k < 10; k++) {
    const auto& t = P[k];
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat && t.is_contiguous(),
                "fused LeNet: parameter ", k, " must be a contiguous float32 CPU tensor");
    const int rank = (k == 0 || k == 2) ? 4 : (k % 2 == 0 ? 2 : 1);
    TORCH_CHECK(t.dim() == rank, "fused LeNet: parameter ", k, " has the wrong shape ", t.sizes());
    for (int d = 0; d < rank; d++) {
      const int64_t want = kShapes[k][d] == -1 ? C : kShapes[k][d];
      TORCH_CHECK(t.size(d) == want, "fused LeNet: parameter ", k, " has the wrong shape ",
                  t.sizes());
    }
  }
  auto f = [&](int k) { return P[k].data_ptr<float>(); };
  return {f(0), f(1), f(2), f(3), f(4), f(5), f(6), f(7), f(8), f(9), (int)C};
}

int64_t check_images(const torch::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() &&
                  (x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kByte),
              "fused LeNet: images must be a contiguous float32 or uint8 CPU tensor");
  TORCH_CHECK(x.dim() == 4 && x.size(0) >= 1 && x.size(1) == 1 && x.size(2) == kImg &&
                  x.size(3) == kImg,
              "fused LeNet: images must have shape (B>=1, 1, 28, 28), got ", x.sizes());
  TORCH_CHECK(x.size(0) <= INT32_MAX / kImgPixels, "fused LeNet: batch too large");
  return x.size(0);
}

Images images_of(const torch::Tensor& x) {
  if (x.scalar_type() == torch::kByte) return {nullptr, x.data_ptr<uint8_t>()};
  return {x.data_ptr<float>(), nullptr};
}

void check_labels(const torch::Tensor& y, int64_t N, int C) {
  TORCH_CHECK(y.device().is_cpu() && y.scalar_type() == torch::kLong && y.is_contiguous() &&
                  y.dim() == 1 && y.size(0) == N,
              "fused LeNet: labels must be a contiguous int64 CPU tensor of shape (", N, ")");
  const int64_t* yd = y.data_ptr<int64_t>();
  for (int64_t r = 0; r < N; r++)
    TORCH_CHECK_INDEX(yd[r] >= 0 && yd[r] < C, "Target ", yd[r], " is out of bounds.");
}

// Grows `t` to at least n floats; the buffers live in the Python object between steps.
float* ensure(torch::Tensor& t, int64_t n) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat && t.is_contiguous(), "fused LeNet: bad buffer");
  if (t.numel() < n) t.resize_({n});
  return t.data_ptr<float>();
}

// torch.optim.SGD's update (dampening 0), element by element: d = g + wd p; with momentum
// buf = d on the first step, else momentum buf + d, and d = d + momentum buf (Nesterov) or
// buf; then p -= lr d.
struct Sgd {
  float lr, momentum, weight_decay;
  bool nesterov, first;
  float* buf;  // momentum buffers in gradient order (unused without momentum)
};

void sgd_update(const std::vector<torch::Tensor>& P, const float* g, const Sgd& o) {
  float* b = o.buf;
  for (const auto& t : P) {
    float* p = t.data_ptr<float>();
    const int64_t m = t.numel();
    if (o.momentum == 0.f && o.weight_decay == 0.f) {  // the book's: plain SGD
      for (int64_t i = 0; i < m; i++) p[i] -= o.lr * g[i];
    } else {
      for (int64_t i = 0; i < m; i++) {
        float d = g[i];
        if (o.weight_decay != 0.f) d += o.weight_decay * p[i];
        if (o.momentum != 0.f) {
          b[i] = o.first ? d : o.momentum * b[i] + d;
          d = o.nesterov ? d + o.momentum * b[i] : b[i];
        }
        p[i] -= o.lr * d;
      }
      b += m;
    }
    g += m;
  }
}

}  // namespace

// The gradients of the mean loss into g: the conv prefix summed over chunks of `block`
// images, the dense rest over groups of kGroup, each in order, so the bits never depend on
// which thread ran what. Returns the mean loss and the number right.
template <bool Relu, bool Max>
std::pair<double, int64_t> step_impl(const Images& x, const int64_t* y, int64_t N,
                                     const Params& p, const Saved& sv, float* G3, float* G4,
                                     float* dF, float* g, float* parts, float eps, int block) {
  const int64_t chunks = num_chunks(N, block), groups = num_groups(N);
  std::vector<float> conv_parts((size_t)chunks * kConvGrads);
  std::vector<std::pair<double, int64_t>> res(groups);
  const auto dense = [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; k++)
      res[k] = dense_group<Relu>(k, y, N, p, sv, G3, G4, dF, g, parts, eps);
  };
  if (kGroup % block == 0 && groups >= at::get_num_threads()) {
    // Each thread takes whole groups through the forward, the loss and the backward without
    // waiting for the others: one parallel region per step instead of three, so the threads'
    // minute-to-minute difference in speed is waited out once, and a group's data is still
    // in its thread's cache.
    const int64_t per_group = kGroup / block;
    at::parallel_for(0, groups, 1, [&](int64_t k0, int64_t k1) {
      const int64_t c0 = k0 * per_group, c1 = std::min(k1 * per_group, chunks);
      conv_forward_chunks<Relu, Max>(x, N, p, sv.F, &sv, block, c0, c1);
      dense(k0, k1);
      conv_backward_chunks<Relu, Max>(x, N, dF, sv, p.w2, block, c0, c1, conv_parts.data());
    });
  } else {  // more threads than groups, or chunks straddling groups: layer by layer
    conv_forward<Relu, Max>(x, N, p, sv.F, &sv, block);
    at::parallel_for(0, groups, 1, dense);
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      conv_backward_chunks<Relu, Max>(x, N, dF, sv, p.w2, block, c0, c1, conv_parts.data());
    });
  }
  std::memcpy(g, conv_parts.data(), kConvGrads * 4);
  for (int64_t ch = 1; ch < chunks; ch++) {
    const float* q = conv_parts.data() + ch * kConvGrads;
    for (int k = 0; k < kConvGrads; k++) g[k] += q[k];
  }
  const int64_t total = num_grads(p.classes);
  for (int64_t k = 1; k < groups; k++) {
    const float* q = parts + (k - 1) * total;
    for (int64_t i = kConvGrads; i < total; i++) g[i] += q[i];
  }
  double loss = 0;
  int64_t right = 0;
  for (const auto& [l, r] : res) loss += l, right += r;
  return {loss / (double)N, right};
}

// One SGD step on (x, y); returns (mean loss, number right) from the forward before the
// update. `grads`, `ws` and `momentum_buf` are caller-held buffers, grown here as needed
// (momentum_buf holds the momentum buffers between steps, grown by the first update with
// momentum, which `first` marks).
// Without `update` the parameters are left alone and `grads` holds the gradients (for tests).
std::tuple<torch::Tensor, torch::Tensor> train_step(
    torch::Tensor x, torch::Tensor y, std::vector<torch::Tensor> P, torch::Tensor grads,
    torch::Tensor ws, torch::Tensor momentum_buf, bool relu, bool max_pool, double smoothing,
    bool update, double lr, double momentum, bool nesterov, double weight_decay, bool first,
    int64_t block) {
  TORCH_CHECK(block >= 1 && block <= 4096, "fused LeNet: block must be in 1..4096");
  TORCH_CHECK(smoothing >= 0 && smoothing <= 1, "fused LeNet: smoothing must be in [0, 1]");
  const Params p = check_params(P);
  const int64_t N = check_images(x);
  const int C = p.classes;
  check_labels(y, N, C);

  const int64_t NL = lane_images(N, (int)block);
  float* w = ensure(ws, N * (kA1 + kFeat * 2 + (kH3 + kH4) * 2 + C) + NL * (kP1 + kA2) +
                           (num_groups(N) - 1) * num_grads(C));
  Saved sv;
  sv.A1 = w, w += N * kA1;
  sv.P1 = w, w += NL * kP1;
  sv.A2 = w, w += NL * kA2;
  sv.F = w, w += N * kFeat;
  sv.H3 = w, w += N * kH3;
  sv.H4 = w, w += N * kH4;
  sv.L = w, w += N * C;
  float* G3 = w; w += N * kH3;
  float* G4 = w; w += N * kH4;
  float* dF = w; w += N * kFeat;
  float* parts = w;
  float* g = ensure(grads, num_grads(C));
  float* buf = update && momentum != 0.0 ? ensure(momentum_buf, num_grads(C)) : nullptr;

  auto* step = relu ? (max_pool ? step_impl<true, true> : step_impl<true, false>)
                    : (max_pool ? step_impl<false, true> : step_impl<false, false>);
  const auto [loss, right] = step(images_of(x), y.data_ptr<int64_t>(), N, p, sv, G3, G4,
                                  dF, g, parts, (float)smoothing, (int)block);
  if (update)
    sgd_update(P, g, {(float)lr, (float)momentum, (float)weight_decay, nesterov, first, buf});
  return {torch::scalar_tensor(loss, torch::kFloat), torch::scalar_tensor(right, torch::kLong)};
}

// Logits (B, C) of the network, nothing saved for a backward.
torch::Tensor forward(torch::Tensor x, std::vector<torch::Tensor> P, bool relu, bool max_pool,
                      int64_t block) {
  TORCH_CHECK(block >= 1 && block <= 4096, "fused LeNet: block must be in 1..4096");
  const Params p = check_params(P);
  const int64_t N = check_images(x);
  auto opt = x.options().dtype(torch::kFloat);
  auto F = torch::empty({N, kFeat}, opt), H3 = torch::empty({N, kH3}, opt),
       H4 = torch::empty({N, kH4}, opt), L = torch::empty({N, p.classes}, opt);
  float *f = F.data_ptr<float>(), *h3 = H3.data_ptr<float>(), *h4 = H4.data_ptr<float>(),
        *l = L.data_ptr<float>();
  const Images xd = images_of(x);
  if (relu) {
    max_pool ? conv_forward<true, true>(xd, N, p, f, nullptr, (int)block)
             : conv_forward<true, false>(xd, N, p, f, nullptr, (int)block);
    dense_forward<true>((int)N, p, f, h3, h4, l);
  } else {
    max_pool ? conv_forward<false, true>(xd, N, p, f, nullptr, (int)block)
             : conv_forward<false, false>(xd, N, p, f, nullptr, (int)block);
    dense_forward<false>((int)N, p, f, h3, h4, l);
  }
  return L;
}

// blocks.cpp
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor>
bn_relu_pool_forward(
    torch::Tensor x, torch::Tensor weight, torch::Tensor bias, torch::Tensor running_mean,
    torch::Tensor running_var, double momentum, double eps);
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> bn_relu_pool_backward(
    torch::Tensor dout, torch::Tensor x, torch::Tensor weight, torch::Tensor code,
    torch::Tensor xmax, torch::Tensor mean, torch::Tensor invstd);
torch::Tensor bn_relu_pool_inference(torch::Tensor x, torch::Tensor weight, torch::Tensor bias,
                                     torch::Tensor running_mean, torch::Tensor running_var,
                                     double eps);
torch::Tensor conv1x_forward(torch::Tensor x, torch::Tensor weight, torch::Tensor bias,
                             int64_t pad);
std::tuple<torch::Tensor, torch::Tensor> conv1x_backward(torch::Tensor dout, torch::Tensor x,
                                                         torch::Tensor weight, int64_t pad);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.def("train_step", &train_step, "one fused SGD step of the book LeNet-5", py::arg("x"),
        py::arg("y"), py::arg("params"), py::arg("grads"), py::arg("workspace"),
        py::arg("momentum_buf"), py::arg("relu"), py::arg("max_pool"), py::arg("smoothing"),
        py::arg("update"), py::arg("lr"), py::arg("momentum"), py::arg("nesterov"),
        py::arg("weight_decay"), py::arg("first"), py::arg("block"));
  m.def("forward", &forward, "logits of the book LeNet-5", py::arg("x"), py::arg("params"),
        py::arg("relu"), py::arg("max_pool"), py::arg("block"));
  m.def("bn_relu_pool_forward", &bn_relu_pool_forward,
        "BatchNorm (batch statistics) -> ReLU -> 2x2 max-pool of a channels-last tensor",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("running_mean"),
        py::arg("running_var"), py::arg("momentum"), py::arg("eps"));
  m.def("bn_relu_pool_backward", &bn_relu_pool_backward, "the gradients of bn_relu_pool_forward",
        py::arg("dout"), py::arg("x"), py::arg("weight"), py::arg("code"), py::arg("xmax"),
        py::arg("mean"), py::arg("invstd"));
  m.def("bn_relu_pool_inference", &bn_relu_pool_inference,
        "bn_relu_pool_forward in eval mode: the running statistics, nothing updated",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("running_mean"),
        py::arg("running_var"), py::arg("eps"));
  m.def("conv1x_forward", &conv1x_forward,
        "a one-input-channel KxK convolution (K 3 or 5), output channels-last", py::arg("x"),
        py::arg("weight"), py::arg("bias"), py::arg("pad"));
  m.def("conv1x_backward", &conv1x_backward, "the weight and bias gradients of conv1x_forward",
        py::arg("dout"), py::arg("x"), py::arg("weight"), py::arg("pad"));
}
