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

#: `small_tensor_limit` / `pack_size` left out (or given as DERIVED): derived from the
#: policy's other sizes, see `derived_pack_size`.
DERIVED = -1
MIN_PACK_SIZE = 4 * MiB
MAX_PACK_SIZE = 64 * MiB


def derived_pack_size(chunk_size: int) -> int:
    """The default `pack_size` for `chunk_size`: a quarter of it, at least 4 MiB (every chunk
    size up to the 16 MiB default keeps the 4 MiB packs it always had) and at most 64 MiB.
    S3's 64 MiB chunks get 16 MiB packs and a 4 MiB small-tensor limit: a 70B FSDP shard set
    over 1024 ranks (per rank: 80 layers of 32 KiB-896 KiB shards) then takes about a fifth
    of the PUTs of 4 MiB packs (docs/FORMAT.md, "Chunking"), while the packs a save holds in
    memory (2 x threads of them, each a copy) stay at 128 MiB with the default 4 threads."""
    return min(MAX_PACK_SIZE, max(MIN_PACK_SIZE, chunk_size // 4))


@dataclass(frozen=True)
class ChunkingPolicy:
    """Chunk sizes: tensors under `small_tensor_limit` are packed into `pack_size` chunks,
    larger ones split into `chunk_size` chunks.

    Left out, `pack_size` is `derived_pack_size(chunk_size)` (raised to `small_tensor_limit`
    when that is given and larger) and `small_tensor_limit` is a quarter of `pack_size`; the
    defaults are 16 MiB, 1 MiB and 4 MiB, as they always were. Values given always win. The
    fields hold the resolved sizes, so `dataclasses.replace` keeps them as given."""

    chunk_size: int = 16 * MiB
    small_tensor_limit: int = DERIVED
    pack_size: int = DERIVED

    def __post_init__(self) -> None:
        # InvalidArgumentError is also a ValueError: `except ValueError` callers keep working.
        for name in ("chunk_size", "small_tensor_limit", "pack_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidArgumentError(f"ChunkingPolicy {name} must be an int, got {value!r}")
        if self.pack_size == DERIVED:
            derived = derived_pack_size(max(self.chunk_size, 0))
            object.__setattr__(self, "pack_size", max(derived, self.small_tensor_limit))
        if self.small_tensor_limit == DERIVED:
            object.__setattr__(self, "small_tensor_limit", self.pack_size // 4)
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
