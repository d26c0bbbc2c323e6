"""The merge that deletes a snapshot: the images it holds, its plan (both directions priced
from one extents pass, the cheaper one run from the same runs) and its idempotent steps (run
by ``delete_snapshot`` and redone by recovery)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from engine import ops
from engine.catalog import VolumeRow
from engine.repository.values import Progress

if TYPE_CHECKING:
    from engine.image import Image
    from engine.repository.context import Context
    from engine.repository.journal import Journaled


def specs(ctx: Context, args: dict[str, Any]) -> list[tuple[VolumeRow, bool, bool]]:
    """What a merge holds (see ``Context.holding``), the same in both directions, so that it
    is planned and run on one open of each volume: the snapshot's volume with its chain
    (a commit writes it; after a pull it is removed, so nobody else may hold it), the child
    alone (a pull writes it; after a commit it is removed) and the child's children alone
    (a commit rewrites their headers), all read-write."""
    vol, child = ctx.volume_row(args["volume"]), ctx.volume_row(args["child"])
    return ([(vol, False, True), (child, False, False)]
            + [(ctx.volume_row(g), False, False) for g in args["grandchildren"]])


def plan(vol: VolumeRow, images: list[Image]) -> ops.MergePlan:
    """Both directions of merging the child into VOL (whose images ``specs`` holds), priced
    and planned from one extents pass over each of the two volumes."""
    return ops.plan_merge(images[1], images[0], keep_zeros=vol.parent is not None)


def steps(ctx: Context, j: Journaled, args: dict[str, Any], step: str,
          progress: Progress | None, planned: ops.MergePlan | None) -> tuple[int, list[str]]:
    """The steps of a merge from STEP on, through its catalog commit, on the images J holds
    (``specs``); each step is idempotent (recovery re-runs them).  PLANNED: the plan the
    direction was chosen by (None: the copy, if still to do, is planned now).  Returns the
    bytes copied and the files to remove."""
    images = j.images
    cat = ctx.cat
    vol = ctx.volume_row(args["volume"])
    child = ctx.volume_row(args["child"])
    commit = args["direction"] == "commit"
    parent = ctx.volume_row(vol.parent) if vol.parent else None
    copied = 0
    if step == "intent":
        base, top = images[0], images[1]
        planned = planned or plan(vol, images)
        if commit:
            copied = ops.commit(top, base, runs=planned.commit_runs, progress=progress,
                                hook="delete_snapshot.copy")
        else:
            copied = ops.pull(top, base, planned.pull_runs, progress=progress,
                              hook="delete_snapshot.copy")
        j.step("copied")
        step = "copied"
    if step == "copied":
        if commit:
            for img in images[2:]:
                img.rebase(os.path.basename(vol.path), vol.format)
        elif parent is None:
            images[1].rebase(None, None)
        else:
            images[1].rebase(os.path.basename(parent.path), parent.format)
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
            for c in cat.chains_on([child.id]):
                if c.leaf == child.id:
                    cat.update_chain(c.name, leaf=vol.id)
                if c.saved_leaf == child.id:
                    cat.update_chain(c.name, saved_leaf=vol.id)
            for s in cat.snapshots_on([child.id]):
                if s.chain == vol.chain:
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
        # roles change only over the merged volume (commit) or over the child's new parent
        # (pull): what lies under them is as it was
        ctx.refresh_roles(vol.id if commit else (vol.parent or child.id))
        cat.journal_commit(j.jid, {"remove": remove})
    return copied, remove
