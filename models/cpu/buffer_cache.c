// Keeps large heap buffers mapped between uses, loaded ahead of the C library (LD_PRELOAD).
//
// glibc's malloc maps every buffer above 32 MiB afresh and unmaps it when it is freed. XLA:CPU
// allocates one buffer for all the temporaries of a compiled call (a GiB for a train step),
// so every step faults that memory in again and the kernel zeroes it; on a virtual machine
// that reports free pages to its host, pages freed a few seconds earlier come back slower
// still (docs/performance.md). models/cpu/process.py preloads it where the user opts in.
//
// Here a freed buffer of at least MIN_SIZE stays mapped and serves the next request of its
// size (up to twice the request); a request that another thread's buffer would fit waits up
// to RELEASE_WAIT_MS for one to be freed. At most MAX_IDLE wait unused, the longest idle
// unmapped first, and none smaller than a request that needs a new buffer. Smaller requests,
// and every pointer this file did not hand out, go to glibc.

#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

extern void *__libc_malloc(size_t size);
extern void __libc_free(void *pointer);
extern void *__libc_realloc(void *pointer, size_t size);
extern void *__libc_memalign(size_t alignment, size_t size);

enum { SLOTS = 64, MAX_IDLE = 4, RELEASE_WAIT_MS = 20 };
static const size_t MIN_SIZE = (size_t)64 << 20;
static const size_t HUGE_PAGE = (size_t)2 << 20;  // every buffer here starts on one

typedef struct {
  char *base;
  size_t size;
  int in_use;
  pthread_t user;
  unsigned long freed_at;
} Buffer;

static Buffer buffers[SLOTS];
static int n_buffers;
static unsigned long frees;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t released = PTHREAD_COND_INITIALIZER;

static void lock_buffers(void) { pthread_mutex_lock(&lock); }
static void unlock_buffers(void) { pthread_mutex_unlock(&lock); }

__attribute__((constructor)) static void unlock_in_forked_children(void) {
  pthread_atfork(lock_buffers, unlock_buffers, unlock_buffers);
}

static size_t round_to_huge_pages(size_t size) {
  return (size + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1);
}

static char *map_aligned(size_t size) {
  char *mapped = mmap(NULL, size + HUGE_PAGE, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mapped == MAP_FAILED) return NULL;
  char *base = (char *)round_to_huge_pages((uintptr_t)mapped);
  if (base > mapped) munmap(mapped, base - mapped);
  size_t tail = mapped + size + HUGE_PAGE - (base + size);
  if (tail) munmap(base + size, tail);
  madvise(base, size, MADV_HUGEPAGE);
  return base;
}

static void unmap(int i) {
  munmap(buffers[i].base, buffers[i].size);
  buffers[i] = buffers[--n_buffers];
}

// Idle buffers smaller than a request can never serve it: a program whose buffers grow (from
// its initialisation's to its train step's) keeps no more mapped than with glibc alone.
static void unmap_idle_smaller_than(size_t size) {
  for (int i = n_buffers - 1; i >= 0; i--)
    if (!buffers[i].in_use && buffers[i].size < size) unmap(i);
}

static int fits(const Buffer *b, size_t size) { return b->size >= size && b->size / 2 <= size; }

// The smallest idle buffer that fits ``size``, or -1.
static int best_idle(size_t size) {
  int best = -1;
  for (int i = 0; i < n_buffers; i++)
    if (!buffers[i].in_use && fits(&buffers[i], size) &&
        (best < 0 || buffers[i].size < buffers[best].size))
      best = i;
  return best;
}

// Whether another thread holds a buffer that would fit ``size``. XLA frees a call's
// temporaries a few milliseconds after its outputs are ready, and by then the next call (on
// another thread) has asked for its own: without waiting for that release, two buffers would
// take turns, both kept, twice the memory.
static int other_thread_holds_a_fit(size_t size) {
  for (int i = 0; i < n_buffers; i++)
    if (buffers[i].in_use && fits(&buffers[i], size) &&
        !pthread_equal(buffers[i].user, pthread_self()))
      return 1;
  return 0;
}

static void wait_for_a_release(void) {
  struct timespec until;
  clock_gettime(CLOCK_MONOTONIC, &until);
  until.tv_nsec += RELEASE_WAIT_MS * 1000000L;
  until.tv_sec += until.tv_nsec / 1000000000L;
  until.tv_nsec %= 1000000000L;
  pthread_cond_clockwait(&released, &lock, CLOCK_MONOTONIC, &until);
}

static void *take(size_t request) {
  if (request < MIN_SIZE || request > SIZE_MAX - 2 * HUGE_PAGE) return NULL;
  size_t size = round_to_huge_pages(request);
  lock_buffers();
  int best = best_idle(size);
  if (best < 0 && other_thread_holds_a_fit(size)) {
    wait_for_a_release();
    best = best_idle(size);
  }
  char *base = NULL;
  if (best >= 0) {
    buffers[best].in_use = 1;
    buffers[best].user = pthread_self();
    base = buffers[best].base;
  } else {
    unmap_idle_smaller_than(size);
    if (n_buffers < SLOTS && (base = map_aligned(size)))
      buffers[n_buffers++] = (Buffer){base, size, 1, pthread_self(), 0};
  }
  unlock_buffers();
  return base;
}

static int find(const void *pointer) {
  for (int i = 0; i < n_buffers; i++)
    if (buffers[i].base == pointer) return i;
  return -1;
}

static int is_candidate(const void *pointer) {
  return pointer && ((uintptr_t)pointer & (HUGE_PAGE - 1)) == 0;
}

static void unmap_longest_idle_beyond_max(void) {
  int idle = 0, oldest = -1;
  for (int i = 0; i < n_buffers; i++) {
    if (buffers[i].in_use) continue;
    idle++;
    if (oldest < 0 || buffers[i].freed_at < buffers[oldest].freed_at) oldest = i;
  }
  if (idle > MAX_IDLE) unmap(oldest);
}

// Whether ``pointer`` was one of ours (now kept for reuse).
static int give_back(void *pointer) {
  if (!is_candidate(pointer)) return 0;
  lock_buffers();
  int i = find(pointer);
  if (i >= 0) {
    buffers[i].in_use = 0;
    buffers[i].freed_at = ++frees;
    unmap_longest_idle_beyond_max();
    pthread_cond_broadcast(&released);
  }
  unlock_buffers();
  return i >= 0;
}

// The size of the buffer at ``pointer`` if it is ours, else 0.
static size_t our_size(const void *pointer) {
  if (!is_candidate(pointer)) return 0;
  lock_buffers();
  int i = find(pointer);
  size_t size = i >= 0 ? buffers[i].size : 0;
  unlock_buffers();
  return size;
}

static size_t glibc_usable_size(void *pointer) {
  static size_t (*usable_size)(void *);
  if (!usable_size) usable_size = (size_t (*)(void *))dlsym(RTLD_NEXT, "malloc_usable_size");
  return usable_size(pointer);
}

void *malloc(size_t size) {
  void *pointer = take(size);
  return pointer ? pointer : __libc_malloc(size);
}

void free(void *pointer) {
  if (!give_back(pointer)) __libc_free(pointer);
}

void free_sized(void *pointer, size_t size) { (void)size; free(pointer); }

void free_aligned_sized(void *pointer, size_t alignment, size_t size) {
  (void)alignment, (void)size;
  free(pointer);
}

void *memalign(size_t alignment, size_t size) {
  void *pointer = alignment <= HUGE_PAGE ? take(size) : NULL;
  return pointer ? pointer : __libc_memalign(alignment, size);
}

void *aligned_alloc(size_t alignment, size_t size) { return memalign(alignment, size); }

int posix_memalign(void **out, size_t alignment, size_t size) {
  if (alignment % sizeof(void *) || (alignment & (alignment - 1))) return EINVAL;
  void *pointer = memalign(alignment, size);
  if (!pointer && size) return ENOMEM;
  *out = pointer;
  return 0;
}

void *realloc(void *pointer, size_t size) {
  size_t ours = our_size(pointer);
  if (!ours && size < MIN_SIZE) return __libc_realloc(pointer, size);
  if (ours && size == 0) {
    free(pointer);
    return NULL;
  }
  if (ours && size <= ours && size >= ours / 2) return pointer;
  void *moved = malloc(size);
  if (!moved || !pointer) return moved;
  size_t old = ours ? ours : glibc_usable_size(pointer);
  memcpy(moved, pointer, old < size ? old : size);
  free(pointer);
  return moved;
}

void *reallocarray(void *pointer, size_t count, size_t size) {
  size_t bytes;
  if (__builtin_mul_overflow(count, size, &bytes)) {
    errno = ENOMEM;
    return NULL;
  }
  return realloc(pointer, bytes);
}

size_t malloc_usable_size(void *pointer) {
  size_t ours = our_size(pointer);
  return ours ? ours : glibc_usable_size(pointer);
}

// For tests and diagnostics: bytes of buffers kept mapped, unused (idle) or all.
size_t transferlab_buffer_cache_bytes(int idle_only) {
  size_t total = 0;
  lock_buffers();
  for (int i = 0; i < n_buffers; i++)
    if (!idle_only || !buffers[i].in_use) total += buffers[i].size;
  unlock_buffers();
  return total;
}
