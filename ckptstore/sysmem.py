"""How much memory a load may allocate on this machine.

A manifest declares its tensors' sizes before any byte is read (up to MAX_LOGICAL_BYTES,
2^50), and a load allocates them first. With Linux's overcommit an allocation far beyond
RAM can succeed and the process is then killed mid-read; far beyond that it fails with an
untyped RuntimeError. Checking the declared total against RAM plus swap turns both into
InsufficientMemoryError before anything is allocated.
"""

from __future__ import annotations


def machine_memory_bytes() -> int | None:
    """RAM plus swap (Linux /proc/meminfo), or None where that cannot be read."""
    fields: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in ("MemTotal", "SwapTotal"):
                    fields[name] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return sum(fields.values()) if "MemTotal" in fields else None
