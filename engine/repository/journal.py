"""The journal of operations in flight: every operation that touches files records its
intent before it touches any, passes its steps (kill points, for the crash tests), and
commits its catalog changes in one transaction.  ``journaled`` is that skeleton, once;
``recover_row`` rolls an interrupted operation back (rollback operations: remove what it
created) or forward (a merge: redo it from its last recorded step; a committed operation:
finish its removals)."""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from engine.errors import RepositoryError
# re-exported: the operations pass their kill points through journal.kill_point
from engine.ops import kill_point as kill_point
from engine.repository import files, merge
from engine.repository.files import VOLUMES_DIR

if TYPE_CHECKING:
    from engine.catalog import JournalRow, VolumeRow
    from engine.image import Image
    from engine.repository.chain import Chain
    from engine.repository.context import Context, Held

#: Operations that are undone when interrupted before their catalog commit: nothing they
#: wrote is visible until then, so removing the files they created restores the old state.
ROLLBACK_OPS = frozenset({"create_chain", "import_chain", "snapshot", "revert", "preview",
                          "clone", "export"})
#: Operations that are redone when interrupted: a merge writes into an existing volume, and
#: redoing it from its last recorded step is what restores a consistent chain.
FORWARD_OPS = frozenset({"delete_snapshot"})


class Journaled:
    """One journaled operation in progress (what :func:`journaled` yields)."""

    def __init__(self, ctx: Context, op: str, jid: int, images: list[Image]) -> None:
        self.ctx = ctx
        self.op = op
        self.jid = jid
        #: the images held for the operation (``hold=`` of :func:`journaled`), in order
        self.images = images
        #: files to remove once the operation is committed
        self.remove: list[str] = []
        self._held: list[Image] = []
        self._leaf: tuple[Chain | str, Image] | None = None

    def step(self, name: str) -> None:
        """Step boundary NAME (recorded for roll-forward operations; a kill point)."""
        step(self.ctx, self.jid, self.op, name)

    def hold(self, img: Image) -> Image:
        """IMG, an image the operation made: closed if the operation fails."""
        self._held.append(img)
        return img

    def leaf_of(self, chain: Chain | str, img: Image) -> None:
        """Once committed, IMG (held) becomes the leaf handle of CHAIN (or the chain of
        that name)."""
        self._leaf = (chain, img)


@contextlib.contextmanager
def journaled(ctx: Context, op: str, chain: str, args: dict[str, Any], *,
              illegal: Iterable[str] = (),
              hold: list[tuple[VolumeRow, bool, bool]] | Held | None = None,
              verify: bool = True, committed: str | None = "committed") -> Iterator[Journaled]:
    """The skeleton of every journaled operation.

    HOLD ([(row, readonly, backing)], see ``Context.holding``) opens the images the
    operation needs before anything is recorded (or is what ``Context.holding`` returned,
    when the caller needed the images to plan the operation); then the intent is journaled
    (ILLEGAL: volumes marked ILLEGAL with it) and the block runs.  If it raises, the images
    it made (``Journaled.hold``) are closed and the operation is undone now or left to recovery
    (``abort``), and the error goes on.  After it returned, the held images are
    closed, the new leaf handle (``Journaled.leaf_of``) is handed to its chain, the kill
    point ``OP.COMMITTED`` is passed (None: none) and the files in ``Journaled.remove`` are
    removed.  With a catalog shared by several hosts all of it runs under the chain's
    write lease (``Context.writing``; an export writes no chain and needs none)."""
    with contextlib.ExitStack() as fenced:
        if op != "export":
            fenced.enter_context(ctx.writing(chain))
        yield from _journaled(ctx, op, chain, args, illegal, hold, verify, committed)


def _journaled(ctx: Context, op: str, chain: str, args: dict[str, Any],
               illegal: Iterable[str], hold: list[tuple[VolumeRow, bool, bool]] | Held | None,
               verify: bool, committed: str | None) -> Iterator[Journaled]:
    with contextlib.ExitStack() as stack:
        if isinstance(hold, list):
            hold = ctx.holding(hold, verify=verify) if hold else None
        images = stack.enter_context(hold) if hold is not None else []
        j = Journaled(ctx, op, begin(ctx, op, chain, args, illegal=illegal), images)
        try:
            yield j
        except BaseException:
            for img in j._held:
                files.close_quietly(img)
            abort(ctx, j.jid, chain)
            raise
    if j._leaf is not None:
        target, img = j._leaf
        (ctx.chain(target) if isinstance(target, str) else target).adopt_leaf(img)
    if committed is not None:
        kill_point(f"{op}.{committed}")
    if j.remove:
        finish(ctx, j.jid, op, j.remove)


def begin(ctx: Context, op: str, chain: str, args: dict[str, Any], *,
          illegal: Iterable[str] = ()) -> int:
    ctx.check_writable()
    with ctx.cat.transaction():
        jid = ctx.cat.journal_begin(op, chain, args)
        for vid in illegal:
            ctx.cat.update_volume(vid, legality="ILLEGAL")
    kill_point(f"{op}.intent")
    return jid


def step(ctx: Context, jid: int, op: str, step: str) -> None:
    """Step boundary.  Only roll-forward operations record it (recovery resumes there);
    a rolled-back operation undoes the same whatever its step, and skipping the write
    saves a durable commit on every snapshot."""
    if op in FORWARD_OPS:
        ctx.cat.journal_step(jid, step)
    kill_point(f"{op}.{step}")


def finish(ctx: Context, jid: int, op: str, remove: list[str]) -> None:
    """The roll-forward tail of a committed operation: remove the files it made unused."""
    for rel in remove:
        files.unlink(ctx.abs(rel))
        kill_point(f"{op}.removed")
    if remove:
        files.fsync_dir(os.path.join(ctx.path, VOLUMES_DIR))
    ctx.cat.journal_end(jid)


def abort(ctx: Context, jid: int, chain: str) -> None:
    """An operation failed in this process: undo it now, or leave it to recovery."""
    try:
        rows = [j for j in ctx.cat.journal() if j.id == jid]
        if not rows:
            return
        j = rows[0]
        if j.state != "committed" and j.op in FORWARD_OPS:
            ctx.blocked[chain] = j.op
            return
        recover_row(ctx, j)
    except Exception:
        # Keep the original error for the caller; the journal row stays for recovery.
        ctx.blocked[chain] = "an interrupted operation"


def recover(ctx: Context, chains: Iterable[str] | None = None) -> list[str]:
    """Finish or undo every operation the journal shows in flight (``open`` calls this),
    or only those on CHAINS (a host taking chains over recovers just theirs).

    Returns:
        list[str]: one line per operation recovered, saying what was done.
    """
    ctx.check_writable()
    only = None if chains is None else set(chains)
    done = []
    for j in ctx.cat.journal():
        if only is not None and j.chain not in only:
            continue
        done.append(recover_row(ctx, j))
        if j.chain is not None:
            ctx.blocked.pop(j.chain, None)
    return done


def recover_row(ctx: Context, j: JournalRow) -> str:
    if j.state == "committed":
        finish(ctx, j.id, j.op, j.args.get("remove", []))
        return f"{j.op} on {j.chain}: finished (removed {len(j.args.get('remove', []))} files)"
    if j.op == "resize":
        return recover_resize(ctx, j)
    if j.op in FORWARD_OPS:
        merge_run(ctx, j.id, j.args, j.step)
        return f"{j.op} on {j.chain}: rolled forward from step {j.step}"
    if j.op in ROLLBACK_OPS:
        for rel in j.args.get("created", []):
            files.unlink(ctx.abs(rel))
        for path in j.args.get("tmp_files", []):
            files.unlink(path)
        files.fsync_dir(os.path.join(ctx.path, VOLUMES_DIR))
        ctx.cat.journal_end(j.id)
        return f"{j.op} on {j.chain}: rolled back"
    raise RepositoryError(f"the journal holds an unknown operation {j.op!r} (id {j.id}); "
                          "a newer cowchain wrote it", hint="upgrade cowchain")


def recover_resize(ctx: Context, j: JournalRow) -> str:
    """A resize is finished if the leaf grew (a leaf never shrinks), else it never
    happened; the catalog is made to say which."""
    leaf = ctx.cat.volume(j.args["leaf"])
    grown, rec = False, {}
    if leaf is not None and os.path.exists(ctx.abs(leaf.path)):
        with ctx.open_volume(leaf, readonly=True, backing=False, verify=False) as img:
            grown = img.size >= j.args["size"]
            rec = ctx.volume_record(leaf, sealed=False, size=img.size)
    with ctx.cat.transaction():
        if grown and leaf is not None and j.chain is not None:
            ctx.cat.update_chain(j.chain, size=j.args["size"])
            ctx.cat.update_volume(leaf.id, **rec)
        ctx.cat.journal_end(j.id)
    return f"resize on {j.chain}: {'finished' if grown else 'rolled back'}"


def merge_run(ctx: Context, jid: int, args: dict[str, Any], step: str) -> int:
    """Recovery of an interrupted merge: redo its steps from STEP, holding its images."""
    with ctx.holding(merge.specs(ctx, args), verify=False) as images:
        j = Journaled(ctx, "delete_snapshot", jid, images)
        copied, remove = merge.steps(ctx, j, args, step, None, None)
    kill_point("delete_snapshot.committed")
    finish(ctx, jid, "delete_snapshot", remove)
    return copied
