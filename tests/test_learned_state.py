"""Learned initial WKV state (state tuning): the operator's restart state, the model's
time_state, packed rows against examples one by one."""
import pytest
import torch

from conftest import random_model
from rwkv_sft.ops.wkv7_chunked import wkv7_chunked
from rwkv_sft.weights import load_model, save_model
from rwkv_sft.ops.wkv7_reference import wkv7_reference
from test_wkv7 import close, make_inputs, make_state, random_resets
from test_wkv7_gpu import emulated_kernels  # noqa: F401  (a fixture)


# ---- the operator: resets restart from a given state ----

def run_restart(fn, x, s, resets, R, seed=2, **kw):
    """y, final state and the gradients of a random linear function of both, for the 6 inputs,
    the initial state and the restart state R."""
    x = [t.detach().clone().requires_grad_() for t in x]
    s, R = (t.detach().clone().requires_grad_() for t in (s, R))
    y, out = fn(*x, state=s, resets=resets, reset_state=R, **kw)
    g = torch.Generator().manual_seed(seed)
    gy, gs = (torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype) for t in (y, out))
    ((y * gy).sum() + (out * gs).sum()).backward()
    return [y, out] + [t.grad for t in x] + [s.grad, R.grad], (gy, gs)


def one_by_one(x, s, resets, R, gy, gs):
    """The obviously correct answer: every segment of every row run on its own with the
    reference, the first from s (unless it starts with a reset) and every other one from R;
    the same linear function of the outputs, differentiated."""
    B, T = resets.shape
    x = [t.detach().clone().requires_grad_() for t in x]
    s, R = (t.detach().clone().requires_grad_() for t in (s, R))
    ys, finals = [], []
    for i in range(B):
        starts = [0] + [t for t in range(1, T) if resets[i, t]] + [T]
        for n, (lo, hi) in enumerate(zip(starts[:-1], starts[1:])):
            restart = R[i:i + 1] if R.dim() == 4 else R.unsqueeze(0)
            s0 = s[i:i + 1] if n == 0 and not resets[i, 0] else restart
            y, state = wkv7_reference(*[t[i:i + 1, lo:hi] for t in x], state=s0)
            ys.append(y)
        finals.append(state)
    y, out = torch.cat(ys, 1).view(gy.shape), torch.cat(finals)
    ((y * gy).sum() + (out * gs).sum()).backward()
    return [y, out] + [t.grad for t in x] + [s.grad, R.grad]


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("chunk_size", [16, 32])
def test_restart_state_equals_segments_one_by_one(per_row, chunk_size):
    B, T, H, N = 3, 70, 2, 8
    x, s, resets = make_inputs(B, T, H, N, seed=5), make_state(B, H, N), random_resets(B, T, seed=6)
    R = make_state(B, H, N, seed=7) if per_row else make_state(1, H, N, seed=7)[0]
    names = ["y", "state", "dr", "dw", "dk", "dv", "da", "db", "dstate", "dreset"]
    ref, (gy, gs) = run_restart(wkv7_reference, x, s, resets, R)
    want = one_by_one(x, s, resets, R, gy, gs)
    got, _ = run_restart(wkv7_chunked, x, s, resets, R, chunk_size=chunk_size)
    for name, a, b, c in zip(names, ref, got, want):
        scale = c.abs().max().item()
        assert (a - c).abs().max().item() <= 1e-10 * scale, f"reference {name}"
        assert (b - c).abs().max().item() <= 1e-10 * scale, f"chunked {name}"


def test_restart_state_in_row_groups_and_fp32(monkeypatch):
    import rwkv_sft.ops.wkv7_chunked as chunked
    B, T, H, N = 3, 45, 3, 8
    x, s, resets = make_inputs(B, T, H, N, seed=10), make_state(B, H, N), random_resets(B, T, seed=11)
    R = make_state(1, H, N, seed=12)[0]
    want, _ = run_restart(wkv7_reference, x, s, resets, R)
    monkeypatch.setattr(chunked, "GROUP_CHUNKS", 6)  # one chunk per group, 3 groups
    got, _ = run_restart(wkv7_chunked, x, s, resets, R, chunk_size=16)
    close(got, want, 1e-10, "row groups")
    assert (got[-1] - want[-1]).abs().max() <= 1e-10 * want[-1].abs().max()
    monkeypatch.undo()
    got, _ = run_restart(wkv7_chunked, [t.float() for t in x], s.float(), resets, R.float())
    close(got, want, 2e-4, "fp32")
    assert got[-1].dtype == torch.float32
    assert (got[-1].double() - want[-1]).abs().max() <= 2e-4 * want[-1].abs().max()


def test_restart_state_gradcheck_float64():
    x = [t.requires_grad_() for t in make_inputs(2, 9, 1, 3, seed=8)]
    s, R = make_state(2, 1, 3).requires_grad_(), make_state(1, 1, 3, seed=3)[0].requires_grad_()
    resets = torch.zeros(2, 9, dtype=torch.bool)
    resets[0, [2, 3, 7]] = True
    resets[1, [0, 5]] = True
    fn = lambda *a: wkv7_chunked(*a[:6], state=a[6], resets=resets, reset_state=a[7], chunk_size=3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (*x, s, R), fast_mode=True)


def test_restart_state_without_resets_changes_nothing():
    x, s = make_inputs(2, 20, 2, 4, seed=9), make_state(2, 2, 4)
    R = make_state(1, 2, 4, seed=4)[0].requires_grad_()
    for fn in (wkv7_reference, wkv7_chunked):
        y, out = fn(*x, state=s, reset_state=R)
        y0, out0 = fn(*x, state=s)
        assert torch.equal(y, y0) and torch.equal(out, out0)


def test_restart_state_creates_nothing_on_another_device():
    """On the meta device (shapes only), as a stand-in for a GPU: a tensor made on the CPU would
    meet a meta tensor and raise."""
    B, T, H, N = 2, 70, 2, 8
    x = [torch.empty(B, T, H, N, device="meta", requires_grad=True) for _ in range(6)]
    R = torch.empty(H, N, N, device="meta", requires_grad=True)
    resets = torch.zeros(B, T, dtype=torch.bool, device="meta")
    y, s_out = wkv7_chunked(*x, resets=resets, reset_state=R)
    (y.sum() + s_out.sum()).backward()
    assert R.grad is not None and R.grad.device.type == "meta" and R.grad.shape == (H, N, N)


# ---- the model: time_state ----

def test_plain_model_has_no_learned_state(tmp_path):
    model = random_model(n_layer=2, n_embd=64, vocab_size=50, head_size=32)
    assert model.learned_state() is None
    assert not any("time_state" in k for k in model.state_dict())
    s0, z = model.initial_state(2), model.zero_state(2)
    assert all(torch.equal(getattr(s0, f), getattr(z, f)) for f in ("att_shift", "wkv", "ffn_shift"))


def test_enable_state_tuning():
    model = random_model(n_layer=2, n_embd=64, vocab_size=50, head_size=32)
    params = model.enable_state_tuning()
    names = [n for n, _ in model.named_parameters() if "time_state" in n]
    assert names == ["blocks.0.att.time_state", "blocks.1.att.time_state"]
    assert all(p.shape == (2, 32, 32) and p.dtype == torch.float32 and not p.any() for p in params)
    assert model.enable_state_tuning()[0] is params[0]  # a second call keeps what is there
    with torch.no_grad():
        for p in params:
            p.normal_()
    tokens = torch.randint(0, 50, (2, 13))
    s0 = model.initial_state(2)
    assert torch.equal(s0.wkv[1, 1], params[1]) and not s0.att_shift.any() and not s0.ffn_shift.any()
    start = model.zero_state(2)
    start.wkv = torch.stack(params).detach().unsqueeze(1).repeat(1, 2, 1, 1, 1)
    assert torch.equal(model(tokens)[0], model(tokens, state=start)[0])
    assert not torch.allclose(model(tokens)[0], model(tokens, state=model.zero_state(2))[0])


def _loss(logits, weight):
    return (logits * weight).sum()


@pytest.mark.parametrize("backend,checkpointing", [("reference", False), ("chunked", False), ("chunked", True)])
def test_packed_rows_equal_examples_one_by_one(backend, checkpointing, one_thread):
    """Loss and every gradient (time_state included) of a packed batch with resets == the
    examples run one by one from the learned state."""
    model = random_model(n_layer=2, n_embd=64, vocab_size=50, head_size=32).double()
    with torch.no_grad():
        for p in model.enable_state_tuning():
            p.normal_(0, 0.5)
    model.wkv_backend = backend
    model.activation_checkpointing = checkpointing
    g = torch.Generator().manual_seed(0)
    lengths = [[7, 30, 12], [40, 9]]  # row 0: three examples (one spans a chunk boundary), row 1: two
    T = max(sum(row) for row in lengths)
    examples = [[torch.randint(0, 50, (1, n), generator=g) for n in row] for row in lengths]
    weights = [[torch.randn(1, n, 50, generator=g, dtype=torch.float64) for n in row] for row in lengths]

    def grads():
        out = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        return out

    loss_one = sum(_loss(model(t)[0], w) for row, wrow in zip(examples, weights) for t, w in zip(row, wrow))
    loss_one.backward()
    want = grads()

    tokens = torch.zeros(len(lengths), T, dtype=torch.long)
    weight = torch.zeros(len(lengths), T, 50, dtype=torch.float64)  # padding carries no loss
    resets = torch.zeros(len(lengths), T, dtype=torch.bool)
    for i, (row, wrow) in enumerate(zip(examples, weights)):
        pos = 0
        for t, w in zip(row, wrow):
            n = t.shape[1]
            tokens[i, pos:pos + n], weight[i, pos:pos + n], resets[i, pos] = t[0], w[0], True
            pos += n
    loss_packed = _loss(model(tokens, resets=resets)[0], weight)
    loss_packed.backward()
    got = grads()
    torch.testing.assert_close(loss_packed, loss_one, rtol=1e-10, atol=1e-10)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-8, atol=1e-10, msg=lambda m: f"{name}: {m}")
    assert got["blocks.1.att.time_state"].abs().max() > 1e-3  # the learned state takes part


# ---- the GPU backends' wrappers ----

def test_fla_restart_state_through_a_stand_in(monkeypatch):
    from rwkv_sft.ops import wkv7_fla as fla_mod
    from test_wkv7_gpu import fake_chunk_rwkv7
    monkeypatch.setattr(fla_mod, "_chunk_rwkv7", lambda device: fake_chunk_rwkv7)
    B, T, H, N = 3, 45, 2, 4
    x, s, resets = make_inputs(B, T, H, N, seed=5), make_state(B, H, N), random_resets(B, T, seed=6)
    for R in (make_state(1, H, N, seed=7)[0], make_state(B, H, N, seed=8)):
        # fla holds its states in float32; a wrong conversion shows as an O(1) error
        got, _ = run_restart(fla_mod.wkv7_fla, [t.float() for t in x], s.float(), resets, R.float())
        want, _ = run_restart(wkv7_reference, x, s, resets, R)
        close(got, want, 1e-4, "fla")
        assert (got[-1].double() - want[-1]).abs().max() <= 1e-4 * want[-1].abs().max()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_code_restarts_from_the_state(emulated_kernels, dtype):
    """The kernels of csrc/wkv7.cu, run on the CPU through test_wkv7_gpu's shim."""
    from test_wkv7_gpu import random_case, run_emulated
    B, T, H, N = 2, 37, 1, 64
    inputs, s, _ = random_case(B, T, H, N, dtype=dtype, seed=3)
    resets = torch.zeros(B, T, dtype=torch.bool)
    resets[0, [0, 5, 16, 17, 30]] = True  # first token, mid-chunk, at a snapshot, twice in a row
    resets[1, 20] = True
    R = make_state(B, H, N, seed=4).float() * 0.2
    want, (gy, gs) = run_restart(wkv7_reference, [x.double() for x in inputs], s.double(), resets, R.double())
    got = run_emulated(emulated_kernels, inputs, s, resets, gy, gs, dtype, reset_state=R)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for name, g, w in zip(["y", "state", "dr", "dw", "dk", "dv", "da", "db", "dstate", "dreset"], got, want):
        err = ((g.double() - w).abs().max() / w.abs().max()).item()
        assert err < tol, f"{name}: relative error {err:.2e}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "fla"])
def test_gpu_backends_restart_from_the_state(backend):
    from rwkv_sft.ops import wkv7
    if backend == "fla":
        pytest.importorskip("fla")
    B, T, H, N = 2, 100, 2, 64
    x, s, resets = make_inputs(B, T, H, N, seed=5), make_state(B, H, N) * 0.2, random_resets(B, T, seed=6)
    R = make_state(1, H, N, seed=7)[0] * 0.2
    want, _ = run_restart(wkv7_reference, x, s, resets, R)
    on_gpu = lambda t: t.float().cuda()  # noqa: E731
    got, _ = run_restart(lambda *a, **k: wkv7(*a, backend=backend, **k), [on_gpu(t) for t in x], on_gpu(s),
                         resets.cuda(), on_gpu(R))
    for name, g, w in zip(["y", "state", "dr", "dw", "dk", "dv", "da", "db", "dstate", "dreset"], got, want):
        err = ((g.double().cpu() - w).abs().max() / w.abs().max()).item()
        assert err < 1e-3, f"{name}: relative error {err:.2e}"


# ---- state.pth ----

def _state_tuned_model(**shape):
    model = random_model(seed=3, **shape)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.enable_state_tuning():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def test_state_file_in_the_rwkv_package_gives_our_logits(tmp_path):
    from conftest import rwkv_package_model
    from rwkv_sft.adapters.state import KEY, save_state
    shape = dict(n_layer=2, n_embd=128, vocab_size=500)
    model = _state_tuned_model(**shape)
    base = random_model(seed=3, **shape)
    save_model(base, tmp_path / "base.pth")  # the plain checkpoint: what users load in the package
    save_state(model, tmp_path / "state.pth")
    package = rwkv_package_model(tmp_path / "base.pth")

    # the README's lines: the file's tensors go into the package's state list
    learned = torch.load(tmp_path / "state.pth", weights_only=True)
    state = package.generate_zero_state()
    for i in range(package.n_layer):
        state[i * 3 + 1] = learned[f"blocks.{i}.att.time_state"].float().clone()

    tokens = torch.randint(0, 500, (1, 29), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        theirs, _ = package.forward(tokens[0].tolist(), state, full_output=True)
        ours, _ = model(tokens)
        plain, _ = base(tokens)
    assert sorted(learned) == [KEY.format(0), KEY.format(1)]
    torch.testing.assert_close(ours[0], theirs, atol=2e-4, rtol=0)
    assert (plain[0] - theirs).abs().max() > 1e-2  # the state matters at this scale


def test_state_file_round_trip_and_model_checkpoint(tmp_path):
    from rwkv_sft.weights import load_model, save_model
    from rwkv_sft.adapters.state import save_state
    from rwkv_sft.weights.state import load_state
    shape = dict(n_layer=2, n_embd=64, vocab_size=50, head_size=32)
    model = _state_tuned_model(**shape)
    save_state(model, tmp_path / "state.pth")
    tokens = torch.randint(0, 50, (2, 20), generator=torch.Generator().manual_seed(6))
    loaded = load_state(random_model(seed=3, **shape), tmp_path / "state.pth")
    torch.testing.assert_close(loaded(tokens)[0], model(tokens)[0], rtol=0, atol=0)
    # a model saved with its learned state loads with it (fp32 state even in a bf16 model)
    save_model(model, tmp_path / "model.pth")
    again = load_model(tmp_path / "model.pth")
    torch.testing.assert_close(again(tokens)[0], model(tokens)[0], rtol=0, atol=0)
    half = load_model(tmp_path / "model.pth", dtype=torch.bfloat16)
    assert half.learned_state()[0].dtype == torch.float32
    assert torch.equal(half.learned_state()[1], model.learned_state()[1])


def test_bad_state_files_are_one_line_errors(tmp_path):
    from rwkv_sft.adapters.state import KEY
    from rwkv_sft.weights.state import load_state
    from rwkv_sft.errors import UserError
    shape = dict(n_layer=2, n_embd=64, vocab_size=50, head_size=32)
    model = random_model(**shape)
    good = {KEY.format(i): torch.zeros(2, 32, 32) for i in range(2)}
    nan = dict(good)
    nan[KEY.format(1)] = torch.full((2, 32, 32), float("nan"))
    cases = {
        "layers": ({KEY.format(0): good[KEY.format(0)]}, "for 2 layers expected, the file has layers 0..0"),
        "shape": ({k: torch.zeros(4, 16, 16) for k in good}, r"shape \[4, 16, 16\], this model needs \[2, 32, 32\]"),
        "model": (model.state_dict(), "unexpected key 'emb.weight'.*a model checkpoint"),
        "nan": (nan, "NaN or infinite"),
    }
    for name, (sd, message) in cases.items():
        torch.save(sd, tmp_path / f"{name}.pth")
        with pytest.raises(UserError, match=message):
            load_state(model, tmp_path / f"{name}.pth")
    torch.save(good, tmp_path / "good.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "good.pth").read_bytes()[:300])
    with pytest.raises(UserError, match="cut.pth: not a"):
        load_state(model, tmp_path / "cut.pth")
    assert model.learned_state() is None  # nothing half-loaded


# ---- generate --state, eval --state ----

def test_generate_and_eval_start_from_the_state_file(tmp_path, capsys, one_thread):
    import json

    from rwkv_sft import Tokenizer
    from rwkv_sft.adapters.state import save_state
    from rwkv_sft.cli import main
    from rwkv_sft.data import DataConfig, prepare_data
    from rwkv_sft.infer.generate import generate
    from rwkv_sft.eval.evaluate import evaluate

    model = random_model(seed=1, n_layer=1, n_embd=64)  # World vocabulary
    save_model(model, tmp_path / "m.pth")
    with torch.no_grad():
        model.enable_state_tuning()[0].normal_(0, 3)
    save_state(model, tmp_path / "state.pth")
    tok = Tokenizer()

    flags = ["--temperature", "0", "--max-new-tokens", "12", "--no-stop", "--ignore-eos", "--device", "cpu"]
    assert main(["generate", "--model", str(tmp_path / "m.pth"), "--state", str(tmp_path / "state.pth"),
                 "--prompt", "Hello", *flags]) == 0
    got = capsys.readouterr().out
    want = generate(model, tok, "Hello", max_new_tokens=12, temperature=0, stop=(), stop_at_eos=False).text
    assert got == want + "\n"

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"context": f"Q{i}?", "completion": f" {i * 7}"}) + "\n" for i in range(5)))
    args = ["eval", "--model", str(tmp_path / "m.pth"), "--data", str(data), "--exact-match", "2",
            "--device", "cpu", "--json"]
    assert main(args + ["--state", str(tmp_path / "state.pth")]) == 0
    with_state = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(args) == 0
    without = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    prepared = prepare_data(DataConfig(train_files=[str(data)]), tokenizer=tok, show_progress=False)
    want = evaluate(model, prepared.train, tok, exact_match_samples=2)
    assert with_state["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert abs(with_state["loss"] - without["loss"]) > 1e-3

    assert main(["generate", "--model", str(tmp_path / "m.pth"), "--state", str(tmp_path / "m.pth"),
                 "--prompt", "Hello", *flags]) == 2
    assert "unexpected key 'emb.weight'" in capsys.readouterr().err
