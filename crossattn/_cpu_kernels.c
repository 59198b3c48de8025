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
 * Torch's elementwise ops need ~10 passes over int64 state per round for the same mask.
 *
 * crossattn_softmax_f32 / crossattn_softmax_bwd_f32: the torch backend's saved-P softmax with
 * the same dropout (and its 1 / (1 - p) scale) in one pass, and its backward in one pass. */
#include <pthread.h>
#include <stdint.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif
#define NV 4             /* vectors per block */
#define LANES (NV * 8)   /* counters per block */
#define BLK (4 * LANES)  /* keys per block */
#define MAX_THREADS 256

#if defined(__AVX2__)
/* 32-bit lanes, eight counters per register (the generic version below holds one 32-bit word
 * per 64-bit lane and writes the words out one by one: ~10 ns a key on AVX2, this ~1).
 * hi and lo of the 32x32 product: vpmuludq multiplies the even lanes; the odd ones shifted down. */
static inline void mulhilo8(__m256i a, __m256i m, __m256i *hi, __m256i *lo) {
    const __m256i even = _mm256_mul_epu32(a, m), odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
    *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
    *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

static inline void philox_block(uint32_t key0, uint32_t key1, uint32_t j0, uint32_t row, uint32_t bh,
                                uint32_t dir, uint32_t *restrict w) {
    const __m256i ma = _mm256_set1_epi32((int)0xD2511F53u), mb = _mm256_set1_epi32((int)0xCD9E8D57u);
    const __m256i step = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256i c0[NV], c1[NV], c2[NV], c3[NV];
    for (int v = 0; v < NV; v++) {
        c0[v] = _mm256_add_epi32(_mm256_set1_epi32((int)(j0 + (uint32_t)(v * 8))), step);
        c1[v] = _mm256_set1_epi32((int)row);
        c2[v] = _mm256_set1_epi32((int)bh);
        c3[v] = _mm256_set1_epi32((int)dir);
    }
    uint32_t k0 = key0, k1 = key1;
    for (int r = 0; r < 10; r++) {
        const __m256i kv0 = _mm256_set1_epi32((int)k0), kv1 = _mm256_set1_epi32((int)k1);
        for (int v = 0; v < NV; v++) {
            __m256i hia, loa, hib, lob;
            mulhilo8(c0[v], ma, &hia, &loa);
            mulhilo8(c2[v], mb, &hib, &lob);
            c0[v] = _mm256_xor_si256(_mm256_xor_si256(hib, c1[v]), kv0);
            c2[v] = _mm256_xor_si256(_mm256_xor_si256(hia, c3[v]), kv1);
            c1[v] = lob;
            c3[v] = loa;
        }
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    for (int v = 0; v < NV; v++) {  /* word k of counter n serves key 4 n + k: a 4 x 8 transpose */
        const __m256i t0 = _mm256_unpacklo_epi32(c0[v], c1[v]), t1 = _mm256_unpackhi_epi32(c0[v], c1[v]);
        const __m256i t2 = _mm256_unpacklo_epi32(c2[v], c3[v]), t3 = _mm256_unpackhi_epi32(c2[v], c3[v]);
        const __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
        const __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
        __m256i *o = (__m256i *)(w + 32 * v);  /* counters 8 v .. 8 v + 7 (w is 64-byte aligned) */
        _mm256_store_si256(o + 0, _mm256_permute2x128_si256(u0, u1, 0x20));
        _mm256_store_si256(o + 1, _mm256_permute2x128_si256(u2, u3, 0x20));
        _mm256_store_si256(o + 2, _mm256_permute2x128_si256(u0, u1, 0x31));
        _mm256_store_si256(o + 3, _mm256_permute2x128_si256(u2, u3, 0x31));
    }
}
#else
/* Elsewhere: eight 64-bit lanes holding 32-bit words (the full 64-bit product in each lane);
 * the compiler vectorises what the target allows. */
typedef uint64_t u64x8 __attribute__((vector_size(64)));
#define VL 8
static inline u64x8 mul32(u64x8 a, uint64_t c) { return a * c; }

static inline void philox_block(uint32_t key0, uint32_t key1, uint32_t j0, uint32_t row, uint32_t bh,
                                uint32_t dir, uint32_t *restrict w) {
    /* NV independent vectors advance round by round together: one vector's round is a chain of
     * dependent multiply, shift and xors (latency-bound alone), NV of them fill the pipeline. */
    const uint64_t m = 0xFFFFFFFFull;
    u64x8 c0[NV] = {{0}}, c1[NV] = {{0}}, c2[NV] = {{0}}, c3[NV] = {{0}};
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
#endif

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

/* Runs fn(arg, begin, end) over rows [0, total) split in nthreads contiguous shares; the
 * caller's thread takes the first. Where a thread cannot be had, its share runs here. */
typedef void (*rows_fn)(const void *arg, int64_t begin, int64_t end);
typedef struct {
    rows_fn fn;
    const void *arg;
    int64_t begin, end;
} share_t;

static void *run_share(void *s) {
    const share_t *sh = (const share_t *)s;
    sh->fn(sh->arg, sh->begin, sh->end);
    return 0;
}

static void parallel_rows(rows_fn fn, const void *arg, int64_t total, int nthreads) {
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    if (nthreads > total) nthreads = (int)total;
    if (nthreads < 1) nthreads = 1;
    share_t shares[MAX_THREADS];
    pthread_t tid[MAX_THREADS];
    int started[MAX_THREADS];
    for (int k = 0; k < nthreads; k++) {
        shares[k] = (share_t){fn, arg, total * k / nthreads, total * (k + 1) / nthreads};
        started[k] = 0;
    }
    for (int k = 1; k < nthreads; k++) started[k] = pthread_create(&tid[k], 0, run_share, &shares[k]) == 0;
    run_share(&shares[0]);
    for (int k = 1; k < nthreads; k++) {
        if (started[k]) pthread_join(tid[k], 0);
        else run_share(&shares[k]);
    }
}

static void mask_rows(const void *arg, int64_t begin, int64_t end) {
    job_t j = *(const job_t *)arg;
    j.begin = begin;
    j.end = end;
    run(&j);
}

/* out (and src), contiguous [nbh, nrows, cols] of esize-byte elements; bh [nbh] and rows [nrows]
 * int64 counters < 2**32. Splits the rows over nthreads threads (the caller's thread is one). */
int crossattn_philox_mask(uint64_t seed, uint64_t threshold, int dropped, const int64_t *bh, int64_t nbh,
                          const int64_t *rows, int64_t nrows, int64_t cols, uint32_t dir, int esize, uint64_t one,
                          const void *src, void *out, int nthreads) {
    if (esize != 1 && esize != 2 && esize != 4 && esize != 8) return 1;
    const int64_t total = nbh * nrows;
    if (total <= 0 || cols <= 0) return 0;
    const job_t job = {seed, threshold, one, bh, rows, nrows, cols, 0, 0, dir, dropped != 0, esize, src, out};
    parallel_rows(mask_rows, &job, total, nthreads);
    return 0;
}

/* ------------------------------------------------------------------------------ softmax
 * float32 rows on vectors of the target's register width (16 lanes on AVX-512, 8 on AVX, else 4:
 * SSE, NEON or scalars). Wider than the registers, GCC lowers the comparisons and selects lane
 * by lane: 16-lane vectors on AVX2 ran the softmax at ~5 ns a key, slower than torch's.
 * Torch runs the softmax, the dropout select and the softmax backward as 2 + 1 + 4 passes over
 * [B, H, Lq, Lk]; here each is one pass whose row stays in the L1/L2 cache between its loops. */
#if defined(__AVX512F__)
#define FL 16
#elif defined(__AVX__)
#define FL 8
#else
#define FL 4
#endif
typedef float f32v __attribute__((vector_size(4 * FL)));
typedef int32_t i32v __attribute__((vector_size(4 * FL)));
typedef uint32_t u32v __attribute__((vector_size(4 * FL)));
typedef float f32u __attribute__((vector_size(4 * FL), aligned(4)));  /* unaligned loads and stores */

static inline f32v splat(float x) {
    f32v v;
    for (int e = 0; e < FL; e++) v[e] = x;
    return v;
}
static inline f32v select_v(i32v m, f32v a, f32v b) { return (f32v)((m & (i32v)a) | (~m & (i32v)b)); }

/* max(a, b) lane by lane, b where either is NaN (x86's maxps; one instruction where there is one) */
static inline f32v vmax(f32v a, f32v b) {
#if defined(__AVX512F__)
    return (f32v)_mm512_max_ps((__m512)a, (__m512)b);
#else
    return select_v(a > b, a, b);
#endif
}

/* exp(x) for x <= 0 (x > 0 gives 1), within 1 ulp (Cephes' expf polynomial on r = x - n ln 2, |r| <= ln 2 / 2);
 * exp(-inf) = 0 and results below about 2**-125 flush to 0 (far under a float32 ulp of a softmax
 * row sum, which is >= 1); NaN stays NaN. n is rounded with the 1.5 * 2**23 trick and 2**n built
 * in the exponent bits: no float-to-int conversion, whose NaN case C leaves undefined. */
static inline f32v exp_neg(f32v x) {
    x = select_v(x > splat(0.0f), splat(0.0f), x);  /* a caller's rounding can leave a tiny x > 0 */
    const f32v magic = splat(12582912.0f);
    const f32v tm = x * splat(1.44269504088896341f) + magic;
    const f32v n = tm - magic;
    const f32v r = x - n * splat(0.693359375f) - n * splat(-2.12194440e-4f);
    f32v y = splat(1.9875691500e-4f);
    y = y * r + splat(1.3981999507e-3f);
    y = y * r + splat(8.3334519073e-3f);
    y = y * r + splat(4.1665795894e-2f);
    y = y * r + splat(1.6666665459e-1f);
    y = y * r + splat(5.0000001201e-1f);
    y = y * (r * r) + r + splat(1.0f);
    const u32v e = ((u32v)tm - (u32v)magic + 127u) << 23;  /* 2**n, garbage below n = -126: selected away */
    return select_v(x < splat(-87.0f), splat(0.0f), y * (f32v)e);
}

static inline f32v load_tail(const float *s, int64_t n, float fill) {
    f32v v = splat(fill);
    for (int64_t e = 0; e < n; e++) v[e] = s[e];
    return v;
}

static inline float hmax(f32v v) {
    float m = v[0];
    for (int e = 1; e < FL; e++) m = v[e] > m ? v[e] : m;
    return m;
}

static inline float hsum(f32v v) {
    float s = 0.0f;
    for (int e = 0; e < FL; e++) s += v[e];
    return s;
}

enum { MASKED, FUSED, EXACT };  /* how exp_row forms z - max z */

/* p = exp(z - max z) over a row and its sum, z - max z formed as: MASKED, (s == -inf ? -inf : s *
 * coef) - mz; FUSED (coef > 0), s * coef - mz in one rounding; EXACT, (s - max s) * coef. */
static inline __attribute__((always_inline)) float exp_row(const float *s, float *p, int64_t cols, int how,
                                                           f32v cv, f32v mv, f32v mzv) {
    const int64_t full = cols / FL * FL;
    const f32v ninf = splat(-__builtin_inff());
#define Z(x) (how == MASKED ? select_v((x) == ninf, ninf, (x) * cv) - mzv : how == FUSED ? (x) * cv - mzv : ((x) - mv) * cv)
    f32v acc = splat(0.0f);
    for (int64_t c = 0; c < full; c += FL) {
        const f32v e = exp_neg(Z(*(const f32u *)(s + c)));
        *(f32u *)(p + c) = e;
        acc += e;
    }
    if (full < cols) {
        const f32v e = exp_neg(Z(load_tail(s + full, cols - full, -__builtin_inff())));
        for (int64_t c = full; c < cols; c++) p[c] = e[c - full];
        acc += e;
    }
#undef Z
    return hsum(acc);
}

typedef struct {
    const float *s, *coef;
    float *p, *pd;
    int64_t heads, coef_heads, nrows, cols;
    float keep_scale;
    job_t drop;  /* the dropout counters (pd != NULL) */
} softmax_t;

static void softmax_rows(const void *arg, int64_t begin, int64_t end) {
    const softmax_t *a = (const softmax_t *)arg;
    const int64_t cols = a->cols, full = cols / FL * FL;
    const uint32_t key0 = (uint32_t)a->drop.seed, key1 = (uint32_t)(a->drop.seed >> 32);
    const f32v ninf = splat(-__builtin_inff());
    uint32_t w[BLK] __attribute__((aligned(64)));
    for (int64_t t = begin; t < end; t++) {
        const float *s = a->s + t * cols;
        float *p = a->p + t * cols, *pd = a->pd ? a->pd + t * cols : 0;
        const int64_t bh = t / a->nrows;
        const float cf = a->coef[a->coef_heads == 1 ? 0 : bh % a->heads];
        const f32v cv = splat(cf);
        /* the row maximum: of s where coef > 0 (z = s * coef peaks with s), else of z itself (a
         * masked -inf stays -inf whatever coef's sign). A NaN anywhere makes the row sum NaN. */
        const int pos = cf > 0.0f;
        f32v m = ninf;
        for (int64_t c = 0; c < full; c += FL) {
            const f32v x = *(const f32u *)(s + c);
            m = vmax(pos ? x : select_v(x == ninf, ninf, x * cv), m);
        }
        float mx = hmax(m);
        for (int64_t c = full; c < cols; c++) {
            const float z = pos || s[c] == -__builtin_inff() ? s[c] : s[c] * cf;
            mx = z > mx ? z : mx;
        }
        if (mx == -__builtin_inff()) {  /* every key masked: 0 -- unless a logit is NaN (a NaN row) */
            int nan = 0;
            for (int64_t c = 0; c < cols; c++) nan |= s[c] != s[c];
            if (!nan) {
                for (int64_t c = 0; c < cols; c++) p[c] = 0.0f;
                if (pd)
                    for (int64_t c = 0; c < cols; c++) pd[c] = 0.0f;
                continue;
            }
            mx = __builtin_nanf("");
        }
        const f32v mv = splat(mx);
        float sum = exp_row(s, p, cols, pos ? FUSED : MASKED, cv, mv, splat(pos ? mx * cf : mx));
        /* The maximum's term is ~1, unless the fused s * coef - max z left the product's rounding
         * error there and that exceeded exp's range (|z| > 2**30): then no term survives and the
         * row would be 0 / 0. Again as coef * (s - max s), exactly 0 at the maximum (one more
         * rounding than the fused form, so only here). */
        if (pos && !(sum >= 0.5f) && sum == sum) sum = exp_row(s, p, cols, EXACT, cv, mv, mv);
        /* a division, not a multiply by 1 / sum: one rounding (half an ulp of P), at the same speed */
        if (!pd) {
            for (int64_t c = 0; c < full; c += FL) *(f32u *)(p + c) = *(f32u *)(p + c) / splat(sum);
            for (int64_t c = full; c < cols; c++) p[c] /= sum;
            continue;
        }
        /* PD = P * keep / (1 - dropout_p): the dropout and its scale in the same pass */
        const uint32_t row = (uint32_t)a->drop.rows[t % a->nrows], ctr = (uint32_t)a->drop.bh[bh];
        const uint64_t thr = a->drop.threshold;
        const float ks = a->keep_scale;
        /* a threshold of 2**32 (dropout_p = 1) drops every key: no 32-bit word reaches it */
        const u32v tv = (u32v){0} + (uint32_t)(thr > 0xFFFFFFFFull ? 0xFFFFFFFFull : thr);
        const i32v all = (i32v){0} - (int32_t)(thr > 0xFFFFFFFFull);
        const f32v sv = splat(sum), kv = splat(ks), zero = splat(0.0f);
        for (int64_t c0 = 0; c0 < cols; c0 += BLK) {
            philox_block(key0, key1, (uint32_t)(c0 / 4), row, ctr, a->drop.dir, w);
            const int64_t n = cols - c0 < BLK ? cols - c0 : BLK, nv = n / FL * FL;
            float *pr = p + c0, *pdr = pd + c0;
            for (int64_t e = 0; e < nv; e += FL) {
                const f32v v = *(f32u *)(pr + e) / sv;
                *(f32u *)(pr + e) = v;
                *(f32u *)(pdr + e) = select_v((i32v)(*(const u32v *)(w + e) >= tv) & ~all, v * kv, zero);
            }
            for (int64_t e = nv; e < n; e++) {
                const float v = pr[e] / sum;
                pr[e] = v;
                pdr[e] = (uint64_t)w[e] >= thr ? v * ks : 0.0f;
            }
        }
    }
}

/* Over the rows of contiguous float32 [nbh * nrows, cols] logits s (row t: batch-head t / nrows,
 * head (t / nrows) % heads): P = softmax(s * coef[head]) (coef: coef_heads = 1 or heads floats;
 * an s of -inf is a masked key whatever coef's sign) into p (which may be s). With pd (which may
 * be s), also PD = P * keep_scale where the dropout mask of crossattn_philox_mask keeps (counter
 * words bh[t / nrows], rows[t % nrows], dir; dropped iff the word < threshold) and 0 where it
 * drops. A row without a valid key gives P = PD = 0. */
int crossattn_softmax_f32(const float *s, float *p, float *pd, const float *coef, int64_t coef_heads,
                          int64_t heads, int64_t nbh, int64_t nrows, int64_t cols, float keep_scale, uint64_t seed,
                          uint64_t threshold, const int64_t *bh, const int64_t *rows, uint32_t dir, int nthreads) {
    const int64_t total = nbh * nrows;
    if (total <= 0 || cols <= 0) return 0;
    if (heads <= 0 || (coef_heads != 1 && coef_heads != heads)) return 1;
    const softmax_t a = {s, coef, p, pd, heads, coef_heads, nrows, cols, keep_scale,
                         {seed, threshold, 0, bh, rows, nrows, cols, 0, 0, dir, 0, 4, 0, 0}};
    parallel_rows(softmax_rows, &a, total, nthreads);
    return 0;
}

typedef struct {
    float *out;
    const float *dp, *pd, *p, *dw, *coef;
    int64_t dw_sb, dw_sh, dw_sr, coef_heads, heads, nrows, cols;
    float dw_scale;
} softmax_bwd_t;

static void softmax_bwd_rows(const void *arg, int64_t begin, int64_t end) {
    const softmax_bwd_t *a = (const softmax_bwd_t *)arg;
    const int64_t cols = a->cols, full = cols / FL * FL;
    for (int64_t t = begin; t < end; t++) {
        const int64_t bh = t / a->nrows, r = t % a->nrows;
        const float *p = a->p + t * cols;
        const float *dp = a->dp ? a->dp + t * cols : 0, *pd = a->pd ? a->pd + t * cols : p;
        const float *dw = a->dw ? a->dw + bh / a->heads * a->dw_sb + bh % a->heads * a->dw_sh + r * a->dw_sr : 0;
        float *o = a->out + t * cols;
        const f32v ws = splat(a->dw_scale);
        /* t = PD * dP + P * dW * scale, into out, and its row sum */
        f32v acc = splat(0.0f);
        int64_t c = 0;
        for (; c < full; c += FL) {
            f32v v = splat(0.0f);
            if (dp) v = *(const f32u *)(pd + c) * *(const f32u *)(dp + c);
            if (dw) v += *(const f32u *)(p + c) * (*(const f32u *)(dw + c) * ws);
            *(f32u *)(o + c) = v;
            acc += v;
        }
        float sum = hsum(acc);
        for (; c < cols; c++) {
            float v = 0.0f;
            if (dp) v = pd[c] * dp[c];
            if (dw) v += p[c] * (dw[c] * a->dw_scale);
            o[c] = v;
            sum += v;
        }
        /* dS = coef * (t - P * rowsum(t)): the gradient of s (dq = dS k, dk = dS^T q) */
        const float cf = a->coef[a->coef_heads == 1 ? 0 : bh % a->heads];
        const f32v cv = splat(cf), sv = splat(sum);
        for (c = 0; c < full; c += FL) *(f32u *)(o + c) = (*(f32u *)(o + c) - *(const f32u *)(p + c) * sv) * cv;
        for (; c < cols; c++) o[c] = (o[c] - p[c] * sum) * cf;
    }
}

/* The backward of crossattn_softmax_f32 over the same rows (out may be dp): the gradient of s,
 * out = coef[head] * (t - P * rowsum(t)), t = PD * dP (dp given; pd NULL: PD = P) + P * dW *
 * dw_scale (dw given: row r of (batch b, head h) at dw + b * dw_sb + h * dw_sh + r * dw_sr). */
int crossattn_softmax_bwd_f32(float *out, const float *dp, const float *pd, const float *p, const float *dw,
                              int64_t dw_sb, int64_t dw_sh, int64_t dw_sr, float dw_scale, const float *coef,
                              int64_t coef_heads, int64_t heads, int64_t nbh, int64_t nrows, int64_t cols,
                              int nthreads) {
    const int64_t total = nbh * nrows;
    if (total <= 0 || cols <= 0) return 0;
    if (heads <= 0 || (coef_heads != 1 && coef_heads != heads)) return 1;
    const softmax_bwd_t a = {out, dp, pd, p, dw, coef, dw_sb, dw_sh, dw_sr, coef_heads, heads, nrows, cols, dw_scale};
    parallel_rows(softmax_bwd_rows, &a, total, nthreads);
    return 0;
}
