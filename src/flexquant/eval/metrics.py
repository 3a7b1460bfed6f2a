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


def _logprobs(model, ids: torch.Tensor, device) -> torch.Tensor:
    out = model(input_ids=ids.to(device), use_cache=False)
    return F.log_softmax(out.logits[:, :-1].float(), dim=-1)  # [1, L-1, V]


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

    ``reference``: a model, or the list `reference_logprobs` returned for the same windows.
    """
    nll_sum, kl_sum, count = 0.0, 0.0, 0
    t0 = time.perf_counter()
    for i in tqdm(range(windows.shape[0]), desc="eval windows", disable=not progress):
        ids = windows[i:i + 1]
        lp = _logprobs(model, ids, device)
        target = ids[:, 1:].to(lp.device)
        nll_sum += float(-lp.gather(-1, target.unsqueeze(-1)).sum())
        if reference is not None:
            ref = reference[i].to(lp.device) if isinstance(reference, list) else _logprobs(reference, ids, device)
            kl_sum += float((ref.exp() * (ref - lp)).sum())
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
