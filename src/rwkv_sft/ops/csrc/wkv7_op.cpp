// Torch binding of the WKV-7 CUDA kernel (wkv7.cu): checks tensors, allocates outputs, launches.
// No CUDA headers here: the stream comes from Python as an integer, the device is set by the caller.
#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>  // pybind11 with Tensor casters; lighter than torch/extension.h

#include "wkv7.h"

using at::Tensor;

// r..b (and dy): same shape [B,T,H,N], same dtype (fp32 or bf16), contiguous, on the GPU.
static void check_inputs(const std::vector<Tensor>& xs, const Tensor& state, const Tensor& resets) {
    const Tensor& r = xs[0];
    TORCH_CHECK(r.dim() == 4, "wkv7: inputs must be [B,T,H,N]");
    TORCH_CHECK(r.scalar_type() == at::kFloat || r.scalar_type() == at::kBFloat16,
                "wkv7: inputs must be float32 or bfloat16");
    for (const Tensor& x : xs) {
        TORCH_CHECK(x.is_cuda() && x.is_contiguous(), "wkv7: inputs must be contiguous CUDA tensors");
        TORCH_CHECK(x.sizes() == r.sizes() && x.scalar_type() == r.scalar_type(),
                    "wkv7: inputs must share shape and dtype");
    }
    const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
    TORCH_CHECK(state.is_cuda() && state.is_contiguous() && state.scalar_type() == at::kFloat &&
                    state.sizes() == at::IntArrayRef({B, H, N, N}),
                "wkv7: state must be a contiguous float32 CUDA tensor [B,H,N,N]");
    TORCH_CHECK(resets.numel() == 0 || (resets.is_cuda() && resets.is_contiguous() &&
                                         resets.scalar_type() == at::kByte &&
                                         resets.sizes() == at::IntArrayRef({B, T})),
                "wkv7: resets must be empty or a contiguous uint8 CUDA tensor [B,T]");
}

static const uint8_t* resets_ptr(const Tensor& resets) {
    return resets.numel() ? resets.data_ptr<uint8_t>() : nullptr;
}

// The state resets restart from: empty (zero) or shaped like the state.
static const float* reset_state_ptr(const Tensor& reset_state, const Tensor& state) {
    if (reset_state.numel() == 0) return nullptr;
    TORCH_CHECK(reset_state.is_cuda() && reset_state.is_contiguous() &&
                    reset_state.scalar_type() == at::kFloat && reset_state.sizes() == state.sizes(),
                "wkv7: reset_state must be empty or a contiguous float32 CUDA tensor [B,H,N,N]");
    return reset_state.data_ptr<float>();
}

// Returns (y, final state, snapshots); snapshots are empty unless save_snapshots (needed by backward).
std::vector<Tensor> forward(Tensor r, Tensor w, Tensor k, Tensor v, Tensor a, Tensor b, Tensor state,
                            Tensor resets, Tensor reset_state, bool save_snapshots, int64_t stream) {
    check_inputs({r, w, k, v, a, b}, state, resets);
    const int B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
    const int nchunks = (T + wkv7_chunk_len() - 1) / wkv7_chunk_len();
    auto f32 = state.options();
    Tensor y = at::empty_like(r);
    Tensor state_out = at::empty({B, H, N, N}, f32);
    Tensor snaps = at::empty({save_snapshots ? (int64_t)B * H * nchunks * N * N : 0}, f32);
    auto launch = r.scalar_type() == at::kBFloat16 ? wkv7_forward_bf16 : wkv7_forward_f32;
    const char* err = launch(B, T, H, N, r.data_ptr(), w.data_ptr(), k.data_ptr(), v.data_ptr(),
                             a.data_ptr(), b.data_ptr(), state.data_ptr<float>(), resets_ptr(resets),
                             reset_state_ptr(reset_state, state), y.data_ptr(), state_out.data_ptr<float>(),
                             save_snapshots ? snaps.data_ptr<float>() : nullptr, (void*)stream);
    TORCH_CHECK(err == nullptr, "wkv7 forward: ", err ? err : "");
    return {y, state_out, snaps};
}

// Returns (dr, dw, dk, dv, da, db, d initial state, d reset state (empty without one)).
std::vector<Tensor> backward(Tensor r, Tensor w, Tensor k, Tensor v, Tensor a, Tensor b, Tensor dy,
                             Tensor dstate, Tensor snaps, Tensor resets, Tensor reset_state, int64_t stream) {
    check_inputs({r, w, k, v, a, b, dy}, dstate, resets);
    const int B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
    const int L = wkv7_chunk_len();
    TORCH_CHECK(snaps.numel() == (int64_t)B * H * ((T + L - 1) / L) * N * N,
                "wkv7 backward: the forward did not keep state snapshots");
    auto f32 = dstate.options();
    Tensor dr = at::empty_like(r), dw = at::empty_like(r), dk = at::empty_like(r),
           dv = at::empty_like(r), da = at::empty_like(r), db = at::empty_like(r);
    Tensor dstate0 = at::empty({B, H, N, N}, f32);
    const float* s_reset = reset_state_ptr(reset_state, dstate);
    Tensor dreset = s_reset ? at::zeros({B, H, N, N}, f32) : at::empty({0}, f32);
    auto launch = r.scalar_type() == at::kBFloat16 ? wkv7_backward_bf16 : wkv7_backward_f32;
    const char* err = launch(B, T, H, N, r.data_ptr(), w.data_ptr(), k.data_ptr(), v.data_ptr(),
                             a.data_ptr(), b.data_ptr(), dy.data_ptr(), dstate.data_ptr<float>(),
                             snaps.data_ptr<float>(), resets_ptr(resets), s_reset,
                             dr.data_ptr(), dw.data_ptr(), dk.data_ptr(), dv.data_ptr(), da.data_ptr(),
                             db.data_ptr(), dstate0.data_ptr<float>(), s_reset ? dreset.data_ptr<float>() : nullptr,
                             (void*)stream);
    TORCH_CHECK(err == nullptr, "wkv7 backward: ", err ? err : "");
    return {dr, dw, dk, dv, da, db, dstate0, dreset};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("forward", &forward, "WKV-7 forward");
    m.def("backward", &backward, "WKV-7 backward");
}
