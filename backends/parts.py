"""A file over a list of buffers, so uploads send tensor memory without joining it first."""

from __future__ import annotations

import bisect
import io
from collections.abc import Sequence
from typing import Any

from ckptstore.backends.base import Buffer


class PartsReader(io.RawIOBase):
    """A read-only, seekable file over a list of buffers: the request body of a put.

    Neither boto3 nor google-cloud-storage takes a list of memoryviews as a body, and joining
    a chunk's header and payload (or a tensor slice) into one bytes object copied every chunk
    once more. This file hands out the buffers block by block instead: the SDKs learn the
    length by seek/tell, hash the payload through it (SigV4 over plain http, GCS checksums),
    and seek back to the start to rewind for a retry.
    """

    def __init__(self, parts: Sequence[Buffer]):
        super().__init__()
        self._parts = [view for view in (memoryview(p).cast("B") for p in parts) if view.nbytes]
        self._starts = []
        total = 0
        for view in self._parts:
            self._starts.append(total)
            total += view.nbytes
        self.size = total
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: Any) -> int:
        out = memoryview(buffer).cast("B")
        done = 0
        while done < out.nbytes and self._pos < self.size:
            index = bisect.bisect_right(self._starts, self._pos) - 1
            part, offset = self._parts[index], self._pos - self._starts[index]
            n = min(out.nbytes - done, part.nbytes - offset)
            out[done:done + n] = part[offset:offset + n]
            done += n
            self._pos += n
        return done

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = self.size - self._pos
        size = max(0, min(size, self.size - self._pos))
        if size == 0:
            return b""
        index = bisect.bisect_right(self._starts, self._pos) - 1
        part, offset = self._parts[index], self._pos - self._starts[index]
        if offset + size <= part.nbytes:  # the usual case: one copy of one block
            self._pos += size
            return bytes(part[offset:offset + size])
        block = bytearray(size)
        self.readinto(block)
        return bytes(block)

    def readall(self) -> bytes:
        return self.read()
