"""The merge that deletes a snapshot: its cost in each direction, the images it holds,
and its idempotent steps (run by ``delete_snapshot`` and redone by recovery)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from engine import ops
from engine.catalog import VolumeRow
from engine.repository.values import Progress

if TYPE_CHECKING:
    from engine.repository.context import Context
    from engine.repository.journal import Journaled


def costs(ctx: Context, vol: VolumeRow, child: VolumeRow) -> tuple[int, int]:
    """(bytes a commit of CHILD into VOL writes, bytes a pull of VOL into CHILD writes)."""
    with ctx.open_volume(child, readonly=True) as img:
        return ops.merge_costs(img, keep_zeros=vol.parent is not None)


def specs(ctx: Context, args: dict) -> list[tuple[VolumeRow, bool, bool]]:
    """What a merge holds (see ``Context.holding``): for a commit the snapshot's volume (written,
    with its chain), the child (read alone) and the child's children (their headers are
    rewritten); for a pull the child (written, with its chain)."""
    vol, child = ctx.volume_row(args["volume"]), ctx.volume_row(args["child"])
    if args["direction"] == "commit":
        specs = [(vol, False, True), (child, True, False)]
        specs += [(ctx.volume_row(g), False, False) for g in args["grandchildren"]]
    else:
        specs = [(child, False, True)]
    return specs


def steps(ctx: Context, j: Journaled, args: dict, step: str,
          progress: Progress | None) -> tuple[int, list[str]]:
    """The steps of a merge from STEP on, through its catalog commit, on the images J holds
    (``specs``); each step is idempotent (recovery re-runs them).  Returns the bytes copied
    and the files to remove."""
    images = j.images
    cat = ctx.cat
    vol = ctx.volume_row(args["volume"])
    child = ctx.volume_row(args["child"])
    commit = args["direction"] == "commit"
    parent = ctx.volume_row(vol.parent) if vol.parent else None
    copied = 0
    if step == "intent":
        if commit:
            base, top = images[0], images[1]
            copied = ops.commit(top, base, progress=progress, hook="delete_snapshot.copy")
        else:
            copied = ops.stream(images[0], depth=1, keep_zeros=parent is not None,
                                progress=progress, hook="delete_snapshot.copy")
        j.step("copied")
        step = "copied"
    if step == "copied":
        if commit:
            for img in images[2:]:
                img.rebase(os.path.basename(vol.path), vol.format)
        elif parent is None:
            images[0].rebase(None, None)
        else:
            images[0].rebase(os.path.basename(parent.path), parent.format)
        j.step("rebased")
    if commit:
        # the snapshot's volume holds the merged content now (and may have grown): its
        # record is renewed; it stays sealed unless the child was the leaf
        rec = ctx.volume_record(vol, sealed=bool(args["grandchildren"]),
                                size=images[0].size)
    with cat.transaction():
        if commit:
            for gid in args["grandchildren"]:
                cat.update_volume(gid, parent=vol.id)
            for c in cat.chains():
                if c.leaf == child.id:
                    cat.update_chain(c.name, leaf=vol.id)
                if c.saved_leaf == child.id:
                    cat.update_chain(c.name, saved_leaf=vol.id)
            for s in cat.snapshots(vol.chain):
                if s.volume == child.id:
                    cat.update_snapshot(s.id, volume=vol.id)
            cat.delete_snapshot(args["snapshot"])
            cat.delete_volume(child.id)
            cat.update_volume(vol.id, legality="LEGAL", **rec)
            remove = [child.path]
        else:
            cat.update_volume(child.id, parent=vol.parent, legality="LEGAL")
            cat.delete_snapshot(args["snapshot"])
            cat.delete_volume(vol.id)
            remove = [vol.path]
        ctx.refresh_roles()
        cat.journal_commit(j.jid, {"remove": remove})
    return copied, remove
