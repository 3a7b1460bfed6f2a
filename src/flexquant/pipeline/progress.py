"""Per-block progress of a long pass: a bar with ETA, the process's resident memory now and at peak, and the
activation store's bytes (in memory / on disk); without a terminal bar, one log line per block."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
import time

from tqdm.auto import tqdm

log = logging.getLogger("flexquant.progress")


_THRESHOLD = 0  # the mmap threshold set by return_freed_memory (0: glibc's own, or not glibc)
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
FREED_THRESHOLD = 1 << 20  # allocations from 1 MiB up get their own maps
MEMORY_FIRST_THRESHOLD = 128 << 10  # under --max-memory: from 128 KiB up


def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def return_freed_memory(threshold: int = FREED_THRESHOLD) -> bool:
    """Have glibc serve allocations of ``threshold`` bytes and more with their own memory maps, so that the
    memory of a freed tensor goes back to the system at once. Without this, glibc raises its threshold as large
    blocks are freed (up to 32 MB) and serves them from a heap that fragments: a run that reads and drops one
    decoder block after another then grows with depth. At 1 MiB the heap still grows about 1 MiB a block: a
    block at hidden 512 allocates some 15,000 tensors of 128-512 KiB, and their freed space fragments around
    longer-lived small allocations. `MEMORY_FIRST_THRESHOLD` stops that growth for about a third more time at that
    width (each such tensor is a fresh map), so a memory budget uses it (docs/scale.md).
    The lowest threshold asked for in the process stays. False where it does not apply."""
    global _THRESHOLD
    if not sys.platform.startswith("linux"):
        return False
    if _THRESHOLD and _THRESHOLD <= threshold:
        return True
    try:
        if _libc().mallopt(M_MMAP_THRESHOLD, threshold):
            _THRESHOLD = threshold
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        pass
    return bool(_THRESHOLD)


def trim_heap() -> bool:
    """Give the free memory at the top of glibc's heaps back to the system (malloc_trim): after many small
    tensors were freed (a lean load drops every layer's checkpoint buffers) it stays resident otherwise. False
    where it does not apply."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(_libc().malloc_trim(0))
    except (OSError, AttributeError):  # not glibc
        return False


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MiB (0, 0 where /proc is missing)."""
    now = peak = 0.0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    now = int(line.split()[1]) / 1024
                elif line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) / 1024
    except OSError:
        pass
    return now, peak


class BlockProgress:
    """Iterate blocks ``start .. total-1`` showing progress; ``store`` (optional) adds its byte counts."""

    def __init__(self, total: int, desc: str, show: bool, start: int = 0, store=None):
        self.total, self.desc, self.show, self.start, self.store = total, desc, show, start, store

    def _postfix(self) -> dict:
        now, peak = rss_mb()
        out = {"rss": f"{now / 1024:.2f}G", "peak": f"{peak / 1024:.2f}G"}
        if self.store is not None:
            out["kept"] = f"{self.store.memory_bytes / 2**20:.0f}M"
            if self.store.disk_bytes:
                out["disk"] = f"{self.store.disk_bytes / 2**20:.0f}M"
        return out

    def __iter__(self):
        bar = tqdm(total=self.total, initial=self.start, desc=self.desc, disable=not self.show)
        t0 = time.perf_counter()
        try:
            for i in range(self.start, self.total):
                yield i
                bar.set_postfix(self._postfix(), refresh=False)
                bar.update(1)
                if not self.show:
                    done = i + 1 - self.start
                    eta = (time.perf_counter() - t0) / done * (self.total - i - 1)
                    log.debug("%s %d/%d, eta %.0f s, %s", self.desc, i + 1, self.total, eta, self._postfix())
        finally:
            bar.close()
