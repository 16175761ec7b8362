// Kernel census: which GPU kernels a process runs between cuProfilerStart and cuProfilerStop, and for how long.
//
// A CUPTI injection library (the CUDA driver loads it when CUDA_INJECTION64_PATH names it, and calls
// InitializeInjection), so the same tool measures sd-rbee's binary and PyTorch/diffusers without changing
// either: `sd-rbee bench unet` and `benches/torch_baseline.py unet` open a profiler window around their timed
// calls. At each window's end it prints, per kernel name, the GPU time, the launches and the share of the
// window, the busy time (the union of kernel intervals) and the idle time (launch gaps, host waits); memcpys
// and memsets count as kernels of their own names:
//   census: LABEL window=1 wall_ms=... busy_ms=... kernels_ms=... launches=... per_call: ...
//   census: LABEL window=1 rank=1 ms=... share=...% calls=... avg_us=... grid=... block=... name=...
// and, with SDR_CENSUS_OUT=FILE, every kernel as a tab-separated row (label, window, ms, calls, name).
//
// Environment: SDR_CENSUS_LABEL (default "process"), SDR_CENSUS_TOP (rows printed, default 30),
// SDR_CENSUS_CALLS (timed calls in a window: adds per-call figures), SDR_CENSUS_OUT, SDR_CENSUS_CUPTI (the
// libcupti to load when the process has none loaded yet; default libcupti.so.13 from the library path).
//
// Build (scripts/gpu/build.sh): gcc -O2 -shared -fPIC -I$CUDA_HOME/include kernel_census.c -o libkernel_census.so -ldl
// The aggregation is plain C with no CUPTI in it; `gcc -DCENSUS_SELFTEST kernel_census.c` builds it as a
// program that checks it on synthetic records (tests/parity.rs runs that).
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// ---------------------------------------------------------------------------------------------------------
// Aggregation: kernel records (start, end, interned name, launch shape) and the windows they fall in.

typedef struct {
  uint64_t start, end;
  uint32_t name;
  int32_t grid[3], block[3];
} Record;

typedef struct {
  Record *records;
  size_t len, cap;
  char **names;      // interned index -> text
  uint64_t *hashes;  // interned index -> hash
  size_t names_len;
  uint32_t *slots;   // open addressing over the indices (index + 1; 0 is empty), a power of two long
  size_t slots_cap;
} Census;

static void *checked(void *p) {
  if (!p) {
    fputs("census: ERROR out of memory\n", stderr);
    abort();
  }
  return p;
}

static uint64_t fnv1a(const char *s) {
  uint64_t h = 1469598103934665603ull;
  for (; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211ull;
  return h;
}

static uint32_t census_intern(Census *c, const char *text) {
  if (2 * (c->names_len + 1) > c->slots_cap) {
    size_t cap = c->slots_cap ? 2 * c->slots_cap : 1024;
    uint32_t *slots = checked(calloc(cap, sizeof(uint32_t)));
    for (size_t i = 0; i < c->names_len; i++) {
      size_t slot = c->hashes[i] & (cap - 1);
      while (slots[slot]) slot = (slot + 1) & (cap - 1);
      slots[slot] = (uint32_t)i + 1;
    }
    free(c->slots);
    c->slots = slots;
    c->slots_cap = cap;
    c->names = checked(realloc(c->names, cap * sizeof(char *)));
    c->hashes = checked(realloc(c->hashes, cap * sizeof(uint64_t)));
  }
  uint64_t h = fnv1a(text);
  size_t slot = h & (c->slots_cap - 1);
  for (; c->slots[slot]; slot = (slot + 1) & (c->slots_cap - 1)) {
    uint32_t i = c->slots[slot] - 1;
    if (c->hashes[i] == h && strcmp(c->names[i], text) == 0) return i;
  }
  uint32_t i = (uint32_t)c->names_len++;
  c->names[i] = checked(strdup(text));
  c->hashes[i] = h;
  c->slots[slot] = i + 1;
  return i;
}

static const char *census_name(const Census *c, uint32_t i) { return c->names[i]; }

static void census_add(Census *c, uint64_t start, uint64_t end, const char *name, const int32_t grid[3],
                       const int32_t block[3]) {
  if (c->len == c->cap) {
    c->cap = c->cap ? 2 * c->cap : 65536;
    c->records = checked(realloc(c->records, c->cap * sizeof(Record)));
  }
  Record *r = &c->records[c->len++];
  r->start = start;
  r->end = end < start ? start : end;
  r->name = census_intern(c, name);
  for (int i = 0; i < 3; i++) {
    r->grid[i] = grid ? grid[i] : 0;
    r->block[i] = block ? block[i] : 0;
  }
}

typedef struct {
  uint32_t name;
  uint64_t ns, calls;
  int32_t grid[3], block[3]; // the launch shape of the longest call
  uint64_t longest;
} Row;

static int by_start(const void *a, const void *b) {
  const Record *x = a, *y = b;
  return x->start < y->start ? -1 : x->start > y->start;
}

static int by_time(const void *a, const void *b) {
  const Row *x = a, *y = b;
  if (x->ns != y->ns) return x->ns > y->ns ? -1 : 1;
  return x->name < y->name ? -1 : x->name > y->name;
}

// Summary of the records that start inside [begin, end]: the rows sorted by time, busy time as the union of
// the kernels' intervals (clipped to the window).
typedef struct {
  Row *rows;
  size_t rows_len;
  uint64_t busy, kernels, launches;
} Summary;

static Summary census_summarise(Census *c, uint64_t begin, uint64_t end) {
  Summary s = {0};
  qsort(c->records, c->len, sizeof(Record), by_start);
  Row *rows = checked(calloc(c->names_len + 1, sizeof(Row)));
  uint64_t cover_end = begin;
  for (size_t i = 0; i < c->len; i++) {
    const Record *r = &c->records[i];
    if (r->start < begin || r->start > end) continue;
    uint64_t stop = r->end > end ? end : r->end, ns = r->end - r->start;
    if (stop > cover_end) {
      s.busy += stop - (r->start > cover_end ? r->start : cover_end);
      cover_end = stop;
    }
    Row *row = &rows[r->name];
    row->name = r->name;
    row->ns += ns;
    row->calls++;
    if (ns >= row->longest) {
      row->longest = ns;
      memcpy(row->grid, r->grid, sizeof r->grid);
      memcpy(row->block, r->block, sizeof r->block);
    }
    s.kernels += ns;
    s.launches++;
  }
  size_t n = 0;
  for (size_t i = 0; i < c->names_len; i++)
    if (rows[i].calls) rows[n++] = rows[i];
  qsort(rows, n, sizeof(Row), by_time);
  s.rows = rows;
  s.rows_len = n;
  return s;
}

static void census_clear(Census *c) { c->len = 0; }

static void census_report(Census *c, FILE *out, FILE *tsv, const char *label, int window, uint64_t begin,
                          uint64_t end, size_t top, double calls) {
  Summary s = census_summarise(c, begin, end);
  double wall = (double)(end - begin) / 1e6;
  fprintf(out, "census: %s window=%d wall_ms=%.3f busy_ms=%.3f idle_ms=%.3f kernels_ms=%.3f launches=%llu names=%zu",
          label, window, wall, s.busy / 1e6, wall - s.busy / 1e6, s.kernels / 1e6, (unsigned long long)s.launches,
          s.rows_len);
  if (calls > 0)
    fprintf(out, " per_call: wall_ms=%.3f busy_ms=%.3f launches=%.1f", wall / calls, s.busy / 1e6 / calls,
            s.launches / calls);
  fputc('\n', out);
  for (size_t i = 0; i < s.rows_len; i++) {
    const Row *r = &s.rows[i];
    const char *name = census_name(c, r->name);
    if (i < top)
      fprintf(out,
              "census: %s window=%d rank=%zu ms=%.3f share=%.1f%% calls=%llu avg_us=%.1f grid=%dx%dx%d "
              "block=%dx%dx%d name=%.200s\n",
              label, window, i + 1, r->ns / 1e6, wall > 0 ? 100.0 * (r->ns / 1e6) / wall : 0.0,
              (unsigned long long)r->calls, r->ns / 1e3 / (double)r->calls, r->grid[0], r->grid[1], r->grid[2],
              r->block[0], r->block[1], r->block[2], name);
    if (tsv)
      fprintf(tsv, "%s\t%d\t%.4f\t%llu\t%s\n", label, window, r->ns / 1e6, (unsigned long long)r->calls, name);
  }
  fflush(out);
  if (tsv) fflush(tsv);
  free(s.rows);
}

#ifdef CENSUS_SELFTEST
// ---------------------------------------------------------------------------------------------------------
// Self-test: synthetic records with overlaps, a record outside the window and repeated names.
#include <assert.h>
#include <math.h>

int main(void) {
  Census c = {0};
  int32_t g[3] = {4, 1, 1}, b[3] = {128, 1, 1};
  census_add(&c, 50, 90, "before", g, b);      // starts before the window: left out
  census_add(&c, 100, 200, "gemm", g, b);       // 100 ns
  census_add(&c, 150, 260, "gemm", g, b);       // overlaps: busy 100..260
  census_add(&c, 400, 450, "norm", g, b);       // gap 260..400
  census_add(&c, 990, 1100, "tail", g, b);      // runs past the window's end: busy clipped at 1000
  census_add(&c, 1200, 1300, "after", g, b);    // after the window: left out
  for (int i = 0; i < 5000; i++) {               // enough names to grow the table
    char name[32];
    snprintf(name, sizeof name, "k%d", i % 1500);
    census_add(&c, 2000 + i, 2001 + i, name, NULL, NULL);
  }
  assert(c.names_len == 5 + 1500);
  Summary s = census_summarise(&c, 100, 1000);
  assert(s.launches == 4);
  assert(s.busy == 160 + 50 + 10);
  assert(s.kernels == 100 + 110 + 50 + 110);
  assert(s.rows_len == 3);
  assert(strcmp(census_name(&c, s.rows[0].name), "gemm") == 0 && s.rows[0].calls == 2 && s.rows[0].ns == 210);
  assert(strcmp(census_name(&c, s.rows[1].name), "tail") == 0);
  assert(strcmp(census_name(&c, s.rows[2].name), "norm") == 0);
  free(s.rows);
  Summary late = census_summarise(&c, 2000, 10000);
  assert(late.launches == 5000 && late.rows_len == 1500 && late.busy == 5000);
  free(late.rows);
  census_report(&c, stdout, NULL, "selftest", 1, 100, 1000, 2, 2.0);
  census_clear(&c);
  Summary none = census_summarise(&c, 0, ~0ull);
  assert(none.launches == 0 && none.rows_len == 0);
  free(none.rows);
  printf("census selftest: ok\n");
  return 0;
}

#else
// ---------------------------------------------------------------------------------------------------------
// CUPTI: activity records in, profiler windows from the cuProfilerStart/Stop callbacks.
#include <cupti.h>

#define CUPTI_FN(ret, name, args) static ret(CUPTIAPI *p_##name) args
CUPTI_FN(CUptiResult, cuptiActivityRegisterCallbacks,
         (CUpti_BuffersCallbackRequestFunc, CUpti_BuffersCallbackCompleteFunc));
CUPTI_FN(CUptiResult, cuptiActivityEnable, (CUpti_ActivityKind));
CUPTI_FN(CUptiResult, cuptiActivityDisable, (CUpti_ActivityKind));
CUPTI_FN(CUptiResult, cuptiActivityGetNextRecord, (uint8_t *, size_t, CUpti_Activity **));
CUPTI_FN(CUptiResult, cuptiActivityFlushAll, (uint32_t));
CUPTI_FN(CUptiResult, cuptiSubscribe, (CUpti_SubscriberHandle *, CUpti_CallbackFunc, void *));
CUPTI_FN(CUptiResult, cuptiEnableCallback, (uint32_t, CUpti_SubscriberHandle, CUpti_CallbackDomain, CUpti_CallbackId));
CUPTI_FN(CUptiResult, cuptiGetTimestamp, (uint64_t *));
CUPTI_FN(CUptiResult, cuptiGetVersion, (uint32_t *));
CUPTI_FN(CUptiResult, cuptiGetResultString, (CUptiResult, const char **));

static Census census;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static const char *label = "process";
static FILE *tsv;
static size_t top = 30;
static double calls_per_window;
static int window, open_window;
static uint64_t window_begin;
static char *(*demangle)(const char *, char *, size_t *, int *);

static const CUpti_ActivityKind kinds[] = {CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL, CUPTI_ACTIVITY_KIND_MEMCPY,
                                           CUPTI_ACTIVITY_KIND_MEMSET};

static const char *error_text(CUptiResult r) {
  const char *s = "unknown";
  if (p_cuptiGetResultString) p_cuptiGetResultString(r, &s);
  return s;
}

#define CHECK(call)                                                                                \
  do {                                                                                             \
    CUptiResult r_ = (call);                                                                       \
    if (r_ != CUPTI_SUCCESS) fprintf(stderr, "census: %s ERROR %s: %s\n", label, #call, error_text(r_)); \
  } while (0)

static void CUPTIAPI buffer_requested(uint8_t **buffer, size_t *size, size_t *max_records) {
  *size = 8 << 20;
  *buffer = checked(aligned_alloc(8, *size));
  *max_records = 0;
}

static void add_kernel(const char *raw, uint64_t start, uint64_t end, const int32_t grid[3], const int32_t block[3]) {
  char *readable = NULL;
  int status = -1;
  if (demangle && raw && raw[0] == '_' && raw[1] == 'Z') readable = demangle(raw, NULL, NULL, &status);
  pthread_mutex_lock(&lock);
  census_add(&census, start, end, status == 0 && readable ? readable : (raw ? raw : "?"), grid, block);
  pthread_mutex_unlock(&lock);
  free(readable);
}

static void CUPTIAPI buffer_completed(CUcontext ctx, uint32_t stream, uint8_t *buffer, size_t size, size_t valid) {
  (void)ctx;
  (void)stream;
  (void)size;
  CUpti_Activity *record = NULL;
  while (p_cuptiActivityGetNextRecord(buffer, valid, &record) == CUPTI_SUCCESS) {
    if (record->kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL || record->kind == CUPTI_ACTIVITY_KIND_KERNEL) {
      // Every CUpti_ActivityKernelN since 4 shares this prefix (kind ... start, end ... grid, block ... name).
      const CUpti_ActivityKernel10 *k = (const CUpti_ActivityKernel10 *)record;
      int32_t grid[3] = {k->gridX, k->gridY, k->gridZ}, block[3] = {k->blockX, k->blockY, k->blockZ};
      add_kernel(k->name, k->start, k->end, grid, block);
    } else if (record->kind == CUPTI_ACTIVITY_KIND_MEMCPY) {
      const CUpti_ActivityMemcpy6 *m = (const CUpti_ActivityMemcpy6 *)record;
      char name[64];
      snprintf(name, sizeof name, "[memcpy kind %u]", (unsigned)m->copyKind);
      add_kernel(name, m->start, m->end, NULL, NULL);
    } else if (record->kind == CUPTI_ACTIVITY_KIND_MEMSET) {
      const CUpti_ActivityMemset4 *m = (const CUpti_ActivityMemset4 *)record;
      add_kernel("[memset]", m->start, m->end, NULL, NULL);
    }
  }
  free(buffer);
}

static void start_window(void) {
  if (open_window) return;
  for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++) CHECK(p_cuptiActivityEnable(kinds[i]));
  CHECK(p_cuptiGetTimestamp(&window_begin));
  open_window = 1;
}

static void stop_window(void) {
  if (!open_window) return;
  uint64_t end = 0;
  CHECK(p_cuptiGetTimestamp(&end));
  // Collection off, then a forced flush: a plain one may hold back buffers CUPTI still thinks incomplete, and
  // they would arrive after this report. Forcing is safe because the caller synchronised, so every kernel of
  // the window has finished. Flushing inside a CUPTI callback is what NVIDIA's own injection sample does.
  for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++) CHECK(p_cuptiActivityDisable(kinds[i]));
  CHECK(p_cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED));
  open_window = 0;
  pthread_mutex_lock(&lock);
  census_report(&census, stderr, tsv, label, ++window, window_begin, end, top, calls_per_window);
  census_clear(&census);
  pthread_mutex_unlock(&lock);
}

static void CUPTIAPI on_api(void *user, CUpti_CallbackDomain domain, CUpti_CallbackId id, const void *data) {
  (void)user;
  const CUpti_CallbackData *cb = data;
  int start = (domain == CUPTI_CB_DOMAIN_DRIVER_API && id == CUPTI_DRIVER_TRACE_CBID_cuProfilerStart) ||
              (domain == CUPTI_CB_DOMAIN_RUNTIME_API && id == CUPTI_RUNTIME_TRACE_CBID_cudaProfilerStart_v4000);
  // The caller synchronised before either call, so no kernel of the window is still running at its edges.
  if (start && cb->callbackSite == CUPTI_API_EXIT) start_window();
  if (!start && cb->callbackSite == CUPTI_API_ENTER) stop_window();
}

static void at_exit(void) {
  stop_window(); // a window never closed (the process exited inside it)
  if (tsv) fclose(tsv);
}

static int load_cupti(void) {
  void *lib = dlopen("libcupti.so.13", RTLD_NOW | RTLD_NOLOAD); // the process's own, if it has one
  const char *path = getenv("SDR_CENSUS_CUPTI");
  if (!lib) lib = dlopen(path && *path ? path : "libcupti.so.13", RTLD_NOW | RTLD_GLOBAL);
  if (!lib) {
    fprintf(stderr, "census: %s ERROR cannot load CUPTI: %s\n", label, dlerror());
    return 0;
  }
#define LOAD(name)                                                                  \
  if (!(p_##name = (__typeof__(p_##name))dlsym(lib, #name))) {                     \
    fprintf(stderr, "census: %s ERROR CUPTI has no %s\n", label, #name);           \
    return 0;                                                                       \
  }
  LOAD(cuptiGetResultString);
  LOAD(cuptiActivityRegisterCallbacks);
  LOAD(cuptiActivityEnable);
  LOAD(cuptiActivityDisable);
  LOAD(cuptiActivityGetNextRecord);
  LOAD(cuptiActivityFlushAll);
  LOAD(cuptiSubscribe);
  LOAD(cuptiEnableCallback);
  LOAD(cuptiGetTimestamp);
  LOAD(cuptiGetVersion);
#undef LOAD
  return 1;
}

// Called by the CUDA driver during cuInit when CUDA_INJECTION64_PATH names this library.
__attribute__((visibility("default"))) int InitializeInjection(void) {
  static int done;
  if (done++) return 1;
  const char *v;
  if ((v = getenv("SDR_CENSUS_LABEL")) && *v) label = v;
  if ((v = getenv("SDR_CENSUS_TOP")) && *v) top = (size_t)atol(v);
  if ((v = getenv("SDR_CENSUS_CALLS")) && *v) calls_per_window = atof(v);
  if ((v = getenv("SDR_CENSUS_OUT")) && *v && !(tsv = fopen(v, "a")))
    fprintf(stderr, "census: %s ERROR cannot open %s\n", label, v);
  // a Rust process has no libstdc++ yet at cuInit (cuBLAS and cuDNN bring it later): load it now, so that both
  // sides' C++ kernel names come out demangled and their rows compare
  void *cxx = dlopen("libstdc++.so.6", RTLD_NOW | RTLD_GLOBAL);
  demangle = (__typeof__(demangle))dlsym(cxx ? cxx : RTLD_DEFAULT, "__cxa_demangle");
  if (!load_cupti()) return 1; // the process goes on without a census
  uint32_t version = 0;
  p_cuptiGetVersion(&version);
  CUpti_SubscriberHandle subscriber;
  CUptiResult r = p_cuptiSubscribe(&subscriber, on_api, NULL);
  if (r != CUPTI_SUCCESS) {
    fprintf(stderr, "census: %s ERROR cuptiSubscribe: %s\n", label, error_text(r));
    return 1;
  }
  CHECK(p_cuptiEnableCallback(1, subscriber, CUPTI_CB_DOMAIN_DRIVER_API, CUPTI_DRIVER_TRACE_CBID_cuProfilerStart));
  CHECK(p_cuptiEnableCallback(1, subscriber, CUPTI_CB_DOMAIN_DRIVER_API, CUPTI_DRIVER_TRACE_CBID_cuProfilerStop));
  CHECK(p_cuptiEnableCallback(1, subscriber, CUPTI_CB_DOMAIN_RUNTIME_API,
                              CUPTI_RUNTIME_TRACE_CBID_cudaProfilerStart_v4000));
  CHECK(p_cuptiEnableCallback(1, subscriber, CUPTI_CB_DOMAIN_RUNTIME_API,
                              CUPTI_RUNTIME_TRACE_CBID_cudaProfilerStop_v4000));
  CHECK(p_cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed));
  atexit(at_exit);
  fprintf(stderr, "census: %s injected (CUPTI %u, built against %u; demangler %s)\n", label, version,
          (unsigned)CUPTI_API_VERSION, demangle ? "yes" : "no");
  return 1;
}
#endif
