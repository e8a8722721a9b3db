// BatchNorm (batch statistics) -> ReLU -> 2x2 stride-2 max-pool, forward and backward, on a
// channels-last fp32 tensor: the block that BatchNorm networks (the `best` preset) repeat
// after every convolution. Built into the same extension as fused_lenet.cpp and used by
// lenet/blocks.py as one autograd op, with the convolutions left to PyTorch (oneDNN).
//
// Why: autograd runs this block as seven full passes over the conv output forward and
// backward (batch_norm, relu, max_pool, their three backwards and a zero fill), about 40% of
// a `best` step on 2 cores; here it is three passes forward and two backward, each over
// channel vectors of one pixel (channels-last keeps them contiguous).
//
// The arithmetic is torch's: biased variance for the normalisation, unbiased for running_var,
// y = x * (w / sqrt(var + eps)) + (b - mean * w / sqrt(var + eps)), a window's maximum and its
// gradient at the first maximum in scan order (a NaN wins, as torch's `val > max || isnan`),
// ReLU's gradient only where its output is > 0, and BatchNorm's backward as
// dx = (dy - (x - mean) * dot / (M var') - sum / M) * w / sqrt(var + eps) with
// sum = sum(dy), dot = sum(dy (x - mean)), var' = var + eps, M = N H W.
// Sums over the batch are taken per image in float (a row at a time, then in double) and
// the images' sums added in order, so the result does not depend on the thread count.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <tuple>
#include <vector>

namespace {

struct Geometry {
  int64_t N, C, H, W, Hp, Wp;
  int64_t pixel(int64_t n, int64_t h, int64_t w) const { return ((n * H + h) * W + w) * C; }
  int64_t pooled(int64_t n, int64_t h, int64_t w) const { return ((n * Hp + h) * Wp + w) * C; }
};

Geometry check(const torch::Tensor& x, const torch::Tensor& weight) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == torch::kFloat && x.device().is_cpu(),
              "bn_relu_pool: expected a float32 (N, C, H, W) tensor on the CPU");
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "bn_relu_pool: expected a channels-last tensor");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(N >= 1 && H >= 2 && W >= 2, "bn_relu_pool: expected N >= 1 and H, W >= 2");
  TORCH_CHECK(C % 8 == 0, "bn_relu_pool: expected a multiple of 8 channels");
  TORCH_CHECK(weight.numel() == C, "bn_relu_pool: expected one weight per channel");
  return {N, C, H, W, H / 2, W / 2};
}

// Per channel, the sum over the batch of f(x[n, c, h, w]) for every pixel.
template <typename F>
std::vector<double> channel_sums(const float* x, const Geometry& g, F f) {
  const int64_t C = g.C;
  std::vector<double> per_image(g.N * C, 0.0);
  at::parallel_for(0, g.N, 1, [&](int64_t a, int64_t b) {
    std::vector<float> row(C);
    for (int64_t n = a; n < b; n++) {
      double* acc = per_image.data() + n * C;
      for (int64_t h = 0; h < g.H; h++) {
        std::fill(row.begin(), row.end(), 0.f);
        for (int64_t w = 0; w < g.W; w++) {
          const float* p = x + g.pixel(n, h, w);
          for (int64_t c = 0; c < C; c++) row[c] += f(p[c], c);
        }
        for (int64_t c = 0; c < C; c++) acc[c] += row[c];
      }
    }
  });
  std::vector<double> total(C, 0.0);
  for (int64_t n = 0; n < g.N; n++)
    for (int64_t c = 0; c < C; c++) total[c] += per_image[n * C + c];
  return total;
}

// max(0, y) with y second: a NaN passes, as through torch.relu.
inline __m256 relu8(__m256 y) { return _mm256_max_ps(_mm256_setzero_ps(), y); }

// The four pixels of pooling window (ph, pw), in torch's scan order.
struct Window {
  const float* p[4];
};
inline Window window(const float* x, const Geometry& g, int64_t n, int64_t ph, int64_t pw) {
  const float* p0 = x + g.pixel(n, 2 * ph, 2 * pw);
  return {{p0, p0 + g.C, p0 + g.W * g.C, p0 + g.W * g.C + g.C}};
}

// 8 int32 lanes of 0..255 <-> 8 bytes
inline void store_bytes(uint8_t* p, __m256i v) {
  const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packus_epi16(w, w));
}
inline __m256i load_bytes(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

// out = maxpool(relu(x * scale + shift)); unless null, for the backward: in `code` each
// output's window position 0..3, plus 4 where the output is > 0 (ReLU passes a gradient), and
// in `xmax` the input at that position (so the backward's sums need not read x again).
void normalize_relu_pool(const float* X, const Geometry& g, const float* sc, const float* sh,
                         float* O, uint8_t* code, float* xmax) {
  at::parallel_for(0, g.N, 1, [&](int64_t a, int64_t b) {
    for (int64_t n = a; n < b; n++)
      for (int64_t ph = 0; ph < g.Hp; ph++)
        for (int64_t pw = 0; pw < g.Wp; pw++) {
          const Window x4 = window(X, g, n, ph, pw);
          const int64_t q = g.pooled(n, ph, pw);
          for (int64_t c = 0; c < g.C; c += 8) {
            const __m256 s = _mm256_loadu_ps(sc + c), t = _mm256_loadu_ps(sh + c);
            __m256 xm = _mm256_loadu_ps(x4.p[0] + c);
            __m256 m = relu8(_mm256_fmadd_ps(xm, s, t));
            __m256 at = _mm256_setzero_ps();
            for (int j = 1; j < 4; j++) {
              const __m256 xj = _mm256_loadu_ps(x4.p[j] + c);
              const __m256 v = relu8(_mm256_fmadd_ps(xj, s, t));
              const __m256 take = _mm256_or_ps(_mm256_cmp_ps(v, m, _CMP_GT_OQ),
                                               _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
              m = _mm256_blendv_ps(m, v, take);
              xm = _mm256_blendv_ps(xm, xj, take);
              at = _mm256_blendv_ps(at, _mm256_set1_ps((float)j), take);
            }
            _mm256_storeu_ps(O + q + c, m);
            if (code) {
              const __m256 passes = _mm256_and_ps(
                  _mm256_cmp_ps(m, _mm256_setzero_ps(), _CMP_GT_OQ), _mm256_set1_ps(4.f));
              store_bytes(code + q + c, _mm256_cvttps_epi32(_mm256_add_ps(at, passes)));
              _mm256_storeu_ps(xmax + q + c, xm);
            }
          }
        }
  });
}

}  // namespace

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
  auto out = torch::empty({g.N, g.C, g.Hp, g.Wp}, x.options(), at::MemoryFormat::ChannelsLast);
  normalize_relu_pool(x.data_ptr<float>(), g, scale.data(), shift.data(),
                      out.data_ptr<float>(), nullptr, nullptr);
  return out;
}

// Returns (out (N, C, H/2, W/2) channels-last, and for the backward: code (uint8) and xmax
// as normalize_relu_pool writes them, mean (C), 1/sqrt(var + eps) (C)); updates running_mean
// and running_var in place.
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor>
bn_relu_pool_forward(
    torch::Tensor x, torch::Tensor weight, torch::Tensor bias, torch::Tensor running_mean,
    torch::Tensor running_var, double momentum, double eps) {
  const Geometry g = check(x, weight);
  const int64_t C = g.C, M = g.N * g.H * g.W;
  const float* X = x.data_ptr<float>();

  const std::vector<double> sum = channel_sums(X, g, [](float v, int64_t) { return v; });
  std::vector<float> mean(C);
  for (int64_t c = 0; c < C; c++) mean[c] = (float)(sum[c] / M);
  const float* mu = mean.data();
  const std::vector<double> sq = channel_sums(X, g, [mu](float v, int64_t c) {
    const float d = v - mu[c];
    return d * d;
  });

  auto mean_t = torch::empty({C}, x.options()), invstd_t = torch::empty({C}, x.options());
  std::vector<float> scale(C), shift(C);
  {
    auto rm = running_mean.accessor<float, 1>(), rv = running_var.accessor<float, 1>();
    const float *wt = weight.data_ptr<float>(), *bs = bias.data_ptr<float>();
    for (int64_t c = 0; c < C; c++) {
      const double var = sq[c] / M;
      const float invstd = (float)(1.0 / std::sqrt(var + eps));
      mean_t.data_ptr<float>()[c] = mean[c];
      invstd_t.data_ptr<float>()[c] = invstd;
      scale[c] = invstd * wt[c];
      shift[c] = bs[c] - mean[c] * scale[c];
      rm[c] = (float)((1 - momentum) * rm[c] + momentum * mean[c]);
      rv[c] = (float)((1 - momentum) * rv[c] + momentum * var * M / std::max<int64_t>(M - 1, 1));
    }
  }

  auto out = torch::empty({g.N, C, g.Hp, g.Wp}, x.options(), at::MemoryFormat::ChannelsLast);
  auto code = torch::empty_like(out, out.options().dtype(torch::kUInt8));
  auto xmax = torch::empty_like(out);
  normalize_relu_pool(X, g, scale.data(), shift.data(), out.data_ptr<float>(),
                      code.data_ptr<uint8_t>(), xmax.data_ptr<float>());
  return {out, code, xmax, mean_t, invstd_t};
}

// Returns (dx channels-last, dweight, dbias) from the output's gradient and what the forward
// returned.
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> bn_relu_pool_backward(
    torch::Tensor dout, torch::Tensor x, torch::Tensor weight, torch::Tensor code_t,
    torch::Tensor xmax_t, torch::Tensor mean_t, torch::Tensor invstd_t) {
  const Geometry g = check(x, weight);
  const int64_t C = g.C, M = g.N * g.H * g.W;
  dout = dout.contiguous(at::MemoryFormat::ChannelsLast);
  const float *X = x.data_ptr<float>(), *XM = xmax_t.data_ptr<float>(),
              *D = dout.data_ptr<float>();
  const uint8_t* K = code_t.data_ptr<uint8_t>();
  const float *mean = mean_t.data_ptr<float>(), *invstd = invstd_t.data_ptr<float>();
  const __m256i three = _mm256_set1_epi32(3);

  // Sums per channel of the gradient reaching each window's maximum through ReLU (dy), and
  // of dy (x - mean).
  std::vector<double> per_image(g.N * C * 2, 0.0);
  at::parallel_for(0, g.N, 1, [&](int64_t a, int64_t b) {
    std::vector<float> s(C), dot(C);
    for (int64_t n = a; n < b; n++) {
      for (int64_t ph = 0; ph < g.Hp; ph++) {
        std::fill(s.begin(), s.end(), 0.f);
        std::fill(dot.begin(), dot.end(), 0.f);
        for (int64_t pw = 0; pw < g.Wp; pw++) {
          const int64_t q = g.pooled(n, ph, pw);
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
        double* acc = per_image.data() + n * C * 2;
        for (int64_t c = 0; c < C; c++) acc[c] += s[c], acc[C + c] += dot[c];
      }
    }
  });
  std::vector<double> sum(C, 0.0), dot(C, 0.0);
  for (int64_t n = 0; n < g.N; n++)
    for (int64_t c = 0; c < C; c++)
      sum[c] += per_image[n * C * 2 + c], dot[c] += per_image[n * C * 2 + C + c];

  auto dweight = torch::empty({C}, x.options()), dbias = torch::empty({C}, x.options());
  std::vector<float> proj(C), gmean(C), k(C);
  const float* wt = weight.data_ptr<float>();
  for (int64_t c = 0; c < C; c++) {
    dweight.data_ptr<float>()[c] = (float)(dot[c] * invstd[c]);
    dbias.data_ptr<float>()[c] = (float)sum[c];
    proj[c] = (float)(dot[c] / M) * invstd[c] * invstd[c];
    gmean[c] = (float)(sum[c] / M);
    k[c] = invstd[c] * wt[c];
  }

  auto dx = torch::empty_like(x, at::MemoryFormat::ChannelsLast);
  float* DX = dx.data_ptr<float>();
  const float *pj = proj.data(), *gm = gmean.data(), *kk = k.data();
  // dx = (dy - (x - mean) proj - gmean) k; dy is dout at a window's maximum where ReLU
  // passed it (code 4 + position), else 0.
  auto dx_at = [&](const float* xv, float* d, int64_t q, int position) {
    for (int64_t c = 0; c < C; c += 8) {
      __m256 dy = _mm256_setzero_ps();
      if (q >= 0)
        dy = _mm256_and_ps(_mm256_loadu_ps(D + q + c),
                           _mm256_castsi256_ps(_mm256_cmpeq_epi32(
                               load_bytes(K + q + c), _mm256_set1_epi32(4 + position))));
      const __m256 centred = _mm256_sub_ps(_mm256_loadu_ps(xv + c), _mm256_loadu_ps(mean + c));
      const __m256 v = _mm256_sub_ps(
          _mm256_fnmadd_ps(centred, _mm256_loadu_ps(pj + c), dy), _mm256_loadu_ps(gm + c));
      _mm256_storeu_ps(d + c, _mm256_mul_ps(v, _mm256_loadu_ps(kk + c)));
    }
  };
  at::parallel_for(0, g.N, 1, [&](int64_t a, int64_t b) {
    for (int64_t n = a; n < b; n++)
      for (int64_t h = 0; h < g.H; h++)
        for (int64_t w = 0; w < g.W; w++) {
          const int64_t at_ = g.pixel(n, h, w);
          const bool windowed = h < 2 * g.Hp && w < 2 * g.Wp;  // else a last odd row/column
          dx_at(X + at_, DX + at_, windowed ? g.pooled(n, h / 2, w / 2) : -1,
                (int)((h & 1) * 2 + (w & 1)));
        }
  });
  return {dx, dweight, dbias};
}

// A first convolution: one input channel -> C output channels (a multiple of 8), K x K,
// zero padding P, stride 1, with bias; output channels-last. oneDNN runs this shape at
// ~8 GFLOP/s here (nothing to vectorise over in a single input channel); a pixel's C outputs
// as channel vectors, each tap one broadcast and C/8 FMAs, run near the FMA rate.
namespace {

struct ConvGeometry {
  int64_t N, H, W, C, K, P, Hp, Wp, Ho, Wo;  // Hp, Wp: padded input; Ho, Wo: output
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
  TORCH_CHECK(pad >= 0 && H + 2 * pad >= K && W + 2 * pad >= K, "conv1x: kernel larger than input");
  return {N, H, W, C, K, pad, H + 2 * pad, W + 2 * pad, H + 2 * pad - K + 1, W + 2 * pad - K + 1};
}

// Image n, zero-padded, into `to` (Hp x Wp).
void pad_image(const float* x, const ConvGeometry& g, int64_t n, float* to) {
  std::fill(to, to + g.Hp * g.Wp, 0.f);
  for (int64_t i = 0; i < g.H; i++)
    std::copy(x + (n * g.H + i) * g.W, x + (n * g.H + i + 1) * g.W, to + (i + g.P) * g.Wp + g.P);
}

}  // namespace

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

template <int K>
void conv1x_forward_impl(const float* X, const ConvGeometry& g, const float* wt, const float* b,
                         float* O) {
  at::parallel_for(0, g.N, 1, [&](int64_t a, int64_t e) {
    std::vector<float> xp(g.Hp * g.Wp);
    for (int64_t n = a; n < e; n++) {
      pad_image(X, g, n, xp.data());
      for (int64_t i = 0; i < g.Ho; i++) {
        float* o = O + (n * g.Ho + i) * g.Wo * g.C;
        int64_t j = 0;
        for (; j + 8 <= g.Wo; j += 8) conv1x_pixels<K, 8>(xp.data(), g, wt, b, i, j, o + j * g.C);
        for (; j < g.Wo; j++) conv1x_pixels<K, 1>(xp.data(), g, wt, b, i, j, o + j * g.C);
      }
    }
  });
}

// Per image: the K x K taps' gradient sums, then the bias', for the channel vector at c:
// one accumulator per tap, so the taps' chains run side by side.
template <int K>
void conv1x_weight_grads(const float* xp, const float* d, const ConvGeometry& g, int64_t c,
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

torch::Tensor conv1x_forward(torch::Tensor x, torch::Tensor weight, torch::Tensor bias,
                             int64_t pad) {
  const ConvGeometry g = conv_check(x, weight, pad);
  const int64_t C = g.C, KK = g.K * g.K;
  // Taps-major weights: wt[t * C + c]
  std::vector<float> wt(KK * C);
  const float* w = weight.contiguous().data_ptr<float>();
  for (int64_t c = 0; c < C; c++)
    for (int64_t t = 0; t < KK; t++) wt[t * C + c] = w[c * KK + t];
  const float* b = bias.contiguous().data_ptr<float>();
  auto out = torch::empty({g.N, C, g.Ho, g.Wo}, x.options(), at::MemoryFormat::ChannelsLast);
  const float* X = x.data_ptr<float>();
  float* O = out.data_ptr<float>();
  (g.K == 3 ? conv1x_forward_impl<3> : conv1x_forward_impl<5>)(X, g, wt.data(), b, O);
  return out;
}

// (dweight (C, 1, K, K), dbias (C)) from the output's gradient; the input needs none.
std::tuple<torch::Tensor, torch::Tensor> conv1x_backward(torch::Tensor dout, torch::Tensor x,
                                                         torch::Tensor weight, int64_t pad) {
  const ConvGeometry g = conv_check(x, weight, pad);
  const int64_t C = g.C, KK = g.K * g.K, per = (KK + 1) * C;  // taps' sums, then the bias'
  dout = dout.contiguous(at::MemoryFormat::ChannelsLast);
  const float *X = x.data_ptr<float>(), *D = dout.data_ptr<float>();
  std::vector<float> per_image(g.N * per);
  at::parallel_for(0, g.N, 1, [&](int64_t a, int64_t e) {
    std::vector<float> xp(g.Hp * g.Wp);
    for (int64_t n = a; n < e; n++) {
      pad_image(X, g, n, xp.data());
      const float* d = D + n * g.Ho * g.Wo * C;
      for (int64_t c = 0; c < C; c += 8)
        (g.K == 3 ? conv1x_weight_grads<3> : conv1x_weight_grads<5>)(
            xp.data(), d, g, c, per_image.data() + n * per);
    }
  });
  std::vector<double> total(per, 0.0);
  for (int64_t n = 0; n < g.N; n++)
    for (int64_t k = 0; k < per; k++) total[k] += per_image[n * per + k];
  auto dweight = torch::empty({C, 1, g.K, g.K}, x.options());
  auto dbias = torch::empty({C}, x.options());
  float *dw = dweight.data_ptr<float>(), *db = dbias.data_ptr<float>();
  for (int64_t c = 0; c < C; c++) {
    for (int64_t t = 0; t < KK; t++) dw[c * KK + t] = (float)total[t * C + c];
    db[c] = (float)total[KK * C + c];
  }
  return {dweight, dbias};
}
