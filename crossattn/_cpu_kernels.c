/* CPU kernels of crossattn's torch backend, compiled at first use by crossattn/_cpu_kernels.py
 * with the system C compiler and called through ctypes (plain C: no PyTorch headers, so the
 * build takes a fraction of a second; without a compiler the torch-op versions run instead).
 *
 * crossattn_philox_mask: the dropout keep mask of crossattn/_philox.py, bit for bit, in one
 * pass: Philox4x32-10 with key = seed and counter (j / 4, row, b * H + h, direction); key j
 * takes word j % 4 and is dropped iff that word < threshold. It either writes the mask as
 * 0 / `one` (the bit pattern of 1 in the output's format: bool, float16, bfloat16, float32,
 * float64) or, given `src`, writes src where kept and 0 where dropped (P * keep in one pass:
 * the select is exact, P * 1 = P and P * 0 = +0 for the non-negative, finite P).
 * Torch's elementwise ops need ~10 passes over int64 state per round for the same mask. */
#include <pthread.h>
#include <stdint.h>

/* Eight 64-bit lanes holding 32-bit words: the compiler maps the products to vector 32x32->64
 * multiplies where the target has them and splits or scalarises the vectors where it has not. */
typedef uint64_t u64x8 __attribute__((vector_size(64)));
#define VL 8
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

/* a * c for lanes < 2**32 and a constant c < 2**32: the full 64-bit product. The compiler cannot
 * tell that the high halves are zero and would emit a 64x64 multiply (vpmullq: 3 uops). */
static inline u64x8 mul32(u64x8 a, uint64_t c) {
#if defined(__AVX512F__)
    return (u64x8)_mm512_mul_epu32((__m512i)a, _mm512_set1_epi64((long long)c));
#elif defined(__AVX2__)
    typedef uint64_t u64x4 __attribute__((vector_size(32)));
    const __m256i cc = _mm256_set1_epi64x((long long)c);
    u64x4 lo = {a[0], a[1], a[2], a[3]}, hi = {a[4], a[5], a[6], a[7]};
    lo = (u64x4)_mm256_mul_epu32((__m256i)lo, cc);
    hi = (u64x4)_mm256_mul_epu32((__m256i)hi, cc);
    return (u64x8){lo[0], lo[1], lo[2], lo[3], hi[0], hi[1], hi[2], hi[3]};
#else
    return a * c;
#endif
}
#define NV 4             /* vectors per block */
#define LANES (NV * VL)  /* counters per block */
#define BLK (4 * LANES)  /* keys per block */
#define MAX_THREADS 256

static inline void philox_block(uint32_t key0, uint32_t key1, uint32_t j0, uint32_t row, uint32_t bh,
                                uint32_t dir, uint32_t *restrict w) {
    /* NV independent vectors advance round by round together: one vector's round is a chain of
     * dependent multiply, shift and xors (latency-bound alone), NV of them fill the pipeline. */
    const uint64_t m = 0xFFFFFFFFull;
    u64x8 c0[NV], c1[NV], c2[NV], c3[NV];
    for (int v = 0; v < NV; v++)
        for (int l = 0; l < VL; l++) {
            c0[v][l] = (uint32_t)(j0 + (uint32_t)(v * VL + l));
            c1[v][l] = row;
            c2[v][l] = bh;
            c3[v][l] = dir;
        }
    uint64_t k0 = key0, k1 = key1;
    for (int r = 0; r < 10; r++) {
        for (int v = 0; v < NV; v++) {
            u64x8 pb = mul32(c2[v], 0xCD9E8D57ull), pa = mul32(c0[v], 0xD2511F53ull);
            c0[v] = (pb >> 32) ^ c1[v] ^ k0;
            c2[v] = (pa >> 32) ^ c3[v] ^ k1;
            c1[v] = pb & m;
            c3[v] = pa & m;
        }
        k0 = (k0 + 0x9E3779B9u) & m;
        k1 = (k1 + 0xBB67AE85u) & m;
    }
    for (int v = 0; v < NV; v++)
        for (int l = 0; l < VL; l++) {  /* word k of counter n serves key 4 n + k */
            uint32_t *o = w + 4 * (v * VL + l);
            o[0] = (uint32_t)c0[v][l];
            o[1] = (uint32_t)c1[v][l];
            o[2] = (uint32_t)c2[v][l];
            o[3] = (uint32_t)c3[v][l];
        }
}

typedef struct {
    uint64_t seed, threshold, one;
    const int64_t *bh, *rows;
    int64_t nrows, cols, begin, end;  /* rows [begin, end) of the flattened [nbh * nrows, cols] */
    uint32_t dir;
    int dropped, esize;
    const void *src;
    void *out;
} job_t;

/* all-ones where kept, zero where dropped (branch-free, so the loops vectorise) */
#define KEEP(T, e) ((T)0 - (T)(((uint64_t)w[e] >= thr) ^ (uint64_t)dropped))
#define SELECT(T)                                                                    \
    do {                                                                             \
        const T *s = (const T *)j->src + t * cols + c;                               \
        T *o = (T *)j->out + t * cols + c;                                           \
        for (int64_t e = 0; e < n; e++) o[e] = s[e] & KEEP(T, e);                    \
    } while (0)
#define FILL(T)                                                                      \
    do {                                                                             \
        const T one = (T)j->one;                                                     \
        T *o = (T *)j->out + t * cols + c;                                           \
        for (int64_t e = 0; e < n; e++) o[e] = one & KEEP(T, e);                     \
    } while (0)

static void *run(void *arg) {
    const job_t *j = (const job_t *)arg;
    const uint32_t key0 = (uint32_t)j->seed, key1 = (uint32_t)(j->seed >> 32);
    const int64_t cols = j->cols;
    const uint64_t thr = j->threshold;
    const int dropped = j->dropped;
    uint32_t w[BLK] __attribute__((aligned(64)));
    for (int64_t t = j->begin; t < j->end; t++) {
        const uint32_t bh = (uint32_t)j->bh[t / j->nrows], row = (uint32_t)j->rows[t % j->nrows];
        for (int64_t c = 0; c < cols; c += BLK) {
            philox_block(key0, key1, (uint32_t)(c / 4), row, bh, j->dir, w);
            const int64_t n = cols - c < BLK ? cols - c : BLK;
            if (j->src) {
                switch (j->esize) {
                case 1: SELECT(uint8_t); break;
                case 2: SELECT(uint16_t); break;
                case 4: SELECT(uint32_t); break;
                default: SELECT(uint64_t); break;
                }
            } else {
                switch (j->esize) {
                case 1: FILL(uint8_t); break;
                case 2: FILL(uint16_t); break;
                case 4: FILL(uint32_t); break;
                default: FILL(uint64_t); break;
                }
            }
        }
    }
    return 0;
}

/* out (and src), contiguous [nbh, nrows, cols] of esize-byte elements; bh [nbh] and rows [nrows]
 * int64 counters < 2**32. Splits the rows over nthreads threads (the caller's thread is one). */
int crossattn_philox_mask(uint64_t seed, uint64_t threshold, int dropped, const int64_t *bh, int64_t nbh,
                          const int64_t *rows, int64_t nrows, int64_t cols, uint32_t dir, int esize, uint64_t one,
                          const void *src, void *out, int nthreads) {
    if (esize != 1 && esize != 2 && esize != 4 && esize != 8) return 1;
    const int64_t total = nbh * nrows;
    if (total <= 0 || cols <= 0) return 0;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    if (nthreads > total) nthreads = (int)total;
    if (nthreads < 1) nthreads = 1;
    job_t jobs[MAX_THREADS];
    pthread_t tid[MAX_THREADS];
    int started[MAX_THREADS];
    for (int k = 0; k < nthreads; k++) {
        jobs[k] = (job_t){seed, threshold, one, bh, rows, nrows, cols,
                          total * k / nthreads, total * (k + 1) / nthreads, dir, dropped != 0, esize, src, out};
        started[k] = 0;
    }
    for (int k = 1; k < nthreads; k++) started[k] = pthread_create(&tid[k], 0, run, &jobs[k]) == 0;
    run(&jobs[0]);
    for (int k = 1; k < nthreads; k++) {
        if (started[k]) pthread_join(tid[k], 0);
        else run(&jobs[k]);  /* no thread to be had: do its share here */
    }
    return 0;
}
