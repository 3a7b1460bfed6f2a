"""The vision package's user error.

It derives from the project's `FlexQuantError` so that the top-level CLI prints it on one line and exits 2.
"""

from __future__ import annotations

try:
    from ..errors import FlexQuantError
except ImportError:  # the core package is written in parallel; keep vision importable on its own
    FlexQuantError = Exception  # type: ignore[misc,assignment]


class VisionError(FlexQuantError):  # type: ignore[valid-type,misc]
    """A problem with the user's model, images, config or checkpoint, and what to do about it."""
