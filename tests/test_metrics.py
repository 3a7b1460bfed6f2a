"""Perplexity and KL over windows, taken a chunk of positions at a time, equal the whole-window formulas."""

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from flexquant.eval import evaluate_windows, metrics, reference_logprobs
from flexquant.models.builtin import tiny_llama


@pytest.mark.parametrize("chunk", [5, 256])
@pytest.mark.parametrize("as_list", [False, True])
def test_chunked_perplexity_and_kl_equal_the_formulas(monkeypatch, chunk, as_list):
    monkeypatch.setattr(metrics, "CHUNK", chunk)  # 5: many chunks and a ragged last one per window
    ref_model = tiny_llama(seed=0)[0].eval()
    model = copy.deepcopy(ref_model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    windows = torch.randint(0, 256, (3, 33), generator=torch.Generator().manual_seed(1))
    reference = reference_logprobs(ref_model, windows, progress=False) if as_list else ref_model
    res = evaluate_windows(model, windows, reference, progress=False)
    with torch.no_grad():
        lp = F.log_softmax(model(windows).logits[:, :-1].float(), -1)
        rp = F.log_softmax(ref_model(windows).logits[:, :-1].float(), -1)
    nll = -lp.gather(-1, windows[:, 1:, None]).mean()
    kl = (rp.exp() * (rp - lp)).sum(-1).mean()
    assert res["tokens"] == 3 * 32
    assert res["perplexity"] == pytest.approx(math.exp(float(nll)), rel=1e-5)
    assert res["kl_divergence"] == pytest.approx(float(kl), rel=1e-4) and res["kl_divergence"] > 1e-4


def _whole(model, windows):
    with torch.no_grad():
        lp = F.log_softmax(model(windows).logits[:, :-1].float(), -1)
    return math.exp(float(-lp.gather(-1, windows[:, 1:, None]).mean()))


@pytest.mark.parametrize("family", ["granite", "gemma2"])
def test_chunked_head_applies_the_family_logit_transform(monkeypatch, family):
    """Granite divides the head's output, Gemma 2 soft-caps it: the chunked head gives the model's own logits,
    and the whole [L, vocab] logits are computed only on the `CHECK` positions of the first window."""
    from test_families import tiny_model

    monkeypatch.setattr(metrics, "CHUNK", 7)
    model = tiny_model(family)
    windows = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(2))
    lengths = []
    model.register_forward_pre_hook(lambda m, a, kw: lengths.append((a or (kw["input_ids"],))[0].shape[1]),
                                    with_kwargs=True)
    res = evaluate_windows(model, windows, progress=False)
    lengths_chunked = list(lengths)
    assert res["perplexity"] == pytest.approx(_whole(model, windows), rel=1e-5)
    assert lengths_chunked == [metrics.CHECK + 1]  # the check; every window's logits came from the chunked head


def test_unknown_logit_transform_falls_back_to_the_whole_forward(monkeypatch):
    """A model whose forward changes the head's output in a way flexquant does not know is evaluated through its
    own forward (the check on the first positions fails), not through a wrong chunked head."""
    model = tiny_llama(seed=0)[0].eval()
    forward = model.forward

    def scaled(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits * 3.0
        return out

    monkeypatch.setattr(model, "forward", scaled)
    windows = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(3))
    res = evaluate_windows(model, windows, progress=False)
    assert res["perplexity"] == pytest.approx(_whole(model, windows), rel=1e-5)
    assert metrics._Logits(model, "cpu").split is not None  # the split exists; the check rejected it


def test_body_without_hidden_states_falls_back_to_the_whole_forward(monkeypatch):
    """A model whose body does not return ``last_hidden_state`` (here: a plain tuple) is evaluated through its own
    forward, not stopped by the chunked head's check."""
    model = tiny_llama(seed=0)[0].eval()
    body_forward = model.model.forward

    def tuple_body(*args, **kwargs):
        return tuple(body_forward(*args, **kwargs).values())

    def forward(input_ids, use_cache=False):  # the model's own forward still works
        hidden = body_forward(input_ids=input_ids, use_cache=use_cache).last_hidden_state
        return SimpleNamespace(logits=model.lm_head(hidden))

    monkeypatch.setattr(model.model, "forward", tuple_body)
    monkeypatch.setattr(model, "forward", forward)
    windows = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(4))
    logits = metrics._Logits(model, "cpu")
    assert torch.cat(list(logits.window(windows[:1]))).shape == (32, model.config.vocab_size)
    assert logits.split is None  # the chunked head was tried, failed on the body's output, and was dropped
    res = evaluate_windows(model, windows, progress=False)
    assert res["perplexity"] == pytest.approx(_whole(model, windows), rel=1e-5)
