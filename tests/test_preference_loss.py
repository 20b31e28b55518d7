"""DPO and ORPO (medtune.train.preference): the maths against hand computations on fixed numbers, the same on
numpy, MLX and PyTorch; batches of pairs; sequence log-probs (chunked = plain, values and gradients, and equal
to scoring each side alone); MLX and PyTorch give the same step-0 losses on the same tiny Llama; the
reference's log-probs with the adapter switched off are the base model's; a DPO step moves the loss."""

import math

import numpy as np
import pytest

from medtune.train import loss as losses
from medtune.train import preference as pref

BETA, LAM = 0.1, 0.25


def _pairs():
    """Three pairs of token ids (a prompt shared by both sides, completions of other lengths)."""
    rng = np.random.RandomState(0)
    out = []
    for prompt, chosen, rejected in [(7, 9, 5), (12, 4, 11), (3, 15, 6)]:
        p = rng.randint(200, 40000, prompt).tolist()
        out.append(
            (
                (p + rng.randint(200, 40000, chosen).tolist(), prompt),
                (p + rng.randint(200, 40000, rejected).tolist(), prompt),
            )
        )
    return out


PAIRS = _pairs()


def _floats(metrics) -> dict:
    return {k: float(np.array(v)) if not hasattr(v, "item") else float(v.item()) for k, v in metrics.items()}


def _on_all(name, *args, **kw):
    """[(loss, metrics)] of the numpy, MLX and PyTorch versions of `name` on the same float inputs."""
    import mlx.core as mx
    import torch

    out = [getattr(pref, name)(*args, **kw)]
    for lib, conv in (("mlx", lambda a: mx.array(np.float32(a))), ("torch", lambda a: torch.tensor(np.float32(a)))):
        loss, metrics = getattr(pref, f"{lib}_{name}")(*map(conv, args), **kw)
        out.append((float(loss.item()), _floats(metrics)))
    return out


# ---- the maths ------------------------------------------------------------------------------------
def test_dpo_loss_by_hand():
    pc, pr = [-10.0, -20.0, -5.5], [-12.0, -18.0, -5.5]
    rc, rr = [-11.0, -19.0, -6.0], [-11.5, -19.0, -5.0]
    # by hand: z = beta * ((pc - rc) - (pr - rr)) = 0.1 * (1.5, -2, 1)
    z = [0.15, -0.2, 0.1]
    expected = sum(-math.log(1 / (1 + math.exp(-v))) for v in z) / 3
    for loss, m in _on_all("dpo_loss", pc, pr, rc, rr, beta=BETA):
        assert loss == pytest.approx(expected, abs=1e-6)
        assert m["rewards_chosen"] == pytest.approx(0.1 * (1 - 1 + 0.5) / 3, abs=1e-6)
        assert m["rewards_rejected"] == pytest.approx(0.1 * (-0.5 + 1 - 0.5) / 3, abs=1e-6)
        assert m["margin"] == pytest.approx(sum(z) / 3, abs=1e-6)
        assert m["accuracy"] == pytest.approx(2 / 3)


def test_dpo_equal_sides_is_log_2():
    pc = [-10.0, -3.0, -7.25]
    rc = [-9.0, -4.0, -7.0]
    for loss, m in _on_all("dpo_loss", pc, pc, rc, rc, beta=0.5):
        assert loss == pytest.approx(math.log(2), abs=1e-7)
        assert m["margin"] == 0 and m["accuracy"] == 0
    for loss, _ in _on_all("dpo_loss", [-5.0, -8.0], [-9.0, -2.0], [-5.0, -8.0], [-9.0, -2.0], beta=0.1):
        assert loss == pytest.approx(math.log(2), abs=1e-7)  # the policy is the reference


def test_orpo_loss_by_hand():
    nll, mc, mr = 1.7, [-0.5, -2.0, -0.1], [-0.7, -1.5, -3.0]

    def log_odds(m):  # straight from the definition: p = exp(mean log-prob), odds = p / (1 - p)
        p = math.exp(m)
        return math.log(p / (1 - p))

    ratios = [log_odds(c) - log_odds(r) for c, r in zip(mc, mr)]
    odds_loss = sum(math.log(1 + math.exp(-x)) for x in ratios) / 3
    for loss, m in _on_all("orpo_loss", nll, mc, mr, lam=LAM):
        assert loss == pytest.approx(nll + LAM * odds_loss, abs=1e-6)
        assert m["nll"] == pytest.approx(nll, abs=1e-6)
        assert m["or_loss"] == pytest.approx(odds_loss, abs=1e-6)
        assert m["log_odds_ratio"] == pytest.approx(sum(ratios) / 3, abs=1e-5)
        assert m["accuracy"] == pytest.approx(2 / 3)
        assert m["margin"] == pytest.approx((0.2 - 0.5 + 2.9) / 3, abs=1e-6)


def test_log1mexp_is_accurate_on_both_sides_of_log_2():
    from decimal import Decimal, localcontext

    xs = np.array([-50.0, -5.0, -0.8, -0.6931, -0.5, -1e-3, -1e-5])
    with localcontext() as ctx:  # 50 digits: no cancellation in 1 - exp(x)
        ctx.prec = 50
        expected = [float((1 - Decimal(float(x)).exp()).ln()) for x in xs]
    np.testing.assert_allclose(pref.log1mexp(xs), expected, rtol=1e-12)


def test_orpo_stays_finite_for_extreme_log_probs_and_so_do_its_gradients():
    """Very negative mean log-probs (a long wrong completion), certain ones (0, -1e-9) and mixes: the loss and
    its gradients are finite on every implementation (no inf-times-zero NaN from the unused branch)."""
    import mlx.core as mx
    import torch

    mc = [-1e4, -1e-9, 0.0, -30.0, -2000.0]
    mr = [-3e4, -1e-3, -1e4, 0.0, -1e-12]
    for loss, m in _on_all("orpo_loss", 2.0, mc, mr, lam=1.0):
        assert math.isfinite(loss) and all(math.isfinite(v) for v in m.values())
    # pair 0: log odds = mean log-prob there (log1mexp(-1e4) = 0), the ratio is 2e4: no odds-ratio loss
    np.testing.assert_allclose(pref.orpo_loss(0.0, mc[:1], mr[:1], 1.0)[0], 0.0, atol=1e-12)

    g_mx = mx.grad(lambda a, b: pref.mlx_orpo_loss(mx.array(0.0), a, b, 1.0)[0], argnums=(0, 1))(
        mx.array(mc), mx.array(mr)
    )
    a, b = torch.tensor(mc, requires_grad=True), torch.tensor(mr, requires_grad=True)
    pref.torch_orpo_loss(torch.tensor(0.0), a, b, 1.0)[0].backward()
    for g in (*map(np.array, g_mx), a.grad.numpy(), b.grad.numpy()):
        assert np.isfinite(g).all(), g
    assert np.abs(np.array(g_mx[0])).max() > 0


# ---- batches of pairs -----------------------------------------------------------------------------
def test_pair_batch_layout():
    pairs = [(([5, 6, 7, 8], 2), ([5, 6, 9], 2)), (([1, 2, 3, 4, 5, 6], 0), ([1, 2, 3, 4, 5, 6, 7, 8], 5))]
    ref = (np.array([-1.0, -2.0, -3.0]), np.array([-4.0, -5.0, -6.0]))
    pairs = [pairs[0], pairs[1], pairs[0]]
    b = pref.pair_batch(pairs, [1, 0], ref)
    assert b.ids.shape == (4, 32) and b.pairs == 2 and b.tokens == 6 + 4 + 8 + 3
    assert b.ids[0, :6].tolist() == [1, 2, 3, 4, 5, 6] and not b.ids[0, 6:].any()  # chosen sides first
    assert b.ids[2, :8].tolist() == [1, 2, 3, 4, 5, 6, 7, 8] and b.ids[3, :3].tolist() == [5, 6, 9]
    assert b.lengths.tolist() == [[0, 6], [2, 4], [5, 8], [2, 3]]
    assert b.segments.sum(axis=1).tolist() == [5, 2, 3, 1]  # offset 0: token 0 is never a label
    rows, cols = np.nonzero(b.segments)
    targets = b.ids[:, 1:].reshape(-1)[b.picks[cols]]
    by_row = [targets[rows == r].tolist() for r in range(4)]
    assert by_row == [[2, 3, 4, 5, 6], [7, 8], [6, 7, 8], [9]]
    assert len(b.picks) % losses.PICK_MULTIPLE == 0 and b.segments.shape == (4, len(b.picks))
    assert b.ref_chosen.tolist() == [-2.0, -1.0] and b.ref_rejected.tolist() == [-5.0, -4.0]
    assert not pref.pair_batch(pairs, [0]).ref_chosen.any()
    with pytest.raises(ValueError, match="pair 1: the rejected side has no completion tokens"):
        pref.pair_batch([pairs[0], (([1, 2, 3], 1), ([1, 2, 3], 3))], [0, 1])


# ---- on models --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def other_llama_dir(tmp_path_factory, smollm2_dir):
    from conftest import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("pref") / "seed1", smollm2_dir, seed=1)


def _mlx_model(path, lora=True, b_std=0.0, seed=0):
    import mlx.core as mx
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from medtune.train.backends.mlx import load_model

    model, _ = load_model(path)
    if lora:
        model.freeze()
        linear_to_lora_layers(model, len(model.layers), {"rank": 4, "scale": 2.0, "dropout": 0.0})
        if b_std:
            mx.random.seed(seed)
            for _, m in model.named_modules():
                if hasattr(m, "lora_b"):
                    m.lora_b = mx.random.normal(m.lora_b.shape) * b_std
    mx.eval(model.parameters())
    return model


def _torch_model(path, lora=True, b_std=0.0, seed=0):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    if not lora:
        return model.requires_grad_(False)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name and b_std:
            torch.nn.init.normal_(p, std=b_std)
    return model


def _mlx_value_and_grad(model, loss_fn, batch, compiled=False):
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    if compiled:  # as the trainer compiles its step
        state = [model.state, mx.random.state]
        fn = mx.compile(lambda *b: nn.value_and_grad(model, loss_fn)(model, *b), inputs=state, outputs=state)
        (loss, metrics), grads = fn(*batch)
    else:
        (loss, metrics), grads = nn.value_and_grad(model, loss_fn)(model, *batch)
    mx.eval(loss, metrics, grads)
    return loss.item(), _floats(metrics), {k: np.array(v) for k, v in tree_flatten(grads)}


def _alone(logits_fn, pairs):
    """Summed completion log-probs of each side scored alone (no padding, no batch), in float64 numpy."""
    out = []
    for side in (0, 1):
        for pair in pairs:
            toks, offset = pair[side]
            logits = np.asarray(logits_fn(toks), dtype=np.float64)[0]
            lp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
            lp -= logits.max(-1, keepdims=True)
            out.append(sum(lp[p - 1, toks[p]] for p in range(max(offset, 1), len(toks))))
    return np.array(out)


def test_mlx_sequence_logps_chunked_equal_plain_and_each_side_alone(tiny_llama_dir, other_llama_dir):
    """LoRA with B != 0 (every gradient non-trivial), 4 chunks of 16 rows, compiled as the trainer does: the
    chunked log-probs, DPO and ORPO losses and gradients equal the plain ones; the log-probs equal each side
    scored alone."""
    import mlx.core as mx

    model = _mlx_model(tiny_llama_dir, b_std=0.05)
    split = losses.mlx_split(model)
    assert split is not None
    split.rows = 16
    batch = pref.pair_batch(PAIRS, [0, 1, 2], pref.reference_logps(_mlx_model(other_llama_dir, lora=False), PAIRS))
    arrays = pref.mlx_batch(batch)
    alone = _alone(lambda t: model(mx.array([t])), PAIRS)
    for s in (None, split):
        summed, mean = pref.mlx_sequence_logps(s, grad=False)(model, arrays[0], arrays[2], arrays[3])
        np.testing.assert_allclose(np.array(summed), alone, rtol=1e-5)
        np.testing.assert_allclose(np.array(mean), alone / batch.segments.sum(1), rtol=1e-5)
    from medtune.train.backends.mlx import make_batch

    sft, _ = losses.mlx_loss(split, grad=False)(model, *make_batch([p[0] for p in PAIRS], [0, 1, 2]))
    orpo_0, metrics = pref.mlx_preference_loss(split, "orpo", 0.0, grad=False)(model, *arrays)
    assert orpo_0.item() == pytest.approx(sft.item(), rel=1e-6) == metrics["nll"].item()  # lam 0: the SFT loss
    for method, beta in (("dpo", BETA), ("orpo", LAM)):
        plain = _mlx_value_and_grad(model, pref.mlx_preference_loss(None, method, beta), arrays)
        chunked = _mlx_value_and_grad(model, pref.mlx_preference_loss(split, method, beta), arrays, compiled=True)
        assert chunked[0] == pytest.approx(plain[0], rel=1e-5)
        assert chunked[1] == pytest.approx(plain[1], rel=1e-4, abs=1e-5)
        assert len(plain[2]) == 28  # lora_a, lora_b of 7 linears in 2 layers
        for k, g in plain[2].items():
            assert np.abs(g).max() > 0, (method, k)
            np.testing.assert_allclose(chunked[2][k], g, rtol=1e-4, atol=1e-5 * np.abs(g).max(), err_msg=k)


def test_torch_sequence_logps_chunked_equal_plain(tiny_llama_dir):
    import torch

    model = _torch_model(tiny_llama_dir, b_std=0.05)
    split = losses.torch_split(model)
    assert split is not None
    split.rows = 16
    ref = (np.array([-100.0, -60.0, -170.0]), np.array([-50.0, -120.0, -70.0]))
    batch = pref.torch_batch(pref.pair_batch(PAIRS, [0, 1, 2], ref))
    with torch.no_grad():
        alone = _alone(lambda t: model(input_ids=torch.tensor([t])).logits.numpy(), PAIRS)
        for s in (None, split):
            np.testing.assert_allclose(pref.torch_sequence_logps(model, batch, s)[0].numpy(), alone, rtol=1e-5)
    for method, beta in (("dpo", BETA), ("orpo", LAM)):
        results = []
        for s in (None, split):
            model.zero_grad()
            loss, _ = pref.torch_preference_loss(model, batch, method, beta, s)
            loss.backward()
            grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
            results.append((loss.item(), grads))
        (plain, g0), (chunked, g1) = results
        assert chunked == pytest.approx(plain, rel=1e-5) and len(g0) == 28
        for k, g in g0.items():
            assert g.abs().max() > 0, (method, k)
            torch.testing.assert_close(g1[k], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()), msg=k)


def test_mlx_and_torch_give_the_same_step_0_losses(tiny_llama_dir, other_llama_dir):
    """The same tiny Llama with a zero-initialised LoRA on both backends, the chunked path on both: the reference
    log-probs (of the model itself, and of another seed's model), DPO (log 2 against itself; not against the
    other) and ORPO agree to 1e-5, metrics too, and match the numpy reference maths on the sequence log-probs."""
    import torch

    mlx_model, torch_model = _mlx_model(tiny_llama_dir), _torch_model(tiny_llama_dir)
    refs = {
        "self": (pref.reference_logps(mlx_model, PAIRS, 2), pref.reference_logps(torch_model, PAIRS, 2)),
        "other": (
            pref.reference_logps(_mlx_model(other_llama_dir, lora=False), PAIRS, 2),
            pref.reference_logps(_torch_model(other_llama_dir, lora=False), PAIRS, 2),
        ),
    }
    for (mc, mr), (tc, tr) in refs.values():
        np.testing.assert_allclose(mc, tc, rtol=1e-5)
        np.testing.assert_allclose(mr, tr, rtol=1e-5)
    split_m, split_t = losses.mlx_split(mlx_model), losses.torch_split(torch_model)
    assert split_m is not None and split_t is not None
    policy = np.array(refs["self"][0])  # the step-0 policy is the base: its log-probs are the self reference
    cases = [("dpo", BETA, "self"), ("dpo", BETA, "other"), ("orpo", LAM, None)]
    for method, beta, which in cases:
        ref = refs[which][0] if which else None
        batch = pref.pair_batch(PAIRS, [0, 1, 2], ref)
        loss_m, met_m = pref.mlx_preference_loss(split_m, method, beta, grad=False)(mlx_model, *pref.mlx_batch(batch))
        with torch.no_grad():
            loss_t, met_t = pref.torch_preference_loss(torch_model, pref.torch_batch(batch), method, beta, split_t)
        loss_m, loss_t, met_m, met_t = loss_m.item(), loss_t.item(), _floats(met_m), _floats(met_t)
        assert loss_m == pytest.approx(loss_t, abs=1e-5), (method, which)
        assert met_m.keys() == met_t.keys()
        for k in met_m:  # against itself, each pair's margin is 0 up to rounding: its accuracy is a coin toss
            if not (which == "self" and k == "accuracy"):
                assert met_m[k] == pytest.approx(met_t[k], rel=1e-5, abs=1e-5), (method, which, k)
        if method == "dpo":
            expected = pref.dpo_loss(*policy, *ref, beta)[0]
        else:
            counts = batch.segments.sum(1)
            nll = -policy[0].sum() / counts[:3].sum()
            expected = pref.orpo_loss(nll, policy[0] / counts[:3], policy[1] / counts[3:], beta)[0]
        assert loss_m == pytest.approx(expected, abs=1e-5), (method, which)
        if which == "self":
            assert loss_m == pytest.approx(math.log(2), abs=1e-5)
        elif which == "other":
            assert abs(loss_m - math.log(2)) > 1e-3


def test_mlx_dpo_gradient_moves_the_loss_after_one_step(tiny_llama_dir):
    """At step 0 (B = 0, reference = the model) the DPO loss is log 2 and only the B matrices have a gradient;
    after one Adam step every LoRA gradient is finite and non-zero, and the loss is below log 2."""
    import mlx.core as mx
    import mlx.optimizers as optim

    model = _mlx_model(tiny_llama_dir)
    split = losses.mlx_split(model)
    arrays = pref.mlx_batch(pref.pair_batch(PAIRS, [0, 1, 2], pref.reference_logps(model, PAIRS)))
    loss_fn = pref.mlx_preference_loss(split, "dpo", BETA)
    loss, metrics, grads = _mlx_value_and_grad(model, loss_fn, arrays)
    assert loss == pytest.approx(math.log(2), abs=1e-5) and metrics["margin"] == pytest.approx(0, abs=1e-5)
    assert all(np.abs(g).max() > 0 for k, g in grads.items() if k.endswith("lora_b"))
    assert all(not g.any() for k, g in grads.items() if k.endswith("lora_a"))
    import mlx.nn as nn

    opt = optim.Adam(learning_rate=1e-2)
    (_, _), g = nn.value_and_grad(model, loss_fn)(model, *arrays)
    opt.update(model, g)
    mx.eval(model.parameters(), opt.state)
    after, metrics, grads = _mlx_value_and_grad(model, loss_fn, arrays)
    assert after < math.log(2) and metrics["margin"] > 0
    for k, g in grads.items():
        assert np.isfinite(g).all() and np.abs(g).max() > 0, k


def test_reference_with_the_adapter_off_is_the_base_model(tiny_llama_dir):
    """A trained-looking adapter (B != 0): reference_logps with the adapter switched off gives the base model's
    log-probs on MLX (LoRA scale 0, restored after) and PyTorch (PEFT disable_adapter); with it on, others."""
    base_m = pref.reference_logps(_mlx_model(tiny_llama_dir, lora=False), PAIRS)
    base_t = pref.reference_logps(_torch_model(tiny_llama_dir, lora=False), PAIRS)
    for make in (_mlx_model, _torch_model):
        model = make(tiny_llama_dir, b_std=0.05)
        base = base_m if make is _mlx_model else base_t
        off, on = pref.reference_logps(model, PAIRS, adapter_off=True), pref.reference_logps(model, PAIRS, 3, False)
        for a, b, c in zip(off, base, on):
            np.testing.assert_allclose(a, b, rtol=1e-6)
            assert np.abs(c - b).max() > 1e-2
        again = pref.reference_logps(model, PAIRS, adapter_off=False)  # the adapter is back on
        np.testing.assert_allclose(again[0], on[0], rtol=1e-6)
    from mlx_lm.tuner.utils import linear_to_lora_layers

    dora = _mlx_model(tiny_llama_dir, lora=False)
    dora.freeze()
    linear_to_lora_layers(dora, 1, {"rank": 4, "scale": 2.0, "dropout": 0.0}, use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        pref.reference_logps(dora, PAIRS)
