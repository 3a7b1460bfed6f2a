"""The block-by-block output Fisher equals the one autograd computes on the whole model."""

import pytest
import torch
import torch.nn.functional as F

from flexquant.models import get_spec
from flexquant.pipeline import capture_block_inputs, run_block
from flexquant.pipeline.sensitivity import output_fisher


def test_blockwise_fisher_matches_whole_model_autograd(tiny):
    model, _ = tiny
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


def test_block_probes_equal_the_whole_model_with_one_block_replaced(tiny):
    """One streamed sweep gives, for every block, the KL of the model with only that block's linears changed."""
    from flexquant.pipeline.sensitivity import block_probe_kl

    model, _ = tiny
    spec = get_spec(model.config.model_type)
    ids = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(4))
    noise = {}

    def replaced(i, block):  # a fixed perturbation of every linear of block i
        g = torch.Generator().manual_seed(i)
        new = {}
        for n in spec.linears_in(block):
            w = block.get_submodule(n).weight.data
            new[n] = noise.setdefault((i, n), w + 0.05 * w.std() * torch.randn(w.shape, generator=g))
        return new

    got = block_probe_kl(model, spec, ids, torch.device("cpu"), replaced, batch_size=2, progress=False, rows=7)
    layers = model.get_submodule(spec.layers)
    assert len(got) == len(layers)
    with torch.no_grad():
        ref = F.log_softmax(model(ids).logits.float(), -1)
        for i, block in enumerate(layers):
            own = {n: block.get_submodule(n).weight.data for n in spec.linears_in(block)}
            for n in own:
                block.get_submodule(n).weight.data = noise[(i, n)]
            lp = F.log_softmax(model(ids).logits.float(), -1)
            for n, w in own.items():
                block.get_submodule(n).weight.data = w
            want = float((ref.exp() * (ref - lp)).sum() / ids.numel())
            assert want > 1e-6 and got[i] == pytest.approx(want, rel=1e-4)
    # the model's own weights are back: nothing replaced means nothing measured
    zero = block_probe_kl(model, spec, ids, torch.device("cpu"), lambda i, b: {}, batch_size=2, progress=False)
    assert max(abs(v) for v in zero) < 1e-9
