"""The repository check (``Repository.check``): the catalog against the volume files and
their headers, the image check on every volume, and the repairs."""

from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING, Any, Callable, Iterable

from engine.catalog import VolumeRow
from engine.errors import EngineError
from engine.repository import files, graph, journal
from engine.repository.files import LOST_FOUND, VOLUMES_DIR
from engine.repository.values import Problem, RepositoryCheck

if TYPE_CHECKING:
    from engine.repository.context import Context

#: How the check records a problem found.
Add = Callable[[Problem], None]


def run(ctx: Context, repair: bool, only: str | None) -> RepositoryCheck:
    """Repository.check (see its docstring for the kinds of problem)."""
    res = RepositoryCheck()
    cat = ctx.cat
    add = res.problems.append
    for msg in cat.integrity_problems():
        add(Problem("catalog", f"the catalog database is damaged: {msg}",
                    repair="not repairable here: restore catalog.db from a backup"))
    if only is not None:
        ctx.chain_row(only)
    for j in cat.journal():
        if only is not None and j.chain != only:
            continue
        p = Problem("pending", f"operation {j.op} is in flight (step {j.step})", chain=j.chain)
        if repair:
            try:
                p.repair = journal.recover_row(ctx, j)
                p.repaired = True
                if j.chain is not None:
                    ctx.blocked.pop(j.chain, None)
            except EngineError as e:
                p.repair = f"recovery failed: {e}"
        add(p)
    # Our own handles hold locks that a repair (and an accurate check) must not meet.
    for handle in ctx.chains.values():
        handle.release_leaf()
    with cat.read():                     # one state: other hosts may commit in between
        vols = cat.volumes()
        chains = cat.chains()
    scope_chains = [c for c in chains if only is None or c.name == only]
    in_scope: dict[str, VolumeRow] = {}
    reachable: dict[str, set[str]] = {}
    for c in scope_chains:
        seen: set[str] = set()
        for top in (c.leaf, c.saved_leaf):
            if top is None:
                continue
            try:
                line = graph.ancestry(vols, top)
            except EngineError as e:
                add(Problem("backing", f"the chain cannot be followed from volume {top}: "
                            f"{e.message}", chain=c.name, volume=top,
                            repair="not repairable automatically"))
                continue
            for v in line:
                in_scope[v.id] = v
                seen.add(v.id)
        reachable[c.name] = seen
        for v in vols.values():
            if v.chain == c.name:
                in_scope.setdefault(v.id, v)
        for s in cat.snapshots(c.name):
            if s.volume in seen:
                continue
            why = ("its volume is missing from the catalog" if s.volume not in vols
                   else "its volume is not under the chain's leaf")
            p = Problem("snapshot", f"snapshot {s.id} is broken: {why}", chain=c.name,
                        snapshot=s.id, volume=s.volume)
            if repair:
                cat.delete_snapshot(s.id)
                p.repaired, p.repair = True, "dropped the snapshot record"
            add(p)
    by_file = {os.path.basename(v.path): v for v in vols.values()}
    pending_vols = {vid for j in cat.journal() for key in ("volume", "child")
                    for vid in [j.args.get(key)] if vid}
    # A chain's leaf has the chain's size; every volume has the size the catalog records
    # for it (older volumes may be smaller: a disk grows, and a revert gives it a snapshot's
    # size again).
    sizes = {c.leaf: c.size for c in chains}
    for v in in_scope.values():
        entry = {"id": v.id, "chain": v.chain, "path": ctx.abs(v.path), "format": v.format,
                 "check": None}
        res.volumes.append(entry)
        image_clean = _check_volume(ctx, v, vols, by_file, sizes, entry, add, repair)
        if v.legality != "LEGAL" and v.id not in pending_vols:
            p = Problem("illegal", f"volume {v.id} is ILLEGAL but no operation is changing it",
                        chain=v.chain, volume=v.id)
            if repair and image_clean:
                cat.update_volume(v.id, legality="LEGAL")
                p.repaired, p.repair = True, "marked LEGAL (its image check is clean)"
            elif repair:
                p.repair = "left ILLEGAL: its image check is not clean"
            add(p)
    with cat.read():
        vols = cat.volumes()
        roles = graph.roles(vols, cat.chains())
    stale = []
    for v in vols.values():
        role = roles[v.id]
        if role != v.role and v.id in in_scope:
            stale.append(Problem("role", f"volume {v.id} is recorded as {v.role} but is {role}",
                                 chain=v.chain, volume=v.id))
    if stale and repair:
        with cat.transaction():
            ctx.refresh_roles()
        for p in stale:
            p.repaired, p.repair = True, "recomputed"
    res.problems.extend(stale)
    if only is None:
        vdir = os.path.join(ctx.path, VOLUMES_DIR)
        known = set(by_file)
        for name in sorted(os.listdir(vdir)):
            if name in known:
                continue
            p = Problem("stray-file", f"volumes/{name} is not in the catalog")
            if repair:
                lost = os.path.join(ctx.path, LOST_FOUND)
                os.makedirs(lost, exist_ok=True)
                shutil.move(os.path.join(vdir, name), os.path.join(lost, name))
                files.fsync_dir(vdir)
                p.repaired, p.repair = True, f"moved to {LOST_FOUND}/{name}"
            add(p)
    _record_damage(ctx, res, in_scope.values())
    return res


def _check_raw_identity(ctx: Context, v: VolumeRow, add: Add, repair: bool) -> bool:
    """A raw volume's file against the catalog's record: size, inode and (sealed) content
    stamp.  Returns True when it matches (or was repaired)."""
    if v.size is None:
        return True                   # nothing recorded yet (an older catalog, read-only)
    rec = files.raw_record(ctx.abs(v.path), sealed=v.stamp is not None, stamp=v.stamp)
    why = files.identity_problem(v, rec["size"], rec["ino"])
    content_same = rec["size"] == v.size and rec["stamp"] == v.stamp
    if why is None and not content_same:
        why = ("does not hold what it held when it was sealed (its content stamp differs): "
               "it was written by another tool or replaced in place")
    if why is None:
        return True
    p = Problem("identity", f"raw volume {v.id} {why}", chain=v.chain, volume=v.id)
    if content_same:
        # the same bytes in another file (a copied or restored repository)
        p.repair = "the catalog records the file's new inode (its content is unchanged)"
        if repair:
            ctx.cat.update_volume(v.id, ino=rec["ino"])
            p.repaired = True
    else:
        p.repair = "not repairable: restore the file from a backup"
    add(p)
    return p.repaired


#: Kinds of problem that make a volume damaged: check records them in the catalog, and a
#: chain with a damaged volume takes no new snapshot until a check finds it clean.
_DAMAGE_KINDS = frozenset({"missing-file", "unreadable", "size", "identity", "image"})


def _record_damage(ctx: Context, res: RepositoryCheck, checked: Iterable[VolumeRow]) -> None:
    """Mark in the catalog the volumes this check found damaged, and unmark the clean ones
    (a read-only repository records nothing)."""
    if ctx.readonly or ctx.cat.version < 2:
        return
    why: dict[str, str] = {}
    for p in res.problems:
        if (p.volume and not p.repaired and p.kind in _DAMAGE_KINDS and not p.leaks_only
                and p.volume not in why):
            why[p.volume] = p.message
    changes = {v.id: why.get(v.id) for v in checked if v.damaged != why.get(v.id)}
    if changes:
        with ctx.cat.transaction():
            for vid, reason in changes.items():
                if ctx.cat.volume(vid) is not None:
                    ctx.cat.update_volume(vid, damaged=reason)


def _check_volume(ctx: Context, v: VolumeRow, vols: dict[str, VolumeRow],
                  by_file: dict[str, VolumeRow], sizes: dict[str, int], entry: dict[str, Any],
                  add: Add, repair: bool) -> bool:
    """Check one volume's file against the catalog; returns True when its image is clean."""
    cat = ctx.cat
    path = ctx.abs(v.path)
    if not os.path.exists(path):
        add(Problem("missing-file", f"volume {v.id}: {v.path} does not exist", chain=v.chain,
                    volume=v.id, repair="not repairable: restore the file from a backup"))
        return False
    try:
        img = ctx.open_volume(v, readonly=True, backing=False, verify=False)
    except EngineError as e:
        add(Problem("unreadable", f"volume {v.id} cannot be opened as {v.format}: {e}",
                    chain=v.chain, volume=v.id, repair="not repairable automatically"))
        return False
    with img:
        want_size = sizes.get(v.id)
        if want_size is not None and img.size != want_size:
            add(Problem("size", f"volume {v.id} is {img.size} bytes, its chain {want_size}",
                        chain=v.chain, volume=v.id, repair="not repairable automatically"))
        if v.format == "raw":
            if v.parent is not None:
                add(Problem("backing", f"raw volume {v.id} cannot have a parent ({v.parent})",
                            chain=v.chain, volume=v.id, repair="not repairable automatically"))
            return _check_raw_identity(ctx, v, add, repair)
        if v.size is not None and img.size != v.size:
            add(Problem("size", f"volume {v.id} is {img.size} bytes, the catalog records "
                        f"{v.size}", chain=v.chain, volume=v.id,
                        repair="not repairable automatically"))
        name, fmt = img.backing_name, img.backing_format
        result = img.check()
    expected = vols.get(v.parent) if v.parent else None
    named = by_file.get(name) if name else None
    if name is None and expected is not None or name is not None and (
            named is None or expected is None or named.id != expected.id
            or fmt != named.format):
        want = (f"{os.path.basename(expected.path)} ({expected.format})" if expected
                else "no backing file")
        has = f"{name} ({fmt})" if name else "no backing file"
        p = Problem("backing", f"volume {v.id}: the header says {has}, the catalog says {want}",
                    chain=v.chain, volume=v.id)
        if name is None or (named is not None and fmt == named.format):
            if repair:
                cat.update_volume(v.id, parent=named.id if named else None)
                p.repaired = True
            p.repair = "the catalog follows the header (the header is the truth about backing)"
        else:
            p.repair = ("not repairable: the header names a file the catalog does not know, "
                        "or the wrong format")
        add(p)
    entry["check"] = result.to_dict()
    if result.exit_code == 0:
        return True
    d = result.to_dict()
    p = Problem("image", f"volume {v.id}: image check found {d.get('corruptions', 0)} "
                f"corruptions, {d.get('leaks', 0)} leaked clusters, "
                f"{d.get('check-errors', 0)} check errors", chain=v.chain, volume=v.id,
                leaks_only=result.exit_code == 3)
    if repair:
        with ctx.open_volume(v, backing=False) as img:
            img.check(repair="all")
            again = img.check()
        entry["check"] = again.to_dict()
        p.repaired = again.exit_code == 0
        p.repair = "repaired (qemu-img check -r all semantics)" if p.repaired else \
            f"repair left problems: {again.to_dict()}"
    add(p)
    return p.repaired
