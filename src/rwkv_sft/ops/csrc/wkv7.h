// The WKV-7 kernel's C interface (defined in wkv7.cu, called by wkv7_op.cpp). Included by both,
// so the compiler checks that the two sides agree. Each launcher returns nullptr on success,
// else a CUDA error string. Pointers are device pointers; r..b, dy and the gradients share one
// dtype (float or bf16, passed as void*); states and snapshots are float. s_reset (the
// state resets restart from, [B,H,N,N]) and ds_reset (its gradient, zeroed by the caller) may be
// nullptr: resets then restart from zero.
#pragma once
#include <stdint.h>

extern "C" {
const char* wkv7_forward_f32(int B, int T, int H, int N, const void* r, const void* w, const void* k,
                             const void* v, const void* a, const void* b, const float* s0,
                             const uint8_t* resets, const float* s_reset, void* y, float* sT,
                             float* snaps, void* stream);
const char* wkv7_forward_bf16(int B, int T, int H, int N, const void* r, const void* w, const void* k,
                              const void* v, const void* a, const void* b, const float* s0,
                              const uint8_t* resets, const float* s_reset, void* y, float* sT,
                              float* snaps, void* stream);
const char* wkv7_backward_f32(int B, int T, int H, int N, const void* r, const void* w, const void* k,
                              const void* v, const void* a, const void* b, const void* dy,
                              const float* dsT, const float* snaps, const uint8_t* resets,
                              const float* s_reset, void* dr, void* dw, void* dk, void* dv,
                              void* da, void* db, float* ds0, float* ds_reset, void* stream);
const char* wkv7_backward_bf16(int B, int T, int H, int N, const void* r, const void* w, const void* k,
                               const void* v, const void* a, const void* b, const void* dy,
                               const float* dsT, const float* snaps, const uint8_t* resets,
                               const float* s_reset, void* dr, void* dw, void* dk, void* dv,
                               void* da, void* db, float* ds0, float* ds_reset, void* stream);
int wkv7_chunk_len();  // steps between the forward's state snapshots
}
