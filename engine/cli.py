"""The ``cowchain`` command: argument parsing and output only; the work is in engine.repository.

Usage: ``cowchain [--repo DIR] [--catalog URL] [--host-id ID] [--output human|json] GROUP VERB
...`` (``--repo`` defaults to ``$COWCHAIN_REPO``, ``--catalog`` to ``$COWCHAIN_CATALOG``,
``--host-id`` to ``$COWCHAIN_HOST_ID``; the options may also follow the verb).  See
``cowchain --help``.

Exit codes: one table, in engine/errors.py (``exit_code_table()``), printed by ``cowchain
--help``: ``check`` uses qemu-img check's 0-3, each EngineError subclass its own code, 64 a
usage error.  Errors are one line on stderr, never a traceback (set COWCHAIN_DEBUG=1 to get
the traceback too); their hints name this command's verbs and flags (:data:`CLI_HINTS`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import time
from fractions import Fraction

from engine import cli_img
from engine.errors import (EX_INTERRUPTED, EX_IOERR, EX_SOFTWARE, EX_USAGE, EngineError,
                           ImageNotFound, exit_code_table)

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50,
          "E": 1 << 60}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTPE]?)(?:I?B)?\s*$", re.IGNORECASE)


#: The largest number a size on the command line may be: 64 bits (16 EiB - 1). The engine
#: checks the real limits of the format and the filesystem.
MAX_SIZE = (1 << 64) - 1


class UsageError(Exception):
    """A command line that does not make sense (exit EX_USAGE)."""


def parse_size(text: str) -> int:
    """'10G' -> 10737418240: qemu-img's suffixes (K, M, G, T, P, E; powers of 1024; an
    optional 'B' or 'iB'); a bare number is bytes. Exact (no floating point)."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (examples: 4096, 512M, 10G)")
    value = Fraction(m.group(1)) * _UNITS[m.group(2).upper()]
    if value.denominator != 1:
        raise argparse.ArgumentTypeError(f"size {text!r} is not a whole number of bytes")
    if value > MAX_SIZE:
        raise argparse.ArgumentTypeError(f"size {text!r} does not fit in 64 bits (the "
                                         f"largest is {MAX_SIZE} bytes, 16 EiB - 1)")
    return int(value)


def plural(n: int, word: str, words: str | None = None) -> str:
    """plural(1, 'volume') -> '1 volume'; plural(2, 'volume') -> '2 volumes'."""
    return f"{n} {word if n == 1 else (words or word + 's')}"


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

#: JSON keys are hyphenated, as qemu-img's are; where qemu-img has the same field, its name.
_JSON_NAMES = {"size": "virtual-size"}


def json_keys(obj):
    """OBJ with every dict key in the one JSON style: 'cluster_size' -> 'cluster-size',
    'size' (a virtual size) -> 'virtual-size'."""
    if isinstance(obj, dict):
        return {_JSON_NAMES.get(k, k.replace("_", "-")) if isinstance(k, str) else k:
                json_keys(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_keys(v) for v in obj]
    return obj


def _emit(args, obj, human: str | None) -> None:
    if args.output == "json":
        json.dump(json_keys(obj), sys.stdout, indent=2, sort_keys=False)
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
    h = d.get("holder")
    if h is not None:
        lines.append("holder:     " + (
            f"{h['host']} (epoch {h['epoch']}, expires in {h['expires_in']:.1f} s)"
            if h["live"] else f"none (epoch {h['epoch']})"))
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


def _catalog(args) -> dict:
    """The catalog options: ``catalog`` (a PostgreSQL URL, or None: the folder's SQLite
    catalog) and ``host_id``."""
    return {"catalog": getattr(args, "catalog", None) or os.environ.get("COWCHAIN_CATALOG")
            or None,
            "host_id": getattr(args, "host_id", None) or os.environ.get("COWCHAIN_HOST_ID")
            or None}


def _open_repo(args, *, readonly: bool = False):
    from engine.repository import Repository

    return Repository.open(_repo_dir(args), readonly=readonly, **_catalog(args))


def cmd_repo_init(args) -> int:
    from engine.repository import Repository

    path = args.dir or _repo_dir(args)
    with Repository.create(path, **_catalog(args)) as repo:
        _emit(args, {"repository": repo.path, "created": True},
              f"Created repository {repo.path}")
    return 0


def cmd_repo_upgrade(args) -> int:
    from engine.repository import Repository

    before, after = Repository.upgrade(_repo_dir(args), **_catalog(args))
    _emit(args, {"repository": os.path.abspath(_repo_dir(args)), "schema_before": before,
                 "schema": after},
          f"Catalog schema version {after}" + (f" (was {before})" if before != after
                                               else " (already current)"))
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
            n = plural(len(res.volumes), "volume")
            if not res.problems:
                lines.append(f"No problems found ({n} checked).")
            elif res.ok:
                lines.append(f"All problems repaired ({n} checked).")
            else:
                left = sum(not p.repaired for p in res.problems)
                lines.append(f"{plural(left, 'problem')} left ({n} checked)"
                             + ("" if args.repair else "; run with --repair to fix what can be"))
            _emit(args, d, "\n".join(lines))
        return res.exit_code


def cmd_create(args) -> int:
    with _open_repo(args) as repo:
        c = repo.create_chain(args.name, args.size, base_format=args.format,
                              cluster_size=args.cluster_size, extended_l2=args.extended_l2)
        _emit_new_chain(args, c, f"Created chain {args.name}")
    return 0


def _emit_new_chain(args, chain, what: str) -> None:
    d = chain.to_dict()
    base = d["volumes"][0]["format"] if d["volumes"] else args.format
    _emit(args, d, f"{what} ({human_size(d['size'])}, {base} base volume {d['leaf']})")


def cmd_import(args) -> int:
    with _open_repo(args) as repo:
        bar = _progress(args, "importing")
        try:
            c = repo.import_chain(args.name, args.source, format=args.source_format,
                                  base_format=args.format, cluster_size=args.cluster_size,
                                  progress=bar, allow_unsafe_backing=args.allow_unsafe_backing)
        finally:
            if bar:
                bar.close()
        _emit_new_chain(args, c, f"Imported {args.source} as chain {args.name}")
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


def cmd_host_list(args) -> int:
    with _open_repo(args, readonly=True) as repo:
        items = [{"host_id": h.host_id, "hostname": h.hostname, "pid": h.pid,
                  "joined": _utc(h.joined_at), "heartbeat": _utc(h.heartbeat),
                  "alive": h.alive, "leases": h.leases} for h in repo.hosts()]
    rows = [[i["host_id"], i["hostname"], str(i["pid"]), i["heartbeat"][:19].replace("T", " "),
             "alive" if i["alive"] else "silent", str(i["leases"])] for i in items]
    _emit(args, items, _table(rows, ["HOST", "HOSTNAME", "PID", "HEARTBEAT (UTC)", "STATE",
                                     "LEASES"]) if items else "(no hosts)")
    return 0


def _utc(t) -> str:
    return t.astimezone(datetime.timezone.utc).isoformat()


def cmd_release(args) -> int:
    if not args.force:
        raise UsageError("'chain release' frees the write lease another host holds: pass "
                         "--force, and only for a host known to be dead")
    with _open_repo(args, readonly=True) as repo:
        epoch = repo.force_release(args.name)
    _emit(args, {"chain": args.name, "released": True, "epoch": epoch},
          f"Released the write lease of chain {args.name} (epoch now {epoch})")
    return 0


def cmd_snapshot(args) -> int:
    from engine.nbd import control

    d = control.snapshot_chain(lambda: _open_repo(args), _repo_dir(args), args.name,
                               args.description, args.force)
    # The id alone on stdout, so that SNAP=$(cowchain chain snapshot vm1) works.
    _emit(args, d, d["id"])
    return 0


def cmd_snapshots(args) -> int:
    with _open_repo(args, readonly=True) as repo:
        snaps = [s.to_dict() for s in repo.chain(args.name).snapshots]
        _emit(args, snaps, _snapshots_table(snaps) if snaps else "(no snapshots)")
    return 0


def _chain_op(args, verb: str, message: str) -> int:
    with _open_repo(args) as repo:
        c = repo.chain(args.name)
        snapshot = ""
        if verb in ("revert", "preview"):
            snapshot = c.get_snapshot(args.snapshot).id     # echo the full id, not the prefix
            getattr(c, verb)(snapshot)
        else:
            getattr(c, verb)()
        d = c.to_dict()
        _emit(args, d, message.format(name=args.name, snapshot=snapshot, leaf=d["leaf"]))
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
    to_stdout = args.dest == "-"
    if to_stdout:
        if args.format != "raw" or args.output_device:
            raise UsageError("DEST '-' writes the raw disk to standard output: it takes "
                             "neither --format qcow2 nor --output-device")
        if sys.stdout.isatty():
            raise UsageError("standard output is a terminal; redirect it to a file or a pipe")
        if args.output == "json":
            raise UsageError("DEST '-' writes the disk to standard output; --output json "
                             "cannot share it")
    with _open_repo(args) as repo:
        bar = _progress(args, "exporting")
        try:
            if to_stdout:
                sys.stdout.flush()
            r = repo.chain(args.name).export(sys.stdout.fileno() if to_stdout else args.dest,
                                             format=args.format, snapshot_id=args.snapshot,
                                             progress=bar, overwrite=args.force,
                                             output_device=args.output_device)
        finally:
            if bar:
                bar.close()
        if to_stdout:
            return 0
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
                              f"\n{plural(len(changes), 'range')}, {human_size(total)} "
                              "changed")
              if changes else "No changes.")
    return 0


def cmd_delete(args) -> int:
    with _open_repo(args) as repo:
        repo.delete_chain(args.name)
        _emit(args, {"deleted": args.name}, f"Deleted chain {args.name}")
    return 0


def cmd_write(args) -> int:
    if args.file is not None and args.length is not None:
        raise UsageError("--length goes with --pattern; --file writes the whole file")
    if args.file is not None:
        if args.file == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(args.file, "rb") as f:
                data = f.read()
    else:
        if args.length is None:
            raise UsageError("--pattern needs --length")
        data = bytes([args.pattern]) * args.length
    with _open_repo(args) as repo:
        c = repo.chain(args.name)
        c.write(args.offset, data)
        c.flush()
        _emit(args, {"chain": args.name, "offset": args.offset, "length": len(data)},
              f"Wrote {human_size(len(data))} at offset {args.offset} of {args.name}")
    return 0


def cmd_read(args) -> int:
    import hashlib

    from engine import destination

    if args.force and not args.out:
        raise UsageError("--force goes with --out FILE")
    snapshot = args.snapshot
    with _open_repo(args, readonly=True) as repo:
        c = repo.chain(args.name)
        if args.snapshot is not None:
            snapshot = c.get_snapshot(args.snapshot).id
            with c.open_snapshot(snapshot) as img:
                data = img.read(args.offset, args.length)
        else:
            data = c.read(args.offset, args.length)
        out = None
        if args.out:
            # written while the repository is open, so its files count as in use
            out = destination.write_bytes(args.out, data, overwrite=args.force)
    if out is None and args.output != "json":
        destination.check_fd(sys.stdout.fileno())
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return 0
    _emit(args, {"chain": args.name, "snapshot": snapshot, "offset": args.offset,
                 "length": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                 "out": out}, f"Read {human_size(len(data))} into {out}")
    return 0


def cmd_serve(args) -> int:
    from engine.nbd.run import serve

    if (args.image is None) == (args.chain is None):
        raise UsageError("give an IMAGE, or --chain NAME with --repo DIR")
    if args.snapshot is not None and args.chain is None:
        raise UsageError("--snapshot goes with --chain")
    if (args.socket is None) == (args.bind is None):
        raise UsageError("give one of --socket PATH and --bind HOST:PORT")
    if args.tls == "require" and not args.tls_certs:
        raise UsageError("--tls=require needs --tls-certs DIR")
    return serve(image=args.image, repo=_repo_dir(args) if args.chain else None,
                 chain=args.chain, snapshot=args.snapshot, readonly=args.read_only,
                 socket_path=args.socket, bind=args.bind, export_name=args.export_name,
                 description=args.description, pid_file=args.pid_file,
                 tls_certs=args.tls_certs if args.tls != "off" else None,
                 tls_required=args.tls == "require", more=args.export,
                 max_connections=args.max_connections,
                 **(_catalog(args) if args.chain else {}))


def _name_image(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not path:
        raise argparse.ArgumentTypeError(f"invalid export {text!r} (example: disk2=other.qcow2)")
    return name, path


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"invalid address {text!r} (examples: "
                                         "127.0.0.1:10809, [::1]:10809)")
    return host.strip("[]"), int(port)


def serve_parser(groups, common) -> None:
    """The ``serve`` command's arguments (an NBD server; the work is in engine.nbd)."""
    help = "serve an image, or a chain's disk, to NBD clients until SIGTERM or SIGINT"
    sp = groups.add_parser("serve", parents=[common], help=help, description=help)
    sp.set_defaults(func=cmd_serve)
    sp.add_argument("image", nargs="?", metavar="IMAGE",
                    help="an image file (served with its backing chain)")
    sp.add_argument("--chain", metavar="NAME", help="serve this chain of --repo instead")
    sp.add_argument("--snapshot", metavar="ID", help="serve this snapshot (read-only)")
    sp.add_argument("--read-only", action="store_true", help="refuse writes (EPERM)")
    where = sp.add_mutually_exclusive_group()
    where.add_argument("--socket", metavar="PATH", help="listen on this Unix socket")
    where.add_argument("--bind", type=_host_port, metavar="HOST:PORT",
                       help="listen on this TCP address")
    sp.add_argument("--export-name", default="", metavar="NAME",
                    help="the export's name (default: the empty name)")
    sp.add_argument("--export", type=_name_image, action="append", default=[],
                    metavar="NAME=IMAGE", help="also serve IMAGE as the export NAME "
                                               "(repeatable)")
    sp.add_argument("--description", default="", metavar="TEXT",
                    help="the export's description (default: the file or chain name)")
    sp.add_argument("--pid-file", metavar="PATH", help="write the process id here once "
                                                       "listening")
    sp.add_argument("--max-connections", type=int, default=64, metavar="N",
                    help="clients served at once (default: 64)")
    sp.add_argument("--tls-certs", metavar="DIR",
                    help="offer TLS with DIR/server-cert.pem and DIR/server-key.pem")
    sp.add_argument("--tls", choices=("off", "on", "require"), default="on",
                    help="with --tls-certs: offer TLS (on, the default), require it, or not "
                         "offer it (off)")


# --- parser -----------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line on stderr (exit EX_USAGE)."""

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


def _epilog() -> str:
    import textwrap

    text = ("Sizes take K, M, G, T, P, E suffixes (powers of 1024). Snapshot ids may be "
            "abbreviated to a unique prefix of 4+ characters; messages echo the full id. "
            "JSON output uses hyphenated keys, as qemu-img does (virtual-size, "
            "cluster-size).")
    return textwrap.fill(text, 79, break_on_hyphens=False) + "\n\nExit codes:\n" + exit_code_table()


def build_parser() -> argparse.ArgumentParser:
    from engine import __version__

    def options(parser, default):
        # Given before the group or after the verb: the verb's copy has no default, so it
        # only overrides what the top level parsed when it is given.
        parser.add_argument("--repo", metavar="DIR",
                            default=None if default else argparse.SUPPRESS,
                            help="the repository folder (default: $COWCHAIN_REPO)")
        parser.add_argument("--catalog", metavar="URL",
                            default=None if default else argparse.SUPPRESS,
                            help="a PostgreSQL URL holding the catalog, for a folder several "
                                 "hosts share (default: $COWCHAIN_CATALOG; none: the "
                                 "folder's own catalog)")
        parser.add_argument("--host-id", metavar="ID",
                            default=None if default else argparse.SUPPRESS,
                            help="this host's stable id with --catalog (default: "
                                 "$COWCHAIN_HOST_ID, else the host name)")
        parser.add_argument("--output", choices=("human", "json"),
                            default="human" if default else argparse.SUPPRESS,
                            help="output format (default: human)")
        return parser

    common = options(argparse.ArgumentParser(add_help=False), False)
    p = options(_Parser(prog="cowchain",
                        description="Manage QCOW2 snapshot chains (oVirt-style) in a "
                                    "repository.",
                        epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter),
                True)
    p.add_argument("--version", action="version", version=f"cowchain {__version__}",
                   help="print the version and exit")
    groups = p.add_subparsers(dest="group", metavar="{repo,chain,host,img,serve}",
                              parser_class=_Parser)
    groups.required = True

    def group(name, help):
        g = groups.add_parser(name, help=help, description=help)
        sub = g.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
        sub.required = True
        return sub

    def verb(sub, name, func, help, *names):
        sp = sub.add_parser(name, parents=[common], help=help, description=help)
        for n, h in names:
            sp.add_argument(n, metavar=n.upper().replace("_", "-"), help=h)
        sp.set_defaults(func=func)
        return sp

    NAME = ("name", "the chain's name")
    SNAP = ("snapshot", "a snapshot id (or a unique prefix of 4+ characters)")

    def progress_flag(sp):
        sp.add_argument("--no-progress", action="store_true",
                        help="no progress bar (it is shown only on a terminal)")

    def cluster_flag(sp):
        sp.add_argument("--cluster-size", type=parse_size, default=65536, metavar="SIZE",
                        help="cluster size of the qcow2 volumes (default: 64K)")

    rverbs = group("repo", "create and check repositories")
    sp = verb(rverbs, "init", cmd_repo_init, "create a repository (a folder with a catalog "
                                             "and volumes/) in DIR, a new or empty folder")
    sp.add_argument("dir", nargs="?", metavar="DIR",
                    help="the folder (default: --repo or $COWCHAIN_REPO)")
    sp = verb(rverbs, "check", cmd_check, "compare the catalog with the volume files and "
                                          "check every volume as qemu-img check does "
                                          "(exit 0 clean, 2 problems, 3 only leaks)")
    sp.add_argument("--repair", action="store_true",
                    help="fix what can be fixed (leaks, catalog mismatches, image repairs)")
    verb(rverbs, "upgrade", cmd_repo_upgrade, "bring the catalog's schema up to this "
                                              "version's (any read-write open also does)")

    hverbs = group("host", "the hosts sharing a repository (a PostgreSQL catalog)")
    verb(hverbs, "list", cmd_host_list, "list the hosts: heartbeat, alive or silent, chain "
                                        "leases held")

    verbs = group("chain", "create, snapshot, merge, clone, export chains")
    sp = verb(verbs, "create", cmd_create, "create a chain (one base volume)", NAME)
    sp.add_argument("size", type=parse_size, metavar="SIZE", help="virtual size, e.g. 10G")
    sp.add_argument("--format", choices=("raw", "qcow2"), default=None,
                    help="format of the base volume (default: raw; qcow2 with --extended-l2)")
    cluster_flag(sp)
    sp.add_argument("--extended-l2", action="store_true",
                    help="extended L2 entries (32 subclusters per cluster) in every qcow2 "
                         "volume of the chain: small writes into a new overlay copy nothing "
                         "from below; needs a cluster size of at least 16K")
    sp = verb(verbs, "import", cmd_import, "create a chain whose base volume is a copy of an "
                                           "existing disk image (the source is not changed)",
              NAME, ("source", "the disk image to copy"))
    sp.add_argument("-f", "--source-format", choices=("raw", "qcow2"), required=True,
                    help="the source's format (never guessed)")
    sp.add_argument("--format", choices=("raw", "qcow2"), default="raw",
                    help="format of the new base volume (default: raw)")
    cluster_flag(sp)
    sp.add_argument("--allow-unsafe-backing", action="store_true",
                    help="follow the source's backing files even when named by an absolute "
                         "path or outside its folder (only for images you trust)")
    progress_flag(sp)
    sp = verb(verbs, "resize", cmd_resize, "grow a chain's disk (snapshots keep their size; "
              "revert to one gives the disk its size again)", NAME)
    sp.add_argument("size", type=parse_size, metavar="SIZE", help="new virtual size, e.g. 20G")
    verb(verbs, "list", cmd_list, "list the chains")
    verb(verbs, "info", cmd_info, "show a chain's volumes and snapshots (and, in a shared "
                                  "repository, which host holds its write lease)", NAME)
    sp = verb(verbs, "release", cmd_release, "free a chain's write lease that a dead host "
                                             "holds (a shared repository; bumps its epoch)",
              NAME)
    sp.add_argument("--force", action="store_true",
                    help="required: only for a host known to be dead")
    sp = verb(verbs, "snapshot", cmd_snapshot, "take a snapshot (prints its id)", NAME)
    sp.add_argument("-d", "--description", default="", help="free text")
    sp.add_argument("--force", action="store_true",
                    help="take it even though a volume of the chain is known to be damaged")
    verb(verbs, "snapshots", cmd_snapshots, "list a chain's snapshots, oldest first", NAME)
    verb(verbs, "revert", cmd_revert, "make the disk read as it did at a snapshot, at the "
                                      "size it had then; newer snapshots are removed", NAME, SNAP)
    verb(verbs, "preview", cmd_preview, "run on a snapshot's content, keeping the current "
                                        "state aside", NAME, SNAP)
    verb(verbs, "commit-preview", cmd_commit_preview, "keep the previewed state (newer "
                                                      "snapshots are removed)", NAME)
    verb(verbs, "undo-preview", cmd_undo_preview, "drop the preview and return to the state "
                                                  "kept aside", NAME)
    sp = verb(verbs, "delete-snapshot", cmd_delete_snapshot,
              "merge a snapshot away (the disk and other snapshots do not change)", NAME, SNAP)
    progress_flag(sp)
    sp = verb(verbs, "clone", cmd_clone, "create a linked clone of a snapshot as a new chain",
              NAME, SNAP, ("new_name", "the new chain's name"))
    sp = verb(verbs, "export", cmd_export,
              "write the disk (or a snapshot) as one self-contained image: a new file, never "
              "inside a repository, never through a symlink", NAME,
              ("dest", "the file to write; '-' writes the raw disk to standard output"))
    sp.add_argument("--format", choices=("raw", "qcow2"), default="raw",
                    help="format of the exported image (default: raw)")
    sp.add_argument("--snapshot", metavar="ID", help="export this snapshot")
    sp.add_argument("--force", action="store_true",
                    help="replace DEST if it is a regular file (atomically; never a link, "
                         "device, FIFO or socket)")
    sp.add_argument("--output-device", action="store_true",
                    help="DEST is a block device: write the raw disk into it")
    progress_flag(sp)
    sp = verb(verbs, "diff", cmd_diff, "ranges changed between two snapshots (or a snapshot "
                                       "and now), from the tables alone", NAME,
              ("from_snapshot", "the older snapshot"))
    sp.add_argument("to_snapshot", metavar="TO", nargs="?",
                    help="the newer snapshot (default: the current disk)")
    sp = verb(verbs, "check", cmd_check, "check the repository (or one chain's volumes) as "
                                         "qemu-img check does (exit 0 clean, 2 problems, 3 "
                                         "only leaks)")
    sp.add_argument("name", nargs="?", metavar="NAME",
                    help="check only this chain's volumes (default: all)")
    sp.add_argument("--repair", action="store_true",
                    help="fix what can be fixed (leaks, catalog mismatches, image repairs)")
    verb(verbs, "delete", cmd_delete, "delete a chain, its snapshots and the volumes only it "
                                      "uses", NAME)
    sp = verb(verbs, "write", cmd_write, "write bytes into the disk at an offset", NAME)
    sp.add_argument("--offset", type=parse_size, default=0,
                    help="where to write, bytes from the start of the disk (default: 0)")
    what = sp.add_mutually_exclusive_group(required=True)
    what.add_argument("--file", metavar="PATH", help="the bytes to write ('-': stdin)")
    what.add_argument("--pattern", type=_byte, metavar="BYTE",
                      help="a byte value to repeat (with --length)")
    sp.add_argument("--length", type=parse_size, help="bytes of --pattern to write")
    sp = verb(verbs, "read", cmd_read, "read bytes of the disk (or a snapshot) to stdout or a "
                                       "file", NAME)
    sp.add_argument("--offset", type=parse_size, default=0,
                    help="where to read, bytes from the start of the disk (default: 0)")
    sp.add_argument("--length", type=parse_size, required=True, help="bytes to read")
    sp.add_argument("--snapshot", metavar="ID", help="read this snapshot")
    sp.add_argument("--out", metavar="PATH",
                    help="write the bytes to this new file (default: stdout)")
    sp.add_argument("--force", action="store_true",
                    help="replace --out if it is a regular file (atomically; never a link, "
                         "device, FIFO or socket)")
    cli_img.register(groups, common)
    serve_parser(groups, common)
    return p


# --- hints ------------------------------------------------------------------------------------

#: The one mapping from the engine's hints (written for Python callers) to what a user of
#: this command can do: every hint that names a Python argument or method is here, mapped
#: to a verb or flag of this command ("" drops a hint with no command-line meaning).
CLI_HINTS = {
    "pass overwrite=True to replace it": "pass --force to replace it",
    "pass output_device=True to write to the device":
        "pass --output-device to write to the device",
    "drop output_device to write a file": "drop --output-device to write a file",
    "use format='raw'": "use --format raw",
    "write to standard output instead":
        "give '-' as DEST to write the raw disk to standard output",
    "the file is not a valid QCOW2 image; open it with format='raw' if it is raw":
        "the file is not a valid QCOW2 image; if it is raw, use "
        "'cowchain chain import NAME FILE -f raw'",
    "repair a copy with Image.check(repair='all') or 'qemu-img check -r all'":
        "run 'cowchain chain check --repair'",
    "backing files must be named relative to the overlay's folder, with the format recorded; "
    "pass allow_unsafe_backing=True only for images you trust":
        "backing files must be named relative to the overlay's folder, with the format "
        "recorded; pass --allow-unsafe-backing to 'cowchain chain import' only for images "
        "you trust",
    "is another process using the image? close it, or open read-only":
        "is another process (QEMU or cowchain) using the image? close it there first",
    "open the image with readonly=False": "",
    "open it again": "",
    "check the disk and the kernel log, then reopen the image and run check":
        "check the disk and the kernel log, then run 'cowchain chain check'",
    "pass backing_format ('raw' or 'qcow2'); formats are never probed": "",
    "pass backing_format='raw' or 'qcow2'": "",
    "pass a larger max_chain_depth if the chain is meant to be this deep":
        "flatten the chain first with 'qemu-img convert'",
    "run check(repair='all') in a repair tool, or 'qemu-img check -r all'":
        "run 'cowchain chain check --repair'",
    "open it without readonly to change it": "",
    "call Repository.recover() or reopen the repository":
        "run the command again: opening the repository recovers interrupted operations",
    "commit_preview() or undo_preview() first":
        "run 'cowchain chain commit-preview NAME' or 'cowchain chain undo-preview NAME' first",
    "open it with Repository.open, or choose a new folder":
        "use it with --repo DIR, or choose a new folder",
}


def cli_hint(hint: str) -> str:
    """The hint to show on the command line for an engine hint."""
    return CLI_HINTS.get(hint, hint)


def error_line(e: EngineError) -> str:
    """The one line printed for E: its message, with the hint in this command's terms."""
    text = str(e)
    if e.hint and text.endswith(f" ({e.hint})"):
        text = text[:-len(f" ({e.hint})")]
        hint = getattr(e, "cli_hint", None) or cli_hint(e.hint)
        if hint:
            text = f"{text} ({hint})"
    return _one_line(text)


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
        print(f"cowchain: error: {error_line(e)}", file=sys.stderr)
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
        # a missing file has its own code, whoever noticed it
        return ImageNotFound.exit_code if isinstance(e, FileNotFoundError) else EX_IOERR
    except Exception as e:  # noqa: BLE001  (the promise: one line, never a traceback)
        if isinstance(e, ImportError) and e.name == "engine._core":
            print(f"cowchain: error: {e}", file=sys.stderr)    # a source tree never built
            return EX_SOFTWARE
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
