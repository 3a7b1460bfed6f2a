"""Perplexity and KL over windows, taken a chunk of positions at a time, equal the whole-window formulas."""

import copy
import math

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
