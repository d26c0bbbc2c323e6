"""The repository's operations, as functions over its ``Context``: chains made, imported
and deleted; snapshot, resize, revert, preview, clone, delete_snapshot (a merge), export and
diff.  Each journaled one runs inside ``journal.journaled``; ``Repository`` and ``Chain``
call these."""

from __future__ import annotations

import os
import re
import uuid
from typing import TYPE_CHECKING, Callable

from engine import destination as _destination
from engine import image
from engine import ops
from engine.catalog import ChainRow, SnapshotRow, VolumeRow, now
from engine.errors import EngineError, InvalidArgument, RepositoryError, UnsupportedFeature
from engine.repository import files, graph, journal, merge
from engine.repository.values import (DiffResult, ExportResult, MergeResult, PathArg, Progress,
                                      Snapshot)

if TYPE_CHECKING:
    from engine.image import Image
    from engine.repository.chain import Chain
    from engine.repository.context import Context


#: Chain names: what fits in a file name and a shell word without quoting.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidArgument(f"invalid chain name {name!r}: use 1-128 letters, digits, "
                              "'.', '_' or '-', starting with a letter or digit")


def _check_new_chain(ctx: Context, name: str, size: int, base_format: str,
                     cluster_size: int) -> None:
    ctx.check_writable()
    check_name(name)
    if base_format not in ("raw", "qcow2"):
        raise InvalidArgument(f"base_format must be 'raw' or 'qcow2', not {base_format!r}")
    if not isinstance(size, int) or size <= 0 or size % 512:
        raise InvalidArgument(f"size must be a positive multiple of 512 bytes, not {size!r}")
    if (not isinstance(cluster_size, int) or cluster_size < 512 or cluster_size > 2 << 20
            or cluster_size & (cluster_size - 1)):
        raise InvalidArgument(f"cluster_size must be a power of two from 512 to 2 MiB, "
                              f"not {cluster_size!r}")
    if ctx.cat.chain(name) is not None:
        raise RepositoryError(f"a chain named {name!r} exists already")


def create_chain(ctx: Context, name: str, size: int, *, base_format: str | None = None,
                 cluster_size: int = 65536, extended_l2: bool = False) -> Chain:
    """``Repository.create_chain``."""
    if not isinstance(extended_l2, bool):
        raise InvalidArgument(f"extended_l2 must be True or False, not {extended_l2!r}")
    if base_format is None:
        base_format = "qcow2" if extended_l2 else "raw"
    elif extended_l2 and base_format != "qcow2":
        raise InvalidArgument("a chain with extended L2 entries needs a qcow2 base volume "
                              "(every overlay takes the option from the volume below it)",
                              hint="make the base qcow2, or leave its format unset")
    _check_new_chain(ctx, name, size, base_format, cluster_size)
    vid, rel = ctx.new_volume(base_format)
    with journal.journaled(ctx, "create_chain", name, {"created": [rel]}) as j:
        img = j.hold(image.create(ctx.abs(rel), size, format=base_format,
                                  cluster_size=cluster_size, extended_l2=extended_l2))
        j.step("created")
        with ctx.cat.transaction():
            ctx.cat.insert_chain(ChainRow(name, size, cluster_size, now(), vid))
            ctx.cat.insert_volume(ctx.volume_row_for(vid, name, rel, base_format, None,
                                                     size))
            ctx.cat.journal_end(j.jid)
        j.leaf_of(name, img)
    return ctx.chain(name)


def import_chain(ctx: Context, name: str, source: PathArg, *, format: str,
                 base_format: str = "raw", cluster_size: int = 65536,
                 progress: Progress | None = None,
                 allow_unsafe_backing: bool = False) -> Chain:
    """``Repository.import_chain``."""
    ctx.check_writable()
    if format not in ("raw", "qcow2"):
        raise InvalidArgument(f"format must be 'raw' or 'qcow2', not {format!r}",
                              hint="name the source's format; cowchain never guesses it")
    src_path = os.path.abspath(os.fspath(source))
    if os.path.isdir(src_path):
        raise InvalidArgument("is a folder, not a disk image", path=src_path)
    with image.open(src_path, format=format, readonly=True,
                    allow_unsafe_backing=allow_unsafe_backing) as src:
        size = src.size
        if size % 512:
            raise InvalidArgument(f"the source's size ({size} bytes) is not a multiple "
                                  "of 512", path=src_path,
                                  hint="pad it first, e.g. truncate -s %512 FILE")
        if size == 0:
            raise InvalidArgument("the source is an empty disk", path=src_path)
        _check_new_chain(ctx, name, size, base_format, cluster_size)
        vid, rel = ctx.new_volume(base_format)
        with journal.journaled(ctx, "import_chain", name,
                               {"created": [rel], "source": src_path}) as j:
            ops.convert_new(src, ctx.abs(rel), format=base_format,
                            cluster_size=cluster_size, progress=progress,
                            hook="import.copy")
            j.step("written")
            with ctx.cat.transaction():
                ctx.cat.insert_chain(ChainRow(name, size, cluster_size, now(), vid))
                ctx.cat.insert_volume(ctx.volume_row_for(vid, name, rel, base_format,
                                                         None, size))
                ctx.cat.journal_end(j.jid)
    return ctx.chain(name)


def delete_chain(ctx: Context, name: str) -> None:
    """``Repository.delete_chain``."""
    ctx.check_writable()
    ctx.chain_row(name)
    with ctx.writing(name):
        _delete_chain(ctx, name)
    ctx.release_lease(name)


def _delete_chain(ctx: Context, name: str) -> None:
    row = ctx.chain_row(name)
    ctx.check_not_blocked(name)
    # the chain's lines, and everything stacked on their bases: the only volumes whose
    # users, and so whose fate and role, the deletion changes; in one state (other hosts
    # change other chains)
    with ctx.cat.read():
        lines = [ctx.line(top) for top in (row.leaf, row.saved_leaf) if top]
        bases = list(dict.fromkeys(line[-1].id for line in lines))
        family: dict[str, VolumeRow] = {}
        for b in bases:
            family.update(ctx.cat.volumes_over(b))
        users = graph.users_over(family, ctx.cat.chains_on(family))
    for v in family.values():
        if v.chain == name:
            others = sorted(users.get(v.id, set()) - {name})
            if others:
                raise RepositoryError(
                    f"chain {name!r} cannot be deleted: clone {others[0]!r} uses its "
                    f"volume {v.id}", hint=f"delete chain {others[0]!r} first")
    c = ctx.chains.pop(name, None)
    if c is not None:
        c.close()
    with ctx.cat.transaction():
        candidates = [v.id for v in family.values() if v.chain == name]
        for line in lines:
            candidates += [v.id for v in line]
        for s in ctx.cat.snapshots(name):
            ctx.cat.delete_snapshot(s.id)
        ctx.cat.delete_chain(name)
        remove = ctx.collect_garbage(candidates)
        for b in bases:
            ctx.refresh_roles(b)
        jid = ctx.cat.journal_begin("delete_chain", name, {"remove": remove},
                                    state="committed")
    journal.kill_point("delete_chain.committed")
    journal.finish(ctx, jid, "delete_chain", remove)


def record_unrecorded(ctx: Context) -> None:
    """Fill in the size and identity of volumes the catalog has no record of (a catalog
    made by an older cowchain): what the files hold now is taken as the truth."""
    recs = {}
    for v in ctx.cat.unrecorded_volumes():
        try:
            recs[v.id] = ctx.volume_record(v, sealed=v.role != "leaf")
        except EngineError:
            continue             # a missing or busy file: check reports it; retried later
    if recs:
        with ctx.cat.transaction():
            for vid, rec in recs.items():
                ctx.cat.update_volume(vid, **rec)


def _prepare(ctx: Context, chain: Chain, *, allow_preview: bool = False,
             release: bool = True) -> ChainRow:
    """Common checks before a chain operation; closes the chain's leaf handle (RELEASE)."""
    ctx.check_writable()
    row = ctx.chain_row(chain.name)
    ctx.check_lease(chain.name)        # before anything is written: a lease, recovery
    ctx.check_not_blocked(chain.name)
    if row.preview and not allow_preview:
        raise RepositoryError(
            f"chain {chain.name!r} is previewing snapshot {row.preview}",
            hint="commit_preview() or undo_preview() first")
    if release:
        chain.release_leaf()
    return row


def _refuse_damaged(ctx: Context, row: ChainRow, img: Image | None = None) -> None:
    """A snapshot is not taken on a chain known to be damaged: a volume marked ILLEGAL
    (an operation on it did not finish) or damaged (by check) in the catalog, or (IMG:
    the chain opened, then the catalog is not read again) a QCOW2 volume with the corrupt
    bit set."""
    flagged = ctx.cat.flagged_volumes() if img is None else []   # normally none: an index
    if flagged:
        line = {v.id for v in ctx.line(row.leaf)}
        for v in flagged:
            if v.id not in line:
                continue
            if v.legality != "LEGAL":
                raise ctx.damaged(v, "is ILLEGAL (an operation on it did not finish)",
                                  chain=row.name, snapshot=True)
            raise ctx.damaged(v, f"was found damaged by check: {v.damaged}",
                              chain=row.name, snapshot=True)
    im = img.first_corrupt() if img is not None else None
    if im is not None:
        rel = os.path.relpath(im.path, ctx.path)
        v = ctx.cat.volume_by_path(rel) or VolumeRow(
            "?", row.name, rel, im.format, "leaf", None, "LEGAL", "")
        raise ctx.damaged(v, "is marked corrupt (the QCOW2 corrupt bit is set)",
                          chain=row.name, snapshot=True)


class _Below:
    """A volume of a chain open read-only with its chain under it, for a new overlay to be
    stacked on (``Context.create_overlay(below=)``).  Taken from the chain's open leaf
    handle when there is one (the leaf flushed and reopened read-only, or the volumes above
    closed), else opened: the chain is not opened again.  Use with ``with``: the image is
    closed if the block raises before ``stacked`` (the overlay owns it from then on)."""

    def __init__(self, ctx: Context, chain: Chain, vol: VolumeRow) -> None:
        path = ctx.abs(vol.path)
        img = chain.take_leaf()
        if img is not None:
            img = img.reopen_readonly() if img.path == path else img.close_above(path)
        self.image = img or ctx.open_volume(vol, readonly=True, verify=False)
        self.stacked = False

    def __enter__(self) -> _Below:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None and not self.stacked:
            files.close_quietly(self.image)


def snapshot(ctx: Context, chain: Chain, description: str, force: bool) -> Snapshot:
    if not isinstance(description, str):
        raise InvalidArgument("description must be a string")
    row = _prepare(ctx, chain, release=False)
    leaf = ctx.volume_row(row.leaf)
    if not force:
        _refuse_damaged(ctx, row)
    # the leaf, flushed, turns read-only and the new overlay is stacked on it: a snapshot
    # opens two files whatever the chain's depth
    with _Below(ctx, chain, leaf) as below:
        if not force:
            ctx.verify_identity(below.image)
            _refuse_damaged(ctx, row, below.image)
        vid, rel = ctx.new_volume("qcow2")
        sid = str(uuid.uuid4())
        with journal.journaled(ctx, "snapshot", row.name,
                               {"created": [rel], "snapshot": sid}) as j:
            img = j.hold(ctx.create_overlay(rel, leaf, row.size, row.cluster_size,
                                            verify=False, below=below.image, durable=False))
            below.stacked = True
            # the leaf is sealed now: record what it is, to notice later if it is changed
            sealed = ctx.volume_record(leaf, sealed=True, size=row.size)
            j.step("created")
            # the old leaf's role: it has a child now, and nothing but its own chain's new
            # leaf lies over it (a leaf has no child; a chain in preview is refused)
            sealed["role"] = graph.role(leaf, True, {row.name})
            with ctx.cat.transaction():
                ctx.cat.insert_volume(ctx.volume_row_for(vid, row.name, rel, "qcow2",
                                                         leaf.id, row.size))
                snap = SnapshotRow(sid, row.name, now(), description, leaf.id)
                ctx.cat.insert_snapshot(snap)
                ctx.cat.update_volume(leaf.id, **sealed)
                ctx.cat.update_chain(row.name, leaf=vid)
                ctx.cat.journal_end(j.jid)
                img.sync_created()      # the new file is durable before the commit names it
            j.leaf_of(chain, img)
    return ctx.snapshot_of(snap)


def resize(ctx: Context, chain: Chain, new_size: int) -> None:
    if not isinstance(new_size, int) or isinstance(new_size, bool) or new_size % 512:
        raise InvalidArgument(f"size must be a multiple of 512 bytes, not {new_size!r}")
    row = _prepare(ctx, chain)
    if new_size < row.size:
        raise UnsupportedFeature("shrink", f"chain {row.name!r} is {row.size} bytes; "
                                 "shrinking a disk is not supported (data past the new "
                                 "end would be lost)")
    if new_size == row.size:
        return
    leaf = ctx.volume_row(row.leaf)
    with journal.journaled(ctx, "resize", row.name, {"size": new_size, "leaf": leaf.id},
                           hold=[(leaf, False, False)]) as j:
        img = j.images[0]
        img.resize(new_size)                   # durable when it returns
        j.step("resized")
        rec = ctx.volume_record(leaf, sealed=False, size=img.size)
        with ctx.cat.transaction():
            ctx.cat.update_chain(row.name, size=new_size)
            ctx.cat.update_volume(leaf.id, **rec)
            ctx.cat.journal_end(j.jid)


def _new_leaf_on(ctx: Context, op: str, chain: Chain, row: ChainRow, snap: SnapshotRow,
                 apply: Callable[[str], list[str]]) -> None:
    """Revert and preview: a new empty leaf on top of SNAP's volume, at the size the disk
    had at SNAP (the chain takes that size), then APPLY(vid) inside the commit
    transaction (it settles the roles and returns the files to remove afterwards)."""
    base = ctx.snapshot_volume(snap)
    size = ctx.volume_size(base)
    vid, rel = ctx.new_volume("qcow2")
    with _Below(ctx, chain, base) as below, \
            journal.journaled(ctx, op, row.name, {"created": [rel], "snapshot": snap.id}) as j:
        ctx.verify_identity(below.image)
        img = j.hold(ctx.create_overlay(rel, base, size, row.cluster_size, verify=False,
                                        below=below.image, durable=False))
        below.stacked = True
        j.step("created")
        with ctx.cat.transaction():
            ctx.cat.insert_volume(ctx.volume_row_for(vid, row.name, rel, "qcow2",
                                                     base.id, size))
            ctx.cat.update_chain(row.name, size=size)
            j.remove = apply(vid)
            if j.remove:
                ctx.cat.journal_commit(j.jid, {"remove": j.remove})
            else:
                ctx.cat.journal_end(j.jid)
            img.sync_created()          # the new file is durable before the commit names it
        j.leaf_of(chain, img)


def _drop_newer(ctx: Context, row: ChainRow, snap: SnapshotRow) -> None:
    assert snap.seq is not None                  # a row read from the catalog has one
    for s in ctx.cat.snapshots(row.name, after=snap.seq):
        ctx.cat.delete_snapshot(s.id)


def _settle(ctx: Context, dropped: list[str] | None, top: str, root: str) -> list[str]:
    """Inside a commit transaction that took TOP's line off a chain, which now reads
    through ROOT (a volume under TOP): drop the rows of DROPPED (TOP's line down to ROOT)
    that nothing uses any more and recompute the roles that could change, those of ROOT and
    the volumes over it; return the files to remove.  DROPPED None (TOP's line does not
    reach ROOT: a damaged catalog): the whole line is a candidate and every role is
    recomputed."""
    if dropped is None:
        remove = ctx.collect_garbage(v.id for v in ctx.line(top))
        ctx.refresh_roles()
        return remove
    remove = ctx.collect_garbage(dropped)
    ctx.refresh_roles(root)
    return remove


def revert(ctx: Context, chain: Chain, sid: str) -> None:
    row = _prepare(ctx, chain, release=False)
    snap = ctx.find_snapshot(row.name, sid)
    dropped = graph.line_to(ctx.cat.volumes_over(snap.volume), row.leaf, snap.volume)

    def apply(vid: str) -> list[str]:
        _drop_newer(ctx, row, snap)
        ctx.cat.update_chain(row.name, leaf=vid)
        return _settle(ctx, dropped, row.leaf, snap.volume)

    _new_leaf_on(ctx, "revert", chain, row, snap, apply)


def preview(ctx: Context, chain: Chain, sid: str) -> None:
    row = _prepare(ctx, chain, release=False)
    snap = ctx.find_snapshot(row.name, sid)
    kept = graph.line_to(ctx.cat.volumes_over(snap.volume), row.leaf, snap.volume)

    def apply(vid: str) -> list[str]:
        ctx.cat.update_chain(row.name, leaf=vid, saved_leaf=row.leaf, preview=snap.id)
        ctx.refresh_roles(snap.volume if kept is not None else None)
        return []

    _new_leaf_on(ctx, "preview", chain, row, snap, apply)


def end_preview(ctx: Context, chain: Chain, keep: bool) -> None:
    with ctx.writing(chain.name):
        _end_preview(ctx, chain, keep)


def _end_preview(ctx: Context, chain: Chain, keep: bool) -> None:
    op = "commit_preview" if keep else "undo_preview"
    row = _prepare(ctx, chain, allow_preview=True)
    if not row.preview or row.saved_leaf is None:
        raise RepositoryError(f"chain {row.name!r} is not previewing a snapshot")
    saved_size = None if keep else ctx.volume_size(ctx.volume_row(row.saved_leaf))
    top, other = (row.saved_leaf, row.leaf) if keep else (row.leaf, row.saved_leaf)
    # the previewed snapshot's volume: where the dropped line meets the kept one
    snap = ctx.cat.snapshot(row.preview)
    over = ctx.cat.volumes_over(snap.volume) if snap is not None else {}
    dropped = None
    if snap is not None and graph.line_to(over, other, snap.volume) is not None:
        dropped = graph.line_to(over, top, snap.volume)
    root = snap.volume if snap is not None else top
    with ctx.cat.transaction():
        if keep:
            _drop_newer(ctx, row, ctx.snapshot_row(row.preview))
            ctx.cat.update_chain(row.name, saved_leaf=None, preview=None)
        else:
            ctx.cat.update_chain(row.name, leaf=row.saved_leaf, saved_leaf=None,
                                 preview=None, size=saved_size)
        remove = _settle(ctx, dropped, top, root)
        jid = ctx.cat.journal_begin(op, row.name, {"remove": remove}, state="committed")
    journal.kill_point(f"{op}.committed")
    journal.finish(ctx, jid, op, remove)


def clone(ctx: Context, chain: Chain, sid: str, name: str) -> Chain:
    with ctx.writing(chain.name):        # the source's volumes become shared: its lease too
        return _clone(ctx, chain, sid, name)


def _clone(ctx: Context, chain: Chain, sid: str, name: str) -> Chain:
    # the source chain's leaf handle stays open: a clone reads only sealed volumes under it
    # (shared read locks beside the handle's), and the next write need not reopen the chain
    row = _prepare(ctx, chain, allow_preview=True, release=False)
    check_name(name)
    snap = ctx.find_snapshot(row.name, sid)
    if ctx.cat.chain(name) is not None:
        raise RepositoryError(f"a chain named {name!r} exists already")
    base = ctx.volume_row(snap.volume)
    # the clone is the disk as it was at the snapshot, at the size it had then (the
    # chain may have grown since)
    size = ctx.volume_size(base)
    vid, rel = ctx.new_volume("qcow2")
    with journal.journaled(ctx, "clone", name, {"created": [rel], "snapshot": snap.id,
                                                "origin": row.name}) as j:
        img = j.hold(ctx.create_overlay(rel, base, size, row.cluster_size, durable=False))
        j.step("created")
        with ctx.cat.transaction():
            ctx.cat.insert_chain(ChainRow(name, size, row.cluster_size, now(), vid,
                                          origin_chain=row.name, origin_snapshot=snap.id))
            ctx.cat.insert_volume(ctx.volume_row_for(vid, name, rel, "qcow2", base.id,
                                                     size))
            # the new chain reads through every volume under its leaf, and has none of
            # its own there: each of them has a child and another chain as a user now
            for v in ctx.line(base.id):
                role = graph.role(v, True, {name})
                if role != v.role:
                    ctx.cat.update_volume(v.id, role=role)
            ctx.cat.journal_end(j.jid)
            img.sync_created()          # the new file is durable before the commit names it
        j.leaf_of(name, img)
    return ctx.chain(name)


def delete_snapshot(ctx: Context, chain: Chain, sid: str,
                    progress: Progress | None) -> MergeResult:
    row = _prepare(ctx, chain)
    snap = ctx.find_snapshot(row.name, sid)
    with ctx.cat.read():                 # one state: other hosts change other chains
        over = ctx.cat.volumes_over(snap.volume)
        users = graph.users_over(over, ctx.cat.chains_on(over))
    others = sorted(users.get(snap.volume, set()) - {row.name})
    if others:
        raise RepositoryError(
            f"snapshot {snap.id} of chain {row.name!r} cannot be deleted: clone "
            f"{others[0]!r} uses its volume {snap.volume}",
            hint=f"delete chain {others[0]!r} first")
    above = graph.line_to(over, row.leaf, snap.volume)
    if not above:
        raise RepositoryError(f"snapshot {snap.id}'s volume is not under the leaf of chain "
                              f"{row.name!r}", hint="run 'cowchain chain check'")
    vol = over[snap.volume]
    child = over[above[-1]]
    kids = ctx.cat.children(vol.id)
    if [k.id for k in kids] != [child.id]:
        raise RepositoryError(f"volume {vol.id} has other children than {child.id}",
                              hint="run 'cowchain chain check'")
    args = {"snapshot": snap.id, "volume": vol.id, "child": child.id,
            "grandchildren": [k.id for k in ctx.cat.children(child.id)]}
    # One open of each volume, before anything is recorded: the plan that chooses the
    # direction is the one the copy then runs.
    held = ctx.holding(merge.specs(ctx, args))
    try:
        planned = merge.plan(vol, held.images)
    except BaseException:
        held.close()
        raise
    direction = "commit" if planned.commit_bytes <= planned.pull_bytes else "pull"
    target = vol if direction == "commit" else child
    args["direction"] = direction
    with journal.journaled(ctx, "delete_snapshot", row.name, args, illegal=[target.id],
                           hold=held) as j:
        copied, j.remove = merge.steps(ctx, j, args, "intent", progress, planned)
    return MergeResult(snap.id, direction, child.id if direction == "commit" else vol.id,
                       target.id, copied, planned.commit_bytes, planned.pull_bytes)


def export(ctx: Context, chain: Chain, path: PathArg | int, fmt: str, sid: str | None,
           progress: Progress | None, overwrite: bool,
           output_device: bool = False) -> ExportResult:
    ctx.check_open()
    if fmt not in ("raw", "qcow2"):
        raise InvalidArgument(f"format must be 'raw' or 'qcow2', not {fmt!r}")
    row = ctx.chain_row(chain.name)
    stream = isinstance(path, int) and not isinstance(path, bool)
    target = path if isinstance(path, int) else os.fspath(path)
    # a stream or device is checked and written in place by ops.convert; a file is
    # checked here, written beside its name and published under the journal
    dest = None if stream or output_device else _destination.check(path,
                                                                   overwrite=overwrite)
    if sid is not None:
        with ctx.cat.read():
            snap = ctx.find_snapshot(row.name, sid)
            src_row = ctx.volume_row(snap.volume)
        sid = snap.id
    else:
        chain.release_leaf()
        src_row = ctx.volume_row(row.leaf)
    if dest is None:
        with ctx.open_volume(src_row, readonly=True) as src:
            size = src.size                 # a snapshot's own size (the disk may have grown)
            written = ops.convert(src, target, format=fmt, progress=progress,
                                  output_device=output_device)
        where = "-" if isinstance(target, int) else os.path.abspath(target)
        return ExportResult(where, fmt, size, sid, written)
    tmp = dest.temp_path()
    with journal.journaled(ctx, "export", row.name, {"tmp_files": [tmp], "dest": dest.path},
                           committed=None) as j:
        with ctx.open_volume(src_row, readonly=True) as src:
            size = src.size                 # a snapshot's own size (the disk may have grown)
            written = ops.convert_new(src, tmp, format=fmt, cluster_size=row.cluster_size,
                                      progress=progress, hook="export.copy")
        j.step("written")
        dest.commit(tmp)
        journal.kill_point("export.renamed")
        ctx.cat.journal_end(j.jid)
    return ExportResult(dest.path, fmt, size, sid, written)


def diff(ctx: Context, chain: Chain, from_id: str, to_id: str | None) -> DiffResult:
    ctx.check_open()
    with ctx.cat.read():
        row = ctx.chain_row(chain.name)
        a = ctx.find_snapshot(row.name, from_id).volume
        b = ctx.find_snapshot(row.name, to_id).volume if to_id is not None else row.leaf
        vols = {**ctx.cat.volumes_under(a), **ctx.cat.volumes_under(b)}
    path_a = [v.id for v in graph.ancestry(vols, a)]
    path_b = [v.id for v in graph.ancestry(vols, b)]
    in_b = set(path_b)
    lca = next((v for v in path_a if v in in_b), None)
    between = path_a[:path_a.index(lca)] if lca else path_a
    between += path_b[:path_b.index(lca)] if lca else path_b
    if row.leaf in between or b == row.leaf:
        chain.release_leaf()
    size_a = ctx.volume_size(vols[a]) if a != row.leaf else row.size
    if not between:
        return DiffResult([], size_a, size_a)
    images = []
    try:
        for vid in between:
            images.append(ctx.open_volume(vols[vid], readonly=True, backing=False))
        ranges = ops.allocated_ranges(images)
    finally:
        for img in images:
            img.close()
    with ctx.open_volume(vols[b], readonly=True) as view:
        size_b = view.size
        inside = [(s, min(e, size_b)) for s, e in ranges if s < size_b]
        changes = ops.annotate(inside, view)
    # Past the TO point's end (the FROM point is larger: the disk grew in between) the
    # ranges the FROM side holds are changed too; at TO the disk ends there (zero).
    changes += [ops.Change(max(s, size_b), e - max(s, size_b), True, False)
                for s, e in ranges if e > size_b]
    return DiffResult(changes, size_a, size_b)
