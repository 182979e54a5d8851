"""The `ckptstore` command: a thin layer over the Python API.

Exit codes: 0 success, 1 error, 2 usage, 3 step or store not found, 4 step exists or
commit conflict, 130 interrupted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Sequence
from typing import Any

from ckptstore import errors
from ckptstore.url import redact

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_EXISTS = 0, 1, 2, 3, 4


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _time(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, tz=dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _table(headers: list[str], rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        padded = (c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        return "  ".join(padded)

    return "\n".join([line(headers), *(line(r) for r in rows)]).rstrip()


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=lambda o: o.hex() if isinstance(o, bytes) else repr(o)))


def _open(url: str) -> Any:
    import ckptstore

    return ckptstore.open(url, create=False)


def cmd_ls(args: argparse.Namespace) -> int:
    from ckptstore.report import step_summaries

    with _open(args.url) as store:
        rows = step_summaries(store)
    if args.json:
        _print_json([r.as_dict() for r in rows])
        return EXIT_OK
    if not rows:
        print(f"no steps in {args.url}")
        return EXIT_OK
    print(_table(
        ["STEP", "COMMITTED (UTC)", "TENSORS", "LOGICAL", "STORED", "NEW", "SEQ"],
        [[str(r.step), _time(r.committed), str(r.tensors), human_bytes(r.logical_bytes),
          human_bytes(r.stored_bytes), human_bytes(r.new_bytes), str(r.seq)] for r in rows],
        right={0, 2, 3, 4, 5, 6},
    ))
    logical = sum(r.logical_bytes for r in rows)
    stored = sum(r.new_bytes for r in rows)
    ratio = f"{logical / stored:.2f}x" if stored else "-"
    print(f"{len(rows)} steps, {human_bytes(logical)} logical, {human_bytes(stored)} stored (dedup {ratio})")
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    from ckptstore.report import step_details

    with _open(args.url) as store:
        details = step_details(store, args.step)
    if args.json:
        _print_json(details)
        return EXIT_OK
    print(f"step        {details['step']}")
    print(f"committed   {_time(details['committed'])} UTC by {details['writer']}")
    print(f"commit      {details['commit_id']} (seq {details['seq']})")
    print(f"manifest    {details['manifest']}")
    if details["replaces"]:
        print(f"replaces    {details['replaces']}")
    print(f"size        {human_bytes(details['logical_bytes'])} logical, "
          f"{human_bytes(details['stored_bytes'])} stored in {details['chunks']} chunks")
    if details["metadata"] is not None:
        print(f"metadata    {details['metadata']!r}")
    tensors = details["tensors"]
    print(f"tensors     {len(tensors)}")
    if tensors:
        print(_table(
            ["PATH", "DTYPE", "SHAPE", "BYTES"],
            [[t["path"], t["dtype"] if t["kind"] == "torch" else f"{t['kind']}:{t['dtype']}",
              "[" + ", ".join(map(str, t["shape"])) + "]", human_bytes(t["nbytes"])] for t in tensors],
            right={3},
        ))
    return EXIT_OK


def _parse_steps(specs: Sequence[str]) -> list[int]:
    steps: list[int] = []
    for spec in specs:
        low, sep, high = spec.partition("-")
        if not low.isdigit() or (sep and not high.isdigit()):
            raise argparse.ArgumentTypeError(f"not a step or range: {spec!r} (use 100 or 100-200)")
        steps.extend(range(int(low), int(high) + 1) if sep else [int(low)])
    return steps


def cmd_rm(args: argparse.Namespace) -> int:
    try:
        wanted = _parse_steps(args.steps)
    except argparse.ArgumentTypeError as exc:
        print(f"ckptstore rm: {exc}", file=sys.stderr)
        return EXIT_USAGE
    with _open(args.url) as store:
        existing = set(store.steps())
        ranged = any("-" in s for s in args.steps)
        # A range removes the steps inside it that exist; a single missing step is an error.
        targets = [s for s in wanted if s in existing] if ranged else wanted
        missing = [s for s in targets if s not in existing]
        if missing:
            raise errors.StepNotFoundError(missing[0], store.url)
        if not targets:
            print("no committed steps in that range", file=sys.stderr)
            return EXIT_NOT_FOUND
        if not args.yes:
            if not sys.stdin.isatty():
                print(f"refusing to delete {len(targets)} step(s) without --yes (stdin is not a terminal)",
                      file=sys.stderr)
                return EXIT_USAGE
            answer = input(f"delete {len(targets)} step(s) {_brief(targets)} from {store.url}? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                print("nothing deleted", file=sys.stderr)
                return EXIT_ERROR
        for step in targets:
            store.delete(step)
    if args.json:
        _print_json({"deleted": targets})
    else:
        print(f"deleted {len(targets)} step(s): {_brief(targets)} (run gc to free their data)")
    return EXIT_OK


def _brief(steps: list[int]) -> str:
    return ", ".join(map(str, steps)) if len(steps) <= 6 else f"{steps[0]} ... {steps[-1]}"


def cmd_doctor(args: argparse.Namespace) -> int:
    import ckptstore
    from ckptstore.canary import run_canary
    from ckptstore.url import open_backend

    backend = open_backend(args.url)
    try:
        report = run_canary(backend)
    finally:
        backend.close()
    checks = {
        "create_only_enforced": report.create_only_enforced,
        "update_if_version_enforced": report.update_if_version_enforced,
        "update_if_version_works": report.update_if_version_works,
    }
    try:
        with ckptstore.open(args.url, create=False) as store:
            store_info: dict[str, Any] = {"store": True, "format": store.marker.version,
                                          "hash": store.marker.hash_algorithm, "steps": len(store.steps())}
    except errors.StoreNotFoundError:
        store_info = {"store": False}
    if args.json:
        _print_json({"url": report.url, "ok": report.ok, **checks, **store_info})
    else:
        for name, held in checks.items():
            print(f"{'ok  ' if held else 'FAIL'}  {name.replace('_', ' ')}")
        if store_info["store"]:
            print(f"store: format {store_info['format']}, hash {store_info['hash']}, {store_info['steps']} steps")
        else:
            print("no store here yet (the first save creates it)")
        print("safe to commit here" if report.ok else "NOT safe: the server ignores conditional writes")
    return EXIT_OK if report.ok else EXIT_ERROR


def cmd_demo(args: argparse.Namespace) -> int:
    from ckptstore.demo import run_demo

    run_demo(args.dir, steps=args.steps)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ckptstore",
        description="Checkpoint store for ML training. A URL is a local path, file:///path, s3://bucket/prefix "
                    "(?endpoint=URL&region=R&profile=P), gs://bucket/prefix (?project=P) or memory://name.",
        epilog="Exit codes: 0 ok, 1 error, 2 usage, 3 not found, 4 step exists or commit conflict.",
    )
    from ckptstore import __version__

    parser.add_argument("--version", action="version", version=f"ckptstore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ls = sub.add_parser("ls", help="list committed steps with sizes", description="List committed steps: "
                        "commit time, tensors, logical size, stored size, and NEW = bytes no earlier step shares.")
    ls.add_argument("url", help="store URL or path")
    ls.add_argument("--json", action="store_true", help="print JSON for scripts")
    ls.set_defaults(run=cmd_ls)

    show = sub.add_parser("show", help="show one step: commit, metadata, tensors",
                          description="Show a step's ref, metadata and every tensor (path, dtype, shape, bytes).")
    show.add_argument("url", help="store URL or path")
    show.add_argument("step", type=int, help="step number")
    show.add_argument("--json", action="store_true", help="print JSON for scripts")
    show.set_defaults(run=cmd_show)

    rm = sub.add_parser("rm", help="delete steps (refs only; gc frees data)",
                        description="Delete steps' refs. Data shared with other steps stays; unreferenced data "
                                    "is freed by gc. Asks for confirmation unless --yes.")
    rm.add_argument("url", help="store URL or path")
    rm.add_argument("steps", nargs="+", help="steps or inclusive ranges like 100-200")
    rm.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    rm.add_argument("--json", action="store_true", help="print JSON for scripts")
    rm.set_defaults(run=cmd_rm)

    doctor = sub.add_parser("doctor", help="check that the server enforces conditional writes",
                            description="Write a scratch object under locks/ and check that create-only and "
                                        "update-if-version puts are enforced (the commit relies on both), then "
                                        "describe the store. Exit 0 when safe, 1 when not.")
    doctor.add_argument("url", help="store URL or path")
    doctor.add_argument("--json", action="store_true", help="print JSON for scripts")
    doctor.set_defaults(run=cmd_doctor)

    demo = sub.add_parser("demo", help="train a tiny model, save, overwrite, resume (needs torch)",
                          description="Train a tiny model on CPU, saving every step into DIR; show the "
                                      "StepExistsError, an atomic overwrite, a resume, and the listing.")
    demo.add_argument("dir", nargs="?", default="./demo-ckpts", help="store directory (default ./demo-ckpts)")
    demo.add_argument("--steps", type=int, default=6, help="training steps (default 6)")
    demo.set_defaults(run=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except (errors.StepNotFoundError, errors.StoreNotFoundError) as exc:
        print(f"ckptstore {args.command}: {exc}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except (errors.StepExistsError, errors.CommitConflictError) as exc:
        print(f"ckptstore {args.command}: {exc}", file=sys.stderr)
        return EXIT_EXISTS
    except errors.CkptStoreError as exc:
        where = f" {redact(args.url)}" if getattr(args, "url", None) else ""
        print(f"ckptstore {args.command}{where}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `ckptstore ls | head`: the reader left, not an error
        sys.stderr.close()
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
