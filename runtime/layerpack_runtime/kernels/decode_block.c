/* One llama-family decoder block for one new token of one sequence, in one call (kernels/decode_block.py).

   Why: a decode step of a small model spends most of its time between the matrix products - some
   25 torch operator dispatches per block at 2-10 us each (RMS norms, rotary, the cache write,
   attention, residual adds, SiLU), about 7 ms of SmolLM2's 17 ms NF4 token on one core, while
   llama.cpp's whole token takes 7 ms. Here the block is one C call: the GEMVs are qmatvec.c's (the
   same kernels and bits as the per-op path), and the glue between them runs on the token's few
   thousand values without allocating.

   Numerics follow the per-op path (models/llama.py) operation by operation: with bfloat16
   activations every intermediate is rounded to bfloat16 where torch rounds it (the norm's result
   and its scaling, the rotary products and their sum, the bias and residual adds, SiLU and its
   product), and float32 where torch computes in float32. Two reductions sum in another order than
   torch's: the norm's sum of squares and attention (float32 throughout here; torch's CPU flash
   attention rounds the probabilities to bfloat16 before multiplying the values). So results equal
   the per-op path within rounding, not bit for bit (tests/kernels/test_decode_block.py states the
   tolerance), and they do not depend on the thread count: every output value is computed by one
   thread in a fixed order. */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

void lp_nf4_matvec(const uint8_t *codes, const float *absmax, int64_t rows, int64_t cols, int64_t block,
                   const void *x_in, int64_t batch, void *y_out, const void *oidx, int idx64, const void *oval, int vdt,
                   int64_t k, int nthreads, int bf16);
void lp_int8_matvec(const int8_t *codes, const float *absmax, int64_t rows, int64_t cols, int64_t block,
                    const void *x_in, int64_t batch, void *y_out, const void *oidx, int idx64, const void *oval, int vdt,
                    int64_t k, int nthreads, int bf16);
void lp_bf16_matvec(const uint16_t *w, int64_t rows, int64_t cols, const uint16_t *x, void *y_out, int bf16, int nthreads);

enum { LIN_NONE = 0, LIN_BF16 = 1, LIN_NF4 = 2, LIN_INT8 = 3 };

/* One projection: a dense bfloat16 weight or a quantized one in the pack's layout (qmatvec.c). Every
   field is 64-bit so the ctypes mirror (decode_block.py) has no padding to get wrong. */
typedef struct {
    int64_t kind, rows, cols, block;
    const void *w;         /* dense weight [rows, cols], or the codes */
    const float *absmax;
    const void *oidx;      /* outlier table (k entries), or NULL */
    int64_t oidx64, oval_dtype, k;
    const void *oval;
    const void *bias;      /* [rows] in the activation dtype, or NULL */
} lp_linear_t;

typedef struct {
    int64_t hidden, n_heads, n_kv, head_dim, inter, bf16, qk_norm;
    double eps, scale;
    const void *attn_norm, *mlp_norm, *q_norm, *k_norm; /* [hidden] / [head_dim] in the activation dtype */
    lp_linear_t q, k, v;   /* fused q/k/v: q has all (H + 2 KV) * D rows, k and v are LIN_NONE */
    lp_linear_t o, gate, up; /* fused gate/up: gate has 2 * inter rows, up is LIN_NONE */
    lp_linear_t down;
    int64_t gemma; /* Gemma 3: (1 + w) norms in float32 rounded once, post-attention and post-MLP norms, GELU (tanh) */
    const void *attn_post_norm, *mlp_post_norm;
} lp_block_t;

static inline uint16_t bf16_of(float f) { /* round to nearest even, as torch converts (finite values) */
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFF + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

static inline float f32_of(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Activation buffers hold bfloat16 (bf16 != 0) or float32 values. */
static inline float ld(const void *p, int64_t i, int bf16) {
    return bf16 ? f32_of(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void st(void *p, int64_t i, float v, int bf16) {
    if (bf16) ((uint16_t *)p)[i] = bf16_of(v);
    else ((float *)p)[i] = v;
}

/* A value as the activation dtype holds it (rounded to bfloat16, or unchanged). */
static inline float rnd(float v, int bf16) { return bf16 ? f32_of(bf16_of(v)) : v; }

/* Dense bfloat16 weights against up to LP_BF16_BATCH activation rows (a batched step's rows, a short
   prefill): each load of the weight serves every row, where one lp_bf16_matvec per row reads the
   weight once per row (and torch's bf16 GEMM at 8 rows ran at ~23 G multiply-adds/s here). Every
   (weight row, activation row) result has the operations, in the order, that lp_bf16_matvec gives
   that activation row alone (qmatvec.c bf16_rows, one row a pass: two accumulators over 64-column
   steps, a 32-column step into the first, their sum reduced, then the scalar tail), so a row's bits
   do not depend on the rows beside it; tests/kernels/test_bf16_rows.py checks them against it. */
#define LP_BF16_BATCH 8
int64_t lp_bf16_batch_max(void) { return LP_BF16_BATCH; }

void lp_bf16_matmat(const uint16_t *w, int64_t rows, int64_t cols, const uint16_t *x, int64_t B, void *y_out, int bf16,
                    int nthreads) {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    if (B >= 1 && B <= LP_BF16_BATCH) {
        int64_t work = rows * cols * B / 2, nt = nthreads < 1 ? 1 : nthreads;
        if (work < (1 << 18)) nt = 1;
#pragma omp parallel for schedule(static) num_threads((int)nt)
        for (int64_t r = 0; r < rows; r++) {
            const uint16_t *wr = w + r * cols;
            __m512 a0[LP_BF16_BATCH], a1[LP_BF16_BATCH];
            for (int64_t b = 0; b < B; b++) a0[b] = a1[b] = _mm512_setzero_ps();
            int64_t i = 0;
            for (; i + 64 <= cols; i += 64) {
                __m512bh w0 = (__m512bh)_mm512_loadu_si512((const void *)(wr + i));
                __m512bh w1 = (__m512bh)_mm512_loadu_si512((const void *)(wr + i + 32));
                for (int64_t b = 0; b < B; b++) {
                    const uint16_t *xb = x + b * cols + i;
                    a0[b] = _mm512_dpbf16_ps(a0[b], w0, (__m512bh)_mm512_loadu_si512((const void *)xb));
                    a1[b] = _mm512_dpbf16_ps(a1[b], w1, (__m512bh)_mm512_loadu_si512((const void *)(xb + 32)));
                }
            }
            for (; i + 32 <= cols; i += 32) {
                __m512bh w0 = (__m512bh)_mm512_loadu_si512((const void *)(wr + i));
                for (int64_t b = 0; b < B; b++)
                    a0[b] = _mm512_dpbf16_ps(a0[b], w0, (__m512bh)_mm512_loadu_si512((const void *)(x + b * cols + i)));
            }
            for (int64_t b = 0; b < B; b++) {
                float out = _mm512_reduce_add_ps(_mm512_add_ps(a0[b], a1[b])), tail = 0.0f;
                for (int64_t c = i; c < cols; c++) tail += f32_of(wr[c]) * f32_of(x[b * cols + c]);
                out += tail;
                if (bf16) ((uint16_t *)y_out)[b * rows + r] = bf16_of(out);
                else ((float *)y_out)[b * rows + r] = out;
            }
        }
        return;
    }
#endif
    /* other CPUs (or more rows): one GEMV per row, the same bits */
    for (int64_t b = 0; b < B; b++)
        lp_bf16_matvec(w, rows, cols, x + b * cols, (char *)y_out + b * rows * (bf16 ? 2 : 4), bf16, nthreads);
}

/* y [R, rows] = x [R, cols] @ W.T (+ bias), activation dtype; tmp: rows floats of room. */
static void linear(const lp_linear_t *L, const void *x, void *y, int64_t R, int bf16, float *tmp, int nthreads) {
    const void *oidx = L->k ? L->oidx : NULL;
    const int64_t es = bf16 ? 2 : 4;
    switch (L->kind) {
    case LIN_NF4:
        lp_nf4_matvec((const uint8_t *)L->w, L->absmax, L->rows, L->cols, L->block, x, R, y, oidx, (int)L->oidx64,
                      L->oval, (int)L->oval_dtype, L->k, nthreads, bf16);
        break;
    case LIN_INT8:
        lp_int8_matvec((const int8_t *)L->w, L->absmax, L->rows, L->cols, L->block, x, R, y, oidx, (int)L->oidx64,
                       L->oval, (int)L->oval_dtype, L->k, nthreads, bf16);
        break;
    default: /* LIN_BF16 (checked by the caller: bfloat16 activations only, at most LP_BF16_BATCH rows) */
        if (!L->bias && R > 1) {
            lp_bf16_matmat((const uint16_t *)L->w, L->rows, L->cols, (const uint16_t *)x, R, y, 1, nthreads);
            return;
        }
        for (int64_t r = 0; r < R; r++) { /* one row, or a bias: row by row (a float32 result per row) */
            const uint16_t *xr = (const uint16_t *)x + r * L->cols;
            uint16_t *yr = (uint16_t *)y + r * L->rows;
            if (L->bias) { /* as F.linear: the bias added in float32, then rounded once */
                lp_bf16_matvec((const uint16_t *)L->w, L->rows, L->cols, xr, tmp, 0, nthreads);
                for (int64_t j = 0; j < L->rows; j++) yr[j] = bf16_of(tmp[j] + ld(L->bias, j, 1));
            } else {
                lp_bf16_matvec((const uint16_t *)L->w, L->rows, L->cols, xr, yr, 1, nthreads);
            }
        }
        return;
    }
    if (L->bias) /* as QuantWeight.linear: y.add_(bias) on the rounded product */
        for (int64_t r = 0; r < R; r++)
            for (int64_t j = 0; j < L->rows; j++)
                st(y, r * L->rows + j, ld(y, r * L->rows + j, bf16) + ld(L->bias, j, bf16), bf16);
}

/* transformers' RMSNorm as models/llama.py computes it: normalised in float32, rounded to the
   activation dtype, then multiplied by the weight in that dtype. Gemma's (gemma3.rms_norm): times
   (1 + w) in float32, rounded once. */
static void rms_norm(const void *x, const void *w, int64_t n, double eps, void *out, int bf16, int gemma) {
    float ss = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        float v = ld(x, i, bf16);
        ss += v * v;
    }
    float r = 1.0f / sqrtf(ss / (float)n + (float)eps);
    if (gemma)
        for (int64_t i = 0; i < n; i++) st(out, i, (ld(x, i, bf16) * r) * (1.0f + ld(w, i, bf16)), bf16);
    else
        for (int64_t i = 0; i < n; i++) st(out, i, ld(w, i, bf16) * rnd(ld(x, i, bf16) * r, bf16), bf16);
}

/* GELU, tanh approximation, as torch computes it in float32 */
static inline float gelu_tanh(float x) {
    const float beta = 0.7978845608028654f, kappa = 0.044715f;
    return 0.5f * x * (1.0f + tanhf(beta * (x + kappa * x * x * x)));
}

/* Rotary embedding of one head in place: x * cos + roll(x, D/2) * signed_sin, each product and the
   sum rounded as torch rounds them (llama.rope). */
static void rope(void *x, int64_t off, int64_t d, const void *cos, const void *ssin, int bf16) {
    float tmp[1024];
    int64_t half = d / 2;
    for (int64_t i = 0; i < d; i++) tmp[i] = ld(x, off + i, bf16);
    for (int64_t i = 0; i < d; i++) {
        float a = rnd(tmp[i] * ld(cos, i, bf16), bf16);
        float b = rnd(tmp[(i + half) % d] * ld(ssin, i, bf16), bf16);
        st(x, off + i, a + b, bf16);
    }
}

static inline float dot_row(const float *q, const void *k, int64_t d, int bf16) {
#if defined(__AVX512F__)
    if (d % 16 == 0) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t i = 0; i < d; i += 16) {
            __m512 kv = bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(
                                   _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)k + i))), 16))
                             : _mm512_loadu_ps((const float *)k + i);
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), kv, acc);
        }
        return _mm512_reduce_add_ps(acc);
    }
#endif
    float s = 0.0f;
    for (int64_t i = 0; i < d; i++) s += q[i] * ld(k, i, bf16);
    return s;
}

static inline void axpy_row(float *acc, float p, const void *v, int64_t d, int bf16) {
#if defined(__AVX512F__)
    if (d % 16 == 0) {
        __m512 pp = _mm512_set1_ps(p);
        for (int64_t i = 0; i < d; i += 16) {
            __m512 vv = bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(
                                   _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)v + i))), 16))
                             : _mm512_loadu_ps((const float *)v + i);
            _mm512_storeu_ps(acc + i, _mm512_fmadd_ps(pp, vv, _mm512_loadu_ps(acc + i)));
        }
        return;
    }
#endif
    for (int64_t i = 0; i < d; i++) acc[i] += p * ld(v, i, bf16);
}

/* Scratch bytes the block needs for R rows (decode_block.py allocates it once and reuses it). */
int64_t lp_decode_block_scratch(const lp_block_t *b, int64_t R, int64_t max_len, int nthreads) {
    int64_t nt = nthreads < 1 ? 1 : nthreads;
    int64_t qkv = (b->n_heads + 2 * b->n_kv) * b->head_dim;
    int64_t gu = 2 * b->inter > qkv ? 2 * b->inter : qkv; /* gu also holds unfused q, k, v for a moment */
    int64_t acts = R * (2 * b->hidden + qkv + b->n_heads * b->head_dim + gu + b->inter); /* floats even for bf16 */
    int64_t tmp = qkv + 2 * b->inter + b->hidden;
    return (acts + tmp) * 4 + nt * (max_len + b->head_dim) * 4 + 64 * 8;
}

/* The block's body for R rows: R tokens of one sequence (firsts == NULL; see lp_llama_decode_block),
   or R independent sequences of one new token each (firsts != NULL; see lp_llama_decode_rows). */
static int block_rows(const lp_block_t *b, int64_t R, const void *h_in, void *h_out, void *kc, void *vc,
                      int64_t max_len, int64_t row_stride, int64_t start, int64_t first, const int64_t *firsts,
                      const uint8_t *mask, const void *cos, const void *ssin, void *scratch, int64_t scratch_bytes,
                      int nthreads) {
    const int bf16 = (int)b->bf16;
    const int64_t es = bf16 ? 2 : 4, bs = 4, H = b->n_heads, KV = b->n_kv, D = b->head_dim, n = b->hidden, I = b->inter;
    const int64_t G = H / KV, QKV = (H + 2 * KV) * D, end = firsts ? start + 1 : start + R, nt = nthreads < 1 ? 1 : nthreads;
    const int gm = (int)b->gemma;
    if (R < 1 || D > 1024 || end > max_len || first < 0 || first > start ||
        scratch_bytes < lp_decode_block_scratch(b, R, max_len, nthreads)) return -1;
    if (firsts)
        for (int64_t r = 0; r < R; r++)
            if (firsts[r] < 0 || firsts[r] > start) return -1;
    char *s = (char *)scratch;
    char *xn = s;               s += R * n * bs;
    char *qkv = s;              s += R * QKV * bs;
    char *att = s;              s += R * H * D * bs;
    char *proj = s;             s += R * n * bs;
    char *gu = s;               s += R * (2 * I > QKV ? 2 * I : QKV) * bs;
    char *act = s;              s += R * I * bs;
    float *tmp = (float *)s;    s += (QKV + 2 * I + n) * 4;
    float *work = (float *)(((uintptr_t)s + 63) & ~(uintptr_t)63); /* per thread: scores [max_len] + output [D] */

    /* attention: h + o(attn(norm(h))) */
    for (int64_t r = 0; r < R; r++)
        rms_norm((const char *)h_in + r * n * es, b->attn_norm, n, b->eps, xn + r * n * es, bf16, gm);
    if (b->k.kind == LIN_NONE) {
        linear(&b->q, xn, qkv, R, bf16, tmp, nthreads);
    } else { /* separate q, k, v: each into its own region, then interleaved per row as the fused layout */
        char *q = gu, *k = gu + R * H * D * es, *v = k + R * KV * D * es; /* gu is free until the MLP */
        linear(&b->q, xn, q, R, bf16, tmp, nthreads);
        linear(&b->k, xn, k, R, bf16, tmp, nthreads);
        linear(&b->v, xn, v, R, bf16, tmp, nthreads);
        for (int64_t r = 0; r < R; r++) {
            memcpy(qkv + r * QKV * es, q + r * H * D * es, H * D * es);
            memcpy(qkv + (r * QKV + H * D) * es, k + r * KV * D * es, KV * D * es);
            memcpy(qkv + (r * QKV + (H + KV) * D) * es, v + r * KV * D * es, KV * D * es);
        }
    }
    for (int64_t r = 0; r < R; r++) {
        char *row = qkv + r * QKV * es;
        const char *c = (const char *)cos + r * D * es, *sn = (const char *)ssin + r * D * es;
        for (int64_t hd = 0; hd < H + KV; hd++) {
            if (b->qk_norm) {
                const void *w = hd < H ? b->q_norm : b->k_norm;
                rms_norm(row + hd * D * es, w, D, b->eps, row + hd * D * es, bf16, gm);
            }
            rope(row, hd * D, D, c, sn, bf16);
        }
        /* the row's key and value into column start + r (one sequence), or into column start of its
           own cache row (independent sequences) */
        const int64_t col = firsts ? start : start + r, base = firsts ? r * row_stride : 0;
        for (int64_t g = 0; g < KV; g++) {
            memcpy((char *)kc + (base + (g * max_len + col) * D) * es, row + (H + g) * D * es, D * es);
            memcpy((char *)vc + (base + (g * max_len + col) * D) * es, row + (H + KV + g) * D * es, D * es);
        }
    }
    const int64_t work_items = R * H;
    int ta = (work_items * (end - first) * D >= (1 << 16) && nt > 1) ? (int)(nt < work_items ? nt : work_items) : 1;
#pragma omp parallel for schedule(static) num_threads(ta)
    for (int64_t it = 0; it < work_items; it++) {
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        const int64_t r = it / H, hq = it % H, g = hq / G;
        float *sc = work + tid * (max_len + D), *out = sc + max_len, q[1024];
        const int64_t base = firsts ? r * row_stride : 0;
        const char *kg = (const char *)kc + (base + g * max_len * D) * es, *vg = (const char *)vc + (base + g * max_len * D) * es;
        const uint8_t *mr = mask && !firsts ? mask + r * end : NULL;
        const int64_t c0 = firsts ? firsts[r] : mask ? 0 : first, c1 = firsts ? start + 1 : mask ? end : start + r + 1;
        for (int64_t i = 0; i < D; i++) q[i] = ld(qkv, r * QKV + hq * D + i, bf16);
        float m = -INFINITY;
        for (int64_t t = c0; t < c1; t++) {
            if (mr && !mr[t]) continue;
            sc[t] = dot_row(q, kg + t * D * es, D, bf16) * (float)b->scale;
            if (sc[t] > m) m = sc[t];
        }
        float sum = 0.0f;
        memset(out, 0, D * sizeof(float));
        for (int64_t t = c0; t < c1; t++) {
            if (mr && !mr[t]) continue;
            float p = expf(sc[t] - m);
            sum += p;
            axpy_row(out, p, vg + t * D * es, D, bf16);
        }
        for (int64_t i = 0; i < D; i++) st(att, r * H * D + hq * D + i, out[i] / sum, bf16);
    }
    linear(&b->o, att, proj, R, bf16, tmp, nthreads);
    for (int64_t r = 0; r < R; r++) {
        char *pr = proj + r * n * es;
        if (gm) rms_norm(pr, b->attn_post_norm, n, b->eps, pr, bf16, 1);
        for (int64_t i = 0; i < n; i++)
            st(h_out, r * n + i, ld(h_in, r * n + i, bf16) + ld(pr, i, bf16), bf16);
        rms_norm((const char *)h_out + r * n * es, b->mlp_norm, n, b->eps, xn + r * n * es, bf16, gm);
    }

    /* MLP: h + down(act(gate(norm(h))) * up(norm(h))), SiLU (GELU-tanh for Gemma) */
    /* fused: per row [gate | up]; separate: gate rows [R, I], then up rows [R, I] */
    const int fused = b->up.kind == LIN_NONE;
    const int64_t gstride = fused ? 2 * I : I, up0 = fused ? I : R * I;
    linear(&b->gate, xn, gu, R, bf16, tmp, nthreads);
    if (!fused) linear(&b->up, xn, gu + R * I * es, R, bf16, tmp, nthreads);
    for (int64_t r = 0; r < R; r++)
        for (int64_t i = 0; i < I; i++) {
            float gv = ld(gu, r * gstride + i, bf16);
            float sv = rnd(gm ? gelu_tanh(gv) : gv / (1.0f + expf(-gv)), bf16);
            st(act, r * I + i, sv * ld(gu, up0 + r * gstride + i, bf16), bf16);
        }
    linear(&b->down, act, proj, R, bf16, tmp, nthreads);
    for (int64_t r = 0; r < R; r++) {
        char *pr = proj + r * n * es;
        if (gm) rms_norm(pr, b->mlp_post_norm, n, b->eps, pr, bf16, 1);
        for (int64_t i = 0; i < n; i++) st(h_out, r * n + i, ld(h_out, r * n + i, bf16) + ld(pr, i, bf16), bf16);
    }
    return 0;
}

/* h_out = block(h_in) for R new tokens of one sequence at cache columns start .. start + R - 1 (their
   keys and values are written there). Row r attends to columns [first, start + r] (causal; first > 0
   under a sliding window), or, with a mask [R, start + R] (1 = may attend: a token tree's ancestors,
   a window), to the columns its mask row allows. kc, vc: this block's cache [KV, max_len, D] in the
   activation dtype. cos, ssin: the rows' rotary tables [R, D] (llama.Step's cos and sin_signed).
   Returns 0, or -1 when the scratch is too small or an argument is out of range (nothing written). */
int lp_llama_decode_block(const lp_block_t *b, int64_t R, const void *h_in, void *h_out, void *kc, void *vc,
                          int64_t max_len, int64_t start, int64_t first, const uint8_t *mask, const void *cos,
                          const void *ssin, void *scratch, int64_t scratch_bytes, int nthreads) {
    return block_rows(b, R, h_in, h_out, kc, vc, max_len, 0, start, first, NULL, mask, cos, ssin, scratch, scratch_bytes,
                      nthreads);
}

/* The same block for R independent sequences of one new token each (a batched decode step: the
   serving engine's slots, a padded batch): row r's cache is kc/vc + r * row_stride elements ([KV,
   max_len, D] each, rows of one [R, KV, max_len, D] tensor), its new key and value go to column
   `start` (the column timeline the rows share), and it attends to columns [firsts[r], start] - its
   own tokens, right-aligned (left padding or an empty slot's columns before firsts[r]; a sliding
   window narrows the range the same way). The projections take all R rows at once (qmatvec.c's
   batched tiles, as the per-op path's); everything else is per row, as for one sequence. */
int lp_llama_decode_rows(const lp_block_t *b, int64_t R, const void *h_in, void *h_out, void *kc, void *vc,
                         int64_t max_len, int64_t row_stride, int64_t start, const int64_t *firsts, const void *cos,
                         const void *ssin, void *scratch, int64_t scratch_bytes, int nthreads) {
    if (!firsts || row_stride < 0) return -1;
    return block_rows(b, R, h_in, h_out, kc, vc, max_len, row_stride, start, 0, firsts, NULL, cos, ssin, scratch,
                      scratch_bytes, nthreads);
}
