"""How tensor bytes are cut into chunks.

Large tensors are split into fixed-size chunks that start at the tensor's first byte, so an
unchanged tensor yields the same chunks (and dedupes) whatever changed around it. Small
tensors are packed, in tree order, into shared chunks of up to `pack_size` bytes, so a state
with thousands of biases does not become thousands of objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ckptstore.errors import InvalidArgumentError

MiB = 1 << 20


@dataclass(frozen=True)
class ChunkingPolicy:
    """Chunk sizes: tensors under `small_tensor_limit` are packed into `pack_size` chunks,
    larger ones split into `chunk_size` chunks."""

    chunk_size: int = 16 * MiB
    small_tensor_limit: int = 1 * MiB
    pack_size: int = 4 * MiB

    def __post_init__(self) -> None:
        # InvalidArgumentError is also a ValueError: `except ValueError` callers keep working.
        for name in ("chunk_size", "small_tensor_limit", "pack_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidArgumentError(f"ChunkingPolicy {name} must be an int, got {value!r}")
        if self.chunk_size < 1 or self.pack_size < 1 or self.small_tensor_limit < 0:
            raise InvalidArgumentError(f"chunk sizes must be positive: {self}")
        if self.small_tensor_limit > self.pack_size:
            raise InvalidArgumentError("small_tensor_limit must not exceed pack_size")


@dataclass
class PlannedChunk:
    """The bytes of one chunk to write: (tensor index, start in the tensor, length) pieces."""

    pieces: list[tuple[int, int, int]] = field(default_factory=list)
    size: int = 0


@dataclass
class ChunkPlan:
    """Chunks to write, and each tensor's segments as (chunk slot, offset in chunk, length)."""

    chunks: list[PlannedChunk]
    segments: list[list[tuple[int, int, int]]]


def plan_chunks(tensor_sizes: list[int], policy: ChunkingPolicy) -> ChunkPlan:
    """Cut tensors of the given byte sizes into chunks according to `policy`."""
    chunks: list[PlannedChunk] = []
    segments: list[list[tuple[int, int, int]]] = []
    pack: PlannedChunk | None = None
    pack_slot = -1  # the open pack's slot: large tensors may have been appended after it
    for index, size in enumerate(tensor_sizes):
        tensor_segments: list[tuple[int, int, int]] = []
        if 0 < size < policy.small_tensor_limit:
            if pack is None or pack.size + size > policy.pack_size:
                pack = PlannedChunk()
                pack_slot = len(chunks)
                chunks.append(pack)
            tensor_segments.append((pack_slot, pack.size, size))
            pack.pieces.append((index, 0, size))
            pack.size += size
        else:
            for start in range(0, size, policy.chunk_size):
                length = min(policy.chunk_size, size - start)
                chunks.append(PlannedChunk([(index, start, length)], length))
                tensor_segments.append((len(chunks) - 1, 0, length))
        segments.append(tensor_segments)
    return ChunkPlan(chunks, segments)
