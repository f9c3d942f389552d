/* The FMA rates of one core, which set the ceilings quoted in the README.
 *   gcc -O2 -mavx512f -mfma examples/fma_peak.c -o /tmp/fma_peak && /tmp/fma_peak
 * reg:       12 independent 512-bit FMA chains, operands in registers (the dense kernels' regime)
 * load/FMA:  every FMA loads its own 64-byte operand from L1 (pixcsr's regime)
 * load/2FMA: each loaded operand feeds two FMAs (halo's regime with 2 pixels)
 * load/4FMA: each loaded operand feeds four FMAs
 * loads:     the 64-byte loads alone, no FMA (the load ports are not what caps load/FMA)
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
  /* each loaded operand feeds R FMAs: 12 / R loads and 12 FMA chains per iteration */
#define LOAD_REUSE(label, R)                                                         \
  TIMED(label, 12, {                                                                 \
    const float *p = w + ((i * 192 / (R)) & 4095);                                   \
    _Pragma("GCC unroll 12")                                                         \
    for (int k = 0; k < 12 / (R); k++) {                                             \
      __m512 x = _mm512_load_ps(p + 16 * k);                                         \
      _Pragma("GCC unroll 4")                                                        \
      for (int r = 0; r < (R); r++)                                                  \
        a[k + r * (12 / (R))] = _mm512_fmadd_ps(r & 1 ? c : b, x, a[k + r * (12 / (R))]); \
    }                                                                                \
  })
  LOAD_REUSE("load/FMA:", 1);
  LOAD_REUSE("load/2FMA:", 2);
  LOAD_REUSE("load/4FMA:", 4);
  TIMED("loads:", 12, {  /* counts loads, not FMAs */
    const float *p = w + ((i * 192) & 4095);
    _Pragma("GCC unroll 12")
    for (int k = 0; k < 12; k++) {
      __m512 x = _mm512_load_ps(p + 16 * k);
      __asm__ volatile("" : : "v"(x));
    }
  });
  __m512 s = a[0];
  for (int k = 1; k < 12; k++) s = _mm512_add_ps(s, a[k]);
  float out[16];
  _mm512_storeu_ps(out, s);
  printf("(checksum %g)\n", out[0]);
  return 0;
}
