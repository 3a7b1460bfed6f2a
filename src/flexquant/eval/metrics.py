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


CHUNK = 256  # positions whose log-softmax is taken at once (a 262k vocabulary: 256 MiB per float32 chunk)


def _logits(model, ids: torch.Tensor, device) -> torch.Tensor:
    return model(input_ids=ids.to(device), use_cache=False).logits[0, :-1]  # [L-1, V], the model's dtype


def _logprobs(model, ids: torch.Tensor, device) -> torch.Tensor:
    return F.log_softmax(_logits(model, ids, device).float(), dim=-1)[None]  # [1, L-1, V]


@torch.no_grad()
def reference_logprobs(model, windows: torch.Tensor, device="cpu", progress: bool = True) -> list[torch.Tensor]:
    """The reference's next-token log-probabilities per window, to reuse across many evaluated models
    (float32 on CPU: windows × (L-1) × vocab × 4 bytes)."""
    return [_logprobs(model, windows[i:i + 1], device).cpu()
            for i in tqdm(range(windows.shape[0]), desc="reference", disable=not progress)]


@torch.no_grad()
def evaluate_windows(model, windows: torch.Tensor, reference=None, device="cpu",
                     progress: bool = True) -> dict:
    """Perplexity (and KL to ``reference`` when given) of ``model`` on ``windows`` [w, L].

    ``reference``: a model, or the list `reference_logprobs` returned for the same windows. Log-softmax and KL
    are taken `CHUNK` positions at a time, so beyond the two models' logits a window needs only a few chunks.
    """
    nll_sum, kl_sum, count = 0.0, 0.0, 0
    t0 = time.perf_counter()
    for i in tqdm(range(windows.shape[0]), desc="eval windows", disable=not progress):
        ids = windows[i:i + 1]
        logits = _logits(model, ids, device)
        target = ids[0, 1:].to(logits.device)
        ref = None if reference is None else (reference[i][0] if isinstance(reference, list)
                                              else _logits(reference, ids, device))
        for s in range(0, target.numel(), CHUNK):
            lp = F.log_softmax(logits[s:s + CHUNK].float(), dim=-1)
            nll_sum += float(-lp.gather(-1, target[s:s + CHUNK, None]).sum())
            if ref is not None:
                r = ref[s:s + CHUNK].to(lp.device)
                r = r if isinstance(reference, list) else F.log_softmax(r.float(), dim=-1)
                kl_sum += float((r.exp() * (r - lp)).sum())
        count += target.numel()
        del logits, ref
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
