/* One RWKV-7 decoding step on the CPU: a layer's work in a few calls, activations in fp32.
 *
 * In PyTorch a layer's step is ~40 small tensor operations whose dispatch costs more than their
 * arithmetic, and matrix-vector products that stream the weights slower than memory allows. Each
 * function here does one such group in a single pass. The math is infer/step.py's PyTorch path
 * (and TimeMix / ChannelMix for T = 1); tests/test_decode_step.py checks the two against each
 * other. Plain C, no torch headers: built in a second or two by the system compiler and called
 * through ctypes (ops/decode_cpu.py). The functions that read weights come twice, from
 * decode_cpu_weights.h: name_f32 for fp32 weights and name_bf16 for bf16 ones (read as fp32).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* The matrix-vector products are bandwidth-bound only with wide vectors: on x86 with GCC, build
 * them for AVX-512, AVX2 and plain x86-64 and pick one at load time (one binary for every CPU;
 * NO_VECTOR_CLONES builds plain code where the C library cannot pick, as musl). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(NO_VECTOR_CLONES)
#define VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VECTOR_CLONES
#endif

#define NEG_EXP_HALF (-0.6065306597126334f) /* log(decay) = -e^-0.5 sigmoid(z) */

static inline float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
static inline int max(int a, int b) { return a > b ? a : b; }

/* This thread's share [*begin, *end) of n items, in multiples of align. */
static void share(int n, int align, int *begin, int *end) {
    int threads = 1, thread = 0;
#ifdef _OPENMP
    threads = omp_get_num_threads();
    thread = omp_get_thread_num();
#endif
    const int per = ((n + threads - 1) / threads + align - 1) / align * align;
    *begin = thread * per < n ? thread * per : n;
    *end = *begin + per < n ? *begin + per : n;
}

/* The sum of x[i] y[i]; the pragma lets it vectorise (with -fopenmp-simd) without licence to
 * reorder every other float operation in the file. */
static inline float dot(const float *x, const float *y, int n) {
    float sum = 0.0f;
#pragma omp simd reduction(+:sum)
    for (int i = 0; i < n; i++) sum += x[i] * y[i];
    return sum;
}

static inline float bf16_to_float(uint16_t b) {
    const uint32_t bits = (uint32_t)b << 16;  /* bf16 is the top half of an fp32 */
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

#define WEIGHT float
#define LOAD(w) (w)
#define NAME(f) f##_f32
#include "decode_cpu_weights.h"
#undef WEIGHT
#undef LOAD
#undef NAME

#define WEIGHT uint16_t
#define LOAD(w) bf16_to_float(w)
#define NAME(f) f##_bf16
#include "decode_cpu_weights.h"

/* The channel mix's hidden activation after its key projection, in place: k = relu(k)^2 (NaN stays NaN). */
void rwkv7_relu_square(long count, float *k) {
    for (long i = 0; i < count; i++) k[i] = k[i] < 0.0f ? 0.0f : k[i] * k[i];
}
