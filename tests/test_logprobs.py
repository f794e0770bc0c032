"""The log-prob kernels (models/logprobs.py) against torch's log_softmax, gradcheck and values by hand."""

import math

import pytest
import torch

from models.logprobs import projected_logprobs, token_logprobs, token_logprobs_and_entropy

# ---------- token_logprobs / token_logprobs_and_entropy


def _reference_logprobs(logits, ids, temperature):
    return torch.log_softmax(logits / temperature, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def test_token_logprobs_matches_log_softmax_any_chunk():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, 11, generator=g)
    ids = torch.randint(0, 11, (5, 7), generator=g)
    for temperature in (1.0, 0.7):
        want = _reference_logprobs(logits, ids, temperature)
        for chunk in (None, 1, 4, 35, 100):  # auto, one position, a chunk that cuts rows, all, more than all
            assert torch.allclose(token_logprobs(logits, ids, temperature, chunk_positions=chunk), want, atol=1e-6)


def test_token_logprobs_by_hand():
    # logits [0, ln 3] -> softmax [1/4, 3/4]; at temperature 2 -> [0, ln3 / 2] -> [1/(1+sqrt3), sqrt3/(1+sqrt3)]
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    assert token_logprobs(logits, torch.tensor([[1]])).item() == pytest.approx(math.log(0.75))
    assert token_logprobs(logits, torch.tensor([[0]]), 2.0).item() == pytest.approx(-math.log(1 + math.sqrt(3)))


def test_token_logprobs_gradient_by_hand_and_gradcheck():
    # d log p_id / d z_j = (1[j == id] - p_j) / T: softmax [1/4, 3/4], id 1, T 1 -> [-1/4, 1/4]
    logits = torch.tensor([[[0.0, math.log(3.0)]]], requires_grad=True)
    token_logprobs(logits, torch.tensor([[1]])).sum().backward()
    assert logits.grad.flatten().tolist() == pytest.approx([-0.25, 0.25])
    # the hand-written backward against finite differences, in float64, chunks that cut rows
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 6, dtype=torch.float64, generator=g, requires_grad=True)
    ids = torch.randint(0, 6, (2, 3), generator=g)
    assert torch.autograd.gradcheck(lambda z: token_logprobs(z, ids, 0.7, chunk_positions=4), (x,))


def test_token_logprobs_gradient_matches_autograd_of_log_softmax():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 5, 50, generator=g)
    ids = torch.randint(0, 50, (3, 5), generator=g)
    upstream = torch.randn(3, 5, generator=g)
    ours, ref = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    (token_logprobs(ours, ids, 0.7, chunk_positions=2) * upstream).sum().backward()
    (_reference_logprobs(ref, ids, 0.7) * upstream).sum().backward()
    assert torch.allclose(ours.grad, ref.grad, atol=1e-6)


def test_token_logprobs_bf16_logits_and_gradient():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 5, generator=g).to(torch.bfloat16).requires_grad_()
    ids = torch.randint(0, 5, (2, 3), generator=g)
    out = token_logprobs(logits, ids)
    assert out.dtype == torch.float32  # computed in fp32 from the bf16 logits
    assert torch.allclose(out, _reference_logprobs(logits.detach().float(), ids, 1.0), atol=1e-6)
    out.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    ref = logits.detach().float().requires_grad_()
    _reference_logprobs(ref, ids, 1.0).sum().backward()
    assert torch.allclose(logits.grad.float(), ref.grad, atol=1e-2)


def test_token_entropy():
    # uniform over 4 -> ln 4; one-hot-ish -> ~0
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]]])
    logp, ent = token_logprobs_and_entropy(logits, torch.tensor([[2, 0]]))
    assert ent[0, 0].item() == pytest.approx(math.log(4))
    assert ent[0, 1].item() == pytest.approx(0.0, abs=1e-6)
    assert logp.flatten().tolist() == pytest.approx([-math.log(4), 0.0], abs=1e-6)
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 4, 9, generator=g)
    ids = torch.randint(0, 9, (3, 4), generator=g)
    want = torch.distributions.Categorical(logits=logits / 0.7).entropy()
    logp, ent = token_logprobs_and_entropy(logits, ids, 0.7, chunk_positions=5)
    assert torch.allclose(ent, want, atol=1e-5)
    assert torch.allclose(logp, token_logprobs(logits, ids, 0.7), atol=1e-6)
    assert not ent.requires_grad


# ---------- projected_logprobs: the head's projection inside the loss


@pytest.mark.parametrize("chunk", [None, 1, 4, 100])  # auto (all), one entry, chunks of 4 (the last short), all
def test_projected_logprobs_equal_the_logits_path_values_entropy_and_gradients(chunk):
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(3, 5, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(13, 8, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 13, (3, 5), generator=g)
    upstream = torch.randn(3, 5, generator=g, dtype=torch.float64)
    h1, w1, h2, w2 = (t.clone().requires_grad_() for t in (hidden, weight, hidden, weight))
    logp, ent = projected_logprobs(h1, w1, ids, 0.7, with_entropy=True, chunk_columns=chunk)
    want, want_ent = token_logprobs_and_entropy(h2 @ w2.T, ids, 0.7)
    assert torch.allclose(logp, want) and torch.allclose(ent, want_ent) and not ent.requires_grad
    (logp * upstream).sum().backward()
    (want * upstream).sum().backward()
    assert torch.allclose(h1.grad, h2.grad) and torch.allclose(w1.grad, w2.grad)
    # and the hand-written backward against finite differences
    assert torch.autograd.gradcheck(lambda h, w: projected_logprobs(h, w, ids, 0.7, chunk_columns=chunk)[0],
                                    (hidden.clone().requires_grad_(), weight.clone().requires_grad_()))
    _, none = projected_logprobs(hidden, weight, ids)
    assert none.numel() == 0


def test_projected_logprobs_frozen_head_and_bf16_autocast():
    """A frozen head (LoRA) gets no gradient and costs none; under CUDA's policy forced on the CPU (fp32
    weights, bf16 autocast) the products run in bf16 like the model's own head, the result is fp32,
    and the gradients stay as close to the logits path's as bf16 lets them."""
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(4, 6, 16, generator=g).requires_grad_()
    weight = torch.randn(40, 16, generator=g)
    ids = torch.randint(0, 40, (4, 6), generator=g)
    logp, _ = projected_logprobs(hidden, weight, ids, chunk_columns=15)
    logp.sum().backward()
    assert weight.grad is None and hidden.grad is not None
    h1, w1 = hidden.detach().clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, _ = projected_logprobs(h1, w1, ids, 0.7, chunk_columns=15)
        logits = torch.nn.functional.linear(h2, w2)  # bf16, as the model's head under autocast
        want = token_logprobs(logits, ids, 0.7)
    assert ours.dtype == torch.float32 and logits.dtype == torch.bfloat16
    assert (ours - want).abs().max() < 0.05
    ours.sum().backward()
    want.sum().backward()
    assert h1.grad.dtype == torch.float32 and w1.grad.dtype == torch.float32
    for a, b in ((h1.grad, h2.grad), (w1.grad, w2.grad)):
        assert (a - b).norm() <= 0.02 * b.norm()


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_the_entropys_gradient_through_the_chunked_loss_matches_autograd_in_fp64(chunk):
    """--entropy_coef: with `entropy_grad` the entropy is differentiable; its gradient (with the
    log-probs', both weighted) through the projected loss, chunked by vocabulary columns, and through
    the logits path, chunked by positions, equals autograd through log_softmax in fp64."""
    torch.manual_seed(0)
    B, T, H, V, temp = 2, 5, 6, 37, 0.7
    hidden = torch.randn(B, T, H, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, V, (B, T))
    a, b = torch.randn(B, T, dtype=torch.float64), torch.randn(B, T, dtype=torch.float64)

    log_sm = torch.log_softmax(hidden @ weight.T / temp, -1)
    want_logp, want_h = log_sm.gather(-1, ids[..., None]).squeeze(-1), -(log_sm.exp() * log_sm).sum(-1)
    want = torch.autograd.grad((a * want_logp + b * want_h).sum(), (hidden, weight))

    logp, ent = projected_logprobs(hidden, weight, ids, temp, with_entropy=True, chunk_columns=chunk,
                                   entropy_grad=True)
    assert torch.allclose(logp, want_logp, atol=1e-12) and torch.allclose(ent, want_h, atol=1e-12)
    got = torch.autograd.grad((a * logp + b * ent).sum(), (hidden, weight))
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-10, atol=1e-12)

    logits = (hidden @ weight.T / 1.0).detach().requires_grad_(True)
    log_sm = torch.log_softmax(logits / temp, -1)
    want = torch.autograd.grad((a * log_sm.gather(-1, ids[..., None]).squeeze(-1)
                                - b * (log_sm.exp() * log_sm).sum(-1)).sum(), logits)[0]
    logp, ent = token_logprobs_and_entropy(logits, ids, temp, chunk_positions=chunk, entropy_grad=True)
    assert torch.allclose(torch.autograd.grad((a * logp + b * ent).sum(), logits)[0], want, rtol=1e-10, atol=1e-12)
    # without entropy_grad the entropy stays a metric: no gradient flows through it
    _, ent = projected_logprobs(hidden, weight, ids, temp, with_entropy=True, chunk_columns=chunk)
    assert not ent.requires_grad
