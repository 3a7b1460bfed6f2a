"""llama.cpp as the judge of a GGUF file: its logits and its perplexity on flexquant's windows, through the
``llama_cpp`` binding (``pip install llama-cpp-python``, or ``bash bench/llama_env.sh`` for a build whose tools
and binding are the same llama.cpp). Token ids go in as they are (no BOS added, no re-tokenization), so the
numbers are comparable with `evaluate_windows` on the same windows.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import FlexQuantError

ROWS = 128  # positions whose log-probabilities are computed at once


def open_gguf(path: str | Path, n_ctx: int, threads: int | None = None):
    """A llama.cpp context over ``path`` that keeps the logits of every position."""
    try:
        from llama_cpp import Llama
    except ImportError as e:
        raise FlexQuantError("llama.cpp's Python binding is not installed: pip install llama-cpp-python (or bash "
                             "bench/llama_env.sh, then run with .venv-llama/bin/python)") from e
    path = Path(path)
    if not path.is_file():
        raise FlexQuantError(f"{path} is not a file; pass a .gguf file")
    threads = threads or len(os.sched_getaffinity(0))
    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(n_ctx, 512), logits_all=True,
                 n_threads=threads, n_threads_batch=threads, verbose=False)


def llama_logits(path: str | Path, ids: list[int], threads: int | None = None, llm=None) -> np.ndarray:
    """float32 [len(ids), vocab]: llama.cpp's logits for ``ids`` from the start of a fresh context."""
    llm = llm or open_gguf(path, len(ids), threads)
    llm.reset()
    llm.eval(list(map(int, ids)))
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def gguf_perplexity(path: str | Path, windows: torch.Tensor, threads: int | None = None,
                    progress: bool = True) -> dict:
    """Perplexity of the GGUF ``path`` as llama.cpp computes its logits, on ``windows`` [w, L] (the formula of
    `evaluate_windows`: every next token of every window)."""
    llm = open_gguf(path, int(windows.shape[1]), threads)
    nll, count, t0 = 0.0, 0, time.perf_counter()
    for row in tqdm(windows.tolist(), desc="llama.cpp windows", disable=not progress):
        logits = torch.from_numpy(llama_logits(path, row, llm=llm))[:-1]
        target = torch.tensor(row[1:])
        for lg, tg in zip(logits.split(ROWS), target.split(ROWS)):  # float64 a few rows at a time: a 262k
            lp = torch.log_softmax(lg.double(), -1)                   # vocabulary is 2 GB a window in float64
            nll += float(-lp.gather(-1, tg.unsqueeze(-1)).sum())
        count += target.numel()
        del logits
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "windows": int(windows.shape[0]),
            "seqlen": int(windows.shape[1]), "tokens": count, "eval_seconds": time.perf_counter() - t0}
