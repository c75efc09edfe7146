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
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Threads: built with -fopenmp, a call splits its rows over OpenMP's threads when it has at least
 * PARALLEL_MINIMUM values; loaded after torch, this is torch's own thread pool (see sampler.c). */
#define PARALLEL_MINIMUM 32768
/* outputs filtered together, a block the compiler keeps in vector registers; a quarter block */
/* for what is left of a span (short lines and planes at coarse levels) */
#define BLOCK 64
#define QUARTER 16
/* values of lines packed and filtered together (lines_) */
#define PACKED 4096
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

/* the row a tap at index j of an axis of `length` rows reads: j, clamped to the edge (replicate), */
/* or -1 where it lies outside and contributes nothing (zeros) */
static inline int64_t tap_row(int64_t j, int64_t length, int32_t replicate) {
    if (j >= 0 && j < length) return j;
    if (!replicate) return -1;
    return j < 0 ? 0 : length - 1;
}

#define DEFINE_FILTER(T, SUFFIX)                                                                   \
/* m <= BLOCK outputs, each the sum over taps k of taps[k] * in[k * stride + e], accumulated in */  \
/* a block; inlined, and called with a constant m, the block's accumulators stay in vector */    \
/* registers while the taps go by */                                                               \
INLINE void taps_block_##SUFFIX(const T *restrict in, T *restrict out, int64_t m, int64_t stride,  \
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
/* n outputs, each the sum over taps k of taps[k] * in[k * stride + e]: the loop over e is the */ \
/* vectorised one, in whole blocks, then in quarter blocks (one float32 or two float64 vectors */  \
/* of 512 bits), then the rest */                                                                  \
static SPAN void taps_span_##SUFFIX(const T *restrict in, T *restrict out, int64_t n,              \
                                    int64_t stride, const T *restrict taps, int64_t count) {       \
    int64_t e0 = 0;                                                                                \
    for (; e0 + BLOCK <= n; e0 += BLOCK)                                                           \
        taps_block_##SUFFIX(in + e0, out + e0, BLOCK, stride, taps, count);                        \
    for (; e0 + QUARTER <= n; e0 += QUARTER)                                                       \
        taps_block_##SUFFIX(in + e0, out + e0, QUARTER, stride, taps, count);                      \
    if (n > e0) taps_block_##SUFFIX(in + e0, out + e0, n - e0, stride, taps, count);               \
}                                                                                                  \
                                                                                                   \
/* output rows first..last-1 of a plane (length x inner) whose taps reach outside it: the input */ \
/* rows they read, first - radius .. last + radius - 1, copied into `scratch` with the edge row */ \
/* repeated (replicate) or zeros in place of the missing ones, then filtered as one span */        \
static void edge_rows_##SUFFIX(const T *plane, T *target, T *scratch, int64_t first, int64_t last, \
                               int64_t length, int64_t inner, const T *taps, int64_t radius,       \
                               int32_t replicate) {                                                \
    if (last <= first) return;                                                                     \
    for (int64_t q = 0; q < last - first + 2 * radius; ++q) {                                      \
        const int64_t j = tap_row(first - radius + q, length, replicate);                          \
        T *row = scratch + q * inner;                                                              \
        if (j < 0)                                                                                 \
            memset(row, 0, sizeof(T) * (size_t)inner);                                             \
        else                                                                                       \
            memcpy(row, plane + j * inner, sizeof(T) * (size_t)inner);                             \
    }                                                                                              \
    taps_span_##SUFFIX(scratch, target + first * inner, (last - first) * inner, inner, taps,       \
                       2 * radius + 1);                                                            \
}                                                                                                  \
                                                                                                   \
/* `count` lines of the last axis, each copied into `packed` with `radius` */                      \
/* edge values on either side, one after another, and filtered as one span into `filtered`: */     \
/* output i of line s is position s (length + 2 radius) + i, and the positions between lines */    \
/* (2 radius per line) are computed and dropped; at 15-63 values a line this wastes less than  */  \
/* rounding each line up to a block did, and the span's blocks are whole */                        \
static void lines_##SUFFIX(const T *in, T *out, T *packed, T *filtered, int64_t count,             \
                           int64_t length, const T *taps, int64_t radius, int32_t replicate) {     \
    const int64_t segment = length + 2 * radius;                                                   \
    for (int64_t s = 0; s < count; ++s) {                                                          \
        const T *line = in + s * length;                                                           \
        T *padded = packed + s * segment;                                                          \
        const T first = replicate ? line[0] : (T)0, last = replicate ? line[length - 1] : (T)0;    \
        for (int64_t i = 0; i < radius; ++i) padded[i] = first;                                    \
        memcpy(padded + radius, line, sizeof(T) * (size_t)length);                                 \
        for (int64_t i = radius + length; i < segment; ++i) padded[i] = last;                      \
    }                                                                                              \
    taps_span_##SUFFIX(packed, filtered, count * segment - 2 * radius, 1, taps, 2 * radius + 1);   \
    for (int64_t s = 0; s < count; ++s)                                                            \
        memcpy(out + s * length, filtered + s * segment, sizeof(T) * (size_t)length);              \
}                                                                                                  \
                                                                                                   \
void filter_axis_##SUFFIX(const T *in, T *out, int64_t outer, int64_t length, int64_t inner,       \
                          const T *taps, int64_t radius, int32_t replicate) {                      \
    const int64_t work = outer * length * inner;                                                   \
    if (inner == 1) {                                                                              \
        const int64_t segment = length + 2 * radius;                                               \
        const int64_t batch = PACKED / segment > 1 ? PACKED / segment : 1;                         \
        const int64_t each = 2 * batch * segment;  /* packed lines + filtered span */              \
        T *scratch = malloc(sizeof(T) * (size_t)each * (size_t)threads());                         \
        if (scratch != NULL) {                                                                     \
            PARALLEL_FOR(work)                                                                     \
            for (int64_t o = 0; o < outer; o += batch) {                                           \
                T *packed = scratch + each * thread();                                             \
                lines_##SUFFIX(in + o * length, out + o * length, packed, packed + batch * segment,\
                               outer - o < batch ? outer - o : batch, length, taps, radius,        \
                               replicate);                                                         \
            }                                                                                      \
            free(scratch);                                                                         \
            return;                                                                                \
        }                                                                                          \
        /* no memory for the packed lines: the planes' loops below, one value per row */           \
    }                                                                                              \
    /* rows low..high-1 of a plane have all their taps inside: one contiguous span per plane; */   \
    /* the rows before and after them are filtered from padded copies (edge_rows) */               \
    const int64_t low = radius < length ? radius : length;                                         \
    const int64_t high = length - radius > low ? length - radius : low;                            \
    const int64_t interior = (high - low) * inner, edges = low + (length - high);                  \
    const int64_t widest = low > length - high ? low : length - high;                              \
    const int64_t each = (widest + 2 * radius) * inner;                                            \
    T *scratch = malloc(sizeof(T) * (size_t)each * (size_t)threads());                             \
    PARALLEL_REGION(work) {                                                                        \
        const int64_t part = thread(), parts = team();                                             \
        T *own = scratch == NULL ? NULL : scratch + each * part;                                   \
        for (int64_t o = 0; o < outer; ++o) {                                                      \
            const T *plane = in + o * length * inner;                                              \
            T *target = out + o * length * inner;                                                  \
            const int64_t from = interior * part / parts, to = interior * (part + 1) / parts;      \
            if (to > from) /* no interior where the axis is shorter than the kernel */             \
                taps_span_##SUFFIX(plane + (low - radius) * inner + from,                          \
                                   target + low * inner + from, to - from, inner, taps,            \
                                   2 * radius + 1);                                                \
            /* this thread's share of the edge rows: q = 0..edges-1 runs over 0..low-1, then */    \
            /* high..length-1 */                                                                   \
            const int64_t q0 = edges * part / parts, q1 = edges * (part + 1) / parts;              \
            if (own != NULL) {                                                                     \
                edge_rows_##SUFFIX(plane, target, own, q0, q1 < low ? q1 : low, length, inner,     \
                                   taps, radius, replicate);                                       \
                edge_rows_##SUFFIX(plane, target, own, high + (q0 > low ? q0 : low) - low,         \
                                   high + (q1 > low ? q1 : low) - low, length, inner, taps,        \
                                   radius, replicate);                                             \
                continue;                                                                          \
            }                                                                                      \
            /* no memory for the padded rows: one row at a time, a pass over it per tap */         \
            for (int64_t q = q0; q < q1; ++q) {                                                    \
                const int64_t i = q < low ? q : high + (q - low);                                  \
                T *row = target + i * inner;                                                       \
                for (int64_t e = 0; e < inner; ++e) row[e] = (T)0;                                 \
                for (int64_t k = 0; k <= 2 * radius; ++k) {                                        \
                    const int64_t j = tap_row(i + k - radius, length, replicate);                  \
                    if (j < 0) continue;                                                           \
                    const T t = taps[k];                                                           \
                    const T *source = plane + j * inner;                                           \
                    for (int64_t e = 0; e < inner; ++e) row[e] += t * source[e];                   \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
    free(scratch);                                                                                 \
}

/* All three axes of 3-D volumes in one call, plane by plane: output plane i of a volume is the
 * z taps over input planes i - rz .. i + rz, then the y taps over that plane, then the x taps
 * along its rows (lines_, as filter_axis runs the last axis), while the plane and its neighbours
 * are in cache. filter_axis, one call per axis, reads and writes every value three times and
 * allocates two volume-sized intermediates; here each input plane is read from cache as the
 * window slides, and each output value is written once. The arithmetic is filter_axis's,
 * operation for operation: each output starts at 0 and adds taps[k] * value for k = 0 .. 2r in
 * order, an index outside the axis is clamped to the edge (replicate) or its term is left out
 * (zeros: filter_axis adds taps[k] * 0, which leaves a sum that started at +0 unchanged), so the
 * values are the same bit for bit. `in` is batch x d x h x w; so is `out`, which must not overlap
 * it. Returns 0, or -1 where the plane buffers cannot be allocated (nothing is written then). */
#define DEFINE_VOLUME_FILTER(T, SUFFIX)                                                            \
/* m <= BLOCK outputs, each the sum over k of taps[k] * rows[k][offset + e] */                     \
INLINE void list_block_##SUFFIX(const T *const *rows, int64_t offset, T *restrict out, int64_t m,  \
                                const T *restrict taps, int64_t count) {                           \
    T acc[BLOCK];                                                                                  \
    for (int64_t e = 0; e < m; ++e) acc[e] = (T)0;                                                 \
    for (int64_t k = 0; k < count; ++k) {                                                          \
        const T t = taps[k];                                                                       \
        const T *restrict row = rows[k] + offset;                                                  \
        for (int64_t e = 0; e < m; ++e) acc[e] += t * row[e];                                      \
    }                                                                                              \
    for (int64_t e = 0; e < m; ++e) out[e] = acc[e];                                               \
}                                                                                                  \
                                                                                                   \
/* n outputs from the rows a tap list reads (taps_span with a row per tap instead of a stride) */  \
static SPAN void list_span_##SUFFIX(const T *const *rows, T *restrict out, int64_t n,              \
                                    const T *restrict taps, int64_t count) {                       \
    int64_t e0 = 0;                                                                                \
    for (; e0 + BLOCK <= n; e0 += BLOCK) list_block_##SUFFIX(rows, e0, out + e0, BLOCK, taps, count); \
    for (; e0 + QUARTER <= n; e0 += QUARTER)                                                       \
        list_block_##SUFFIX(rows, e0, out + e0, QUARTER, taps, count);                             \
    if (n > e0) list_block_##SUFFIX(rows, e0, out + e0, n - e0, taps, count);                      \
}                                                                                                  \
                                                                                                   \
/* output row i (n values) of an axis of `length` rows `stride` apart from `first`: one span */    \
/* where every tap is inside, else the rows the taps read listed (clamped, or left out) */         \
static void axis_row_##SUFFIX(const T *first, T *out, int64_t n, int64_t stride, int64_t i,        \
                              int64_t length, const T *taps, int64_t radius, int32_t replicate) {  \
    if (i - radius >= 0 && i + radius < length) {                                                  \
        taps_span_##SUFFIX(first + (i - radius) * stride, out, n, stride, taps, 2 * radius + 1);   \
        return;                                                                                    \
    }                                                                                              \
    const T *rows[2 * radius + 1];                                                                 \
    T kept[2 * radius + 1];                                                                        \
    int64_t count = 0;                                                                             \
    for (int64_t k = 0; k <= 2 * radius; ++k) {                                                    \
        const int64_t j = tap_row(i + k - radius, length, replicate);                              \
        if (j < 0) continue;                                                                       \
        rows[count] = first + j * stride;                                                          \
        kept[count++] = taps[k];                                                                   \
    }                                                                                              \
    list_span_##SUFFIX(rows, out, n, kept, count);                                                 \
}                                                                                                  \
                                                                                                   \
int filter_volume_##SUFFIX(const T *in, T *out, int64_t batch, int64_t d, int64_t h, int64_t w,   \
                           const T *taps_z, int64_t rz, const T *taps_y, int64_t ry,              \
                           const T *taps_x, int64_t rx, int32_t replicate) {                      \
    const int64_t plane = h * w, planes = batch * d, work = planes * plane;                        \
    const int64_t low = ry < h ? ry : h, high = h - ry > low ? h - ry : low;                       \
    const int64_t widest = low > h - high ? low : h - high, edge_size = (widest + 2 * ry) * w;     \
    const int64_t packed_size = h * (w + 2 * rx), each = 2 * plane + 2 * packed_size + edge_size;  \
    const int64_t parts = work >= PARALLEL_MINIMUM ? threads() : 1;                                \
    T *buffers = malloc(sizeof(T) * (size_t)each * (size_t)parts);                                 \
    if (buffers == NULL) return -1;                                                                \
    PARALLEL_REGION(work) {                                                                        \
        const int64_t part = thread(), team_size = team();                                         \
        T *z_plane = buffers + each * part, *y_plane = z_plane + plane;                            \
        T *packed = y_plane + plane, *filtered = packed + packed_size, *edge = filtered + packed_size; \
        /* consecutive planes per thread, so that the z window slides through its cache */         \
        const int64_t first = planes * part / team_size, last = planes * (part + 1) / team_size;   \
        for (int64_t p = first; p < last; ++p) {                                                   \
            const int64_t i = p % d;                                                               \
            axis_row_##SUFFIX(in + (p - i) * plane, z_plane, plane, plane, i, d, taps_z, rz,       \
                              replicate);                                                          \
            /* the y taps as filter_axis runs them on a plane: the rows with every tap inside as */ \
            /* one span, the edge rows at each end from a padded copy */                          \
            if (high > low)                                                                        \
                taps_span_##SUFFIX(z_plane + (low - ry) * w, y_plane + low * w, (high - low) * w,  \
                                   w, taps_y, 2 * ry + 1);                                         \
            edge_rows_##SUFFIX(z_plane, y_plane, edge, 0, low, h, w, taps_y, ry, replicate);       \
            edge_rows_##SUFFIX(z_plane, y_plane, edge, high, h, h, w, taps_y, ry, replicate);      \
            lines_##SUFFIX(y_plane, out + p * plane, packed, filtered, h, w, taps_x, rx, replicate); \
        }                                                                                          \
    }                                                                                              \
    free(buffers);                                                                                 \
    return 0;                                                                                      \
}

/* Local CC's pointwise passes (metrics.py's _LocalCrossCorrelation), fused: the five maps it
 * box-sums, then from their box sums the clamped correlation of every window and the seven maps
 * whose box sums make the gradient, then the gradients; each a single pass in the volume's type,
 * where the same arithmetic as torch operations took about thirty passes over volume-sized
 * temporaries. The box sums between them are filter_axis's. */
#define CC_CHUNK 4096
#define CC_LANES 16
#define CC_MIN(a, b) ((a) < (b) ? (a) : (b))
#define CC_MAX(a, b) ((a) > (b) ? (a) : (b))

#define DEFINE_CORRELATION(T, SUFFIX)                                                              \
                                                                                                   \
/* the five maps local CC box-sums, f, m, f m, f^2 and m^2, into out (5 x n) */                    \
static SPAN void cc_products_span_##SUFFIX(const T *restrict f, const T *restrict m,               \
                                           T *restrict o0, T *restrict o1, T *restrict o2,         \
                                           T *restrict o3, T *restrict o4, int64_t first,          \
                                           int64_t last) {                                         \
    for (int64_t q = first; q < last; q++) {                                                       \
        const T a = f[q], b = m[q];                                                                \
        o0[q] = a; o1[q] = b; o2[q] = a * b; o3[q] = a * a; o4[q] = b * b;                         \
    }                                                                                              \
}                                                                                                  \
                                                                                                   \
void cc_products_##SUFFIX(const T *f, const T *m, T *out, int64_t n) {                             \
    const int64_t work = n;                                                                        \
    PARALLEL_FOR(work)                                                                             \
    for (int64_t first = 0; first < n; first += CC_CHUNK)                                          \
        cc_products_span_##SUFFIX(f, m, out, out + n, out + 2 * n, out + 3 * n, out + 4 * n, first, \
                                  first + CC_CHUNK < n ? first + CC_CHUNK : n);                    \
}                                                                                                  \
                                                                                                   \
/* from the five box sums (5 x d x h x w) of a radius-r box: the seven maps (7 x d x h x w) whose */ \
/* box sums make the gradient, and the sum of the clamped correlations (returned) */               \
/* one row of the weights pass: w voxels whose box holds `along_zy` times its count along x voxels */ \
static SPAN T cc_weights_row_##SUFFIX(const T *restrict s0, const T *restrict s1,                  \
                                      const T *restrict s2, const T *restrict s3,                  \
                                      const T *restrict s4, T *restrict o0, T *restrict o1,        \
                                      T *restrict o2, T *restrict o3, T *restrict o4,              \
                                      T *restrict o5, T *restrict o6, int64_t w, int64_t radius,   \
                                      T along_zy, T voxels) {                                      \
    const T epsilon = (T)1e-5;                                                                     \
    T lanes[CC_LANES];                                                                             \
    for (int l = 0; l < CC_LANES; l++) lanes[l] = (T)0;                                            \
    for (int64_t first = 0; first < w; first += CC_LANES) {                                        \
        const int64_t count_here = w - first < CC_LANES ? w - first : CC_LANES;                    \
        for (int64_t l = 0; l < count_here; l++) {                                                 \
            const int64_t k = first + l;                                                           \
            const T count = along_zy * (T)(CC_MIN(k + radius, w - 1) - CC_MAX(k - radius, 0) + 1); \
            const T sum_f = s0[k], sum_m = s1[k];                                                  \
            const T mean_f = sum_f / count, mean_m = sum_m / count;                                \
            const T cross = s2[k] - sum_f * mean_m;                                                \
            const T fixed_variance = s3[k] - sum_f * mean_f, moving_variance = s4[k] - sum_m * mean_m; \
            /* clamps that keep a NaN (as torch's do): a diverging run's loss turns NaN */         \
            const T fixed_positive = fixed_variance < (T)0 ? (T)0 : fixed_variance;                \
            const T moving_positive = moving_variance < (T)0 ? (T)0 : moving_variance;             \
            const T denominator = fixed_positive * moving_positive + epsilon * count;              \
            const T correlation = cross * cross / denominator;                                     \
            const T scale = (correlation <= (T)1 ? (T)1 : (T)0) / (denominator * voxels);          \
            const T cross_weight = (T)2 * cross * scale;                                           \
            const T squared = cross * cross * scale / denominator;                                 \
            const T fixed_weight = -squared * moving_positive * (fixed_variance >= (T)0 ? (T)1 : (T)0); \
            const T moving_weight = -squared * fixed_positive * (moving_variance >= (T)0 ? (T)1 : (T)0); \
            o0[k] = cross_weight; o1[k] = cross_weight * mean_f; o2[k] = cross_weight * mean_m;    \
            o3[k] = fixed_weight; o4[k] = fixed_weight * mean_f;                                   \
            o5[k] = moving_weight; o6[k] = moving_weight * mean_m;                                 \
            lanes[l] += correlation > (T)1 ? (T)1 : correlation;                                   \
        }                                                                                          \
    }                                                                                              \
    T sum = (T)0;                                                                                  \
    for (int l = 0; l < CC_LANES; l++) sum += lanes[l];                                            \
    return sum;                                                                                    \
}                                                                                                  \
                                                                                                   \
/* from the five box sums (5 x d x h x w) of a radius-r box: the seven maps (7 x d x h x w) whose */ \
/* box sums make the gradient, and the sum of the clamped correlations (returned) */               \
T cc_weights_##SUFFIX(const T *sums, int64_t d, int64_t h, int64_t w, int64_t radius, T *out) {    \
    const int64_t n = d * h * w;                                                                   \
    const T voxels = (T)n;                                                                         \
    /* one sum per row, added up in order after: the same total on any number of threads */        \
    T *row_sums = (T *)malloc((size_t)(d * h) * sizeof(T));                                        \
    if (row_sums == NULL) return (T)NAN;                                                           \
    const int64_t work = n;                                                                        \
    PARALLEL_FOR(work)                                                                             \
    for (int64_t row = 0; row < d * h; row++) {                                                    \
        const int64_t i = row / h, j = row % h, at = row * w;                                      \
        const T along_zy = (T)((CC_MIN(i + radius, d - 1) - CC_MAX(i - radius, 0) + 1)             \
                               * (CC_MIN(j + radius, h - 1) - CC_MAX(j - radius, 0) + 1));         \
        row_sums[row] = cc_weights_row_##SUFFIX(                                                   \
            sums + at, sums + n + at, sums + 2 * n + at, sums + 3 * n + at, sums + 4 * n + at,     \
            out + at, out + n + at, out + 2 * n + at, out + 3 * n + at, out + 4 * n + at,          \
            out + 5 * n + at, out + 6 * n + at, w, radius, along_zy, voxels);                      \
    }                                                                                              \
    T total = (T)0;                                                                                \
    for (int64_t row = 0; row < d * h; row++) total += row_sums[row];                              \
    free(row_sums);                                                                                \
    return total;                                                                                  \
}                                                                                                  \
                                                                                                   \
/* scale (a s0 - first + 2 (b second - third)): dL/df with (a, b) = (m, f), dL/dm with (f, m) */   \
static SPAN void cc_gradient_span_##SUFFIX(const T *restrict a, const T *restrict b,               \
                                           const T *restrict s0, const T *restrict first_sum,      \
                                           const T *restrict second_sum, const T *restrict third_sum, \
                                           T scale, T *restrict grad, int64_t first, int64_t last) { \
    for (int64_t q = first; q < last; q++)                                                         \
        grad[q] = scale * (a[q] * s0[q] - first_sum[q] + (T)2 * (b[q] * second_sum[q] - third_sum[q])); \
}                                                                                                  \
                                                                                                   \
/* the gradients from the seven maps' box sums (7 x n), times `scale` (the loss's incoming */      \
/* gradient), into grad_f and grad_m (either may be NULL) */                                       \
void cc_gradient_##SUFFIX(const T *f, const T *m, const T *sums, int64_t n, T scale, T *grad_f,    \
                          T *grad_m) {                                                             \
    const int64_t work = n;                                                                        \
    PARALLEL_FOR(work)                                                                             \
    for (int64_t first = 0; first < n; first += CC_CHUNK) {                                        \
        const int64_t last = first + CC_CHUNK < n ? first + CC_CHUNK : n;                          \
        if (grad_f != NULL)                                                                        \
            cc_gradient_span_##SUFFIX(m, f, sums, sums + 2 * n, sums + 3 * n, sums + 4 * n, scale, \
                                      grad_f, first, last);                                        \
        if (grad_m != NULL)                                                                        \
            cc_gradient_span_##SUFFIX(f, m, sums, sums + n, sums + 5 * n, sums + 6 * n, scale,     \
                                      grad_m, first, last);                                        \
    }                                                                                              \
}


DEFINE_FILTER(float, f32)
DEFINE_FILTER(double, f64)
DEFINE_VOLUME_FILTER(float, f32)
DEFINE_VOLUME_FILTER(double, f64)
DEFINE_CORRELATION(float, f32)
DEFINE_CORRELATION(double, f64)

