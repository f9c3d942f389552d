/* The FMA rates of one core, which set the ceilings quoted in the README.
 *   gcc -O2 -mavx512f -mfma examples/fma_peak.c -o /tmp/fma_peak && /tmp/fma_peak
 * reg:       12 independent 512-bit FMA chains, operands in registers (the dense kernels' regime)
 * load/FMA:  every FMA loads its own 64-byte operand from L1 (pixcsr's regime)
 * load/2FMA: each loaded operand feeds two FMAs (halo's regime with 2 pixels)
 * GFLOP/s = G FMA-instructions/s x 32; times the number of cores for the whole CPU. */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
static float w[4096] __attribute__((aligned(64)));

int main(void) {
  for (int i = 0; i < 4096; i++) w[i] = 1e-6f * i;
  __m512 a[12];
  for (int k = 0; k < 12; k++) a[k] = _mm512_set1_ps((float)k);  /* distinct, so none is merged */
  __m512 b = _mm512_set1_ps(1.0001f), c = _mm512_set1_ps(0.5f);
  const long n = 200000000;
  /* time `body` (fmas FMAs) n times; the empty asm keeps b and c opaque, so nothing is hoisted */
#define TIMED(label, fmas, body)                                                     \
  do {                                                                               \
    double t = now();                                                                \
    for (long i = 0; i < n; i++) {                                                   \
      body;                                                                          \
      __asm__ volatile("" : "+v"(b), "+v"(c));                                       \
    }                                                                                \
    printf("%-10s %.2f G FMA/s per core\n", label, (double)(fmas) * n / (now() - t) / 1e9); \
  } while (0)

  TIMED("reg:", 12, {
    _Pragma("GCC unroll 12")
    for (int k = 0; k < 12; k++) a[k] = _mm512_fmadd_ps(b, c, a[k]);
  });
  TIMED("load/FMA:", 8, {
    const float *p = w + ((i * 128) & 4095);
    _Pragma("GCC unroll 8")
    for (int k = 0; k < 8; k++) a[k] = _mm512_fmadd_ps(b, _mm512_load_ps(p + 16 * k), a[k]);
  });
  TIMED("load/2FMA:", 8, {
    const float *p = w + ((i * 64) & 4095);
    _Pragma("GCC unroll 4")
    for (int k = 0; k < 4; k++) {
      __m512 x = _mm512_load_ps(p + 16 * k);
      a[k] = _mm512_fmadd_ps(b, x, a[k]);
      a[k + 4] = _mm512_fmadd_ps(c, x, a[k + 4]);
    }
  });
  __m512 s = a[0];
  for (int k = 1; k < 12; k++) s = _mm512_add_ps(s, a[k]);
  float out[16];
  _mm512_storeu_ps(out, s);
  printf("(checksum %g)\n", out[0]);
  return 0;
}
