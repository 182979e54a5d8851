"""The `ckptstore` command: a thin layer over the Python API.

Exit codes: 0 success, 1 error, 2 usage, 3 step or store not found, 4 step exists or
commit conflict, 130 interrupted.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from ckptstore import errors
from ckptstore.demo import run_demo
from ckptstore.diff import resolve_step
from ckptstore.display import (
    DIFF_LIST_LIMIT,
    format_diff,
    format_time,
    format_tree,
    human_bytes,
    print_json,
    print_steps,
    table,
)
from ckptstore.keys import MAX_STEP
from ckptstore.url import redact

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_EXISTS = 0, 1, 2, 3, 4


class CommandError(Exception):
    """A command stops with `message` and exit `code`; `kind` is the "error" of its --json form."""

    def __init__(self, message: str, code: int = EXIT_USAGE, kind: str = "UsageError"):
        super().__init__(message)
        self.message, self.code, self.kind = message, code, kind


class _UsageError(Exception):
    def __init__(self, parser: argparse.ArgumentParser, message: str):
        super().__init__(message)
        self.parser, self.message = parser, message


class _Parser(argparse.ArgumentParser):
    """Raises usage errors to `main` (which prints them as text or JSON) instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(self, message)


def _fail(as_json: bool, prefix: str, kind: str, message: str, code: int) -> int:
    """Report an error: with --json as {"error": kind, "message": message} on stdout, else as
    text on stderr. The exit code is the same either way."""
    if as_json:
        print_json({"error": kind, "message": message})
    else:
        print(f"{prefix}: {message}", file=sys.stderr)
    return code


def _open(url: str) -> Any:
    import ckptstore

    return ckptstore.open(url, create=False)


def cmd_ls(args: argparse.Namespace) -> int:
    print_steps(args.url, as_json=args.json)
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    from ckptstore.report import plain_tree, step_details

    with _open(args.url) as store:
        details = step_details(store, resolve_step(store, args.step), tree=args.tree)
    if args.json:
        print_json({**details, "tree": plain_tree(details["tree"])} if args.tree else details)
        return EXIT_OK
    print(f"step        {details['step']}")
    print(f"committed   {format_time(details['committed'])} UTC by {details['writer']}")
    print(f"commit      {details['commit_id']} (seq {details['seq']})")
    print(f"manifest    {details['manifest']}")
    if details["replaces"]:
        print(f"replaces    {details['replaces']}")
    print(f"size        {human_bytes(details['logical_bytes'])} logical, "
          f"{human_bytes(details['stored_bytes'])} stored in {details['chunks']} chunks")
    if details["metadata"] is not None:
        print(f"metadata    {details['metadata']!r}")
    if args.tree:
        print("tree")
        print(format_tree(details["tree"], indent="  "))
    tensors = details["tensors"]
    print(f"tensors     {len(tensors)}")
    if tensors:
        print(table(
            ["PATH", "DTYPE", "SHAPE", "BYTES"],
            [[t["path"], t["dtype"] if t["kind"] == "torch" else f"{t['kind']}:{t['dtype']}",
              "[" + ", ".join(map(str, t["shape"])) + "]", human_bytes(t["nbytes"])] for t in tensors],
            right={3},
        ))
    return EXIT_OK


def cmd_rm(args: argparse.Namespace) -> int:
    with _open(args.url) as store:
        # A range removes the steps inside it that exist; a single missing step is an error.
        targets = _select_steps(store, args.steps)
        if not targets:
            raise CommandError("no committed steps in that range", EXIT_NOT_FOUND, "StepNotFoundError")
        if not args.yes:
            if not sys.stdin.isatty():
                raise CommandError(f"refusing to delete {len(targets)} step(s) without --yes "
                                   "(stdin is not a terminal)")
            answer = input(f"delete {len(targets)} step(s) {_brief(targets)} from {store.url}? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                raise CommandError("nothing deleted", EXIT_ERROR, "Cancelled")
        for step in targets:
            store.delete(step)
        tagged = {name: step for name, step in store.tags().items() if step in targets}
    for name, step in tagged.items():
        print(f"warning: step {step} is tagged {name!r}: the tag keeps its data alive (gc will not free it); "
              f"'ckptstore tag {redact(args.url)} {name} --delete' removes the tag", file=sys.stderr)
    if args.json:
        print_json({"deleted": targets, **({"kept_by_tags": tagged} if tagged else {})})
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
        print_json({"url": report.url, "ok": report.ok, **checks, **store_info})
    else:
        for name, held in checks.items():
            print(f"{'ok  ' if held else 'FAIL'}  {name.replace('_', ' ')}")
        if store_info["store"]:
            print(f"store: format {store_info['format']}, hash {store_info['hash']}, {store_info['steps']} steps")
        else:
            print("no store here yet (the first save creates it)")
        print("safe to commit here" if report.ok else "NOT safe: the server ignores conditional writes")
    return EXIT_OK if report.ok else EXIT_ERROR


_SIZE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
               "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str) -> int:
    """'2GiB' -> 2147483648, '500MB' -> 500000000, '4096' -> 4096 (argparse type)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 2GiB, 500MB or a byte count)")
    value = int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").lower()])
    if value < 1:
        raise argparse.ArgumentTypeError(f"size must be at least 1 byte, got {text!r}")
    return value


_TAG_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_RANGE = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
_STEP_HELP = "use a step number, 'latest' or a tag name"


def _step_number(text: str) -> int:
    step = int(text)
    if step > MAX_STEP:
        raise argparse.ArgumentTypeError(f"step {text} is too large (at most {MAX_STEP})")
    return step


def _step_arg(text: str) -> int | str:
    """A step on the command line: a number, 'latest', or a tag name (argparse type). All
    digits is always a step number; everything else is 'latest' or a tag, which
    `resolve_step` (ckptstore/diff.py) looks up once the store is open."""
    if re.fullmatch(r"[0-9]{1,20}", text):
        return _step_number(text)
    if text == "latest" or _TAG_NAME.fullmatch(text):
        return text
    raise argparse.ArgumentTypeError(f"not a step: {text!r} ({_STEP_HELP})")


def _step_spec(text: str) -> int | str | tuple[int, int]:
    """A step as `_step_arg` takes it, or an inclusive range A-B of step numbers (argparse type)."""
    match = _RANGE.fullmatch(text)
    if match:
        return _step_number(match.group(1)), _step_number(match.group(2))
    try:
        return _step_arg(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"not a step or range: {text!r} ({_STEP_HELP}, or a range like 100-200)") from None


def _output_path(text: str) -> str:
    """A file to write (argparse type): not empty, no NUL byte."""
    if not text.strip() or "\x00" in text:
        raise argparse.ArgumentTypeError(f"not a file path: {text!r}")
    return text


def _seconds(text: str) -> float:
    """A duration in seconds, finite and at least 0 (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r} (use e.g. 0 or 3600)")
    return value


def _select_steps(store: Any, specs: Sequence[int | str | tuple[int, int]]) -> list[int]:
    """Steps named on the command line: a range selects the existing steps inside it; a single
    step (N, 'latest' or a tag) that does not exist is a StepNotFoundError."""
    present = set(store.steps())
    chosen: set[int] = set()
    for spec in specs:
        if isinstance(spec, tuple):
            low, high = spec
            chosen.update(s for s in present if low <= s <= high)
            continue
        step = resolve_step(store, spec)
        if step not in present:
            raise errors.StepNotFoundError(step, store.url)
        chosen.add(step)
    return sorted(chosen)


def cmd_verify(args: argparse.Namespace) -> int:
    from ckptstore.verify import verify

    with _open(args.url) as store:
        steps = _select_steps(store, args.steps) if args.steps else None
        if steps == []:
            raise CommandError("no committed steps in that range", EXIT_NOT_FOUND, "StepNotFoundError")
        report = verify(store, steps, deep=args.deep, progress=True)
    if args.json:
        print_json(report.as_dict())
        return EXIT_OK if report.ok else EXIT_ERROR
    for p in report.problems:
        print(f"step {p.step}  {p.kind}  {p.key}  {p.detail}")
    what = f"{report.steps_checked} steps, {report.manifests_checked} manifests, {report.chunks_checked} chunks"
    how = f"deep: read {human_bytes(report.bytes_read)}" if report.deep else "shallow: sizes only, --deep re-hashes"
    if report.ok:
        print(f"ok: verified {what} ({how}) in {report.seconds:.1f}s")
        return EXIT_OK
    keys = len({p.key for p in report.problems})
    print(f"FAILED: {len(report.problems)} problems ({keys} damaged objects) in steps "
          f"{_brief(report.damaged_steps)}; verified {what} ({how})")
    return EXIT_ERROR


def cmd_du(args: argparse.Namespace) -> int:
    from ckptstore.report import disk_usage

    if args.history or args.plot is not None:
        return _du_history(args)
    with _open(args.url) as store:
        usage = disk_usage(store)
    if args.json:
        print_json(usage.as_dict())
        return EXIT_OK
    ratio = f"{usage.dedup_ratio:.2f}x" if usage.dedup_ratio is not None else "-"
    print(f"steps       {usage.steps}" + (f" ({usage.tags} tags)" if usage.tags else ""))
    print(f"logical     {human_bytes(usage.logical_bytes)}  (tensor bytes summed over steps)")
    print(f"referenced  {human_bytes(usage.referenced_chunk_bytes)} in {usage.referenced_chunks} chunks "
          f"(dedup {ratio})")
    print(f"stored      {human_bytes(usage.stored_bytes)}: {usage.stored_chunks} chunks "
          f"{human_bytes(usage.stored_chunk_bytes)}, {usage.stored_manifests} manifests "
          f"{human_bytes(usage.stored_manifest_bytes)}")
    print(f"garbage     {human_bytes(usage.garbage_bytes)} in {usage.garbage_objects} objects "
          f"(no ref reaches them; gc frees them once older than --min-age, default 3600s)")
    if usage.missing_objects:
        print(f"missing     {usage.missing_objects} referenced objects are not stored: run ckptstore verify")
    for line in usage.unreadable_refs:
        print(f"unreadable  {line}")
    return EXIT_OK


def _du_history(args: argparse.Namespace) -> int:
    from ckptstore.report import storage_history

    with _open(args.url) as store:
        rows = storage_history(store)
    if args.plot is not None:
        from ckptstore.display import plot_history

        try:
            plot_history(rows, args.plot, title=redact(args.url))
        except ImportError as exc:
            raise CommandError(f"--plot needs matplotlib ({exc}): pip install 'ckptstore[plot]'", EXIT_ERROR,
                               "ImportError") from exc
    if args.json:
        print_json([r.as_dict() for r in rows])
        return EXIT_OK
    if not rows:
        print(f"no steps in {redact(args.url)}")
    else:
        print(table(
            ["STEP", "LOGICAL", "NEW", "STORED", "DEDUP"],
            [[str(r.step), human_bytes(r.logical_bytes), human_bytes(r.new_bytes), human_bytes(r.stored_bytes),
              f"{r.dedup_ratio:.2f}x" if r.dedup_ratio is not None else "-"] for r in rows],
            right={0, 1, 2, 3, 4},
        ))
        print("LOGICAL: the step's tensor bytes; NEW: stored bytes of chunks no earlier step references; "
              "STORED: NEW summed up to the step; DEDUP: LOGICAL summed up to the step / STORED")
    if args.plot is not None:
        print(f"plot written to {args.plot}")
    return EXIT_OK


def cmd_diff(args: argparse.Namespace) -> int:
    with _open(args.url) as store:
        result = store.diff(args.a, args.b, values=args.values)
    if args.json:
        print_json(result.as_dict())
        return EXIT_OK
    print(format_diff(result, limit=None if args.all else DIFF_LIST_LIMIT))
    return EXIT_OK


def cmd_cp(args: argparse.Namespace) -> int:
    import ckptstore
    from ckptstore.copy import copy_steps

    with _open(args.src) as src:
        steps = _select_steps(src, args.steps) if args.steps else None
        if steps == []:
            raise CommandError("no committed steps in that range", EXIT_NOT_FOUND, "StepNotFoundError")
        # A new destination store gets the source's hash algorithm, so keys stay the same.
        with ckptstore.open(args.dst, hash_algorithm=src.marker.hash_algorithm) as dst:
            report = copy_steps(src, dst, steps, overwrite=args.overwrite, skip_existing=args.skip_existing,
                                progress=True, tags=not args.no_tags)
    if args.json:
        print_json(report.as_dict())
        return EXIT_OK
    print(f"copied {report.steps_copied} steps" + (f" ({_brief(report.steps)})" if report.steps else "")
          + f" from {redact(report.src)} to {redact(report.dst)}: {report.chunks_copied} chunks, "
          f"{human_bytes(report.bytes_copied)} transferred, {report.chunks_skipped} chunks already there "
          f"({report.seconds:.1f}s)")
    if report.tags:
        print(f"tagged {len(report.tags)}: {', '.join(report.tags)}")
    return EXIT_OK


def _needs_safetensors(command: str) -> int:
    raise CommandError("needs the safetensors package: pip install 'ckptstore[safetensors]'", EXIT_ERROR,
                       "ImportError")


def cmd_export(args: argparse.Namespace) -> int:
    if args.format == "dcp" and args.max_shard_size is not None:
        raise CommandError("--max-shard-size applies to safetensors only")
    try:
        from ckptstore.interop import export_dcp, export_safetensors
    except ImportError:
        return _needs_safetensors("export")
    with _open(args.url) as store:
        step = resolve_step(store, args.step)
        try:
            if args.format == "dcp":
                files = export_dcp(store, step, args.out, trust_pickle=args.trust_pickle)
            else:
                files = export_safetensors(store, step, args.out, max_shard_bytes=args.max_shard_size,
                                           progress=True)
        except ImportError:
            return _needs_safetensors("export")
        except OSError as exc:
            raise CommandError(str(exc), EXIT_ERROR, type(exc).__name__) from exc
    if args.json:
        print_json({"step": step, "format": args.format, "files": [str(f) for f in files]})
        return EXIT_OK
    print(f"exported step {step} as {args.format} to {len(files)} file(s):")
    for f in files:
        print(f"  {f}")
    return EXIT_OK


def cmd_import(args: argparse.Namespace) -> int:
    import ckptstore

    try:
        from ckptstore.interop import detect_format, import_checkpoint
    except ImportError:
        return _needs_safetensors("import")
    kind = detect_format(args.source)
    with ckptstore.open(args.url) as store:
        try:
            info = import_checkpoint(store, args.step, args.source, overwrite=args.overwrite)
        except ImportError:
            return _needs_safetensors("import")
        except OSError as exc:
            raise CommandError(str(exc), EXIT_ERROR, type(exc).__name__) from exc
    if args.json:
        print_json({"format": kind, **info.__dict__})
        return EXIT_OK
    print(f"imported {args.source} ({kind}) as step {info.step}: {info.tensors} tensors, "
          f"{human_bytes(info.logical_bytes)} logical, {human_bytes(info.new_bytes)} new in "
          f"{info.new_chunks} of {info.chunks} chunks" + (" (replaced the step)" if info.replaced else ""))
    return EXIT_OK


def _print_fields(fields: dict[str, Any]) -> None:
    width = max((len(k) for k in fields), default=0)
    for name, value in fields.items():
        if name.endswith("_bytes") and isinstance(value, int):
            value = human_bytes(value)
        elif isinstance(value, float):
            value = f"{value:.2f}"
        elif isinstance(value, list):
            value = ", ".join(map(str, value)) if value else "-"
        print(f"{name.replace('_', ' '):{width}}  {value}")


def cmd_gc(args: argparse.Namespace) -> int:
    with _open(args.url) as store:
        report = store.gc(dry_run=args.dry_run, min_age=args.min_age, cache=not args.no_cache)
    if args.json:
        print_json(report.as_dict())
    else:
        fields = report.as_dict()
        if report.dry_run:  # nothing was deleted: say what a sweep would delete
            fields = {k.replace("deleted_", "would_delete_"): v for k, v in fields.items()
                      if k != "staging_removed"}
        _print_fields(fields)
        objects = f"{report.deleted_manifests} manifests and {report.deleted_chunks} chunks"
        if report.dry_run:
            print(f"dry run: would delete {objects} ({human_bytes(report.deleted_bytes)}); nothing was deleted")
        elif report.ran:
            print(f"deleted {objects}, freeing {human_bytes(report.deleted_bytes)}")
        if report.kept_young:
            print(f"kept {report.kept_young} unreferenced objects younger than --min-age {args.min_age:g}s "
                  f"(a save in flight may still need them); 'ckptstore gc {redact(args.url)} --min-age 0' "
                  "frees them now")
    if report.failed:  # it failed closed: kept everything, and says why
        print(f"ckptstore gc {redact(args.url)}: {report.reason}", file=sys.stderr)
        for broken in report.broken_refs:
            print(f"  {broken}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def cmd_tag(args: argparse.Namespace) -> int:
    with _open(args.url) as store:
        if args.delete:
            if args.name is None or args.step is not None:
                raise CommandError("--delete takes a NAME and no STEP")
            store.untag(args.name)
            result: dict[str, Any] = {"deleted": args.name}
            text = f"deleted tag {args.name}"
        elif args.step is not None:
            step = resolve_step(store, args.step)
            store.tag(args.name, step, overwrite=args.force)
            result = {"tag": args.name, "step": step}
            text = f"tagged step {step} as {args.name}"
        else:
            tags = store.tags()
            if args.name is not None:
                if args.name not in tags:
                    raise errors.TagNotFoundError(args.name, store.url)
                tags = {args.name: tags[args.name]}
            if args.json:
                print_json(tags)
            elif tags:
                print(table(["TAG", "STEP"], [[n, str(s)] for n, s in tags.items()], right={1}))
            else:
                print(f"no tags in {args.url}")
            return EXIT_OK
    if args.json:
        print_json(result)
    else:
        print(text)
    return EXIT_OK


def cmd_locks(args: argparse.Namespace) -> int:
    with _open(args.url) as store:
        cleared = store.clear_stale_locks() if args.clear_stale else []
        locks = store.locks()
    if args.json:
        print_json({"locks": [lock.as_dict() for lock in locks], "cleared": [lock.as_dict() for lock in cleared]})
        return EXIT_OK
    for lock in cleared:
        print(f"cleared stale {lock.kind} {lock.name} (owner {lock.owner}, {lock.age_seconds:.0f}s old)")
    if locks:
        print(table(["NAME", "KIND", "OWNER", "AGE", "STALE"],
                     [[lk.name, lk.kind, lk.owner, f"{lk.age_seconds:.0f}s", "stale" if lk.stale else ""]
                      for lk in locks], right={3}))
    else:
        print(f"no locks in {args.url}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    run_demo(args.dir, steps=args.steps)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
    show.add_argument("step", type=_step_arg, help="step number, 'latest' or a tag name")
    show.add_argument("--tree", action="store_true",
                      help="also print the step's non-tensor values (config, counters), tensors as placeholders")
    show.add_argument("--json", action="store_true", help="print JSON for scripts")
    show.set_defaults(run=cmd_show)

    diff = sub.add_parser("diff", help="what changed between two steps: tensors added, removed, changed",
                          description="Compare step B with step A (numbers, 'latest' or tag names): tensors "
                                      "added, removed, changed and unchanged, with bytes. Decided from chunk "
                                      "digests in the manifests: no tensor data is read. A small tensor packed "
                                      "into a chunk with others counts as changed when its pack changed (marked "
                                      "'packed': its own bytes may be equal). --values reads the changed tensors "
                                      "(only those), settles the packed ones and reports each one's max abs "
                                      "difference and relative L2 change ||B - A|| / ||A|| (needs numpy, and "
                                      "torch for torch tensors).")
    diff.add_argument("url", help="store URL or path")
    diff.add_argument("a", metavar="A", type=_step_arg, help="step number, 'latest' or a tag name")
    diff.add_argument("b", metavar="B", type=_step_arg, help="step number, 'latest' or a tag name")
    diff.add_argument("--values", action="store_true",
                      help="read the changed tensors: max abs difference and relative L2 change")
    diff.add_argument("--all", action="store_true",
                      help=f"list every tensor name (default: at most {DIFF_LIST_LIMIT} per category)")
    diff.add_argument("--json", action="store_true", help="print JSON for scripts (every tensor)")
    diff.set_defaults(run=cmd_diff)

    rm = sub.add_parser("rm", help="delete steps (refs only; gc frees data)",
                        description="Delete steps' refs. Data shared with other steps stays; unreferenced data "
                                    "is freed by gc. Asks for confirmation unless --yes.")
    rm.add_argument("url", help="store URL or path")
    rm.add_argument("steps", nargs="+", type=_step_spec, metavar="STEP",
                    help="step numbers, 'latest', tag names (the step the tag names) or inclusive ranges like 100-200")
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

    verify = sub.add_parser("verify", help="check that steps are intact (exit 1 on problems)",
                            description="Check every step (or the STEPs given): its ref decodes, its manifest exists "
                                        "and hashes to its key, and every chunk exists with the recorded size. "
                                        "--deep also reads, decodes and re-hashes every chunk. Each object is "
                                        "checked once; every problem is listed, for every step it affects. "
                                        "Exit 0 when intact, 1 when anything is damaged or missing.")
    verify.add_argument("url", help="store URL or path")
    verify.add_argument("steps", nargs="*", metavar="STEP", type=_step_spec,
                        help="step numbers, 'latest', tag names or inclusive ranges like 100-200 "
                        "(default: every step)")
    verify.add_argument("--deep", action="store_true", help="read and re-hash every chunk (reads all data)")
    verify.add_argument("--json", action="store_true", help="print JSON for scripts")
    verify.set_defaults(run=cmd_verify)

    du = sub.add_parser("du", help="disk usage: logical, stored, dedup and garbage bytes",
                        description="Show logical bytes (summed over steps), the stored bytes steps reference and "
                                    "the dedup ratio, everything stored under chunks/ and manifests/, and the "
                                    "garbage no ref reaches (what gc frees). Reads refs and manifests and lists "
                                    "objects; never reads chunk data.")
    du.add_argument("url", help="store URL or path")
    du.add_argument("--history", action="store_true",
                    help="per step: logical bytes, new bytes (chunks no earlier step references), stored bytes "
                         "so far and the dedup ratio so far")
    du.add_argument("--plot", metavar="FILE.png", default=None, type=_output_path,
                    help="draw the --history as a PNG (implies --history; needs matplotlib: "
                         "pip install 'ckptstore[plot]')")
    du.add_argument("--json", action="store_true", help="print JSON for scripts")
    du.set_defaults(run=cmd_du)

    cp = sub.add_parser("cp", help="copy steps between stores (any backends)",
                        description="Copy steps from SRC to DST (local, s3://, gs://, in any combination). Only "
                                    "chunks DST lacks are transferred, each checked against its hash first; then "
                                    "the manifest, then the step is committed exactly as a save commits it. A new "
                                    "DST store is created with SRC's hash algorithm. A step that exists in DST is "
                                    "an error (exit 4) unless --overwrite or --skip-existing.")
    cp.add_argument("src", metavar="SRC", help="source store URL or path")
    cp.add_argument("dst", metavar="DST", help="destination store URL or path (created if absent)")
    cp.add_argument("--steps", nargs="+", metavar="STEP", default=None, type=_step_spec,
                    help="step numbers, 'latest', tag names or inclusive ranges like 100-200 (default: every step)")
    mode = cp.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true", help="atomically replace steps that exist in DST")
    mode.add_argument("--skip-existing", action="store_true", help="leave steps that exist in DST as they are")
    cp.add_argument("--no-tags", action="store_true",
                    help="do not copy the source's tags (default: tags naming copied steps are copied too)")
    cp.add_argument("--json", action="store_true", help="print JSON for scripts")
    cp.set_defaults(run=cmd_cp)

    export = sub.add_parser("export", help="write a step as safetensors or a DCP directory (needs torch)",
                            description="Write STEP ('latest' for the newest) as a safetensors file, or, when OUT "
                                        "ends with '/', is a directory, or --max-shard-size is given, as "
                                        "model-0000i-of-0000N.safetensors shards plus model.safetensors.index.json. "
                                        "Tensor names are tree paths joined with '.'; the other values of the state "
                                        "go into the metadata as JSON (key ckptstore.tree). With --format dcp, OUT "
                                        "becomes a torch.distributed.checkpoint directory instead.")
    export.add_argument("url", help="store URL or path")
    export.add_argument("step", type=_step_arg, help="step number, 'latest' or a tag name")
    export.add_argument("out", help="output .safetensors file, or a directory for shards")
    export.add_argument("--max-shard-size", type=parse_size, default=None, metavar="SIZE",
                        help="shard size limit, e.g. 2GiB or 5GB (implies a sharded directory)")
    export.add_argument("--format", choices=("safetensors", "dcp"), default="safetensors",
                        help="dcp: OUT becomes a torch.distributed.checkpoint directory (FileSystemWriter "
                             "layout) that dcp.load(state, checkpoint_id=OUT) reads; OUT must be new or empty")
    export.add_argument("--trust-pickle", action="store_true",
                        help="dcp: skip the weights_only check of pickled values of a step saved through DCP")
    export.add_argument("--json", action="store_true", help="print JSON for scripts")
    export.set_defaults(run=cmd_export)

    imp = sub.add_parser("import", help="save a safetensors, torch.save, DCP or Hugging Face Trainer checkpoint "
                                        "as a step",
                         description="Save SOURCE as STEP: a .safetensors file or a directory with a "
                                     "*.safetensors.index.json, a torch.save file (read with "
                                     "torch.load(weights_only=True)), a torch.distributed.checkpoint directory "
                                     "(it has a .metadata file; read with restricted unpickling), or a Hugging Face "
                                     "Trainer checkpoint-N/ directory (weights, optimizer, scheduler, RNG and trainer "
                                     "state; training_args.bin kept as bytes, never unpickled). The store is "
                                     "created if absent. Exit 4 if the step exists and no --overwrite.")
    imp.add_argument("url", help="store URL or path")
    imp.add_argument("step", type=int, help="step number to save as")
    imp.add_argument("source", help="checkpoint file or directory")
    imp.add_argument("--overwrite", action="store_true", help="atomically replace the step if it exists")
    imp.add_argument("--json", action="store_true", help="print JSON for scripts")
    imp.set_defaults(run=cmd_import)

    gc = sub.add_parser("gc", help="free chunks and manifests no ref reaches",
                        description="Delete chunks and manifests that no step or tag references and that are older "
                                    "than --min-age. Safe while other processes save: gc stands down while save "
                                    "leases are fresh. --dry-run only reports what it would free.")
    gc.add_argument("url", help="store URL or path")
    gc.add_argument("--dry-run", action="store_true", help="report what would be freed, delete nothing")
    gc.add_argument("--min-age", type=_seconds, default=3600.0, metavar="SECONDS",
                    help="keep unreferenced objects younger than this (default 3600)")
    gc.add_argument("--no-cache", action="store_true",
                    help="read every ref and manifest from the store; without it, what an earlier gc on this "
                         "machine read and the store shows unchanged comes from its cache ($CKPTSTORE_CACHE_DIR)")
    gc.add_argument("--json", action="store_true", help="print JSON for scripts")
    gc.set_defaults(run=cmd_gc)

    tag = sub.add_parser("tag", help="list, set or delete named refs (tags) of steps",
                         description="'tag URL' lists tags; 'tag URL NAME' shows one; 'tag URL NAME STEP' names a "
                                     "step (exit 4 if NAME exists, unless --force); 'tag URL NAME --delete' removes "
                                     "it. A tagged step is kept by retention, and its data by gc.")
    tag.add_argument("url", help="store URL or path")
    tag.add_argument("name", nargs="?", default=None, help="tag name (letters, digits, '.', '_', '-')")
    tag.add_argument("step", nargs="?", type=_step_arg, default=None,
                     help="step number, 'latest' or another tag's name")
    tag.add_argument("-f", "--force", action="store_true", help="move the tag if it names another step")
    tag.add_argument("--delete", action="store_true", help="delete the tag NAME")
    tag.add_argument("--json", action="store_true", help="print JSON for scripts")
    tag.set_defaults(run=cmd_tag)

    locks = sub.add_parser("locks", help="list leases and locks; clear stale ones",
                           description="List objects under locks/ (save and load leases, the gc lock and epoch) with "
                                       "owner, age and whether they are stale (not refreshed within the lease TTL: "
                                       "their holder died). --clear-stale deletes the stale ones.")
    locks.add_argument("url", help="store URL or path")
    locks.add_argument("--clear-stale", action="store_true", help="delete stale leases and locks")
    locks.add_argument("--json", action="store_true", help="print JSON for scripts")
    locks.set_defaults(run=cmd_locks)

    demo = sub.add_parser("demo", help="train a tiny model, save, overwrite, resume (needs torch)",
                          description="Train a tiny model on CPU, saving every step into DIR; show the "
                                      "StepExistsError, an atomic overwrite, a resume, and the listing.")
    demo.add_argument("dir", nargs="?", default="./demo-ckpts", help="store directory (default ./demo-ckpts)")
    demo.add_argument("--steps", type=int, default=6, help="training steps (default 6)")
    demo.set_defaults(run=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except _UsageError as exc:
        as_json = any(len(a) > 2 and "--json".startswith(a) for a in argv)  # argparse takes --js too
        if not as_json:
            exc.parser.print_usage(sys.stderr)
        return _fail(as_json, f"{exc.parser.prog}: error", "UsageError", exc.message, EXIT_USAGE)
    except SystemExit as exc:  # --help or --version
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    as_json = bool(getattr(args, "json", False))
    prefix = f"ckptstore {args.command}"
    try:
        return int(args.run(args))
    except CommandError as exc:
        return _fail(as_json, prefix, exc.kind, exc.message, exc.code)
    except (errors.StepNotFoundError, errors.StoreNotFoundError) as exc:
        return _fail(as_json, prefix, type(exc).__name__, str(exc), EXIT_NOT_FOUND)
    except (errors.StepExistsError, errors.CommitConflictError, errors.TagExistsError) as exc:
        return _fail(as_json, prefix, type(exc).__name__, str(exc), EXIT_EXISTS)
    except errors.CkptStoreError as exc:
        url = getattr(args, "url", None) or getattr(args, "src", None)
        where = f" {redact(url)}" if url else ""
        if as_json:
            return _fail(as_json, prefix, type(exc).__name__, str(exc), EXIT_ERROR)
        return _fail(as_json, f"{prefix}{where}", type(exc).__name__, f"{type(exc).__name__}: {exc}", EXIT_ERROR)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `ckptstore ls | head`: the reader left, not an error
        sys.stderr.close()
        return EXIT_OK
    except OSError as exc:  # a local file or path the command was given
        return _fail(as_json, prefix, type(exc).__name__, str(exc), EXIT_ERROR)
    except Exception as exc:  # a bug: still an exit code and one line, never a traceback
        return _fail(as_json, prefix, type(exc).__name__,
                     f"internal error: {type(exc).__name__}: {exc} (please report it)", EXIT_ERROR)


if __name__ == "__main__":
    sys.exit(main())
