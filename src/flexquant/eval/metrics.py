"""Perplexity and KL divergence over the same non-overlapping windows, for any number of models.

Perplexity = exp(mean NLL of tokens 1..L-1 of each window given the tokens before it).
KL = mean over the same positions of KL(P_ref ‖ P_model) of the next-token distributions.
The reference's log-probabilities are computed window by window and never all held at once.
"""

from __future__ import annotations

import math
import resource
import sys
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def peak_device_mb() -> float | None:
    """Peak memory the CUDA caching allocator handed out in this process (all devices), in MiB; None
    without CUDA. Read beside `peak_rss_mb` in the report: a CUDA run's host and device peaks differ."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) / 2**20


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB.

    Linux's VmHWM is the high-water mark of this process's own address space. ``ru_maxrss`` is not used
    where VmHWM exists: it survives fork + exec, so a subprocess started by a big parent reports the
    parent's peak (the benchmark's jobs all showed the parent's 5.8 GB before this was fixed).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / (1024 if sys.platform == "darwin" else 1)


CHUNK = 256  # positions whose logits and log-softmax are taken at once (a 262k vocabulary: 256 MiB per chunk)
CHECK = 16  # positions on which the chunked head is checked against the model's own forward


def _head_split(model):
    """(body, head, logit transform) when the model's logits are ``transform(head(body(ids)))`` — so that the
    head runs `CHUNK` positions at a time and the whole [L, vocab] logits never exist (a 262k vocabulary:
    2 GB per 2048-token window, beside the reference's) — else None."""
    body, head = getattr(model, "base_model", model), None
    if body is not model and hasattr(model, "get_output_embeddings"):
        head = model.get_output_embeddings()
    if head is None or not callable(head):
        return None
    from ..models.spec import find_spec

    config = model.config
    spec = find_spec(config.model_type)
    return body, head, (lambda out: spec.logits(config, out)) if spec is not None else (lambda out: out)


class _Logits:
    """A model's next-token logits over a window, `CHUNK` positions at a time. The chunked head is used once it
    matches the model's own forward on the first `CHECK` positions (a family with a logit transform flexquant
    does not know falls back to the whole forward)."""

    def __init__(self, model, device):
        self.model, self.device = model, device
        self.split = _head_split(model)
        self.checked = self.split is None

    @torch.no_grad()
    def window(self, ids: torch.Tensor):
        """Chunks [≤ CHUNK, vocab] of the logits of positions 0..L-2 (float32) of ``ids`` [1, L]."""
        ids = ids.to(self.device)
        if not self.checked:
            self.checked = True
            n = min(CHECK, ids.shape[1] - 1)
            whole = _logits(self.model, ids[:, :n + 1], self.device).float()
            try:
                part = self._head(self._body(ids[:, :n + 1]))[:n]
            except (TypeError, AttributeError):  # a body without these arguments or outputs: the whole forward
                part = None
            scale = float(whole.abs().max()) if bool(torch.isfinite(whole).all()) else 0.0
            if part is None or not scale or not torch.allclose(part, whole, rtol=1e-4, atol=1e-4 * scale):
                self.split = None  # (non-finite logits: the whole forward, and the caller's own error)
        if self.split is None:
            logits = _logits(self.model, ids, self.device)
            for s in range(0, logits.shape[0], CHUNK):
                yield logits[s:s + CHUNK].float()
            return
        h = self._body(ids)[:-1]
        for s in range(0, h.shape[0], CHUNK):
            yield self._head(h[s:s + CHUNK])

    def _body(self, ids: torch.Tensor) -> torch.Tensor:
        return self.split[0](input_ids=ids, use_cache=False).last_hidden_state[0]

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        return self.split[2](self.split[1](h)).float()


def _logits(model, ids: torch.Tensor, device) -> torch.Tensor:
    return model(input_ids=ids.to(device), use_cache=False).logits[0, :-1]  # [L-1, V], the model's dtype


@torch.no_grad()
def reference_logprobs(model, windows: torch.Tensor, device="cpu", progress: bool = True) -> list[torch.Tensor]:
    """The reference's next-token log-probabilities per window, to reuse across many evaluated models
    (float32 on CPU: windows × (L-1) × vocab × 4 bytes)."""
    logits = _Logits(model, device)
    return [torch.cat([F.log_softmax(c, dim=-1).cpu() for c in logits.window(windows[i:i + 1])])[None]
            for i in tqdm(range(windows.shape[0]), desc="reference", disable=not progress)]


@torch.no_grad()
def evaluate_windows(model, windows: torch.Tensor, reference=None, device="cpu",
                     progress: bool = True) -> dict:
    """Perplexity (and KL to ``reference`` when given) of ``model`` on ``windows`` [w, L].

    ``reference``: a model, or the list `reference_logprobs` returned for the same windows. Logits, log-softmax
    and KL are taken `CHUNK` positions at a time (`_Logits`): beyond the two models a window needs their hidden
    states and a few chunks.
    """
    nll_sum, kl_sum, count = 0.0, 0.0, 0
    t0 = time.perf_counter()
    logits = _Logits(model, device)
    ref_logits = _Logits(reference, device) if reference is not None and not isinstance(reference, list) else None
    for i in tqdm(range(windows.shape[0]), desc="eval windows", disable=not progress):
        ids = windows[i:i + 1]
        target = ids[0, 1:]
        refs = (iter(()) if reference is None else ref_logits.window(ids) if ref_logits is not None
                else (reference[i][0][s:s + CHUNK] for s in range(0, target.numel(), CHUNK)))
        pos = 0
        for chunk in logits.window(ids):
            lp = F.log_softmax(chunk, dim=-1)
            nll_sum += float(-lp.gather(-1, target[pos:pos + lp.shape[0], None].to(lp.device)).sum())
            if reference is not None:
                r = next(refs).to(lp.device)
                r = r if ref_logits is None else F.log_softmax(r, dim=-1)
                kl_sum += float((r.exp() * (r - lp)).sum())
            pos += lp.shape[0]
        count += target.numel()
    res = {
        "perplexity": math.exp(nll_sum / count),
        "nll": nll_sum / count,
        "windows": int(windows.shape[0]),
        "seqlen": int(windows.shape[1]),
        "tokens": count,
        "eval_seconds": time.perf_counter() - t0,
    }
    if reference is not None:
        res["kl_divergence"] = kl_sum / count
    return res
