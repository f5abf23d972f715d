/* Quantized matrix-vector products and dequantization for layerpack's NF4 and int8 weights, on CPU.

   Plain C with no Python or torch headers: it compiles in about a second at first use
   (kernels/__init__.py) with -march=native, and is called through ctypes, which releases the GIL.
   Threads come from OpenMP; the library links libgomp.so.1 by soname, so inside a process that has
   imported torch it shares torch's own OpenMP runtime and thread pool (no second pool to fight).

   Layouts are the pack's, unchanged (docs/FORMAT.md): the weight [rows, cols] is flattened row-major
   and split into blocks of `block` elements with one float32 absmax each.
     NF4:  two codes per byte, the first element in the high nibble (bitsandbytes' order);
           value = NF4[code] * absmax.
     int8: one signed code per element; value = code * (absmax / 127).
   Every weight value is formed exactly as the reference dequantization forms it (one float32
   product), so results differ from dequantize-then-matmul only in summation order.

   The caller checks what the kernels assume: NF4 needs an even number of columns and an even
   block size (segments are whole bytes); int8 takes any layout. Outlier corrections are separate
   (lp_outliers_matvec): the block codes at outlier positions dequantize to exactly 0.

   Non-uniform 4-bit values are looked up with a 16-entry in-register table (one permute per 16
   codes with AVX-512, two plus a blend with AVX2), the per-block scale folded into the table,
   so no dequantized copy of the weight is ever written: the same idea as llama.cpp's IQ4_NL dot
   products, but in float32 so the result equals the reference within rounding.

   Batches of 2..8 activation rows (the serving engine's decode steps) decode each chunk of codes
   once for every row and are bound by the multiply-adds, not the weight bytes (nf4_rows_tiled).
   With bfloat16 activations on a CPU with AVX512-BF16 they multiply the chunk rounded to bfloat16
   (the weights a bf16 prefill multiplies) with VDPBF16PS, twice the products per instruction
   (nf4_rows_tiled_dot).

   One activation row (a decode step) is bound by instructions per weight and by how well the
   weight bytes stream in: the one-row kernels (nf4_rows_bf16, nf4_rows_f32, int8_rows_whole) take
   several weight rows per pass, so each load of x serves them all, from as many long sequential
   streams, each prefetched ahead (ROW1_DRIVER), and with bfloat16 activations NF4 looks NF4[c]
   up as bfloat16 with VPERMW, multiplies with VDPBF16PS and scales each block's sum by its absmax
   (nf4_rows_bf16: 13 instructions per 128 weights; the weights NF4[c] * absmax to within
   bfloat16's rounding of NF4[c], not the bf16 dequantization's bits). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define INT8_QMAX 127.0f
#define MAX_TILE 8 /* activation rows sharing one decode of the weights */
#define ALWAYS_INLINE static inline __attribute__((always_inline))
/* Calls F(..., nb, out) with nb as a constant, so each tile size gets its own inlined copy whose
   accumulators stay in registers. */
#define WITH_CONST_NB(F, nb, ...)                 \
    switch (nb) {                                 \
    case 1: F(__VA_ARGS__, 1, out); break;        \
    case 2: F(__VA_ARGS__, 2, out); break;        \
    case 3: F(__VA_ARGS__, 3, out); break;        \
    case 4: F(__VA_ARGS__, 4, out); break;        \
    case 5: F(__VA_ARGS__, 5, out); break;        \
    case 6: F(__VA_ARGS__, 6, out); break;        \
    case 7: F(__VA_ARGS__, 7, out); break;        \
    default: F(__VA_ARGS__, 8, out); break;       \
    }

static const float NF4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f,
};

const char *lp_isa(void) {
#if defined(__AVX512F__)
    return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
    return "avx2";
#else
    return "scalar";
#endif
}

int lp_abi_version(void) { return 3; }

static int threads_for(int64_t work, int nthreads) {
    /* A parallel region costs a few microseconds; below ~256K weights one thread is faster. */
    if (nthreads < 1) return 1;
    int64_t by_work = work / (1 << 18);
    if (by_work < 1) return 1;
    return by_work < nthreads ? (int)by_work : nthreads;
}

/* A weight row is a run of segments, one per block it overlaps: a block straddles two rows when
   cols is not a multiple of the block size (SmolLM2's 576 columns with int8's block of 128).
   SEGMENTS runs BODY once per segment with: j..end (the segment's columns), flat (its first flat
   index) and s (its block's absmax). Consecutive segments are consecutive blocks, so the block
   index is counted, not divided out per segment (a 64-bit division per 64 weights cost ~1/3 of
   the NF4 decode time). */
#define SEGMENTS(...)                                                    \
    for (int64_t j = 0, k = flat0 / block; j < cols; k++) {              \
        int64_t flat = flat0 + j;                                        \
        int64_t end = (k + 1) * block - flat0;                           \
        if (end > cols) end = cols;                                      \
        float s = absmax[k];                                             \
        __VA_ARGS__;                                                     \
        j = end;                                                         \
    }

#if defined(__AVX2__) && !defined(__AVX512F__)
static inline float hsum256(__m256 v) {
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    q = _mm_add_ss(q, _mm_movehdup_ps(q));
    return _mm_cvtss_f32(q);
}
#endif

/* ---- NF4 ----
   One weight row (flat indices flat0 .. flat0 + cols; flat0, cols and block even, so segments are
   whole bytes) against nb (<= MAX_TILE) activation rows, deinterleaved: xe[b] = x[b][0::2] pairs
   with the high nibbles, xo[b] = x[b][1::2] with the low ones. */
#define NF4_SCALAR_TAIL(I0, N, ACC, E, O)                                                        \
    for (int64_t q_ = (I0); q_ < (N); q_++) {                                                    \
        uint8_t byte = c[q_];                                                                    \
        ACC += (NF4[byte >> 4] * s) * (E)[h + q_] + (NF4[byte & 15] * s) * (O)[h + q_];          \
    }

ALWAYS_INLINE void nf4_row(const uint8_t *codes, const float *absmax, int64_t block, int64_t flat0, int64_t cols,
                    const float *const *xe, const float *const *xo, int nb, float *out) {
    float tail[MAX_TILE] = {0};
#if defined(__AVX512F__)
    /* permutexvar_ps reads only the low 4 bits of each index lane: no masking of the nibbles */
    const __m512 tab = _mm512_loadu_ps(NF4);
    if (nb == 1) { /* decode: four independent accumulators keep the FMA pipes busy */
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
        const float *e = xe[0], *o = xo[0];
        if (block % 64 == 0 && cols % block == 0) {
            /* rows of whole blocks of whole 32-byte steps (NF4's default block of 64 on every model
               width): the same operations in the same order as the general loop below, without its
               per-segment bookkeeping, which cost as much as the arithmetic at 64 weights a block */
            const uint8_t *c = codes + (flat0 >> 1);
            const float *sc = absmax + flat0 / block;
            const int64_t steps = block / 64, nblk = cols / block;
            for (int64_t kb = 0, h = 0; kb < nblk; kb++) {
                __m512 t = _mm512_mul_ps(tab, _mm512_set1_ps(sc[kb]));
                for (int64_t q = 0; q < steps; q++, h += 32) {
                    __m512i v0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(c + h)));
                    __m512i v1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(c + h + 16)));
                    a0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v0, 4), t), _mm512_loadu_ps(e + h), a0);
                    a1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(v0, t), _mm512_loadu_ps(o + h), a1);
                    a2 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v1, 4), t), _mm512_loadu_ps(e + h + 16), a2);
                    a3 = _mm512_fmadd_ps(_mm512_permutexvar_ps(v1, t), _mm512_loadu_ps(o + h + 16), a3);
                }
            }
            out[0] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3))) + tail[0];
            return;
        }
        SEGMENTS({
            __m512 t = _mm512_mul_ps(tab, _mm512_set1_ps(s));
            const uint8_t *c = codes + (flat >> 1);
            int64_t h = j >> 1, n = (end - j) >> 1, i = 0;
            for (; i + 32 <= n; i += 32) {
                __m512i v0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(c + i)));
                __m512i v1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(c + i + 16)));
                a0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v0, 4), t), _mm512_loadu_ps(e + h + i), a0);
                a1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(v0, t), _mm512_loadu_ps(o + h + i), a1);
                a2 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v1, 4), t), _mm512_loadu_ps(e + h + i + 16), a2);
                a3 = _mm512_fmadd_ps(_mm512_permutexvar_ps(v1, t), _mm512_loadu_ps(o + h + i + 16), a3);
            }
            for (; i + 16 <= n; i += 16) {
                __m512i v0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(c + i)));
                a0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v0, 4), t), _mm512_loadu_ps(e + h + i), a0);
                a1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(v0, t), _mm512_loadu_ps(o + h + i), a1);
            }
            NF4_SCALAR_TAIL(i, n, tail[0], e, o)
        })
        out[0] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3))) + tail[0];
        return;
    }
    __m512 acc[MAX_TILE];
    for (int b = 0; b < nb; b++) acc[b] = _mm512_setzero_ps();
    SEGMENTS({
        __m512 t = _mm512_mul_ps(tab, _mm512_set1_ps(s));
        const uint8_t *c = codes + (flat >> 1);
        int64_t h = j >> 1, n = (end - j) >> 1, i = 0;
        for (; i + 16 <= n; i += 16) {
            __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(c + i)));
            __m512 whi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), t), wlo = _mm512_permutexvar_ps(v, t);
            for (int b = 0; b < nb; b++) {
                acc[b] = _mm512_fmadd_ps(whi, _mm512_loadu_ps(xe[b] + h + i), acc[b]);
                acc[b] = _mm512_fmadd_ps(wlo, _mm512_loadu_ps(xo[b] + h + i), acc[b]);
            }
        }
        for (int b = 0; b < nb; b++) { NF4_SCALAR_TAIL(i, n, tail[b], xe[b], xo[b]) }
    })
    for (int b = 0; b < nb; b++) out[b] = _mm512_reduce_add_ps(acc[b]) + tail[b];
#elif defined(__AVX2__) && defined(__FMA__)
    /* permutevar8x32 uses the low 3 bits; bit 3, moved to the sign bit, picks the table half */
    const __m256 tab_lo = _mm256_loadu_ps(NF4), tab_hi = _mm256_loadu_ps(NF4 + 8);
    __m256 acc[MAX_TILE], acc2[MAX_TILE];
    for (int b = 0; b < nb; b++) acc[b] = acc2[b] = _mm256_setzero_ps();
    SEGMENTS({
        __m256 sv = _mm256_set1_ps(s);
        __m256 t0 = _mm256_mul_ps(tab_lo, sv), t1 = _mm256_mul_ps(tab_hi, sv);
        const uint8_t *c = codes + (flat >> 1);
        int64_t h = j >> 1, n = (end - j) >> 1, i = 0;
        for (; i + 8 <= n; i += 8) {
            __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(c + i)));
            __m256i hi = _mm256_srli_epi32(v, 4);
            __m256 whi = _mm256_blendv_ps(_mm256_permutevar8x32_ps(t0, hi), _mm256_permutevar8x32_ps(t1, hi),
                                          _mm256_castsi256_ps(_mm256_slli_epi32(hi, 28)));
            __m256 wlo = _mm256_blendv_ps(_mm256_permutevar8x32_ps(t0, v), _mm256_permutevar8x32_ps(t1, v),
                                          _mm256_castsi256_ps(_mm256_slli_epi32(v, 28)));
            for (int b = 0; b < nb; b++) {
                acc[b] = _mm256_fmadd_ps(whi, _mm256_loadu_ps(xe[b] + h + i), acc[b]);
                acc2[b] = _mm256_fmadd_ps(wlo, _mm256_loadu_ps(xo[b] + h + i), acc2[b]);
            }
        }
        for (int b = 0; b < nb; b++) { NF4_SCALAR_TAIL(i, n, tail[b], xe[b], xo[b]) }
    })
    for (int b = 0; b < nb; b++) out[b] = hsum256(_mm256_add_ps(acc[b], acc2[b])) + tail[b];
#else
    SEGMENTS({
        const uint8_t *c = codes + (flat >> 1);
        int64_t h = j >> 1, n = (end - j) >> 1;
        for (int b = 0; b < nb; b++) { NF4_SCALAR_TAIL(0, n, tail[b], xe[b], xo[b]) }
    })
    for (int b = 0; b < nb; b++) out[b] = tail[b];
#endif
}

/* ---- int8: one weight row against nb activation rows; any block size ---- */
#define INT8_SCALAR_TAIL(I0, N, ACC, X)                                               \
    for (int64_t q_ = (I0); q_ < (N); q_++) ACC += ((float)c[q_] * sc) * (X)[j + q_];

ALWAYS_INLINE void int8_row(const int8_t *codes, const float *absmax, int64_t block, int64_t flat0, int64_t cols,
                     const float *const *xr, int nb, float *out) {
    float tail[MAX_TILE] = {0};
#if defined(__AVX512F__)
    if (nb == 1) { /* decode: two independent accumulators */
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        const float *xv = xr[0];
        SEGMENTS({
            float sc = s / INT8_QMAX;
            __m512 sv = _mm512_set1_ps(sc);
            const int8_t *c = codes + flat;
            int64_t n = end - j, i = 0;
            for (; i + 32 <= n; i += 32) {
                __m512 w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(c + i)))), sv);
                __m512 w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(c + i + 16)))), sv);
                a0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xv + j + i), a0);
                a1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xv + j + i + 16), a1);
            }
            for (; i + 16 <= n; i += 16) {
                __m512 w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(c + i)))), sv);
                a0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xv + j + i), a0);
            }
            INT8_SCALAR_TAIL(i, n, tail[0], xv)
        })
        out[0] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) + tail[0];
        return;
    }
    __m512 acc[MAX_TILE];
    for (int b = 0; b < nb; b++) acc[b] = _mm512_setzero_ps();
    SEGMENTS({
        float sc = s / INT8_QMAX;
        __m512 sv = _mm512_set1_ps(sc);
        const int8_t *c = codes + flat;
        int64_t n = end - j, i = 0;
        for (; i + 16 <= n; i += 16) {
            __m512 w = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(c + i)))), sv);
            for (int b = 0; b < nb; b++) acc[b] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xr[b] + j + i), acc[b]);
        }
        for (int b = 0; b < nb; b++) { INT8_SCALAR_TAIL(i, n, tail[b], xr[b]) }
    })
    for (int b = 0; b < nb; b++) out[b] = _mm512_reduce_add_ps(acc[b]) + tail[b];
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 acc[MAX_TILE];
    for (int b = 0; b < nb; b++) acc[b] = _mm256_setzero_ps();
    SEGMENTS({
        float sc = s / INT8_QMAX;
        __m256 sv = _mm256_set1_ps(sc);
        const int8_t *c = codes + flat;
        int64_t n = end - j, i = 0;
        for (; i + 8 <= n; i += 8) {
            __m256 w = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(c + i)))), sv);
            for (int b = 0; b < nb; b++) acc[b] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xr[b] + j + i), acc[b]);
        }
        for (int b = 0; b < nb; b++) { INT8_SCALAR_TAIL(i, n, tail[b], xr[b]) }
    })
    for (int b = 0; b < nb; b++) out[b] = hsum256(acc[b]) + tail[b];
#else
    SEGMENTS({
        float sc = s / INT8_QMAX;
        const int8_t *c = codes + flat;
        int64_t n = end - j;
        for (int b = 0; b < nb; b++) { INT8_SCALAR_TAIL(0, n, tail[b], xr[b]) }
    })
    for (int b = 0; b < nb; b++) out[b] = tail[b];
#endif
}

static inline uint16_t to_bf16(float f) {
    /* round to nearest even, as torch converts (values here are finite) */
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFF + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

static inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* ---- outlier values: float32 (vdt 0), bfloat16 (1) or float16 (2) ---- */
static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, f;
    if (exp == 0) {
        if (man == 0) f = sign;
        else { /* subnormal: renormalise */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            f = sign | (exp << 23) | ((man & 0x3FF) << 13);
        }
    } else if (exp == 31) f = sign | 0x7F800000u | (man << 13);
    else f = sign | ((exp + 127 - 15) << 23) | (man << 13);
    float out;
    memcpy(&out, &f, 4);
    return out;
}

static float value_at(const void *val, int vdt, int64_t i) {
    if (vdt == 0) return ((const float *)val)[i];
    uint16_t h = ((const uint16_t *)val)[i];
    if (vdt == 2) return half_to_float(h);
    uint32_t f = (uint32_t)h << 16;
    float out;
    memcpy(&out, &f, 4);
    return out;
}

/* An outlier table: k ascending flat indices (int32 or int64) and their values. */
typedef struct {
    const void *idx;
    int idx64;
    const void *val;
    int vdt;
    int64_t k;
} outliers_t;

static inline int64_t outlier_at(const outliers_t *o, int64_t i) {
    return o->idx64 ? ((const int64_t *)o->idx)[i] : (int64_t)((const int32_t *)o->idx)[i];
}

static int64_t first_outlier_from(const outliers_t *o, int64_t flat) {
    int64_t lo = 0, hi = o->k;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        if (outlier_at(o, mid) < flat) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

/* Both matvecs share this driver: each thread takes a contiguous run of weight rows, finds the
   first outlier of its run once, and adds each row's outliers (x[b, c] * value) to that row's dot
   products as it goes, so the sparse correction is parallel and reads its table sequentially.
   ROW(nb, out) computes the dot products of row r with activation rows b0 .. b0 + nb. */
#define MATVEC_DRIVER(...)                                                                         \
    int nt = threads_for(rows * cols * (batch < MAX_TILE ? batch : MAX_TILE), nthreads);          \
    _Pragma("omp parallel num_threads(nt)")                                                        \
    {                                                                                              \
        int t = 0, T = 1;                                                                          \
        THREAD_IDS(t, T);                                                                          \
        int64_t r_begin = rows * t / T, r_end = rows * (t + 1) / T;                                \
        int64_t oi = o.k ? first_outlier_from(&o, r_begin * cols) : 0;                             \
        for (int64_t r = r_begin; r < r_end; r++) {                                                \
            int64_t row0 = r * cols, oj = oi;                                                      \
            for (int64_t b0 = 0; b0 < batch; b0 += MAX_TILE) {                                     \
                int nb = (int)(batch - b0 < MAX_TILE ? batch - b0 : MAX_TILE);                     \
                float out[MAX_TILE];                                                               \
                __VA_ARGS__;                                                                       \
                for (oj = oi; oj < o.k; oj++) {                                                    \
                    int64_t c = outlier_at(&o, oj) - row0;                                         \
                    if (c >= cols) break;                                                          \
                    if (c < 0) continue; /* out of order: never read out of range */              \
                    float v = value_at(o.val, o.vdt, oj);                                          \
                    for (int b = 0; b < nb; b++) out[b] += v * x[(b0 + b) * cols + c];             \
                }                                                                                  \
                for (int b = 0; b < nb; b++) {                                                     \
                    if (y16) y16[(b0 + b) * rows + r] = to_bf16(out[b]);                           \
                    else y[(b0 + b) * rows + r] = out[b];                                          \
                }                                                                                  \
            }                                                                                      \
            oi = oj;                                                                               \
        }                                                                                          \
    }

#ifdef _OPENMP
#include <omp.h>
#define THREAD_IDS(t, T) (t = omp_get_thread_num(), T = omp_get_num_threads())
#else
#define THREAD_IDS(t, T) ((void)0)
#endif

/* Activations and results in float32 (bf16 == 0) or bfloat16 (bf16 == 1): a bfloat16 x is
   widened once (exact), and a bfloat16 y rounded to nearest even, as torch's .to(bfloat16) does,
   so the caller's two conversions and their allocations are saved with the same bits.
   Returns an fp32 copy of x (or x itself), NULL when out of memory. */
static const float *x_as_float(const void *x_in, int64_t n, int bf16, float **owned) {
    *owned = NULL;
    if (!bf16) return (const float *)x_in;
    float *xf = (float *)malloc(sizeof(float) * (size_t)(n > 0 ? n : 1));
    if (!xf) return NULL;
    const uint16_t *xh = (const uint16_t *)x_in;
    for (int64_t i = 0; i < n; i++) xf[i] = from_bf16(xh[i]);
    *owned = xf;
    return xf;
}

#if defined(__AVX512F__)
/* The batched rows' fast path (nb > 1; rows of whole blocks, blocks of whole 16-byte chunks: NF4's
   default block of 64 on every model width). The activations come tiled (nf4_tile_x): for each
   chunk of 32 columns, the nb rows' 16 even-column values (the high nibbles' partners) then their
   16 odd-column ones, consecutively - so every load of the inner loop is one base pointer plus a
   constant offset. (With nb separate row pointers, the general path, the 16 pointers of a tile of
   8 did not fit the registers and were reloaded for every chunk.) Two weight rows are computed
   together (NR = 2), so each activation load feeds two FMAs: at 8 rows the loop is bound by the
   FMAs themselves, not by loads. Every (weight row, activation row) pair has one accumulator,
   summed in the same order whatever NR and nb are: a row's result does not depend on which rows
   share its tile or its pair (a fused q/k/v's parts, another thread's share). */
ALWAYS_INLINE void nf4_rows_tiled(const uint8_t *codes, const float *absmax, int64_t block, int64_t flat0, int64_t cols,
                                  const float *xt, int NR, int nb, float out[][MAX_TILE]) {
    const __m512 tab = _mm512_loadu_ps(NF4);
    __m512 acc[2][MAX_TILE];
    for (int w = 0; w < NR; w++)
        for (int b = 0; b < nb; b++) acc[w][b] = _mm512_setzero_ps();
    const uint8_t *c = codes + (flat0 >> 1);
    const float *sc = absmax + flat0 / block;
    const int64_t row_bytes = cols >> 1, row_blocks = cols / block;
    const int64_t chunks = block / 32, nblk = cols / block;
    for (int64_t kb = 0; kb < nblk; kb++) {
        __m512 t[2];
        for (int w = 0; w < NR; w++) t[w] = _mm512_mul_ps(tab, _mm512_set1_ps(sc[kb + w * row_blocks]));
        for (int64_t q = 0; q < chunks; q++, c += 16, xt += 32 * nb) {
            __m512 whi[2], wlo[2];
            for (int w = 0; w < NR; w++) {
                __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(c + w * row_bytes)));
                whi[w] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), t[w]);
                wlo[w] = _mm512_permutexvar_ps(v, t[w]);
            }
            for (int b = 0; b < nb; b++) {
                __m512 xe = _mm512_loadu_ps(xt + 32 * b), xo = _mm512_loadu_ps(xt + 32 * b + 16);
                for (int w = 0; w < NR; w++) {
                    acc[w][b] = _mm512_fmadd_ps(whi[w], xe, acc[w][b]);
                    acc[w][b] = _mm512_fmadd_ps(wlo[w], xo, acc[w][b]);
                }
            }
        }
    }
    for (int w = 0; w < NR; w++)
        for (int b = 0; b < nb; b++) out[w][b] = _mm512_reduce_add_ps(acc[w][b]);
}

#if defined(__AVX512BF16__)
/* nf4_rows_tiled for bfloat16 activations (a bf16 model's decode step): each 32-weight chunk is
   rounded to bfloat16 (to nearest even: the weights the dequantize-then-GEMM path, i.e. the
   prefill, multiplies) and multiplied by VDPBF16PS, 32 products per instruction where FMAs do 16:
   at 8 rows the FMAs are the bound, so this halves it. The products of two bfloat16 are exact in
   float32; each pair is added to its float32 accumulator (per lane: acc + p_odd + p_even,
   rounded to nearest even). The activations come tiled by nf4_tile_x16: per chunk and row, the
   16 odd columns' values then the 16 even ones', the order _mm512_cvtne2ps_pbh(whi, wlo) puts the
   weights in. */
ALWAYS_INLINE void nf4_rows_tiled_dot(const uint8_t *codes, const float *absmax, int64_t block, int64_t flat0, int64_t cols,
                                      const uint16_t *xt, int NR, int nb, float out[][MAX_TILE]) {
    const __m512 tab = _mm512_loadu_ps(NF4);
    __m512 acc[2][MAX_TILE];
    for (int w = 0; w < NR; w++)
        for (int b = 0; b < nb; b++) acc[w][b] = _mm512_setzero_ps();
    const uint8_t *c = codes + (flat0 >> 1);
    const float *sc = absmax + flat0 / block;
    const int64_t row_bytes = cols >> 1, row_blocks = cols / block;
    const int64_t chunks = block / 32, nblk = cols / block;
    if (block % 64 == 0) {
        /* blocks of whole 64-weight steps (the default block): the weights are looked up as
           bfloat16 directly, as nf4_rows_bf16 does (VPERMW into the block's table rounded to
           bfloat16: the same weight values), about half the decode work of the chunks below; the
           activations come tiled by nf4_tile_x16 in nf4_rows_bf16's order (per 64 columns and
           row: the even columns' values, then the odd ones'). */
        for (int64_t kb = 0; kb < nblk; kb++) {
            __m512i t16[2];
            for (int w = 0; w < NR; w++) {
                __m512 tw = _mm512_mul_ps(tab, _mm512_set1_ps(sc[kb + w * row_blocks]));
                t16[w] = (__m512i)_mm512_cvtne2ps_pbh(tw, tw);
            }
            for (int64_t q = 0; q < block / 64; q++, c += 32, xt += 64 * nb) {
                __m512bh wh[2], wl[2];
                for (int w = 0; w < NR; w++) {
                    __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(c + w * row_bytes)));
                    wh[w] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), t16[w]);
                    wl[w] = (__m512bh)_mm512_permutexvar_epi16(v, t16[w]);
                }
                for (int b = 0; b < nb; b++) {
                    __m512bh xe = (__m512bh)_mm512_loadu_si512((const void *)(xt + 64 * b));
                    for (int w = 0; w < NR; w++) acc[w][b] = _mm512_dpbf16_ps(acc[w][b], wh[w], xe);
                }
                for (int b = 0; b < nb; b++) {
                    __m512bh xo = (__m512bh)_mm512_loadu_si512((const void *)(xt + 64 * b + 32));
                    for (int w = 0; w < NR; w++) acc[w][b] = _mm512_dpbf16_ps(acc[w][b], wl[w], xo);
                }
            }
        }
        for (int w = 0; w < NR; w++)
            for (int b = 0; b < nb; b++) out[w][b] = _mm512_reduce_add_ps(acc[w][b]);
        return;
    }
    for (int64_t kb = 0; kb < nblk; kb++) {
        __m512 t[2];
        for (int w = 0; w < NR; w++) t[w] = _mm512_mul_ps(tab, _mm512_set1_ps(sc[kb + w * row_blocks]));
        for (int64_t q = 0; q < chunks; q++, c += 16, xt += 32 * nb) {
            __m512bh wv[2];
            for (int w = 0; w < NR; w++) {
                __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(c + w * row_bytes)));
                wv[w] = _mm512_cvtne2ps_pbh(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), t[w]), _mm512_permutexvar_ps(v, t[w]));
            }
            for (int b = 0; b < nb; b++) {
                __m512bh xv = (__m512bh)_mm512_loadu_si512((const void *)(xt + 32 * b));
                for (int w = 0; w < NR; w++) acc[w][b] = _mm512_dpbf16_ps(acc[w][b], wv[w], xv);
            }
        }
    }
    for (int w = 0; w < NR; w++)
        for (int b = 0; b < nb; b++) out[w][b] = _mm512_reduce_add_ps(acc[w][b]);
}
#define NF4_DOT_OK 1
#else
#define NF4_DOT_OK 0
#endif

#define NF4_ROWS_NB(F, NR, ...)                  \
    switch (nb) {                                \
    case 1: F(__VA_ARGS__, NR, 1, out); break;   \
    case 2: F(__VA_ARGS__, NR, 2, out); break;   \
    case 3: F(__VA_ARGS__, NR, 3, out); break;   \
    case 4: F(__VA_ARGS__, NR, 4, out); break;   \
    case 5: F(__VA_ARGS__, NR, 5, out); break;   \
    case 6: F(__VA_ARGS__, NR, 6, out); break;   \
    case 7: F(__VA_ARGS__, NR, 7, out); break;   \
    default: F(__VA_ARGS__, NR, 8, out); break;  \
    }

/* MATVEC_DRIVER's work split and outlier handling, two weight rows at a time (see nf4_rows_tiled);
   xt16 (bfloat16 activations tiled by nf4_tile_x16) instead of xt: nf4_rows_tiled_dot. */
static void nf4_matvec_tiled(const uint8_t *codes, const float *absmax, int64_t rows, int64_t cols, int64_t block,
                             const float *x, const float *xt, const uint16_t *xt16, int64_t batch, float *y, uint16_t *y16,
                             outliers_t o, int nthreads) {
    int nt = threads_for(rows * cols * (batch < MAX_TILE ? batch : MAX_TILE), nthreads);
    /* The outliers' corrections read x by column: x[b][c] for every row b of a tile, a cache line
       each when x is [batch, cols]. With many outliers (1%: a ~1.5x slower call at 16-32 rows) x
       is transposed once so a column's values are adjacent; the same products, the same order. */
    float *xT = NULL;
    if (o.k * 4 >= cols && batch > 2 && (xT = (float *)malloc(sizeof(float) * (size_t)(batch * cols))) != NULL)
        for (int64_t b = 0; b < batch; b++)
            for (int64_t c = 0; c < cols; c++) xT[c * batch + b] = x[b * cols + c];
    _Pragma("omp parallel num_threads(nt)")
    {
        int t = 0, T = 1;
        THREAD_IDS(t, T);
        int64_t r_begin = rows * t / T, r_end = rows * (t + 1) / T;
        int64_t oi = o.k ? first_outlier_from(&o, r_begin * cols) : 0;
        for (int64_t r = r_begin; r < r_end; r += 2) {
            int NR = r + 1 < r_end ? 2 : 1;
            for (int64_t b0 = 0; b0 < batch; b0 += MAX_TILE) {
                int nb = (int)(batch - b0 < MAX_TILE ? batch - b0 : MAX_TILE);
                float out[2][MAX_TILE];
                if (xt16) {
#if NF4_DOT_OK
                    const uint16_t *xtile = xt16 + b0 * cols;
                    if (NR == 2) { NF4_ROWS_NB(nf4_rows_tiled_dot, 2, codes, absmax, block, r * cols, cols, xtile) }
                    else { NF4_ROWS_NB(nf4_rows_tiled_dot, 1, codes, absmax, block, r * cols, cols, xtile) }
#endif
                } else {
                    const float *xtile = xt + b0 * cols;
                    if (NR == 2) { NF4_ROWS_NB(nf4_rows_tiled, 2, codes, absmax, block, r * cols, cols, xtile) }
                    else { NF4_ROWS_NB(nf4_rows_tiled, 1, codes, absmax, block, r * cols, cols, xtile) }
                }
                int64_t oj = oi;
                for (int w = 0; w < NR; w++) {
                    int64_t row0 = (r + w) * cols;
                    for (; oj < o.k; oj++) {
                        int64_t c = outlier_at(&o, oj) - row0;
                        if (c >= cols) break;
                        if (c < 0) continue; /* out of order: never read out of range */
                        float v = value_at(o.val, o.vdt, oj);
                        if (xT) {
                            const float *xc = xT + c * batch + b0;
                            for (int b = 0; b < nb; b++) out[w][b] += v * xc[b];
                        } else {
                            for (int b = 0; b < nb; b++) out[w][b] += v * x[(b0 + b) * cols + c];
                        }
                    }
                    for (int b = 0; b < nb; b++) {
                        if (y16) y16[(b0 + b) * rows + r + w] = to_bf16(out[w][b]);
                        else y[(b0 + b) * rows + r + w] = out[w][b];
                    }
                }
                if (b0 + MAX_TILE >= batch) oi = oj;
            }
        }
    }
    free(xT);
}
#define NF4_TILED_OK(batch, block, cols) ((batch) > 1 && (block) % 32 == 0 && (cols) % (block) == 0)
#else
#define NF4_TILED_OK(batch, block, cols) 0
#endif

/* MATVEC_DRIVER for one activation row: the one-row kernels take RMAX weight rows a pass (each load
   of x serves them all; each row has its own accumulators and the same operations in the same
   order whatever shares its pass), and those rows are RMAX streams: the thread's rows are cut into
   RMAX runs of S consecutive rows and a pass takes row i of every run, so each stream reads its run
   front to back, as one long sequential stream, prefetched ROW1_PF bytes ahead in that stream.
   (Neighbouring rows a pass instead - rows r .. r + RMAX - restart every stream after one row of
   a few KB, too short for the hardware prefetcher: 8B's shapes read at 11-18 GB/s that way against
   20-29 as streams, one thread from memory, 2026-12-04.) The rows left over (fewer than RMAX)
   go one a pass. ROWS(rw, R, out) computes rows rw[0 .. R) (R == RMAX or 1); XAT(c) is x[c] as a
   float, for the outliers, whose table is read by a cursor per run. */
#define ROW1_PF 512 /* bytes ahead in a stream: 512 (8 lines) measured best of 0-4096 on 8B's shapes */
#define ROW1_FINISH(r, v, oj, XAT)                                                                 \
    {                                                                                              \
        float v_ = (v);                                                                            \
        int64_t row0_ = (r) * cols;                                                                \
        for (; (oj) < o.k; (oj)++) {                                                               \
            int64_t c = outlier_at(&o, (oj)) - row0_;                                              \
            if (c >= cols) break;                                                                  \
            if (c < 0) continue; /* out of order: never read out of range */                      \
            v_ += value_at(o.val, o.vdt, (oj)) * (XAT(c));                                         \
        }                                                                                          \
        if (y16) y16[r] = to_bf16(v_);                                                             \
        else y[r] = v_;                                                                            \
    }
#define ROW1_DRIVER(RMAX, ROWS, XAT)                                                               \
    int nt = threads_for(rows * cols, nthreads);                                                   \
    _Pragma("omp parallel num_threads(nt)")                                                        \
    {                                                                                              \
        int t = 0, T = 1;                                                                          \
        THREAD_IDS(t, T);                                                                          \
        int64_t r_begin = rows * t / T, r_end = rows * (t + 1) / T;                                \
        int64_t S = (r_end - r_begin) / (RMAX), oj[(RMAX) + 1];                                    \
        for (int w = 0; w <= (RMAX); w++)                                                          \
            oj[w] = o.k ? first_outlier_from(&o, (r_begin + w * S) * cols) : 0;                    \
        for (int64_t i = 0; i < S; i++) {                                                          \
            int64_t rw[RMAX];                                                                      \
            float out[RMAX];                                                                       \
            for (int w = 0; w < (RMAX); w++) rw[w] = r_begin + w * S + i;                          \
            ROWS(rw, RMAX, out);                                                                   \
            for (int w = 0; w < (RMAX); w++) ROW1_FINISH(rw[w], out[w], oj[w], XAT)                \
        }                                                                                          \
        for (int64_t r = r_begin + (RMAX) * S; r < r_end; r++) {                                   \
            float out1;                                                                            \
            ROWS(&r, 1, &out1);                                                                    \
            ROW1_FINISH(r, out1, oj[RMAX], XAT)                                                    \
        }                                                                                          \
    }
#define X_F32(c) x[c]              /* float32 x */
#define X_BF16(c) from_bf16(xh[c]) /* bfloat16 xh */

/* ---- NF4 against one float32 activation row: nf4_row's nb == 1 path (the same operations in the
   same order: the same bits), R weight rows per pass (rows rw[0 .. R), ROW1_DRIVER's streams), so
   each load of x (deinterleaved: xe even columns, xo odd) serves R rows: at 14336 columns x is
   56 KB, beyond the L1 cache. */
#if defined(__AVX512F__)
#define NF4_ROW1_F32_R 4
ALWAYS_INLINE void nf4_rows_f32(const uint8_t *codes, const float *absmax, int64_t block, const int64_t *rw, int64_t cols,
                                const float *e, const float *o, int R, float *out) {
    const __m512 tab = _mm512_loadu_ps(NF4);
    __m512 a0[NF4_ROW1_F32_R], a1[NF4_ROW1_F32_R], a2[NF4_ROW1_F32_R], a3[NF4_ROW1_F32_R];
    const uint8_t *c[NF4_ROW1_F32_R];
    const float *sc[NF4_ROW1_F32_R];
    const int64_t row_blocks = cols / block, steps = block / 64;
    for (int w = 0; w < R; w++) {
        a0[w] = a1[w] = a2[w] = a3[w] = _mm512_setzero_ps();
        c[w] = codes + rw[w] * (cols >> 1);
        sc[w] = absmax + rw[w] * row_blocks;
    }
    for (int64_t kb = 0, h = 0; kb < row_blocks; kb++) {
        __m512 t[NF4_ROW1_F32_R];
        for (int w = 0; w < R; w++) t[w] = _mm512_mul_ps(tab, _mm512_set1_ps(sc[w][kb]));
        for (int64_t q = 0; q < steps; q++, h += 32) {
            __m512 e0 = _mm512_loadu_ps(e + h), o0 = _mm512_loadu_ps(o + h), e1 = _mm512_loadu_ps(e + h + 16), o1 = _mm512_loadu_ps(o + h + 16);
            for (int w = 0; w < R; w++) {
                _mm_prefetch((const char *)(c[w] + h + ROW1_PF), _MM_HINT_T0);
                __m512i v0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(c[w] + h)));
                __m512i v1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(c[w] + h + 16)));
                a0[w] = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v0, 4), t[w]), e0, a0[w]);
                a1[w] = _mm512_fmadd_ps(_mm512_permutexvar_ps(v0, t[w]), o0, a1[w]);
                a2[w] = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v1, 4), t[w]), e1, a2[w]);
                a3[w] = _mm512_fmadd_ps(_mm512_permutexvar_ps(v1, t[w]), o1, a3[w]);
            }
        }
    }
    for (int w = 0; w < R; w++) out[w] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0[w], a1[w]), _mm512_add_ps(a2[w], a3[w])));
}
static __attribute__((noinline)) void nf4_rows_f32_pass(const uint8_t *codes, const float *absmax, int64_t block, const int64_t *rw,
                                                        int64_t cols, const float *e, const float *o, int R, float *out) {
    if (R == NF4_ROW1_F32_R) nf4_rows_f32(codes, absmax, block, rw, cols, e, o, NF4_ROW1_F32_R, out); /* see nf4_rows_bf16_pass */
    else nf4_rows_f32(codes, absmax, block, rw, cols, e, o, 1, out);
}
#define NF4_ROW1_F32_OK(batch, block, cols) ((batch) == 1 && (block) % 64 == 0 && (cols) % (block) == 0)
#endif

/* ---- NF4 against one bfloat16 activation row (a bf16 model's decode step) ----
   The bound at one row is the instructions per weight (and how well the bytes stream in: see
   ROW1_DRIVER), so the work per weight is cut to the least found: each 128 weights (64 code bytes,
   two blocks of 64) of a row take one load, three shifts, four 32-lane word permutes (VPERMW) that
   look the codes up in one constant table - NF4[c] rounded to bfloat16 - four VDPBF16PS into a
   fresh float32 sum and one FMA that scales it by the two blocks' absmax (lanes 0-7 hold the first
   block's products, 8-15 the second's) into the row's accumulator. No per-block table is built
   and no code byte is widened: 13 instructions per 128 weights where a table of NF4[c] * absmax per
   block (the weights a bf16 dequantization gives) took 20; at 8B's shapes in L2 24 -> 31 GB/s.
   VPERMW reads the low 5 bits of a word: the table is the 16 values twice, so with the 64 bytes
   taken as 32 words, w, w >> 4, w >> 8 and w >> 12 index it unmasked - element 4i+1 (low nibble
   of byte 2i), 4i, 4i+3, 4i+2 of the 128 in word lane i; the activations come permuted to match
   (nf4_perm_x16). A row's value: sum over blocks of absmax * (sum of bf16(NF4[c]) * x, products
   exact, float32 sums, denormals flushed) - the weights NF4[c] * absmax to within bfloat16's
   rounding of NF4[c] (2^-9), as close to the float32 weights as a bfloat16 dequantization is, but
   not its bits: within TOL of dequantize-then-matmul in tests/kernels. A row of an odd number of
   64-weight halves ends with one half done alike (widened bytes, two permutes, even columns then
   odd). Every row runs the same operations in the same order whatever R, the thread split or its
   neighbours, so its bits do not depend on them (fused q/k/v, slices). Blocks of any multiple of
   64: each half's block is counted, so its scale is read, not divided out. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define NF4_ROW1_R 4
ALWAYS_INLINE void nf4_rows_bf16(const uint8_t *codes, const float *absmax, int64_t block, const int64_t *rw, int64_t cols,
                                 const uint16_t *xp, int R, int B64, float *out) {
    const __m512 nf4 = _mm512_loadu_ps(NF4);
    const __m512i tab = (__m512i)_mm512_cvtne2ps_pbh(nf4, nf4);
    __m512 acc[NF4_ROW1_R];
    const uint8_t *c[NF4_ROW1_R];
    const float *sc[NF4_ROW1_R];
    const int64_t row_blocks = cols / block, halves_per_block = block / 64, pairs = cols / 128;
    for (int w = 0; w < R; w++) {
        acc[w] = _mm512_setzero_ps();
        c[w] = codes + rw[w] * (cols >> 1);
        sc[w] = absmax + rw[w] * row_blocks;
    }
    int64_t kb = 0, half = 0; /* the block of the next 64-weight half, and which half of it */
#define NEXT_HALF(k)                                     \
    k = kb;                                              \
    if (++half == halves_per_block) { half = 0; kb++; }
    /* the two halves' scales: lanes 0-7 the first half's block, 8-15 the second's (the same block
       or the next), read by a masked load that never reads past a row's last block; B64 (blocks of
       64, the default): always the next, read as 8 bytes (a masked load measured ~4% slower) */
    const __m512i same = _mm512_setzero_si512(), next = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    for (int64_t p = 0; p < pairs; p++) {
        int64_t ka, kz;
        if (B64) ka = 2 * p, kz = ka + 1;
        else {
            NEXT_HALF(ka)
            NEXT_HALF(kz)
        }
        const __mmask8 two = kz > ka ? 3 : 1;
        const __m512i pick = kz > ka ? next : same;
        const uint16_t *xq = xp + 128 * p;
        __m512bh x0 = (__m512bh)_mm512_loadu_si512((const void *)xq), x1 = (__m512bh)_mm512_loadu_si512((const void *)(xq + 32));
        __m512bh x2 = (__m512bh)_mm512_loadu_si512((const void *)(xq + 64)), x3 = (__m512bh)_mm512_loadu_si512((const void *)(xq + 96));
        for (int w = 0; w < R; w++) {
            const uint8_t *cw = c[w] + 64 * p;
            _mm_prefetch((const char *)(cw + ROW1_PF), _MM_HINT_T0);
            __m512i v = _mm512_loadu_si512((const void *)cw);
            __m512 s = _mm512_permutexvar_ps(pick, _mm512_castps128_ps512(B64 ? _mm_castpd_ps(_mm_load_sd((const double *)(sc[w] + ka)))
                                                                              : _mm_maskz_loadu_ps(two, sc[w] + ka)));
            __m512 d = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)_mm512_permutexvar_epi16(v, tab), x0);
            d = _mm512_dpbf16_ps(d, (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), tab), x1);
            d = _mm512_dpbf16_ps(d, (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 8), tab), x2);
            d = _mm512_dpbf16_ps(d, (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 12), tab), x3);
            acc[w] = _mm512_fmadd_ps(d, s, acc[w]);
        }
    }
    if (cols & 64) { /* the last 64 weights: bytes widened to words, even columns then odd */
        int64_t ka;
        if (B64) ka = 2 * pairs;
        else {
            NEXT_HALF(ka)
        }
        const uint16_t *xq = xp + 128 * pairs;
        __m512bh xe = (__m512bh)_mm512_loadu_si512((const void *)xq), xo = (__m512bh)_mm512_loadu_si512((const void *)(xq + 32));
        for (int w = 0; w < R; w++) {
            __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(c[w] + 64 * pairs)));
            __m512 d = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), tab), xe);
            d = _mm512_dpbf16_ps(d, (__m512bh)_mm512_permutexvar_epi16(v, tab), xo);
            acc[w] = _mm512_fmadd_ps(d, _mm512_set1_ps(sc[w][ka]), acc[w]);
        }
    }
#undef NEXT_HALF
    for (int w = 0; w < R; w++) out[w] = _mm512_reduce_add_ps(acc[w]);
}

/* One pass (R == NF4_ROW1_R or 1) as a function of its own: inlined into ROW1_DRIVER's OpenMP body
   the kernel lost registers to the driver's state and ran ~20% slower (x reloaded for every row). */
static __attribute__((noinline)) void nf4_rows_bf16_pass(const uint8_t *codes, const float *absmax, int64_t block, const int64_t *rw,
                                                         int64_t cols, const uint16_t *xp, int R, float *out) {
    if (block == 64) {
        if (R == NF4_ROW1_R) nf4_rows_bf16(codes, absmax, block, rw, cols, xp, NF4_ROW1_R, 1, out);
        else nf4_rows_bf16(codes, absmax, block, rw, cols, xp, 1, 1, out);
    } else {
        if (R == NF4_ROW1_R) nf4_rows_bf16(codes, absmax, block, rw, cols, xp, NF4_ROW1_R, 0, out);
        else nf4_rows_bf16(codes, absmax, block, rw, cols, xp, 1, 0, out);
    }
}

/* x [cols] bfloat16 -> nf4_rows_bf16's order: per 128 columns, x[4i+1], x[4i], x[4i+3], x[4i+2]
   (i < 32) one after the other; the last 64 columns of an odd number of 64s: the even ones, then
   the odd ones */
static void nf4_perm_x16(const uint16_t *x, int64_t cols, uint16_t *xp) {
    int64_t q = 0;
    for (; q + 128 <= cols; q += 128)
        for (int i = 0; i < 32; i++) {
            xp[q + i] = x[q + 4 * i + 1];
            xp[q + 32 + i] = x[q + 4 * i];
            xp[q + 64 + i] = x[q + 4 * i + 3];
            xp[q + 96 + i] = x[q + 4 * i + 2];
        }
    if (q < cols)
        for (int l = 0; l < 32; l++) {
            xp[q + l] = x[q + 2 * l];
            xp[q + 32 + l] = x[q + 2 * l + 1];
        }
}

#define NF4_ROW1_BF16_OK(batch, bf16, block, cols) ((batch) == 1 && (bf16) && (block) % 64 == 0 && (cols) % (block) == 0)
#else
#define NF4_ROW1_BF16_OK(batch, bf16, block, cols) 0
#endif

/* ---- int8 against one activation row, rows of whole blocks of whole 16-code steps (block 32,
   the default, on every model width) ----
   int8_row's arithmetic (each weight one float32 product code * (absmax / 127), as the reference
   forms it; float32 FMAs) without its per-segment bookkeeping, which cost as much as the
   arithmetic at 32 weights a block, and R weight rows per pass: each load of x serves R rows and
   the R rows' accumulators are independent chains. The block scales are divided 16 at a time
   (the same IEEE quotient as one at a time). Every row runs the same operations in the same order
   whatever R, the thread split or its neighbours. */
#if defined(__AVX512F__)
#define INT8_ROW1_R 4
ALWAYS_INLINE void int8_rows_whole(const int8_t *codes, const float *absmax, int64_t block, const int64_t *rw, int64_t cols,
                                   const float *x, int R, int B32, float *out) {
    __m512 a0[INT8_ROW1_R], a1[INT8_ROW1_R];
    const int8_t *c[INT8_ROW1_R];
    const float *sc[INT8_ROW1_R];
    /* B32: blocks of 32 (the default) as a constant, so a block's two steps unroll without the
       branch on q & 1 that a run-time step count left in the loop (same operations, same order) */
    const int64_t row_blocks = cols / block, steps = B32 ? 2 : block / 16;
    for (int w = 0; w < R; w++) {
        a0[w] = a1[w] = _mm512_setzero_ps();
        c[w] = codes + rw[w] * cols;
        sc[w] = absmax + rw[w] * row_blocks;
    }
    const __m512 qmax = _mm512_set1_ps(INT8_QMAX);
    for (int64_t kb0 = 0; kb0 < row_blocks; kb0 += 16) {
        int nk = row_blocks - kb0 < 16 ? (int)(row_blocks - kb0) : 16;
        float s16[INT8_ROW1_R][16];
        for (int w = 0; w < R; w++)
            _mm512_storeu_ps(s16[w], _mm512_div_ps(_mm512_maskz_loadu_ps((__mmask16)((1u << nk) - 1), sc[w] + kb0), qmax));
        for (int kb = 0; kb < nk; kb++) {
            int64_t j = (kb0 + kb) * block;
            for (int w = 0; w < R; w++) /* once per block (once per 16 codes cost 5-20%) */
                _mm_prefetch((const char *)(c[w] + j + ROW1_PF), _MM_HINT_T0);
            for (int64_t q = 0; q < steps; q++, j += 16) {
                __m512 xv = _mm512_loadu_ps(x + j);
                for (int w = 0; w < R; w++) {
                    __m512 wv = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(c[w] + j)))),
                                              _mm512_set1_ps(s16[w][kb]));
                    if (q & 1) a1[w] = _mm512_fmadd_ps(wv, xv, a1[w]);
                    else a0[w] = _mm512_fmadd_ps(wv, xv, a0[w]);
                }
            }
        }
    }
    for (int w = 0; w < R; w++) out[w] = _mm512_reduce_add_ps(_mm512_add_ps(a0[w], a1[w]));
}
static __attribute__((noinline)) void int8_rows_pass(const int8_t *codes, const float *absmax, int64_t block, const int64_t *rw,
                                                     int64_t cols, const float *x, int R, float *out) {
    if (block == 32) { /* see nf4_rows_bf16_pass */
        if (R == INT8_ROW1_R) int8_rows_whole(codes, absmax, block, rw, cols, x, INT8_ROW1_R, 1, out);
        else int8_rows_whole(codes, absmax, block, rw, cols, x, 1, 1, out);
    } else {
        if (R == INT8_ROW1_R) int8_rows_whole(codes, absmax, block, rw, cols, x, INT8_ROW1_R, 0, out);
        else int8_rows_whole(codes, absmax, block, rw, cols, x, 1, 0, out);
    }
}
#define INT8_ROW1_OK(batch, block, cols) ((batch) == 1 && (block) % 16 == 0 && (cols) % (block) == 0)
#else
#define INT8_ROW1_OK(batch, block, cols) 0
#endif

/* x [batch, cols] -> the tiled layout nf4_row_tiled reads: per tile of up to MAX_TILE rows
   (starting at row b0, at xt + b0 * cols), per chunk q of 32 columns, per row b of the tile:
   x[b][32q + 2l] for l < 16, then x[b][32q + 2l + 1]. */
static void nf4_tile_x(const float *x, int64_t batch, int64_t cols, float *xt) {
    for (int64_t b0 = 0; b0 < batch; b0 += MAX_TILE) {
        int64_t nb = batch - b0 < MAX_TILE ? batch - b0 : MAX_TILE;
        float *tile = xt + b0 * cols;
        for (int64_t q = 0; q < cols / 32; q++)
            for (int64_t b = 0; b < nb; b++) {
                const float *src = x + (b0 + b) * cols + 32 * q;
                float *dst = tile + (q * nb + b) * 32;
                for (int l = 0; l < 16; l++) {
                    dst[l] = src[2 * l];
                    dst[16 + l] = src[2 * l + 1];
                }
            }
    }
}

/* bfloat16 x [batch, cols] -> nf4_rows_tiled_dot's layout: as nf4_tile_x, but per chunk and row
   the 16 odd columns' values first, then the 16 even ones' (blocks of whole 64-weight steps: per
   64 columns and row, the 32 even columns' values, then the 32 odd ones'). */
static void nf4_tile_x16(const uint16_t *x, int64_t batch, int64_t cols, int64_t block, uint16_t *xt) {
    for (int64_t b0 = 0; b0 < batch; b0 += MAX_TILE) {
        int64_t nb = batch - b0 < MAX_TILE ? batch - b0 : MAX_TILE;
        uint16_t *tile = xt + b0 * cols;
        if (block % 64 == 0) { /* nf4_rows_tiled_dot's 64-weight steps */
            for (int64_t q = 0; q < cols / 64; q++)
                for (int64_t b = 0; b < nb; b++) {
                    const uint16_t *src = x + (b0 + b) * cols + 64 * q;
                    uint16_t *dst = tile + (q * nb + b) * 64;
                    for (int l = 0; l < 32; l++) {
                        dst[l] = src[2 * l];
                        dst[32 + l] = src[2 * l + 1];
                    }
                }
            continue;
        }
        for (int64_t q = 0; q < cols / 32; q++)
            for (int64_t b = 0; b < nb; b++) {
                const uint16_t *src = x + (b0 + b) * cols + 32 * q;
                uint16_t *dst = tile + (q * nb + b) * 32;
                for (int l = 0; l < 16; l++) {
                    dst[l] = src[2 * l + 1];
                    dst[16 + l] = src[2 * l];
                }
            }
    }
}

/* y[b, r] = sum_c W[r, c] x[b, c] (+ outliers); x: [batch, cols] contiguous; y: [batch, rows]. */
void lp_nf4_matvec(const uint8_t *codes, const float *absmax, int64_t rows, int64_t cols, int64_t block,
                   const void *x_in, int64_t batch, void *y_out, const void *oidx, int idx64, const void *oval, int vdt,
                   int64_t k, int nthreads, int bf16) {
    if (cols <= 0) { /* no columns: every dot product is 0 (x may be a NULL pointer) */
        memset(y_out, 0, (size_t)(batch * rows) * (bf16 ? sizeof(uint16_t) : sizeof(float)));
        return;
    }
    outliers_t o = {oidx, idx64, oval, vdt, k};
    int64_t half = cols / 2;
    float *y = bf16 ? NULL : (float *)y_out, *xown;
    uint16_t *y16 = bf16 ? (uint16_t *)y_out : NULL;
    if (NF4_ROW1_BF16_OK(batch, bf16, block, cols)) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
        uint16_t *xp = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)(cols > 0 ? cols : 1));
        if (!xp) return;
        nf4_perm_x16((const uint16_t *)x_in, cols, xp);
        const uint16_t *xh = (const uint16_t *)x_in;
#define NF4_ROWS_BF16(rw, R, out) nf4_rows_bf16_pass(codes, absmax, block, rw, cols, xp, R, out)
        ROW1_DRIVER(NF4_ROW1_R, NF4_ROWS_BF16, X_BF16)
        free(xp);
#endif
        return;
    }
    const float *x = x_as_float(x_in, batch * cols, bf16, &xown);
    float *xs = (float *)malloc(sizeof(float) * (size_t)(batch * cols));
    if (!xs || !x) { free(xs); free(xown); return; }
    if (NF4_TILED_OK(batch, block, cols)) {
#if defined(__AVX512F__)
        if (bf16 && NF4_DOT_OK) { /* xs holds batch * cols floats: room for the bfloat16 tiles */
            nf4_tile_x16((const uint16_t *)x_in, batch, cols, block, (uint16_t *)xs);
            nf4_matvec_tiled(codes, absmax, rows, cols, block, x, NULL, (const uint16_t *)xs, batch, y, y16, o, nthreads);
        } else {
            nf4_tile_x(x, batch, cols, xs);
            nf4_matvec_tiled(codes, absmax, rows, cols, block, x, xs, NULL, batch, y, y16, o, nthreads);
        }
#endif
        free(xs);
        free(xown);
        return;
    }
    for (int64_t b = 0; b < batch; b++)
        for (int64_t i = 0; i < half; i++) {
            xs[b * cols + i] = x[b * cols + 2 * i];
            xs[b * cols + half + i] = x[b * cols + 2 * i + 1];
        }
#if defined(__AVX512F__)
    if (NF4_ROW1_F32_OK(batch, block, cols)) {
#define NF4_ROWS_F32(rw, R, out) nf4_rows_f32_pass(codes, absmax, block, rw, cols, xs, xs + half, R, out)
        ROW1_DRIVER(NF4_ROW1_F32_R, NF4_ROWS_F32, X_F32)
        free(xs);
        free(xown);
        return;
    }
#endif
    MATVEC_DRIVER({
        const float *xe[MAX_TILE], *xo[MAX_TILE];
        for (int b = 0; b < nb; b++) {
            xe[b] = xs + (b0 + b) * cols;
            xo[b] = xe[b] + half;
        }
        WITH_CONST_NB(nf4_row, nb, codes, absmax, block, row0, cols, xe, xo)
    })
    free(xs);
    free(xown);
}

void lp_int8_matvec(const int8_t *codes, const float *absmax, int64_t rows, int64_t cols, int64_t block,
                    const void *x_in, int64_t batch, void *y_out, const void *oidx, int idx64, const void *oval, int vdt,
                    int64_t k, int nthreads, int bf16) {
    if (cols <= 0) { /* no columns: every dot product is 0 (x may be a NULL pointer) */
        memset(y_out, 0, (size_t)(batch * rows) * (bf16 ? sizeof(uint16_t) : sizeof(float)));
        return;
    }
    outliers_t o = {oidx, idx64, oval, vdt, k};
    float *y = bf16 ? NULL : (float *)y_out, *xown;
    uint16_t *y16 = bf16 ? (uint16_t *)y_out : NULL;
    const float *x = x_as_float(x_in, batch * cols, bf16, &xown);
    if (!x) return;
#if defined(__AVX512F__)
    if (INT8_ROW1_OK(batch, block, cols)) {
#define INT8_ROWS(rw, R, out) int8_rows_pass(codes, absmax, block, rw, cols, x, R, out)
        /* 4 streams at every width (was: 4 neighbouring rows from 8192 columns, one row at a time
           below): SmolLM2's 576 columns from memory 1.05-1.25x one row at a time, 8B's as fast */
        ROW1_DRIVER(INT8_ROW1_R, INT8_ROWS, X_F32)
        free(xown);
        return;
    }
#endif
    MATVEC_DRIVER({
        const float *xr[MAX_TILE];
        for (int b = 0; b < nb; b++) xr[b] = x + (b0 + b) * cols;
        WITH_CONST_NB(int8_row, nb, codes, absmax, block, row0, cols, xr)
    })
    free(xown);
}

/* The most activation rows lp_nf4_matvec multiplies faster than dequantize + GEMM (torch's bf16
   GEMM on one core; bench_kernels.py, 2026-12-04): with bfloat16 activations and VDPBF16PS the
   tiles of 8 rows (nf4_rows_tiled_dot) beat it 1.7-1.8x at 16 rows, 1.05-1.4x at 32 and lose at 64
   (0.8-0.97x); the float32 tiles only up to one tile. Not registered in kernels/_SIGNATURES
   (ctypes' default: int result), so the library's ABI is unchanged. */
int lp_nf4_batch_max(int bf16) {
#if defined(__AVX512F__) && NF4_DOT_OK
    if (bf16) return 32;
#endif
    (void)bf16;
    return MAX_TILE;
}

/* ---- dense bfloat16 weights, one activation row ----
   torch's batch-1 bf16 F.linear on the CPU reads its weight at about a third of the memory speed
   (BENCHMARKS.md); this reads it at the memory speed. Each product of two bfloat16 values is exact
   in float32, so the result differs from F.linear only in summation order. R weight rows are taken
   at a time so each load of x serves R rows; every row runs the same operations in the same order
   whatever R, the thread split or the neighbouring rows (a fused q/k/v matrix gives each row the
   bits the separate matrices give it). With AVX512_BF16 one instruction multiplies and adds 32
   pairs (vdpbf16ps: products exact, float32 sums, denormals flushed). */
#define BF16_MAX_R 4
ALWAYS_INLINE void bf16_rows(const uint16_t *w, int64_t cols, const uint16_t *x, int R, float *out) {
    float tail[BF16_MAX_R] = {0};
    int64_t i = 0;
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    __m512 a0[BF16_MAX_R], a1[BF16_MAX_R];
    for (int r = 0; r < R; r++) a0[r] = a1[r] = _mm512_setzero_ps();
    for (; i + 64 <= cols; i += 64) {
        __m512bh x0 = (__m512bh)_mm512_loadu_si512((const void *)(x + i)), x1 = (__m512bh)_mm512_loadu_si512((const void *)(x + i + 32));
        for (int r = 0; r < R; r++) {
            a0[r] = _mm512_dpbf16_ps(a0[r], (__m512bh)_mm512_loadu_si512((const void *)(w + r * cols + i)), x0);
            a1[r] = _mm512_dpbf16_ps(a1[r], (__m512bh)_mm512_loadu_si512((const void *)(w + r * cols + i + 32)), x1);
        }
    }
    for (; i + 32 <= cols; i += 32) {
        __m512bh x0 = (__m512bh)_mm512_loadu_si512((const void *)(x + i));
        for (int r = 0; r < R; r++) a0[r] = _mm512_dpbf16_ps(a0[r], (__m512bh)_mm512_loadu_si512((const void *)(w + r * cols + i)), x0);
    }
    for (int r = 0; r < R; r++) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0[r], a1[r]));
#elif defined(__AVX512F__)
    /* even elements: the low half of each 32-bit lane shifted up; odd: the high half masked */
    const __m512i hi = _mm512_set1_epi32((int)0xFFFF0000u);
    __m512 ae[BF16_MAX_R], ao[BF16_MAX_R];
    for (int r = 0; r < R; r++) ae[r] = ao[r] = _mm512_setzero_ps();
    for (; i + 32 <= cols; i += 32) {
        __m512i xv = _mm512_loadu_si512((const void *)(x + i));
        __m512 xe = _mm512_castsi512_ps(_mm512_slli_epi32(xv, 16)), xo = _mm512_castsi512_ps(_mm512_and_si512(xv, hi));
        for (int r = 0; r < R; r++) {
            __m512i wv = _mm512_loadu_si512((const void *)(w + r * cols + i));
            ae[r] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(wv, 16)), xe, ae[r]);
            ao[r] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(wv, hi)), xo, ao[r]);
        }
    }
    for (int r = 0; r < R; r++) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(ae[r], ao[r]));
#elif defined(__AVX2__) && defined(__FMA__)
    const __m256i hi = _mm256_set1_epi32((int)0xFFFF0000u);
    __m256 ae[BF16_MAX_R], ao[BF16_MAX_R];
    for (int r = 0; r < R; r++) ae[r] = ao[r] = _mm256_setzero_ps();
    for (; i + 16 <= cols; i += 16) {
        __m256i xv = _mm256_loadu_si256((const __m256i *)(x + i));
        __m256 xe = _mm256_castsi256_ps(_mm256_slli_epi32(xv, 16)), xo = _mm256_castsi256_ps(_mm256_and_si256(xv, hi));
        for (int r = 0; r < R; r++) {
            __m256i wv = _mm256_loadu_si256((const __m256i *)(w + r * cols + i));
            ae[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(wv, 16)), xe, ae[r]);
            ao[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(wv, hi)), xo, ao[r]);
        }
    }
    for (int r = 0; r < R; r++) out[r] = hsum256(_mm256_add_ps(ae[r], ao[r]));
#else
    for (int r = 0; r < R; r++) out[r] = 0.0f;
#endif
    for (int r = 0; r < R; r++) {
        for (int64_t c = i; c < cols; c++) tail[r] += from_bf16(w[r * cols + c]) * from_bf16(x[c]);
        out[r] += tail[r];
    }
}

/* bf16_rows for R rows at their own addresses wr[0 .. R) (R <= BF16_MAX_R): the same operations in
   the same order per row (the same bits as bf16_rows for that row alone), each stream prefetched
   ROW1_PF bytes ahead. */
#if defined(__AVX512F__) && defined(__AVX512BF16__)
ALWAYS_INLINE void bf16_rows_at(const uint16_t *const *wr, int64_t cols, const uint16_t *x, int R, float *out) {
    __m512 a0[BF16_MAX_R], a1[BF16_MAX_R];
    for (int r = 0; r < R; r++) a0[r] = a1[r] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 64 <= cols; i += 64) {
        __m512bh x0 = (__m512bh)_mm512_loadu_si512((const void *)(x + i)), x1 = (__m512bh)_mm512_loadu_si512((const void *)(x + i + 32));
        for (int r = 0; r < R; r++) {
            _mm_prefetch((const char *)(wr[r] + i) + ROW1_PF, _MM_HINT_T0);
            a0[r] = _mm512_dpbf16_ps(a0[r], (__m512bh)_mm512_loadu_si512((const void *)(wr[r] + i)), x0);
            a1[r] = _mm512_dpbf16_ps(a1[r], (__m512bh)_mm512_loadu_si512((const void *)(wr[r] + i + 32)), x1);
        }
    }
    for (; i + 32 <= cols; i += 32) {
        __m512bh x0 = (__m512bh)_mm512_loadu_si512((const void *)(x + i));
        for (int r = 0; r < R; r++) a0[r] = _mm512_dpbf16_ps(a0[r], (__m512bh)_mm512_loadu_si512((const void *)(wr[r] + i)), x0);
    }
    for (int r = 0; r < R; r++) {
        float tail = 0.0f;
        out[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0[r], a1[r]));
        for (int64_t c = i; c < cols; c++) tail += from_bf16(wr[r][c]) * from_bf16(x[c]);
        out[r] += tail;
    }
}
#endif

/* y[r] = sum_c W[r, c] x[c]: W [rows, cols] bfloat16, x [cols] bfloat16, y [rows] bfloat16
   (bf16 == 1, rounded to nearest even) or float32. */
void lp_bf16_matvec(const uint16_t *w, int64_t rows, int64_t cols, const uint16_t *x, void *y_out, int bf16, int nthreads) {
    /* split from 64K weights on (a 576x576 matrix: ~30 us of reading at one thread, several times a
       parallel region's cost): the memory speed of two threads is what a batch-1 bf16 GEMV can use */
    int nt = threads_for(rows * cols * 4, nthreads);
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    /* BF16_MAX_R streams a pass, as the one-row quantized kernels read (ROW1_DRIVER): the thread's
       rows cut into BF16_MAX_R runs, a pass takes row i of each run, so each stream reads its run
       front to back. (Neighbouring rows a pass restart every stream after one short row; one row a
       pass reads one stream.) A row's bits do not depend on the pass (bf16_rows_at). */
#pragma omp parallel num_threads(nt)
    {
        int t = 0, T = 1;
        THREAD_IDS(t, T);
        int64_t r_begin = rows * t / T, r_end = rows * (t + 1) / T, S = (r_end - r_begin) / BF16_MAX_R;
        for (int64_t i = 0; i < S; i++) {
            const uint16_t *wr[BF16_MAX_R];
            float out[BF16_MAX_R];
            for (int k = 0; k < BF16_MAX_R; k++) wr[k] = w + (r_begin + k * S + i) * cols;
            bf16_rows_at(wr, cols, x, BF16_MAX_R, out);
            for (int k = 0; k < BF16_MAX_R; k++) {
                int64_t r = r_begin + k * S + i;
                if (bf16) ((uint16_t *)y_out)[r] = to_bf16(out[k]);
                else ((float *)y_out)[r] = out[k];
            }
        }
        for (int64_t r = r_begin + BF16_MAX_R * S; r < r_end; r++) {
            const uint16_t *wr = w + r * cols;
            float out;
            bf16_rows_at(&wr, cols, x, 1, &out);
            if (bf16) ((uint16_t *)y_out)[r] = to_bf16(out);
            else ((float *)y_out)[r] = out;
        }
    }
#else
    /* One row at a time: the weight is then read as one sequential stream. A row's bits do not
       depend on R (bf16_rows). */
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t r = 0; r < rows; r++) {
        float out;
        bf16_rows(w + r * cols, cols, x, 1, &out);
        if (bf16) ((uint16_t *)y_out)[r] = to_bf16(out);
        else ((float *)y_out)[r] = out;
    }
#endif
}

/* ---- read bandwidth (STREAM-like, read only): the machine's limit the GEMVs are measured against.
   XOR of every 64-byte line of a buffer far larger than the caches, each thread a contiguous share
   (as the GEMVs split rows) read as 8 streams (with AVX-512). Returns the XOR so the reads
   cannot be optimized away. */
uint64_t lp_read_xor(const void *buf, int64_t nbytes, int nthreads) {
    const int64_t lines = nbytes / 64;
    uint64_t total = 0;
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel num_threads(nthreads) reduction(^ : total)
    {
        int t = 0, T = 1;
        THREAD_IDS(t, T);
        int64_t l0 = lines * t / T, l1 = lines * (t + 1) / T, l = l0;
        const uint8_t *p = (const uint8_t *)buf;
#if defined(__AVX512F__)
        { /* 8 streams per thread, as the GEMVs read several weight rows at once: one sequential
             stream read ~25% slower than the bf16 GEMV itself (2026-12-04: 15-16 vs 21-22 GB/s at
             1 thread), so the probe understated the machine's limit */
            const int64_t per = (l1 - l0) / 8;
            __m512i acc[8];
            for (int k = 0; k < 8; k++) acc[k] = _mm512_setzero_si512();
            for (int64_t i = 0; i < per; i++)
                for (int k = 0; k < 8; k++) acc[k] = _mm512_xor_si512(acc[k], _mm512_loadu_si512((const void *)(p + (l0 + k * per + i) * 64)));
            for (int k = 1; k < 8; k++) acc[0] = _mm512_xor_si512(acc[0], acc[k]);
            uint64_t lanes[8];
            _mm512_storeu_si512((void *)lanes, acc[0]);
            for (int i = 0; i < 8; i++) total ^= lanes[i];
            l = l0 + 8 * per;
        }
#elif defined(__AVX2__)
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
        for (; l + 2 <= l1; l += 2) {
            a0 = _mm256_xor_si256(a0, _mm256_loadu_si256((const __m256i *)(p + l * 64)));
            a1 = _mm256_xor_si256(a1, _mm256_loadu_si256((const __m256i *)(p + l * 64 + 32)));
            a2 = _mm256_xor_si256(a2, _mm256_loadu_si256((const __m256i *)(p + l * 64 + 64)));
            a3 = _mm256_xor_si256(a3, _mm256_loadu_si256((const __m256i *)(p + l * 64 + 96)));
        }
        uint64_t lanes[4];
        _mm256_storeu_si256((__m256i *)lanes, _mm256_xor_si256(_mm256_xor_si256(a0, a1), _mm256_xor_si256(a2, a3)));
        for (int i = 0; i < 4; i++) total ^= lanes[i];
#endif
        for (; l < l1; l++)
            for (int i = 0; i < 8; i++) {
                uint64_t v;
                memcpy(&v, p + l * 64 + i * 8, 8);
                total ^= v;
            }
    }
    return total;
}

/* ---- dequantization of n elements (any n; block even for NF4) into float32 or bfloat16 ---- */

static void store(float *out32, uint16_t *out16, int64_t i, float v) {
    if (out16) out16[i] = to_bf16(v);
    else out32[i] = v;
}

#if defined(__AVX512F__)
static inline void store16(float *o32, uint16_t *o16, int64_t i, __m512 v) {
    if (o16) {
        __m512i u = _mm512_castps_si512(v); /* round to nearest even, as to_bf16 */
        u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
        _mm256_storeu_si256((__m256i *)(o16 + i), _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
    } else {
        _mm512_storeu_ps(o32 + i, v);
    }
}
#endif

/* out: float32 (bf16 == 0) or bfloat16 (bf16 == 1) */
void lp_nf4_dequant(const uint8_t *codes, const float *absmax, int64_t n, int64_t block, void *out, int bf16, int nthreads) {
    int64_t nblocks = (n + block - 1) / block;
    float *o32 = bf16 ? NULL : (float *)out;
    uint16_t *o16 = bf16 ? (uint16_t *)out : NULL;
    int nt = threads_for(n, nthreads);
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t k = 0; k < nblocks; k++) {
        float t[16];
        for (int j = 0; j < 16; j++) t[j] = NF4[j] * absmax[k];
        int64_t start = k * block, end = start + block < n ? start + block : n, i = start;
#if defined(__AVX512F__)
        if (block % 2 == 0) { /* whole bytes: 32 values per step, pairs interleaved back into order */
            __m512 tv = _mm512_loadu_ps(t);
            const __m512i lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
            const __m512i hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
            for (; i + 32 <= end; i += 32) {
                __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(codes + (i >> 1))));
                __m512 whi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), tv), wlo = _mm512_permutexvar_ps(v, tv);
                store16(o32, o16, i, _mm512_permutex2var_ps(whi, lo_idx, wlo));
                store16(o32, o16, i + 16, _mm512_permutex2var_ps(whi, hi_idx, wlo));
            }
        }
#endif
        for (; i < end; i++) {
            uint8_t byte = codes[i >> 1];
            store(o32, o16, i, t[(i & 1) ? (byte & 15) : (byte >> 4)]);
        }
    }
}

void lp_int8_dequant(const int8_t *codes, const float *absmax, int64_t n, int64_t block, void *out, int bf16, int nthreads) {
    int64_t nblocks = (n + block - 1) / block;
    float *o32 = bf16 ? NULL : (float *)out;
    uint16_t *o16 = bf16 ? (uint16_t *)out : NULL;
    int nt = threads_for(n, nthreads);
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t k = 0; k < nblocks; k++) {
        float s = absmax[k] / INT8_QMAX;
        int64_t start = k * block, end = start + block < n ? start + block : n, i = start;
#if defined(__AVX512F__)
        __m512 sv = _mm512_set1_ps(s);
        for (; i + 16 <= end; i += 16)
            store16(o32, o16, i, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(codes + i)))), sv));
#endif
        for (; i < end; i++) store(o32, o16, i, (float)codes[i] * s);
    }
}
