/* Separable filters on the CPU, in C: a centred 1-D kernel applied along one axis of a volume.
 *
 * The engine's Gaussian smoothing (pyramid levels, SyN's update and total fields) and local CC's
 * box sums (radius 4: nine taps of 1) are separable filters. As matrix products (pyramid.py's
 * `filter_axes`, BLAS) each output value costs as many multiply-adds as the axis is long (65-77
 * here) rather than as many as the kernel has taps (9-19); these loops do the taps only, in the
 * volume's own type (float32 stays float32), and the compiler vectorises them along the contiguous
 * axis: 16 float32 or 8 float64 values per AVX-512 instruction. Each pass over an axis then reads
 * and writes the volume once, which on a small machine is what it costs: float32 at about half of
 * float64, and CC's box sums about 0.8x of BLAS's in float32 (docs/benchmarks.md). native.py
 * compiles this file on first use and calls it through ctypes; without a C compiler the matrix
 * products run.
 *
 * Layout: the volume is `outer` x `length` x `inner` values, contiguous, and the filter runs along
 * the middle axis: out[o, i, e] = sum_k taps[k] * in[o, i + k - radius, e]. Indices outside
 * 0..length-1 are clamped to the edge (replicate = 1, what padding by replication and then
 * convolving does) or contribute nothing (replicate = 0, zero padding). `in` and `out` must not
 * overlap. The taps are summed in order k = 0..2 radius, each a multiply and an add in the
 * volume's type.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Threads: built with -fopenmp, a call splits its rows over OpenMP's threads when it has at least
 * PARALLEL_MINIMUM values; loaded after torch, this is torch's own thread pool (see sampler.c). */
#define PARALLEL_MINIMUM 32768
/* outputs filtered together, a block the compiler keeps in vector registers */
#define BLOCK 64
#if defined(__GNUC__) || defined(__clang__)
#define SPAN __attribute__((noinline))
#define INLINE static inline __attribute__((always_inline))
#else
#define SPAN
#define INLINE static inline
#endif
#ifdef _OPENMP
#include <omp.h>
#define PARALLEL_FOR(work) _Pragma("omp parallel for schedule(static) if ((work) >= PARALLEL_MINIMUM)")
#define PARALLEL_REGION(work) _Pragma("omp parallel if ((work) >= PARALLEL_MINIMUM)")
static int threads(void) { return omp_get_max_threads(); }
static int thread(void) { return omp_get_thread_num(); }
static int team(void) { return omp_get_num_threads(); }
#else
#define PARALLEL_FOR(work)
#define PARALLEL_REGION(work)
static int threads(void) { return 1; }
static int thread(void) { return 0; }
static int team(void) { return 1; }
#endif

#define DEFINE_FILTER(T, SUFFIX)                                                                   \
                                                                                                   \
/* m <= BLOCK outputs, each the sum over taps k of taps[k] * in[k * stride + e], accumulated in a */ \
/* block; inlined, and called with m = BLOCK, the block's count is a constant and its */          \
/* accumulators stay in vector registers while the taps go by */                                  \
INLINE void taps_block_##SUFFIX(const T *restrict in, T *restrict out, int64_t m, int64_t stride,              \
                    const T *restrict taps, int64_t count) {                                       \
    T acc[BLOCK];                                                                                  \
    for (int64_t e = 0; e < m; ++e) acc[e] = (T)0;                                                 \
    for (int64_t k = 0; k < count; ++k) {                                                          \
        const T t = taps[k];                                                                       \
        const T *restrict row = in + k * stride;                                                   \
        for (int64_t e = 0; e < m; ++e) acc[e] += t * row[e];                                      \
    }                                                                                              \
    for (int64_t e = 0; e < m; ++e) out[e] = acc[e];                                               \
}                                                                                                  \
                                                                                                   \
/* n outputs, each the sum over taps k of taps[k] * in[k * stride + e]: the loop over e is the    */ \
/* vectorised one, in whole blocks and then the rest */                                           \
static SPAN void taps_span_##SUFFIX(const T *restrict in, T *restrict out, int64_t n,             \
                                    int64_t stride, const T *restrict taps, int64_t count) {       \
    int64_t e0 = 0;                                                                                \
    for (; e0 + BLOCK <= n; e0 += BLOCK)                                                           \
        taps_block_##SUFFIX(in + e0, out + e0, BLOCK, stride, taps, count);                        \
    if (n > e0) taps_block_##SUFFIX(in + e0, out + e0, n - e0, stride, taps, count);               \
}                                                                                                  \
                                                                                                   \
/* output row i of a plane (length x inner) near an edge, where some taps fall outside it */      \
static SPAN void edge_row_##SUFFIX(const T *restrict in, T *restrict out, int64_t i,               \
                                   int64_t length, int64_t inner, const T *restrict taps,          \
                                   int64_t radius, int32_t replicate) {                            \
    for (int64_t e = 0; e < inner; ++e) out[e] = (T)0;                                             \
    for (int64_t k = 0; k <= 2 * radius; ++k) {                                                    \
        int64_t j = i + k - radius;                                                                \
        if (j < 0 || j >= length) {                                                                \
            if (!replicate) continue;                                                              \
            j = j < 0 ? 0 : length - 1;                                                            \
        }                                                                                          \
        const T t = taps[k];                                                                       \
        const T *restrict row = in + j * inner;                                                    \
        for (int64_t e = 0; e < inner; ++e) out[e] += t * row[e];                                  \
    }                                                                                              \
}                                                                                                  \
                                                                                                   \
/* a line of `length` contiguous values (the last axis), copied into `padded` with `radius` edge */ \
/* values on either side, so that every position's taps fall inside, and filtered in whole blocks */ \
/* (`rounded` values: length rounded up to BLOCK, the slack zero) into `filtered` */             \
static void line_##SUFFIX(const T *in, T *out, T *padded, T *filtered, int64_t length,             \
                          int64_t rounded, const T *taps, int64_t radius, int32_t replicate) {     \
    const T first = replicate ? in[0] : (T)0, last = replicate ? in[length - 1] : (T)0;            \
    for (int64_t i = 0; i < radius; ++i) padded[i] = first;                                        \
    memcpy(padded + radius, in, sizeof(T) * (size_t)length);                                       \
    for (int64_t i = radius + length; i < 2 * radius + length; ++i) padded[i] = last;              \
    taps_span_##SUFFIX(padded, filtered, rounded, 1, taps, 2 * radius + 1);                        \
    memcpy(out, filtered, sizeof(T) * (size_t)length);                                             \
}                                                                                                  \
                                                                                                   \
void filter_axis_##SUFFIX(const T *in, T *out, int64_t outer, int64_t length, int64_t inner,      \
                          const T *taps, int64_t radius, int32_t replicate) {                      \
    const int64_t work = outer * length * inner;                                                   \
    if (inner == 1) {                                                                              \
        const int64_t rounded = (length + BLOCK - 1) / BLOCK * BLOCK;                              \
        const int64_t each = 2 * rounded + 2 * radius;  /* padded line + filtered line */          \
        T *scratch = calloc((size_t)each * (size_t)threads(), sizeof(T));                          \
        if (scratch != NULL) {                                                                     \
            PARALLEL_FOR(work)                                                                     \
            for (int64_t o = 0; o < outer; ++o) {                                                  \
                T *padded = scratch + each * thread();                                             \
                line_##SUFFIX(in + o * length, out + o * length, padded,                           \
                              padded + rounded + 2 * radius, length, rounded, taps, radius,        \
                              replicate);                                                          \
            }                                                                                      \
            free(scratch);                                                                         \
            return;                                                                                \
        }                                                                                          \
        /* no memory for the padded lines: the planes' loops below, one value per row */          \
    }                                                                                              \
    /* rows low..high-1 of a plane have all their taps inside: one contiguous span per plane */   \
    const int64_t low = radius < length ? radius : length;                                         \
    const int64_t high = length - radius > low ? length - radius : low;                            \
    const int64_t interior = (high - low) * inner, edges = low + (length - high);                  \
    PARALLEL_REGION(work) {                                                                        \
        const int64_t part = thread(), parts = team();                                             \
        for (int64_t o = 0; o < outer; ++o) {                                                      \
            const T *plane = in + o * length * inner;                                              \
            T *target = out + o * length * inner;                                                  \
            const int64_t from = interior * part / parts, to = interior * (part + 1) / parts;      \
            if (to > from) /* no interior where the axis is shorter than the kernel */           \
                taps_span_##SUFFIX(plane + (low - radius) * inner + from,                          \
                                   target + low * inner + from, to - from, inner, taps,            \
                                   2 * radius + 1);                                                \
            for (int64_t q = edges * part / parts; q < edges * (part + 1) / parts; ++q) {          \
                const int64_t i = q < low ? q : high + (q - low);                                  \
                edge_row_##SUFFIX(plane, target + i * inner, i, length, inner, taps, radius,       \
                                  replicate);                                                      \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
}

DEFINE_FILTER(float, f32)
DEFINE_FILTER(double, f64)

