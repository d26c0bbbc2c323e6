"""``cowchain img``: the qemu-img verbs on image files; parsing and printing only.

The work is in :mod:`engine.img`.  Exit codes are qemu-img's, not the ``cowchain`` table:
0 success, 1 failure (``check``: 0-3 and 63 for raw; ``compare``: 0 identical, 1 different,
2 an image could not be opened or read).  Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Any, Callable, Iterator

from engine import cli as _cli
from engine import img
from engine.errors import EngineError, UnsupportedFeature
from engine.img._open import FORMATS, parse_size
from engine.img.check import EXIT_NO_CHECK, NO_CHECK

#: qemu-img's exit code for a failed verb.
EXIT_FAILURE = 1
#: qemu-img compare's exit code when an image cannot be opened or read.
EXIT_COMPARE_ERROR = 2

Handler = Callable[[argparse.Namespace], int]

#: Engine hints whose ``cowchain`` wording (``CLI_HINTS``) names another command group.
IMG_HINTS = {
    "backing files must be named relative to the overlay's folder, with the format recorded; "
    "pass allow_unsafe_backing=True only for images you trust":
        "backing files must be named relative to the overlay's folder, with the format "
        "recorded; pass --allow-unsafe-backing only for images you trust",
    "repair a copy with Image.check(repair='all') or 'qemu-img check -r all'":
        "repair it with 'cowchain img check -r all'",
    "run check(repair='all') in a repair tool, or 'qemu-img check -r all'":
        "repair it with 'cowchain img check -r all'",
    "the file is not a valid QCOW2 image; open it with format='raw' if it is raw":
        "the file is not a valid QCOW2 image; pass -f raw if it is raw",
    "pass a larger max_chain_depth if the chain is meant to be this deep":
        "flatten the chain first with 'cowchain img convert'",
    "use format='raw'": "use -O raw",
}


def _error_line(e: EngineError) -> str:
    """The one line printed for E, its hint in this group's terms."""
    if e.hint in IMG_HINTS:
        setattr(e, "cli_hint", IMG_HINTS[e.hint])
    return _cli.error_line(e)


def _fails_with(code: int) -> Callable[[Handler], Handler]:
    """Run a verb; an EngineError becomes one line on stderr and qemu-img's exit CODE."""
    def wrap(func: Handler) -> Handler:
        def run(args: argparse.Namespace) -> int:
            try:
                return func(args)
            except EngineError as e:
                print(f"cowchain img: error: {_error_line(e)}", file=sys.stderr)
                return code
        return run
    return wrap


def _json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=4)
    sys.stdout.write("\n")


@contextlib.contextmanager
def _progress(args: argparse.Namespace, label: str) -> Iterator[Any]:
    """A progress bar on stderr with -p (None without), closed afterwards."""
    bar = _cli.ProgressBar(label) if getattr(args, "progress", False) else None
    try:
        yield bar
    finally:
        if bar is not None:
            bar.close()


def _options(args: argparse.Namespace, fmt: str) -> dict[str, Any]:
    return img.parse_options(args.options, fmt) if args.options else {}


@_fails_with(EXIT_FAILURE)
def cmd_info(args: argparse.Namespace) -> int:
    res = img.info(args.filename, format=args.format, backing_chain=args.backing_chain,
                   force_share=args.force_share, allow_unsafe_backing=args.allow_unsafe_backing)
    _json(res) if args.output == "json" else sys.stdout.write(img.info_text(res))
    return 0


@_fails_with(EXIT_FAILURE)
def cmd_map(args: argparse.Namespace) -> int:
    entries = img.map_entries(args.filename, format=args.format,
                              start_offset=args.start_offset, max_length=args.max_length,
                              force_share=args.force_share,
                              allow_unsafe_backing=args.allow_unsafe_backing)
    sys.stdout.write(img.map_json_text(entries) if args.output == "json"
                     else img.map_human(entries))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    try:
        res = img.check(args.filename, format=args.format, repair=args.repair,
                        force_share=args.force_share)
    except EngineError as e:
        print(f"cowchain img: error: {_error_line(e)}", file=sys.stderr)
        return (EXIT_NO_CHECK if isinstance(e, UnsupportedFeature) and e.feature == NO_CHECK
                else EXIT_FAILURE)
    if args.output == "json":
        _json(res.to_dict())
    else:
        sys.stdout.write(res.to_text())
    return res.exit_code


@_fails_with(EXIT_FAILURE)
def cmd_create(args: argparse.Namespace) -> int:
    fmt = args.format or "qcow2"
    line = img.create(args.filename, args.size, format=fmt, options=_options(args, fmt),
                      backing=args.backing, backing_format=args.backing_format,
                      unsafe=args.unsafe, allow_unsafe_backing=args.allow_unsafe_backing)
    if not args.quiet:
        print(line)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    try:
        res = img.compare(args.filename1, args.filename2, format_a=args.format,
                          format_b=args.format2, strict=args.strict,
                          force_share=args.force_share,
                          allow_unsafe_backing=args.allow_unsafe_backing)
    except EngineError as e:
        print(f"cowchain img: error: {_error_line(e)}", file=sys.stderr)
        return EXIT_COMPARE_ERROR
    if not args.quiet:
        sys.stdout.write(res.to_text())
    return res.exit_code


@_fails_with(EXIT_FAILURE)
def cmd_measure(args: argparse.Namespace) -> int:
    out = args.out_format or "raw"
    res = img.measure(size=args.size, filename=args.filename, format=args.format,
                      out_format=out, options=_options(args, out),
                      force_share=args.force_share,
                      allow_unsafe_backing=args.allow_unsafe_backing)
    if args.output == "json":
        _json(res)
    else:
        print(f"required size: {res['required']}")
        print(f"fully allocated size: {res['fully-allocated']}")
        if "bitmaps" in res:
            print(f"bitmaps size: {res['bitmaps']}")
    return 0


@_fails_with(EXIT_FAILURE)
def cmd_convert(args: argparse.Namespace) -> int:
    out = args.out_format or "raw"
    with _progress(args, "convert") as bar:
        img.convert(args.source, args.dest, format=args.format, out_format=out,
                    options=_options(args, out), compress=args.compress,
                    sparse_size=args.sparse_size, backing=args.backing,
                    backing_format=args.backing_format, no_create=args.no_create,
                    force_share=args.force_share,
                    allow_unsafe_backing=args.allow_unsafe_backing, progress=bar)
    return 0


@_fails_with(EXIT_FAILURE)
def cmd_resize(args: argparse.Namespace) -> int:
    img.resize(args.filename, args.size, format=args.format, shrink=args.shrink)
    if not args.quiet:
        print("Image resized.")
    return 0


@_fails_with(EXIT_FAILURE)
def cmd_rebase(args: argparse.Namespace) -> int:
    with _progress(args, "rebase") as bar:
        img.rebase(args.filename, args.backing, backing_format=args.backing_format,
                   format=args.format, unsafe=args.unsafe,
                   allow_unsafe_backing=args.allow_unsafe_backing, progress=bar)
    return 0


@_fails_with(EXIT_FAILURE)
def cmd_commit(args: argparse.Namespace) -> int:
    with _progress(args, "commit") as bar:
        img.commit(args.filename, format=args.format, base=args.base, drop=args.drop,
                   allow_unsafe_backing=args.allow_unsafe_backing, progress=bar)
    if not args.quiet:
        print("Image committed.")
    return 0


@_fails_with(EXIT_FAILURE)
def cmd_amend(args: argparse.Namespace) -> int:
    fmt = args.format or "qcow2"
    img.amend(args.filename, _options(args, fmt), format=args.format)
    return 0


@_fails_with(EXIT_FAILURE)
def cmd_snapshot(args: argparse.Namespace) -> int:
    if args.create is not None:
        img.snapshot_create(args.filename, args.create, format=args.format)
        return 0
    if args.apply is not None:
        img.snapshot_apply(args.filename, args.apply, format=args.format)
        return 0
    if args.delete is not None:
        img.snapshot_delete(args.filename, args.delete, format=args.format)
        return 0
    snaps = img.snapshot_list(args.filename, format=args.format,
                              force_share=args.force_share)
    if snaps:
        sys.stdout.write("Snapshot list:\n" + img.snapshot_text(snaps))
    return 0


@_fails_with(EXIT_FAILURE)
def cmd_bench(args: argparse.Namespace) -> int:
    res = img.bench(args.filename, format=args.format, count=args.count, depth=args.depth,
                    size=args.size, step=args.step, offset=args.offset, write=args.write,
                    pattern=args.pattern, random_offsets=args.random, seed=args.seed,
                    write_ratio=args.write_ratio, threads=args.threads,
                    duration=args.duration, force_share=args.force_share,
                    allow_unsafe_backing=args.allow_unsafe_backing)
    if args.output == "json":
        _json(res.to_dict())
    else:
        kind = "write" if res.writes and not res.reads else "read" if not res.writes else "mixed"
        print(f"Sending {args.count} {kind} requests, {args.size} bytes each, "
              f"{args.depth} in parallel (starting at offset {args.offset}, step size "
              f"{args.step if args.step is not None else args.size})")
        sys.stdout.write(res.to_text())
    return 0


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except EngineError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def register(groups: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``img`` group and its verbs to the ``cowchain`` parser's GROUPS."""
    g = groups.add_parser("img", help="qemu-img's verbs on image files (qemu-img's JSON and "
                                      "exit codes)",
                          description="qemu-img's verbs on image files, with qemu-img's "
                                      "options, JSON and exit codes")
    sub = g.add_subparsers(dest="verb", metavar="VERB", parser_class=type(g))
    sub.required = True

    def verb(name: str, func: Handler, help: str, *, fmt: bool = True,
             share: bool = True) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = sub.add_parser(name, parents=[common], help=help,
                                                     description=help)
        if fmt:
            sp.add_argument("-f", dest="format", choices=FORMATS,
                            help="the image's format (default: qcow2 if it has the magic)")
        if share:
            sp.add_argument("-U", "--force-share", action="store_true",
                            help="open read-only, sharing the image with writers")
        sp.add_argument("--allow-unsafe-backing", action="store_true",
                        help="follow backing files named by absolute paths, outside the "
                             "image's folder or by protocol (only for images you trust)")
        sp.set_defaults(func=func)
        return sp

    def fmt_option(sp: argparse.ArgumentParser, flag: str, dest: str, help: str) -> None:
        sp.add_argument(flag, dest=dest, choices=FORMATS, help=help)

    def quiet(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("-q", dest="quiet", action="store_true", help="quiet")

    def progress(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("-p", dest="progress", action="store_true", help="show a progress bar")

    def options(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("-o", dest="options", action="append",
                        help="format options, NAME=VALUE[,...]")

    FILE = "the image file"
    sp = verb("info", cmd_info, "show an image's header, as qemu-img info")
    sp.add_argument("--backing-chain", action="store_true", help="also every backing file")
    sp.add_argument("filename", help=FILE)
    sp = verb("map", cmd_map, "show the allocation of an image, as qemu-img map")
    sp.add_argument("--start-offset", type=_size, default=0, help="first byte to map")
    sp.add_argument("--max-length", type=_size, default=None, help="bytes to map")
    sp.add_argument("filename", help=FILE)
    sp = verb("check", cmd_check, "check an image's consistency, as qemu-img check (exit 0 "
              "clean, 1 check errors, 2 corruptions, 3 only leaks, 63 raw)")
    sp.add_argument("-r", dest="repair", choices=("leaks", "all"),
                    help="repair leaks, or leaks and corruptions")
    sp.add_argument("filename", help=FILE)
    sp = verb("create", cmd_create, "create an image, as qemu-img create", share=False)
    options(sp)
    quiet(sp)
    sp.add_argument("-b", dest="backing", help="backing file, relative to the new image")
    fmt_option(sp, "-F", "backing_format", "the backing file's format (required with -b)")
    sp.add_argument("-u", dest="unsafe", action="store_true",
                    help="record the backing file without opening it")
    sp.add_argument("filename", help="the new image file")
    sp.add_argument("size", nargs="?", type=_size,
                    help="virtual size (default: the backing file's)")
    sp = verb("compare", cmd_compare, "compare two disks, as qemu-img compare (exit 0 "
              "identical, 1 different, 2 an image could not be opened)")
    fmt_option(sp, "-F", "format2", "the second image's format")
    sp.add_argument("-s", dest="strict", action="store_true",
                    help="strict: sizes and allocation must match too")
    quiet(sp)
    sp.add_argument("filename1", help="the first image")
    sp.add_argument("filename2", help="the second image")
    sp = verb("measure", cmd_measure, "size a new image would need, as qemu-img measure")
    fmt_option(sp, "-O", "out_format", "the new image's format (default: raw)")
    sp.add_argument("--size", type=_size, help="measure an empty disk of this size")
    options(sp)
    sp.add_argument("filename", nargs="?", help="measure a copy of this image")
    sp = verb("convert", cmd_convert, "copy a disk into a new image, as qemu-img convert")
    fmt_option(sp, "-O", "out_format", "the target's format (default: raw)")
    options(sp)
    sp.add_argument("-c", dest="compress", action="store_true",
                    help="write compressed clusters (qcow2 target)")
    sp.add_argument("-S", dest="sparse_size", type=_size, default=4096,
                    help="all-zero blocks of this size are not written (default: 4k)")
    sp.add_argument("-B", dest="backing", help="the target's backing file: only what "
                                               "differs from it is written")
    fmt_option(sp, "-F", "backing_format", "the backing file's format")
    sp.add_argument("-n", dest="no_create", action="store_true",
                    help="the target exists: write into it")
    sp.add_argument("-W", dest="out_of_order", action="store_true",
                    help="accepted; writes are in order")
    progress(sp)
    sp.add_argument("source", help="the image to copy")
    sp.add_argument("dest", help="the target image")
    sp = verb("resize", cmd_resize, "change the disk size, as qemu-img resize", share=False)
    sp.add_argument("--shrink", action="store_true", help="allow a smaller size")
    quiet(sp)
    sp.add_argument("filename", help=FILE)
    sp.add_argument("size", help="new size, or +SIZE / -SIZE")
    sp = verb("rebase", cmd_rebase, "change the backing file, as qemu-img rebase", share=False)
    sp.add_argument("-b", dest="backing", required=True,
                    help="the new backing file ('' for none)")
    fmt_option(sp, "-F", "backing_format", "the new backing file's format")
    sp.add_argument("-u", dest="unsafe", action="store_true",
                    help="only rewrite the header (the caller vouches for the data)")
    progress(sp)
    sp.add_argument("filename", help=FILE)
    sp = verb("commit", cmd_commit, "commit an overlay into its backing file", share=False)
    sp.add_argument("-b", dest="base", help="the base (only the direct backing file)")
    sp.add_argument("-d", dest="drop", action="store_true",
                    help="do not empty the overlay afterwards")
    progress(sp)
    quiet(sp)
    sp.add_argument("filename", help=FILE)
    sp = verb("amend", cmd_amend, "change format options, as qemu-img amend", share=False)
    options(sp)
    sp.add_argument("filename", help=FILE)
    sp = verb("snapshot", cmd_snapshot, "list, create, apply or delete internal snapshots, "
              "as qemu-img snapshot")
    sp.add_argument("-l", dest="list", action="store_true", help="list the snapshots")
    sp.add_argument("-c", dest="create", metavar="NAME", help="create a snapshot")
    sp.add_argument("-a", dest="apply", metavar="NAME", help="apply a snapshot")
    sp.add_argument("-d", dest="delete", metavar="NAME", help="delete a snapshot")
    sp.add_argument("filename", help=FILE)
    sp = verb("bench", cmd_bench, "time requests against an image, as qemu-img bench")
    sp.add_argument("-c", dest="count", type=int, default=75000, help="requests")
    sp.add_argument("-d", dest="depth", type=int, default=64, help="requests in flight")
    sp.add_argument("-s", dest="size", type=_size, default=4096, help="bytes per request")
    sp.add_argument("-S", dest="step", type=_size, help="offset step (default: -s)")
    sp.add_argument("-o", dest="offset", type=_size, default=0, help="first offset")
    sp.add_argument("-w", dest="write", action="store_true", help="write instead of read")
    sp.add_argument("--pattern", type=int, default=0xA5, help="byte value written")
    sp.add_argument("--random", action="store_true", help="random offsets (aligned to -s)")
    sp.add_argument("--seed", type=int, default=0, help="seed of --random")
    sp.add_argument("--write-ratio", type=float, help="share of writes, 0..1")
    sp.add_argument("--threads", type=int, default=1, help="worker threads")
    sp.add_argument("--duration", type=float, help="seconds to run instead of -c")
    sp.add_argument("filename", help=FILE)
