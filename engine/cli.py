"""The ``cowchain`` command: argument parsing and output only; the work is in engine.repository.

Usage: ``cowchain [--repo DIR] [--output human|json] GROUP VERB ...`` (``--repo`` defaults to
``$COWCHAIN_REPO``; both options may also follow the verb).  See ``cowchain --help``.

Exit codes: 0 success; 2 usage error; the ``exit_code`` of the EngineError subclass for an
engine error (engine/errors.py: 15 repository request refused, 16 not found, 9 image locked,
...); for ``check``: 2 problems remain, 3 only leaked clusters remain; 74 an OS error on a
file named on the command line; 70 an internal error; 130 interrupted.  Errors are one line
on stderr, never a traceback (set COWCHAIN_DEBUG=1 to get the traceback too).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

from engine.errors import EngineError

EX_USAGE = 2
EX_SOFTWARE = 70
EX_IOERR = 74
EX_INTERRUPTED = 130

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50,
          "E": 1 << 60}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTPE]?)(?:I?B)?\s*$", re.IGNORECASE)


class UsageError(Exception):
    """A command line that does not make sense (exit 2)."""


def parse_size(text: str) -> int:
    """'10G' -> 10737418240: qemu-img's suffixes (K, M, G, T, P, E; powers of 1024; an
    optional 'B' or 'iB'); a bare number is bytes."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (examples: 4096, 512M, 10G)")
    value = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if value != int(value):
        raise argparse.ArgumentTypeError(f"size {text!r} is not a whole number of bytes")
    return int(value)


def human_size(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            if unit == "bytes":
                return f"{n} bytes"
            return f"{n:.1f} {unit}".replace(".0 ", " ")
        n /= 1024
    return str(n)  # not reached


# --- progress bar ---------------------------------------------------------------------------

class ProgressBar:
    """A one-line bar on stderr, redrawn at most 10 times a second; only on a TTY."""

    def __init__(self, label: str, stream=None):
        self.label = label
        self.stream = stream or sys.stderr
        self.last = 0.0
        self.shown = False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self.last < 0.1:
            return
        self.last = now
        frac = done / total if total else 1.0
        width = 30
        filled = int(frac * width)
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] "
                          f"{frac * 100:5.1f}% {human_size(done)}/{human_size(total)}\x1b[K")
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()


def _progress(args, label: str):
    if getattr(args, "no_progress", False) or not sys.stderr.isatty():
        return None
    return ProgressBar(label)


# --- output helpers -------------------------------------------------------------------------

def _emit(args, obj, human: str | None) -> None:
    if args.output == "json":
        json.dump(obj, sys.stdout, indent=2, sort_keys=False)
        sys.stdout.write("\n")
    elif human is not None:
        sys.stdout.write(human if human.endswith("\n") or not human else human + "\n")


def _short(ident: str | None) -> str:
    return "-" if ident is None else ident


def _table(rows: list[list[str]], header: list[str]) -> str:
    rows = [header] + rows
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _chain_human(d: dict) -> str:
    lines = [
        f"chain:      {d['name']}",
        f"size:       {human_size(d['size'])} ({d['size']} bytes)",
        f"cluster:    {human_size(d['cluster_size'])}",
        f"created:    {d['created']}",
        f"leaf:       {d['leaf']}",
    ]
    if d["previewing"]:
        lines.append(f"state:      previewing snapshot {d['previewing']} "
                     "(commit-preview or undo-preview)")
    if d["origin"]:
        lines.append(f"clone of:   {d['origin']['chain']} at snapshot {d['origin']['snapshot']}")
    lines.append("volumes (base first):")
    lines.append(_indent(_table([[v["id"], v["format"], v["role"], v["legality"],
                                  os.path.relpath(v["path"], os.path.dirname(
                                      os.path.dirname(v["path"])))]
                                 for v in d["volumes"]],
                                ["ID", "FORMAT", "ROLE", "LEGALITY", "FILE"])))
    lines.append("snapshots (oldest first):")
    if d["snapshots"]:
        lines.append(_indent(_snapshots_table(d["snapshots"])))
    else:
        lines.append("  (none)")
    return "\n".join(lines)


def _snapshots_table(snaps: list[dict]) -> str:
    return _table([[s["id"], s["created"][:19].replace("T", " "), s["volume"],
                    s["description"]] for s in snaps],
                  ["ID", "CREATED (UTC)", "VOLUME", "DESCRIPTION"])


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


# --- verbs ------------------------------------------------------------------------------------

def _repo_dir(args) -> str:
    path = getattr(args, "repo", None) or os.environ.get("COWCHAIN_REPO")
    if not path:
        raise UsageError("no repository: pass --repo DIR or set COWCHAIN_REPO")
    return path


def _open_repo(args, *, readonly: bool = False):
    from engine.repository import Repository

    return Repository.open(_repo_dir(args), readonly=readonly)


def cmd_repo_init(args) -> int:
    from engine.repository import Repository

    path = args.dir or _repo_dir(args)
    with Repository.create(path) as repo:
        _emit(args, {"repository": repo.path, "created": True},
              f"Created repository {repo.path}")
    return 0


def cmd_check(args) -> int:
    with _open_repo(args) as repo:
        res = repo.check(repair=args.repair, chain=getattr(args, "name", None))
        d = res.to_dict()
        if args.output == "json":
            _emit(args, d, None)
        else:
            lines = []
            for p in res.problems:
                state = ("repaired" if p.repaired else "NOT repaired" if args.repair
                         else "problem")
                what = f" ({p.repair})" if p.repair else ""
                lines.append(f"{state}: [{p.kind}] {p.message}{what}")
            n = len(res.volumes)
            if not res.problems:
                lines.append(f"No problems found ({n} volumes checked).")
            elif res.ok:
                lines.append(f"All problems repaired ({n} volumes checked).")
            else:
                left = sum(not p.repaired for p in res.problems)
                lines.append(f"{left} problem(s) left ({n} volumes checked)"
                             + ("" if args.repair else "; run with --repair to fix what can be"))
            _emit(args, d, "\n".join(lines))
        return res.exit_code


def cmd_create(args) -> int:
    with _open_repo(args) as repo:
        c = repo.create_chain(args.name, args.size, base_format=args.format,
                              cluster_size=args.cluster_size)
        d = c.to_dict()
        _emit(args, d, f"Created chain {args.name} ({human_size(d['size'])}, "
                       f"{args.format} base volume {d['leaf']})")
    return 0


def cmd_import(args) -> int:
    with _open_repo(args) as repo:
        bar = _progress(args, "importing")
        try:
            c = repo.import_chain(args.name, args.source, format=args.source_format,
                                  base_format=args.format, cluster_size=args.cluster_size,
                                  progress=bar)
        finally:
            if bar:
                bar.close()
        d = c.to_dict()
        _emit(args, d, f"Imported {args.source} as chain {args.name} "
                       f"({human_size(d['size'])}, {args.format} base volume {d['leaf']})")
    return 0


def cmd_resize(args) -> int:
    with _open_repo(args) as repo:
        c = repo.chain(args.name)
        c.resize(args.size)
        d = c.to_dict()
        _emit(args, d, f"Resized {args.name} to {human_size(d['size'])}")
    return 0


def cmd_list(args) -> int:
    with _open_repo(args, readonly=True) as repo:
        items = []
        for c in repo.chains():
            d = c.to_dict()
            items.append({"name": d["name"], "size": d["size"], "volumes": len(d["volumes"]),
                          "snapshots": len(d["snapshots"]), "previewing": d["previewing"],
                          "origin": d["origin"]})
        rows = [[i["name"], human_size(i["size"]), str(i["volumes"]), str(i["snapshots"]),
                 "previewing" if i["previewing"] else
                 (f"clone of {i['origin']['chain']}" if i["origin"] else "")]
                for i in items]
        _emit(args, items, _table(rows, ["NAME", "SIZE", "VOLUMES", "SNAPSHOTS", "STATE"])
              if items else "(no chains)")
    return 0


def cmd_info(args) -> int:
    with _open_repo(args, readonly=True) as repo:
        d = repo.chain(args.name).to_dict()
        _emit(args, d, _chain_human(d))
    return 0


def cmd_snapshot(args) -> int:
    with _open_repo(args) as repo:
        s = repo.chain(args.name).snapshot(args.description, force=args.force)
        # The id alone on stdout, so that SNAP=$(cowchain chain snapshot vm1) works.
        _emit(args, s.to_dict(), s.id)
    return 0


def cmd_snapshots(args) -> int:
    with _open_repo(args, readonly=True) as repo:
        snaps = [s.to_dict() for s in repo.chain(args.name).snapshots]
        _emit(args, snaps, _snapshots_table(snaps) if snaps else "(no snapshots)")
    return 0


def _chain_op(args, verb: str, message: str) -> int:
    with _open_repo(args) as repo:
        c = repo.chain(args.name)
        if verb in ("revert", "preview"):
            getattr(c, verb)(args.snapshot)
        else:
            getattr(c, verb)()
        d = c.to_dict()
        _emit(args, d, message.format(name=args.name, snapshot=getattr(args, "snapshot", ""),
                                      leaf=d["leaf"]))
    return 0


def cmd_revert(args) -> int:
    return _chain_op(args, "revert", "Reverted {name} to snapshot {snapshot} (new leaf {leaf})")


def cmd_preview(args) -> int:
    return _chain_op(args, "preview", "Previewing snapshot {snapshot} of {name} (leaf {leaf}); "
                                      "commit-preview keeps it, undo-preview drops it")


def cmd_commit_preview(args) -> int:
    return _chain_op(args, "commit_preview", "Kept the previewed state of {name}")


def cmd_undo_preview(args) -> int:
    return _chain_op(args, "undo_preview", "Dropped the preview of {name}")


def cmd_delete_snapshot(args) -> int:
    with _open_repo(args) as repo:
        bar = _progress(args, "merging")
        try:
            r = repo.chain(args.name).delete_snapshot(args.snapshot, progress=bar)
        finally:
            if bar:
                bar.close()
        how = ("committed the next volume down into it" if r.direction == "commit"
               else "pulled its clusters up into the next volume")
        _emit(args, r.to_dict(), f"Deleted snapshot {r.snapshot}: {how} "
                                 f"({human_size(r.copied_bytes)} copied; removed volume "
                                 f"{r.removed_volume})")
    return 0


def cmd_clone(args) -> int:
    with _open_repo(args) as repo:
        c = repo.chain(args.name).clone(args.snapshot, args.new_name)
        d = c.to_dict()
        _emit(args, d, f"Created clone {args.new_name} of {args.name} at snapshot "
                       f"{d['origin']['snapshot']} (leaf {d['leaf']})")
    return 0


def cmd_export(args) -> int:
    with _open_repo(args) as repo:
        bar = _progress(args, "exporting")
        try:
            r = repo.chain(args.name).export(args.dest, format=args.format,
                                             snapshot_id=args.snapshot, progress=bar,
                                             overwrite=args.force)
        finally:
            if bar:
                bar.close()
        what = f"snapshot {r.snapshot} of {args.name}" if r.snapshot else args.name
        _emit(args, r.to_dict(), f"Exported {what} to {r.path} ({r.format}, "
                                 f"{human_size(r.size)} virtual, {human_size(r.data_bytes)} "
                                 "of data)")
    return 0


def cmd_diff(args) -> int:
    with _open_repo(args, readonly=True) as repo:
        changes = [c.to_dict() for c in repo.chain(args.name).diff(args.from_snapshot,
                                                                   args.to_snapshot)]
        total = sum(c["length"] for c in changes)
        rows = [[str(c["start"]), str(c["length"]), "zero" if c["zero"] else "data"]
                for c in changes]
        _emit(args, changes, (_table(rows, ["START", "LENGTH", "READS"]) +
                              f"\n{len(changes)} ranges, {human_size(total)} changed")
              if changes else "No changes.")
    return 0


def cmd_delete(args) -> int:
    with _open_repo(args) as repo:
        repo.delete_chain(args.name)
        _emit(args, {"deleted": args.name}, f"Deleted chain {args.name}")
    return 0


def cmd_write(args) -> int:
    if args.file is not None:
        if args.file == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(args.file, "rb") as f:
                data = f.read()
    elif args.pattern is not None:
        if args.length is None:
            raise UsageError("--pattern needs --length")
        data = bytes([args.pattern]) * args.length
    else:
        raise UsageError("give --file PATH (or -) or --pattern BYTE --length N")
    with _open_repo(args) as repo:
        c = repo.chain(args.name)
        c.write(args.offset, data)
        c.flush()
        _emit(args, {"chain": args.name, "offset": args.offset, "length": len(data)},
              f"Wrote {human_size(len(data))} at offset {args.offset} of {args.name}")
    return 0


def cmd_read(args) -> int:
    import hashlib

    with _open_repo(args, readonly=True) as repo:
        c = repo.chain(args.name)
        if args.snapshot is not None:
            with c.open_snapshot(args.snapshot) as img:
                data = img.read(args.offset, args.length)
        else:
            data = c.read(args.offset, args.length)
    if args.out:
        with open(args.out, "wb") as f:
            f.write(data)
    elif args.output != "json":
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return 0
    _emit(args, {"chain": args.name, "snapshot": args.snapshot, "offset": args.offset,
                 "length": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                 "out": args.out}, f"Read {human_size(len(data))} into {args.out}")
    return 0


# --- parser -----------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line on stderr (exit 2)."""

    def error(self, message):
        self.exit(EX_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _byte(text: str) -> int:
    try:
        v = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid byte {text!r}") from None
    if not 0 <= v <= 255:
        raise argparse.ArgumentTypeError(f"byte {text!r} is out of 0..255")
    return v


def build_parser() -> argparse.ArgumentParser:
    def options(parser, default):
        # Given before the group or after the verb: the verb's copy has no default, so it
        # only overrides what the top level parsed when it is given.
        parser.add_argument("--repo", metavar="DIR",
                            default=None if default else argparse.SUPPRESS,
                            help="the repository folder (default: $COWCHAIN_REPO)")
        parser.add_argument("--output", choices=("human", "json"),
                            default="human" if default else argparse.SUPPRESS,
                            help="output format (default: human)")
        return parser

    common = options(argparse.ArgumentParser(add_help=False), False)
    p = options(_Parser(prog="cowchain",
                        description="Manage QCOW2 snapshot chains (oVirt-style) in a "
                                    "repository.",
                        epilog="Sizes take K, M, G, T suffixes (powers of 1024). Snapshot ids "
                               "may be abbreviated to a unique prefix of 4+ characters. Exit "
                               "codes: 0 success, 2 usage error (check: problems remain), 3 "
                               "check: only leaked clusters remain, 9 image locked, 12 invalid "
                               "argument, 15 request refused, 16 not found, 74 file error, 70 "
                               "internal error; the rest as engine/errors.py."), True)
    groups = p.add_subparsers(dest="group", metavar="{repo,chain}", parser_class=_Parser)
    groups.required = True

    repo = groups.add_parser("repo", help="create and check repositories")
    rverbs = repo.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    rverbs.required = True
    v = rverbs.add_parser("init", parents=[common], help="create a repository in DIR")
    v.add_argument("dir", nargs="?", metavar="DIR")
    v.set_defaults(func=cmd_repo_init)
    v = rverbs.add_parser("check", parents=[common],
                          help="compare catalog and volume files; check every volume")
    v.add_argument("--repair", action="store_true", help="fix what can be fixed")
    v.set_defaults(func=cmd_check)

    chain = groups.add_parser("chain", help="create, snapshot, merge, clone, export chains")
    verbs = chain.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    verbs.required = True

    def verb(name, func, help, *names):
        sp = verbs.add_parser(name, parents=[common], help=help, description=help)
        for n in names:
            sp.add_argument(n, metavar=n.upper().replace("_", "-"))
        sp.set_defaults(func=func)
        return sp

    sp = verb("create", cmd_create, "create a chain (one base volume)", "name")
    sp.add_argument("size", type=parse_size, metavar="SIZE", help="virtual size, e.g. 10G")
    sp.add_argument("--format", choices=("raw", "qcow2"), default="raw",
                    help="format of the base volume (default: raw)")
    sp.add_argument("--cluster-size", type=parse_size, default=65536, metavar="SIZE",
                    help="cluster size of the qcow2 volumes (default: 64K)")
    sp = verb("import", cmd_import, "create a chain whose base volume is a copy of an "
                                    "existing disk image (the source is not changed)",
              "name", "source")
    sp.add_argument("-f", "--source-format", choices=("raw", "qcow2"), required=True,
                    help="the source's format (never guessed)")
    sp.add_argument("--format", choices=("raw", "qcow2"), default="raw",
                    help="format of the new base volume (default: raw)")
    sp.add_argument("--cluster-size", type=parse_size, default=65536, metavar="SIZE",
                    help="cluster size of the qcow2 volumes (default: 64K)")
    sp.add_argument("--no-progress", action="store_true", help="no progress bar")
    sp = verb("resize", cmd_resize, "grow a chain's disk (snapshots keep their size; "
                                    "revert to one gives the disk its size again)", "name")
    sp.add_argument("size", type=parse_size, metavar="SIZE", help="new virtual size, e.g. 20G")
    verb("list", cmd_list, "list the chains")
    verb("info", cmd_info, "show a chain's volumes and snapshots", "name")
    sp = verb("snapshot", cmd_snapshot, "take a snapshot (prints its id)", "name")
    sp.add_argument("-d", "--description", default="", help="free text")
    sp.add_argument("--force", action="store_true",
                    help="take it even though a volume of the chain is known to be damaged")
    verb("snapshots", cmd_snapshots, "list a chain's snapshots, oldest first", "name")
    verb("revert", cmd_revert, "make the disk read as it did at a snapshot, at the size it "
                               "had then; newer snapshots are removed", "name", "snapshot")
    verb("preview", cmd_preview, "run on a snapshot's content, keeping the current state "
                                 "aside", "name", "snapshot")
    verb("commit-preview", cmd_commit_preview, "keep the previewed state (newer snapshots "
                                               "are removed)", "name")
    verb("undo-preview", cmd_undo_preview, "drop the preview and return to the state kept "
                                           "aside", "name")
    sp = verb("delete-snapshot", cmd_delete_snapshot, "merge a snapshot away (the disk and "
                                                      "other snapshots do not change)",
              "name", "snapshot")
    sp.add_argument("--no-progress", action="store_true", help="no progress bar")
    sp = verb("clone", cmd_clone, "create a linked clone of a snapshot as a new chain",
              "name", "snapshot")
    sp.add_argument("new_name", metavar="NEW-NAME")
    sp = verb("export", cmd_export, "write the disk (or a snapshot) as one self-contained "
                                    "image", "name")
    sp.add_argument("dest", metavar="DEST")
    sp.add_argument("--format", choices=("raw", "qcow2"), default="raw")
    sp.add_argument("--snapshot", metavar="ID", help="export this snapshot")
    sp.add_argument("--force", action="store_true", help="overwrite DEST")
    sp.add_argument("--no-progress", action="store_true", help="no progress bar")
    sp = verb("diff", cmd_diff, "ranges changed between two snapshots (or a snapshot and "
                                "now), from the tables alone", "name")
    sp.add_argument("from_snapshot", metavar="FROM")
    sp.add_argument("to_snapshot", metavar="TO", nargs="?")
    sp = verbs.add_parser("check", parents=[common], help="check the repository (or one "
                                                          "chain's volumes)")
    sp.add_argument("name", nargs="?", metavar="NAME")
    sp.add_argument("--repair", action="store_true", help="fix what can be fixed")
    sp.set_defaults(func=cmd_check)
    verb("delete", cmd_delete, "delete a chain, its snapshots and the volumes only it uses",
         "name")
    sp = verb("write", cmd_write, "write bytes into the disk at an offset", "name")
    sp.add_argument("--offset", type=parse_size, default=0)
    sp.add_argument("--file", metavar="PATH", help="the bytes to write ('-': stdin)")
    sp.add_argument("--pattern", type=_byte, metavar="BYTE", help="a byte value to repeat")
    sp.add_argument("--length", type=parse_size, help="bytes of --pattern to write")
    sp = verb("read", cmd_read, "read bytes of the disk (or a snapshot) to stdout or a file",
              "name")
    sp.add_argument("--offset", type=parse_size, default=0)
    sp.add_argument("--length", type=parse_size, required=True)
    sp.add_argument("--snapshot", metavar="ID")
    sp.add_argument("--out", metavar="PATH")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command line ARGV (default: sys.argv[1:]) and return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0) if isinstance(e.code, int) else EX_USAGE
    debug = os.environ.get("COWCHAIN_DEBUG") == "1"
    try:
        return args.func(args)
    except UsageError as e:
        print(f"cowchain: error: {e}", file=sys.stderr)
        return EX_USAGE
    except EngineError as e:
        if debug:
            import traceback
            traceback.print_exc()
        print(f"cowchain: error: {_one_line(str(e))}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("cowchain: interrupted", file=sys.stderr)
        return EX_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (cowchain ... | head): not an error worth a message.
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except OSError as e:
        if debug:
            import traceback
            traceback.print_exc()
        where = f": {e.filename}" if e.filename else ""
        print(f"cowchain: error: {e.strerror or e}{where}", file=sys.stderr)
        return EX_IOERR
    except Exception as e:  # noqa: BLE001  (the promise: one line, never a traceback)
        if debug:
            import traceback
            traceback.print_exc()
        print(f"cowchain: internal error: {type(e).__name__}: {_one_line(str(e))} "
              "(COWCHAIN_DEBUG=1 shows the traceback; please report it)", file=sys.stderr)
        return EX_SOFTWARE


def _one_line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
