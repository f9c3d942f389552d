/* How far apart two cores are: two threads pinned to CPUs 0 and 1 pass a cache line back and
 * forth, and the mean round trip is printed. On cores that share an L3 it is tens of ns; when
 * the line has to leave the L3 (another core complex or socket) it is several times that, and
 * a layer that reads what the other core wrote in the layer before pays the same way.
 *   gcc -O2 -pthread examples/core_roundtrip.c -o /tmp/core_roundtrip && /tmp/core_roundtrip */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <time.h>

enum { TRIPS = 200000 };
static _Alignas(64) atomic_int turn;  /* odd: CPU 1's move, even: CPU 0's */

static void pin(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  if (pthread_setaffinity_np(pthread_self(), sizeof set, &set) != 0)  /* e.g. a 1-CPU machine */
    fprintf(stderr, "cannot pin a thread to CPU %d: the round trip is not between two cores\n", cpu);
}

static void *answer(void *unused) {
  (void)unused;
  pin(1);
  for (int i = 0; i < TRIPS; i++) {
    while (atomic_load_explicit(&turn, memory_order_acquire) != 2 * i + 1) {}
    atomic_store_explicit(&turn, 2 * i + 2, memory_order_release);
  }
  return NULL;
}

int main(void) {
  pthread_t other;
  struct timespec t0, t1;
  pin(0);
  pthread_create(&other, NULL, answer, NULL);
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (int i = 0; i < TRIPS; i++) {
    atomic_store_explicit(&turn, 2 * i + 1, memory_order_release);
    while (atomic_load_explicit(&turn, memory_order_acquire) != 2 * i + 2) {}
  }
  clock_gettime(CLOCK_MONOTONIC, &t1);
  pthread_join(other, NULL);
  double ns = ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / TRIPS;
  printf("CPU 0 <-> CPU 1 round trip: %.0f ns\n", ns);
  return 0;
}
