"""The block-by-block output Fisher equals the one autograd computes on the whole model."""

import pytest
import torch
import torch.nn.functional as F

from flexquant.models import get_spec
from flexquant.pipeline import capture_block_inputs, run_block
from flexquant.pipeline.sensitivity import output_fisher


@pytest.mark.parametrize("chunk", ["window", "7 positions"])
def test_blockwise_fisher_matches_whole_model_autograd(tiny, chunk, monkeypatch):
    from flexquant.pipeline import sensitivity

    model, _ = tiny
    if chunk != "window":  # the head's gradient a few positions at a time (32 = 4 chunks of 7 + 3 + the last)
        monkeypatch.setattr(sensitivity, "HEAD_CHUNK_BYTES", 7 * 4 * model.config.vocab_size)
    spec = get_spec(model.config.model_type)
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(3))
    device = torch.device("cpu")
    inputs = capture_block_inputs(model, spec, ids, device, batch_size=2)
    stored = []
    for block in model.model.layers:
        stored.append(inputs)
        inputs = inputs.with_hidden(run_block(block, inputs, device))
    got = output_fisher(model, spec, stored, inputs.hidden, ids, device, progress=False)

    # Reference: per-batch whole-model backward with hooks on every linear output.
    want = {n: torch.zeros(model.get_submodule(n).out_features) for n in got}
    outs = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: outs.__setitem__(n, o)) for n in got]
    try:
        for batch in ids.split(2):
            logits = model(batch).logits[:, :-1]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
            grads = torch.autograd.grad(loss, [outs[n] for n in got])
            for n, g in zip(got, grads):
                want[n] += g.pow(2).reshape(-1, g.shape[-1]).sum(0)
    finally:
        for h in hooks:
            h.remove()
    for n in got:
        torch.testing.assert_close(got[n], want[n] / ids.numel(), rtol=1e-4, atol=1e-10)
        assert got[n].gt(0).all()


def test_block_probes_equal_the_whole_model_with_one_block_changed(tiny):
    """One streamed sweep gives, for every block and every change of it, the KL of the model with only that
    change."""
    from flexquant.pipeline.sensitivity import block_probe_kl

    model, _ = tiny
    spec = get_spec(model.config.model_type)
    ids = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(4))
    changes = {}

    def replaced(i, block):  # every linear of block i perturbed; then its first linear alone
        g = torch.Generator().manual_seed(i)
        new = {}
        for n in spec.linears_in(block):
            w = block.get_submodule(n).weight.data
            new[n] = w + 0.1 * w.std() * torch.randn(w.shape, generator=g)
        first = next(iter(new))
        return changes.setdefault(i, [new, {first: new[first]}])

    got = block_probe_kl(model, spec, ids, torch.device("cpu"), replaced, batch_size=2, progress=False, rows=7)
    layers = model.get_submodule(spec.layers)
    assert [len(g) for g in got] == [2] * len(layers)
    with torch.no_grad():
        ref = F.log_softmax(model(ids).logits.float(), -1)
        for i, block in enumerate(layers):
            for k, change in enumerate(changes[i]):
                own = {n: block.get_submodule(n).weight.data for n in change}
                for n, w in change.items():
                    block.get_submodule(n).weight.data = w
                lp = F.log_softmax(model(ids).logits.float(), -1)
                for n, w in own.items():
                    block.get_submodule(n).weight.data = w
                want = float((ref.exp() * (ref - lp)).sum() / ids.numel())
                assert want > 1e-6 and got[i][k] == pytest.approx(want, rel=2e-3)  # float32 sums
    # the model's own weights are back: an empty change measures nothing
    zero = block_probe_kl(model, spec, ids, torch.device("cpu"), lambda i, b: [{}], batch_size=2, progress=False)
    assert max(abs(v[0]) for v in zero) < 1e-9
