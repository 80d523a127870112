// WKV-7 recurrence on the GPU: forward and backward, state in and out, resets, any T.
//
// Plain CUDA on purpose (no torch headers): wkv7_op.cpp holds the torch binding and calls the
// extern "C" launchers at the bottom, so this file compiles with nvcc alone for any architecture.
//
// Per (batch, head), with S [N,N] (S[i][j]: i = value, j = key), d_t = exp(-exp(w_t)):
//   P_t = reset_t ? R : S_{t-1}                   (resets restart from R: s_reset, or zero)
//   sa_t = P_t a_t                                  (vector over i)
//   S_t = P_t diag(d_t) + sa_t b_t^T + v_t k_t^T
//   y_t = S_t r_t
// Layout: every input is [B,T,H,N] contiguous, the states [B,H,N,N] fp32 row-major (value x key).
//
// One block per (batch, head). Each state row is split over ROW_THREADS neighbouring lanes of a
// warp (thread n * ROW_THREADS + q holds S[n][q + ROW_THREADS * e], e < N / ROW_THREADS), so a
// sum over a row is a short private loop plus two shuffles, and a block has 8 warps rather than 2.
// Each chunk's inputs are staged in shared memory first: one coalesced load per CHUNK steps,
// after which the forward's rows step on without any barrier. All arithmetic is fp32.
#ifndef WKV7_HOST_EMULATION  // the tests also run these kernels on the CPU through a small shim
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#define WKV7_DYNAMIC_SHARED(name) extern __shared__ float name[]
#endif
#include "wkv7.h"

constexpr int CHUNK = 16;       // steps between the state snapshots the forward keeps for the backward
constexpr int SUB = 8;          // steps whose states the backward holds in shared memory at once
constexpr int ROW_THREADS = 4;  // threads per state row; block size N * ROW_THREADS

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename F> __device__ __forceinline__ F from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

// Sum over the ROW_THREADS lanes that share a row; every one of them gets the total.
__device__ __forceinline__ float row_sum(float x) {
#pragma unroll
    for (int m = 1; m < ROW_THREADS; m <<= 1) x += __shfl_xor_sync(0xffffffffu, x, m);
    return x;
}

// Stages COUNT [N]-vectors of the chunk's steps (from t0, `steps` of them, zero past T) into
// stage[COUNT][CHUNK][N], and the chunk's reset flags.
template <int COUNT, typename F, int N>
__device__ __forceinline__ void stage_chunk(float* stage, bool* reset, const F* const (&inputs)[COUNT],
                                            int bb, int h, int T, int H, int t0, int steps,
                                            const uint8_t* resets) {
#pragma unroll
    for (int which = 0; which < COUNT; which++) {  // unrolled: inputs[which] stays in registers
        for (int idx = threadIdx.x; idx < CHUNK * N; idx += blockDim.x) {
            const int s = idx / N, j = idx % N;
            stage[which * CHUNK * N + idx] =
                s < steps ? to_f(inputs[which][((size_t)(bb * T + t0 + s) * H + h) * N + j]) : 0.f;
        }
    }
    for (int s = threadIdx.x; s < CHUNK; s += blockDim.x)
        reset[s] = resets != nullptr && s < steps && resets[bb * T + t0 + s];
}

// Snapshots are stored in thread order (element e of thread tid at e * blockDim + tid): coalesced.
// They are the raw state before the chunk's first step, and only this file reads them.

template <typename F, int N>
__global__ void __launch_bounds__(N * ROW_THREADS) wkv7_forward_kernel(
    int T, int H, const F* __restrict__ r_, const F* __restrict__ w_, const F* __restrict__ k_,
    const F* __restrict__ v_, const F* __restrict__ a_, const F* __restrict__ b_,
    const float* __restrict__ s0, const uint8_t* __restrict__ resets, const float* __restrict__ s_reset,
    F* __restrict__ y_, float* __restrict__ sT, float* __restrict__ snaps)
{
    constexpr int E = N / ROW_THREADS, THREADS = N * ROW_THREADS;
    enum { R, D, K, V, A, B_ };
    const int bh = blockIdx.x, bb = bh / H, h = bh % H;
    const int tid = threadIdx.x, n = tid / ROW_THREADS, q = tid % ROW_THREADS;
    const int nchunks = (T + CHUNK - 1) / CHUNK;
    const size_t st = (size_t)bh * N * N;
    __shared__ float in[6][CHUNK][N];
    __shared__ bool reset[CHUNK];
    const F* inputs[6] = {r_, w_, k_, v_, a_, b_};

    float S[E];  // S[e] = state[n][q + ROW_THREADS * e]
#pragma unroll
    for (int e = 0; e < E; e++) S[e] = s0[st + n * N + q + ROW_THREADS * e];

    for (int c = 0; c < nchunks; c++) {
        const int t0 = c * CHUNK, steps = min(CHUNK, T - t0);
        if (snaps != nullptr) {
            float* snap = snaps + (st * nchunks + (size_t)c * N * N);
#pragma unroll
            for (int e = 0; e < E; e++) snap[e * THREADS + tid] = S[e];
        }
        __syncthreads();  // every row is done with the previous chunk's inputs
        stage_chunk<6, F, N>(reinterpret_cast<float*>(in), reset, inputs, bb, h, T, H, t0, steps, resets);
        __syncthreads();
        float* d = reinterpret_cast<float*>(in[D]);  // the chunk's w, flat, turned into d
        for (int j = tid; j < CHUNK * N; j += THREADS) d[j] = expf(-expf(d[j]));
        __syncthreads();

        for (int s = 0; s < steps; s++) {
            if (reset[s]) {  // the same for the whole block: no divergence around the shuffles
#pragma unroll
                for (int e = 0; e < E; e++) S[e] = s_reset ? s_reset[st + n * N + q + ROW_THREADS * e] : 0.f;
            }
            float sa = 0.f;
#pragma unroll
            for (int e = 0; e < E; e++) sa += S[e] * in[A][s][q + ROW_THREADS * e];
            sa = row_sum(sa);
            const float vn = in[V][s][n];
            float y = 0.f;
#pragma unroll
            for (int e = 0; e < E; e++) {
                const int j = q + ROW_THREADS * e;
                S[e] = S[e] * in[D][s][j] + sa * in[B_][s][j] + vn * in[K][s][j];
                y += S[e] * in[R][s][j];
            }
            y = row_sum(y);
            if (q == 0) y_[((size_t)(bb * T + t0 + s) * H + h) * N + n] = from_f<F>(y);
        }
    }
#pragma unroll
    for (int e = 0; e < E; e++) sT[st + n * N + q + ROW_THREADS * e] = S[e];
}

// Where the backward keeps S[i][j] of one state in shared memory: row-major with the column XORed
// by a function of the row, so that both the recomputation's row-wise writes and the backward's
// column-wise reads hit 32 different banks per warp (with 8 rows x 4 column groups per warp).
__device__ __forceinline__ int swizzled(int i, int j, int N) {
    return i * N + (j ^ (8 * (i % 4) + 4 * (i / 4 % 2)));
}

constexpr int backward_shared_floats(int N) { return 8 * CHUNK * N + SUB * N * N + SUB * N + 2 * N; }

// Backward. G = dL/dS_t, seeded with dL/dS_T (the final state's gradient). For t = T-1 .. 0:
//   G      += dy_t r_t^T                           (y_t = S_t r_t)
//   dr_t[j] = sum_i dy_t[i] S_t[i][j]              (S_t[i][j] = P_t[i][j] d_t[j] + sa_t[i] b_t[j] + v_t[i] k_t[j])
//   dv_t[i] = sum_j G[i][j] k_t[j]                  dk_t[j] = sum_i G[i][j] v_t[i]
//   dsa[i]  = sum_j G[i][j] b_t[j]                  db_t[j] = sum_i G[i][j] sa_t[i]
//   dd[j]   = sum_i G[i][j] P_t[i][j]               da_t[j] = sum_i dsa[i] P_t[i][j]
//   dw_t[j] = dd[j] * d_t[j] * (-exp(w_t[j]))      (d = exp(-exp(w)))
//   G       = G diag(d_t) + dsa a_t^T              (= dL/dP_t)
//   dR     += reset_t ? G : 0                       (into ds_reset, zeroed by the caller)
//   G       = reset_t ? 0 : G                       (= dL/dS_{t-1})
// and finally dL/dS_init = G. The sums over j are rows of G, the sums over i are columns: thread
// (n, q) keeps both its part of row n (Grow[e] = G[n][j]) and of column n (Gcol[e] = G[j][n]),
// j = q + ROW_THREADS * e, updated by the same rule, so each sum is a private loop plus row_sum.
//
// P_t comes from recomputation, not from stepping the state backwards by dividing by d_t (the
// division amplifies rounding): for each chunk, last to first, and each SUB steps of it, last
// first, the states are recomputed from the forward's snapshot and P_t (after any reset) and
// sa_t of those SUB steps kept in shared memory; then those steps are walked backwards.
template <typename F, int N>
__global__ void __launch_bounds__(N * ROW_THREADS) wkv7_backward_kernel(
    int T, int H, const F* __restrict__ r_, const F* __restrict__ w_, const F* __restrict__ k_,
    const F* __restrict__ v_, const F* __restrict__ a_, const F* __restrict__ b_,
    const F* __restrict__ dy_, const float* __restrict__ dsT, const float* __restrict__ snaps,
    const uint8_t* __restrict__ resets, const float* __restrict__ s_reset,
    F* __restrict__ dr_, F* __restrict__ dw_, F* __restrict__ dk_, F* __restrict__ dv_,
    F* __restrict__ da_, F* __restrict__ db_, float* __restrict__ ds0, float* __restrict__ ds_reset)
{
    constexpr int E = N / ROW_THREADS, THREADS = N * ROW_THREADS;
    enum { R, D, K, V, A, B_, DY, EW };  // EW: exp(w), filled from D's raw w
    const int bh = blockIdx.x, bb = bh / H, h = bh % H;
    const int tid = threadIdx.x, n = tid / ROW_THREADS, q = tid % ROW_THREADS;
    const int nchunks = (T + CHUNK - 1) / CHUNK;
    const size_t st = (size_t)bh * N * N;
    WKV7_DYNAMIC_SHARED(shared);                       // backward_shared_floats(N) floats:
    float (*in)[CHUNK][N] = (float (*)[CHUNK][N])shared;  // in[8][CHUNK][N]: the chunk's vectors
    float* P = shared + 8 * CHUNK * N;                 // P[SUB][N * N], swizzled
    float (*sa)[N] = (float (*)[N])(P + SUB * N * N);  // sa[SUB][N]
    float (*dsa)[N] = sa + SUB;                        // dsa[2][N], by the step's parity
    __shared__ bool reset[CHUNK];
    const F* inputs[7] = {r_, w_, k_, v_, a_, b_, dy_};

    float Grow[E], Gcol[E];
#pragma unroll
    for (int e = 0; e < E; e++) {
        const int j = q + ROW_THREADS * e;
        Grow[e] = dsT[st + n * N + j];
        Gcol[e] = dsT[st + j * N + n];
    }

    for (int c = nchunks - 1; c >= 0; c--) {
        const int t0 = c * CHUNK, steps = min(CHUNK, T - t0);
        __syncthreads();  // the previous chunk is done with the staged vectors
        stage_chunk<7, F, N>(reinterpret_cast<float*>(in), reset, inputs, bb, h, T, H, t0, steps, resets);
        __syncthreads();
        float *d = reinterpret_cast<float*>(in[D]), *exp_w = reinterpret_cast<float*>(in[EW]);  // flat
        for (int j = tid; j < CHUNK * N; j += THREADS) {
            exp_w[j] = expf(d[j]);
            d[j] = expf(-exp_w[j]);
        }
        __syncthreads();

        for (int u0 = (steps - 1) / SUB * SUB; u0 >= 0; u0 -= SUB) {
            const int u1 = min(steps, u0 + SUB);
            {   // 1. recompute the states from the chunk's snapshot, keeping P and sa of steps u0..u1-1
                const float* snap = snaps + (st * nchunks + (size_t)c * N * N);
                float S[E];
#pragma unroll
                for (int e = 0; e < E; e++) S[e] = snap[e * THREADS + tid];
                for (int s = 0; s < u1; s++) {
                    if (reset[s]) {
#pragma unroll
                        for (int e = 0; e < E; e++) S[e] = s_reset ? s_reset[st + n * N + q + ROW_THREADS * e] : 0.f;
                    }
                    float x = 0.f;
#pragma unroll
                    for (int e = 0; e < E; e++) x += S[e] * in[A][s][q + ROW_THREADS * e];
                    x = row_sum(x);
                    if (s >= u0) {
#pragma unroll
                        for (int e = 0; e < E; e++) P[(s - u0) * N * N + swizzled(n, q + ROW_THREADS * e, N)] = S[e];
                        if (q == 0) sa[s - u0][n] = x;
                    }
                    const float vn = in[V][s][n];
#pragma unroll
                    for (int e = 0; e < E; e++) {
                        const int j = q + ROW_THREADS * e;
                        S[e] = S[e] * in[D][s][j] + x * in[B_][s][j] + vn * in[K][s][j];
                    }
                }
            }
            __syncthreads();  // P and sa complete

            // 2. walk these steps backwards
            for (int s = u1 - 1; s >= u0; s--) {
                const float* Ps = P + (s - u0) * N * N;
                const float* sas = sa[s - u0];
                float* dsas = dsa[s & 1];  // by parity: a late reader of the last step's is not overwritten

                // row n of G: dy contribution, then dv_n and dsa_n
                const float dyn = in[DY][s][n];
                float dv = 0.f, dsan = 0.f;
#pragma unroll
                for (int e = 0; e < E; e++) {
                    const int j = q + ROW_THREADS * e;
                    Grow[e] += dyn * in[R][s][j];
                    dv += Grow[e] * in[K][s][j];
                    dsan += Grow[e] * in[B_][s][j];
                }
                dv = row_sum(dv);
                dsan = row_sum(dsan);
                if (q == 0) dsas[n] = dsan;

                // column n of G: dy contribution, then dk_n, db_n, dd_n; dr_n from column n of S_t
                const float rn = in[R][s][n], dn = in[D][s][n], bn = in[B_][s][n], kn = in[K][s][n];
                float dk = 0.f, db = 0.f, dd = 0.f, dr = 0.f;
#pragma unroll
                for (int e = 0; e < E; e++) {
                    const int j = q + ROW_THREADS * e;
                    const float p = Ps[swizzled(j, n, N)], dyj = in[DY][s][j], vj = in[V][s][j];
                    Gcol[e] += dyj * rn;
                    dk += Gcol[e] * vj;
                    db += Gcol[e] * sas[j];
                    dd += Gcol[e] * p;
                    dr += dyj * (p * dn + sas[j] * bn + vj * kn);
                }
                dk = row_sum(dk);
                db = row_sum(db);
                dd = row_sum(dd);
                dr = row_sum(dr);
                __syncthreads();  // dsa complete

                const float an = in[A][s][n];
                float da = 0.f;
#pragma unroll
                for (int e = 0; e < E; e++) {
                    const int j = q + ROW_THREADS * e;
                    da += dsas[j] * Ps[swizzled(j, n, N)];
                    Grow[e] = Grow[e] * in[D][s][j] + dsan * in[A][s][j];
                    Gcol[e] = Gcol[e] * dn + dsas[j] * an;
                }
                da = row_sum(da);
                if (reset[s]) {  // P_t = R: G flows into R, and nothing into the state before
                    if (ds_reset != nullptr) {
#pragma unroll
                        for (int e = 0; e < E; e++) ds_reset[st + n * N + q + ROW_THREADS * e] += Grow[e];
                    }
#pragma unroll
                    for (int e = 0; e < E; e++) Grow[e] = Gcol[e] = 0.f;
                }
                if (q == 0) {
                    const size_t x = ((size_t)(bb * T + t0 + s) * H + h) * N + n;
                    dr_[x] = from_f<F>(dr);
                    dw_[x] = from_f<F>(-dd * dn * in[EW][s][n]);
                    dk_[x] = from_f<F>(dk);
                    dv_[x] = from_f<F>(dv);
                    da_[x] = from_f<F>(da);
                    db_[x] = from_f<F>(db);
                }
            }
            __syncthreads();  // P and sa are free for the next SUB steps
        }
    }
#pragma unroll
    for (int e = 0; e < E; e++) ds0[st + n * N + q + ROW_THREADS * e] = Grow[e];
}

#ifndef WKV7_HOST_EMULATION
// ---- launchers: return nullptr on success, else a CUDA error string ----

static const char* last_error() {
    cudaError_t e = cudaGetLastError();
    return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

template <typename F>
static const char* forward(int B, int T, int H, int N, const void* r, const void* w, const void* k,
                           const void* v, const void* a, const void* b, const float* s0,
                           const uint8_t* resets, const float* s_reset, void* y, float* sT, float* snaps,
                           void* stream) {
    if (N != 64) return "the WKV-7 CUDA kernel supports head size 64 only";
    wkv7_forward_kernel<F, 64><<<B * H, 64 * ROW_THREADS, 0, (cudaStream_t)stream>>>(
        T, H, (const F*)r, (const F*)w, (const F*)k, (const F*)v, (const F*)a, (const F*)b,
        s0, resets, s_reset, (F*)y, sT, snaps);
    return last_error();
}

template <typename F>
static const char* backward(int B, int T, int H, int N, const void* r, const void* w, const void* k,
                            const void* v, const void* a, const void* b, const void* dy,
                            const float* dsT, const float* snaps, const uint8_t* resets,
                            const float* s_reset, void* dr, void* dw, void* dk, void* dv,
                            void* da, void* db, float* ds0, float* ds_reset, void* stream) {
    if (N != 64) return "the WKV-7 CUDA kernel supports head size 64 only";
    const int bytes = backward_shared_floats(64) * (int)sizeof(float);  // over the 48 KB default
    cudaError_t e = cudaFuncSetAttribute(wkv7_backward_kernel<F, 64>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    if (e != cudaSuccess) return cudaGetErrorString(e);
    wkv7_backward_kernel<F, 64><<<B * H, 64 * ROW_THREADS, bytes, (cudaStream_t)stream>>>(
        T, H, (const F*)r, (const F*)w, (const F*)k, (const F*)v, (const F*)a, (const F*)b,
        (const F*)dy, dsT, snaps, resets, s_reset, (F*)dr, (F*)dw, (F*)dk, (F*)dv, (F*)da,
        (F*)db, ds0, ds_reset);
    return last_error();
}

#define WKV7_LAUNCHERS(SUFFIX, F)                                                                 \
    extern "C" const char* wkv7_forward_##SUFFIX(                                                 \
        int B, int T, int H, int N, const void* r, const void* w, const void* k, const void* v,   \
        const void* a, const void* b, const float* s0, const uint8_t* resets,                     \
        const float* s_reset, void* y, float* sT, float* snaps, void* stream) {                   \
        return forward<F>(B, T, H, N, r, w, k, v, a, b, s0, resets, s_reset, y, sT, snaps,        \
                          stream);                                                                \
    }                                                                                             \
    extern "C" const char* wkv7_backward_##SUFFIX(                                                \
        int B, int T, int H, int N, const void* r, const void* w, const void* k, const void* v,   \
        const void* a, const void* b, const void* dy, const float* dsT, const float* snaps,       \
        const uint8_t* resets, const float* s_reset, void* dr, void* dw, void* dk, void* dv,      \
        void* da, void* db, float* ds0, float* ds_reset, void* stream) {                          \
        return backward<F>(B, T, H, N, r, w, k, v, a, b, dy, dsT, snaps, resets, s_reset, dr, dw, \
                           dk, dv, da, db, ds0, ds_reset, stream);                                \
    }

WKV7_LAUNCHERS(f32, float)
WKV7_LAUNCHERS(bf16, __nv_bfloat16)

extern "C" int wkv7_chunk_len() { return CHUNK; }
#endif  // WKV7_HOST_EMULATION
