"""The fused single-token decoding step against the model's normal forward (its slow twin)."""
import pytest
import torch

from conftest import random_model
from rwkv_sft.infer.step import decode_step

V = 300


def normal_step(model, tokens, state):
    """The general forward (forward_hidden + head), which a [B,1] call without gradients skips."""
    hidden, state = model.forward_hidden(tokens, state)
    return model.head(hidden[:, -1]), state


def random_state(model, batch):
    state = model.zero_state(batch)
    for t in (state.att_shift, state.wkv, state.ffn_shift):
        t.normal_()
    return state


@pytest.mark.parametrize("variant", ["plain", "deep_embed", "lora"])
def test_decode_step_equals_the_normal_forward(one_thread, variant):
    model = random_model(seed=3, n_layer=3, n_embd=128, vocab_size=V, deep_embed=variant == "deep_embed").eval()
    if variant == "lora":  # adapted projections are called through their modules
        from rwkv_sft.adapters import add_lora
        add_lora(model, rank=4)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("lora_B"):
                    p.normal_(0, 0.1)
    tokens = torch.randint(0, V, (3, 8))
    with torch.no_grad():
        for state in (None, random_state(model, 3)):
            fast = slow = state
            for t in range(tokens.shape[1]):
                want, slow = normal_step(model, tokens[:, t:t + 1], slow)
                got, fast = decode_step(model, tokens[:, t:t + 1], fast, full_output=False)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
                for name in ("att_shift", "wkv", "ffn_shift"):
                    torch.testing.assert_close(getattr(fast, name), getattr(slow, name), rtol=1e-5, atol=1e-5)
        # plain projections are multiplied as one [3, C, C] stack; adapted ones through their modules
        assert (model.blocks[1].att.stacked_rkv() is None) == (variant == "lora")
        # RWKV7.forward takes this path for one token without gradients; full_output keeps the T axis.
        logits, _ = model(tokens[:, :1], None)
        assert logits.shape == (3, 1, V)
        torch.testing.assert_close(logits[:, 0], normal_step(model, tokens[:, :1], None)[0], rtol=1e-5, atol=1e-5)
        # Feeding a prompt in one call, then stepping, equals stepping all the way.
        _, prefilled = model(tokens[:, :5])
        a, _ = model(tokens[:, 5:6], prefilled, full_output=False)
        b, _ = normal_step(model, tokens[:, 5:6], model.forward_hidden(tokens[:, :5])[1])
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_decoding_switches_layout_and_training_switches_back(one_thread):
    """A step without gradients (even in inference mode) stores the projections transposed; the
    values and state_dict do not change, and the next forward with gradients trains normally."""
    model = random_model(seed=4, n_layer=2, n_embd=64, vocab_size=V)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = torch.randint(0, V, (2, 4))
    with torch.inference_mode():
        model(tokens[:, :1])
    assert model.head.weight.t().is_contiguous() and not model.head.weight.is_contiguous()
    assert not model.head.weight.is_inference()
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert model.blocks[0].att.stacked_rkv() is not None
    logits, _ = model(tokens)  # with gradients: contiguous again, and autograd works
    assert model.head.weight.is_contiguous() and model.blocks[0].att.key.weight.is_contiguous()
    assert model.blocks[0].att.stacked_rkv() is None
    logits.square().mean().backward()
    assert model.head.weight.grad is not None and model.head.weight.grad.is_contiguous()


def test_the_trainer_keeps_the_training_layout_through_its_evaluations(tmp_path, monkeypatch):
    """An evaluation during training generates token by token; the model being trained must not be
    re-laid for it (two copies of every weight per evaluation). The trained model decodes as usual."""
    from types import SimpleNamespace

    import rwkv_sft.train.evaluate as evaluate_mod
    from rwkv_sft.infer.step import decode_step
    from rwkv_sft.train import train
    from test_train_helpers import tiny_config, tiny_examples

    seen = []

    def fake_evaluate(model, *args, **kwargs):
        with torch.inference_mode():
            decode_step(model, torch.zeros(1, 1, dtype=torch.long))
        seen.append(model.head.weight.is_contiguous())
        return {"loss": 1.0, "token_accuracy": 0.0, "exact_match": 0.0, "exact_match_n": 0, "samples": []}

    monkeypatch.setattr(evaluate_mod, "evaluate", fake_evaluate)
    data = SimpleNamespace(train=tiny_examples(), eval=tiny_examples(4, seed=1), report={})
    result = train(tiny_config(tmp_path, eval_every=2), data=data)
    assert seen and all(seen)  # every evaluation ran on the training layout
    with torch.inference_mode():
        decode_step(result.model, torch.zeros(1, 1, dtype=torch.long))
    assert not result.model.head.weight.is_contiguous()


def test_a_failed_training_run_leaves_the_callers_model_decoding_as_usual(tmp_path, monkeypatch):
    import rwkv_sft.train.loop as loop
    from rwkv_sft.train import train
    from test_train_helpers import tiny_config, tiny_data

    def broken(*args, **kwargs):
        raise RuntimeError("the loss could not be built")

    monkeypatch.setattr(loop, "CompletionLoss", broken)  # fails after the trainer took the model over
    model = random_model(seed=3, n_layer=1, n_embd=64, vocab_size=256)
    with pytest.raises(RuntimeError, match="could not be built"):
        train(tiny_config(tmp_path), model=model, data=tiny_data())
    assert model.auto_decoding_layout


def test_decoding_layout_transposes_widening_projections_only():
    """A matrix-vector product streams a widening weight (out >= in) faster transposed and a narrowing
    one (ffn.value, 4C -> C) faster as it is; the values never change."""
    model = random_model(seed=5, n_layer=1, n_embd=64, vocab_size=V).decoding_layout()
    block = model.blocks[0]
    assert not model.head.weight.is_contiguous() and not block.ffn.key.weight.is_contiguous()
    assert not block.att.receptance.weight.is_contiguous()
    assert block.ffn.value.weight.is_contiguous()


def test_the_stacked_projections_follow_the_weights(one_thread):
    """In the decoding layout receptance/key/value are views of one stack: a weight changed in place
    changes the step, a weight replaced (load_state_dict(assign=True), .to()) leaves the stack for
    the modules; the step equals the normal forward throughout."""
    model = random_model(seed=5, n_layer=2, n_embd=64, vocab_size=V).eval()
    tokens = torch.randint(0, V, (2, 1))
    with torch.no_grad():
        model.decoding_layout()
        att = model.blocks[1].att
        assert att.stacked_rkv() is not None
        att.key.weight.mul_(1.5)  # in place: the stack sees it
        torch.testing.assert_close(decode_step(model, tokens, None, full_output=False)[0],
                                   normal_step(model, tokens, None)[0], rtol=1e-5, atol=1e-5)
        sd = {k: v.clone() * (1.1 if k.endswith("att.value.weight") else 1) for k, v in model.state_dict().items()}
        model.load_state_dict(sd, assign=True)
        assert att.stacked_rkv() is None
        torch.testing.assert_close(decode_step(model, tokens, None, full_output=False)[0],
                                   normal_step(model, tokens, None)[0], rtol=1e-5, atol=1e-5)
