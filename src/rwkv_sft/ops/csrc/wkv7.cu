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
// One block per (batch, head), one thread per state row; all arithmetic in fp32.
#ifndef WKV7_HOST_EMULATION  // the tests also run these kernels on the CPU through a small shim
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#endif
#include "wkv7.h"

// Steps between state snapshots kept by the forward for the backward.
constexpr int CHUNK = 16;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename F> __device__ __forceinline__ F from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

// Thread i holds row i of S in registers. With snaps != nullptr it stores the raw state before
// every CHUNK-th step, transposed (snaps[c][j][i] = S[i][j]) so that the stores coalesce.
template <typename F, int N>
__global__ void __launch_bounds__(N) wkv7_forward_kernel(
    int T, int H, const F* __restrict__ r_, const F* __restrict__ w_, const F* __restrict__ k_,
    const F* __restrict__ v_, const F* __restrict__ a_, const F* __restrict__ b_,
    const float* __restrict__ s0, const uint8_t* __restrict__ resets, const float* __restrict__ s_reset,
    F* __restrict__ y_, float* __restrict__ sT, float* __restrict__ snaps)
{
    const int bh = blockIdx.x, bb = bh / H, h = bh % H, i = threadIdx.x;
    const int nchunks = (T + CHUNK - 1) / CHUNK;
    __shared__ float r[N], d[N], k[N], a[N], b[N];

    float S[N];
#pragma unroll
    for (int j = 0; j < N; j++) S[j] = s0[(size_t)bh * N * N + i * N + j];

    for (int t = 0; t < T; t++) {
        const size_t x = ((size_t)(bb * T + t) * H + h) * N + i;
        if (snaps != nullptr && t % CHUNK == 0) {
            float* snap = snaps + ((size_t)bh * nchunks + t / CHUNK) * N * N;
#pragma unroll
            for (int j = 0; j < N; j++) snap[j * N + i] = S[j];
        }
        __syncthreads();  // everyone is done with the previous step's vectors
        r[i] = to_f(r_[x]);
        d[i] = expf(-expf(to_f(w_[x])));
        k[i] = to_f(k_[x]);
        a[i] = to_f(a_[x]);
        b[i] = to_f(b_[x]);
        const float vi = to_f(v_[x]);
        __syncthreads();

        if (resets != nullptr && resets[bb * T + t]) {
#pragma unroll
            for (int j = 0; j < N; j++) S[j] = s_reset ? s_reset[(size_t)bh * N * N + i * N + j] : 0.f;
        }
        float sa = 0.f;
#pragma unroll
        for (int j = 0; j < N; j++) sa += S[j] * a[j];
        float y = 0.f;
#pragma unroll
        for (int j = 0; j < N; j++) {
            S[j] = S[j] * d[j] + sa * b[j] + vi * k[j];
            y += S[j] * r[j];
        }
        y_[x] = from_f<F>(y);
    }
#pragma unroll
    for (int j = 0; j < N; j++) sT[(size_t)bh * N * N + i * N + j] = S[j];
}

// Backward. G = dL/dS_t, seeded with dL/dS_T (the final state's gradient). For t = T-1 .. 0:
//   G      += dy_t r_t^T                           (y_t = S_t r_t)
//   dr_t[j] = sum_i dy_t[i] S_t[i][j]
//   dv_t[i] = sum_j G[i][j] k_t[j]                  dk_t[j] = sum_i G[i][j] v_t[i]
//   dsa[i]  = sum_j G[i][j] b_t[j]                  db_t[j] = sum_i G[i][j] sa_t[i]
//   dd[j]   = sum_i G[i][j] P_t[i][j]               da_t[j] = sum_i dsa[i] P_t[i][j]
//   dw_t[j] = dd[j] * d_t[j] * (-exp(w_t[j]))      (d = exp(-exp(w)))
//   G       = G diag(d_t) + dsa a_t^T              (= dL/dP_t)
//   dR     += reset_t ? G : 0                       (into ds_reset, zeroed by the caller)
//   G       = reset_t ? 0 : G                       (= dL/dS_{t-1})
// and finally dL/dS_init = G. The sums over j are rows of G, the sums over i are columns: thread n
// keeps both row n (Grow[j] = G[n][j]) and column n (Gcol[j] = G[j][n]) of G, updated by the
// same rule, so every reduction is a private loop and no cross-thread reduction is needed.
//
// P_t and S_t come from recomputation, not from stepping the state backwards by dividing by d_t
// (d_t can be arbitrarily close to 0 for large w, and the division amplifies rounding): for each
// chunk, last to first, the states are recomputed from the forward's snapshot into a per-block
// scratch X ([CHUNK+1][N][N], X[s] = raw state before step t0+s, stored transposed so thread n's
// column n of S is contiguous), and sa_t into shared memory; then the chunk is walked backwards.
template <typename F, int N>
__global__ void __launch_bounds__(N) wkv7_backward_kernel(
    int T, int H, const F* __restrict__ r_, const F* __restrict__ w_, const F* __restrict__ k_,
    const F* __restrict__ v_, const F* __restrict__ a_, const F* __restrict__ b_,
    const F* __restrict__ dy_, const float* __restrict__ dsT, const float* __restrict__ snaps,
    const uint8_t* __restrict__ resets, const float* __restrict__ s_reset,
    float* scratch,  // written and read by this kernel: no const/__restrict__ (no read-only cache)
    F* __restrict__ dr_, F* __restrict__ dw_, F* __restrict__ dk_, F* __restrict__ dv_,
    F* __restrict__ da_, F* __restrict__ db_, float* __restrict__ ds0, float* __restrict__ ds_reset)
{
    const int bh = blockIdx.x, bb = bh / H, h = bh % H, n = threadIdx.x;
    const int nchunks = (T + CHUNK - 1) / CHUNK;
    __shared__ float r[N], d[N], k[N], v[N], a[N], b[N], dy[N], dsa[N], sa[CHUNK][N];
    float* X = scratch + (size_t)bh * (CHUNK + 1) * N * N;

    float Grow[N], Gcol[N];
#pragma unroll
    for (int j = 0; j < N; j++) {
        Grow[j] = dsT[(size_t)bh * N * N + n * N + j];
        Gcol[j] = dsT[(size_t)bh * N * N + j * N + n];
    }

    for (int c = nchunks - 1; c >= 0; c--) {
        const int t0 = c * CHUNK, t1 = min(T, t0 + CHUNK);
        __syncthreads();  // the previous chunk's reads of X and sa are finished

        {   // 1. recompute the chunk's states (thread n = row n), exactly as the forward does
            const float* snap = snaps + ((size_t)bh * nchunks + c) * N * N;
            float S[N];
#pragma unroll
            for (int j = 0; j < N; j++) {
                S[j] = snap[j * N + n];
                X[j * N + n] = S[j];
            }
            for (int t = t0; t < t1; t++) {
                const size_t x = ((size_t)(bb * T + t) * H + h) * N + n;
                __syncthreads();
                d[n] = expf(-expf(to_f(w_[x])));
                k[n] = to_f(k_[x]);
                a[n] = to_f(a_[x]);
                b[n] = to_f(b_[x]);
                const float vn = to_f(v_[x]);
                __syncthreads();
                if (resets != nullptr && resets[bb * T + t]) {
#pragma unroll
                    for (int j = 0; j < N; j++) S[j] = s_reset ? s_reset[(size_t)bh * N * N + n * N + j] : 0.f;
                }
                float s_a = 0.f;
#pragma unroll
                for (int j = 0; j < N; j++) s_a += S[j] * a[j];
                sa[t - t0][n] = s_a;
                float* Xs = X + (size_t)(t - t0 + 1) * N * N;
#pragma unroll
                for (int j = 0; j < N; j++) {
                    S[j] = S[j] * d[j] + s_a * b[j] + vn * k[j];
                    Xs[j * N + n] = S[j];
                }
            }
        }

        // 2. walk the chunk backwards
        for (int t = t1 - 1; t >= t0; t--) {
            const int s = t - t0;
            const size_t x = ((size_t)(bb * T + t) * H + h) * N + n;
            __syncthreads();  // shared vectors free again; X and sa visible to the whole block
            const float ew = expf(to_f(w_[x]));
            const float dn = expf(-ew);
            r[n] = to_f(r_[x]);
            d[n] = dn;
            k[n] = to_f(k_[x]);
            v[n] = to_f(v_[x]);
            a[n] = to_f(a_[x]);
            b[n] = to_f(b_[x]);
            dy[n] = to_f(dy_[x]);
            __syncthreads();
            const bool reset = resets != nullptr && resets[bb * T + t];

            // row n of G: dy contribution, then dv_n and dsa_n
            const float dyn = dy[n];
            float dv = 0.f, dsan = 0.f;
#pragma unroll
            for (int j = 0; j < N; j++) {
                Grow[j] += dyn * r[j];
                dv += Grow[j] * k[j];
                dsan += Grow[j] * b[j];
            }
            dsa[n] = dsan;

            // column n of G: dy contribution, then dk_n, db_n, dd_n; dr_n from column n of S_t
            const float* St = X + (size_t)(s + 1) * N * N + n * N;  // St[j] = S_t[j][n]
            const float* Pt = X + (size_t)s * N * N + n * N;        // Pt[j] = S_{t-1}[j][n]
            const float rn = r[n];
            float dk = 0.f, db = 0.f, dr = 0.f, dd = 0.f;
#pragma unroll
            for (int j = 0; j < N; j++) {
                Gcol[j] += dy[j] * rn;
                dk += Gcol[j] * v[j];
                db += Gcol[j] * sa[s][j];
                dr += dy[j] * St[j];
                dd += Gcol[j] * Pt[j];
            }
            __syncthreads();  // dsa complete

            float da = 0.f;
#pragma unroll
            for (int j = 0; j < N; j++) da += dsa[j] * Pt[j];
            if (reset) {  // P_t = R, not X[s] (the state before the reset)
                dd = da = 0.f;
                if (s_reset != nullptr) {
                    const float* R = s_reset + (size_t)bh * N * N + n;  // R[j * N] = R[j][n]
                    for (int j = 0; j < N; j++) {
                        dd += Gcol[j] * R[j * N];
                        da += dsa[j] * R[j * N];
                    }
                }
            }

            const float an = a[n];
            if (reset && ds_reset != nullptr) {
                float* dR = ds_reset + (size_t)bh * N * N + n * N;  // row n: this thread's alone
                for (int j = 0; j < N; j++) dR[j] += Grow[j] * d[j] + dsan * a[j];
            }
#pragma unroll
            for (int j = 0; j < N; j++) {
                Grow[j] = reset ? 0.f : Grow[j] * d[j] + dsan * a[j];
                Gcol[j] = reset ? 0.f : Gcol[j] * dn + dsa[j] * an;
            }

            dr_[x] = from_f<F>(dr);
            dw_[x] = from_f<F>(-dd * dn * ew);
            dk_[x] = from_f<F>(dk);
            dv_[x] = from_f<F>(dv);
            da_[x] = from_f<F>(da);
            db_[x] = from_f<F>(db);
        }
    }
#pragma unroll
    for (int j = 0; j < N; j++) ds0[(size_t)bh * N * N + n * N + j] = Grow[j];
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
    wkv7_forward_kernel<F, 64><<<B * H, 64, 0, (cudaStream_t)stream>>>(
        T, H, (const F*)r, (const F*)w, (const F*)k, (const F*)v, (const F*)a, (const F*)b,
        s0, resets, s_reset, (F*)y, sT, snaps);
    return last_error();
}

template <typename F>
static const char* backward(int B, int T, int H, int N, const void* r, const void* w, const void* k,
                            const void* v, const void* a, const void* b, const void* dy,
                            const float* dsT, const float* snaps, const uint8_t* resets,
                            const float* s_reset, float* scratch, void* dr, void* dw, void* dk, void* dv,
                            void* da, void* db, float* ds0, float* ds_reset, void* stream) {
    if (N != 64) return "the WKV-7 CUDA kernel supports head size 64 only";
    wkv7_backward_kernel<F, 64><<<B * H, 64, 0, (cudaStream_t)stream>>>(
        T, H, (const F*)r, (const F*)w, (const F*)k, (const F*)v, (const F*)a, (const F*)b,
        (const F*)dy, dsT, snaps, resets, s_reset, scratch, (F*)dr, (F*)dw, (F*)dk, (F*)dv, (F*)da,
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
        const uint8_t* resets, const float* s_reset, float* scratch, void* dr, void* dw, void* dk, \
        void* dv, void* da, void* db, float* ds0, float* ds_reset, void* stream) {                \
        return backward<F>(B, T, H, N, r, w, k, v, a, b, dy, dsT, snaps, resets, s_reset, scratch, \
                           dr, dw, dk, dv, da, db, ds0, ds_reset, stream);                        \
    }

WKV7_LAUNCHERS(f32, float)
WKV7_LAUNCHERS(bf16, __nv_bfloat16)

extern "C" int wkv7_chunk_len() { return CHUNK; }
#endif  // WKV7_HOST_EMULATION
