"""Where the statistics pass keeps full-precision block inputs for the block loop (one small interface, so
that half precision or disk offload can replace the in-memory store without touching the methods)."""

from __future__ import annotations

import abc

from .capture import BlockInputs


class ActivationStore(abc.ABC):
    """Block inputs by block index."""

    @abc.abstractmethod
    def put(self, index: int, inputs: BlockInputs) -> None:
        """Keep ``inputs`` as block ``index``'s."""

    @abc.abstractmethod
    def get(self, index: int) -> BlockInputs | None:
        """Block ``index``'s inputs, or None when none are kept."""

    @abc.abstractmethod
    def drop(self, index: int) -> None:
        """Forget block ``index``'s inputs (the block loop is past it)."""


class MemoryStore(ActivationStore):
    """Tensors kept as they are, in host memory."""

    def __init__(self) -> None:
        self._blocks: dict[int, BlockInputs] = {}

    def put(self, index: int, inputs: BlockInputs) -> None:
        self._blocks[index] = inputs

    def get(self, index: int) -> BlockInputs | None:
        return self._blocks.get(index)

    def drop(self, index: int) -> None:
        self._blocks.pop(index, None)
