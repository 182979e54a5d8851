"""One measured operation of `python -m benchmarks --scale`, in a fresh process.

    python -m benchmarks.scale_op OP URL [--code-root DIR] [--min-age S] [--free-step N]
                                         [--mirror-from DIR]

OP: `ls` (ckptstore.report.step_summaries, what `ckptstore ls` prints), `gc` (Store.gc), or
`gc-free` (delete step --free-step outside the count, then Store.gc). With --mirror-from
(for memory://, which lives in one process), the local store at DIR is first copied
object by object into URL, outside the count.

Prints one JSON line: requests by kind (get, head, list, put, delete, delete_many and the
S3 requests those batches are: ceil(keys / max_delete_batch) each), list pages (per list
call: max(1, ceil(objects / 1000)), S3's page size), bytes read, wall seconds and peak RSS.

Peak RSS: the process's VmHWM (/proc/self/status), reset with /proc/self/clear_refs just
before the operation, so it is the peak during the operation: the interpreter, torch and
(memory://) the store itself included; `rss_before_mib` is the resident size at that reset.

--code-root: run the code of another checkout (the "before" of `--baseline REV`): its
`ckptstore/` is imported as `ckptstore` and its `backends/` as `ckptstore.backends` (the
package-dir mapping of pyproject.toml), ahead of the installed editable finder. Nothing in
this module imports ckptstore before that finder is in place.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import json
import math
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

LIST_PAGE = 1000  # S3 ListObjectsV2's page size


class _CheckoutFinder(importlib.abc.MetaPathFinder):
    """Import `ckptstore` from <root>/ckptstore and `ckptstore.backends` from <root>/backends."""

    def __init__(self, root: Path):
        self.places = {"ckptstore": root / "ckptstore", "ckptstore.backends": root / "backends"}

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        place = self.places.get(fullname)
        if place is None:
            return None
        return importlib.util.spec_from_file_location(fullname, place / "__init__.py",
                                                      submodule_search_locations=[str(place)])


def use_checkout(root: Path) -> None:
    """Make `import ckptstore` load the checkout at `root` (before anything imported it)."""
    if "ckptstore" in sys.modules:
        raise RuntimeError("ckptstore was imported before use_checkout")
    sys.meta_path.insert(0, _CheckoutFinder(Path(root).resolve()))


def _peak_rss_reset() -> int:
    """Reset the peak-RSS counter; return the resident size now (bytes)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status_kib("VmRSS") * 1024


def _status_kib(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def counting_backend(inner: Any) -> Any:
    """A wrapper that counts every request `inner` gets, forwarding `delete_many` (one batch
    request on S3) and `max_delete_batch`, so gc batches as it would unwrapped."""
    from ckptstore.testing.wrappers import ForwardingBackend

    class Counting(ForwardingBackend):
        def __init__(self, inner: Any):
            super().__init__(inner)
            self.max_delete_batch = getattr(inner, "max_delete_batch", 100)
            self.preferred_chunk_size = getattr(inner, "preferred_chunk_size", None)
            self.calls: Counter[str] = Counter()
            self.bytes_read = 0
            self.by_key: Counter[str] = Counter()  # "get refs", "head chunks", ...
            self.batch_max = 0  # most keys one delete_many call carried
            self._lock = threading.Lock()

        def __getattr__(self, name: str) -> Any:  # anything else a newer gc asks of its backend
            return getattr(self.__dict__["inner"], name)

        def _add(self, kind: str, n: int = 1, read: int = 0) -> None:
            with self._lock:
                self.calls[kind] += n
                self.bytes_read += read

        def _key(self, op: str, key: str) -> None:
            with self._lock:
                self.by_key[f"{op} {key.split('/', 1)[0]}"] += 1

        def get(self, key: str) -> Any:
            self._key("get", key)
            result = super().get(key)
            self._add("get", read=len(result.data))
            return result

        def get_range(self, key: str, start: int, length: int) -> bytes:
            self._key("get", key)
            data = super().get_range(key, start, length)
            self._add("get", read=len(data))
            return data

        def get_small(self, key: str, limit: int) -> Any:  # one request: bytes and version together
            self._key("get", key)
            result = self.inner.get_small(key, limit)
            self._add("get", read=len(result.data))
            return result

        def read_into(self, key: str, start: int, buffers: Any) -> int:
            self._key("get", key)
            n = super().read_into(key, start, buffers)
            self._add("get", read=n)
            return n

        def put(self, key: str, data: Any, **kwargs: Any) -> str:
            self._key("put", key)
            self._add("put")
            return super().put(key, data, **kwargs)

        def head(self, key: str) -> Any:
            self._key("head", key)
            self._add("head")
            return super().head(key)

        def list(self, prefix: str = "") -> Any:
            self._add("list")
            n = 0
            for info in super().list(prefix):
                n += 1
                yield info
            self._add("list_pages", max(1, math.ceil(n / LIST_PAGE)))
            self._add("listed", n)

        def delete(self, key: str, **kwargs: Any) -> None:
            self._key("delete", key)
            self._add("delete")
            super().delete(key, **kwargs)

        def delete_many(self, keys: Any) -> Any:
            keys = list(keys)
            self._add("delete_many")
            self._add("delete_keys", len(keys))
            self.batch_max = max(self.batch_max, len(keys))
            self._add("delete_requests", max(1, math.ceil(len(keys) / max(1, self.max_delete_batch))))
            return self.inner.delete_many(keys)

    return Counting(inner)


def summary(counting: Any) -> dict[str, Any]:
    c = counting.calls
    reads = c["get"] + c["head"]
    # A backend without delete_many (the code before issue 13) deletes key by key.
    delete_requests = c["delete_requests"] + c["delete"]
    return {"requests": {k: c[k] for k in ("get", "head", "list", "put", "delete", "delete_many") if c[k]},
            "reads": reads, "lists": c["list"], "list_pages": c["list_pages"], "listed": c["listed"],
            "delete_requests": delete_requests, "delete_keys": c["delete_keys"] + c["delete"],
            "total_requests": reads + c["list_pages"] + c["put"] + delete_requests,
            "bytes_read": counting.bytes_read, "by_key": dict(counting.by_key),
            "delete_many_requests": c["delete_requests"], "delete_batch_max": counting.batch_max}


def mirror(src_dir: str, dst: Any, threads: int = 16) -> int:
    """Copy every object of the local store at `src_dir` into backend `dst` (not tmp/)."""
    from concurrent.futures import ThreadPoolExecutor

    from ckptstore.url import open_backend

    src = open_backend(src_dir)
    keys = [info.key for info in src.list("") if not info.key.startswith("tmp/")]

    def one(key: str) -> None:
        dst.put(key, src.get(key).data)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, keys))
    return len(keys)


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.code_root:
        use_checkout(Path(args.code_root))
    import ckptstore

    out: dict[str, Any] = {"op": args.op, "code": str(Path(ckptstore.__file__).parent.parent)}
    store = ckptstore.open(args.url, threads=args.threads)
    if args.mirror_from:
        out["mirrored_objects"] = mirror(args.mirror_from, store.backend)
    if args.op == "gc-free":
        store.delete(args.free_step)
    store = ckptstore.open(args.url, create=False, threads=args.threads)
    counting = counting_backend(store.backend)
    store.backend = counting
    if hasattr(store, "_marker"):
        store._marker = None  # read it again through the wrapper, as a fresh `ckptstore ls` does
    rss_before = _peak_rss_reset()
    started = time.perf_counter()
    if args.op == "ls":
        from ckptstore.report import step_summaries

        rows = step_summaries(store)
        out["steps"] = len(rows)
    else:
        report = store.gc(min_age=args.min_age)
        out["gc"] = {k: getattr(report, k, None) for k in (
            "ran", "reason", "refs", "reachable_manifests", "reachable_chunks", "deleted_manifests",
            "deleted_chunks", "failed")}
        out["gc"]["failed"] = bool(getattr(report, "failed", False))
    out["wall_s"] = time.perf_counter() - started
    out["peak_rss_mib"] = _status_kib("VmHWM") / 1024
    out["rss_before_mib"] = rss_before / 2**20
    out.update(summary(counting))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale_op")
    p.add_argument("op", choices=["ls", "gc", "gc-free"])
    p.add_argument("url")
    p.add_argument("--code-root", default="")
    p.add_argument("--min-age", type=float, default=3600.0)
    p.add_argument("--free-step", type=int, default=0)
    p.add_argument("--mirror-from", default="")
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--ops", default="", help="memory:// only: several ops in this one process, e.g. gc,gc-free")
    args = p.parse_args(argv)
    ops = args.ops.split(",") if args.ops else [args.op]
    for i, op in enumerate(ops):
        args.op = op
        result = run(args)
        args.mirror_from = ""  # only before the first
        if i == 0 and args.code_root:
            args.code_root = ""  # the finder is in place
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
