#define _GNU_SOURCE
/* A small persistent thread pool for the kernels: the caller works too, workers spin briefly between
 * products (a decode step runs hundreds back to back) and then sleep, so an idle process costs no CPU.
 * No OpenMP: its spinning threads fight OpenBLAS's and MLX's for the same cores.
 *
 * Tasks are claimed one at a time from a counter tagged with the job's number, and the caller waits only
 * for tasks claimed by others. A worker that wakes late (its core busy with MLX's threads, say) finds
 * nothing left and costs the job nothing, instead of the caller waiting for it. */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include "kernels.h"

#define MAX_THREADS 64
#define SPIN_NS 2000000L /* a worker polls this long after its last job before it sleeps: a decode step's
                           * products come tens of microseconds apart, and a wake-up costs about as much as
                           * a small product (576 x 576 at 4 bits: 20 us with a polling worker, 47 with a sleeping one) */
#define TAG(job, task) (((uint64_t)(job) << 32) | (uint64_t)(task))

static struct {
  pthread_mutex_t lock;
  pthread_cond_t wake;
  int workers; /* started */
  int wanted;  /* threads in total, caller included */
  atomic_uint_fast64_t claim; /* job number << 32 | next task */
  atomic_uint_fast64_t limit; /* job number << 32 | its task count: published with the job, read with it */
  atomic_int sleepers;
  atomic_long done; /* tasks finished in the current job */
  el_task_fn fn;
  void* arg;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};

static pthread_mutex_t run_lock = PTHREAD_MUTEX_INITIALIZER; /* one parallel_for at a time */
static uint32_t job_number;

static inline void cpu_relax(void) {
#if defined(__x86_64__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

/* Runs tasks of job ``job`` until none is left; returns how many this thread ran.
 *
 * The task count is read with its job's number (``limit``): a worker that read ``claim`` late in job J, after its
 * last task was taken, must not compare against the next job's count, which the caller stores before it publishes
 * that job's ``claim``. Comparing against a plain count let such a worker claim "task" tasks_J of job J (the CAS
 * still succeeding) and run it as the next job's task with its function, or bump its done count: the caller then
 * read results before they were written (zero logits, seen now and then with two workers). */
static int64_t run_tasks(uint32_t job) {
  int64_t ran = 0;
  for (;;) {
    uint64_t c = atomic_load(&pool.claim);
    if ((uint32_t)(c >> 32) != job) return ran;
    const uint64_t limit = atomic_load(&pool.limit);
    int64_t task = (int64_t)(uint32_t)c;
    if ((uint32_t)(limit >> 32) != job || task >= (int64_t)(uint32_t)limit) return ran;
    if (!atomic_compare_exchange_weak(&pool.claim, &c, c + 1)) continue;
    pool.fn(pool.arg, task);
    atomic_fetch_add(&pool.done, 1);
    ran++;
  }
}

static long now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1000000000L + t.tv_nsec;
}

/* The next job's number, polling until SPIN_NS have passed; ``seen`` when none came. */
static uint32_t poll_for_job(uint32_t seen) {
  const long until = now_ns() + SPIN_NS;
  for (unsigned i = 1;; i++) {
    uint32_t job = (uint32_t)(atomic_load(&pool.claim) >> 32);
    if (job != seen) return job;
    if ((i & 63) == 0) {
      if (now_ns() > until) return job;
      sched_yield(); /* a runnable thread (the one building the next step's graph) gets this core first */
    }
    cpu_relax();
  }
}

static void* worker(void* start) {
  uint32_t seen = (uint32_t)(uintptr_t)start; /* the job before this worker's first */
  for (;;) {
    uint32_t job = poll_for_job(seen);
    if (job == seen) {
      pthread_mutex_lock(&pool.lock);
      atomic_fetch_add(&pool.sleepers, 1);
      while ((job = (uint32_t)(atomic_load(&pool.claim) >> 32)) == seen) pthread_cond_wait(&pool.wake, &pool.lock);
      atomic_fetch_sub(&pool.sleepers, 1);
      pthread_mutex_unlock(&pool.lock);
    }
    seen = job;
    run_tasks(job);
  }
  return NULL;
}

static int default_threads(void) {
  const char* env = getenv("EDGE_LLM_CPU_THREADS");
  if (env && atoi(env) > 0) return atoi(env);
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) return CPU_COUNT(&set);
#endif
  long n = sysconf(_SC_NPROCESSORS_ONLN);
  return n > 0 ? (int)n : 1;
}

void el_set_threads(int n) {
  pthread_mutex_lock(&run_lock);
  pool.wanted = n < 1 ? 1 : n > MAX_THREADS ? MAX_THREADS : n;
  pthread_mutex_unlock(&run_lock);
}

int el_threads(void) {
  if (pool.wanted == 0) el_set_threads(default_threads());
  return pool.wanted;
}

void el_parallel_for(el_task_fn fn, void* arg, int64_t tasks) {
  int threads = el_threads();
  if (tasks <= 1 || threads <= 1) {
    for (int64_t t = 0; t < tasks; t++) fn(arg, t);
    return;
  }
  pthread_mutex_lock(&run_lock);
  while (pool.workers < threads - 1) {
    pthread_t thread;
    if (pthread_create(&thread, NULL, worker, (void*)(uintptr_t)job_number) != 0) break;
    pthread_detach(thread);
    pool.workers++;
  }
  uint32_t job = ++job_number;
  pool.fn = fn;
  pool.arg = arg;
  atomic_store(&pool.done, 0);
  atomic_store(&pool.limit, TAG(job, tasks));
  atomic_store(&pool.claim, TAG(job, 0)); /* publishes the job: workers read fn/arg after claiming one of its tasks */
  if (atomic_load(&pool.sleepers) > 0) {
    pthread_mutex_lock(&pool.lock);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);
  }
  run_tasks(job);
  /* only tasks others claimed and are running; yielding now and then lets a worker that lost its core finish */
  for (unsigned i = 1; atomic_load(&pool.done) < tasks; i++) {
    if ((i & 255) == 0) sched_yield();
    cpu_relax();
  }
  pthread_mutex_unlock(&run_lock);
}
