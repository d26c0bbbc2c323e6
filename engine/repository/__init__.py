"""Repository, Chain, Snapshot: snapshot chains as Red Hat Virtualization (oVirt) runs them.

A repository is a folder::

    <repo>/catalog.db          the SQLite catalog (engine.catalog): chains, volumes,
                               snapshots, the journal of operations in flight
    <repo>/volumes/<uuid>.qcow2|.raw
                               one file per volume; every overlay names its backing file by
                               its bare file name (same folder) and records its format
    <repo>/repository.lock     held (flock) by the process that has the repository open

The model:

- A chain starts as one base volume, RAW or QCOW2.  It is also the chain's leaf: the one
  writable volume, which ``Chain.read``/``write`` go to.
- ``snapshot()`` makes the leaf read-only and puts a new QCOW2 overlay that holds only
  metadata on top of it as the new leaf: O(1) in the disk size.  The snapshot owns the volume
  that was the leaf; its content is the chain read from that volume down.
- ``delete_snapshot()`` merges the snapshot's volume with its child, in whichever direction
  copies less: *commit* the child down into the snapshot's volume (the child file goes), or
  *pull* the snapshot volume's clusters up into the child (the snapshot's file goes).  What
  the leaf and every other snapshot read does not change.
- ``revert()``, ``preview()``/``commit_preview()``/``undo_preview()`` and ``clone()`` put a new
  empty overlay on top of a snapshot's volume.  A clone is a chain of its own whose leaf is
  backed by the snapshot's volume; volumes used by more than one chain are "shared" and are
  never merged or removed while a clone uses them.

Crash safety: every operation that touches files records its intent in the catalog journal
before it touches any file, does idempotent steps, and applies its catalog changes in one
transaction.  ``Repository.open`` rolls an interrupted operation back (snapshot, revert,
preview, clone, create, export: remove what it created) or forward (delete_snapshot: the
merge is redone from the last recorded step; removals after a commit are finished).  A volume
being written by a merge is marked ILLEGAL until the merge completes.  Every image lock an
operation needs is taken before its journal entry and held to its end (``Context.holding``),
so an operation refused by a lock leaves nothing to recover.

Volume identity: the catalog records each volume's virtual size and, for a raw volume, its
inode and (once sealed by a snapshot) a content stamp; every open compares a raw volume's size
and inode (``VolumeDamaged`` when they differ), ``check`` also the stamp.  A chain with a
volume known to be damaged takes no new snapshot unless forced.

The QCOW2 headers are the truth about which file backs which; the catalog is the truth about
snapshots.  ``Repository.check`` compares the two, runs the image check on every volume, and
explains (and with ``repair=True`` fixes) what does not match.

The package's rooms: ``repo`` (Repository: lifetime, lock, the public verbs), ``chain``
(Chain, the owner of its leaf handle), ``context`` (what the operations share: catalog
views, opening volume files), ``operations`` (the operations, as functions over the
context), ``journal`` (``journaled``, the one skeleton of a journaled operation, and
recovery), ``merge`` (delete_snapshot's merge steps), ``graph`` (ancestry and roles),
``files`` (the folder layout and raw volume identity), ``check`` (the repository check),
``catalog_api`` (the catalog interface the operations use) and ``values``.

Thread model: a Repository and its Chains belong to one thread.  A repository is open in one
process at a time (an exclusive lock on ``repository.lock``).
"""

from engine.repository.chain import Chain
from engine.repository.files import CATALOG_NAME, LOCK_NAME, LOST_FOUND, VOLUMES_DIR  # noqa: F401
from engine.repository.context import MIN_ID_PREFIX  # noqa: F401
from engine.repository.repo import Repository
from engine.repository.values import (DiffResult, ExportResult, MergeResult, Problem,
                                      RepositoryCheck, Snapshot, Volume)

__all__ = ["Repository", "Chain", "Snapshot", "Volume", "MergeResult", "ExportResult",
           "DiffResult", "Problem", "RepositoryCheck"]
