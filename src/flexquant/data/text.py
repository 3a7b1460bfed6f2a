"""Text sources (embedded pydoc corpus, local files/folders, WikiText-2 / C4) and token windows.

The embedded corpus is CPython's ``pydoc_data.topics`` (~465 KB of English technical prose, present
in every CPython install), split deterministically by topic name into a calibration part (~80%)
and a held-out evaluation part (~20%).
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from pathlib import Path

import torch

from ..errors import FlexQuantError

log = logging.getLogger(__name__)
SPLITS = ("calib", "eval")
_TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")


def _pydoc(split: str) -> str:
    from pydoc_data.topics import topics

    def held_out(name: str) -> bool:
        return hashlib.sha256(name.encode()).digest()[0] < 52  # ~20% of topics, stable everywhere

    names = [k for k in sorted(topics) if held_out(k) == (split == "eval")]
    return "\n\n".join(topics[k].strip() for k in names)


def _read_text(path: Path) -> str:
    """A UTF-8 text file's contents; a binary file (NUL bytes, or mostly undecodable) is refused."""
    raw = path.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    bad = text.count("\ufffd")
    if b"\x00" in raw[: 1 << 20] or bad > max(8, len(text) // 100):
        why = "NUL bytes" if b"\x00" in raw[: 1 << 20] else f"{bad} undecodable bytes"
        raise FlexQuantError(f"{path} is not UTF-8 text ({why}): give a plain-text file, or a folder of them, "
                             "as the text")
    return text


def _local(path: Path) -> str:
    if path.is_file():
        return _read_text(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _TEXT_SUFFIXES)
    if not files:
        raise FlexQuantError(f"folder {path} has no text files ({', '.join(_TEXT_SUFFIXES)})")
    return "\n\n".join(_read_text(p) for p in files)


def _hf_dataset(name: str, split: str) -> str:
    try:
        import datasets
    except ImportError as e:
        raise FlexQuantError(f"text {name!r} needs the `datasets` package: pip install 'flexquant[data]'") from e
    try:
        if name == "wikitext2":
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1",
                                       split="train" if split == "calib" else "test")
            return "\n\n".join(ds["text"])
        ds = datasets.load_dataset(
            "allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz",
                                      "validation": "en/c4-validation.00000-of-00008.json.gz"},
            split="train" if split == "calib" else "validation",
        )
        return "\n\n".join(ds.select(range(min(len(ds), 20000)))["text"])
    except Exception as e:  # network/hub errors come in many types
        raise FlexQuantError(
            f"could not load {name!r} through `datasets` ({type(e).__name__}); offline, use "
            "--calib/--text pydoc (embedded) or a local text file or folder"
        ) from e


def load_text(source: str, split: str) -> str:
    """Raw text of ``source`` ("pydoc", "wikitext2", "c4", or a file/folder path) for a split."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    if source == "pydoc":
        text = _pydoc(split)
    elif source in ("wikitext2", "c4"):
        text = _hf_dataset(source, split)
    else:
        path = Path(source)
        if not path.exists():
            raise FlexQuantError(
                f"text source {source!r} is neither 'pydoc', 'wikitext2', 'c4' nor an existing file or folder"
            )
        text = _local(path)
    if not text.strip():
        raise FlexQuantError(f"text source {source!r} is empty")
    return text


_TOKENS: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()  # (tokenizer, text) digests -> ids
_TOKENS_KEPT = 4


def _fingerprint(tokenizer) -> str:
    """What the tokenization depends on: a fast tokenizer's whole definition, else its class, name and size."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else \
        f"{type(tokenizer).__name__}|{getattr(tokenizer, 'name_or_path', '')}|{len(tokenizer)}"
    return hashlib.sha256(spec.encode()).hexdigest()


def _tokens(tokenizer, text: str) -> torch.Tensor:
    """The token ids of ``text`` (read-only: callers copy what they return); the last few texts are kept, so
    that repeated runs in one process (several quantizations, quantize then evaluate) tokenize once."""
    key = (_fingerprint(tokenizer), hashlib.sha256(text.encode()).hexdigest())
    if key not in _TOKENS:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False)["input_ids"][0]
        _TOKENS[key] = ids.to(torch.long)
        while len(_TOKENS) > _TOKENS_KEPT:
            _TOKENS.popitem(last=False)
    _TOKENS.move_to_end(key)
    return _TOKENS[key]


def calibration_windows(tokenizer, source: str, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``nsamples`` windows [nsamples, seqlen] drawn at random offsets (seeded) from the calibration split."""
    ids = _tokens(tokenizer, load_text(source, "calib"))
    if ids.numel() < seqlen + 1:
        raise FlexQuantError(
            f"calibration text {source!r} has {ids.numel()} tokens; at least seqlen+1 = {seqlen + 1} "
            "are needed: give more text or a smaller --seqlen"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=gen)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


def eval_windows(tokenizer, source: str, seqlen: int, windows: int | None = None) -> torch.Tensor:
    """Non-overlapping consecutive windows [w, seqlen] from the evaluation split (the first ``windows``)."""
    ids = _tokens(tokenizer, load_text(source, "eval"))
    available = ids.numel() // seqlen
    if available == 0:
        raise FlexQuantError(
            f"evaluation text {source!r} has {ids.numel()} tokens, fewer than one window of {seqlen}; "
            "give more text or a smaller --seqlen"
        )
    w = available if windows is None else min(windows, available)
    if windows is not None and windows > available:
        log.warning("only %d windows of %d tokens available (asked %d)", available, seqlen, windows)
    return ids[: w * seqlen].clone().view(w, seqlen)
