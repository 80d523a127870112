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
// warp: thread n * ROW_THREADS + q holds S[n][col(q, e)], e < N / ROW_THREADS, so a sum over a row
// is a short private loop plus two shuffles, and a block has 8 warps rather than 2. A thread's
// columns come in float4 groups, so it reads its part of a vector with one 16-byte load per group.
// Each chunk's inputs go through registers into shared memory; the next chunk's loads are issued
// before this chunk is computed, so their latency is hidden. All arithmetic is fp32.
#ifndef WKV7_HOST_EMULATION  // the tests also run these kernels on the CPU through a small shim
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cstdlib>
#define WKV7_DYNAMIC_SHARED(name) extern __shared__ __align__(16) float name[]
#endif
#include "wkv7.h"

constexpr int CHUNK = 16;       // steps between the state snapshots the forward keeps for the backward
constexpr int ROW_THREADS = 4;  // threads per state row; block size N * ROW_THREADS
constexpr int VEC = 4;          // floats per vector load

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename F> __device__ __forceinline__ F from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

// Column of element e of row part q: group e / VEC of the part starts at VEC * (ROW_THREADS * g + q).
__device__ __forceinline__ int col(int q, int e) { return VEC * (ROW_THREADS * (e / VEC) + q) + e % VEC; }

// Sum over the ROW_THREADS lanes that share a row; every one of them gets the total.
__device__ __forceinline__ float row_sum(float x) {
#pragma unroll
    for (int m = 1; m < ROW_THREADS; m <<= 1) x += __shfl_xor_sync(0xffffffffu, x, m);
    return x;
}

// Row part q of an [N] vector in shared memory (16-byte aligned): out[e] = vec[col(q, e)].
template <int E>
__device__ __forceinline__ void load_part(const float* vec, int q, float (&out)[E]) {
    const float4* groups = reinterpret_cast<const float4*>(vec);
#pragma unroll
    for (int g = 0; g < E / VEC; g++) {
        const float4 x = groups[ROW_THREADS * g + q];
        out[VEC * g] = x.x;
        out[VEC * g + 1] = x.y;
        out[VEC * g + 2] = x.z;
        out[VEC * g + 3] = x.w;
    }
}

// One step of the state's row n, shared by the forward and the backward's recomputation, as three
// pieces (the backward keeps P_t and sa_t in between): at a reset the row restarts from R (s_reset,
// [N,N] of this block) or zero; sa = sum_j S[n][j] a[j]; S[n][j] = S[n][j] d[j] + sa b[j] + v[n] k[j].
template <int E, int N>
__device__ __forceinline__ void restart_row(float (&S)[E], const float* R, int n, int q) {
#pragma unroll
    for (int e = 0; e < E; e++) S[e] = R != nullptr ? R[n * N + col(q, e)] : 0.f;
}

template <int E>
__device__ __forceinline__ float row_dot(const float (&S)[E], const float* vec, int q) {
    float x[E];
    load_part(vec, q, x);
    float sum = 0.f;
#pragma unroll
    for (int e = 0; e < E; e++) sum += S[e] * x[e];
    return row_sum(sum);
}

template <int E>
__device__ __forceinline__ void advance_row(float (&S)[E], float sa, const float* d_, const float* b_,
                                            const float* k_, float vn, int q) {
    float d[E], b[E], k[E];
    load_part(d_, q, d);
    load_part(b_, q, b);
    load_part(k_, q, k);
#pragma unroll
    for (int e = 0; e < E; e++) S[e] = S[e] * d[e] + sa * b[e] + vn * k[e];
}

// A thread's share of one chunk's inputs (COUNT tensors [B,T,H,N], CHUNK steps from t0, zero past
// T) and of its reset flags, held in registers from load() to store(): stage[COUNT][CHUNK][N] in
// shared memory. The decay's input w (slot `decay`) is stored as d = exp(-exp(w)), and exp(w) too
// in slot `exp_w` when that is not -1.
template <int COUNT, typename F, int N>
struct ChunkInputs {
    static constexpr int THREADS = N * ROW_THREADS, PER_THREAD = COUNT * CHUNK * N / THREADS;
    float x[PER_THREAD];
    bool reset;

    __device__ __forceinline__ void load(const F* const (&inputs)[COUNT], const uint8_t* resets,
                                         int bb, int h, int T, int H, int t0) {
#pragma unroll
        for (int i = 0; i < PER_THREAD; i++) {  // unrolled: inputs[which] is known at compile time
            const int which = i / (CHUNK * N / THREADS), idx = i * THREADS + threadIdx.x;
            const int t = t0 + idx / N % CHUNK, j = idx % N;
            x[i] = t < T ? to_f(inputs[which][((size_t)(bb * T + t) * H + h) * N + j]) : 0.f;
        }
        const int t = t0 + threadIdx.x;
        reset = threadIdx.x < CHUNK && resets != nullptr && t < T && resets[bb * T + t];
    }

    __device__ __forceinline__ void store(float* stage, bool* reset_flags, int decay, int exp_w) const {
#pragma unroll
        for (int i = 0; i < PER_THREAD; i++) {
            const int which = i / (CHUNK * N / THREADS), idx = i * THREADS + threadIdx.x;
            if (which == decay) {
                const float ew = expf(x[i]);
                stage[idx] = expf(-ew);
                if (exp_w >= 0) stage[exp_w * CHUNK * N + idx % (CHUNK * N)] = ew;
            } else {
                stage[idx] = x[i];
            }
        }
        if (threadIdx.x < CHUNK) reset_flags[threadIdx.x] = reset;
    }
};

// Snapshots are stored in thread order (element e of thread tid at e * THREADS + tid): coalesced.
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
    __shared__ __align__(16) float in[6][CHUNK][N];
    __shared__ bool reset[CHUNK];
    const F* const inputs[6] = {r_, w_, k_, v_, a_, b_};
    ChunkInputs<6, F, N> next;
    next.load(inputs, resets, bb, h, T, H, 0);

    float S[E];  // S[e] = state[n][col(q, e)]
#pragma unroll
    for (int e = 0; e < E; e++) S[e] = s0[st + n * N + col(q, e)];

    for (int c = 0; c < nchunks; c++) {
        const int t0 = c * CHUNK, steps = min(CHUNK, T - t0);
        if (snaps != nullptr) {
            float* snap = snaps + (st * nchunks + (size_t)c * N * N);
#pragma unroll
            for (int e = 0; e < E; e++) snap[e * THREADS + tid] = S[e];
        }
        __syncthreads();  // every row is done with the previous chunk's inputs
        next.store(&in[0][0][0], reset, D, -1);
        __syncthreads();
        if (c + 1 < nchunks) next.load(inputs, resets, bb, h, T, H, t0 + CHUNK);  // in flight meanwhile

        for (int s = 0; s < steps; s++) {
            if (reset[s]) restart_row<E, N>(S, s_reset ? s_reset + st : nullptr, n, q);  // block-uniform
            const float sa = row_dot(S, in[A][s], q);
            advance_row(S, sa, in[D][s], in[B_][s], in[K][s], in[V][s][n], q);
            const float y = row_dot(S, in[R][s], q);
            if (q == 0) y_[((size_t)(bb * T + t0 + s) * H + h) * N + n] = from_f<F>(y);
        }
    }
#pragma unroll
    for (int e = 0; e < E; e++) sT[st + n * N + col(q, e)] = S[e];
}

// Where the backward keeps S[i][j] of one state in shared memory: row i, with j's float4 group
// XORed by a function of i, so that the recomputation's float4 writes along rows and the walk's
// reads down columns are both free of bank conflicts (for the thread layout above).
__device__ __forceinline__ int swizzled(int i, int j, int N) {
    const int groups = 4 * ((i % 2) ^ (i / 4 % 2)) + 2 * (i / 8 % 2);
    return i * N + (j ^ (VEC * groups));
}

// The backward's shared memory, in floats, when it holds the states of SUB steps at once: SUB = 8
// takes 163 KB (A100, H100), SUB = 4 98 KB (the 99 KB of consumer GPUs, at 2.5 recomputed steps
// per step instead of 1.5).
constexpr int backward_shared_floats(int N, int SUB) { return 8 * CHUNK * N + SUB * N * N + SUB * N + 2 * N; }

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
// j = col(q, e), updated by the same rule, so each sum is a private loop plus row_sum.
//
// P_t comes from recomputation, not from stepping the state backwards by dividing by d_t (the
// division amplifies rounding): for each chunk, last to first, and each SUB steps of it, last
// first, the states are recomputed from the forward's snapshot and P_t (after any reset) and
// sa_t of those SUB steps kept in shared memory; then those steps are walked backwards.
template <typename F, int N, int SUB>
__global__ void __launch_bounds__(N * ROW_THREADS) wkv7_backward_kernel(
    int T, int H, const F* __restrict__ r_, const F* __restrict__ w_, const F* __restrict__ k_,
    const F* __restrict__ v_, const F* __restrict__ a_, const F* __restrict__ b_,
    const F* __restrict__ dy_, const float* __restrict__ dsT, const float* __restrict__ snaps,
    const uint8_t* __restrict__ resets, const float* __restrict__ s_reset,
    F* __restrict__ dr_, F* __restrict__ dw_, F* __restrict__ dk_, F* __restrict__ dv_,
    F* __restrict__ da_, F* __restrict__ db_, float* __restrict__ ds0, float* __restrict__ ds_reset)
{
    constexpr int E = N / ROW_THREADS, THREADS = N * ROW_THREADS;
    enum { R, D, K, V, A, B_, DY, EW };  // EW: exp(w)
    const int bh = blockIdx.x, bb = bh / H, h = bh % H;
    const int tid = threadIdx.x, n = tid / ROW_THREADS, q = tid % ROW_THREADS;
    const int nchunks = (T + CHUNK - 1) / CHUNK;
    const size_t st = (size_t)bh * N * N;
    WKV7_DYNAMIC_SHARED(shared);                          // backward_shared_floats(N, SUB) floats:
    float (*in)[CHUNK][N] = (float (*)[CHUNK][N])shared;  // in[8][CHUNK][N]: the chunk's vectors
    float* P = shared + 8 * CHUNK * N;                    // P[SUB][N * N], swizzled
    float (*sa)[N] = (float (*)[N])(P + SUB * N * N);     // sa[SUB][N]
    float (*dsa)[N] = sa + SUB;                           // dsa[2][N], by the step's parity
    __shared__ bool reset[CHUNK];
    const F* const inputs[7] = {r_, w_, k_, v_, a_, b_, dy_};
    ChunkInputs<7, F, N> next;
    next.load(inputs, resets, bb, h, T, H, (nchunks - 1) * CHUNK);

    float Grow[E], Gcol[E];
#pragma unroll
    for (int e = 0; e < E; e++) {
        Grow[e] = dsT[st + n * N + col(q, e)];
        Gcol[e] = dsT[st + col(q, e) * N + n];
    }

    for (int c = nchunks - 1; c >= 0; c--) {
        const int t0 = c * CHUNK, steps = min(CHUNK, T - t0);
        const float* snap = snaps + (st * nchunks + (size_t)c * N * N);
        __syncthreads();  // the previous chunk is done with the staged vectors
        next.store(&in[0][0][0], reset, D, EW);
        __syncthreads();
        if (c > 0) next.load(inputs, resets, bb, h, T, H, t0 - CHUNK);  // in flight meanwhile

        for (int u0 = (steps - 1) / SUB * SUB; u0 >= 0; u0 -= SUB) {
            const int u1 = min(steps, u0 + SUB);
            {   // 1. recompute the states from the chunk's snapshot, keeping P and sa of steps u0..u1-1
                float S[E];
#pragma unroll
                for (int e = 0; e < E; e++) S[e] = snap[e * THREADS + tid];
                for (int s = 0; s < u1; s++) {
                    if (reset[s]) restart_row<E, N>(S, s_reset ? s_reset + st : nullptr, n, q);
                    const float x = row_dot(S, in[A][s], q);
                    if (s >= u0) {
                        float* Ps = P + (s - u0) * N * N;
#pragma unroll
                        for (int g = 0; g < E / VEC; g++)
                            *reinterpret_cast<float4*>(Ps + swizzled(n, col(q, VEC * g), N)) =
                                make_float4(S[VEC * g], S[VEC * g + 1], S[VEC * g + 2], S[VEC * g + 3]);
                        if (q == 0) sa[s - u0][n] = x;
                    }
                    advance_row(S, x, in[D][s], in[B_][s], in[K][s], in[V][s][n], q);
                }
            }
            __syncthreads();  // P and sa complete

            // 2. walk these steps backwards
            for (int s = u1 - 1; s >= u0; s--) {
                const float* Ps = P + (s - u0) * N * N;
                float* dsas = dsa[s & 1];  // by parity: a late reader of the last step's is not overwritten

                // row n of G: dy contribution, then dv_n and dsa_n
                float r[E], k[E], b[E];
                load_part(in[R][s], q, r);
                load_part(in[K][s], q, k);
                load_part(in[B_][s], q, b);
                const float dyn = in[DY][s][n];
                float dv = 0.f, dsan = 0.f;
#pragma unroll
                for (int e = 0; e < E; e++) {
                    Grow[e] += dyn * r[e];
                    dv += Grow[e] * k[e];
                    dsan += Grow[e] * b[e];
                }
                dv = row_sum(dv);
                dsan = row_sum(dsan);
                if (q == 0) dsas[n] = dsan;

                // column n of G: dy contribution, then dk_n, db_n, dd_n; dr_n from column n of S_t
                float dy[E], v[E], sav[E], p[E];
                load_part(in[DY][s], q, dy);
                load_part(in[V][s], q, v);
                load_part(sa[s - u0], q, sav);
#pragma unroll
                for (int e = 0; e < E; e++) p[e] = Ps[swizzled(col(q, e), n, N)];  // P_t[j][n]
                const float rn = in[R][s][n], dn = in[D][s][n], bn = in[B_][s][n], kn = in[K][s][n];
                float dk = 0.f, db = 0.f, dd = 0.f, dr = 0.f;
#pragma unroll
                for (int e = 0; e < E; e++) {
                    Gcol[e] += dy[e] * rn;
                    dk += Gcol[e] * v[e];
                    db += Gcol[e] * sav[e];
                    dd += Gcol[e] * p[e];
                    dr += dy[e] * (p[e] * dn + sav[e] * bn + v[e] * kn);
                }
                dk = row_sum(dk);
                db = row_sum(db);
                dd = row_sum(dd);
                dr = row_sum(dr);
                __syncthreads();  // dsa complete

                float dsav[E], d[E], a[E];
                load_part(dsas, q, dsav);
                load_part(in[D][s], q, d);
                load_part(in[A][s], q, a);
                const float an = in[A][s][n];
                float da = 0.f;
#pragma unroll
                for (int e = 0; e < E; e++) {
                    da += dsav[e] * p[e];
                    Grow[e] = Grow[e] * d[e] + dsan * a[e];
                    Gcol[e] = Gcol[e] * dn + dsav[e] * an;
                }
                da = row_sum(da);
                if (reset[s]) {  // P_t = R: G flows into R, and nothing into the state before
                    if (ds_reset != nullptr) {
#pragma unroll
                        for (int e = 0; e < E; e++) ds_reset[st + n * N + col(q, e)] += Grow[e];
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
    for (int e = 0; e < E; e++) ds0[st + n * N + col(q, e)] = Grow[e];
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

template <typename F, int SUB>
static const char* launch_backward(int B, int T, int H, const void* r, const void* w, const void* k,
                                   const void* v, const void* a, const void* b, const void* dy,
                                   const float* dsT, const float* snaps, const uint8_t* resets,
                                   const float* s_reset, void* dr, void* dw, void* dk, void* dv,
                                   void* da, void* db, float* ds0, float* ds_reset, void* stream) {
    const int bytes = backward_shared_floats(64, SUB) * (int)sizeof(float);  // over the 48 KB default
    cudaError_t e = cudaFuncSetAttribute(wkv7_backward_kernel<F, 64, SUB>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    if (e != cudaSuccess) return cudaGetErrorString(e);
    wkv7_backward_kernel<F, 64, SUB><<<B * H, 64 * ROW_THREADS, bytes, (cudaStream_t)stream>>>(
        T, H, (const F*)r, (const F*)w, (const F*)k, (const F*)v, (const F*)a, (const F*)b,
        (const F*)dy, dsT, snaps, resets, s_reset, (F*)dr, (F*)dw, (F*)dk, (F*)dv, (F*)da,
        (F*)db, ds0, ds_reset);
    return last_error();
}

template <typename F>
static const char* backward(int B, int T, int H, int N, const void* r, const void* w, const void* k,
                            const void* v, const void* a, const void* b, const void* dy,
                            const float* dsT, const float* snaps, const uint8_t* resets,
                            const float* s_reset, void* dr, void* dw, void* dk, void* dv,
                            void* da, void* db, float* ds0, float* ds_reset, void* stream) {
    if (N != 64) return "the WKV-7 CUDA kernel supports head size 64 only";
    int device = 0, optin = 0;  // the most shared memory a block of this GPU may ask for
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (const char* limit = getenv("RWKV_SFT_WKV7_SHARED_LIMIT"))  // lets a big GPU test the small path
        optin = min(optin, atoi(limit));
    const int fixed = CHUNK * (int)sizeof(bool);  // the static shared memory (the reset flags)
    if (optin >= backward_shared_floats(64, 8) * (int)sizeof(float) + fixed)
        return launch_backward<F, 8>(B, T, H, r, w, k, v, a, b, dy, dsT, snaps, resets, s_reset, dr, dw, dk,
                                     dv, da, db, ds0, ds_reset, stream);
    if (optin >= backward_shared_floats(64, 4) * (int)sizeof(float) + fixed)
        return launch_backward<F, 4>(B, T, H, r, w, k, v, a, b, dy, dsT, snaps, resets, s_reset, dr, dw, dk,
                                     dv, da, db, ds0, ds_reset, stream);
    return "the WKV-7 CUDA kernel's backward needs 98 KB of shared memory per block, more than this GPU has";
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
