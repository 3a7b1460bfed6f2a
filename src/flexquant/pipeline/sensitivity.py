"""Output sensitivity of every linear: the diagonal Fisher of the model loss w.r.t. its outputs.

f_i = mean over calibration tokens of (∂L/∂y_i)² for output channel i of a linear, L the next-token
negative log-likelihood summed over tokens. With the input Hessian H = 2XXᵀ/T, a weight change ΔW
changes the loss by about (T/4)·Σ_i f_i·ΔW_i H ΔW_iᵀ (second order, Fisher ≈ Gauss–Newton, output
channels taken as independent): the same units in every layer, so the errors of different layers
can be traded against each other (SBGBS).

Run block by block, like the rest of the pipeline: a forward pass stores each block's inputs, the
loss gradient at the last block's output comes from the final norm and the head, and the gradient
walks back one block at a time (only that block on the device).

`block_probe_kl` measures instead of predicting: the KL to the float model when only one block's linears are
replaced, for every block, in one streamed pass over the blocks (FlexibleLLM's ``--probe block``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..models.spec import ModelSpec
from ..models.stream import residency
from .capture import BlockInputs, capture_block_inputs, run_block
from .distributed import SINGLE, Dist
from .hooks import swapped_weights


def _output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


# Positions whose logits (and log-softmax, and their gradients) exist at once in the head's gradient: this many
# bytes of float32 logits (a 49152 vocabulary: 170 positions; 262144: 32), not a whole window's.
HEAD_CHUNK_BYTES = 32 * 2**20


@torch.no_grad()
def _head_gradients(model: nn.Module, spec: ModelSpec, hidden: list[torch.Tensor], ids: list[torch.Tensor],
                    device: torch.device) -> list[torch.Tensor]:
    """∂(summed next-token NLL)/∂(last block output) per batch.

    One window and a chunk of its positions at a time: the norm, head and loss act on each position alone, so
    a position's gradient needs only its own logits (a whole window's, with their log-softmax and gradients, were
    the largest tensors of a FlexibleLLM run: 3 × 96 MiB for 512 tokens of a 49152 vocabulary)."""
    grads = []
    with residency(model, spec).ends(device, (spec.final_norm, spec.lm_head)):
        head = model.get_submodule(spec.lm_head)
        step = max(1, HEAD_CHUNK_BYTES // (4 * head.out_features))
        for hb, yb in zip(hidden, ids):
            g = torch.zeros(hb.shape, dtype=head.weight.dtype)
            for w in range(hb.shape[0]):
                last = hb.shape[1] - 1  # (the last position predicts nothing: its gradient stays 0)
                for a in range(0, last, step):
                    b = min(a + step, last)
                    with torch.enable_grad():
                        # in the head's dtype (a half-precision model on a GPU computes in it), logits in float32
                        h = hb[w:w + 1, a:b].to(head.weight.device, head.weight.dtype).requires_grad_(True)
                        logits = spec.head_logits(model, h)  # the family's logit transforms
                        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                               yb[w, a + 1:b + 1].to(device), reduction="sum")
                        (gc,) = torch.autograd.grad(loss, h)
                    g[w:w + 1, a:b] = gc.to("cpu")
                    del logits, loss, gc
            grads.append(g)
    return grads


def _square_grad_tap(acc: torch.Tensor):
    """A forward hook that adds Σ_tokens (∂L/∂y)² of the module's output into ``acc`` during backward."""

    def on_grad(g: torch.Tensor) -> None:
        acc.add_(g.detach().float().pow(2).reshape(-1, g.shape[-1]).sum(0))

    def hook(_module, _args, out):
        out.register_hook(on_grad)

    return hook


def output_fisher(model: nn.Module, spec: ModelSpec, block_inputs: list[BlockInputs], last_output: list[torch.Tensor],
                  input_ids: torch.Tensor, device: torch.device, progress: bool = True,
                  dist: Dist = SINGLE) -> dict[str, torch.Tensor]:
    """{linear path: f [out_features]} from the stored inputs of every block and the last block's output.

    ``block_inputs[i]`` are block i's inputs (batches of ``input_ids``, in order); ``last_output`` the
    last block's outputs for the same batches. With ``dist``, this rank's batches; the sums are all ranks'.
    """
    layers = model.get_submodule(spec.layers)
    sizes = [h.shape[0] for h in block_inputs[0].hidden]
    ids = list(torch.split(input_ids, sizes)) if sizes else []  # a rank may hold none of the batches
    tokens = int(dist.all_sum(sum(int(i.numel()) for i in ids)))
    grad = _head_gradients(model, spec, last_output, ids, device)
    fisher: dict[str, torch.Tensor] = {}
    for i in tqdm(reversed(range(len(layers))), total=len(layers), desc="output sensitivity", disable=not progress):
        inputs = block_inputs[i]
        acc = {name: dist.batch_terms(torch.zeros(layers[i].get_submodule(name).out_features, device=device))
               for name in spec.linears_in(layers[i])}
        with residency(model, spec).block(i, device) as block:
            params = [p.requires_grad for p in block.parameters()]
            for p in block.parameters():
                p.requires_grad_(False)
            handles = [block.get_submodule(n).register_forward_hook(_square_grad_tap(acc[n])) for n in acc]
            try:
                new_grad = []
                for h, kw, g in zip(inputs.hidden, inputs.kwargs, grad):
                    with torch.enable_grad():
                        h = h.to(device).requires_grad_(True)
                        out = _output(block(h, **kw))
                        (gh,) = torch.autograd.grad(out, h, grad_outputs=g.to(device, out.dtype))
                    new_grad.append(gh.to("cpu"))
                grad = new_grad
            finally:
                for hd in handles:
                    hd.remove()
                for p, r in zip(block.parameters(), params):
                    p.requires_grad_(r)
        for name in acc:
            fisher[f"{spec.layers}.{i}.{name}"] = (dist.sum_batches(acc[name]) / tokens).cpu()
    return fisher


@torch.no_grad()
def block_probe_kl(model: nn.Module, spec: ModelSpec, input_ids: torch.Tensor, device: torch.device,
                   replaced: Callable[[int, nn.Module], list[dict[str, torch.Tensor]]], batch_size: int = 8,
                   progress: bool = True, rows: int = 128) -> list[list[float]]:
    """For every block i and every change ``replaced(i, block)`` lists (new weights by block-relative linear
    name): KL(float model ‖ the model with only that change), per token, on ``input_ids``.

    One pass over the blocks (each read once when the model is streamed) carries the float stream and one stream
    per change, which runs its changed block and then the float blocks after it; the head then scores every
    stream against the float one, ``rows`` positions at a time (a large vocabulary's log-probabilities are never
    held whole).
    """
    res, layers = residency(model, spec), model.get_submodule(spec.layers)
    with res.ends(device, (spec.embed,)):
        fp = capture_block_inputs(model, spec, input_ids, device, batch_size)
    probes: list[list[torch.Tensor]] = []
    counts = []
    for i in tqdm(range(len(layers)), desc="block probes", disable=not progress):
        inputs = fp.for_block(i)
        with res.block(i, device) as block:
            probes = [run_block(block, inputs.with_hidden(h), device) for h in probes]
            changes = replaced(i, block)
            counts.append(len(changes))
            for new in changes:
                with swapped_weights(block, new):
                    probes.append(run_block(block, inputs, device))
            fp = inputs.with_hidden(run_block(block, inputs, device))
    kl = [0.0] * len(probes)
    with res.ends(device, (spec.final_norm, spec.lm_head)):

        def logprobs(h):
            return F.log_softmax(spec.head_logits(model, h), -1)

        for b, h in enumerate(fp.hidden):
            for s in range(0, h.shape[1], rows):
                ref = logprobs(h[:, s:s + rows])
                p = ref.exp()
                for k, probe in enumerate(probes):
                    kl[k] += float((p * (ref - logprobs(probe[b][:, s:s + rows]))).sum())
    per_token = iter([v / input_ids.numel() for v in kl])
    return [[next(per_token) for _ in range(c)] for c in counts]
