"""Each sampling parameter changes what is sampled (each test fails if its parameter is ignored);
seeded draws depend only on the request's own generator; logprobs are the raw distribution."""

from __future__ import annotations

import torch

from ernie45.engine.sampler import Sampler, SeqSampling, make_generator
from ernie45.engine.sampling_params import SamplingParams
from ernie45.engine.sequence import Sequence

V = 50


class _State:
    def __init__(self, sampling: SeqSampling) -> None:
        self.sampling = sampling


def seq(params: SamplingParams, prompt=(1, 2, 3), output=(), stop_ids=(), index=0) -> Sequence:  # noqa: ANN001
    s = Sequence("r", list(prompt), params, index=index)
    s.token_ids.extend(output)
    s.state = _State(SeqSampling(make_generator(params.seed, index), list(stop_ids)))
    return s


def draws(params: SamplingParams, logits: torch.Tensor, n: int = 200, **kw) -> list[int]:
    s = seq(params, **kw)
    return [Sampler()(logits[None].clone(), [s])[0][0] for _ in range(n)]


def peaked(*values: float) -> torch.Tensor:
    """Logits for the first len(values) tokens, the rest far below."""
    x = torch.full((V,), -20.0)
    x[:len(values)] = torch.tensor(values)
    return x


def test_greedy_and_temperature():
    logits = peaked(1.0, 0.9, 0.8, 0.7)
    assert set(draws(SamplingParams(temperature=0), logits, 20)) == {0}
    assert set(draws(SamplingParams(temperature=1.0, seed=0), logits)) == {0, 1, 2, 3}
    assert set(draws(SamplingParams(temperature=0.01, seed=0), logits)) == {0}


def test_top_k():
    logits = peaked(1.0, 0.9, 0.8, 0.7, 0.6)
    assert set(draws(SamplingParams(top_k=2, seed=0), logits)) == {0, 1}
    assert set(draws(SamplingParams(top_k=-1, seed=0), logits)) == {0, 1, 2, 3, 4}


def test_top_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05] + [1e-9] * (V - 4)))
    assert set(draws(SamplingParams(top_p=0.7, seed=1), logits)) == {0, 1}
    assert set(draws(SamplingParams(top_p=0.85, seed=1), logits, 400)) == {0, 1, 2}


def test_min_p():
    logits = torch.log(torch.tensor([0.4, 0.3, 0.19, 0.11] + [1e-9] * (V - 4)))
    assert set(draws(SamplingParams(min_p=0.5, seed=2), logits)) == {0, 1}
    assert set(draws(SamplingParams(min_p=0.0, seed=2), logits)) == {0, 1, 2, 3}


def test_repetition_penalty_applies_to_prompt_and_output_tokens():
    logits = peaked(2.0, 1.5, 1.0)
    greedy = dict(temperature=0)
    assert draws(SamplingParams(**greedy, repetition_penalty=2.0), logits, 1, prompt=(0, 7)) == [1]
    assert draws(SamplingParams(**greedy, repetition_penalty=2.5), logits, 1, prompt=(7,), output=(0, 1)) == [2]
    assert draws(SamplingParams(**greedy), logits, 1, prompt=(0,)) == [0]
    # negative logits are multiplied (pushed further down)
    neg = peaked(-1.0, -1.2)
    assert draws(SamplingParams(**greedy, repetition_penalty=1.5), neg, 1, prompt=(0,)) == [1]


def test_presence_and_frequency_penalties_count_output_tokens_only():
    logits = peaked(2.0, 1.5)
    g = dict(temperature=0)
    assert draws(SamplingParams(**g, presence_penalty=1.0), logits, 1, output=(0,)) == [1]
    assert draws(SamplingParams(**g, presence_penalty=1.0), logits, 1, prompt=(0,)) == [0]
    assert draws(SamplingParams(**g, frequency_penalty=0.3), logits, 1, output=(0,)) == [0]      # 2.0-0.3 > 1.5
    assert draws(SamplingParams(**g, frequency_penalty=0.3), logits, 1, output=(0, 0)) == [1]    # 2.0-0.6 < 1.5


def test_min_tokens_suppresses_stop_ids():
    logits = peaked(3.0, 1.0)
    p = SamplingParams(temperature=0, min_tokens=2, max_tokens=5)
    assert draws(p, logits, 1, output=(5,), stop_ids=(0,)) == [1]
    assert draws(p, logits, 1, output=(5, 5), stop_ids=(0,)) == [0]


def test_seeded_rows_do_not_depend_on_the_rest_of_the_batch():
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(0))
    p = SamplingParams(temperature=1.0, seed=123)
    alone = [Sampler()(logits[:1].clone(), [s])[0][0] for s in [seq(p)] for _ in range(30)]
    a = seq(p)
    others = [seq(SamplingParams(temperature=1.0)), seq(SamplingParams(temperature=0.7, seed=5)),
              seq(SamplingParams(temperature=0))]
    batched = [Sampler()(logits.clone(), [a] + others)[0][0] for _ in range(30)]
    assert alone == batched and len(set(alone)) > 3
    other_seed = [Sampler()(logits[:1].clone(), [s])[0][0]
                  for s in [seq(SamplingParams(temperature=1.0, seed=124))] for _ in range(30)]
    assert other_seed != alone


def test_logprobs_are_raw_and_topk_sized():
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(1))
    s1 = seq(SamplingParams(temperature=0, logprobs=3, repetition_penalty=1.5), prompt=(int(logits[0].argmax()),))
    s2 = seq(SamplingParams(temperature=0, logprobs=0))
    tokens, lps = Sampler()(logits.clone(), [s1, s2])
    raw = logits.log_softmax(-1)
    top3 = raw[0].topk(3).indices.tolist()
    assert tokens[0] != top3[0]                  # the penalty changed the choice...
    assert set(lps[0]) == set(top3) | {tokens[0]}   # ...but logprobs stay the raw distribution
    assert all(abs(lps[0][t] - raw[0, t].item()) < 1e-6 for t in lps[0])
    assert lps[1] == {tokens[1]: raw[1, tokens[1]].item()}
