/* The controller's statistics pass on the CPU, in C: sum a^2, sum (a - b)^2 and max |a| of a
 * tensor a and its previous value b, accumulated in double, and optionally b = a in the same pass.
 *
 * estimator.py's numba kernel does the same in a scalar loop, which costs as much on a float32
 * state as on a float64 one. Here each sum is kept in STATISTICS_LANES independent lanes, so that
 * a compiler at -O3 vectorises the loop without reordering any one sum, and the pass runs at the
 * speed of memory: a float32 state is half the bytes of a float64 one. dynomp.native compiles this
 * file on first use; without a compiler, the numba kernel runs.
 *
 * Every function covers the elements start..stop, split over OpenMP's threads (torch's own pool,
 * see sampler.c) when there are at least PARALLEL_MINIMUM of them, on at most `slots` threads; out
 * receives the three results of each thread, in thread order (3 x slots doubles, zeroed by the
 * caller: a thread that did not run leaves zeros). */
#include <math.h>
#include <stdint.h>

#define PARALLEL_MINIMUM 65536
#define STATISTICS_LANES 16
#ifdef _OPENMP
#include <omp.h>
#endif

#define DEFINE_SUMS(A, B, SUFFIX)                                                                  \
static void sums_span_##SUFFIX(const A *restrict a, B *restrict b, int keep, int64_t start,        \
                               int64_t stop, double *restrict out) {                               \
    double squares[STATISTICS_LANES], differences[STATISTICS_LANES], largest[STATISTICS_LANES];    \
    for (int l = 0; l < STATISTICS_LANES; l++) squares[l] = differences[l] = largest[l] = 0.0;     \
    const int64_t full = start + (stop - start) / STATISTICS_LANES * STATISTICS_LANES;             \
    for (int64_t first = start; first < full; first += STATISTICS_LANES) {                         \
        for (int l = 0; l < STATISTICS_LANES; l++) {                                               \
            const double x = (double)a[first + l], d = x - (double)b[first + l];                   \
            squares[l] += x * x;                                                                   \
            differences[l] += d * d;                                                               \
            largest[l] = fabs(x) > largest[l] ? fabs(x) : largest[l];                              \
        }                                                                                          \
        if (keep)                                                                                  \
            for (int l = 0; l < STATISTICS_LANES; l++) b[first + l] = (B)a[first + l];             \
    }                                                                                              \
    for (int64_t n = full; n < stop; n++) {                                                        \
        const double x = (double)a[n], d = x - (double)b[n];                                       \
        squares[0] += x * x;                                                                       \
        differences[0] += d * d;                                                                   \
        largest[0] = fabs(x) > largest[0] ? fabs(x) : largest[0];                                  \
        if (keep) b[n] = (B)a[n];                                                                  \
    }                                                                                              \
    out[0] = out[1] = out[2] = 0.0;                                                                \
    for (int l = 0; l < STATISTICS_LANES; l++) {                                                   \
        out[0] += squares[l];                                                                      \
        out[1] += differences[l];                                                                  \
        out[2] = largest[l] > out[2] ? largest[l] : out[2];                                        \
    }                                                                                              \
}                                                                                                  \
                                                                                                   \
void statistics_##SUFFIX(const A *a, B *b, int64_t start, int64_t stop, int keep, double *out,     \
                         int64_t slots) {                                                          \
    const int parallel = stop - start >= PARALLEL_MINIMUM;                                         \
    SPLIT_STATISTICS(sums_span_##SUFFIX(a, b, keep, FROM, TO, out + 3 * PART))                     \
}

#ifdef _OPENMP
/* CALL over one contiguous part (FROM..TO) per thread; PART: the thread's number */
#define SPLIT_STATISTICS(CALL)                                                                     \
    _Pragma("omp parallel if (parallel) num_threads(slots)")                                       \
    {                                                                                              \
        const int64_t PART = omp_get_thread_num(), parts = omp_get_num_threads();                  \
        const int64_t FROM = start + (stop - start) * PART / parts;                                \
        const int64_t TO = start + (stop - start) * (PART + 1) / parts;                            \
        CALL;                                                                                      \
    }
#else
#define SPLIT_STATISTICS(CALL)                                                                     \
    {                                                                                              \
        (void)parallel; (void)slots;                                                               \
        const int64_t PART = 0, FROM = start, TO = stop;                                           \
        CALL;                                                                                      \
    }
#endif

DEFINE_SUMS(float, float, f32_f32)
DEFINE_SUMS(float, double, f32_f64)
DEFINE_SUMS(double, float, f64_f32)
DEFINE_SUMS(double, double, f64_f64)
