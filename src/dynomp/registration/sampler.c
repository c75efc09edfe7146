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
#include <stdint.h>

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
#define SPLIT(work, CALL)                                                                          \
    {                                                                                              \
        const int64_t FROM = start, TO = stop;                                                     \
        CALL;                                                                                      \
    }
#endif

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
static inline T value_##SUFFIX(const T *restrict v, const geometry_##SUFFIX *g, int32_t p,         \
                               T fz, T fy, T fx) {                                                 \
    const int32_t sz = g->sz, sy = g->sy, sx = g->sx;                                              \
    T a = v[p] + fx * (v[p + sx] - v[p]);                                                          \
    T b = v[p + sy] + fx * (v[p + sy + sx] - v[p + sy]);                                           \
    T e = v[p + sz] + fx * (v[p + sz + sx] - v[p + sz]);                                           \
    T f = v[p + sz + sy] + fx * (v[p + sz + sy + sx] - v[p + sz + sy]);                            \
    T low = a + fy * (b - a);                                                                      \
    return low + fz * (e + fy * (f - e) - low);                                                    \
}                                                                                                  \
                                                                                                   \
/* the value's derivatives along z, y and x, each times `weight`, added to *gz, *gy, *gx where */  \
/* the coordinate is inside the grid (a clamped coordinate does not move the value) */            \
static inline void partials_##SUFFIX(const T *restrict v, const geometry_##SUFFIX *g, int32_t p,   \
                                     T z, T y, T x, T fz, T fy, T fx, T weight,                    \
                                     T *gz, T *gy, T *gx) {                                        \
    const int32_t sz = g->sz, sy = g->sy, sx = g->sx;                                              \
    T v000 = v[p], v001 = v[p + sx], v010 = v[p + sy], v011 = v[p + sy + sx];                      \
    T v100 = v[p + sz], v101 = v[p + sz + sx], v110 = v[p + sz + sy];                              \
    T v111 = v[p + sz + sy + sx];                                                                  \
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
        for (int64_t q = start; q < stop; q++) {                                                   \
            T fz, fy, fx;                                                                          \
            int32_t p = cell_##SUFFIX(&g, pz[q], py[q], px[q], &fz, &fy, &fx);                     \
            o[q] = value_##SUFFIX(v, &g, p, fz, fy, fx);                                           \
        }                                                                                          \
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
        for (int64_t q = start; q < stop; q++) {                                                   \
            T fz, fy, fx, z = pz[q], y = py[q], x = px[q];                                         \
            int32_t p = cell_##SUFFIX(&g, z, y, x, &fz, &fy, &fx);                                 \
            partials_##SUFFIX(v, &g, p, z, y, x, fz, fy, fx, weights[q], gz + q, gy + q, gx + q);  \
        }                                                                                          \
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
        for (int64_t row = start; row < stop; row++) {                                             \
            const T i = (T)(row / grid_h), j = (T)(row % grid_h);                                  \
            const int64_t first = row * grid_w;                                                    \
            for (int64_t k = 0; k < grid_w; k++) {                                                 \
                const int64_t q = first + k;                                                       \
                T fz, fy, fx;                                                                      \
                int32_t p = cell_##SUFFIX(&g, i + uz[q], j + uy[q], (T)k + ux[q], &fz, &fy, &fx);  \
                o0[q] = value_##SUFFIX(v0, &g, p, fz, fy, fx);                                     \
                o1[q] = value_##SUFFIX(v1, &g, p, fz, fy, fx);                                     \
                o2[q] = value_##SUFFIX(v2, &g, p, fz, fy, fx);                                     \
            }                                                                                      \
        }                                                                                          \
        return;                                                                                    \
    }                                                                                              \
    for (int64_t c = 0; c < channels; c++) {                                                       \
        const T *restrict v = volume + c * size;                                                   \
        T *restrict o = out + c * n;                                                               \
        for (int64_t row = start; row < stop; row++) {                                             \
            const T i = (T)(row / grid_h), j = (T)(row % grid_h);                                  \
            const int64_t first = row * grid_w;                                                    \
            for (int64_t k = 0; k < grid_w; k++) {                                                 \
                const int64_t q = first + k;                                                       \
                T fz, fy, fx;                                                                      \
                int32_t p = cell_##SUFFIX(&g, i + uz[q], j + uy[q], (T)k + ux[q], &fz, &fy, &fx);  \
                o[q] = value_##SUFFIX(v, &g, p, fz, fy, fx);                                       \
            }                                                                                      \
        }                                                                                          \
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
        for (int64_t row = start; row < stop; row++) {                                             \
            const T i = (T)(row / grid_h), j = (T)(row % grid_h);                                  \
            const int64_t first = row * grid_w;                                                    \
            for (int64_t k = 0; k < grid_w; k++) {                                                 \
                const int64_t q = first + k;                                                       \
                T fz, fy, fx, z = i + uz[q], y = j + uy[q], x = (T)k + ux[q];                      \
                int32_t p = cell_##SUFFIX(&g, z, y, x, &fz, &fy, &fx);                             \
                partials_##SUFFIX(v, &g, p, z, y, x, fz, fy, fx, weights[q], gz + q, gy + q, gx + q); \
            }                                                                                      \
        }                                                                                          \
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
