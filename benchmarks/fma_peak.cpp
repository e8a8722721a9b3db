// One core's fp32 fused multiply-add peak at 256 and 512 bits: 12 independent chains per
// width (distinct starting values, so the compiler cannot fold them into one), in GFLOP/s.
// Says whether AVX-512 would raise the arithmetic rate over the fused kernel's AVX2; on the
// development machine it does not (117 GFLOP/s either way). Not part of the test suite.
//
//     g++ -O2 -mavx512f -mfma -o /tmp/fma_peak benchmarks/fma_peak.cpp && /tmp/fma_peak
#include <immintrin.h>

#include <chrono>
#include <cstdio>

template <class V> V splat(float x);
template <> __m256 splat(float x) { return _mm256_set1_ps(x); }
template <> __m512 splat(float x) { return _mm512_set1_ps(x); }
inline __m256 fma(__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); }
inline __m512 fma(__m512 a, __m512 b, __m512 c) { return _mm512_fmadd_ps(a, b, c); }

template <class V> double gflops(long iters, float seed) {
  V a[12];
  for (int i = 0; i < 12; i++) a[i] = splat<V>(seed + i * 0.001f);
  V b = splat<V>(0.9999f), c = splat<V>(seed * 1e-3f);
  const auto t = std::chrono::steady_clock::now();
  for (long i = 0; i < iters; i++) {
#pragma GCC unroll 12
    for (int k = 0; k < 12; k++) a[k] = fma(a[k], b, c);
    __asm__ volatile("" : "+x"(b));  // b is not a constant: the loop cannot be collapsed
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
  float sum = 0;
  for (int k = 0; k < 12; k++) sum += reinterpret_cast<float*>(&a[k])[0];
  if (sum == 12345.f) std::printf(" ");  // keeps the results alive
  return 12.0 * iters * (sizeof(V) / 4) * 2 / s / 1e9;
}

int main(int argc, char**) {
  for (int r = 0; r < 3; r++)
    std::printf("one core: 256-bit %.1f GFLOP/s, 512-bit %.1f GFLOP/s\n",
                gflops<__m256>(100000000, argc), gflops<__m512>(50000000, argc));
}
