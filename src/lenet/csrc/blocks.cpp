// BatchNorm (batch statistics) -> ReLU -> 2x2 stride-2 max-pool, forward and backward, on
// channels-last fp32 tensors: the block that BatchNorm networks (the `best` preset) repeat
// after every convolution; and a first convolution of one input channel.
// Built into the same extension as fused_lenet.cpp and used by lenet/blocks.py as autograd
// ops, with the other convolutions left to PyTorch (oneDNN).
//
// Why: autograd runs the block as seven full passes over the conv output forward and
// backward (batch_norm, relu, max_pool, their three backwards and a zero fill), and oneDNN
// runs a one-input-channel convolution at ~8 GFLOP/s. Here the block works an image at a
// time (its statistics from the image while it is in cache, merged over the batch; the
// backward from a byte per output and the input at each window's maximum), and the
// convolution keeps a pixel's output channels in vector registers.
//
// The arithmetic is torch's: biased variance for the normalisation, unbiased for running_var,
// y = x * (w / sqrt(var + eps)) + (b - mean * w / sqrt(var + eps)), a window's maximum and its
// gradient at the first maximum in scan order (a NaN wins, as torch's `val > max || isnan`),
// ReLU's gradient only where its output is > 0, and BatchNorm's backward as
// dx = (dy - (x - mean) * dot / (M var') - sum / M) * w / sqrt(var + eps) with
// sum = sum(dy), dot = sum(dy (x - mean)), var' = var + eps, M = N H W.
// Batch sums are taken per image (a row at a time in float, then in double) and the images'
// sums added in order (the variance by Chan's merge of per-image moments), so the result does
// not depend on the thread count.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <tuple>
#include <vector>

namespace {

// ---------------------------------------------------------------------------------------------
// Shapes

// A block's input (N, C, H, W), channels-last, and its pooled output (N, C, Hp, Wp).
struct Geometry {
  int64_t N, C, H, W, Hp, Wp;
  int64_t image() const { return H * W * C; }
  int64_t pooled_image() const { return Hp * Wp * C; }
};

Geometry block_geometry(int64_t N, int64_t C, int64_t H, int64_t W) {
  TORCH_CHECK(N >= 1 && H >= 2 && W >= 2, "bn_relu_pool: expected N >= 1 and H, W >= 2");
  TORCH_CHECK(C % 8 == 0, "bn_relu_pool: expected a multiple of 8 channels");
  return {N, C, H, W, H / 2, W / 2};
}

Geometry check(const torch::Tensor& x, const torch::Tensor& weight) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == torch::kFloat && x.device().is_cpu(),
              "bn_relu_pool: expected a float32 (N, C, H, W) tensor on the CPU");
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "bn_relu_pool: expected a channels-last tensor");
  TORCH_CHECK(weight.numel() == x.size(1), "bn_relu_pool: expected one weight per channel");
  return block_geometry(x.size(0), x.size(1), x.size(2), x.size(3));
}

// A convolution of one input channel: (N, 1, H, W) -> (N, C, Ho, Wo), K x K, zero padding P.
struct ConvGeometry {
  int64_t N, H, W, C, K, P, Hp, Wp, Ho, Wo;  // Hp, Wp: the padded input
};

ConvGeometry conv_check(const torch::Tensor& x, const torch::Tensor& weight, int64_t pad) {
  TORCH_CHECK(x.dim() == 4 && x.size(1) == 1 && x.scalar_type() == torch::kFloat &&
                  x.device().is_cpu() && x.is_contiguous(),
              "conv1x: expected a contiguous float32 (N, 1, H, W) tensor on the CPU");
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == 1 && weight.size(2) == weight.size(3) &&
                  weight.size(0) % 8 == 0 && weight.scalar_type() == torch::kFloat,
              "conv1x: expected a float32 (C, 1, K, K) weight with C a multiple of 8");
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3), C = weight.size(0),
                K = weight.size(2);
  TORCH_CHECK(K == 3 || K == 5, "conv1x: expected a 3x3 or 5x5 kernel");
  TORCH_CHECK(pad >= 0 && H + 2 * pad >= K && W + 2 * pad >= K,
              "conv1x: kernel larger than input");
  return {N, H, W, C, K, pad, H + 2 * pad, W + 2 * pad, H + 2 * pad - K + 1, W + 2 * pad - K + 1};
}

// ---------------------------------------------------------------------------------------------
// Vector helpers

// max(0, y) with y second: a NaN passes, as through torch.relu.
inline __m256 relu8(__m256 y) { return _mm256_max_ps(_mm256_setzero_ps(), y); }

// 8 int32 lanes of 0..255 <-> 8 bytes
inline void store_bytes(uint8_t* p, __m256i v) {
  const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packus_epi16(w, w));
}
inline __m256i load_bytes(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

// ---------------------------------------------------------------------------------------------
// The block, an image at a time (pointers at the image's start)

// Per channel, the image's mean and sum of squared deviations from it (two passes over an
// image that sits in cache). `row` is scratch of C floats.
void image_moments(const float* z, const Geometry& g, double* mean, double* m2, float* row) {
  const int64_t C = g.C;
  std::fill(mean, mean + C, 0.0);
  std::fill(m2, m2 + C, 0.0);
  for (int64_t h = 0; h < g.H; h++) {
    std::fill(row, row + C, 0.f);
    for (int64_t w = 0; w < g.W; w++)
      for (int64_t c = 0; c < C; c++) row[c] += z[(h * g.W + w) * C + c];
    for (int64_t c = 0; c < C; c++) mean[c] += row[c];
  }
  for (int64_t c = 0; c < C; c++) mean[c] /= (double)(g.H * g.W);
  for (int64_t h = 0; h < g.H; h++) {
    std::fill(row, row + C, 0.f);
    for (int64_t w = 0; w < g.W; w++)
      for (int64_t c = 0; c < C; c++) {
        const float d = z[(h * g.W + w) * C + c] - (float)mean[c];
        row[c] += d * d;
      }
    for (int64_t c = 0; c < C; c++) m2[c] += row[c];
  }
}

// out = maxpool(relu(z * scale + shift)); unless null, for the backward: in `code` each
// output's window position 0..3, plus 4 where the output is > 0 (ReLU passes a gradient), and
// in `xmax` the input at that position (so the backward's sums need not read z again).
void normalize_relu_pool_image(const float* z, const Geometry& g, const float* sc,
                               const float* sh, float* o, uint8_t* code, float* xmax) {
  const int64_t C = g.C;
  for (int64_t ph = 0; ph < g.Hp; ph++)
    for (int64_t pw = 0; pw < g.Wp; pw++) {
      const float* p0 = z + (2 * ph * g.W + 2 * pw) * C;
      const float* p[4] = {p0, p0 + C, p0 + g.W * C, p0 + g.W * C + C};  // torch's scan order
      const int64_t q = (ph * g.Wp + pw) * C;
      for (int64_t c = 0; c < C; c += 8) {
        const __m256 s = _mm256_loadu_ps(sc + c), t = _mm256_loadu_ps(sh + c);
        __m256 xm = _mm256_loadu_ps(p[0] + c);
        __m256 m = relu8(_mm256_fmadd_ps(xm, s, t));
        __m256 at = _mm256_setzero_ps();
        for (int j = 1; j < 4; j++) {
          const __m256 xj = _mm256_loadu_ps(p[j] + c);
          const __m256 v = relu8(_mm256_fmadd_ps(xj, s, t));
          const __m256 take = _mm256_or_ps(_mm256_cmp_ps(v, m, _CMP_GT_OQ),
                                           _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
          m = _mm256_blendv_ps(m, v, take);
          xm = _mm256_blendv_ps(xm, xj, take);
          at = _mm256_blendv_ps(at, _mm256_set1_ps((float)j), take);
        }
        _mm256_storeu_ps(o + q + c, m);
        if (code) {
          const __m256 passes = _mm256_and_ps(_mm256_cmp_ps(m, _mm256_setzero_ps(), _CMP_GT_OQ),
                                              _mm256_set1_ps(4.f));
          store_bytes(code + q + c, _mm256_cvttps_epi32(_mm256_add_ps(at, passes)));
          _mm256_storeu_ps(xmax + q + c, xm);
        }
      }
    }
}

// What the forward needs from the batch statistics, and what it keeps for the backward.
struct Normalisation {
  std::vector<float> scale, shift;
  torch::Tensor mean, invstd;
};

// Merges the images' moments (Chan et al.), updates the running statistics as BatchNorm2d
// does, and folds the normalisation and the affine weights into a scale and a shift.
Normalisation batch_normalisation(const std::vector<double>& means,
                                  const std::vector<double>& m2s, const Geometry& g,
                                  const torch::Tensor& weight, const torch::Tensor& bias,
                                  torch::Tensor running_mean, torch::Tensor running_var,
                                  double momentum, double eps) {
  const int64_t C = g.C, per = g.H * g.W, M = g.N * per;
  Normalisation r{std::vector<float>(C), std::vector<float>(C),
                  torch::empty({C}, weight.options()), torch::empty({C}, weight.options())};
  const float *wt = weight.data_ptr<float>(), *bs = bias.data_ptr<float>();
  float *rm = running_mean.data_ptr<float>(), *rv = running_var.data_ptr<float>();
  for (int64_t c = 0; c < C; c++) {
    double mean = 0.0, m2 = 0.0;
    for (int64_t n = 0; n < g.N; n++) mean += means[n * C + c];
    mean /= (double)g.N;
    for (int64_t n = 0; n < g.N; n++) {
      const double d = means[n * C + c] - mean;
      m2 += m2s[n * C + c] + d * d * (double)per;
    }
    const double var = m2 / (double)M;
    const float invstd = (float)(1.0 / std::sqrt(var + eps));
    r.mean.data_ptr<float>()[c] = (float)mean;
    r.invstd.data_ptr<float>()[c] = invstd;
    r.scale[c] = invstd * wt[c];
    r.shift[c] = bs[c] - (float)mean * r.scale[c];
    rm[c] = (float)((1 - momentum) * rm[c] + momentum * mean);
    rv[c] = (float)((1 - momentum) * rv[c] + momentum * m2 / (double)std::max<int64_t>(M - 1, 1));
  }
  return r;
}

// The backward's per-channel factors: dx = (dy - (x - mean) proj - gmean) k.
struct Backward {
  std::vector<float> proj, gmean, k;
  torch::Tensor dweight, dbias;
};

// Sums per channel of the gradient reaching each window's maximum through ReLU (dy), and of
// dy (x - mean), from the output's gradient D and the forward's code and xmax.
Backward block_backward_factors(const float* D, const uint8_t* K, const float* XM,
                                const Geometry& g, const torch::Tensor& weight,
                                const float* mean, const float* invstd) {
  const int64_t C = g.C, M = g.N * g.H * g.W, Q = g.pooled_image();
  const __m256i three = _mm256_set1_epi32(3);
  std::vector<double> per_image(g.N * C * 2, 0.0);
  at::parallel_for(0, g.N, 1, [&](int64_t a, int64_t b) {
    std::vector<float> s(C), dot(C);
    for (int64_t n = a; n < b; n++) {
      double* acc = per_image.data() + n * C * 2;
      for (int64_t ph = 0; ph < g.Hp; ph++) {
        std::fill(s.begin(), s.end(), 0.f);
        std::fill(dot.begin(), dot.end(), 0.f);
        for (int64_t pw = 0; pw < g.Wp; pw++) {
          const int64_t q = n * Q + (ph * g.Wp + pw) * C;
          for (int64_t c = 0; c < C; c += 8) {
            const __m256 passes =
                _mm256_castsi256_ps(_mm256_cmpgt_epi32(load_bytes(K + q + c), three));
            const __m256 dy = _mm256_and_ps(_mm256_loadu_ps(D + q + c), passes);
            const __m256 centred =
                _mm256_sub_ps(_mm256_loadu_ps(XM + q + c), _mm256_loadu_ps(mean + c));
            _mm256_storeu_ps(s.data() + c, _mm256_add_ps(_mm256_loadu_ps(s.data() + c), dy));
            _mm256_storeu_ps(dot.data() + c,
                             _mm256_fmadd_ps(dy, centred, _mm256_loadu_ps(dot.data() + c)));
          }
        }
        for (int64_t c = 0; c < C; c++) acc[c] += s[c], acc[C + c] += dot[c];
      }
    }
  });
  Backward r{std::vector<float>(C), std::vector<float>(C), std::vector<float>(C),
             torch::empty({C}, weight.options()), torch::empty({C}, weight.options())};
  const float* wt = weight.data_ptr<float>();
  for (int64_t c = 0; c < C; c++) {
    double sum = 0.0, dot = 0.0;
    for (int64_t n = 0; n < g.N; n++)
      sum += per_image[n * C * 2 + c], dot += per_image[n * C * 2 + C + c];
    r.dweight.data_ptr<float>()[c] = (float)(dot * invstd[c]);
    r.dbias.data_ptr<float>()[c] = (float)sum;
    r.proj[c] = (float)(dot / M) * invstd[c] * invstd[c];
    r.gmean[c] = (float)(sum / M);
    r.k[c] = invstd[c] * wt[c];
  }
  return r;
}

// dx of one image from its input z, the output's gradient d, and the forward's code; dy is
// d at a window's maximum where ReLU passed it (code 4 + position), else 0 (also on a last odd
// row or column, outside every window).
void block_dx_image(const float* z, const float* d, const uint8_t* code, const Geometry& g,
                    const float* mean, const Backward& f, float* dx) {
  const int64_t C = g.C;
  const float *pj = f.proj.data(), *gm = f.gmean.data(), *kk = f.k.data();
  for (int64_t h = 0; h < g.H; h++)
    for (int64_t w = 0; w < g.W; w++) {
      const int64_t at = (h * g.W + w) * C;
      const bool windowed = h < 2 * g.Hp && w < 2 * g.Wp;
      const int64_t q = windowed ? ((h / 2) * g.Wp + w / 2) * C : 0;
      const __m256i here = _mm256_set1_epi32(4 + (int)((h & 1) * 2 + (w & 1)));
      for (int64_t c = 0; c < C; c += 8) {
        __m256 dy = _mm256_setzero_ps();
        if (windowed)
          dy = _mm256_and_ps(_mm256_loadu_ps(d + q + c), _mm256_castsi256_ps(_mm256_cmpeq_epi32(
                                                             load_bytes(code + q + c), here)));
        const __m256 centred =
            _mm256_sub_ps(_mm256_loadu_ps(z + at + c), _mm256_loadu_ps(mean + c));
        const __m256 v = _mm256_sub_ps(_mm256_fnmadd_ps(centred, _mm256_loadu_ps(pj + c), dy),
                                       _mm256_loadu_ps(gm + c));
        _mm256_storeu_ps(dx + at + c, _mm256_mul_ps(v, _mm256_loadu_ps(kk + c)));
      }
    }
}

// ---------------------------------------------------------------------------------------------
// The single-channel convolution, an image at a time: a pixel's C outputs as channel vectors,
// each tap one broadcast and C/8 FMAs

// Image n, zero-padded, into `to` (Hp x Wp).
void pad_image(const float* x, const ConvGeometry& g, int64_t n, float* to) {
  std::fill(to, to + g.Hp * g.Wp, 0.f);
  for (int64_t i = 0; i < g.H; i++)
    std::copy(x + (n * g.H + i) * g.W, x + (n * g.H + i + 1) * g.W, to + (i + g.P) * g.Wp + g.P);
}

// Taps-major weights: wt[t * C + c]
std::vector<float> taps_major(const torch::Tensor& weight) {
  const int64_t C = weight.size(0), KK = weight.size(2) * weight.size(3);
  const torch::Tensor w = weight.contiguous();
  const float* p = w.data_ptr<float>();
  std::vector<float> wt(KK * C);
  for (int64_t c = 0; c < C; c++)
    for (int64_t t = 0; t < KK; t++) wt[t * C + c] = p[c * KK + t];
  return wt;
}

// Output pixels (i, j0 .. j0 + J - 1), all channels: J pixels per channel vector keep J FMA
// chains in flight (one chain would wait on the FMA latency at every tap).
template <int K, int J>
inline void conv1x_pixels(const float* xp, const ConvGeometry& g, const float* wt,
                          const float* b, int64_t i, int64_t j0, float* o) {
  const int64_t C = g.C;
  for (int64_t c = 0; c < C; c += 8) {
    __m256 acc[J];
    for (int k = 0; k < J; k++) acc[k] = _mm256_loadu_ps(b + c);
    for (int ti = 0; ti < K; ti++) {
      const float* row = xp + (i + ti) * g.Wp + j0;
      for (int tj = 0; tj < K; tj++) {
        const __m256 w = _mm256_loadu_ps(wt + (ti * K + tj) * C + c);
        for (int k = 0; k < J; k++)
          acc[k] = _mm256_fmadd_ps(_mm256_broadcast_ss(row + k + tj), w, acc[k]);
      }
    }
    for (int k = 0; k < J; k++) _mm256_storeu_ps(o + k * C + c, acc[k]);
  }
}

// One padded image's output (Ho, Wo, C).
template <int K>
void conv1x_image_k(const float* xp, const ConvGeometry& g, const float* wt, const float* b,
                    float* z) {
  for (int64_t i = 0; i < g.Ho; i++) {
    float* o = z + i * g.Wo * g.C;
    int64_t j = 0;
    for (; j + 8 <= g.Wo; j += 8) conv1x_pixels<K, 8>(xp, g, wt, b, i, j, o + j * g.C);
    for (; j < g.Wo; j++) conv1x_pixels<K, 1>(xp, g, wt, b, i, j, o + j * g.C);
  }
}

void conv1x_image(const float* xp, const ConvGeometry& g, const float* wt, const float* b,
                  float* z) {
  (g.K == 3 ? conv1x_image_k<3> : conv1x_image_k<5>)(xp, g, wt, b, z);
}

// One image's weight gradient sums (K x K taps, then the bias) for the channel vector at c,
// into acc: one accumulator per tap, so the taps' chains run side by side.
template <int K>
void conv1x_weight_grads_k(const float* xp, const float* d, const ConvGeometry& g, int64_t c,
                           float* acc) {
  const int64_t C = g.C;
  __m256 s[K * K], sb = _mm256_setzero_ps();
  for (int t = 0; t < K * K; t++) s[t] = _mm256_setzero_ps();
  for (int64_t i = 0; i < g.Ho; i++)
    for (int64_t j = 0; j < g.Wo; j++) {
      const __m256 dv = _mm256_loadu_ps(d + (i * g.Wo + j) * C + c);
      sb = _mm256_add_ps(sb, dv);
      for (int ti = 0; ti < K; ti++) {
        const float* row = xp + (i + ti) * g.Wp + j;
        for (int tj = 0; tj < K; tj++)
          s[ti * K + tj] = _mm256_fmadd_ps(_mm256_broadcast_ss(row + tj), dv, s[ti * K + tj]);
      }
    }
  for (int t = 0; t < K * K; t++) _mm256_storeu_ps(acc + t * C + c, s[t]);
  _mm256_storeu_ps(acc + K * K * C + c, sb);
}

// All channels of one image's weight gradient sums: ((K*K + 1) * C) floats into acc.
void conv1x_weight_grads(const float* xp, const float* d, const ConvGeometry& g, float* acc) {
  for (int64_t c = 0; c < g.C; c += 8)
    (g.K == 3 ? conv1x_weight_grads_k<3> : conv1x_weight_grads_k<5>)(xp, d, g, c, acc);
}

// The images' weight gradient sums added in order, as (dweight (C, 1, K, K), dbias (C)).
std::tuple<torch::Tensor, torch::Tensor> conv1x_gradients(const std::vector<float>& per_image,
                                                          const ConvGeometry& g,
                                                          const torch::TensorOptions& opt) {
  const int64_t C = g.C, KK = g.K * g.K, per = (KK + 1) * C;
  std::vector<double> total(per, 0.0);
  for (int64_t n = 0; n < g.N; n++)
    for (int64_t k = 0; k < per; k++) total[k] += per_image[n * per + k];
  auto dweight = torch::empty({C, 1, g.K, g.K}, opt), dbias = torch::empty({C}, opt);
  float *dw = dweight.data_ptr<float>(), *db = dbias.data_ptr<float>();
  for (int64_t c = 0; c < C; c++) {
    for (int64_t t = 0; t < KK; t++) dw[c * KK + t] = (float)total[t * C + c];
    db[c] = (float)total[KK * C + c];
  }
  return {dweight, dbias};
}

torch::Tensor pooled_like(const Geometry& g, const torch::TensorOptions& opt) {
  return torch::empty({g.N, g.C, g.Hp, g.Wp}, opt, at::MemoryFormat::ChannelsLast);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// The block

// Returns (out (N, C, H/2, W/2) channels-last, and for the backward: code (uint8) and xmax
// as normalize_relu_pool_image writes them, mean (C), 1/sqrt(var + eps) (C)); updates
// running_mean and running_var in place.
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor>
bn_relu_pool_forward(torch::Tensor x, torch::Tensor weight, torch::Tensor bias,
                     torch::Tensor running_mean, torch::Tensor running_var, double momentum,
                     double eps) {
  const Geometry g = check(x, weight);
  const float* X = x.data_ptr<float>();
  std::vector<double> means(g.N * g.C), m2s(g.N * g.C);
  at::parallel_for(0, g.N, 1, [&](int64_t a, int64_t b) {
    std::vector<float> row(g.C);
    for (int64_t n = a; n < b; n++)
      image_moments(X + n * g.image(), g, &means[n * g.C], &m2s[n * g.C], row.data());
  });
  const Normalisation nz = batch_normalisation(means, m2s, g, weight, bias, running_mean,
                                               running_var, momentum, eps);
  auto out = pooled_like(g, x.options());
  auto code = torch::empty_like(out, out.options().dtype(torch::kUInt8));
  auto xmax = torch::empty_like(out);
  float *O = out.data_ptr<float>(), *XM = xmax.data_ptr<float>();
  uint8_t* K = code.data_ptr<uint8_t>();
  at::parallel_for(0, g.N, 1, [&](int64_t a, int64_t b) {
    for (int64_t n = a; n < b; n++) {
      const int64_t q = n * g.pooled_image();
      normalize_relu_pool_image(X + n * g.image(), g, nz.scale.data(), nz.shift.data(), O + q,
                                K + q, XM + q);
    }
  });
  return {out, code, xmax, nz.mean, nz.invstd};
}

// Returns (dx channels-last, dweight, dbias) from the output's gradient and what the forward
// returned.
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> bn_relu_pool_backward(
    torch::Tensor dout, torch::Tensor x, torch::Tensor weight, torch::Tensor code,
    torch::Tensor xmax, torch::Tensor mean, torch::Tensor invstd) {
  const Geometry g = check(x, weight);
  dout = dout.contiguous(at::MemoryFormat::ChannelsLast);
  const float *X = x.data_ptr<float>(), *D = dout.data_ptr<float>(), *mu = mean.data_ptr<float>();
  const uint8_t* K = code.data_ptr<uint8_t>();
  const Backward f = block_backward_factors(D, K, xmax.data_ptr<float>(), g, weight, mu,
                                            invstd.data_ptr<float>());
  auto dx = torch::empty_like(x, at::MemoryFormat::ChannelsLast);
  float* DX = dx.data_ptr<float>();
  at::parallel_for(0, g.N, 1, [&](int64_t a, int64_t b) {
    for (int64_t n = a; n < b; n++) {
      const int64_t q = n * g.pooled_image();
      block_dx_image(X + n * g.image(), D + q, K + q, g, mu, f, DX + n * g.image());
    }
  });
  return {dx, f.dweight, f.dbias};
}

// The block in eval mode: normalised with the running statistics; (N, C, H/2, W/2)
// channels-last.
torch::Tensor bn_relu_pool_inference(torch::Tensor x, torch::Tensor weight, torch::Tensor bias,
                                     torch::Tensor running_mean, torch::Tensor running_var,
                                     double eps) {
  const Geometry g = check(x, weight);
  std::vector<float> scale(g.C), shift(g.C);
  const float *wt = weight.data_ptr<float>(), *bs = bias.data_ptr<float>(),
              *rm = running_mean.data_ptr<float>(), *rv = running_var.data_ptr<float>();
  for (int64_t c = 0; c < g.C; c++) {
    scale[c] = (float)(1.0 / std::sqrt((double)rv[c] + eps)) * wt[c];
    shift[c] = bs[c] - rm[c] * scale[c];
  }
  auto out = pooled_like(g, x.options());
  const float* X = x.data_ptr<float>();
  float* O = out.data_ptr<float>();
  at::parallel_for(0, g.N, 1, [&](int64_t a, int64_t b) {
    for (int64_t n = a; n < b; n++)
      normalize_relu_pool_image(X + n * g.image(), g, scale.data(), shift.data(),
                                O + n * g.pooled_image(), nullptr, nullptr);
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// The single-channel convolution

torch::Tensor conv1x_forward(torch::Tensor x, torch::Tensor weight, torch::Tensor bias,
                             int64_t pad) {
  const ConvGeometry g = conv_check(x, weight, pad);
  const std::vector<float> wt = taps_major(weight);
  const torch::Tensor b = bias.contiguous();
  auto out = torch::empty({g.N, g.C, g.Ho, g.Wo}, x.options(), at::MemoryFormat::ChannelsLast);
  const float* X = x.data_ptr<float>();
  float* O = out.data_ptr<float>();
  at::parallel_for(0, g.N, 1, [&](int64_t a, int64_t e) {
    std::vector<float> xp(g.Hp * g.Wp);
    for (int64_t n = a; n < e; n++) {
      pad_image(X, g, n, xp.data());
      conv1x_image(xp.data(), g, wt.data(), b.data_ptr<float>(), O + n * g.Ho * g.Wo * g.C);
    }
  });
  return out;
}

// (dweight (C, 1, K, K), dbias (C)) from the output's gradient; the input needs none.
std::tuple<torch::Tensor, torch::Tensor> conv1x_backward(torch::Tensor dout, torch::Tensor x,
                                                         torch::Tensor weight, int64_t pad) {
  const ConvGeometry g = conv_check(x, weight, pad);
  const int64_t per = (g.K * g.K + 1) * g.C;
  dout = dout.contiguous(at::MemoryFormat::ChannelsLast);
  const float *X = x.data_ptr<float>(), *D = dout.data_ptr<float>();
  std::vector<float> per_image(g.N * per);
  at::parallel_for(0, g.N, 1, [&](int64_t a, int64_t e) {
    std::vector<float> xp(g.Hp * g.Wp);
    for (int64_t n = a; n < e; n++) {
      pad_image(X, g, n, xp.data());
      conv1x_weight_grads(xp.data(), D + n * g.Ho * g.Wo * g.C, g, per_image.data() + n * per);
    }
  });
  return conv1x_gradients(per_image, g, x.options());
}
