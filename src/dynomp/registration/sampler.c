/* The engine's trilinear sampler on the CPU, in C, for compilers that vectorise its loops.
 *
 * The same interpolation as the numba kernels in interpolation.py (border padding,
 * align_corners=True, the arithmetic in the volume's own type), written so that a C compiler with
 * -O3 -march=native turns each loop over points into SIMD code with gather loads: 16 float32 or
 * 8 float64 points per AVX-512 instruction, where numba's loops stay scalar. native.py compiles
 * this file on first use and calls it through ctypes; a machine without a C compiler keeps the
 * numba kernels.
 *
 * Layout: a volume is C channels of D x H x W values, contiguous; points are (3, N) rows of z, y
 * and x voxel coordinates; a displacement is (3, gD, gH, gW) and is sampled at x + u(x) for every
 * voxel x of its own grid. Every function handles the points (or grid rows) start..stop, so that
 * the caller can split a call over threads. Flat voxel indices are 32-bit: the caller checks that
 * a channel has fewer than 2^31 voxels.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Threads. Built with -fopenmp, each function splits its points or rows over OpenMP's threads when
 * it has at least PARALLEL_MINIMUM samples. Loaded after torch, the library's libgomp.so.1 is the
 * one torch already loaded, so these loops run on torch's own thread pool, as many threads as
 * torch.set_num_threads says, with no second pool to spin beside it. */
#define PARALLEL_MINIMUM 16384
/* a span's loops are compiled on their own, where their restrict pointers let them vectorise */
#if defined(__GNUC__) || defined(__clang__)
#define SPAN __attribute__((noinline))
#else
#define SPAN
#endif
#ifdef _OPENMP
#include <omp.h>
/* the calling thread's slot in a per-thread table, and how many slots a split may use */
#define MATTES_SLOT omp_get_thread_num()
#define MATTES_SLOTS omp_get_max_threads()
/* CALL over start..stop: one contiguous part (FROM..TO) per thread */
#define SPLIT(work, CALL)                                                                          \
    const int parallel = (work) >= PARALLEL_MINIMUM;                                               \
    _Pragma("omp parallel if (parallel)")                                                          \
    {                                                                                              \
        const int64_t part = omp_get_thread_num(), parts = omp_get_num_threads();                  \
        const int64_t FROM = start + (stop - start) * part / parts;                                \
        const int64_t TO = start + (stop - start) * (part + 1) / parts;                            \
        CALL;                                                                                      \
    }
#else
#define MATTES_SLOT 0
#define MATTES_SLOTS 1
#define SPLIT(work, CALL)                                                                          \
    {                                                                                              \
        const int64_t FROM = start, TO = stop;                                                     \
        CALL;                                                                                      \
    }
#endif

/* A cell's two corners along x, v[p] and v[p + 1], neighbours in memory: in float32, one 8-byte
 * load. A vectorised loop fetches a cell's corners with gather instructions, whose cost goes by the
 * number of elements fetched rather than their width: float32's eight gathers per value cost about
 * as much as float64's, and as four 8-byte gathers they cost half (registration_parts.py).
 * The same values bit for bit. */
/* (built with -DSAMPLER_SINGLE_LOADS, the two are loaded one by one, as registration_parts.py compares) */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__ && !defined(SAMPLER_SINGLE_LOADS)
static inline void pair_f32(const float *restrict v, int32_t p, float *first, float *second) {
    uint64_t bits;
    memcpy(&bits, v + p, sizeof bits);
    const uint32_t low = (uint32_t)bits, high = (uint32_t)(bits >> 32);
    memcpy(first, &low, sizeof low);
    memcpy(second, &high, sizeof high);
}
#else
static inline void pair_f32(const float *restrict v, int32_t p, float *first, float *second) {
    *first = v[p];
    *second = v[p + 1];
}
#endif
static inline void pair_f64(const double *restrict v, int32_t p, double *first, double *second) {
    *first = v[p];
    *second = v[p + 1];
}

/* The loop given twice, once with PAIRED the constant 1 (where CONDITION holds: the volume has more
 * than one voxel along x, so that v[p + 1] is a cell's other x corner) and once with 0, so that
 * each copy vectorises with its own loads. */
#define PAIRED_VERSIONS(CONDITION, ...)                                                            \
    if (CONDITION) { enum { PAIRED = 1 }; __VA_ARGS__ } else { enum { PAIRED = 0 }; __VA_ARGS__ }

#define DEFINE_SAMPLER(T, SUFFIX)                                                                  \
                                                                                                   \
typedef struct {                                                                                   \
    T lz, ly, lx;           /* the largest coordinate per axis */                                  \
    int32_t sz, sy, sx;     /* flat steps to a cell's upper corners (0 along a 1-voxel axis) */    \
    int32_t mz, my, mx;     /* the largest lower corner per axis */                                \
} geometry_##SUFFIX;                                                                               \
                                                                                                   \
static inline geometry_##SUFFIX geometry_of_##SUFFIX(int64_t d, int64_t h, int64_t w) {            \
    geometry_##SUFFIX g;                                                                           \
    g.lz = (T)(d - 1); g.ly = (T)(h - 1); g.lx = (T)(w - 1);                                       \
    g.sz = d > 1 ? (int32_t)(h * w) : 0; g.sy = h > 1 ? (int32_t)w : 0; g.sx = w > 1 ? 1 : 0;      \
    g.mz = d > 2 ? (int32_t)(d - 2) : 0; g.my = h > 2 ? (int32_t)(h - 2) : 0;                      \
    g.mx = w > 2 ? (int32_t)(w - 2) : 0;                                                           \
    return g;                                                                                      \
}                                                                                                  \
                                                                                                   \
/* the border-clamped cell of (z, y, x): its lower corner's flat index and the fractions */       \
static inline int32_t cell_##SUFFIX(const geometry_##SUFFIX *g, T z, T y, T x,                     \
                                    T *fz, T *fy, T *fx) {                                         \
    z = z < (T)0 ? (T)0 : (z > g->lz ? g->lz : z);                                                 \
    y = y < (T)0 ? (T)0 : (y > g->ly ? g->ly : y);                                                 \
    x = x < (T)0 ? (T)0 : (x > g->lx ? g->lx : x);                                                 \
    int32_t i = (int32_t)z, j = (int32_t)y, k = (int32_t)x;                                        \
    i = i < g->mz ? i : g->mz; j = j < g->my ? j : g->my; k = k < g->mx ? k : g->mx;               \
    *fz = z - (T)i; *fy = y - (T)j; *fx = x - (T)k;                                                \
    return i * g->sz + j * g->sy + k * g->sx;                                                      \
}                                                                                                  \
                                                                                                   \
/* the cell's eight corners (z, y, x bits of the index: v000, v001, v010, ...) */                 \
static inline void corners_##SUFFIX(const T *restrict v, const geometry_##SUFFIX *g, int32_t p,     \
                                    int paired, T *c) {                                            \
    const int32_t sz = g->sz, sy = g->sy, sx = g->sx;                                              \
    if (paired) {                                                                                  \
        pair_##SUFFIX(v, p, c, c + 1);                                                             \
        pair_##SUFFIX(v, p + sy, c + 2, c + 3);                                                    \
        pair_##SUFFIX(v, p + sz, c + 4, c + 5);                                                    \
        pair_##SUFFIX(v, p + sz + sy, c + 6, c + 7);                                               \
    } else {                                                                                       \
        c[0] = v[p]; c[1] = v[p + sx]; c[2] = v[p + sy]; c[3] = v[p + sy + sx];                    \
        c[4] = v[p + sz]; c[5] = v[p + sz + sx]; c[6] = v[p + sz + sy]; c[7] = v[p + sz + sy + sx]; \
    }                                                                                              \
}                                                                                                  \
                                                                                                   \
/* `paired`: g->sx is 1 (PAIRED_VERSIONS passes a constant) */                                     \
static inline T value_##SUFFIX(const T *restrict v, const geometry_##SUFFIX *g, int32_t p,         \
                               T fz, T fy, T fx, int paired) {                                     \
    T c[8];                                                                                        \
    corners_##SUFFIX(v, g, p, paired, c);                                                          \
    T a = c[0] + fx * (c[1] - c[0]);                                                               \
    T b = c[2] + fx * (c[3] - c[2]);                                                               \
    T e = c[4] + fx * (c[5] - c[4]);                                                               \
    T f = c[6] + fx * (c[7] - c[6]);                                                               \
    T low = a + fy * (b - a);                                                                      \
    return low + fz * (e + fy * (f - e) - low);                                                    \
}                                                                                                  \
                                                                                                   \
/* the value's derivatives along z, y and x, each times `weight`, added to *gz, *gy, *gx where */  \
/* the coordinate is inside the grid (a clamped coordinate does not move the value) */            \
static inline void partials_##SUFFIX(const T *restrict v, const geometry_##SUFFIX *g, int32_t p,   \
                                     T z, T y, T x, T fz, T fy, T fx, T weight,                    \
                                     T *gz, T *gy, T *gx, int paired) {                            \
    T c[8];                                                                                        \
    corners_##SUFFIX(v, g, p, paired, c);                                                          \
    const T v000 = c[0], v001 = c[1], v010 = c[2], v011 = c[3];                                    \
    const T v100 = c[4], v101 = c[5], v110 = c[6], v111 = c[7];                                    \
    T a = v000 + fx * (v001 - v000), b = v010 + fx * (v011 - v010);                                \
    T e = v100 + fx * (v101 - v100), f = v110 + fx * (v111 - v110);                                \
    T low = (v001 - v000) + fy * ((v011 - v010) - (v001 - v000));                                  \
    T high = (v101 - v100) + fy * ((v111 - v110) - (v101 - v100));                                 \
    T dz = (e + fy * (f - e)) - (a + fy * (b - a));                                                \
    T dy = (b - a) + fz * ((f - e) - (b - a));                                                     \
    T dx = low + fz * (high - low);                                                                \
    *gz += ((T)0 < z && z < g->lz) ? weight * dz : (T)0;                                           \
    *gy += ((T)0 < y && y < g->ly) ? weight * dy : (T)0;                                           \
    *gx += ((T)0 < x && x < g->lx) ? weight * dx : (T)0;                                           \
}                                                                                                  \
                                                                                                   \
/* values of the C-channel volume at the points start..stop of points (3, n) into out (C, n) */    \
static SPAN void points_span_##SUFFIX(const T *restrict volume, int64_t channels, int64_t d, int64_t h, \
                                 int64_t w, const T *restrict points, int64_t n, T *restrict out,  \
                                 int64_t start, int64_t stop) {                                    \
    const geometry_##SUFFIX g = geometry_of_##SUFFIX(d, h, w);                                     \
    const int64_t size = d * h * w;                                                                \
    const T *pz = points, *py = points + n, *px = points + 2 * n;                                  \
    for (int64_t c = 0; c < channels; c++) {                                                       \
        const T *restrict v = volume + c * size;                                                   \
        T *restrict o = out + c * n;                                                               \
        PAIRED_VERSIONS(g.sx == 1,                                                                 \
            for (int64_t q = start; q < stop; q++) {                                               \
                T fz, fy, fx;                                                                      \
                int32_t p = cell_##SUFFIX(&g, pz[q], py[q], px[q], &fz, &fy, &fx);                 \
                o[q] = value_##SUFFIX(v, &g, p, fz, fy, fx, PAIRED);                               \
            }                                                                                      \
        )                                                                                          \
    }                                                                                              \
}                                                                                                  \
                                                                                                   \
/* the gradient with respect to the points start..stop, given grad_out (C, n) */                   \
static SPAN void points_backward_span_##SUFFIX(const T *restrict volume, int64_t channels, int64_t d,   \
                                          int64_t h, int64_t w, const T *restrict points,          \
                                          int64_t n, const T *restrict grad_out,                   \
                                          T *restrict grad_points, int64_t start, int64_t stop) {  \
    const geometry_##SUFFIX g = geometry_of_##SUFFIX(d, h, w);                                     \
    const int64_t size = d * h * w;                                                                \
    const T *pz = points, *py = points + n, *px = points + 2 * n;                                  \
    T *restrict gz = grad_points, *restrict gy = grad_points + n, *restrict gx = grad_points + 2 * n; \
    for (int64_t q = start; q < stop; q++) gz[q] = gy[q] = gx[q] = (T)0;                           \
    for (int64_t c = 0; c < channels; c++) {                                                       \
        const T *restrict v = volume + c * size;                                                   \
        const T *restrict weights = grad_out + c * n;                                              \
        PAIRED_VERSIONS(g.sx == 1,                                                                 \
            for (int64_t q = start; q < stop; q++) {                                               \
                T fz, fy, fx, z = pz[q], y = py[q], x = px[q];                                     \
                int32_t p = cell_##SUFFIX(&g, z, y, x, &fz, &fy, &fx);                             \
                partials_##SUFFIX(v, &g, p, z, y, x, fz, fy, fx, weights[q], gz + q, gy + q, gx + q, \
                                  PAIRED);                                                         \
            }                                                                                      \
        )                                                                                          \
    }                                                                                              \
}                                                                                                  \
                                                                                                   \
/* values at x + u(x) for the rows start..stop of u's grid (a row: one z and y, all x) */          \
static SPAN void displaced_span_##SUFFIX(const T *restrict volume, int64_t channels, int64_t d,         \
                                    int64_t h, int64_t w, const T *restrict displacement,          \
                                    int64_t grid_h, int64_t grid_w, int64_t n, T *restrict out,    \
                                    int64_t start, int64_t stop) {                                 \
    const geometry_##SUFFIX g = geometry_of_##SUFFIX(d, h, w);                                     \
    const int64_t size = d * h * w;                                                                \
    const T *uz = displacement, *uy = displacement + n, *ux = displacement + 2 * n;                \
    if (channels == 3) { /* a displacement field (compose): one cell lookup for its components */ \
        const T *restrict v0 = volume, *restrict v1 = volume + size, *restrict v2 = volume + 2 * size; \
        T *restrict o0 = out, *restrict o1 = out + n, *restrict o2 = out + 2 * n;                  \
        PAIRED_VERSIONS(g.sx == 1,                                                                 \
            for (int64_t row = start; row < stop; row++) {                                         \
                const T i = (T)(row / grid_h), j = (T)(row % grid_h);                              \
                const int64_t first = row * grid_w;                                                \
                for (int64_t k = 0; k < grid_w; k++) {                                             \
                    const int64_t q = first + k;                                                   \
                    T fz, fy, fx;                                                                  \
                    int32_t p = cell_##SUFFIX(&g, i + uz[q], j + uy[q], (T)k + ux[q],              \
                                              &fz, &fy, &fx);                                      \
                    o0[q] = value_##SUFFIX(v0, &g, p, fz, fy, fx, PAIRED);                         \
                    o1[q] = value_##SUFFIX(v1, &g, p, fz, fy, fx, PAIRED);                         \
                    o2[q] = value_##SUFFIX(v2, &g, p, fz, fy, fx, PAIRED);                         \
                }                                                                                  \
            }                                                                                      \
        )                                                                                          \
        return;                                                                                    \
    }                                                                                              \
    for (int64_t c = 0; c < channels; c++) {                                                       \
        const T *restrict v = volume + c * size;                                                   \
        T *restrict o = out + c * n;                                                               \
        PAIRED_VERSIONS(g.sx == 1,                                                                 \
            for (int64_t row = start; row < stop; row++) {                                         \
                const T i = (T)(row / grid_h), j = (T)(row % grid_h);                              \
                const int64_t first = row * grid_w;                                                \
                for (int64_t k = 0; k < grid_w; k++) {                                             \
                    const int64_t q = first + k;                                                   \
                    T fz, fy, fx;                                                                  \
                    int32_t p = cell_##SUFFIX(&g, i + uz[q], j + uy[q], (T)k + ux[q],              \
                                              &fz, &fy, &fx);                                      \
                    o[q] = value_##SUFFIX(v, &g, p, fz, fy, fx, PAIRED);                           \
                }                                                                                  \
            }                                                                                      \
        )                                                                                          \
    }                                                                                              \
}                                                                                                  \
                                                                                                   \
/* the gradient with respect to u for the rows start..stop, given grad_out (C, n) */               \
static SPAN void displaced_backward_span_##SUFFIX(const T *restrict volume, int64_t channels, int64_t d, \
                                             int64_t h, int64_t w, const T *restrict displacement, \
                                             int64_t grid_h, int64_t grid_w, int64_t n,            \
                                             const T *restrict grad_out,                           \
                                             T *restrict grad_displacement, int64_t start,         \
                                             int64_t stop) {                                       \
    const geometry_##SUFFIX g = geometry_of_##SUFFIX(d, h, w);                                     \
    const int64_t size = d * h * w;                                                                \
    const T *uz = displacement, *uy = displacement + n, *ux = displacement + 2 * n;                \
    T *restrict gz = grad_displacement, *restrict gy = grad_displacement + n;                      \
    T *restrict gx = grad_displacement + 2 * n;                                                    \
    for (int64_t q = start * grid_w; q < stop * grid_w; q++) gz[q] = gy[q] = gx[q] = (T)0;         \
    for (int64_t c = 0; c < channels; c++) {                                                       \
        const T *restrict v = volume + c * size;                                                   \
        const T *restrict weights = grad_out + c * n;                                              \
        PAIRED_VERSIONS(g.sx == 1,                                                                 \
            for (int64_t row = start; row < stop; row++) {                                         \
                const T i = (T)(row / grid_h), j = (T)(row % grid_h);                              \
                const int64_t first = row * grid_w;                                                \
                for (int64_t k = 0; k < grid_w; k++) {                                             \
                    const int64_t q = first + k;                                                   \
                    T fz, fy, fx, z = i + uz[q], y = j + uy[q], x = (T)k + ux[q];                  \
                    int32_t p = cell_##SUFFIX(&g, z, y, x, &fz, &fy, &fx);                         \
                    partials_##SUFFIX(v, &g, p, z, y, x, fz, fy, fx, weights[q], gz + q, gy + q, gx + q, \
                                      PAIRED);                                                     \
                }                                                                                  \
            }                                                                                      \
        )                                                                                          \
    }                                                                                              \
}                                                                                                  \
                                                                                                   \
/* the exported kernels: the span start..stop, split over OpenMP's threads where it is large */   \
void sample_points_##SUFFIX(const T *volume, int64_t channels, int64_t d, int64_t h, int64_t w,    \
                            const T *points, int64_t n, T *out, int64_t start, int64_t stop) {     \
    SPLIT((stop - start) * channels, points_span_##SUFFIX(volume, channels, d, h, w, points, n,    \
                                                          out, FROM, TO))                          \
}                                                                                                  \
void sample_points_backward_##SUFFIX(const T *volume, int64_t channels, int64_t d, int64_t h,      \
                                     int64_t w, const T *points, int64_t n, const T *grad_out,     \
                                     T *grad_points, int64_t start, int64_t stop) {                \
    SPLIT((stop - start) * channels, points_backward_span_##SUFFIX(volume, channels, d, h, w,      \
                                                                   points, n, grad_out,            \
                                                                   grad_points, FROM, TO))         \
}                                                                                                  \
void sample_displaced_##SUFFIX(const T *volume, int64_t channels, int64_t d, int64_t h, int64_t w, \
                               const T *displacement, int64_t grid_h, int64_t grid_w, int64_t n,   \
                               T *out, int64_t start, int64_t stop) {                              \
    SPLIT((stop - start) * grid_w * channels, displaced_span_##SUFFIX(volume, channels, d, h, w,   \
                                                                      displacement, grid_h,        \
                                                                      grid_w, n, out, FROM, TO))   \
}                                                                                                  \
void sample_displaced_backward_##SUFFIX(const T *volume, int64_t channels, int64_t d, int64_t h,   \
                                        int64_t w, const T *displacement, int64_t grid_h,          \
                                        int64_t grid_w, int64_t n, const T *grad_out,              \
                                        T *grad_displacement, int64_t start, int64_t stop) {       \
    SPLIT((stop - start) * grid_w * channels,                                                      \
          displaced_backward_span_##SUFFIX(volume, channels, d, h, w, displacement, grid_h,        \
                                           grid_w, n, grad_out, grad_displacement, FROM, TO))      \
}

/* Inverting a displacement field (transforms.invert): one step in one pass. For each voxel x of
 * v's grid (u's grid too), r = v(x) + u(x + v(x)), with u border-clamped and trilinear as in
 * sample_displaced. The damped fixed-point step is out(x) = v(x) - damping * r. The Newton step
 * solves (I + J) s = -r, J = Du at x + v(x) (the trilinear interpolant's own partials, zero along
 * a clamped axis: the Jacobian of the map y -> y + u(y) is I + J), and takes out(x) = v(x) + s where
 * det(I + J) > INVERSION_NEWTON_DETERMINANT, the damped step elsewhere (a map that folds or
 * squeezes a voxel below that volume has no usable local inverse). out and v are distinct: the
 * caller keeps v where the step is not taken, and swaps the two otherwise. The largest |r| is kept
 * in INVERSION_LANES independent lanes, so that the loop vectorises; a NaN is flagged. */
#define INVERSION_NEWTON_DETERMINANT 0.1
#define INVERSION_LANES 16
#define DEFINE_INVERSION(T, SUFFIX, ABS)                                                           \
/* the largest of the threads' results, NaN where a thread flagged one */                          \
static inline T slots_largest_##SUFFIX(const T *values, const int *flags, int slots) {            \
    T largest = (T)0;                                                                              \
    int nan = 0;                                                                                   \
    for (int t = 0; t < slots; t++) {                                                              \
        largest = values[t] > largest ? values[t] : largest;                                       \
        nan |= flags[t];                                                                           \
    }                                                                                              \
    return nan ? (T)NAN : largest;                                                                 \
}                                                                                                  \
                                                                                                   \
static SPAN T inversion_span_##SUFFIX(const T *restrict u, int64_t d, int64_t h, int64_t w,        \
                                      const T *restrict v, T damping, int newton, T *restrict out, \
                                      int64_t start, int64_t stop, int *nan) {                     \
    const geometry_##SUFFIX g = geometry_of_##SUFFIX(d, h, w);                                     \
    const int64_t n = d * h * w;                                                                   \
    const T *restrict u0 = u, *restrict u1 = u + n, *restrict u2 = u + 2 * n;                      \
    const T *restrict vz = v, *restrict vy = v + n, *restrict vx = v + 2 * n;                      \
    T *restrict oz = out, *restrict oy = out + n, *restrict ox = out + 2 * n;                      \
    T lanes[INVERSION_LANES];                                                                      \
    int invalid = 0;                                                                               \
    for (int l = 0; l < INVERSION_LANES; l++) lanes[l] = (T)0;                                     \
    PAIRED_VERSIONS(g.sx == 1,                                                                     \
        for (int64_t row = start; row < stop; row++) {                                             \
            const T i = (T)(row / h), j = (T)(row % h);                                            \
            const int64_t first = row * w;                                                         \
            for (int64_t k0 = 0; k0 < w; k0 += INVERSION_LANES) {                                  \
                const int64_t count = w - k0 < INVERSION_LANES ? w - k0 : INVERSION_LANES;         \
                for (int64_t l = 0; l < count; l++) {                                              \
                    const int64_t q = first + k0 + l;                                              \
                    const T a = vz[q], b = vy[q], c = vx[q];                                       \
                    const T z = i + a, y = j + b, x = (T)(k0 + l) + c;                             \
                    T fz, fy, fx;                                                                  \
                    int32_t p = cell_##SUFFIX(&g, z, y, x, &fz, &fy, &fx);                         \
                    const T rz = value_##SUFFIX(u0, &g, p, fz, fy, fx, PAIRED) + a;                \
                    const T ry = value_##SUFFIX(u1, &g, p, fz, fy, fx, PAIRED) + b;                \
                    const T rx = value_##SUFFIX(u2, &g, p, fz, fy, fx, PAIRED) + c;                \
                    T sz = -damping * rz, sy = -damping * ry, sx = -damping * rx;                  \
                    if (newton) {                                                                  \
                        /* m = I + J, row r the partials of u's component r */                     \
                        T m00 = 1, m01 = 0, m02 = 0, m10 = 0, m11 = 1, m12 = 0, m20 = 0, m21 = 0, m22 = 1; \
                        partials_##SUFFIX(u0, &g, p, z, y, x, fz, fy, fx, (T)1, &m00, &m01, &m02, PAIRED); \
                        partials_##SUFFIX(u1, &g, p, z, y, x, fz, fy, fx, (T)1, &m10, &m11, &m12, PAIRED); \
                        partials_##SUFFIX(u2, &g, p, z, y, x, fz, fy, fx, (T)1, &m20, &m21, &m22, PAIRED); \
                        const T c00 = m11 * m22 - m12 * m21, c01 = m12 * m20 - m10 * m22;          \
                        const T c02 = m10 * m21 - m11 * m20;                                       \
                        const T det = m00 * c00 + m01 * c01 + m02 * c02;                           \
                        if (det > (T)INVERSION_NEWTON_DETERMINANT) {                               \
                            /* s = -m^-1 r, m^-1 the adjugate over the determinant */              \
                            const T scale = (T)-1 / det;                                           \
                            sz = scale * (c00 * rz + (m02 * m21 - m01 * m22) * ry + (m01 * m12 - m02 * m11) * rx); \
                            sy = scale * (c01 * rz + (m00 * m22 - m02 * m20) * ry + (m02 * m10 - m00 * m12) * rx); \
                            sx = scale * (c02 * rz + (m01 * m20 - m00 * m21) * ry + (m00 * m11 - m01 * m10) * rx); \
                        }                                                                          \
                    }                                                                              \
                    oz[q] = a + sz;                                                                \
                    oy[q] = b + sy;                                                                \
                    ox[q] = c + sx;                                                                \
                    const T mz = ABS(rz), my = ABS(ry), mx = ABS(rx);                              \
                    T m = mz > my ? mz : my;                                                       \
                    m = mx > m ? mx : m;                                                           \
                    invalid |= (rz != rz) | (ry != ry) | (rx != rx);                               \
                    lanes[l] = m > lanes[l] ? m : lanes[l];                                        \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
    )                                                                                              \
    T largest = (T)0;                                                                              \
    for (int l = 0; l < INVERSION_LANES; l++) largest = lanes[l] > largest ? lanes[l] : largest;   \
    if (invalid) *nan = 1;                                                                         \
    return largest;                                                                                \
}                                                                                                  \
                                                                                                   \
/* the step over the whole field, split over OpenMP's threads where it is large (SPLIT, one result */\
/* slot per thread as linear_mattes keeps them): the largest |r|, NaN where any r is NaN; `newton` */\
/* chooses the Newton step, else the damped one */                                                \
T inversion_step_##SUFFIX(const T *u, int64_t d, int64_t h, int64_t w, const T *v, T damping,      \
                          T *out, int newton) {                                                    \
    const int64_t start = 0, stop = d * h;                                                         \
    const int slots = MATTES_SLOTS < MATTES_SLOTS_MAX ? MATTES_SLOTS : MATTES_SLOTS_MAX;           \
    T moves[MATTES_SLOTS_MAX] = {0};  /* not `parts`: SPLIT names its team size so */              \
    int flags[MATTES_SLOTS_MAX] = {0};                                                             \
    {                                                                                              \
        SPLIT((stop - start) * w,                                                                  \
              moves[MATTES_SLOT] = inversion_span_##SUFFIX(u, d, h, w, v, damping, newton, out,    \
                                                           FROM, TO, flags + MATTES_SLOT))         \
    }                                                                                              \
    return slots_largest_##SUFFIX(moves, flags, slots);                                            \
}

/* SyN's step (pipeline.SymmetricProblem._composed), fused. update_norm: the largest dz^2 + dy^2 +
 * dx^2 over the n voxels of a (3, n) direction (kept in INVERSION_LANES lanes; NaN where any is
 * NaN). compose_scaled: out(x) = s d(x) + u(x + s d(x)) on u's grid, with u border-clamped and
 * trilinear as in sample_displaced: transforms.compose(u, s d), the same operations in the same
 * order, with neither s d nor the warped field held in between (out distinct from u and d). */
#define DEFINE_UPDATE(T, SUFFIX)                                                                   \
static SPAN T update_norm_span_##SUFFIX(const T *restrict direction, int64_t n, int64_t start,     \
                                        int64_t stop, int *nan) {                                  \
    const T *restrict dz = direction, *restrict dy = direction + n, *restrict dx = direction + 2 * n; \
    T lanes[INVERSION_LANES];                                                                      \
    int invalid = 0;                                                                               \
    for (int l = 0; l < INVERSION_LANES; l++) lanes[l] = (T)0;                                     \
    for (int64_t q0 = start; q0 < stop; q0 += INVERSION_LANES) {                                   \
        const int64_t count = stop - q0 < INVERSION_LANES ? stop - q0 : INVERSION_LANES;           \
        for (int64_t l = 0; l < count; l++) {                                                      \
            const int64_t q = q0 + l;                                                              \
            const T squares = dz[q] * dz[q] + dy[q] * dy[q] + dx[q] * dx[q];                       \
            invalid |= squares != squares;                                                         \
            lanes[l] = squares > lanes[l] ? squares : lanes[l];                                    \
        }                                                                                          \
    }                                                                                              \
    T largest = (T)0;                                                                              \
    for (int l = 0; l < INVERSION_LANES; l++) largest = lanes[l] > largest ? lanes[l] : largest;   \
    if (invalid) *nan = 1;                                                                         \
    return largest;                                                                                \
}                                                                                                  \
                                                                                                   \
T update_norm_##SUFFIX(const T *direction, int64_t n) {                                            \
    const int64_t start = 0, stop = n;                                                             \
    const int slots = MATTES_SLOTS < MATTES_SLOTS_MAX ? MATTES_SLOTS : MATTES_SLOTS_MAX;           \
    T maxima[MATTES_SLOTS_MAX] = {0};  /* not `parts`: SPLIT names its team size so */             \
    int flags[MATTES_SLOTS_MAX] = {0};                                                             \
    {                                                                                              \
        SPLIT(stop - start, maxima[MATTES_SLOT] = update_norm_span_##SUFFIX(direction, n, FROM, TO, \
                                                                           flags + MATTES_SLOT))   \
    }                                                                                              \
    return slots_largest_##SUFFIX(maxima, flags, slots);                                           \
}                                                                                                  \
                                                                                                   \
static SPAN void compose_scaled_span_##SUFFIX(const T *restrict u, int64_t d, int64_t h, int64_t w, \
                                              const T *restrict direction, T scale,                \
                                              T *restrict out, int64_t start, int64_t stop) {      \
    const geometry_##SUFFIX g = geometry_of_##SUFFIX(d, h, w);                                     \
    const int64_t n = d * h * w;                                                                   \
    const T *restrict u0 = u, *restrict u1 = u + n, *restrict u2 = u + 2 * n;                      \
    const T *restrict dz = direction, *restrict dy = direction + n, *restrict dx = direction + 2 * n; \
    T *restrict o0 = out, *restrict o1 = out + n, *restrict o2 = out + 2 * n;                      \
    PAIRED_VERSIONS(g.sx == 1,                                                                     \
        for (int64_t row = start; row < stop; row++) {                                             \
            const T i = (T)(row / h), j = (T)(row % h);                                            \
            const int64_t first = row * w;                                                         \
            for (int64_t k = 0; k < w; k++) {                                                      \
                const int64_t q = first + k;                                                       \
                const T sz = dz[q] * scale, sy = dy[q] * scale, sx = dx[q] * scale;                \
                T fz, fy, fx;                                                                      \
                int32_t p = cell_##SUFFIX(&g, i + sz, j + sy, (T)k + sx, &fz, &fy, &fx);           \
                o0[q] = sz + value_##SUFFIX(u0, &g, p, fz, fy, fx, PAIRED);                        \
                o1[q] = sy + value_##SUFFIX(u1, &g, p, fz, fy, fx, PAIRED);                        \
                o2[q] = sx + value_##SUFFIX(u2, &g, p, fz, fy, fx, PAIRED);                        \
            }                                                                                      \
        }                                                                                          \
    )                                                                                              \
}                                                                                                  \
                                                                                                   \
void compose_scaled_##SUFFIX(const T *u, int64_t d, int64_t h, int64_t w, const T *direction,      \
                             T scale, T *out) {                                                    \
    const int64_t start = 0, stop = d * h;                                                         \
    SPLIT((stop - start) * w * 3, compose_scaled_span_##SUFFIX(u, d, h, w, direction, scale, out,  \
                                                               FROM, TO))                          \
}

/* Mattes MI under a linear map, fused: LinearProblem's whole evaluation at a rigid or affine level
 * (pipeline.py), where it was a dozen torch operations and autograd's walk back through them. Pass
 * 1 maps each fixed sample point p to C p on the moving grid, samples the moving image there (value
 * and derivatives) and adds the sample's 4 x 4 Parzen products into a joint histogram (one per
 * thread, added up after); MI and G = log(p_ij / (p_i p_j)) come from the joint table; pass 2 chains
 * dMI/dm_n (parzen.py's formula) through the derivatives to dMI/dC. Sums over samples are kept in
 * MATTES_LANES independent lanes, so that their loop vectorises without reordering any one sum. */
#define MATTES_BLOCK 64
#define MATTES_LANES 16
#define MATTES_BINS_MAX 256
#define MATTES_SLOTS_MAX 256

#define DEFINE_MATTES(T, SUFFIX, LOG)                                                               \
                                                                                                    \
/* a value's first Parzen bin (of four), its fraction past the second, and whether it was in */     \
/* range; ranges: low, scale, padding, top (the positions kept free at each end, in bins) */        \
static inline int32_t taps_##SUFFIX(T value, T low, T scale, T padding, T top, T *fraction,         \
                                    int *inside) {                                                  \
    T position = (value - low) * scale + padding;                                                   \
    *inside = (padding <= position) & (position <= top);                                            \
    position = position < padding ? padding : (position > top ? top : position);                    \
    position = position == position ? position : padding; /* NaN: the caller flags it */            \
    const int32_t floor = (int32_t)position; /* position >= padding >= 0: truncation is floor */    \
    *fraction = position - (T)floor;                                                                \
    return floor - 1;                                                                               \
}                                                                                                   \
                                                                                                    \
/* the cubic B-spline's four weights at fraction f */                                               \
static inline void weights_##SUFFIX(T f, T *w) {                                                    \
    const T g = (T)1 - f, f2 = f * f, f3 = f2 * f, sixth = (T)1 / (T)6;                             \
    w[0] = g * g * g * sixth;                                                                       \
    w[1] = ((T)3 * f3 - (T)6 * f2 + (T)4) * sixth;                                                  \
    w[2] = ((T)3 * f2 - (T)3 * f3 + (T)3 * f + (T)1) * sixth;                                       \
    w[3] = f3 * sixth;                                                                              \
}                                                                                                   \
                                                                                                    \
/* the four weights' derivatives with respect to f */                                               \
static inline void slopes_##SUFFIX(T f, T *s) {                                                     \
    const T g = (T)1 - f, f2 = f * f, half = (T)1 / (T)2;                                           \
    s[0] = -g * g * half;                                                                           \
    s[1] = ((T)3 * f2 - (T)4 * f) * half;                                                           \
    s[2] = ((T)2 * f + (T)1 - (T)3 * f2) * half;                                                    \
    s[3] = f2 * half;                                                                               \
}                                                                                                   \
                                                                                                    \
/* pass 1 over the samples start..stop: the moving value at C p and its derivatives (zero along */  \
/* a clamped axis) into scratch (4, n), the Parzen products into `joint`; 1 on a NaN value */       \
static SPAN int mattes_histogram_span_##SUFFIX(const T *restrict volume, int64_t d, int64_t h,      \
                                               int64_t w, const T *restrict points,                 \
                                               const T *restrict fixed, int64_t n,                  \
                                               const T *restrict c, const T *restrict ranges,       \
                                               int64_t bins, T *restrict scratch,                   \
                                               T *restrict joint, int64_t start, int64_t stop) {    \
    const geometry_##SUFFIX g = geometry_of_##SUFFIX(d, h, w);                                      \
    const T *pz = points, *py = points + n, *px = points + 2 * n;                                   \
    T *restrict mv = scratch, *restrict sz = scratch + n, *restrict sy = scratch + 2 * n;           \
    T *restrict sx = scratch + 3 * n;                                                               \
    const T fixed_low = ranges[0], fixed_scale = ranges[1], moving_low = ranges[2];                 \
    const T moving_scale = ranges[3], padding = ranges[4], top = ranges[5];                         \
    int bad = 0;                                                                                    \
    PAIRED_VERSIONS(g.sx == 1,                                                                      \
        for (int64_t first = start; first < stop; first += MATTES_BLOCK) {                          \
            const int64_t count = stop - first < MATTES_BLOCK ? stop - first : MATTES_BLOCK;        \
            int32_t fi[MATTES_BLOCK], mj[MATTES_BLOCK];                                             \
            T fw[4][MATTES_BLOCK], mw[4][MATTES_BLOCK];                                             \
            /* the arithmetic, vectorised over the block's samples */                               \
            for (int64_t k = 0; k < count; k++) {                                                   \
                const int64_t q = first + k;                                                        \
                const T x0 = pz[q], x1 = py[q], x2 = px[q];                                         \
                const T z = c[0] * x0 + c[1] * x1 + c[2] * x2 + c[3];                               \
                const T y = c[4] * x0 + c[5] * x1 + c[6] * x2 + c[7];                               \
                const T x = c[8] * x0 + c[9] * x1 + c[10] * x2 + c[11];                             \
                T fz, fy, fx, dz = (T)0, dy = (T)0, dx = (T)0, f, m, wf[4], wm[4];                  \
                int inside;                                                                         \
                const int32_t p = cell_##SUFFIX(&g, z, y, x, &fz, &fy, &fx);                        \
                const T value = value_##SUFFIX(volume, &g, p, fz, fy, fx, PAIRED);                  \
                partials_##SUFFIX(volume, &g, p, z, y, x, fz, fy, fx, (T)1, &dz, &dy, &dx, PAIRED); \
                mv[q] = value; sz[q] = dz; sy[q] = dy; sx[q] = dx;                                  \
                bad |= !(value == value) | !(fixed[q] == fixed[q]);                                 \
                fi[k] = taps_##SUFFIX(fixed[q], fixed_low, fixed_scale, padding, top, &f, &inside); \
                mj[k] = taps_##SUFFIX(value, moving_low, moving_scale, padding, top, &m, &inside);  \
                weights_##SUFFIX(f, wf);                                                            \
                weights_##SUFFIX(m, wm);                                                            \
                for (int a = 0; a < 4; a++) { fw[a][k] = wf[a]; mw[a][k] = wm[a]; }                 \
            }                                                                                       \
            /* the scatter into the table, one sample after another */                              \
            for (int64_t k = 0; k < count; k++) {                                                   \
                for (int a = 0; a < 4; a++) {                                                       \
                    T *restrict row = joint + (fi[k] + a) * bins + mj[k];                           \
                    const T weight = fw[a][k];                                                      \
                    row[0] += weight * mw[0][k]; row[1] += weight * mw[1][k];                       \
                    row[2] += weight * mw[2][k]; row[3] += weight * mw[3][k];                       \
                }                                                                                   \
            }                                                                                       \
        }                                                                                           \
    )                                                                                               \
    return bad;                                                                                     \
}                                                                                                   \
                                                                                                    \
/* pass 2 over start..stop: dMI/dC added into gradient (12), given G = log(p_ij / (p_i p_j)) */     \
static SPAN void mattes_gradient_span_##SUFFIX(const T *restrict points, const T *restrict fixed,   \
                                               int64_t n, const T *restrict ranges, int64_t bins,   \
                                               const T *restrict scratch,                           \
                                               const T *restrict log_ratio, T factor,               \
                                               T *restrict gradient, int64_t start, int64_t stop) { \
    const T *pz = points, *py = points + n, *px = points + 2 * n;                                   \
    const T *restrict mv = scratch, *restrict sz = scratch + n, *restrict sy = scratch + 2 * n;     \
    const T *restrict sx = scratch + 3 * n;                                                         \
    const T fixed_low = ranges[0], fixed_scale = ranges[1], moving_low = ranges[2];                 \
    const T moving_scale = ranges[3], padding = ranges[4], top = ranges[5];                         \
    const int32_t width = (int32_t)bins;                                                            \
    /* each sum in MATTES_LANES independent lanes, so that the loop over samples vectorises */      \
    T lanes[12][MATTES_LANES];                                                                      \
    for (int s = 0; s < 12; s++)                                                                    \
        for (int l = 0; l < MATTES_LANES; l++) lanes[s][l] = (T)0;                                  \
    for (int64_t first = start; first < stop; first += MATTES_LANES) {                              \
        const int64_t count = stop - first < MATTES_LANES ? stop - first : MATTES_LANES;            \
        for (int64_t l = 0; l < count; l++) {                                                       \
            const int64_t q = first + l;                                                            \
            T f, m, wf[4], dm[4];                                                                   \
            int inside, moving_inside;                                                              \
            const int32_t i = taps_##SUFFIX(fixed[q], fixed_low, fixed_scale, padding, top, &f, &inside); \
            const int32_t j = taps_##SUFFIX(mv[q], moving_low, moving_scale, padding, top, &m,      \
                                            &moving_inside);                                        \
            weights_##SUFFIX(f, wf);                                                                \
            slopes_##SUFFIX(m, dm);                                                                 \
            T value = (T)0;                                                                         \
            for (int a = 0; a < 4; a++) {                                                           \
                const int32_t r = (i + a) * width + j;                                              \
                value += wf[a] * (log_ratio[r] * dm[0] + log_ratio[r + 1] * dm[1]                   \
                                  + log_ratio[r + 2] * dm[2] + log_ratio[r + 3] * dm[3]);           \
            }                                                                                       \
            /* a clamped intensity does not move its bins */                                        \
            const T dv = value * factor * (T)moving_inside;                                         \
            const T gz = dv * sz[q], gy = dv * sy[q], gx = dv * sx[q];                              \
            const T x0 = pz[q], x1 = py[q], x2 = px[q];                                             \
            lanes[0][l] += gz * x0; lanes[1][l] += gz * x1; lanes[2][l] += gz * x2; lanes[3][l] += gz; \
            lanes[4][l] += gy * x0; lanes[5][l] += gy * x1; lanes[6][l] += gy * x2; lanes[7][l] += gy; \
            lanes[8][l] += gx * x0; lanes[9][l] += gx * x1; lanes[10][l] += gx * x2; lanes[11][l] += gx; \
        }                                                                                           \
    }                                                                                               \
    for (int s = 0; s < 12; s++) {                                                                  \
        T sum = (T)0;                                                                               \
        for (int l = 0; l < MATTES_LANES; l++) sum += lanes[s][l];                                  \
        gradient[s] += sum;                                                                         \
    }                                                                                               \
}                                                                                                   \
                                                                                                    \
/* Mattes MI (nats) of the fixed samples (n) at fixed-grid voxel points (3, n) against the moving */ \
/* volume (d, h, w) at C p, C the 3 x 4 matrix c (rows z, y, x) to moving voxels, and dMI/dC into */ \
/* gradient (12). ranges: fixed low and scale, moving low and scale, then the padding and the top */ \
/* bin position; scratch: 4n values. NaN where C or a value is not finite, or memory is short. */   \
T linear_mattes_##SUFFIX(const T *volume, int64_t d, int64_t h, int64_t w, const T *points,         \
                         const T *fixed, int64_t n, const T *c, const T *ranges, int64_t bins,      \
                         T *scratch, T *gradient) {                                                 \
    const int64_t start = 0, stop = n, cells = bins * bins;                                         \
    for (int s = 0; s < 12; s++) gradient[s] = (T)0;                                                \
    for (int s = 0; s < 12; s++)                                                                    \
        if (!(c[s] - c[s] == (T)0)) return (T)NAN;                                                  \
    if (bins > MATTES_BINS_MAX) return (T)NAN;                                                      \
    const int slots = MATTES_SLOTS < MATTES_SLOTS_MAX ? MATTES_SLOTS : MATTES_SLOTS_MAX;            \
    /* one table per thread, then G */                                                              \
    T *tables = (T *)calloc((size_t)((slots + 1) * cells), sizeof(T));                              \
    if (tables == NULL) return (T)NAN;                                                              \
    T *log_ratio = tables + slots * cells;                                                          \
    int flags[MATTES_SLOTS_MAX] = {0};                                                              \
    {                                                                                               \
        SPLIT(stop - start,                                                                         \
              flags[MATTES_SLOT] = mattes_histogram_span_##SUFFIX(volume, d, h, w, points, fixed, n, \
                                                                  c, ranges, bins, scratch,         \
                                                                  tables + MATTES_SLOT * cells,     \
                                                                  FROM, TO))                        \
    }                                                                                               \
    for (int t = 0; t < slots; t++)                                                                 \
        if (flags[t]) { free(tables); return (T)NAN; }                                              \
    for (int t = 1; t < slots; t++)                                                                 \
        for (int64_t k = 0; k < cells; k++) tables[k] += tables[t * cells + k];                     \
    const T *joint = tables;                                                                        \
    T total = (T)0, rows[MATTES_BINS_MAX], columns[MATTES_BINS_MAX];                                \
    for (int64_t k = 0; k < cells; k++) total += joint[k];                                          \
    for (int64_t i = 0; i < bins; i++) {                                                            \
        T row = (T)0, column = (T)0;                                                                \
        for (int64_t j = 0; j < bins; j++) { row += joint[i * bins + j]; column += joint[j * bins + i]; } \
        rows[i] = row / total; columns[i] = column / total;                                         \
    }                                                                                               \
    T information = (T)0;                                                                           \
    for (int64_t i = 0; i < bins; i++)                                                              \
        for (int64_t j = 0; j < bins; j++) {                                                        \
            const T p = joint[i * bins + j] / total;                                                \
            T ratio = (T)0;                                                                         \
            if (p > (T)0) { ratio = LOG(p / (rows[i] * columns[j])); information += p * ratio; }    \
            log_ratio[i * bins + j] = ratio;                                                        \
        }                                                                                           \
    const T factor = ranges[3] / total;                                                             \
    T *partial = tables; /* the per-thread tables are spent: twelve sums per thread */              \
    for (int64_t k = 0; k < slots * 12; k++) partial[k] = (T)0;                                     \
    {                                                                                               \
        SPLIT(stop - start, mattes_gradient_span_##SUFFIX(points, fixed, n, ranges, bins, scratch,  \
                                                          log_ratio, factor,                        \
                                                          partial + MATTES_SLOT * 12, FROM, TO))    \
    }                                                                                               \
    for (int t = 0; t < slots; t++)                                                                 \
        for (int s = 0; s < 12; s++) gradient[s] += partial[t * 12 + s];                            \
    free(tables);                                                                                   \
    return information;                                                                             \
}

/* LinearProblem's evaluation at a rigid or affine level, whole (pipeline.py): the 3 x 4 map
 * C = M^-1 T F to moving voxels from the parameters, linear_mattes, and the chain rule from dMI/dC
 * to d(-MI)/d(parameters), in T's arithmetic. Rigid: three angles (R = Rz Ry Rx, as
 * transforms.rotation_matrix builds it) then a translation; affine: a row-major 3 x 3 matrix then a
 * translation; T(x) = R (x - c) + c + t. geometry: c (3), then M^-1 and F (4 x 4 each, row-major).
 * As NumPy operations, the chain rule was about a hundred small array operations an iteration. */
#define DEFINE_LINEAR(T, SUFFIX, SIN, COS)                                                          \
static void product_##SUFFIX(const T *a, const T *b, T *out, int rows, int inner, int columns) {    \
    for (int r = 0; r < rows; r++)                                                                  \
        for (int k = 0; k < columns; k++) {                                                         \
            T sum = (T)0;                                                                           \
            for (int i = 0; i < inner; i++) sum += a[r * inner + i] * b[i * columns + k];           \
            out[r * columns + k] = sum;                                                             \
        }                                                                                           \
}                                                                                                   \
                                                                                                    \
/* rotation by `angle` about `axis` (0: x, 1: y, 2: z) and its derivative, 3 x 3 */                 \
static void rotation_##SUFFIX(int axis, T angle, T *rotation, T *derivative) {                      \
    static const int planes[3][2] = {{1, 2}, {2, 0}, {0, 1}};                                       \
    const int first = planes[axis][0], second = planes[axis][1];                                    \
    const T cosine = COS(angle), sine = SIN(angle);                                                 \
    for (int k = 0; k < 9; k++) { rotation[k] = (T)(k % 4 == 0); derivative[k] = (T)0; }            \
    rotation[first * 3 + first] = cosine; rotation[first * 3 + second] = -sine;                     \
    rotation[second * 3 + first] = sine; rotation[second * 3 + second] = cosine;                    \
    derivative[first * 3 + first] = -sine; derivative[first * 3 + second] = -cosine;                \
    derivative[second * 3 + first] = cosine; derivative[second * 3 + second] = -sine;               \
}                                                                                                   \
                                                                                                    \
T linear_parameters_##SUFFIX(const T *volume, int64_t d, int64_t h, int64_t w, const T *points,     \
                             const T *fixed, int64_t n, const T *parameters, int rigid,             \
                             const T *geometry, const T *ranges, int64_t bins, T *scratch,          \
                             T *gradient) {                                                         \
    const T *center = geometry, *moving_inverse = geometry + 3, *fixed_affine = geometry + 19;      \
    const T *translation = parameters + (rigid ? 3 : 9);                                            \
    T matrix[9], partials[3][9] = {{0}};                                                            \
    if (rigid) {                                                                                    \
        T about[3][9], slope[3][9], zy[9], t1[9];                                                   \
        for (int axis = 0; axis < 3; axis++)                                                        \
            rotation_##SUFFIX(axis, parameters[axis], about[axis], slope[axis]);                    \
        product_##SUFFIX(about[2], about[1], zy, 3, 3, 3);                                          \
        product_##SUFFIX(zy, about[0], matrix, 3, 3, 3);                                            \
        product_##SUFFIX(zy, slope[0], partials[0], 3, 3, 3);                                       \
        product_##SUFFIX(about[2], slope[1], t1, 3, 3, 3);                                          \
        product_##SUFFIX(t1, about[0], partials[1], 3, 3, 3);                                       \
        product_##SUFFIX(slope[2], about[1], t1, 3, 3, 3);                                          \
        product_##SUFFIX(t1, about[0], partials[2], 3, 3, 3);                                       \
    } else {                                                                                        \
        for (int k = 0; k < 9; k++) matrix[k] = parameters[k];                                      \
    }                                                                                               \
    /* T, then C = (M^-1 T) F */                                                                    \
    T transform[16] = {0}, left[16], combined[16], found[12];                                       \
    for (int r = 0; r < 3; r++) {                                                                   \
        T moved = (T)0;                                                                             \
        for (int k = 0; k < 3; k++) { transform[r * 4 + k] = matrix[r * 3 + k];                     \
                                      moved += matrix[r * 3 + k] * center[k]; }                     \
        transform[r * 4 + 3] = center[r] - moved + translation[r];                                  \
    }                                                                                               \
    transform[15] = (T)1;                                                                           \
    product_##SUFFIX(moving_inverse, transform, left, 4, 4, 4);                                     \
    product_##SUFFIX(left, fixed_affine, combined, 4, 4, 4);                                        \
    const T information = linear_mattes_##SUFFIX(volume, d, h, w, points, fixed, n, combined,       \
                                                 ranges, bins, scratch, found);                     \
    /* loss = -MI: dL/dT = M^-1^T (dL/dC) F^T, dL/dC's last row zero */                             \
    T to_map[16] = {0}, inverse_t[16], affine_t[16], mapped[16], to_transform[16];                  \
    for (int k = 0; k < 12; k++) to_map[k] = -found[k];                                             \
    for (int r = 0; r < 4; r++)                                                                     \
        for (int k = 0; k < 4; k++) {                                                               \
            inverse_t[r * 4 + k] = moving_inverse[k * 4 + r];                                       \
            affine_t[r * 4 + k] = fixed_affine[k * 4 + r];                                          \
        }                                                                                           \
    product_##SUFFIX(to_map, affine_t, mapped, 4, 4, 4);                                            \
    product_##SUFFIX(inverse_t, mapped, to_transform, 4, 4, 4);                                     \
    T to_matrix[9];                                                                                 \
    for (int r = 0; r < 3; r++)                                                                     \
        for (int k = 0; k < 3; k++)                                                                 \
            to_matrix[r * 3 + k] = to_transform[r * 4 + k] - to_transform[r * 4 + 3] * center[k];   \
    T *to_translation = gradient + (rigid ? 3 : 9);                                                 \
    for (int r = 0; r < 3; r++) to_translation[r] = to_transform[r * 4 + 3];                        \
    if (rigid) {                                                                                    \
        for (int a = 0; a < 3; a++) {                                                               \
            T sum = (T)0;                                                                           \
            for (int k = 0; k < 9; k++) sum += to_matrix[k] * partials[a][k];                       \
            gradient[a] = sum;                                                                      \
        }                                                                                           \
    } else {                                                                                        \
        for (int k = 0; k < 9; k++) gradient[k] = to_matrix[k];                                     \
    }                                                                                               \
    return information;                                                                             \
}


/* 1 where this library splits its loops over OpenMP threads itself (then the caller does not) */
int sampler_threads(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

DEFINE_SAMPLER(float, f32)
DEFINE_SAMPLER(double, f64)
DEFINE_MATTES(float, f32, logf)
DEFINE_MATTES(double, f64, log)
DEFINE_LINEAR(float, f32, sinf, cosf)
DEFINE_LINEAR(double, f64, sin, cos)
DEFINE_INVERSION(float, f32, fabsf)
DEFINE_INVERSION(double, f64, fabs)
DEFINE_UPDATE(float, f32)
DEFINE_UPDATE(double, f64)
