"""The rollout engine samples what `model.generate` samples, and its logprobs are the model's."""

import pytest
import torch

from data import make_synthetic
from data.prompt import encode_prompt
from grpo.batch import completion_logits, pack
from models.logprobs import token_logprobs
from sampling import Sampler, SamplingParams
from sampling.fast_decode import supports
from sampling.tokens import _argmax, _draw, sample_token
from tests.conftest import give_lora_b_weights


@pytest.fixture()
def prompts(tiny_tokenizer):
    return [encode_prompt(tiny_tokenizer, r["question"]) for r in make_synthetic("test", max_samples=8)]


SETTINGS = {"fast", "cuda_graphs", "sync_every", "batch_size", "continuous", "reference"}


def sample(model, tokenizer, prompts, *, eos=None, generator=None, stop_at=None, **kw):
    """`prompts` through a fresh `Sampler` of `model`: engine settings (SETTINGS) and `SamplingParams`
    fields by keyword; `eos` stands in for the tokenizer's end-of-sequence id."""
    settings = {k: kw.pop(k) for k in list(kw) if k in SETTINGS}
    sampler = Sampler(model, eos_token_id=tokenizer.eos_token_id if eos is None else eos,
                      pad_token_id=tokenizer.pad_token_id, **settings)
    return sampler.sample(prompts, SamplingParams(**kw), generator=generator, stop_at=stop_at)


@pytest.mark.parametrize("fast", [True, False])
def test_greedy_equals_generate(tiny_model, tiny_tokenizer, prompts, fast):
    assert supports(tiny_model)
    want = sample(tiny_model, tiny_tokenizer, prompts, reference=True, max_new_tokens=24)
    got = sample(tiny_model, tiny_tokenizer, prompts, max_new_tokens=24, fast=fast)
    assert got.token_ids == want.token_ids and got.truncated == want.truncated


def _frequent_token(model, tokenizer, prompts) -> int:
    """The token the random model emits most in greedy completions: an 'eos' that rows hit at different steps."""
    first = sample(model, tokenizer, prompts, reference=True, max_new_tokens=12)
    return torch.tensor([t for row in first.token_ids for t in row]).mode().values.item()


@pytest.mark.parametrize("fast", [True, False])
def test_early_stop_and_dropped_rows_match_generate(tiny_model, tiny_tokenizer, prompts, fast):
    """Use a token the random model often emits as 'eos': rows stop at different steps, the engine
    drops finished rows from the batch, and every row still matches generate's."""
    args = dict(eos=_frequent_token(tiny_model, tiny_tokenizer, prompts), max_new_tokens=30)
    want = sample(tiny_model, tiny_tokenizer, prompts, reference=True, **args)
    got = sample(tiny_model, tiny_tokenizer, prompts, **args, fast=fast)
    assert got.token_ids == want.token_ids and got.truncated == want.truncated
    assert len({len(r) for r in got.token_ids}) > 1 and not all(got.truncated)  # rows really did stop apart


@pytest.mark.parametrize("fast", [True, False])
def test_sampled_logprobs_match_a_forward_pass(tiny_model, tiny_tokenizer, prompts, fast):
    torch.manual_seed(0)
    out = sample(tiny_model, tiny_tokenizer, prompts[:3], max_new_tokens=16, num_samples=4, temperature=0.7,
                 top_p=0.9, fast=fast)
    assert out.prompt_index == [i // 4 for i in range(12)]
    batch = pack([prompts[i] for i in out.prompt_index], out.token_ids, tiny_tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        logits = completion_logits(tiny_model, batch) / 0.7
    # the distribution each token was drawn from: the forward's softmax cut by top_p 0.9 (transformers'
    # warper), renormalized
    from transformers.generation.logits_process import TopPLogitsWarper

    cut = TopPLogitsWarper(0.9)(None, logits.flatten(0, 1)).view_as(logits)
    want = torch.log_softmax(cut, -1).gather(-1, batch.completion_ids[..., None]).squeeze(-1)
    whole = torch.log_softmax(logits, -1).gather(-1, batch.completion_ids[..., None]).squeeze(-1)
    for row, logps in enumerate(out.logprobs):
        assert torch.allclose(torch.tensor(logps), want[row, : len(logps)], atol=1e-4)
        assert (torch.tensor(logps) > whole[row, : len(logps)] + 0.05).all()  # the cut's mass is < 0.95
    assert len({tuple(t) for t in out.token_ids[:4]}) > 1  # the samples of a group differ


def test_ignore_eos_forces_the_length(tiny_model, tiny_tokenizer, prompts):
    out = sample(tiny_model, tiny_tokenizer, prompts[:2], max_new_tokens=9, num_samples=3, temperature=1.0,
                 ignore_eos=True)
    assert [len(t) for t in out.token_ids] == [9] * 6 and all(out.truncated)


def test_sampling_follows_softmax_and_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(20_000, 1)
    gen = torch.Generator().manual_seed(0)
    token, logp = sample_token(logits, SamplingParams(temperature=0.5), gen)
    want = torch.softmax(logits[0] / 0.5, -1)
    freq = torch.bincount(token, minlength=4).float() / len(token)
    assert torch.allclose(freq, want, atol=0.01), (freq, want)
    assert torch.allclose(logp, torch.log(want)[token])
    # p = .64, .24, .09, .03: top-p 0.8 keeps two
    token, _ = sample_token(logits, SamplingParams(temperature=1.0, top_p=0.8), gen)
    assert set(token.tolist()) == {0, 1}
    greedy, _ = sample_token(logits[:2], SamplingParams(), None)
    assert greedy.tolist() == [0, 0]


@pytest.mark.parametrize("V", [7, 2048, 3072, 5000, 151_936])
def test_two_level_argmax_is_argmax_ties_and_short_last_block_included(V):
    gen = torch.Generator().manual_seed(V)
    ties = torch.randint(0, 4, (6, V), generator=gen).float()  # every row's maximum occurs many times
    tail = torch.zeros(3, V)
    tail[0, -1] = 1.0  # the only maximum in the last (short) block's final column
    tail[1, [V // 2, -1]] = 1.0  # tied between a middle block and the last column: the first wins
    tail[2, 0] = tail[2, -1] = 1.0
    for x in (ties, torch.randn(5, V, generator=gen), tail):
        assert torch.equal(_argmax(x), x.argmax(dim=-1))


@pytest.mark.parametrize("V", [3072, 2600])
def test_two_level_draw_follows_the_weights_over_a_large_vocabulary(V):
    # 3 blocks of 1,024 entries (or a short third one, as 151,936 = 148 x 1,024 + 384); mass spread over
    # all three blocks, zero-weight entries on both sides of each block edge that must never be drawn
    n = 40_000
    weights = torch.zeros(V)
    picks = {3: 1.0, 1023: 2.0, 1025: 1.0, 2047: 0.5, 2048: 3.0, V - 1: 2.5}
    for i, w in picks.items():
        weights[i] = w
    gen = torch.Generator().manual_seed(0)
    drawn, total = _draw(weights.repeat(n, 1), gen)
    assert torch.allclose(total, torch.full((n, 1), 10.0))
    freq = torch.bincount(drawn, minlength=V).float() / n
    assert set(drawn.unique().tolist()) == set(picks)
    for i, w in picks.items():
        assert abs(freq[i].item() - w / 10.0) < 0.01, (i, freq[i].item(), w / 10.0)


def test_the_gpu_way_is_an_exponential_race_that_follows_the_weights(monkeypatch):
    """GPUs draw by exponential race (few whole-row kernels, not the CPU's ~25 small passes): the same
    distribution, zero weights never drawn, the same row totals; sample_token and greedy through it
    (the GPU way forced on the CPU)."""
    import sampling.tokens as tokens

    assert tokens.WAYS["cuda"].draw is tokens._race
    n, V = 40_000, 2600
    weights = torch.zeros(V)
    picks = {3: 1.0, 1023: 2.0, 1025: 1.0, 2047: 0.5, 2048: 3.0, V - 1: 2.5}
    for i, w in picks.items():
        weights[i] = w
    drawn, total = tokens._race(weights.repeat(n, 1), torch.Generator().manual_seed(0))
    assert torch.allclose(total, torch.full((n, 1), 10.0))
    freq = torch.bincount(drawn, minlength=V).float() / n
    assert set(drawn.unique().tolist()) == set(picks)
    for i, w in picks.items():
        assert abs(freq[i].item() - w / 10.0) < 0.01, (i, freq[i].item(), w / 10.0)
    monkeypatch.setitem(tokens.WAYS, "cpu", tokens.WAYS["cuda"])
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(20_000, 1)
    token, logp = sample_token(logits, SamplingParams(temperature=0.5, top_p=0.8), torch.Generator().manual_seed(1))
    want = torch.softmax(logits[0] / 0.5, -1)  # .87, .12, .02, .00: top-p 0.8 keeps the first alone
    # the log-prob of the cut it was drawn from (the first alone: log 1), not the whole softmax's (log .87)
    assert set(token.tolist()) == {0} and torch.equal(logp, torch.zeros_like(logp)) and want[0] < 0.9
    token, _ = sample_token(logits, SamplingParams(temperature=1.0), torch.Generator().manual_seed(2))
    freq = torch.bincount(token, minlength=4).float() / len(token)
    assert torch.allclose(freq, torch.softmax(logits[0], -1), atol=0.01)
    assert sample_token(logits[:2], SamplingParams(), None)[0].tolist() == [0, 0]


def test_draw_never_picks_a_zero_weight_entry_when_rand_returns_zero(monkeypatch):
    zeros = torch.zeros
    monkeypatch.setattr(torch, "rand", lambda shape, **kw: zeros(shape, dtype=kw.get("dtype")))
    small = torch.tensor([[0.0, 0.0, 2.0, 1.0]])
    large = torch.zeros(1, 3072)
    large[0, 1500] = 1.0  # block 0 has no mass at all
    assert _draw(small, None)[0].tolist() == [2]
    assert _draw(large, None)[0].tolist() == [1500]


def test_sampling_over_a_large_vocabulary_matches_softmax_and_top_p():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 5000, generator=g) * 3
    logits[0, :6] = torch.tensor([9.0, 8.5, 8.0, 7.0, 6.0, 5.0])
    n = 30_000
    token, logp = sample_token(logits.repeat(n, 1), SamplingParams(temperature=0.7), torch.Generator().manual_seed(2))
    want = torch.softmax(logits[0] / 0.7, -1)
    freq = torch.bincount(token, minlength=5000).float() / n
    assert torch.allclose(freq[:6], want[:6], atol=0.01), (freq[:6], want[:6])
    assert torch.allclose(logp, torch.log(want)[token], atol=1e-5)
    token, _ = sample_token(logits.repeat(2000, 1), SamplingParams(temperature=0.7, top_p=0.5),
                            torch.Generator().manual_seed(3))
    order = want.argsort(descending=True)
    nucleus = order[: int((want[order].cumsum(0) - want[order] < 0.5).sum())]
    assert set(token.tolist()) <= set(nucleus.tolist()) and len(set(token.tolist())) == len(nucleus)


@pytest.mark.parametrize("top_k,top_p,min_p", [(3, 1.0, 0.0), (0, 1.0, 0.3), (4, 0.8, 0.0), (5, 0.9, 0.2)])
def test_top_k_and_min_p_draw_from_the_renormalized_cut_of_transformers(top_k, top_p, min_p):
    """The kept tokens are those transformers' own warpers keep (top-k, then top-p, then min-p, on the same
    logits at the same temperature), drawn in proportion to their renormalized probabilities; the
    log-probability is the renormalized cut's (the distribution the token was drawn from)."""
    from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    g = torch.Generator().manual_seed(4)
    logits = torch.randn(1, 1000, generator=g) * 2
    logits[0, :6] = torch.tensor([9.0, 8.6, 8.3, 8.0, 7.5, 7.4])
    T, n = 0.8, 20_000
    scores = logits / T
    for warper, on in ((TopKLogitsWarper(max(top_k, 1)), top_k > 0), (TopPLogitsWarper(top_p), top_p < 1.0),
                       (MinPLogitsWarper(max(min_p, 1e-9)), min_p > 0)):
        scores = warper(None, scores) if on else scores
    want = torch.softmax(scores[0], -1)  # transformers' cut, renormalized
    params = SamplingParams(temperature=T, top_p=top_p, top_k=top_k, min_p=min_p)
    token, logp = sample_token(logits.repeat(n, 1), params, torch.Generator().manual_seed(5))
    freq = torch.bincount(token, minlength=1000).float() / n
    kept = set(want.nonzero().squeeze(-1).tolist())
    assert set(token.tolist()) == kept and 1 < len(kept) < 6, kept
    assert torch.allclose(freq, want, atol=0.01), (freq[:6], want[:6])
    assert torch.allclose(logp, torch.log(want)[token], atol=1e-5)
    # the whole softmax's log-probability less the log of the mass the cut kept
    whole = torch.log_softmax(logits[0] / T, -1)
    kept_mass = whole.exp()[sorted(kept)].sum()
    assert torch.allclose(logp, whole[token] - kept_mass.log(), atol=1e-5) and kept_mass < 1


def test_top_k_1_is_greedy_through_every_decoding_path(tiny_model, tiny_tokenizer, prompts):
    """top_k and min_p reach the sampler on each path: the lean step, continuous batching and generate
    (the reference) all give the greedy completions at temperature 1 with top_k 1 (or min_p 1)."""
    greedy = sample(tiny_model, tiny_tokenizer, prompts[:4], max_new_tokens=10).token_ids
    hot = dict(max_new_tokens=10, temperature=1.0)
    assert sample(tiny_model, tiny_tokenizer, prompts[:4], **hot, top_k=1).token_ids == greedy
    assert sample(tiny_model, tiny_tokenizer, prompts[:4], **hot, min_p=1.0, continuous=True).token_ids == greedy
    assert sample(tiny_model, tiny_tokenizer, prompts[:4], **hot, top_k=1, reference=True).token_ids == greedy
    assert sample(tiny_model, tiny_tokenizer, prompts[:4], **hot).token_ids != greedy  # temperature 1 alone does sample


def test_static_continuous_and_generate_agree_on_one_params_object(tiny_model, tiny_tokenizer, prompts):
    """One `SamplingParams` (2 samples a prompt, top-k 1: greedy, which generate allows with several
    samples only as a cut) handed to each path of the sampler: the static batches, continuous batching
    and the `model.generate` reference give the same completions."""
    params = SamplingParams(num_samples=2, max_new_tokens=14, temperature=1.0, top_k=1)
    ids = dict(eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id)
    static = Sampler(tiny_model, **ids, batch_size=3).sample(prompts, params)
    continuous = Sampler(tiny_model, **ids, batch_size=3, continuous=True).sample(prompts, params)
    reference = Sampler(tiny_model, **ids, reference=True).sample(prompts, params)
    assert static.prompt_index == continuous.prompt_index == reference.prompt_index == [i // 2 for i in range(16)]
    assert static.token_ids == continuous.token_ids == reference.token_ids
    assert static.truncated == continuous.truncated == reference.truncated
    assert reference.logprobs is None and len(static.logprobs) == len(continuous.logprobs) == 16


@pytest.mark.parametrize("field,value,message", [
    ("top_p", 1.5, "top_p must be in (0, 1] (1: no cut), got 1.5"),
    ("top_p", 0.0, "top_p must be in (0, 1] (1: no cut), got 0.0"),
    ("temperature", -0.1, "temperature must be >= 0 (0: greedy), got -0.1"),
    ("temperature", float("nan"), "temperature must be >= 0 (0: greedy), got nan"),
    ("min_p", 2, "min_p must be in [0, 1] (0: no cut), got 2"),
    ("top_k", -1, "top_k must be an integer >= 0, got -1"),
    ("top_k", 2.5, "top_k must be an integer >= 0, got 2.5"),
    ("num_samples", 0, "num_samples must be an integer >= 1, got 0"),
    ("max_new_tokens", True, "max_new_tokens must be an integer >= 1, got True"),
    ("ignore_eos", "yes", "ignore_eos must be True or False, got 'yes'"),
])
def test_bad_sampling_params_are_one_line_errors(field, value, message):
    with pytest.raises(ValueError) as error:
        SamplingParams(**{field: value})
    assert str(error.value) == message and "\n" not in str(error.value)
    assert SamplingParams(**{field: getattr(SamplingParams(), field)}) == SamplingParams()  # defaults pass


def test_bad_sampler_settings_and_calls_are_one_line_errors(tiny_model, tiny_tokenizer, prompts):
    ids = dict(eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id)
    with pytest.raises(ValueError, match=r"^batch_size must be an integer >= 1 or None, got 0$"):
        Sampler(tiny_model, **ids, batch_size=0)
    with pytest.raises(ValueError, match="^the model.generate reference runs no CUDA graphs"):
        Sampler(tiny_model, **ids, reference=True, cuda_graphs=True)
    with pytest.raises(TypeError, match="^params must be a SamplingParams, got dict$"):
        Sampler(tiny_model, **ids).sample(prompts, {"temperature": 0.7})
    reference = Sampler(tiny_model, **ids, reference=True)
    with pytest.raises(ValueError, match="^the model.generate reference stops at eos"):
        reference.sample(prompts, SamplingParams(max_new_tokens=4, ignore_eos=True))
    with pytest.raises(ValueError, match="^the model.generate reference takes no generator or stop_at"):
        reference.sample(prompts, SamplingParams(max_new_tokens=4), stop_at=[2] * len(prompts))


def test_sample_batches_prompts_and_restores_train_mode(tiny_model, tiny_tokenizer, prompts):
    tiny_model.train()
    whole = sample(tiny_model, tiny_tokenizer, prompts, max_new_tokens=8)
    chunked = sample(tiny_model, tiny_tokenizer, prompts, max_new_tokens=8, batch_size=3)
    assert chunked.token_ids == whole.token_ids and chunked.prompt_index == list(range(8))
    assert tiny_model.training


def test_lora_rollout_merges_the_adapter_into_the_fast_step(tiny_model, tiny_tokenizer, prompts):
    """The fast step runs LoRA models with the adapter merged into its own weight copies: output equals
    generate's through peft, differs from the bare model's, and the model's weights are left alone."""
    from models.lora import add_lora

    bare = sample(tiny_model, tiny_tokenizer, prompts[:4], max_new_tokens=12).token_ids
    peft_model = add_lora(tiny_model, r=4, alpha=8, dropout=0.0)
    torch.manual_seed(0)
    give_lora_b_weights(peft_model, 0.2)  # something to merge
    before = {k: v.clone() for k, v in peft_model.state_dict().items()}
    assert supports(peft_model)
    out = sample(peft_model, tiny_tokenizer, prompts[:4], max_new_tokens=12)
    assert out.token_ids == sample(peft_model, tiny_tokenizer, prompts[:4], max_new_tokens=12, reference=True).token_ids
    assert out.token_ids != bare
    assert all(torch.equal(v, peft_model.state_dict()[k]) for k, v in before.items())
    assert sample(peft_model, tiny_tokenizer, prompts[:4], fast=False, max_new_tokens=12).token_ids \
        == out.token_ids
    with peft_model.disable_adapter():  # the reference pass: adapter off, fast step follows
        assert sample(peft_model, tiny_tokenizer, prompts[:4], max_new_tokens=12).token_ids == bare


class _ReplayByCall:
    """CPU stand-in for a CUDA graph with the same contract: what `fn` closed over at capture is
    frozen, tensors are read again at each replay, and the output always lands in the one tensor
    the capture returned."""

    captures = 0

    def __init__(self, fn):
        self.fn, self.output = fn, fn()
        _ReplayByCall.captures += 1

    def replay(self):
        self.output.copy_(self.fn())


@pytest.fixture()
def graphs_on_cpu(monkeypatch):
    import sampling.cuda_graphs as cg

    _ReplayByCall.captures = 0
    monkeypatch.setattr(cg, "capture", lambda fn, pool: (_ReplayByCall(fn), pool))
    monkeypatch.setattr(cg, "BUCKET", 16)  # several widths in a short rollout
    return _ReplayByCall


def test_graphed_decode_step_matches_the_eager_step(tiny_model, tiny_tokenizer, prompts, graphs_on_cpu):
    """The graphed path (fixed input tensors, attention over a bucketed width with later slots masked,
    no dropped rows) samples what the eager step samples: greedy tokens equal with an early-stopping
    eos, sampled logprobs equal under the same seed."""
    args = dict(eos=_frequent_token(tiny_model, tiny_tokenizer, prompts), max_new_tokens=40)
    eager = sample(tiny_model, tiny_tokenizer, prompts, **args)
    graphed = sample(tiny_model, tiny_tokenizer, prompts, **args, cuda_graphs=True)
    assert graphed.token_ids == eager.token_ids and graphed.truncated == eager.truncated
    assert len({len(r) for r in eager.token_ids}) > 1  # rows stopped apart (eager dropped rows, graphed did not)
    assert graphs_on_cpu.captures >= 3  # one per width bucket reached

    sampled = dict(max_new_tokens=24, num_samples=4, temperature=0.7, ignore_eos=True)
    runs = []
    for graphs in (False, True):
        runs.append(sample(tiny_model, tiny_tokenizer, prompts[:3], **sampled, cuda_graphs=graphs,
                           generator=torch.Generator().manual_seed(3)))
    assert runs[1].token_ids == runs[0].token_ids
    for a, b in zip(runs[0].logprobs, runs[1].logprobs):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)


@pytest.mark.parametrize("graphs", [False, True])
def test_bf16_decode_of_an_fp32_model(tiny_model, tiny_tokenizer, prompts, monkeypatch, request, graphs):
    """What CUDA runs, on the CPU: fp32 weights (a full fine-tune's masters), the decode step and its KV
    cache in bf16, eager or graphed. Sampled logprobs stay within the CUDA test's tolerance of an fp32
    forward pass, and differ from it: the bf16 path did run."""
    import sampling.engine as engine

    if graphs:
        request.getfixturevalue("graphs_on_cpu")
    monkeypatch.setattr(engine, "decode_dtype", lambda model, device: torch.bfloat16)
    out = sample(tiny_model, tiny_tokenizer, prompts[:3], max_new_tokens=48, num_samples=4, temperature=0.7,
                 cuda_graphs=graphs, generator=torch.Generator().manual_seed(0))
    batch = pack([prompts[i] for i in out.prompt_index], out.token_ids, tiny_tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        want = token_logprobs(completion_logits(tiny_model, batch), batch.completion_ids, temperature=0.7)
    err = torch.cat([(torch.tensor(lp) - want[row, : len(lp)]).abs() for row, lp in enumerate(out.logprobs)])
    assert err.max() < 0.05 and err.mean() < 0.005  # seen: 0.0093 and 0.0015
    assert err.max() > 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (real graph capture)")
def test_cuda_graph_rollout_equals_eager_on_cuda(tiny_model, tiny_tokenizer, prompts, monkeypatch):
    """Real CUDA graphs: with one graph per width (bucket 1) the replayed kernels are the eager ones, so
    greedy output is identical; at the default bucket the sampled logprobs still match a forward pass."""
    import copy

    import sampling.cuda_graphs as cg

    model = copy.deepcopy(tiny_model).cuda()
    args = dict(max_new_tokens=64)
    # every row runs to the end, so eager never drops rows: same batch size, same kernels, same bf16 sums
    eager = sample(model, tiny_tokenizer, prompts, **args, ignore_eos=True)
    with monkeypatch.context() as m:
        m.setattr(cg, "BUCKET", 1)
        assert sample(model, tiny_tokenizer, prompts, **args, ignore_eos=True, cuda_graphs=True).token_ids \
            == eager.token_ids
    out = sample(model, tiny_tokenizer, prompts, max_new_tokens=200, cuda_graphs=True, temperature=0.7,
                 num_samples=2)
    batch = pack([prompts[i] for i in out.prompt_index], out.token_ids, tiny_tokenizer.pad_token_id, "cuda")
    with torch.no_grad():
        want = token_logprobs(completion_logits(model, batch), batch.completion_ids, temperature=0.7)
    for row, logps in enumerate(out.logprobs):  # bf16 decode against an fp32 forward
        assert torch.allclose(torch.tensor(logps), want[row, : len(logps)].cpu(), atol=0.1)


@pytest.mark.parametrize("graphs", [False, True])
def test_rollout_frees_its_decoder_when_it_returns(tiny_model, tiny_tokenizer, prompts, monkeypatch, request, graphs):
    """No reference cycle keeps a finished rollout's decoder (weight copies, KV cache, graphs) alive
    until Python's cyclic collector happens to run: with the collector off, it is gone on return."""
    import gc
    import weakref

    import sampling.engine as engine

    if graphs:
        request.getfixturevalue("graphs_on_cpu")
    made = []

    class Recorded(engine._FastDecoder):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            made.append(weakref.ref(self))

    monkeypatch.setattr(engine, "_FastDecoder", Recorded)
    gc.collect()
    gc.disable()
    try:
        sample(tiny_model, tiny_tokenizer, prompts[:3], max_new_tokens=20, cuda_graphs=graphs)
        assert len(made) == 1 and made[0]() is None
    finally:
        gc.enable()


def test_decode_graphs_are_kept_across_rollouts(tiny_model, tiny_tokenizer, prompts, graphs_on_cpu):
    """A graphed `Sampler` owns its decode state across rollouts and captures each width once: the
    second rollout replays the first one's graphs on the same tensors (same addresses), with the weights
    refreshed in place after a training update, and samples what an eager rollout of the updated model
    samples. A rollout that needs more cache slots rebuilds it, and still matches."""
    params = SamplingParams(max_new_tokens=40)
    sampler = Sampler(tiny_model, eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id,
                      cuda_graphs=True)
    eager = sampler.replace(cuda_graphs=False)
    assert eager.graphs is None and eager.eos_token_id == sampler.eos_token_id
    first = sampler.sample(prompts, params)
    captured = graphs_on_cpu.captures
    graphs = sampler.graphs
    state = graphs.state

    def addresses():
        return [t.data_ptr() for t in [*state.keys, *state.values, state.slot_mask, *state.weights.tensors()]]

    before = addresses()
    with torch.no_grad():  # an optimizer step, in place as AdamW does it
        torch.manual_seed(0)
        for p in tiny_model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    second = sampler.sample(prompts, params)
    assert sampler.graphs is graphs and graphs.state is state and addresses() == before and graphs.builds == 1
    assert graphs_on_cpu.captures == captured
    assert second.token_ids == eager.sample(prompts, params).token_ids != first.token_ids

    longer = [p + p for p in prompts]  # more slots than the state has: one rebuild
    third = sampler.sample(longer, params)
    assert graphs.builds == 2 and graphs.state.slots >= len(max(longer, key=len)) + 40
    assert third.token_ids == eager.sample(longer, params).token_ids
    sampler.release()
    assert graphs.state is None and sampler.sample(prompts[:2], params).token_ids  # rebuilt on the next call
    assert graphs.builds == 3


def test_cuda_graphs_are_the_cuda_default_and_on_off_cuda_is_one_line():
    from common.errors import UserError
    from sampling.cuda_graphs import use_cuda_graphs

    assert [use_cuda_graphs(c, "cuda:0") for c in ("auto", "on", "off")] == [True, True, False]
    assert [use_cuda_graphs(c, "cpu") for c in ("auto", "off")] == [False, False]
    with pytest.raises(UserError, match="--cuda_graphs on needs a CUDA device, not cpu"):
        use_cuda_graphs("on", "cpu")


def test_graphed_state_is_kept_through_backwards_only_once_a_longest_step_shows_it_fits(tiny_model, tiny_tokenizer,
                                                                                       prompts, graphs_on_cpu):
    """Freed before every backward until a step that reached the longest completion peaked low enough
    that the state fits beside it (FITS of the device); freed again once a step with it peaks above.
    A trainer drives it through the sampler; a sampler without graphs takes the same calls."""
    from sampling.cuda_graphs import FITS

    params = SamplingParams(max_new_tokens=8)
    sampler = Sampler(tiny_model, eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id,
                      cuda_graphs=True)
    graphs = sampler.graphs
    sampler.sample(prompts[:2], params)
    size = graphs.state_bytes
    state = graphs.state
    assert size == sum(t.nbytes for t in (*state.weights.tensors(), *state.keys, *state.values, state.slot_mask))
    sampler.before_backward()
    assert graphs.state is None and not graphs.keep  # the first step: nothing measured yet
    total = 100 * size
    sampler.measured(int(FITS * total) - size, total, longest=False)
    assert not graphs.keep  # fits, but shorter completions than allowed say nothing of the longest
    sampler.measured(int(FITS * total) - size + 1, total, longest=True)
    assert not graphs.keep  # one byte too many
    sampler.measured(int(FITS * total) - size, total, longest=True)
    assert graphs.keep
    sampler.sample(prompts[:2], params)
    sampler.before_backward()
    assert graphs.state is not None  # kept through this backward
    sampler.measured(int(FITS * total) + 1, total, longest=False)
    assert not graphs.keep  # a step with the state peaked above: freed from the next backward on
    sampler.before_backward()
    assert graphs.state is None
    plain = sampler.replace(cuda_graphs=False)
    plain.before_backward()
    plain.measured(0, 1, longest=True)
    plain.release()
    assert plain.graphs is None and plain.failed is None


def test_a_failed_capture_decodes_eagerly_with_one_warning(tiny_model, tiny_tokenizer, prompts, monkeypatch, capsys):
    """Graphs are the CUDA default, so a capture a GPU or torch build refuses must not end the run: the
    rollout goes on eagerly with the same samples, one warning says so, later rollouts do not try
    again, and a sampler derived from it (eval's) starts without graphs."""
    import sampling.cuda_graphs as cg

    attempts = []

    def refuse(fn, pool):
        attempts.append(1)
        raise RuntimeError("operation not permitted when stream is capturing\n(more lines)")

    monkeypatch.setattr(cg, "capture", refuse)
    params = SamplingParams(max_new_tokens=12)
    sampler = Sampler(tiny_model, eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id,
                      cuda_graphs=True)
    eager = sample(tiny_model, tiny_tokenizer, prompts, max_new_tokens=12)
    assert sampler.replace().graphs is not None  # graphs stay on while no capture failed
    for _ in range(2):
        assert sampler.sample(prompts, params).token_ids == eager.token_ids
    assert len(attempts) == 1 and sampler.failed.startswith("RuntimeError: operation not permitted")
    err = capsys.readouterr().err
    assert err.count("warning: CUDA graph capture failed") == 1 and err.count("\n") == 1
    assert sampler.replace(batch_size=2).graphs is None


def test_grpo_frees_the_graphed_state_before_each_backward(tmp_path, monkeypatch, graphs_on_cpu):
    """A GRPO run with graphs (stand-in captures on the CPU) keeps one sampler on the policy that frees
    its decode state before each backward and builds it again at the next rollout: two steps, two
    builds, nothing held at the end."""
    import grpo.trainer
    from grpo.trainer import GRPOConfig, train_grpo

    made = []

    class Recorded(Sampler):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            made.append(self)

    monkeypatch.setattr(grpo.trainer, "use_cuda_graphs", lambda choice, device: True)
    monkeypatch.setattr(grpo.trainer, "Sampler", Recorded)
    train_grpo(GRPOConfig(model_name="tiny", dataset="synthetic", grpo_output=str(tmp_path), max_steps=2,
                          prompts_per_step=2, num_generations=2, max_completion_length=8, device="cpu",
                          eval_every=0, show_progress=False, save_every=10))
    assert len(made) == 1 and made[0].graphs.builds == 2 and made[0].graphs.state is None


def _tensor_bytes(obj) -> int:
    """Bytes of the distinct storages among `obj`'s tensor attributes (and tensors in its lists, tuples and
    dataclasses)."""
    seen = {}
    stack = list(vars(obj).values())
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        elif hasattr(x, "__dataclass_fields__"):  # a layer's named weights
            stack.extend(vars(x).values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return sum(seen.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 8, 32, 33])
@pytest.mark.parametrize("out_features", [200, 9000])  # one piece of the transposing copy, or three
def test_the_decode_steps_cpu_product_is_x_times_w_transposed(rows, dtype, out_features):
    """The lean step's products on the CPU go as (w @ x.T).T up to FEW_ROWS rows (faster there), as
    x @ w.T above: the same values either way, handed on contiguous (the logits' row-wise sampling
    passes and views rely on it)."""
    from sampling.fast_decode import _linear

    x, w = torch.randn(rows, 96, dtype=dtype), torch.randn(out_features, 96, dtype=dtype)
    out = _linear(x, w, cuda_layout=False)
    assert out.is_contiguous() and out.shape == (rows, out_features) and out.dtype == dtype
    torch.testing.assert_close(out.float(), (x.float() @ w.float().T), atol=0.2 if dtype == torch.bfloat16 else 1e-4,
                               rtol=2e-2 if dtype == torch.bfloat16 else 1e-5)


def test_decode_weights_copy_a_tied_embedding_once(tiny_model):
    """bf16 decode weights of an fp32 model: one copy of each weight, the tied embedding serving as the
    output head too (Qwen3-0.6B: ~300 MB saved), q/k norms expanded to one [H + KV, D] weight a layer."""
    from sampling.fast_decode import DecodeWeights

    cfg = tiny_model.config
    assert tiny_model.lm_head.weight is tiny_model.model.embed_tokens.weight
    fast = DecodeWeights(tiny_model, torch.bfloat16)
    n_params = sum(p.numel() for p in tiny_model.parameters())  # counts the tied weight once
    norms = cfg.num_hidden_layers * cfg.head_dim * (cfg.num_attention_heads + cfg.num_key_value_heads - 2)
    rope = 4 * fast.inv_freq.numel() + fast.rope_swap.nbytes + fast.rope_sign.nbytes  # RoPE's frequencies, halves
    assert _tensor_bytes(fast) == 2 * (n_params + norms) + rope
    assert fast.lm_head.data_ptr() == fast.embed.data_ptr()


def test_cpu_decode_weights_in_the_models_dtype_are_the_models_own(tiny_model):
    """On the CPU, q/k/v and gate/up stay apart (no fused copy): in the model's dtype every weight the
    step reads is one of the model's own parameters, so a rollout copies no weights at all."""
    from sampling.fast_decode import DecodeWeights

    fast = DecodeWeights(tiny_model, torch.float32)
    assert not fast.cuda_layout
    params = {p.data_ptr() for p in tiny_model.parameters()}
    matrices = [fast.embed, fast.lm_head]
    for layer in fast.layers:
        assert len(layer.qkv) == 3 and len(layer.gate_up) == 2
        matrices += [*layer.qkv, layer.o, *layer.gate_up, layer.down]
    assert all(t.data_ptr() in params for t in matrices)


def test_prefill_leaves_no_autocast_weight_copies_behind(tiny_model, tiny_tokenizer, prompts):
    """Under the trainer's bf16 autocast (CUDA's policy, forced on the CPU) the prefill casts every fp32
    weight to bf16; autocast would keep those casts cached until the trainer's autocast ends, i.e. through
    the whole rollout. Counted with a dispatch mode that sees each weight cast: none is alive on return."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    class WeightCasts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.casts = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default and isinstance(args[0], torch.nn.Parameter):
                self.casts.append(weakref.ref(out))
            return out

    with torch.autocast("cpu", dtype=torch.bfloat16):
        with WeightCasts() as mode:
            sample(tiny_model, tiny_tokenizer, prompts[:2], max_new_tokens=4)
        held = sum(t.nbytes for t in (ref() for ref in mode.casts) if t is not None)
        assert mode.casts and held == 0  # today's code held every weight's bf16 cast (~1.7 MB on tiny)


def test_finished_rows_are_read_on_the_host_only_every_sync_every_steps(tiny_model, tiny_tokenizer, prompts,
                                                                        monkeypatch):
    """CUDA's default: the host looks at which rows finished every 8th step (each look is a device
    sync). Rows finishing in between decode on as padding: same completions as looking every step."""
    import sampling.engine as engine

    args = dict(eos=_frequent_token(tiny_model, tiny_tokenizer, prompts), max_new_tokens=30)
    every_step = sample(tiny_model, tiny_tokenizer, prompts, **args)
    reads = []
    real = engine._rows_alive
    monkeypatch.setattr(engine, "_rows_alive", lambda finished: reads.append(1) or real(finished))
    sparse = sample(tiny_model, tiny_tokenizer, prompts, **args, sync_every=8)
    assert sparse.token_ids == every_step.token_ids and sparse.truncated == every_step.truncated
    assert sparse.logprobs == every_step.logprobs
    assert len({len(r) for r in sparse.token_ids}) > 1
    assert 1 <= len(reads) <= 30 // 8


def test_the_cuda_layout_step_gives_the_cpu_layouts_logits(tiny_model):
    """The step as CUDA runs it (fused q/k/v and gate/up copies, plain products), forced on the CPU,
    computes the CPU layout's logits: the layout the op counts are taken on is the one that is tested."""
    from sampling.fast_decode import DecodeState

    g = torch.Generator().manual_seed(0)
    states = [DecodeState(tiny_model, torch.float32, 3, 12, torch.device("cpu"), cuda_layout=c) for c in (True, False)]
    assert [s.weights.cuda_layout for s in states] == [True, False]
    for s in states:
        s.slot_mask[:] = True  # every slot up to the step's may be attended
    for t in range(8):
        token, position = torch.randint(0, 500, (3,), generator=g), torch.full((3,), t)
        cuda, cpu = (s.step(token, position, torch.tensor([t]), t + 1) for s in states)
        torch.testing.assert_close(cuda, cpu, atol=1e-5, rtol=1e-5)
