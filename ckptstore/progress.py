"""A tiny progress line on stderr for long operator commands (verify, cp, export).

    with Progress(total=len(chunks), label="verify", unit="chunks", enabled=progress) as bar:
        for chunk in chunks:
            ...
            bar.advance(1)

It draws one updating line, at most ~10 times a second, and only when the stream is a
terminal: piped or redirected output, CI logs and tests see nothing. No dependency.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Literal, TextIO

Unit = Literal["chunks", "bytes"]

_INTERVAL = 0.1  # seconds between redraws (~10 Hz)


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{int(n)} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class Progress:
    """Counts `advance(n)` calls against `total` and draws `label: 42% 4.2/10.0 GiB 380 MiB/s`.

    Silent unless `enabled` and the stream (default stderr) is a TTY. Thread-safe.
    """

    def __init__(self, total: int, label: str, unit: Unit = "chunks", *, enabled: bool = True,
                 stream: TextIO | None = None):
        self.total = max(0, int(total))
        self.label = label
        self.unit = unit
        self.done = 0
        self._stream = stream if stream is not None else sys.stderr
        self.active = enabled and _isatty(self._stream)
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._last_draw = 0.0
        self._width = 0

    def __enter__(self) -> Progress:
        self._started = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def advance(self, n: int = 1) -> None:
        """Count `n` more units done; redraws if the last draw is over 0.1 s old."""
        with self._lock:
            self.done += n
            if not self.active:
                return
            now = time.monotonic()
            if now - self._last_draw >= _INTERVAL:
                self._last_draw = now
                self._draw(now)

    def close(self) -> None:
        """Draw the final state and end the line."""
        with self._lock:
            if not self.active:
                return
            self._draw(time.monotonic())
            self._stream.write("\n")
            self._stream.flush()
            self.active = False

    def line(self, now: float | None = None) -> str:
        """The text of the progress line."""
        elapsed = max((time.monotonic() if now is None else now) - self._started, 1e-9)
        fmt = _bytes if self.unit == "bytes" else (lambda n: f"{int(n)}")
        suffix = "" if self.unit == "bytes" else f" {self.unit}"
        parts = [f"{self.label}:"]
        if self.total:
            parts.append(f"{min(100.0, 100.0 * self.done / self.total):5.1f}%")
            parts.append(f"{fmt(self.done)}/{fmt(self.total)}{suffix}")
        else:
            parts.append(f"{fmt(self.done)}{suffix}")
        rate = self.done / elapsed
        parts.append(f"{_bytes(rate)}/s" if self.unit == "bytes" else f"{rate:.1f}/s")
        if self.total and 0 < self.done < self.total and rate > 0:
            parts.append(f"eta {int((self.total - self.done) / rate)}s")
        return " ".join(parts)

    def _draw(self, now: float) -> None:
        text = self.line(now)
        pad = max(0, self._width - len(text))
        self._width = len(text)
        try:
            self._stream.write("\r" + text + " " * pad)
            self._stream.flush()
        except (OSError, ValueError):  # the terminal went away: stop drawing, keep working
            self.active = False


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False
