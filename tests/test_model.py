"""The model against the `rwkv` package, checkpoints, state passing, gradients, bad files."""
from __future__ import annotations

import copy
import math
import os
import pickle
import subprocess
import sys
import types
import zipfile

import pytest
import torch
import torch.nn.functional as F

from conftest import random_model, rwkv_package_model
from rwkv_sft import RWKV7, RWKV7Config
from rwkv_sft.weights import load_model, save_model
from rwkv_sft.errors import UserError
from rwkv_sft.infer.decoder import Decoder
from rwkv_sft.model import rwkv7 as rwkv7_module
from rwkv_sft.model.config import low_rank_dim
from rwkv_sft.ops import wkv7, wkv7_reference

# fp32 throughout; two independent implementations differ by summation order only.
LOGIT_ATOL = 2e-4


def released_dims(C):
    """Low-rank widths of released checkpoints (docs/rwkv7.md, "State dict")."""
    return dict(dim_w=low_rank_dim(1.8 * math.sqrt(C)), dim_a=low_rank_dim(1.8 * math.sqrt(C)),
                dim_v=low_rank_dim(1.3 * math.sqrt(C)), dim_g=low_rank_dim(0.6 * C ** 0.8))


SHAPES = [
    dict(n_layer=1, n_embd=64, vocab_size=300),
    dict(n_layer=3, n_embd=128, vocab_size=1000, **released_dims(128)),
    dict(n_layer=2, n_embd=256, vocab_size=65536, **released_dims(256)),
    dict(n_layer=2, n_embd=128, vocab_size=500, head_size=32),
    dict(n_layer=2, n_embd=128, vocab_size=500, deep_embed=True),
]


def _ids(shape):
    return "-".join(f"{k}={v}" for k, v in shape.items() if k in ("n_layer", "n_embd", "vocab_size", "head_size", "deep_embed"))


@pytest.mark.parametrize("shape", SHAPES, ids=[_ids(s) for s in SHAPES])
def test_logits_and_state_match_rwkv_package(tmp_path, shape):
    model = random_model(seed=1, **shape)
    path = tmp_path / "model.pth"
    save_model(model, path)
    reference = rwkv_package_model(path, deep_embed=shape.get("deep_embed", False))

    tokens = torch.randint(0, shape["vocab_size"], (1, 37), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, state = model(tokens)
        theirs, their_state = reference.forward(tokens[0].tolist(), None, full_output=True)
        assert ours.shape == (1, 37, shape["vocab_size"])
        torch.testing.assert_close(ours[0], theirs, atol=LOGIT_ATOL, rtol=0)

        # the recurrent state in the rwkv package's orientation: state[i*3+1][h, value, key]
        for i in range(shape["n_layer"]):
            torch.testing.assert_close(state.att_shift[i, 0], their_state[i * 3], atol=1e-5, rtol=0)
            torch.testing.assert_close(state.wkv[i, 0], their_state[i * 3 + 1], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(state.ffn_shift[i, 0], their_state[i * 3 + 2], atol=1e-5, rtol=0)

        # fed in pieces carrying the state: same logits at every position
        pieces, s = [], None
        for a, b in [(0, 1), (1, 16), (16, 17), (17, 37)]:
            logits, s = model(tokens[:, a:b], s)
            pieces.append(logits)
        torch.testing.assert_close(torch.cat(pieces, 1)[0], theirs, atol=LOGIT_ATOL, rtol=0)

        # single-token steps through the package's forward_one path as well
        their_last, _ = reference.forward([int(tokens[0, -1])], their_state_before_last(reference, tokens))
        ours_last, _ = model(tokens[:, -1:], model_state_before_last(model, tokens))
        torch.testing.assert_close(ours_last[0, 0], their_last, atol=LOGIT_ATOL, rtol=0)

        # full_output=False: only the last position, the head applied to that row
        last, _ = model(tokens, full_output=False)
        assert last.shape == (1, shape["vocab_size"])
        torch.testing.assert_close(last, ours[:, -1], atol=1e-5, rtol=0)


def their_state_before_last(reference, tokens):
    _, state = reference.forward(tokens[0, :-1].tolist(), None)
    return state


def model_state_before_last(model, tokens):
    _, state = model(tokens[:, :-1])
    return state


def test_batched_rows_equal_single_rows():
    model = random_model(seed=3, n_layer=2, n_embd=64, vocab_size=200)
    tokens = torch.randint(0, 200, (3, 20))
    with torch.no_grad():
        batched, state = model(tokens)
        for b in range(3):
            single, single_state = model(tokens[b:b + 1])
            torch.testing.assert_close(batched[b:b + 1], single, atol=1e-5, rtol=0)
            torch.testing.assert_close(state.select(b).wkv, single_state.wkv, atol=1e-5, rtol=0)


def test_resets_equal_separate_sequences():
    model = random_model(seed=4, n_layer=2, n_embd=64, vocab_size=200)
    first, second = torch.randint(0, 200, (1, 7)), torch.randint(0, 200, (1, 9))
    packed = torch.cat([first, second], 1)
    resets = torch.zeros(1, 16, dtype=torch.bool)
    resets[0, 0] = resets[0, 7] = True
    with torch.no_grad():
        together, _ = model(packed, resets=resets)
        alone = torch.cat([model(first)[0], model(second)[0]], 1)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


def test_pth_with_layer0_v_and_bf16_loads(tmp_path):
    """Upstream training code saves blocks.0.att.v0/v1/v2 (unused); released files are bf16."""
    model = random_model(seed=5, n_layer=2, n_embd=64, vocab_size=100)
    sd = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    sd["blocks.0.att.v0"] = torch.zeros(1, 1, 64, dtype=torch.bfloat16)
    sd["blocks.0.att.v1"] = torch.zeros(64, model.config.dim_v, dtype=torch.bfloat16)
    sd["blocks.0.att.v2"] = torch.zeros(model.config.dim_v, 64, dtype=torch.bfloat16)
    torch.save(sd, tmp_path / "m.pth")
    loaded = load_model(tmp_path / "m.pth")
    assert loaded.emb.weight.dtype == torch.bfloat16
    as_fp32 = load_model(tmp_path / "m.pth", dtype=torch.float32)
    tokens = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        expected = load_model(tmp_path / "m.pth", dtype=torch.float32)(tokens)[0]
        torch.testing.assert_close(as_fp32(tokens)[0], expected)
        bf16_logits = loaded(tokens)[0].float()
    assert bf16_logits.isfinite().all()
    assert (bf16_logits - expected).abs().max() < 0.1 * expected.abs().max()


def test_decoding_layout_changes_no_result(tmp_path):
    """Transposed storage of the projections: same state_dict, same logits and state step by step,
    and a saved file identical in content."""
    model = random_model(seed=7, n_layer=2, n_embd=64, vocab_size=100, deep_embed=True)
    decoder = Decoder(random_model(seed=7, n_layer=2, n_embd=64, vocab_size=100, deep_embed=True), layout=True)
    twin = decoder.model
    assert not twin.head.weight.is_contiguous() and twin.head.weight.t().is_contiguous()
    for (k, a), (k2, b) in zip(model.state_dict().items(), twin.state_dict().items()):
        assert k == k2 and a.shape == b.shape and torch.equal(a, b)
    tokens = torch.randint(0, 100, (2, 6))
    with torch.no_grad():
        state = twin_state = None
        for t in range(6):
            logits, state = model(tokens[:, t:t + 1], state)
            twin_logits, twin_state = decoder(tokens[:, t:t + 1], twin_state)
            torch.testing.assert_close(twin_logits, logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(twin_state.wkv, state.wkv, atol=1e-5, rtol=0)
    save_model(twin, tmp_path / "m.safetensors")
    loaded = load_model(tmp_path / "m.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_safetensors_round_trip(tmp_path):
    model = random_model(seed=6, n_layer=2, n_embd=64, vocab_size=100, deep_embed=True)
    save_model(model, tmp_path / "m.safetensors")
    loaded = load_model(tmp_path / "m.safetensors")
    assert loaded.config == model.config
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("n_layer", [1, 3])
def test_fresh_model_gradients_reach_every_parameter_and_the_state(n_layer):
    model = random_model(seed=7, scale=0.05, n_layer=n_layer, n_embd=64, vocab_size=100, deep_embed=n_layer == 3)
    tokens = torch.randint(0, 100, (2, 10))
    state = model.zero_state(2)
    state.wkv.normal_()
    state.att_shift.normal_()
    state.ffn_shift.normal_()
    for t in (state.wkv, state.att_shift, state.ffn_shift):
        t.requires_grad_(True)
    logits, _ = model(tokens, state)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.roll(-1, 1).flatten()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for t in (state.wkv, state.att_shift, state.ffn_shift):
        assert t.grad.abs().sum() > 0


def test_token_shift_states_do_not_hold_the_blocks_activations():
    """Each block hands on the last position of its inputs as a token-shift state. As a view it
    would keep the whole [B,T,C] input alive until the forward ends, which under activation
    checkpointing is most of what a block's forward saves."""
    model = random_model(seed=3, n_layer=2, n_embd=64, vocab_size=100)
    model.activation_checkpointing = True
    held = []
    for block in model.blocks:
        block.register_forward_hook(lambda m, args, out: held.extend((out[3], out[5])))
    model.forward_hidden(torch.randint(0, 100, (2, 16)))
    assert len(held) == 4
    for shift in held:
        assert shift.shape == (2, 64)
        assert shift.untyped_storage().nbytes() == shift.numel() * shift.element_size()


def _written_out_time_mix(self, x, last_x, wkv_state, v_first, resets, backend, restart=None):
    """TimeMix.forward with every formula written out, one op at a time (the upstream form)."""
    B, T, C = x.shape
    H, N = self.n_head, self.head_size
    prev = torch.cat([last_x.unsqueeze(1).to(x.dtype), x[:, :-1]], dim=1)
    xx = prev - x
    xr, xw, xk, xv, xa, xg = (x + xx * m for m in (self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g))
    r = self.receptance(xr)
    w = -F.softplus(-(self.w0 + torch.tanh(xw @ self.w1) @ self.w2)) - 0.5
    k = self.key(xk)
    v = self.value(xv)
    a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)
    g = torch.sigmoid(xg @ self.g1) @ self.g2
    kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1, p=2.0, eps=1e-12)
    k = k * (1 + (a - 1) * self.k_a)
    if self.layer_id == 0:
        v_first = v
    else:
        v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)
    heads = lambda t: t.reshape(B, T, H, N)  # noqa: E731
    y, wkv_state = rwkv7_module.wkv7(heads(r), heads(w), heads(k), heads(v), -kk, kk * heads(a), state=wkv_state,
                                     backend=backend)
    y = self.ln_x(y.reshape(B * T, C)).view(B, T, C)
    y = y + ((heads(r) * heads(k) * self.r_k).sum(dim=-1, keepdim=True) * heads(v)).reshape(B, T, C)
    return self.output(y * g), x[:, -1], wkv_state, v_first


def _written_out_channel_mix(self, x, last_x, resets, tokens, x_emb, restart_x=None):
    prev = torch.cat([last_x.unsqueeze(1).to(x.dtype), x[:, :-1]], dim=1)
    return self.value(torch.relu(self.key(x + (prev - x) * self.x_k)) ** 2), x[:, -1]


@pytest.mark.parametrize("lora", [False, True])
def test_blocks_equal_their_formulas_written_out(lora, monkeypatch):
    """The time and channel mixes fold their formulas into fewer tensors (the six lerps in one
    product, in-place steps, LoRA's update added in place). Against the formulas one op at a time:
    fp32 outputs and every gradient; under bf16 autocast the outputs, which differ at bf16's
    precision (1e-2) if an in-place step kept a bf16 product where the formula widens to fp32."""
    from rwkv_sft.adapters.lora import add_lora
    model = random_model(seed=5, scale=0.3, n_layer=3, n_embd=128, vocab_size=200, head_size=32)
    model.wkv_backend = "reference"
    if lora:
        add_lora(model, rank=4)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.05)  # (B starts at zero: the update would add nothing)
    twin = copy.deepcopy(model)
    for block in twin.blocks:
        block.att.forward = types.MethodType(_written_out_time_mix, block.att)
        block.ffn.forward = types.MethodType(_written_out_channel_mix, block.ffn)
    tokens = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(2))
    grads = []
    for m in (copy.deepcopy(model).double(), copy.deepcopy(twin).double()):  # float64: the math alone
        hidden, state = m.forward_hidden(tokens)
        loss = m.head(hidden).logsumexp(-1).mean() + state.wkv.square().mean()
        loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name, g in grads[1].items():
        assert (grads[0][name] - g).abs().max() <= 1e-10 * g.abs().max(), name
    # bf16 autocast: each operand reaches the WKV operator in the same dtype (a bf16 product kept
    # where the formula widens to fp32 would show here), and the hidden states agree
    seen = []

    def recording(*args, **kwargs):
        seen.append([t.dtype for t in args[:6]])
        return wkv7(*args, **kwargs)
    monkeypatch.setattr(rwkv7_module, "wkv7", recording)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours, written = model.forward_hidden(tokens)[0], twin.forward_hidden(tokens)[0]
    assert len(seen) == 6 and seen[:3] == seen[3:] and torch.float32 in seen[1] and torch.bfloat16 in seen[1]
    assert ours.dtype == written.dtype == torch.float32
    assert (ours - written).abs().max() <= 1e-2 * written.abs().max()


def test_upstream_init_values():
    """Spot checks of docs/rwkv7.md, "Initialisation", computed independently per element."""
    L, C, N = 3, 128, 64
    model = RWKV7(RWKV7Config(n_layer=L, n_embd=C, vocab_size=500))
    for l, block in enumerate(model.blocks):
        r0, r1 = l / (L - 1), 1 - l / L
        for n in (0, 5, 77, 127):
            lin = n / (C - 1) - 0.5
            z = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
            zz = z * abs(z)
            att = block.att
            assert att.x_r[0, 0, n].item() == pytest.approx(1 - (n / C) ** (0.2 * r1), abs=1e-6)
            assert att.w0[0, 0, n].item() == pytest.approx(-6 + 6 * (n / (C - 1)) ** (1 + r0 ** 0.3) + 0.5 + 2.5 * zz, abs=1e-5)
            assert att.a0[0, 0, n].item() == pytest.approx(-0.19 + 0.3 * zz + 0.4 * lin, abs=1e-6)
            assert block.ffn.x_k[0, 0, n].item() == pytest.approx(1 - (n / C) ** (r1 ** 4), abs=1e-6)
        torch.testing.assert_close(att.ln_x.weight.detach(), torch.full((C,), ((1 + l) / L) ** 0.7))
        assert att.output.weight.abs().sum() == 0 and block.ffn.value.weight.abs().sum() == 0
        w2 = att.w2.detach()
        torch.testing.assert_close(w2 @ w2.T, 0.01 * torch.eye(w2.shape[0]), atol=1e-5, rtol=0)
    assert model.emb.weight.abs().max() <= 1e-4
    head = model.head.weight.detach()
    torch.testing.assert_close(head.T @ head, 0.25 * 500 / C * torch.eye(C), atol=1e-4, rtol=1e-4)
    single = RWKV7(RWKV7Config(n_layer=1, n_embd=64, vocab_size=50))  # r0 divides by L-1
    assert all(p.isfinite().all() for p in single.parameters())


def _wkv_inputs(B=2, T=9, H=2, N=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g, dtype=dtype) for _ in range(3))
    w = -0.5 - torch.rand(B, T, H, N, generator=g, dtype=dtype) * 4  # decay in (0.545, 1)
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, generator=g, dtype=dtype), dim=-1)
    a = torch.rand(B, T, H, N, generator=g, dtype=dtype)
    state = torch.randn(B, H, N, N, generator=g, dtype=dtype)
    return r, w, k, v, -kk, kk * a, state


def test_reference_wkv_fp32_matches_float64():
    inputs64 = _wkv_inputs(T=40)
    y64, s64 = wkv7_reference(*inputs64[:6], state=inputs64[6])
    y32, s32 = wkv7_reference(*(t.float() for t in inputs64[:6]), state=inputs64[6].float())
    assert y32.dtype == torch.float32 and s32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), y64, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s32.double(), s64, atol=1e-4, rtol=1e-4)


def test_reference_wkv_gradcheck():
    inputs = [t.requires_grad_(True) for t in _wkv_inputs(B=1, T=4, H=1, N=4)]
    assert torch.autograd.gradcheck(lambda *x: wkv7_reference(*x[:6], state=x[6]), inputs)


def test_reference_wkv_matches_explicit_matrix_recurrence():
    """y_t = S_t r_t with S_t = S_{t-1}(diag(d_t) + a_t b_t^T) + v_t k_t^T, written with dense matrices."""
    r, w, k, v, a, b, s0 = _wkv_inputs(B=1, T=6, H=1, N=5)
    y, s = wkv7_reference(r, w, k, v, a, b, state=s0)
    S = s0[0, 0]
    for t in range(6):
        d = torch.exp(-torch.exp(w[0, t, 0]))
        S = S @ (torch.diag(d) + torch.outer(a[0, t, 0], b[0, t, 0])) + torch.outer(v[0, t, 0], k[0, t, 0])
        torch.testing.assert_close(y[0, t, 0], S @ r[0, t, 0])
    torch.testing.assert_close(s[0, 0], S)


# -- bad files ------------------------------------------------------------------------------------

class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('RWKV_SFT_PWNED', '/tmp/rwkv_sft_pwned')}",))


def _bad_files(tmp_path):
    good = random_model(seed=8, n_layer=1, n_embd=64, vocab_size=50)
    save_model(good, tmp_path / "good.pth")
    raw = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "text.pth").write_text("hello, I am not a checkpoint\n")
    v6 = {"emb.weight": torch.zeros(50, 64), "blocks.0.att.time_maa_x": torch.zeros(1, 1, 64)}
    torch.save(v6, tmp_path / "rwkv6.pth")
    sd = torch.load(tmp_path / "good.pth", weights_only=True)
    del sd["blocks.0.att.key.weight"]
    torch.save(sd, tmp_path / "missing_key.pth")
    sd = torch.load(tmp_path / "good.pth", weights_only=True)
    sd["blocks.0.ffn.value.weight"] = torch.zeros(64, 7)
    torch.save(sd, tmp_path / "bad_shape.pth")
    with open(tmp_path / "evil.pth", "wb") as f:
        torch.save({"emb.weight": _RunsCode()}, f)
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 100)
    return {
        "missing.pth": "no such file",
        "truncated.pth": "truncated",
        "text.pth": "not a PyTorch checkpoint",
        "rwkv6.pth": "RWKV-6 checkpoint",
        "missing_key.pth": "missing key 'blocks.0.att.key.weight'",
        "bad_shape.pth": "'blocks.0.ffn.value.weight' has shape [64, 7]",
        "evil.pth": "refused to load",
        "garbage.safetensors": "not a readable safetensors file",
    }


def test_bad_checkpoints_give_one_line_errors(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("RWKV_SFT_PWNED", str(marker))
    for name, message in _bad_files(tmp_path).items():
        with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load_model(tmp_path / name)
    assert not marker.exists()


def test_cli_bad_checkpoint_no_traceback(tmp_path):
    expected = _bad_files(tmp_path)
    env = {**os.environ, "RWKV_SFT_PWNED": str(tmp_path / "pwned")}
    for name in ("missing.pth", "truncated.pth", "rwkv6.pth", "evil.pth"):
        proc = subprocess.run([sys.executable, "-m", "rwkv_sft", "info", str(tmp_path / name)],
                              capture_output=True, text=True, env=env)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and expected[name].split("'")[0] in lines[0] and name in lines[0]
    assert not (tmp_path / "pwned").exists()
    proc = subprocess.run([sys.executable, "-m", "rwkv_sft", "info", "--json", str(tmp_path / "good.pth")],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and '"n_layer": 1' in proc.stdout


def test_convert_between_formats(tmp_path):
    model = random_model(seed=9, n_layer=1, n_embd=64, vocab_size=50)
    save_model(model, tmp_path / "a.pth")
    proc = subprocess.run([sys.executable, "-m", "rwkv_sft", "convert", str(tmp_path / "a.pth"),
                           str(tmp_path / "b.safetensors"), "--dtype", "bf16"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    loaded = load_model(tmp_path / "b.safetensors")
    assert loaded.emb.weight.dtype == torch.bfloat16
    torch.testing.assert_close(loaded.head.weight.float(), model.head.weight.bfloat16().float())
    assert zipfile.is_zipfile(tmp_path / "a.pth") and pickle is not None
